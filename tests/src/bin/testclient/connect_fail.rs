//! `connect-fail`: how (and how fast) a connection fails.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use sidecar_tests::{blocking::retrying, protocol::ConnectFailLine};

use crate::{FAIL_TIMEOUT, emit};

/// Exits 0 whenever it could report: whether the connection failed is data for the test.
pub fn connect_fail(addr: SocketAddr) -> ExitCode {
    let start = Instant::now();
    let spurious = AtomicU64::new(0);
    let (connected, error) = match TcpStream::connect_timeout(&addr, FAIL_TIMEOUT) {
        Err(e) => (false, Some(format!("connect: {e}"))),
        Ok(stream) => (true, first_failure(&stream, &spurious)),
    };
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let spurious_wouldblock = spurious.load(Ordering::Relaxed);
    emit(&ConnectFailLine {
        connected,
        error,
        elapsed_ms,
        spurious_wouldblock,
    });
    ExitCode::SUCCESS
}

/// Whether a raw socket can be opened (it needs CAP_NET_RAW). Always exits 0: the answer is
/// data for the test.
pub fn raw_socket() -> ExitCode {
    // SAFETY: socket(2) with integer arguments; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        println!("raw socket: {}", std::io::Error::last_os_error());
    } else {
        // SAFETY: closes the descriptor just opened.
        unsafe { libc::close(fd) };
        println!("raw socket: ok");
    }
    ExitCode::SUCCESS
}

/// After a successful connect: how the connection fails, or `None` if a byte came back.
/// Spurious `EAGAIN`s are retried, so the error is the real failure, not a kernel quirk.
pub fn first_failure(stream: &TcpStream, spurious: &AtomicU64) -> Option<String> {
    if let Err(e) = stream.set_read_timeout(Some(FAIL_TIMEOUT)) {
        return Some(format!("set_read_timeout: {e}"));
    }
    if let Err(e) = retrying(spurious, FAIL_TIMEOUT, || (&*stream).write(b"x")) {
        return Some(format!("write: {e}"));
    }
    let mut byte = [0u8; 1];
    match retrying(spurious, FAIL_TIMEOUT, || (&*stream).read(&mut byte)) {
        Ok(0) => Some("read: EOF".to_string()),
        Ok(_) => None,
        Err(e) => Some(format!("read: {e}")),
    }
}
