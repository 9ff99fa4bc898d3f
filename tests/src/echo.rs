//! The upstream the intercepted client talks to: an echo server OUTSIDE the sidecar's
//! cgroups (it runs in the test process), recording the peer address of every connection it
//! accepts. That peer is the proof of interception: the proxy's socket when redirected, the
//! client's own socket when bypassed.

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use std::os::fd::AsRawFd;

use crate::{blocking::retrying, host::wait_until};

/// A per-connection read/write timeout: an echo thread never outlives a test by much.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the accept loop looks for new connections and for the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// Echoes every connection until EOF, then half-closes. Stops accepting when dropped.
pub struct EchoServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    spurious: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// On `127.0.0.1`, an ephemeral port.
    pub fn start_v4() -> Self {
        Self::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("cannot bind an echo server on 127.0.0.1: {e}"))
    }

    /// On `[::1]`, an ephemeral port. Errors when the host has no IPv6 loopback.
    pub fn start_v6() -> io::Result<Self> {
        Self::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)))
    }

    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        // std listens with a backlog of 128; a burst of thousands of connects (the load
        // tests) would overflow it and see resets. listen() again only widens the queue (the
        // kernel caps it at net.core.somaxconn).
        // SAFETY: listen() on a socket we own; no memory is passed.
        if unsafe { libc::listen(listener.as_raw_fd(), libc::c_int::MAX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Non-blocking accept lets the loop notice `stop` without a wake-up connection.
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let spurious = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (peers, spurious, stop) = (peers.clone(), spurious.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("echo-{}", addr.port()))
                .spawn(move || accept_loop(listener, peers, spurious, stop))?
        };
        Ok(Self {
            addr,
            peers,
            spurious,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Peer addresses of all connections accepted so far, in accept order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads/writes of the server's blocking sockets that failed with `EAGAIN` long before
    /// their timeout and were retried (see `sidecar-testclient`): the server is outside the
    /// sidecar's cgroups, yet its sockets can be spliced, so it must not see them either.
    pub fn spurious_wouldblock(&self) -> u64 {
        self.spurious.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` connections were accepted; panics after `timeout`.
    pub fn wait_for_peers(&self, n: usize, timeout: Duration) -> Vec<SocketAddr> {
        if !wait_until(timeout, || self.peers().len() >= n) {
            panic!(
                "echo server {} accepted {} connection(s) within {timeout:?}, expected {n}: {:?}",
                self.addr,
                self.peers().len(),
                self.peers()
            );
        }
        self.peers()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    spurious: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                peers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(peer);
                let spurious = spurious.clone();
                if let Err(e) = thread::Builder::new().spawn(move || echo(stream, &spurious)) {
                    eprintln!("echo server: cannot start a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) => {
                eprintln!("echo server: accept failed: {e}");
                thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Writes back everything read; at EOF half-closes, so the client's EOF proves that the
/// half-close travelled client → proxy → server and back.
fn echo(stream: TcpStream, spurious: &AtomicU64) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    if let Err(e) = setup {
        eprintln!("echo server: socket setup failed: {e}");
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match retrying(spurious, IO_TIMEOUT, || (&stream).read(&mut buf)) {
            Ok(0) => break,
            Ok(n) => {
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    match retrying(spurious, IO_TIMEOUT, || (&stream).write(rest)) {
                        Ok(0) | Err(_) => {
                            eprintln!("echo server: write failed");
                            return;
                        }
                        Ok(w) => rest = &rest[w..],
                    }
                }
            }
            Err(e) => {
                eprintln!("echo server: read failed: {e}");
                return;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}
