//! sockops: splice bookkeeping for our loopback connections.
//!
//! Ordering on loopback makes this simple: the connecting side reaches ESTABLISHED (when it
//! processes the SYN-ACK) before the accepting side does (when the final ACK arrives). So the
//! active side decides whether a connection is ours (its cookie was noted by a connect hook),
//! records its 4-tuple in `SPLICED`, and the passive side joins when it finds its peer there.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use sidecar_common::{Counter, SockKey, is_loopback, owner};

use crate::{
    ctx::sock_ops_key,
    maps::{
        COOKIE_ORIG_DST, ORIG_DST, PASSTHRU, PROXY_COOKIES, SOCKETS, SOCKMAP_ENABLED, SPLICED,
        count,
    },
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
        _ => Ok(()),
    }
}

fn on_active_established(ctx: &SockOpsContext) -> Result<(), i64> {
    let Some(key) = sock_ops_key(ctx.ops) else {
        return Ok(());
    };
    if !is_loopback(&key.remote_ip) {
        return Ok(());
    }
    // SAFETY: the helper takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
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
        // The proxy's own connection to a loopback upstream.
        let _ = PROXY_COOKIES.remove(&cookie);
        splice(ctx, &key, owner::PROXY);
    }
    Ok(())
}

fn on_passive_established(ctx: &SockOpsContext) -> Result<(), i64> {
    let Some(key) = sock_ops_key(ctx.ops) else {
        return Ok(());
    };
    if !is_loopback(&key.remote_ip) {
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
    let removed = ORIG_DST.remove(&key).is_ok() as u64
        + SPLICED.remove(&key).is_ok() as u64
        + PASSTHRU.remove(&key).is_ok() as u64;
    count(Counter::CloseCleanup, removed);
    Ok(())
}
