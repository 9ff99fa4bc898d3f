//! How intercepted connections reach the proxy, and how the proxy learns where they were
//! going. The proxy only sees the [`Redirect`] trait, so other interception modes (iptables,
//! with `SO_ORIGINAL_DST`) plug into the same data path.

pub mod ebpf;

use std::net::SocketAddr;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum OrigDstError {
    #[error("no original destination recorded for {client} (not an intercepted connection?)")]
    Unknown { client: SocketAddr },
    #[error("reading the original destination of {client}: {reason}")]
    Lookup { client: SocketAddr, reason: String },
}

/// What the proxy needs from an interception mode.
pub trait Redirect: Send + Sync {
    /// The destination the app asked for, given the accepted socket's peer and local address.
    fn original_destination(
        &self,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<SocketAddr, OrigDstError>;

    /// Whether the socket with this (local, peer) 4-tuple is spliced by the kernel fast path.
    fn is_spliced(&self, local: SocketAddr, peer: SocketAddr) -> bool;
}
