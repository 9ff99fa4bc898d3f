//! cgroup_skb/ingress: strict inbound mode, for the workloads whose `WORKLOADS` entry has
//! `flags::STRICT_INBOUND`. `sidecar run` attaches it to its app cgroup; the agent to the
//! pods' cgroup root, where it runs for every pod's sockets and drops only for the pods that
//! asked (`sidecar proxy --inbound-mode strict`).
//!
//! Goal: a plaintext connection from another host to one of the workload's listening ports
//! is refused, while peers still reach the workload through the sidecar's mTLS tunnel, which
//! the inbound proxy delivers over `lo` (to the workload's own address). No iptables.
//!
//! Why this hook, and not the alternatives:
//! * `sk_lookup` is per network namespace: in standalone `sidecar run` the workload shares
//!   its namespace with other processes, which would be steered too.
//! * sockops cannot refuse a connection (no verdict on `PASSIVE_ESTABLISHED`).
//! * cgroup_skb ingress runs in `sk_filter` for packets delivered to sockets **owned by this
//!   cgroup** — including the SYN that reaches a listener the app opened — so it can only
//!   ever affect the run's own processes (sockets carry the cgroup of their creator; accepted
//!   sockets inherit the listener's).
//!
//! The check: a TCP segment with SYN set and ACK clear (a new connection attempt) that did
//! not arrive on the loopback device is dropped. Local traffic — the inbound proxy's
//! connects to the workload's address, and any local process, whatever address it dials —
//! arrives on `lo`.
//! Whose socket it is: at cgroup ingress the kernel runs the programs of the receiving
//! socket's cgroup with that socket as the packet's, so `bpf_skb_cgroup_id` and its ancestors
//! name the listener's cgroup. The deepest one in `WORKLOADS` decides, as in the connect hooks:
//! a pod's sidecar container (role `PROXY`) inside a strict pod still takes tunnels from
//! outside. The header checks come first, so packets that are not an outside SYN cost no map
//! lookup.
//! Replies to the workload's own outbound connections (SYN+ACK, then ACKs) pass, so
//! destinations excluded from interception keep working. A dropped SYN is retransmitted by
//! the client until its connect times out: the port looks filtered, not closed.
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use sidecar_common::{Counter, WorkloadConfig, flags, limits, role};

use crate::maps::{Counts, WORKLOADS};

const PASS: i32 = 1;
const DROP: i32 = 0;
/// `LOOPBACK_IFINDEX`: `lo` has index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[cgroup_skb(ingress)]
pub fn sidecar_strict_in(ctx: SkBuffContext) -> i32 {
    if !is_outside_syn(&ctx) {
        return PASS;
    }
    match strict_owner(ctx.skb.skb) {
        Some(scope) => {
            Counts::of(scope).count(Counter::StrictInboundDropped, 1);
            DROP
        }
        None => PASS,
    }
}

/// The scope of the workload in strict inbound mode the socket receiving the packet belongs
/// to, if it does: the deepest cgroup, from the socket's own up to the root, with an entry in
/// `WORKLOADS` decides.
#[inline(always)]
fn strict_owner(skb: *mut __sk_buff) -> Option<u32> {
    // Plain scalars, every one initialized, rather than an `Option` of the entry: the
    // compiler may read a field of an `Option` that is `None`, and kernels before 5.15 refuse
    // a read of stack they have not seen written.
    let (mut strict, mut scope) = (false, 0u32);
    // SAFETY: helper calls on the context pointer the kernel handed us.
    let own = unsafe { bpf_skb_cgroup_id(skb) };
    // SAFETY: the map value is read at once.
    if let Some(cfg) = unsafe { WORKLOADS.get(&own) } {
        (strict, scope) = (is_strict(cfg), cfg.scope);
    } else {
        let mut level = 0;
        while level < limits::CGROUP_DEPTH {
            // SAFETY: as above.
            let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, level) };
            if id == 0 {
                break;
            }
            // SAFETY: as above. Deeper levels come later and win.
            if let Some(cfg) = unsafe { WORKLOADS.get(&id) } {
                (strict, scope) = (is_strict(cfg), cfg.scope);
            }
            level += 1;
        }
    }
    strict.then_some(scope)
}

#[inline(always)]
fn is_strict(cfg: &WorkloadConfig) -> bool {
    cfg.role == role::WORKLOAD && cfg.flags & flags::STRICT_INBOUND != 0
}

/// At cgroup ingress the packet starts at the network header.
#[inline(always)]
fn is_outside_syn(ctx: &SkBuffContext) -> bool {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == LOOPBACK_IFINDEX {
        return false;
    }
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let tcp_offset = match first >> 4 {
        4 => {
            let Ok(proto) = ctx.load::<u8>(9) else {
                return false;
            };
            if proto != IPPROTO_TCP {
                return false;
            }
            usize::from(first & 0x0f) * 4
        }
        // Extension headers before TCP are not followed: such packets pass.
        6 => {
            let Ok(next) = ctx.load::<u8>(6) else {
                return false;
            };
            if next != IPPROTO_TCP {
                return false;
            }
            40
        }
        _ => return false,
    };
    let Ok(flags) = ctx.load::<u8>(tcp_offset + 13) else {
        return false;
    };
    flags & TCP_SYN != 0 && flags & TCP_ACK == 0
}
