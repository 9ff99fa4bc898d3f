//! The kernel's table of TCP sockets in this network namespace (`NETLINK_SOCK_DIAG`, what
//! `ss` reads), with each socket's cookie and byte counters. Pass-through connections have
//! no proxy socket to meter, so `/connections` reads their bytes so far from here. Needs no
//! privileges: any process may list the sockets of its own namespace.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// One TCP socket as the kernel describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    /// `SO_COOKIE`: what the eBPF programs key connections by.
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// From `tcp_info` (absent for sockets without one, e.g. in `TIME_WAIT`). These are
    /// sequence-space counts: `bytes_acked` includes the SYN once the handshake is done.
    pub bytes_acked: Option<u64>,
    pub bytes_received: Option<u64>,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_INFO: u16 = 2;
/// `struct inet_diag_msg`.
const DIAG_MSG_LEN: usize = 72;
const NLMSG_HDR_LEN: usize = 16;
/// `tcpi_bytes_acked` and `tcpi_bytes_received` in `struct tcp_info` (Linux ≥ 4.1 and 4.2).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// Every TCP socket of this network namespace, both families.
pub fn tcp_sockets() -> io::Result<Vec<DiagSocket>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(family as u8, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, out: &mut Vec<DiagSocket>) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = request(family);
    // SAFETY: sends `request.len()` bytes from a live buffer; the kernel is the peer (no
    // address needed on a netlink socket that has not been connected: pid 0 is the default).
    let sent = unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receives into a live buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 || parse(&buf[..n as usize], out)? {
            return Ok(());
        }
    }
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for a dump of every TCP socket of `family`, with
/// `tcp_info`.
fn request(family: u8) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + 56;
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&(len as u32).to_ne_bytes());
    r.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    r.extend_from_slice(&1u32.to_ne_bytes()); // seq
    r.extend_from_slice(&0u32.to_ne_bytes()); // pid
    r.push(family);
    r.push(libc::IPPROTO_TCP as u8);
    r.push(1 << (INET_DIAG_INFO - 1)); // idiag_ext
    r.push(0);
    r.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    r.resize(len, 0); // inet_diag_sockid: all zero, no filter
    r
}

/// Parses one datagram of the dump into `out`; `Ok(true)` once the dump is done.
/// Bytes from the kernel, parsed defensively: a short or malformed message ends the parse
/// with an error instead of reading past it.
pub fn parse(mut buf: &[u8], out: &mut Vec<DiagSocket>) -> io::Result<bool> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Err(bad("message length out of bounds"));
        }
        let payload = &buf[NLMSG_HDR_LEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = payload
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .ok_or_else(|| bad("short error message"))?;
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY => out.push(socket(payload).ok_or_else(|| bad("short socket"))?),
            _ => {}
        }
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(false)
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One `inet_diag_msg` and its attributes.
fn socket(msg: &[u8]) -> Option<DiagSocket> {
    if msg.len() < DIAG_MSG_LEN {
        return None;
    }
    let family = msg[0];
    let port = |at: usize| u16::from_be_bytes([msg[at], msg[at + 1]]);
    let addr = |at: usize| -> IpAddr {
        let b: [u8; 16] = msg[at..at + 16].try_into().unwrap();
        if i32::from(family) == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(b))
        }
    };
    let word = |at: usize| u32::from_ne_bytes(msg[at..at + 4].try_into().unwrap());
    let mut found = DiagSocket {
        cookie: u64::from(word(44)) | (u64::from(word(48)) << 32),
        local: SocketAddr::new(addr(8), port(4)),
        remote: SocketAddr::new(addr(24), port(6)),
        bytes_acked: None,
        bytes_received: None,
    };
    let mut attrs = &msg[DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let data = &attrs[4..len];
        if kind == INET_DIAG_INFO {
            let u64_at = |at: usize| {
                data.get(at..at + 8)
                    .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
            };
            found.bytes_acked = u64_at(TCPI_BYTES_ACKED);
            found.bytes_received = u64_at(TCPI_BYTES_RECEIVED);
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// The real kernel: a loopback connection that moved known bytes is listed with its
    /// cookie and both ends' counters.
    #[test]
    fn lists_a_loopback_connection_with_its_cookie_and_bytes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[7u8; 1000]).unwrap();
        let mut got = [0u8; 1000];
        server.read_exact(&mut got).unwrap();
        server.write_all(&[9u8; 300]).unwrap();
        let mut back = [0u8; 300];
        client.read_exact(&mut back).unwrap();

        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt(SO_COOKIE) into a u64 of the stated length.
        let rc = unsafe {
            libc::getsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let all = tcp_sockets().expect("sock_diag dump");
        let mine = all
            .iter()
            .find(|s| s.cookie == cookie)
            .unwrap_or_else(|| panic!("cookie {cookie} not in {all:?}"));
        assert_eq!(mine.local, client.local_addr().unwrap());
        assert_eq!(mine.remote, client.peer_addr().unwrap());
        // bytes_acked counts the SYN too.
        assert_eq!(mine.bytes_acked, Some(1001));
        assert_eq!(mine.bytes_received, Some(300));
    }

    #[test]
    fn malformed_messages_are_errors_not_reads_past_the_end() {
        let mut out = Vec::new();
        // A header claiming more bytes than there are.
        let mut msg = vec![0u8; 20];
        msg[0..4].copy_from_slice(&100u32.to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(parse(&msg, &mut out).is_err());
        // A socket message too short for inet_diag_msg.
        msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
        assert!(parse(&msg, &mut out).is_err());
        // DONE ends the dump.
        msg[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(parse(&msg, &mut out).unwrap());
        assert!(out.is_empty());
    }
}
