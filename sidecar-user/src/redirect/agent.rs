//! The pod sidecar's view of the agent's interception: it holds no map and no capability, so
//! it asks its sockets. The original destination comes from `SO_ORIGINAL_DST`, exactly as in
//! iptables mode ([`OriginalDst`], `orig_dst.rs`); whether a socket is in the sockmap fast path from the
//! private `SO_SPLICED` option. The agent's `cgroup/getsockopt` program answers both.

use std::{net::SocketAddr, os::fd::BorrowedFd};

use sidecar_common::sockopt::{SO_SPLICED, SOL_IP};

use super::{
    OrigDstError, Redirect,
    orig_dst::{OriginalDst, getsockopt},
};

/// [`Redirect`] for `sidecar proxy` under `sidecar agent`.
pub struct AgentSockopts;

impl Redirect for AgentSockopts {
    fn original_destination(
        &self,
        socket: BorrowedFd<'_>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<SocketAddr, OrigDstError> {
        OriginalDst.original_destination(socket, client, local)
    }

    /// Without the agent's program (or on a socket it knows nothing about) the call fails
    /// with `ENOPROTOOPT` or answers 0: not spliced.
    fn is_spliced(&self, socket: BorrowedFd<'_>, _local: SocketAddr, _peer: SocketAddr) -> bool {
        matches!(getsockopt::<u32>(socket, SOL_IP, SO_SPLICED), Ok(1))
    }
}
