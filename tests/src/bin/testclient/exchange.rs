//! `exchange`: one echo exchange per address, reported as plain text, for tests that run the
//! client as one step of a shell script and read `local=`/`peer=` back (under interception
//! the peer is the original destination, in eBPF mode and in iptables mode alike).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

/// Connect and I/O timeout of each exchange.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Exchanges with each address in turn; stops at the first failure (exit 1).
pub fn run(addrs: &[SocketAddr], bytes: usize) -> ExitCode {
    for &addr in addrs {
        if let Err(e) = exchange(addr, bytes) {
            eprintln!("error: {addr}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

fn exchange(addr: SocketAddr, bytes: usize) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    println!(
        "local={} peer={}",
        stream.local_addr()?,
        stream.peer_addr()?
    );
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload)?;
    stream.shutdown(Shutdown::Write)?;
    let mut echoed = Vec::with_capacity(bytes);
    stream.read_to_end(&mut echoed)?;
    if echoed != payload {
        return Err(io::Error::other(format!(
            "echo differs: sent {bytes} B, got {} B back",
            echoed.len()
        )));
    }
    println!("ok");
    Ok(())
}
