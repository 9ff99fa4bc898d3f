//! A workload for the observability tests, run under `sidecar run`: it makes known traffic
//! and talks to the test through stdout (progress lines) and stdin (go-ahead lines), so the
//! test can scrape the admin endpoint at exact points. Every wait is bounded.
//!
//! ```text
//! obs-client requests ADDR N SEND EXPECT   N connections: send SEND bytes, half-close,
//!                                          read to EOF, check EXPECT bytes came back
//! obs-client hold ADDR SEND                one connection to an echo server: send SEND
//!                                          bytes, read them back, print "open", wait for a
//!                                          line, close, print "closed"
//! obs-client ports IP FIRST COUNT PAUSE    COUNT connections to IP:FIRST.. (distinct ports),
//!                                          each read until EOF or reset; after PAUSE of them
//!                                          print "paused" and wait for a line
//! ```
//! Each mode first prints "ready" and waits for a line, and at the end prints "done" and
//! waits for stdin to close.

use std::{
    io::{self, BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("obs-client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) {
    println!("{line}");
    let _ = io::stdout().flush();
}

fn wait_line() -> io::Result<()> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> io::Result<T> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other(format!("argument {i} missing or invalid: {args:?}")))
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads until EOF, or until `want` bytes if given. A blocking read on a socket in the
/// sockmap can fail with EAGAIN when the kernel wakes it for data or a FIN that came by the
/// TCP path (tcp_bpf_recvmsg does this after an sk_msg miss); that is retried here, within
/// the same overall deadline, as a poll-based client would. (Known fast-path issue, reported
/// separately; not what these tests are about.)
fn read_all(s: &mut TcpStream, want: Option<usize>) -> io::Result<Vec<u8>> {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if want.is_some_and(|w| out.len() >= w) {
            return Ok(out);
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) && std::time::Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

fn run() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    say("ready");
    wait_line()?;
    match mode.as_str() {
        "requests" => {
            let addr: SocketAddr = arg(&args, 1)?;
            let n: usize = arg(&args, 2)?;
            let send: usize = arg(&args, 3)?;
            let expect: usize = arg(&args, 4)?;
            for i in 0..n {
                let mut s = connect(addr)?;
                s.write_all(&vec![b'x'; send])?;
                s.shutdown(Shutdown::Write)?;
                let got = read_all(&mut s, None)?;
                if got.len() != expect {
                    return Err(io::Error::other(format!(
                        "connection {i}: expected {expect} bytes back, got {}",
                        got.len()
                    )));
                }
            }
        }
        "hold" => {
            let addr: SocketAddr = arg(&args, 1)?;
            let send: usize = arg(&args, 2)?;
            let mut s = connect(addr)?;
            s.write_all(&vec![b'h'; send])?;
            let back = read_all(&mut s, Some(send))?;
            if back.len() != send {
                return Err(io::Error::other(format!(
                    "echo: {} of {send} bytes",
                    back.len()
                )));
            }
            say("open");
            wait_line()?;
            s.shutdown(Shutdown::Write)?;
            read_all(&mut s, None)?;
            drop(s);
            say("closed");
        }
        "ports" => {
            let ip: std::net::IpAddr = arg(&args, 1)?;
            let first: u16 = arg(&args, 2)?;
            let count: u16 = arg(&args, 3)?;
            let pause: u16 = arg(&args, 4)?;
            for i in 0..count {
                if i == pause {
                    say("paused");
                    wait_line()?;
                }
                let port = first
                    .checked_add(i)
                    .ok_or_else(|| io::Error::other("port range overflows"))?;
                // The proxy accepts, fails upstream (nothing listens there) and resets us,
                // often before connect() has even returned.
                match connect(SocketAddr::new(ip, port)) {
                    Ok(mut s) => {
                        let _ = read_all(&mut s, None);
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    Err(e) => return Err(e),
                }
            }
        }
        other => return Err(io::Error::other(format!("unknown mode {other:?}"))),
    }
    say("done");
    // Stay alive (so the sidecar stays up) until the test closes stdin.
    let mut rest = Vec::new();
    io::stdin().read_to_end(&mut rest)?;
    Ok(())
}
