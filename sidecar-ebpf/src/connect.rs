//! cgroup/connect4 and cgroup/connect6: steer a workload's outbound TCP connects to the proxy.
//!
//! Which sockets are the proxy's own? The proxy runs in a cgroup whose [`WorkloadConfig`] has
//! the `PROXY` role, so its connects are never rewritten (no loop); they are only noted by
//! cookie, so `sockops` can splice the proxy → local upstream leg (to loopback, or to the
//! workload's own address for inbound tunnels).

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

#[cfg(feature = "broken-for-tests")]
use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use sidecar_common::{
    CircuitKey, Counter, DirectConn, OrigDst, PROXY_IPV4, PROXY_IPV6, PROXY_LISTENER_MARK,
    PolicyDenyEvent, ScopedAddr, WorkloadConfig, connect_verdict, flags, is_cloud_metadata,
    is_loopback, is_v4_mapped, limits, lpm_prefix_len, mapped_v4, policy_flags, policy_scope, role,
};

use crate::{
    ctx::user_ip6,
    direct_counts,
    maps::Counts,
    maps::{
        COOKIE_ORIG_DST, DIRECT_CAPS, DIRECT_PENDING, EXCLUDED_CIDRS, MESH_CIDRS, OPEN_CIRCUITS,
        POLICY_EVENTS, POLICY_OUT, POLICY_PROXIED, POLICY_STATE, PROXY_COOKIES, SOCKMAP_ENABLED,
        WORKLOADS, count,
    },
    quota::{self, Admit},
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn sidecar_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect::<false>(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn sidecar_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_connect::<true>(&ctx))
}

/// A workload's connect that hit a map error is refused and counted (the workload's own
/// count too): letting it through unredirected would bypass mTLS and policy (fail closed,
/// see [`connect_verdict`]).
#[inline(always)]
fn verdict(result: Result<bool, i64>) -> i32 {
    if result.is_err() {
        match find_workload() {
            Some(cfg) => Counts::of(cfg.scope).count(Counter::ConnectRedirectFailed, 1),
            None => count(Counter::ConnectRedirectFailed, 1),
        }
    }
    connect_verdict(result)
}

/// What the workload's compiled outbound policy says about `addr` (16 bytes, v4-mapped for
/// IPv4) on `port`. The live slot is read once, so a reload (fill the other slot, flip
/// `POLICY_STATE`) is seen whole or not at all; a slot caught half filled or half emptied
/// answers either the right entry or none, and none goes to the proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PolicyVerdict {
    /// Allowed, or no policy: the connection may go direct.
    Allow,
    /// Allowed here, but the proxy must see it (dry run, audit rules, or a `[[destination]]`
    /// table asking for retries or a connection cap).
    ToProxy,
    Deny,
}

#[inline(always)]
fn policy_verdict(scope: u32, addr: [u8; 16], port: u16) -> PolicyVerdict {
    // SAFETY: the map value is copied out immediately.
    let Some(state) = (unsafe { POLICY_STATE.get(&scope) }).copied() else {
        return PolicyVerdict::Allow;
    };
    let allowed = if state.flags & policy_flags::PROXY_SEES_ALL != 0 {
        PolicyVerdict::ToProxy
    } else {
        PolicyVerdict::Allow
    };
    if state.flags & policy_flags::ENFORCE == 0 {
        return allowed;
    }
    let key = Key::new(
        lpm_prefix_len(false, 128),
        ScopedAddr::new(policy_scope(scope, state.slot), addr),
    );
    // Every enforced policy has an entry for the whole address space, so a miss means the
    // slot is being filled or emptied under us (a hook that read `POLICY_STATE` just before a
    // reload flipped it): the proxy, which holds the policy in force, decides.
    match POLICY_OUT.get(&key) {
        None => return PolicyVerdict::ToProxy,
        Some(denied) if denied.contains(port) => return PolicyVerdict::Deny,
        Some(_) => {}
    }
    if state.flags & policy_flags::PROXIED_PORTS != 0
        && POLICY_PROXIED
            .get(&key)
            .is_some_and(|proxied| proxied.contains(port))
    {
        return PolicyVerdict::ToProxy;
    }
    allowed
}

/// The configuration of the deepest cgroup, from the caller's own up to the root, that has an
/// entry in `WORKLOADS`; deepest wins so a proxy container inside a meshed pod stays exempt.
#[inline(always)]
fn find_workload() -> Option<WorkloadConfig> {
    // SAFETY: helper calls without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the map value is copied out immediately.
    if let Some(cfg) = unsafe { WORKLOADS.get(&own) } {
        return Some(*cfg);
    }
    let mut found = None;
    let mut level = 0;
    while level < limits::CGROUP_DEPTH {
        // SAFETY: as above.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: as above.
        if let Some(cfg) = unsafe { WORKLOADS.get(&id) } {
            found = Some(*cfg);
        }
        level += 1;
    }
    found
}

/// Inlined per hook with `V6` fixed: `user_ip6` may only be touched by the IPv6 hooks, so the
/// IPv4 program must not even contain that access.
#[inline(always)]
/// `Ok(false)` refuses the connect; `Ok(true)` lets it proceed (rewritten or not); an error
/// (a map update failed) refuses it too, see [`verdict`].
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<bool, i64> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer; every field is read with a 4-byte load.
    let (sock_type, protocol, ip, port) = unsafe {
        let ip = if V6 {
            user_ip6(addr_of!((*sa).user_ip6))
        } else {
            mapped_v4(read_volatile(addr_of!((*sa).user_ip4)))
        };
        (
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).protocol)),
            ip,
            u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16),
        )
    };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Ok(true);
    }
    let Some(cfg) = find_workload() else {
        // Under the agent's pods root: a pod whose sidecar has not registered passes through.
        count(Counter::ConnectNotMeshed, 1);
        return Ok(true);
    };
    // SAFETY: the helper takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    let counts = Counts::of(cfg.scope);

    if cfg.role == role::PROXY {
        counts.count(Counter::ConnectFromProxy, 1);
        // Noted whatever the address: a local one may be loopback or the host's (the pod's)
        // own, which only sockops can tell apart (it forgets the rest at once). Only the
        // splice of this leg depends on the note: without it the proxy's own connect still
        // goes where it asked, over TCP, so a failure is not fatal.
        if SOCKMAP_ENABLED.load() != 0 {
            let _ = PROXY_COOKIES.insert(&cookie, &1, 0);
        }
        return Ok(true);
    }
    if cfg.role != role::WORKLOAD {
        return Ok(true);
    }
    counts.count(Counter::ConnectSeen, 1);
    if port == cfg.proxy_port && is_loopback(&ip) {
        // Already aimed at the proxy: nothing to rewrite.
        return Ok(true);
    }
    let addr = bytes_of(&ip);
    // Policy before exclusions: a denied destination stays denied even if it bypasses the
    // proxy.
    let verdict = policy_verdict(cfg.scope, addr, port);
    if verdict == PolicyVerdict::Deny {
        counts.count(Counter::ConnectPolicyDenied, 1);
        // SAFETY: helper call without pointer arguments.
        let pid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
        let event = PolicyDenyEvent {
            ip,
            port,
            _pad: 0,
            pid,
            scope: cfg.scope,
        };
        // A full ring drops the event; the counter above still has it.
        let _ = POLICY_EVENTS.output::<PolicyDenyEvent>(&event, 0);
        debug!(ctx, "connect to port {} refused by policy", port);
        return Ok(false);
    }
    // The metadata address hands out the node's credentials: refused unless the loader was
    // told `--allow-metadata`, before the exclusions so excluding it does not bypass this.
    if cfg.flags & flags::DENY_METADATA != 0 && is_cloud_metadata(&ip) {
        counts.count(Counter::ConnectMetadataDenied, 1);
        debug!(ctx, "connect to the cloud metadata address refused");
        return Ok(false);
    }
    if cfg.excludes_port(port) {
        counts.count(Counter::ConnectExcludedPort, 1);
        return Ok(true);
    }
    let key = Key::new(lpm_prefix_len(false, 128), ScopedAddr::new(cfg.scope, addr));
    if EXCLUDED_CIDRS.get(&key).is_some() {
        counts.count(Counter::ConnectExcludedCidr, 1);
        return Ok(true);
    }
    // A destination that keeps failing: refused here, at once, instead of a connect that
    // would fail anyway (through the proxy, or straight to it).
    let circuit = CircuitKey {
        dst: OrigDst { ip, port, _pad: 0 },
        scope: cfg.scope,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { OPEN_CIRCUITS.get(&circuit) }.is_some() {
        counts.count(Counter::ConnectCircuitOpen, 1);
        debug!(ctx, "connect to port {} refused: its circuit is open", port);
        return Ok(false);
    }
    if cfg.flags & flags::PASSTHROUGH != 0
        && verdict == PolicyVerdict::Allow
        && MESH_CIDRS.get(&key).is_none()
    {
        // The proxy's per-destination cap cannot see these connections: the kernel counts
        // them (sockops, from SYN to close) and holds the workload's own cap here.
        // SAFETY: the value is copied out immediately.
        let cap = unsafe { DIRECT_CAPS.get(&cfg.scope) }.copied();
        let open = direct_counts::open(&circuit);
        if cap.is_some_and(|cap| open.unwrap_or(0) >= cap) {
            counts.count(Counter::ConnectOverloaded, 1);
            debug!(ctx, "connect to port {} refused: its cap is reached", port);
            return Ok(false);
        }
        // The workload's share of the node's tracking tables: past it, the proxy (which
        // records the connection and holds the cap) instead of a direct one untracked.
        match quota::admit(cfg.scope, open.is_none()) {
            Admit::Yes if go_direct(cookie, cfg.scope) => {
                counts.count(Counter::ConnectPassthrough, 1);
                return Ok(true);
            }
            Admit::Yes => quota::release(cfg.scope),
            Admit::OverTracked => counts.count(Counter::PassthroughOverQuota, 1),
            Admit::OverDestinations => counts.count(Counter::PassthroughOverDestinations, 1),
        }
    }

    // The proxy must see this connection. IPv4 through an IPv6 socket (`::ffff:a.b.c.d`) goes
    // to the IPv4 listener, which always exists; native IPv6 needs `[::1]`, and without it the
    // connection is refused: letting it go direct would skip the mesh, the policy's audit and
    // dry run, and `--proxy-all`.
    let mapped = V6 && is_v4_mapped(&ip);
    if V6 && !mapped && cfg.flags & flags::IPV6_LISTENER == 0 {
        counts.count(Counter::ConnectNoV6Listener, 1);
        debug!(ctx, "connect to port {} refused: no [::1] listener", port);
        return Ok(false);
    }

    // Only to the proxy itself: a killed proxy's port may have been bound by anyone.
    if cfg.flags & flags::CHECK_LISTENER != 0
        && !proxy_listening(ctx, V6 && !mapped, cfg.proxy_port)
    {
        counts.count(Counter::ConnectProxyNotListening, 1);
        debug!(
            ctx,
            "connect to port {} refused: the proxy does not listen", port
        );
        return Ok(false);
    }

    // No rewrite without the note: the proxy could not tell where the connection was going.
    COOKIE_ORIG_DST.insert(&cookie, &OrigDst { ip, port, _pad: 0 }, 0)?;
    // SAFETY: writes of 4-byte context fields the connect hooks may rewrite.
    unsafe {
        if V6 {
            let lo = if mapped {
                mapped_v4(u32::from_ne_bytes(PROXY_IPV4.octets()))
            } else {
                proxy_ipv6_words()
            };
            let p = addr_of_mut!((*sa).user_ip6).cast::<u32>();
            write_volatile(p, lo[0]);
            write_volatile(p.add(1), lo[1]);
            write_volatile(p.add(2), lo[2]);
            write_volatile(p.add(3), lo[3]);
        } else {
            write_volatile(
                addr_of_mut!((*sa).user_ip4),
                u32::from_ne_bytes(PROXY_IPV4.octets()),
            );
        }
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(cfg.proxy_port.to_be()),
        );
    }
    counts.count(Counter::ConnectRedirected, 1);
    debug!(
        ctx,
        "redirected connect to port {} via proxy port {}", port, cfg.proxy_port
    );
    broken_for_tests(sa);
    Ok(true)
}

/// Whether the socket listening on the proxy's loopback address (`[::1]` for native IPv6,
/// else 127.0.0.1) and `port`, in the caller's network namespace, is the proxy's: it carries
/// [`PROXY_LISTENER_MARK`], which only a process with CAP_NET_ADMIN can set.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, v6: bool, port: u16) -> bool {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v6 {
        let lo = proxy_ipv6_words();
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: [0; 4],
            daddr: lo,
            sport: 0,
            dport: port.to_be(),
        };
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } else {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: 0,
            daddr: u32::from_ne_bytes(PROXY_IPV4.octets()),
            sport: 0,
            dport: port.to_be(),
        };
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    };
    // SAFETY: the helper takes the context pointer and a tuple of `size` bytes on our stack;
    // a socket it returns is released below on every path.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.sock_addr as *mut c_void,
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a referenced socket the verifier lets us read.
    let mark = unsafe { (*sk).mark };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    mark == PROXY_LISTENER_MARK
}

/// Notes a pass-through connect so sockops records it; `false` (the note could not be made)
/// sends the connection through the proxy instead, which records it itself.
#[inline(always)]
fn go_direct(cookie: u64, scope: u32) -> bool {
    // SAFETY: helper calls without pointer arguments.
    let (now, pid) = unsafe {
        (
            bpf_ktime_get_ns(),
            (bpf_get_current_pid_tgid() >> 32) as u32,
        )
    };
    let note = DirectConn {
        connect_ns: now,
        established_ns: 0,
        scope,
        pid,
    };
    DIRECT_PENDING.insert(&cookie, &note, 0).is_ok()
}

/// The address words as bytes (network order), for LPM keys.
#[inline(always)]
fn bytes_of(ip: &[u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = ip[i].to_ne_bytes();
        addr[4 * i] = b[0];
        addr[4 * i + 1] = b[1];
        addr[4 * i + 2] = b[2];
        addr[4 * i + 3] = b[3];
        i += 1;
    }
    addr
}

/// `PROXY_IPV6` as four network-order words.
#[inline(always)]
fn proxy_ipv6_words() -> [u32; 4] {
    let o = PROXY_IPV6.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// With the `broken-for-tests` feature, writes a context field connect hooks may not write,
/// so the verifier rejects the program and the test harnesses must report a failure.
#[inline(always)]
fn broken_for_tests(_sa: *mut aya_ebpf::bindings::bpf_sock_addr) {
    #[cfg(feature = "broken-for-tests")]
    // SAFETY: deliberately invalid; never loads.
    unsafe {
        write_volatile(addr_of_mut!((*(_sa as *mut bpf_sock_addr)).family), 0);
    }
}
