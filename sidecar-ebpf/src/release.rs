//! cgroup/sock_release, where the connect hooks run: a socket closed while its pass-through
//! note is still pending — its connect failed before any SYN went out (no route, no free
//! local port), or it never sent one — gives its workload's place in the tracking quota back
//! (see `quota`). Without this the place would stay taken until the pod is gone, and an app
//! retrying an unroutable address would push its own pod onto the proxy.
//!
//! Only a pending note is touched: once a SYN went out, sockops moved the note to
//! `DIRECT_LIVE` and gives the place back at the close it watches. A socket is released once
//! its last descriptor is closed, so no connect of it can be running then, and the removal
//! decides which of the two gives the place back.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};

use crate::{maps::DIRECT_PENDING, quota};

/// Lets every release proceed (a release hook cannot refuse one anyway).
const PROCEED: i32 = 1;

#[cgroup_sock(sock_release)]
pub fn sidecar_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the helper takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock as *mut c_void) };
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(note) = unsafe { DIRECT_PENDING.get(&cookie) }.copied()
        && DIRECT_PENDING.remove(&cookie).is_ok()
    {
        quota::release(note.scope);
    }
    PROCEED
}
