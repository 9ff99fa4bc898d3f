//! A minimal client for the integration tests, run as the workload under `sidecar run`.
//!
//! `sidecar-echoclient [--bytes N] ADDR...`: for each address, connects (5 s timeout), prints
//! `local=<addr> peer=<addr>` (what this socket sees; under interception the peer is the
//! original destination in eBPF mode and in iptables mode alike), sends N bytes (default 64),
//! half-closes, and checks the echo is byte-exact. Exits 1 with an `error:` line on the
//! first failure.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let mut bytes = 64usize;
    let mut targets = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--bytes" {
            bytes = match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => n,
                None => return fail("--bytes needs a number"),
            };
        } else {
            match a.parse::<SocketAddr>() {
                Ok(addr) => targets.push(addr),
                Err(_) => return fail(&format!("{a:?} is not an address (e.g. 127.0.0.1:80)")),
            }
        }
    }
    if targets.is_empty() {
        return fail("usage: sidecar-echoclient [--bytes N] ADDR...");
    }
    for target in targets {
        if let Err(e) = exchange(target, bytes) {
            return fail(&format!("{target}: {e}"));
        }
    }
    ExitCode::SUCCESS
}

fn exchange(target: SocketAddr, bytes: usize) -> std::io::Result<()> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    println!("local={} peer={}", s.local_addr()?, s.peer_addr()?);
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut echoed = Vec::with_capacity(bytes);
    s.read_to_end(&mut echoed)?;
    if echoed != payload {
        return Err(std::io::Error::other(format!(
            "echo differs: sent {bytes} B, got {} B back",
            echoed.len()
        )));
    }
    println!("ok");
    Ok(())
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(1)
}
