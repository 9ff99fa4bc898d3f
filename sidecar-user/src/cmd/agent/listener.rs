//! A pod sidecar's outbound listeners, passed with its register line: checked here, then
//! marked with [`PROXY_LISTENER_MARK`] so the connect hooks redirect the pod's connects to
//! them and to nothing else ([`flags::CHECK_LISTENER`](sidecar_common::flags::CHECK_LISTENER)).
//!
//! Why: after the sidecar dies its pod stays intercepted (fail-closed), and without the check
//! whoever binds the unprivileged proxy port in the pod's network namespace would receive the
//! app's connections. The sidecar cannot mark its sockets (SO_MARK needs CAP_NET_ADMIN); the
//! agent can, and marks only TCP sockets listening on the registered proxy port of the
//! network namespace the caller connected from.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    sync::Arc,
};

use sidecar_common::PROXY_LISTENER_MARK;
use thiserror::Error;

/// Why passed listeners were not accepted (counted as `bad_listener`).
#[derive(Debug, Error)]
pub enum ListenerError {
    #[error(
        "the register request says {named} listener(s) came with it, but {got} descriptor(s) \
         did: send them with the register line (SCM_RIGHTS)"
    )]
    Count { named: u8, got: usize },
    #[error("passed descriptor {index} is not a listening TCP socket ({why})")]
    NotTcpListener { index: usize, why: String },
    #[error(
        "passed listener {index} listens on {addr}, not on the proxy port {port} of 127.0.0.1 \
         or [::1]"
    )]
    WrongAddress {
        index: usize,
        addr: SocketAddr,
        port: u16,
    },
    #[error(
        "passed listener {index} is in another network namespace than the process that \
         registers"
    )]
    OtherNamespace { index: usize },
    #[error("no listener on 127.0.0.1:{0} came with the request")]
    NoIpv4(u16),
    #[error("the request says ipv6, but no listener on [::1]:{0} came with it")]
    NoIpv6(u16),
    #[error("reading the network namespace of {what}: {source}")]
    Namespace {
        what: &'static str,
        source: io::Error,
    },
}

/// Listeners that passed [`verify`], not marked yet: [`Verified::mark`] runs once the
/// registration is admitted, so a refused caller's sockets are never marked. Cloned with its
/// registration request; the descriptors close with the last clone.
#[derive(Debug, Clone)]
pub struct Verified(Arc<[TcpListener]>);

impl Verified {
    /// Sets SO_MARK = [`PROXY_LISTENER_MARK`] on every listener (the mark lives on the
    /// socket, so it holds for the sidecar's own descriptors).
    pub fn mark(&self) -> io::Result<()> {
        for l in self.0.iter() {
            set_mark(l.as_fd(), PROXY_LISTENER_MARK)?;
        }
        Ok(())
    }
}

/// Checks the `fds` that came with a register request naming `named` listeners: each is a
/// TCP socket listening on `port` of 127.0.0.1 or [::1], in the network namespace of
/// `connection` (the registration connection, which the kernel creates in the namespace of
/// the process that connected); one IPv4 listener, and an IPv6 one if `ipv6`.
pub fn verify(
    fds: Vec<OwnedFd>,
    named: u8,
    port: u16,
    ipv6: bool,
    connection: BorrowedFd<'_>,
) -> Result<Verified, ListenerError> {
    if fds.len() != usize::from(named) {
        return Err(ListenerError::Count {
            named,
            got: fds.len(),
        });
    }
    let caller = namespace(connection).map_err(|source| ListenerError::Namespace {
        what: "the registration connection",
        source,
    })?;
    let (mut v4, mut v6) = (false, false);
    let mut listeners = Vec::with_capacity(fds.len());
    for (index, fd) in fds.into_iter().enumerate() {
        let listener = listening_tcp(fd).map_err(|e| ListenerError::NotTcpListener {
            index,
            why: e.to_string(),
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| ListenerError::NotTcpListener {
                index,
                why: e.to_string(),
            })?;
        let seen = match addr.ip() {
            IpAddr::V4(Ipv4Addr::LOCALHOST) if addr.port() == port => &mut v4,
            IpAddr::V6(Ipv6Addr::LOCALHOST) if addr.port() == port => &mut v6,
            _ => return Err(ListenerError::WrongAddress { index, addr, port }),
        };
        *seen = true;
        let own = namespace(listener.as_fd()).map_err(|source| ListenerError::Namespace {
            what: "a passed listener",
            source,
        })?;
        if own != caller {
            return Err(ListenerError::OtherNamespace { index });
        }
        listeners.push(listener);
    }
    if !v4 {
        return Err(ListenerError::NoIpv4(port));
    }
    if ipv6 && !v6 {
        return Err(ListenerError::NoIpv6(port));
    }
    Ok(Verified(listeners.into()))
}

/// `fd` as a TCP listener, if it is a TCP socket (IPv4 or IPv6) in the listening state.
fn listening_tcp(fd: OwnedFd) -> io::Result<TcpListener> {
    let domain = int_option(fd.as_fd(), libc::SO_DOMAIN)?;
    let protocol = int_option(fd.as_fd(), libc::SO_PROTOCOL)?;
    let listening = int_option(fd.as_fd(), libc::SO_ACCEPTCONN)?;
    if !matches!(domain, libc::AF_INET | libc::AF_INET6) || protocol != libc::IPPROTO_TCP {
        return Err(io::Error::other("not TCP over IPv4 or IPv6"));
    }
    if listening != 1 {
        return Err(io::Error::other("not listening"));
    }
    Ok(TcpListener::from(fd))
}

fn int_option(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_mark(fd: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a u32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            std::ptr::from_ref(&mark).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The network namespace a socket belongs to (`SIOCGSKNS`, CAP_NET_ADMIN), as the device and
/// inode of its nsfs file.
fn namespace(socket: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGSKNS as _) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel installed a new descriptor that only we own.
    let ns = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let meta = ns.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn mark_of(l: &TcpListener) -> libc::c_int {
        int_option(l.as_fd(), libc::SO_MARK).unwrap()
    }

    /// What the sidecar passes is accepted and marked; anything else is refused with its
    /// reason, and nothing is marked by `verify` itself. (SIOCGSKNS and SO_MARK need
    /// CAP_NET_ADMIN: as another user this only checks the refusals that come first.)
    #[test]
    fn only_the_proxy_port_s_listeners_are_accepted() {
        let (conn, _peer) = UnixStream::pair().unwrap();
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let dup = |l: &TcpListener| OwnedFd::from(l.try_clone().unwrap());

        let e = verify(vec![dup(&v4)], 2, port, false, conn.as_fd()).unwrap_err();
        assert!(
            matches!(e, ListenerError::Count { named: 2, got: 1 }),
            "{e}"
        );
        if !root() {
            return;
        }
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = verify(vec![dup(&other)], 1, port, false, conn.as_fd()).unwrap_err();
        assert!(matches!(e, ListenerError::WrongAddress { .. }), "{e}");
        let file = OwnedFd::from(std::fs::File::open("/").unwrap());
        let e = verify(vec![file], 1, port, false, conn.as_fd()).unwrap_err();
        assert!(matches!(e, ListenerError::NotTcpListener { .. }), "{e}");
        let connected = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let e = verify(vec![connected.into()], 1, port, false, conn.as_fd()).unwrap_err();
        assert!(matches!(e, ListenerError::NotTcpListener { .. }), "{e}");
        let e = verify(vec![dup(&v4)], 1, port, true, conn.as_fd()).unwrap_err();
        assert!(matches!(e, ListenerError::NoIpv6(p) if p == port), "{e}");

        let ok = verify(vec![dup(&v4)], 1, port, false, conn.as_fd()).unwrap();
        assert_eq!(mark_of(&v4), 0, "verify marks nothing");
        ok.mark().unwrap();
        assert_eq!(mark_of(&v4) as u32, PROXY_LISTENER_MARK);
    }

    /// A caller that connected from another network namespace than its listener's: refused.
    #[test]
    fn a_listener_of_another_namespace_is_refused() {
        if !root() {
            return;
        }
        // A thread of its own enters a new network namespace (setns and unshare are per
        // thread) and makes the connection there.
        let (conn, _peer) = std::thread::spawn(|| {
            // SAFETY: affects only this short-lived thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            UnixStream::pair().unwrap()
        })
        .join()
        .unwrap();
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let e = verify(vec![v4.into()], 1, port, false, conn.as_fd()).unwrap_err();
        assert!(
            matches!(e, ListenerError::OtherNamespace { index: 0 }),
            "{e}"
        );
    }
}
