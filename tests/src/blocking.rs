//! Blocking socket calls as the test workloads and the echo server make them: retrying the
//! spurious `EAGAIN`s of sockets in a sockhash (and counting them), and closing with a reset.
//!
//! A blocking socket should never return `EAGAIN` except when its timeout expires. Sockets in
//! a sockhash with an sk_msg program use the kernel's `tcp_bpf` receive path, which can
//! return `EAGAIN` early when woken without data; the callers retry those and count them, so
//! the tests can assert transparency separately.

use std::{
    io::{self, ErrorKind},
    net::TcpStream,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Runs one blocking socket call on a socket whose timeout is `timeout`, retrying `EINTR`.
/// An `EAGAIN` that returns in less than half of it cannot be that timeout: it is counted
/// in `spurious` and the call retried, for at most `timeout` overall.
pub fn retrying<T>(
    spurious: &AtomicU64,
    timeout: Duration,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let started = Instant::now();
        match op() {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                    && started.elapsed() < timeout / 2
                    && Instant::now() < deadline =>
            {
                spurious.fetch_add(1, Ordering::Relaxed);
            }
            other => return other,
        }
    }
}

/// SO_LINGER 0: closing `stream` then sends RST instead of FIN (an upstream that resets).
/// A failure is ignored: the caller's test then sees a FIN and fails on that.
pub fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid fd and option struct for the duration of the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}
