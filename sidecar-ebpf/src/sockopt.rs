//! cgroup/getsockopt: answer `SO_ORIGINAL_DST` from the `ORIG_DST` map, so a proxy without
//! any capability (the Kubernetes pod sidecar) learns where a redirected connection was going.
//!
//! The proxy asks its accepted socket `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv4) or
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` (IPv6), exactly as in iptables mode. The
//! kernel's own answer (conntrack: usually ENOENT or ENOPROTOOPT) comes first; this program
//! then replaces it when sockops published an original destination for the connection: the
//! key is the *app* socket's 4-tuple, i.e. the accepted socket's tuple reversed, in the
//! socket's network namespace. Any other call, or a connection we know nothing about, keeps
//! the kernel's answer untouched. This is how Merbridge serves Envoy.
//!
//! It also answers the private `getsockopt(SOL_IP, SO_SPLICED)` (see `sidecar_common::sockopt`)
//! with whether the caller's socket is in the sockmap fast path, which the proxy cannot read
//! from the maps itself.

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt, programs::SockoptContext,
};
use sidecar_common::{
    Counter, OrigDst, SockKey, mapped_v4,
    sockopt::{SO_ORIGINAL_DST, SO_SPLICED, SOL_IP, SOL_IPV6},
};

use crate::{
    ctx::{AF_INET, AF_INET6, words},
    maps::{ORIG_DST, SPLICED, count},
};

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;
const U32_LEN: usize = 4;
/// The only verdict a getsockopt program may return without failing the call (0 = EPERM).
const PROCEED: i32 = 1;

#[cgroup_sockopt(getsockopt)]
pub fn sidecar_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_getsockopt(&ctx);
    PROCEED
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) -> Option<()> {
    let so = ctx.sockopt;
    // SAFETY: 4-byte loads of the context's scalar fields.
    let (level, optname) = unsafe {
        (
            read_volatile(addr_of!((*so).level)),
            read_volatile(addr_of!((*so).optname)),
        )
    };
    if optname == SO_SPLICED && level == SOL_IP {
        return answer_spliced(ctx);
    }
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return None;
    }
    let (family, own) = own_key(ctx)?;
    if (family == AF_INET) != (level == SOL_IP) {
        return None;
    }
    // The accepted socket is (local = proxy listener, remote = app); sockops published the
    // original destination under the app socket's own tuple.
    // SAFETY: the value is copied out immediately.
    let orig = unsafe { ORIG_DST.get(&own.peer()) }.copied()?;
    let written = if level == SOL_IP {
        write_sockaddr_in(ctx, &orig)?
    } else {
        write_sockaddr_in6(ctx, &orig)?
    };
    succeed(ctx, written);
    count(Counter::OrigDstSockopt, 1);
    Some(())
}

/// [`SO_SPLICED`]: whether the caller's socket is in `SPLICED` (sockops inserted it into the
/// sockhash), so the proxy's records show the fast path as it is.
#[inline(always)]
fn answer_spliced(ctx: &SockoptContext) -> Option<()> {
    let (_, own) = own_key(ctx)?;
    let spliced = SPLICED.get_ptr(&own).is_some();
    let p = optval(ctx, U32_LEN)?;
    // SAFETY: 4 bytes checked by `optval`.
    unsafe { write_volatile(p.cast::<u32>(), u32::from(spliced)) };
    succeed(ctx, U32_LEN);
    Some(())
}

/// The socket's own key (local = source, remote = destination) in its network namespace,
/// as sockops keys it, and its family.
#[inline(always)]
fn own_key(ctx: &SockoptContext) -> Option<(u32, SockKey)> {
    let so = ctx.sockopt;
    // SAFETY: `sk` is a non-null PTR_TO_SOCKET in getsockopt programs; its fields are read
    // with the widths the verifier allows.
    let (family, src4, dst4, src6, dst6, src_port, dst_port) = unsafe {
        let sk = read_volatile(addr_of!((*so).__bindgen_anon_1.sk));
        (
            read_volatile(addr_of!((*sk).family)),
            read_volatile(addr_of!((*sk).src_ip4)),
            read_volatile(addr_of!((*sk).dst_ip4)),
            words(addr_of!((*sk).src_ip6)),
            words(addr_of!((*sk).dst_ip6)),
            read_volatile(addr_of!((*sk).src_port)),
            read_volatile(addr_of!((*sk).dst_port)),
        )
    };
    let (src, dst) = if family == AF_INET {
        (mapped_v4(src4), mapped_v4(dst4))
    } else if family == AF_INET6 {
        (src6, dst6)
    } else {
        return None;
    };
    let key = SockKey {
        // SAFETY: the helper takes the context pointer.
        netns: unsafe { bpf_get_netns_cookie(so as *mut c_void) },
        local_ip: src,
        remote_ip: dst,
        local_port: src_port as u16,
        remote_port: u16::from_be(dst_port),
        _pad: 0,
    };
    Some((family, key))
}

/// The call succeeds with `len` bytes of `optval`.
#[inline(always)]
fn succeed(ctx: &SockoptContext, len: usize) {
    let so = ctx.sockopt;
    // SAFETY: getsockopt programs may write optlen and retval.
    unsafe {
        write_volatile(addr_of_mut!((*so).optlen), len as i32);
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
}

/// `optval`, bounds-checked for `len` bytes against `optval_end` (the caller's buffer).
#[inline(always)]
fn optval(ctx: &SockoptContext, len: usize) -> Option<*mut u8> {
    let so = ctx.sockopt;
    // SAFETY: packet-pointer loads of the context.
    let (start, end) = unsafe {
        (
            read_volatile(addr_of!((*so).__bindgen_anon_2.optval)) as *mut u8,
            read_volatile(addr_of!((*so).__bindgen_anon_3.optval_end)) as *mut u8,
        )
    };
    // SAFETY: pointer arithmetic only; the comparison is the verifier's bounds check.
    if unsafe { start.add(len) } > end {
        return None;
    }
    Some(start)
}

/// `struct sockaddr_in` for an IPv4 original destination (v4-mapped in the map).
#[inline(always)]
fn write_sockaddr_in(ctx: &SockoptContext, orig: &OrigDst) -> Option<usize> {
    if orig.ip[0] != 0 || orig.ip[1] != 0 || orig.ip[2] != mapped_v4(0)[2] {
        return None;
    }
    let p = optval(ctx, SOCKADDR_IN_LEN)?;
    // SAFETY: 16 bytes checked above.
    unsafe {
        write_volatile(p.cast::<u16>(), AF_INET as u16);
        write_volatile(p.add(2).cast::<u16>(), orig.port.to_be());
        write_volatile(p.add(4).cast::<u32>(), orig.ip[3]);
        write_volatile(p.add(8).cast::<u32>(), 0);
        write_volatile(p.add(12).cast::<u32>(), 0);
    }
    Some(SOCKADDR_IN_LEN)
}

/// `struct sockaddr_in6` (a v4 destination of an IPv6 socket stays v4-mapped).
#[inline(always)]
fn write_sockaddr_in6(ctx: &SockoptContext, orig: &OrigDst) -> Option<usize> {
    let p = optval(ctx, SOCKADDR_IN6_LEN)?;
    // SAFETY: 28 bytes checked above.
    unsafe {
        write_volatile(p.cast::<u16>(), AF_INET6 as u16);
        write_volatile(p.add(2).cast::<u16>(), orig.port.to_be());
        write_volatile(p.add(4).cast::<u32>(), 0);
        write_volatile(p.add(8).cast::<u32>(), orig.ip[0]);
        write_volatile(p.add(12).cast::<u32>(), orig.ip[1]);
        write_volatile(p.add(16).cast::<u32>(), orig.ip[2]);
        write_volatile(p.add(20).cast::<u32>(), orig.ip[3]);
        write_volatile(p.add(24).cast::<u32>(), 0);
    }
    Some(SOCKADDR_IN6_LEN)
}
