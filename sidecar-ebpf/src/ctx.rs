//! Reading context fields. The verifier only allows 4-byte loads of most context fields, so
//! each word is read with a volatile load that LLVM cannot merge into a wider one.

use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    bindings::{bpf_sock_ops, sk_msg_md},
    helpers::generated::bpf_get_netns_cookie,
};
use sidecar_common::{SockKey, mapped_v4};

use crate::maps::NETNS_COOKIES;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Reads a 16-byte address as four 4-byte loads (the widest the verifier allows on context
/// and socket fields).
#[inline(always)]
pub unsafe fn words(p: *const [u32; 4]) -> [u32; 4] {
    let p = p.cast::<u32>();
    // SAFETY: the caller passes a 4-word array inside the context or the socket.
    unsafe {
        [
            read_volatile(p),
            read_volatile(p.add(1)),
            read_volatile(p.add(2)),
            read_volatile(p.add(3)),
        ]
    }
}

/// Builds a [`SockKey`] from the common layout of `bpf_sock_ops` and `sk_msg_md`: addresses
/// normalised to 16 bytes, `remote_port` converted from network order (the kernel stores the
/// big-endian port in the top half of the word), `local_port` already in host order.
///
/// Every field is read unconditionally, at a constant offset, and only the values are chosen
/// by family: if the choice were made on pointers, LLVM would merge the branches into one
/// load at a computed offset, which the verifier rejects ("modified ctx ptr").
macro_rules! sock_key_from {
    ($p:expr) => {{
        let p = $p;
        // SAFETY: `p` is the context pointer the kernel gave the program.
        let (family, l4, r4, l6, r6, lport, rport) = unsafe {
            (
                read_volatile(addr_of!((*p).family)),
                read_volatile(addr_of!((*p).local_ip4)),
                read_volatile(addr_of!((*p).remote_ip4)),
                words(addr_of!((*p).local_ip6)),
                words(addr_of!((*p).remote_ip6)),
                read_volatile(addr_of!((*p).local_port)),
                read_volatile(addr_of!((*p).remote_port)),
            )
        };
        let (local_ip, remote_ip) = if family == AF_INET {
            (mapped_v4(l4), mapped_v4(r4))
        } else if family == AF_INET6 {
            (l6, r6)
        } else {
            return None;
        };
        Some(SockKey {
            netns: if NETNS_COOKIES.load() != 0 {
                // SAFETY: the helper takes the context pointer.
                unsafe { bpf_get_netns_cookie(p as *mut c_void) }
            } else {
                0
            },
            local_ip,
            remote_ip,
            local_port: lport as u16,
            remote_port: u32::from_be(rport) as u16,
            _pad: 0,
        })
    }};
}

#[inline(always)]
pub fn sock_ops_key(ops: *const bpf_sock_ops) -> Option<SockKey> {
    sock_key_from!(ops)
}

#[inline(always)]
pub fn sk_msg_key(msg: *const sk_msg_md) -> Option<SockKey> {
    sock_key_from!(msg)
}

/// Reads the 16-byte destination of a `connect6` context.
#[inline(always)]
pub unsafe fn user_ip6(p: *const [u32; 4]) -> [u32; 4] {
    // SAFETY: forwarded from the caller.
    unsafe { words(p) }
}
