//! The mTLS tunnel between sidecars, in HBONE, the protocol of Istio's ambient mesh: one
//! TLS 1.3 connection (ALPN `h2`) per peer, HTTP/2 on it, and one `CONNECT` stream per
//! application connection.
//!
//! ```text
//!  app ──► our sidecar ═══ TLS 1.3 + HTTP/2, to the peer's :15008 ═══► peer sidecar ──► app
//!                        ║ stream 1: CONNECT 10.0.0.2:8080 → 200, bytes both ways, END_STREAM
//!                        ║ stream 3: CONNECT 10.0.0.2:9090 → 401 (denied)
//!                        ║ stream 5: …                                (PING keeps it alive)
//! ```
//!
//! * [`dial`]: TCP, TLS with our certificate, the peer's SPIFFE identity verified.
//! * [`pool`]: connections kept per (our identity, peer address); a stream rides an open one
//!   with room, and only when none has one is another dialled.
//! * [`client`]: one pooled connection: CONNECT, its answer, keepalive, idle close.
//! * [`server`]: the inbound side of a connection: HTTP/2 with bounds on what a peer may
//!   ask, each CONNECT checked ([`request`]) and handed to the proxy, GOAWAY on drain.
//! * [`stream`]: a stream as the copy reads and writes it, half-close as END_STREAM.

pub mod accept;
pub mod client;
pub mod dial;
pub mod http2;
pub mod pool;
pub mod request;
pub mod server;
pub mod stream;

pub use self::{
    accept::accept,
    http2::{CONNECTION_WINDOW, MAX_HEADER_LIST, STREAM_WINDOW, Settings, keepalive},
};

use std::{io, net::SocketAddr, time::Duration};

use thiserror::Error;

/// Why no connection to a peer could be had.
#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("connecting to the peer sidecar at {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("nothing answered at {addr} within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("mTLS handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: io::Error },
    #[error(
        "peer at {addr} accepted the connection but did not finish the mTLS and HTTP/2 handshakes within {timeout:?}"
    )]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
    #[error("peer at {addr} did not agree on the tunnel protocol (ALPN h2)")]
    Alpn { addr: SocketAddr },
    #[error("peer at {addr} presented no usable identity: {reason}")]
    Identity { addr: SocketAddr, reason: String },
    #[error("HTTP/2 handshake with {addr} failed: {reason}")]
    Http2 { addr: SocketAddr, reason: String },
}

impl TunnelError {
    /// Nothing listens on the tunnel port: the connect was refused or never answered. Only
    /// then may permissive mode fall back to plaintext. Anything later — a handshake that
    /// fails, an untrusted or wrong certificate, a missing ALPN — means something answered
    /// and could not prove itself, which an active attacker can always arrange: falling back
    /// then would let them downgrade any connection to plaintext.
    pub fn nothing_answered(&self) -> bool {
        match self {
            Self::ConnectTimeout { .. } => true,
            Self::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }

    /// The `reason` label of `sidecar_tunnel_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } | Self::ConnectTimeout { .. } if self.nothing_answered() => {
                "no_answer"
            }
            Self::Connect { .. } | Self::ConnectTimeout { .. } => "connect",
            Self::Handshake { .. } => "handshake",
            Self::HandshakeTimeout { .. } => "handshake_timeout",
            Self::Alpn { .. } => "alpn",
            Self::Identity { .. } => "identity",
            Self::Http2 { .. } => "http2",
        }
    }
}

/// Every value of [`TunnelError::reason`] and [`client::StreamError::reason`], plus the
/// policy's refusal of a verified server identity (counted by the proxy).
pub const FAILURE_REASONS: [&str; 14] = [
    "no_answer",
    "connect",
    "handshake",
    "handshake_timeout",
    "alpn",
    "identity",
    "http2",
    "stream_lost",
    "stream_timeout",
    "refused_bad_request",
    "refused_denied",
    "refused_unreachable",
    "refused_other",
    SERVER_IDENTITY_DENIED,
];

/// The failure reason when the outbound policy refuses the server's verified identity.
pub const SERVER_IDENTITY_DENIED: &str = "server_identity_denied";

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(kind: io::ErrorKind) -> TunnelError {
        TunnelError::Connect {
            addr: "10.0.0.1:15008".parse().unwrap(),
            source: io::Error::from(kind),
        }
    }

    #[test]
    fn only_silence_on_the_tunnel_port_allows_plaintext() {
        let addr: SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let timeout = Duration::from_secs(1);
        assert!(connect_error(io::ErrorKind::ConnectionRefused).nothing_answered());
        assert!(connect_error(io::ErrorKind::TimedOut).nothing_answered());
        assert!(TunnelError::ConnectTimeout { addr, timeout }.nothing_answered());
        let answered = [
            connect_error(io::ErrorKind::ConnectionReset),
            TunnelError::Handshake {
                addr,
                source: io::Error::new(io::ErrorKind::InvalidData, "untrusted"),
            },
            TunnelError::HandshakeTimeout { addr, timeout },
            TunnelError::Alpn { addr },
            TunnelError::Identity {
                addr,
                reason: "none".into(),
            },
            TunnelError::Http2 {
                addr,
                reason: "bad preface".into(),
            },
        ];
        for e in answered {
            assert!(!e.nothing_answered(), "{e}");
            assert!(FAILURE_REASONS.contains(&e.reason()), "{e}");
        }
    }

    /// Every stream failure is a label the metric knows from the start, and the peer's
    /// statuses mean what HBONE says.
    #[test]
    fn stream_failures_have_known_reasons() {
        use client::{PeerRefusal, StreamError};
        let addr: SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let refused = |status| StreamError::Refused { addr, status };
        let cases = [
            (refused(400), Some(PeerRefusal::BadRequest)),
            (refused(401), Some(PeerRefusal::Denied)),
            (refused(503), Some(PeerRefusal::Unreachable)),
            (refused(418), Some(PeerRefusal::Other)),
            (
                StreamError::Timeout {
                    addr,
                    timeout: Duration::from_secs(1),
                },
                None,
            ),
            (
                StreamError::Lost {
                    addr,
                    source: h2::Reason::REFUSED_STREAM.into(),
                },
                None,
            ),
            (
                StreamError::NotSent {
                    addr,
                    source: h2::Reason::REFUSED_STREAM.into(),
                },
                None,
            ),
        ];
        for (e, refusal) in cases {
            assert_eq!(e.refusal(), refusal, "{e}");
            assert!(FAILURE_REASONS.contains(&e.reason()), "{e}");
            let retryable = matches!(e, StreamError::Lost { .. } | StreamError::NotSent { .. });
            assert_eq!(e.retryable(), retryable, "{e}");
        }
    }
}
