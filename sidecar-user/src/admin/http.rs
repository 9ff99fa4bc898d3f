//! A minimal HTTP/1.1 responder and client for the admin endpoints.
//!
//! Why not hyper: the admin surface is six GET endpoints on localhost, each answered with one
//! complete body and `Connection: close`. That needs a request line, a bounded header read
//! and a status line — about a hundred lines here — whereas hyper 1 brings hyper-util,
//! http, http-body-util and their API churn for features (keep-alive, chunking, h2,
//! upgrades) nothing here uses. The limits below keep a slow or hostile client from holding
//! the admin thread: the head must arrive within [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`].

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream as StdStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

pub const MAX_HEAD: usize = 8 * 1024;
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How much of a server its clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight at once; beyond that a newcomer is answered 503 at once.
    pub total: usize,
    /// Requests in flight at once from one IP address. Without it, silent clients on one
    /// address could hold every slot for a head timeout each, renew them, and every other
    /// client (kubelet's probes, Prometheus) would get 503s for as long as they kept on.
    pub per_peer: usize,
    /// How long a client has to send its request head.
    pub head_timeout: Duration,
}

/// A parsed request line: method and path (query string removed).
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
}

/// A complete response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        let mut body = serde_json::to_string_pretty(value).unwrap_or_else(|e| e.to_string());
        body.push('\n');
        Self::new(status, "application/json", body)
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Parses the head of a request (`GET /path?x HTTP/1.1\r\n...`).
pub fn parse_request(head: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    Some(Request { method, path })
}

/// Accepts on `listener` until the future is dropped, answering each request with `route` on
/// a task of its own. A newcomer beyond `limits` (in total, or from its address) gets 503 at
/// once ([`busy`]), so slow or silent clients cannot hold the probes and scrapes back. A
/// failed accept (say, out of fds) is retried after 50 ms rather than spinning.
pub async fn serve<R>(listener: TcpListener, limits: Limits, route: R)
where
    R: Fn(&Request) -> Response + Clone + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.total));
    let peers = PeerSlots::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!("admin accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let held = peers
            .take(peer.ip().to_canonical(), limits.per_peer)
            .and_then(|p| Some((p, slots.clone().try_acquire_owned().ok()?)));
        match held {
            Some(held) => {
                let route = route.clone();
                tokio::spawn(async move {
                    serve_one(stream, limits.head_timeout, route).await;
                    drop(held);
                });
            }
            None => {
                tokio::spawn(busy(stream));
            }
        }
    }
}

/// Requests in flight per peer address. Entries exist only while a request is in flight,
/// so the map never holds more than [`Limits::total`] + 1 addresses.
#[derive(Clone, Default)]
struct PeerSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One request's share of its peer's slots, given back on drop.
struct PeerSlot {
    slots: PeerSlots,
    ip: IpAddr,
}

impl PeerSlots {
    fn take(&self, ip: IpAddr, per_peer: usize) -> Option<PeerSlot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held = map.entry(ip).or_default();
        if *held >= per_peer {
            return None;
        }
        *held += 1;
        Some(PeerSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Reads one request head from `stream` (within `head_timeout`), answers it with `handle`,
/// and closes.
pub async fn serve_one(
    mut stream: TcpStream,
    head_timeout: Duration,
    handle: impl FnOnce(&Request) -> Response,
) {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(head_timeout, async {
        let mut buf = [0u8; 1024];
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let (response, method) = match read {
        Ok(Ok(true)) => match parse_request(&head) {
            Some(req) if req.method == "GET" || req.method == "HEAD" => {
                let method = req.method.clone();
                (handle(&req), method)
            }
            Some(req) => (
                Response::text(405, "only GET and HEAD are supported\n"),
                req.method,
            ),
            None => (Response::text(400, "malformed request\n"), String::new()),
        },
        Ok(Ok(false)) => (
            Response::text(431, "request head too large\n"),
            String::new(),
        ),
        // Timed out or went away: nothing to answer.
        _ => return,
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(response.body.as_bytes());
    }
    let _ = tokio::time::timeout(HEAD_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

/// Answers 503 without reading the request: the server is at its concurrency limit.
pub async fn busy(mut stream: TcpStream) {
    let body = "admin server busy; retry\n";
    let out = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// `GET path` against an admin server, blocking, for the CLI: (status, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = StdStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Request {
                method: "GET".into(),
                path: "/metrics".into()
            })
        );
        assert_eq!(parse_request(b"GET /a HTTP/2\r\n\r\n"), None);
        assert_eq!(parse_request(b"GET\r\n\r\n"), None);
        assert_eq!(parse_request(b"GET http://x/ HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_request(&[0xff, 0xfe]), None);
    }
}
