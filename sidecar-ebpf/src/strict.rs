//! cgroup_skb/ingress on the **app** cgroup: strict inbound mode.
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
//! Replies to the workload's own outbound connections (SYN+ACK, then ACKs) pass, so
//! destinations excluded from interception keep working. A dropped SYN is retransmitted by
//! the client until its connect times out: the port looks filtered, not closed.
use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use sidecar_common::Counter;

use crate::maps::count;

const PASS: i32 = 1;
const DROP: i32 = 0;
/// `LOOPBACK_IFINDEX`: `lo` has index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[cgroup_skb(ingress)]
pub fn sidecar_strict_in(ctx: SkBuffContext) -> i32 {
    if is_outside_syn(&ctx) {
        count(Counter::StrictInboundDropped, 1);
        DROP
    } else {
        PASS
    }
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
