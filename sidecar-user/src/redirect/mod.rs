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

/// How a run steers connections to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// cgroup connect hooks rewrite the destination; sockmap splices local legs.
    #[default]
    Ebpf,
    /// nat `REDIRECT` in a chain of our own; `SO_ORIGINAL_DST` (the classic baseline).
    Iptables,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }
}

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
