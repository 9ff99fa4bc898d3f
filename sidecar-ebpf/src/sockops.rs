//! sockops: splice bookkeeping for our loopback connections, and the records of pass-through
//! connections (the connect hook let them go direct: their SYN moves them from
//! `DIRECT_PENDING` to `DIRECT_LIVE`, and their close becomes a `DIRECT_EVENTS` record with
//! the socket's own counters).
//!
//! Ordering on loopback makes this simple: the connecting side reaches ESTABLISHED (when it
//! processes the SYN-ACK) before the accepting side does (when the final ACK arrives). So the
//! active side decides whether a connection is ours (its cookie was noted by a connect hook),
//! records its 4-tuple in `SPLICED`, and the passive side joins when it finds its peer there.

use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use sidecar_common::{
    CircuitKey, Counter, DirectConn, DirectEvent, OrigDst, SockKey, is_loopback, limits, owner,
};

use crate::{
    ctx::sock_ops_key,
    direct_counts,
    maps::{
        COOKIE_ORIG_DST, DIRECT_EVENTS, DIRECT_LIVE, DIRECT_PENDING, ORIG_DST, PASSTHRU,
        PROXY_COOKIES, SOCKETS, SOCKMAP_ENABLED, SPLICED, count,
    },
    quota,
};

#[sock_ops]
pub fn sidecar_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    1
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        _ => Ok(()),
    }
}

/// The SYN of a connection: a pass-through one is tracked, and counted for its destination,
/// from now until it closes (its close is watched, so a refused connect is recorded too).
fn on_connect(ctx: &SockOpsContext) -> Result<(), i64> {
    // SAFETY: the helper takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(note) = (unsafe { DIRECT_PENDING.get(&cookie) }).copied() else {
        return Ok(());
    };
    let _ = DIRECT_PENDING.remove(&cookie);
    if DIRECT_LIVE.insert(&cookie, &note, BPF_ANY as u64).is_err() {
        // The table is full (impossible while every workload keeps to its quota): the
        // connection goes direct unrecorded, and says so.
        quota::release(note.scope);
        quota::record_dropped(note.scope);
        count(Counter::DirectRecordsDropped, 1);
        return Ok(());
    }
    if let Some(key) = sock_ops_key(ctx.ops) {
        direct_counts::add(&destination(&key, note.scope));
    }
    watch_close(ctx);
    Ok(())
}

/// The destination of a workload's socket, as its connect hook saw it.
#[inline(always)]
fn destination(key: &SockKey, scope: u32) -> CircuitKey {
    CircuitKey {
        dst: OrigDst {
            ip: key.remote_ip,
            port: key.remote_port,
            _pad: 0,
        },
        scope,
    }
}

fn on_active_established(ctx: &SockOpsContext) -> Result<(), i64> {
    let Some(key) = sock_ops_key(ctx.ops) else {
        return Ok(());
    };
    // SAFETY: the helper takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    if let Some(live) = DIRECT_LIVE.get_ptr_mut(&cookie) {
        // SAFETY: the pointer is the map value, valid for the program's run.
        unsafe { (*live).established_ns = bpf_ktime_get_ns() };
        return Ok(());
    }
    if !is_local(&key) {
        // The connect hook notes every proxy connect (it cannot tell a local address from a
        // remote one); a connection that left the host is never spliced: forget it.
        let _ = PROXY_COOKIES.remove(&cookie);
        return Ok(());
    }
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(dst) = unsafe { COOKIE_ORIG_DST.get(&cookie) }.copied() {
        // An app socket the connect hook redirected: publish its original destination under
        // the 4-tuple the proxy will see on accept.
        let _ = COOKIE_ORIG_DST.remove(&cookie);
        ORIG_DST.insert(&key, &dst, BPF_ANY as u64)?;
        count(Counter::OrigDstPublished, 1);
        watch_close(ctx);
        splice(ctx, &key, owner::FOREIGN);
    } else if PROXY_COOKIES.get_ptr(&cookie).is_some() {
        // The proxy's own connection to a local upstream.
        let _ = PROXY_COOKIES.remove(&cookie);
        splice(ctx, &key, owner::PROXY);
    }
    Ok(())
}

fn on_passive_established(ctx: &SockOpsContext) -> Result<(), i64> {
    let Some(key) = sock_ops_key(ctx.ops) else {
        return Ok(());
    };
    if !is_local(&key) {
        return Ok(());
    }
    // The accepting end of a connection whose connecting end we spliced: the proxy accepted
    // from the app, or a local server accepted from the proxy. It is the other owner.
    // SAFETY: the value is copied out immediately.
    if let Some(peer_owner) = unsafe { SPLICED.get(&key.peer()) }.copied() {
        let ours = if peer_owner == owner::FOREIGN {
            owner::PROXY
        } else {
            owner::FOREIGN
        };
        splice(ctx, &key, ours);
    }
    Ok(())
}

/// A connection that stays inside this network namespace: to loopback, or to one of its own
/// addresses (the kernel routes those over `lo` and picks that same address as the source).
/// The inbound proxy's hop to the workload's own address is the second kind.
#[inline(always)]
fn is_local(key: &SockKey) -> bool {
    is_loopback(&key.remote_ip) || key.remote_ip == key.local_ip
}

/// Inserts the socket into the sockhash so `sk_msg` can reach it, and records it in `SPLICED`.
#[inline(always)]
fn splice(ctx: &SockOpsContext, key: &SockKey, owner: u32) {
    if SOCKMAP_ENABLED.load() == 0 {
        return;
    }
    let mut key = *key;
    // SAFETY: `ctx.ops` is the live context; the helper only reads through it.
    let ops = unsafe { &mut *ctx.ops };
    if SOCKETS.update(&mut key, ops, BPF_NOEXIST as u64).is_err() {
        count(Counter::SockhashInsertFailed, 1);
        return;
    }
    count(Counter::SockhashInsert, 1);
    let _ = SPLICED.insert(&key, &owner, BPF_ANY as u64);
    watch_close(ctx);
}

/// Asks for state-change callbacks on this socket so its entries are removed when it closes.
#[inline(always)]
fn watch_close(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

fn on_state_change(ctx: &SockOpsContext) -> Result<(), i64> {
    // args[1] is the new state. The sockhash entry itself is dropped by the kernel on close.
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return Ok(());
    }
    let Some(key) = sock_ops_key(ctx.ops) else {
        return Ok(());
    };
    // SAFETY: the helper takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(conn) = (unsafe { DIRECT_LIVE.get(&cookie) }).copied() {
        // A pass-through connection is in none of the proxy's maps below (its connect was not
        // redirected and it is never spliced): skipping their removes is a third of what
        // each pass-through close cost here.
        record_direct_close(ctx, key, cookie, conn);
        return Ok(());
    }
    let removed = ORIG_DST.remove(&key).is_ok() as u64
        + SPLICED.remove(&key).is_ok() as u64
        + PASSTHRU.remove(&key).is_ok() as u64;
    count(Counter::CloseCleanup, removed);
    Ok(())
}

/// A pass-through connection closed: its record, from the socket's own counters.
#[inline(always)]
fn record_direct_close(ctx: &SockOpsContext, key: SockKey, cookie: u64, conn: DirectConn) {
    if DIRECT_LIVE.remove(&cookie).is_ok() {
        quota::release(conn.scope);
    }
    direct_counts::remove(&destination(&key, conn.scope));
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is the context pointer; each field is read with one load of its size.
    let event = unsafe {
        DirectEvent {
            key,
            cookie,
            conn,
            closed_ns: bpf_ktime_get_ns(),
            bytes_acked: read_volatile(addr_of!((*ops).bytes_acked)),
            bytes_received: read_volatile(addr_of!((*ops).bytes_received)),
            segs_in: read_volatile(addr_of!((*ops).segs_in)),
            segs_out: read_volatile(addr_of!((*ops).segs_out)),
            total_retrans: read_volatile(addr_of!((*ops).total_retrans)),
            // The kernel keeps srtt scaled by 8.
            srtt_us: read_volatile(addr_of!((*ops).srtt_us)) >> 3,
            rtt_min_us: read_volatile(addr_of!((*ops).rtt_min)),
            last_state: ctx.arg(0),
        }
    };
    if DIRECT_EVENTS
        .output::<DirectEvent>(&event, wakeup_flag())
        .is_err()
    {
        quota::record_dropped(conn.scope);
        count(Counter::DirectRecordsDropped, 1);
    }
}

/// Whether writing a close record wakes the reader: only once a backlog has built up. A
/// wakeup per record (the ring's default whenever the reader has caught up) made every
/// pass-through close raise an interrupt and wake user space; the reader polls the ring on a
/// timer instead, and wakeups past `DIRECT_EVENTS_WAKE_BYTES` keep a burst from filling it.
#[inline(always)]
fn wakeup_flag() -> u64 {
    if DIRECT_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= u64::from(limits::DIRECT_EVENTS_WAKE_BYTES)
    {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
