//! Who owns a socket? `/proc/net/tcp{,6}` maps a local address to an inode, and
//! `/proc/<pid>/fd/*` links to `socket:[inode]`. This is how a test proves that the echo
//! server's peer is the proxy (the sidecar process) and not the application.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// The pid of a process holding an open TCP socket whose LOCAL address is `addr`.
///
/// Sockets in TIME_WAIT (inode 0) are ignored: only a live socket has an owner.
pub fn socket_owner_pid(addr: SocketAddr) -> Option<u32> {
    let inodes = socket_inodes(addr);
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we scan: unreadable ones are simply skipped.
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path())
                && wanted.iter().any(|w| target.as_os_str() == w.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Inodes of the TCP sockets bound locally to `addr` (IPv4 sockets may also appear in
/// `tcp6` as v4-mapped addresses of dual-stack sockets; both files are searched).
fn socket_inodes(addr: SocketAddr) -> Vec<u64> {
    let addr = unmap(addr);
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode …
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            let Some(local) = parse_proc_addr(local) else {
                continue;
            };
            let Ok(inode) = inode.parse::<u64>() else {
                continue;
            };
            if inode != 0 && unmap(local) == addr {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// `0100007F:1F90` or `0000000000000000FFFF00000100007F:1F90`. The kernel prints each 32-bit
/// word of the address as a native-endian integer in hex, and the port in host order.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = text.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip_hex.get(8 * i..8 * i + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip_hex.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// `[::ffff:127.0.0.1]:80` → `127.0.0.1:80`, so both spellings compare equal.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The cookie of the network namespace this process runs in (`SO_NETNS_COOKIE`), which
/// qualifies every splice key: the tests, the sidecar and its command share one netns.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and a u64-sized out buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A TCP connection to `dst` from source address `src` (port chosen by the kernel): on
/// loopback, any 127.0.0.0/8 address stands for another peer.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let SocketAddr::V4(dst) = dst else {
        return Err(std::io::Error::other("connect_from: IPv4 only"));
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let local = sockaddr(src, 0);
    // SAFETY: bind(2) with a sockaddr_in of the length given.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const local).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stream = std::net::TcpStream::from(fd);
    let remote = sockaddr(*dst.ip(), dst.port());
    // A blocking connect on loopback completes or fails at once (SYN to a local listener).
    // SAFETY: connect(2) with a sockaddr_in of the length given.
    if unsafe { libc::connect(stream.as_raw_fd(), (&raw const remote).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}
