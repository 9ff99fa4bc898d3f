//! The process at the other end of a registration connection, pinned when it is accepted.
//!
//! SO_PEERCRED gives a pid, which is only a number: once the process that connected exits,
//! the number can be handed to a process in another pod, and `/proc/<pid>/cgroup` then
//! describes that one. A connection passed on (or inherited) after the connecting process
//! exits would be judged by whoever holds the pid now. So the agent pins the process itself
//! at accept time — a pidfd from `SO_PEERPIDFD` (Linux 6.5+), else the process's start time —
//! and every read of `/proc/<pid>/…` is followed by a check that the pin still holds: a pid
//! is never reused while its process lives, so a read followed by a live pin described the
//! caller.

use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use thiserror::Error;

/// The caller of one connection: its pid and uid from SO_PEERCRED, and the pin.
#[derive(Debug)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pin: Pin,
}

#[derive(Debug)]
enum Pin {
    /// The kernel's reference to the very process that connected: readable once it exited.
    Pidfd(OwnedFd),
    /// Without `SO_PEERPIDFD`: the start time (clock ticks after boot) seen at accept. A pid
    /// reused within one tick of the same boot is not told apart, and the connect → accept
    /// window is not covered.
    StartTime(u64),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PeerError {
    #[error("the caller's pid is not visible to the agent (the agent needs hostPID)")]
    NoPid,
    #[error(
        "the process that opened this connection (pid {0}) has exited: only the process that \
         connects may register, over its own connection"
    )]
    Gone(u32),
}

impl PeerError {
    /// The refusal counter this error is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::NoPid => "no_peer_pid",
            PeerError::Gone(_) => "process_gone",
        }
    }
}

impl Peer {
    /// Pins the process that connected `socket` (an accepted Unix stream).
    pub fn of(socket: &impl AsRawFd) -> Result<Self, PeerError> {
        let cred = peer_cred(socket.as_raw_fd()).map_err(|_| PeerError::NoPid)?;
        let pid = u32::try_from(cred.pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or(PeerError::NoPid)?;
        let pin = match peer_pidfd(socket.as_raw_fd()) {
            Ok(fd) => Pin::Pidfd(fd),
            // Older kernels do not know the option; a peer already reaped has no pidfd on
            // kernels before 6.16 (and is gone either way).
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                Pin::StartTime(start_time(pid).ok_or(PeerError::Gone(pid))?)
            }
            Err(_) => return Err(PeerError::Gone(pid)),
        };
        let peer = Peer {
            pid,
            uid: cred.uid,
            pin,
        };
        peer.check()?;
        Ok(peer)
    }

    /// Runs `read` (which reads `/proc/<pid>/…`) and returns what it read only if the pid
    /// still named the process that connected when it was done.
    pub fn read<T>(&self, read: impl FnOnce(u32) -> T) -> Result<T, PeerError> {
        let value = read(self.pid);
        self.check()?;
        Ok(value)
    }

    /// Whether the process that connected is still alive under its pid.
    fn check(&self) -> Result<(), PeerError> {
        let alive = match &self.pin {
            Pin::Pidfd(fd) => !exited(fd),
            Pin::StartTime(t) => start_time(self.pid) == Some(*t),
        };
        if alive {
            Ok(())
        } else {
            Err(PeerError::Gone(self.pid))
        }
    }
}

fn peer_cred(fd: i32) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn peer_pidfd(fd: i32) -> io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `pidfd`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel installed a new descriptor that only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// A pidfd polls readable once its process has exited (zombie or reaped).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut poll, 1, 0) };
    n != 0 && poll.revents != 0
}

/// Field 22 of `/proc/<pid>/stat` (after the parenthesised command, which may hold spaces
/// and parentheses itself).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // Fields from the third (state) on; the start time is the 22nd.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::{ffi::OsStrExt, net::UnixListener};

    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 200 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("4242 (x) S 1"), None);
    }

    /// Forks a child that connects to `path` and waits; returns its pid.
    fn connecting_child(path: &std::path::Path) -> libc::pid_t {
        // SAFETY: a zeroed sockaddr_un is valid; filled before the fork so the child only
        // makes async-signal-safe calls.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: the child calls only socket, connect, pause and _exit.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::connect(s, (&raw const addr).cast(), len);
                libc::pause();
                libc::_exit(0);
            }
            assert!(pid > 0, "fork: {}", io::Error::last_os_error());
            pid
        }
    }

    /// A connection whose connecting process exited is refused from then on, with either pin.
    #[test]
    fn a_peer_that_exited_is_gone() {
        let dir = std::env::temp_dir().join(format!("sidecar-peer-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("s")).unwrap();
        let child = connecting_child(&dir.join("s"));
        let (conn, _) = listener.accept().unwrap();
        let peer = Peer::of(&conn).unwrap();
        assert_eq!(peer.pid, child as u32);
        assert!(
            matches!(peer.pin, Pin::Pidfd(_)),
            "this kernel has SO_PEERPIDFD"
        );
        let fallback = Peer {
            pid: peer.pid,
            uid: peer.uid,
            pin: Pin::StartTime(start_time(peer.pid).unwrap()),
        };
        assert_eq!(peer.read(|p| p), Ok(peer.pid));
        assert_eq!(fallback.read(|p| p), Ok(peer.pid));
        // SAFETY: our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        assert_eq!(peer.read(|p| p), Err(PeerError::Gone(peer.pid)));
        assert_eq!(fallback.read(|p| p), Err(PeerError::Gone(peer.pid)));
        let _ = fs::remove_dir_all(&dir);
    }
}
