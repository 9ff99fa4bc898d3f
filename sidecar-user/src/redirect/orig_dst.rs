//! Original-destination recovery from the accepted socket with `SO_ORIGINAL_DST`: conntrack
//! answers it in iptables mode (the nat `REDIRECT` rewrote the destination), and the agent's
//! `cgroup/getsockopt` program answers it for unprivileged pod proxies (see `agent.rs`).

use std::{
    io,
    mem::{MaybeUninit, size_of},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
};

use super::{OrigDstError, Redirect};

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h): both 80, at `SOL_IP` and `SOL_IPV6`.
const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The proxy's view: the original destination, from conntrack via the accepted socket.
#[derive(Debug, Default, Clone, Copy)]
pub struct OriginalDst;

impl Redirect for OriginalDst {
    fn original_destination(
        &self,
        socket: BorrowedFd<'_>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<SocketAddr, OrigDstError> {
        let lookup = |e: io::Error| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                OrigDstError::Unknown { client }
            } else {
                OrigDstError::Lookup {
                    client,
                    reason: e.to_string(),
                }
            }
        };
        let dst = if client.is_ipv4() {
            original_dst_v4(socket).map(SocketAddr::V4)
        } else {
            original_dst_v6(socket).map(SocketAddr::V6)
        }
        .map_err(lookup)?;
        // conntrack knows every connection, redirected or not: one made straight to the proxy
        // port reports the listener itself. Forwarding it would connect the proxy to itself,
        // over and over, so it is refused as not intercepted.
        if dst == local {
            return Err(OrigDstError::Unknown { client });
        }
        Ok(dst)
    }

    /// iptables mode has no kernel fast path.
    fn is_spliced(&self, _socket: BorrowedFd<'_>, _local: SocketAddr, _peer: SocketAddr) -> bool {
        false
    }
}

pub(crate) fn getsockopt<T>(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes and the kernel writes at most that many.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain-old-data, possibly partly overwritten by the kernel.
    Ok(unsafe { value.assume_init() })
}

fn original_dst_v4(socket: BorrowedFd<'_>) -> io::Result<SocketAddrV4> {
    let sa: libc::sockaddr_in = getsockopt(socket, libc::SOL_IP, SO_ORIGINAL_DST)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

fn original_dst_v6(socket: BorrowedFd<'_>) -> io::Result<SocketAddrV6> {
    let sa: libc::sockaddr_in6 = getsockopt(socket, libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST)?;
    Ok(SocketAddrV6::new(
        Ipv6Addr::from(sa.sin6_addr.s6_addr),
        u16::from_be(sa.sin6_port),
        sa.sin6_flowinfo,
        sa.sin6_scope_id,
    ))
}
