//! Kernel half of the sidecar.
//!
//! * `connect4`/`connect6` (cgroup/connect*): rewrite a meshed workload's outbound TCP connect
//!   to the proxy's listener, remembering the original destination by socket cookie.
//! * `sockops` (attached at the cgroup v2 root, so it sees every local socket): when one of our
//!   loopback connections is established, publish the original destination under the app
//!   socket's 4-tuple and insert both ends into the `SOCKETS` sockhash.
//! * `sk_msg` (attached to `SOCKETS`): hand each message straight to the peer socket's receive
//!   queue, skipping the TCP/IP stack on that hop.
//! * `getsockopt` (cgroup/getsockopt, at the pods' cgroup root, agent mode): answer the proxy's
//!   `SO_ORIGINAL_DST` from `ORIG_DST`, so an unprivileged proxy needs no map access.
//! * `strict_in` (cgroup_skb/ingress on the app cgroup, strict inbound mode only): drop
//!   connection attempts to the workload that do not come from loopback.
//! * `sock_release` (cgroup/sock_release, where the connect hooks are): a socket closed before
//!   its pass-through connection sent a SYN gives its workload's quota place back.
//!
//! Each entry point is a thin wrapper that calls a `try_*` function and maps its result to
//! the verdict in one place. Where an error could let a connection bypass the proxy (the
//! connect hooks), the verdict refuses it and counts why (fail closed); the others (sockops,
//! sk_msg, getsockopt) only add a splice, a record or an answer, and on error leave the
//! socket to plain TCP, which bypasses nothing.
#![no_std]
#![no_main]
// `direct_counts` and `quota` need an atomic add, which core's atomics lack on the BPF target.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod ctx;
mod direct_counts;
mod maps;
mod quota;
mod release;
mod skmsg;
mod sockops;
mod sockopt;
mod strict;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
