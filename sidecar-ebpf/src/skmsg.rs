//! sk_msg on `SOCKETS`: deliver each message the proxy sends straight into the peer socket's
//! receive queue. Messages sent by an application's socket pass to the TCP stack unchanged
//! (see `sidecar_common::owner` for why).
//!
//! A message that finds no peer goes through the TCP stack, and its sender is put in
//! `PASSTHRU` for the rest of its life: once any bytes took the slow path, later bytes must
//! not overtake them through the fast one (the receiver reads redirected data first).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use sidecar_common::{Counter, owner};

use crate::{
    ctx::sk_msg_key,
    maps::{PASSTHRU, SOCKETS, SPLICED, count},
};

#[sk_msg]
pub fn sidecar_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) {
    let Some(key) = sk_msg_key(ctx.msg) else {
        return;
    };
    // SAFETY: the value is copied out immediately.
    if unsafe { SPLICED.get(&key) }.copied() != Some(owner::PROXY) {
        count(Counter::SkMsgForeignSender, 1);
        return;
    }
    if PASSTHRU.get_ptr(&key).is_some() {
        count(Counter::SkMsgPassthru, 1);
        return;
    }
    let size = u64::from(ctx.size());
    if SOCKETS.redirect_msg(ctx, key.peer(), BPF_F_INGRESS as u64) == i64::from(SK_PASS) {
        count(Counter::SkMsgRedirected, 1);
        count(Counter::SkMsgRedirectedBytes, size);
    } else {
        count(Counter::SkMsgMiss, 1);
        let _ = PASSTHRU.insert(&key, &1, BPF_ANY as u64);
    }
}
