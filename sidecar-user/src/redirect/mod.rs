//! How intercepted connections reach the proxy, and how the proxy learns where they were
//! going. The proxy only sees the [`Redirect`] trait, so other interception modes (iptables,
//! with `SO_ORIGINAL_DST`) plug into the same data path.

pub mod agent;
pub mod circuits;
pub mod ebpf;
pub mod iptables;
pub mod orig_dst;
pub mod passthrough;

use std::{net::SocketAddr, os::fd::BorrowedFd};

use thiserror::Error;

/// How a run steers connections to the proxy. It lives with the other labels (telemetry and
/// the admin server name it without importing this module); each mode's code is here.
pub use crate::telemetry::labels::Mode;

#[derive(Debug, Error)]
pub enum OrigDstError {
    #[error("no original destination recorded for {client} (not an intercepted connection?)")]
    Unknown { client: SocketAddr },
    #[error("reading the original destination of {client}: {reason}")]
    Lookup { client: SocketAddr, reason: String },
}

/// What the proxy needs from an interception mode.
pub trait Redirect: Send + Sync {
    /// The destination the app asked for. Given the accepted socket (iptables mode asks it
    /// with `SO_ORIGINAL_DST`) and its peer and local addresses (eBPF mode keys a map on them).
    fn original_destination(
        &self,
        socket: BorrowedFd<'_>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<SocketAddr, OrigDstError>;

    /// Whether `socket`, with this (local, peer) 4-tuple, is spliced by the kernel fast path
    /// (eBPF mode keys a map on the tuple; agent mode asks the socket).
    fn is_spliced(&self, socket: BorrowedFd<'_>, local: SocketAddr, peer: SocketAddr) -> bool;
}
