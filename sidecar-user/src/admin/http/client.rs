//! The CLI's client (`sidecar status`, `sidecar conns`): one blocking `GET` on std sockets.
//!
//! Not hyper's client: the commands are synchronous and run no tokio runtime, and the server
//! answers every request with `Content-Length` and `Connection: close`, so reading to EOF and
//! splitting off the head is the whole protocol. hyper's client would need a runtime, a
//! handshake task and another feature for the same `(status, body)`.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// `GET path` against an admin server, blocking, each step within `timeout`: (status, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// A complete `Connection: close` response: (status, body).
fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad())?;
    let mut status_line = head.lines().next().unwrap_or("").split_whitespace();
    if !status_line.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(bad());
    }
    let status = status_line
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\nbusy\n")
                .unwrap(),
            (503, "busy\n".into())
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap(),
            (200, String::new())
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 OK\r\n\r\n",
            b"\xff\xfe 200\r\n\r\n",
            b"",
        ] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
    }
}
