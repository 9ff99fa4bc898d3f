//! `lockstep`: known traffic in steps the test paces, for the observability tests, which
//! scrape the admin endpoint at exact points. The client talks to the test through stdout
//! (progress lines) and stdin (one go-ahead line per pause):
//!
//! ```text
//! lockstep requests ADDR N SEND EXPECT   N connections: send SEND bytes, half-close, read to
//!                                        EOF, check EXPECT bytes came back
//! lockstep hold ADDR SEND                one connection to an echo server: send SEND bytes,
//!                                        read them back, print "open", wait for a line,
//!                                        close, print "closed"
//! lockstep ports IP FIRST COUNT PAUSE    COUNT connections to IP:FIRST.. (distinct ports),
//!                                        each read until EOF or reset; after PAUSE of them
//!                                        print "paused" and wait for a line
//! ```
//! Each step first prints "ready" and waits for a line, and at the end prints "done" and
//! waits for stdin to close. Every wait on the network is bounded.

use std::{
    io::{self, BufRead, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Subcommand;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum Step {
    /// `n` connections: send `send` bytes, half-close, read to EOF, check `expect` bytes
    /// came back.
    Requests {
        addr: SocketAddr,
        n: usize,
        send: usize,
        expect: usize,
    },
    /// One connection to an echo server: send `send` bytes, read them back, print `open`,
    /// wait for a line, close, print `closed`.
    Hold { addr: SocketAddr, send: usize },
    /// `count` connections to `ip`:`first`.. (distinct ports), each read until EOF or reset;
    /// after `pause` of them print `paused` and wait for a line.
    Ports {
        ip: IpAddr,
        first: u16,
        count: u16,
        pause: u16,
    },
}

pub fn run(step: Step) -> ExitCode {
    match paced(step) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockstep: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) {
    println!("{line}");
    let _ = io::stdout().flush();
}

fn wait_line() -> io::Result<()> {
    io::stdin().lock().read_line(&mut String::new())?;
    Ok(())
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Reads until EOF, or until `want` bytes if given. A blocking read on a socket in the
/// sockmap can fail with EAGAIN when the kernel wakes it for data or a FIN that came by the
/// TCP path (tcp_bpf_recvmsg does this after an sk_msg miss); that is retried here, within
/// the same overall deadline, as a poll-based client would. (Known fast-path issue, reported
/// separately; not what these tests are about.)
fn read_all(stream: &mut TcpStream, want: Option<usize>) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if want.is_some_and(|w| out.len() >= w) {
            return Ok(out);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

fn paced(step: Step) -> io::Result<()> {
    say("ready");
    wait_line()?;
    match step {
        Step::Requests {
            addr,
            n,
            send,
            expect,
        } => {
            for i in 0..n {
                let mut stream = connect(addr)?;
                stream.write_all(&vec![b'x'; send])?;
                stream.shutdown(Shutdown::Write)?;
                let got = read_all(&mut stream, None)?;
                if got.len() != expect {
                    return Err(io::Error::other(format!(
                        "connection {i}: expected {expect} bytes back, got {}",
                        got.len()
                    )));
                }
            }
        }
        Step::Hold { addr, send } => {
            let mut stream = connect(addr)?;
            stream.write_all(&vec![b'h'; send])?;
            let back = read_all(&mut stream, Some(send))?;
            if back.len() != send {
                return Err(io::Error::other(format!(
                    "echo: {} of {send} bytes",
                    back.len()
                )));
            }
            say("open");
            wait_line()?;
            stream.shutdown(Shutdown::Write)?;
            read_all(&mut stream, None)?;
            drop(stream);
            say("closed");
        }
        Step::Ports {
            ip,
            first,
            count,
            pause,
        } => {
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
                    Ok(mut stream) => {
                        let _ = read_all(&mut stream, None);
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    say("done");
    // Stay alive (so the sidecar stays up) until the test closes stdin.
    io::stdin().read_to_end(&mut Vec::new())?;
    Ok(())
}
