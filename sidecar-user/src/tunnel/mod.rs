//! The mTLS tunnel between sidecars: the client side dials the peer sidecar's inbound port,
//! completes a TLS 1.3 handshake with our ALPN ([`connect`]), and, once the caller has checked
//! who answered, sends the [`preamble`] ([`Tunnel::start`]); the server side completes the
//! same handshake and verifies the peer ([`accept()`]), and `proxy::inbound` reads the
//! preamble and applies the policy before any byte reaches its app.

pub mod accept;
pub mod preamble;

pub use self::accept::accept;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::{ServerName, UnixTime};
use thiserror::Error;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::tls::{ALPN, TlsState, identity::SpiffeId, verify};

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("connecting to the peer sidecar at {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("nothing answered at {addr} within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("mTLS handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: io::Error },
    #[error(
        "peer at {addr} accepted the connection but did not finish the mTLS handshake within {timeout:?}"
    )]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
    #[error("peer sidecar at {addr} did not agree on the tunnel protocol (ALPN)")]
    Alpn { addr: SocketAddr },
    #[error("peer sidecar at {addr} presented no usable identity: {reason}")]
    Identity { addr: SocketAddr, reason: String },
    #[error("sending the preamble to {addr}: {source}")]
    Preamble { addr: SocketAddr, source: io::Error },
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
            Self::Preamble { .. } => "preamble",
        }
    }
}

/// Every value of [`TunnelError::reason`], plus the policy's refusal of a verified server
/// identity (counted by the proxy).
pub const FAILURE_REASONS: [&str; 8] = [
    "no_answer",
    "connect",
    "handshake",
    "handshake_timeout",
    "alpn",
    "identity",
    "preamble",
    SERVER_IDENTITY_DENIED,
];

/// The failure reason when the outbound policy refuses the server's verified identity.
pub const SERVER_IDENTITY_DENIED: &str = "server_identity_denied";

/// A tunnel whose handshake is done and whose peer is verified, but which carries nothing yet:
/// the peer learns the destination only from [`Tunnel::start`].
pub struct Tunnel {
    pub stream: TlsStream<TcpStream>,
    pub peer: SpiffeId,
    /// The handshake resumed an earlier session instead of exchanging certificates.
    pub resumed: bool,
    addr: SocketAddr,
    /// The deadline of each step, the preamble's too.
    timeout: Duration,
}

/// Dials the sidecar of `original_dst` (same IP, port `tunnel_port`) and completes the mTLS
/// handshake. `timeout` bounds the TCP connect and the handshake each.
pub async fn connect(
    tls: &Arc<TlsState>,
    original_dst: SocketAddr,
    tunnel_port: u16,
    timeout: Duration,
) -> Result<Tunnel, TunnelError> {
    let addr = SocketAddr::new(original_dst.ip(), tunnel_port);
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TunnelError::ConnectTimeout { addr, timeout })?
        .map_err(|source| TunnelError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(tls.current().client.clone());
    let handshake = connector.connect(ServerName::IpAddress(addr.ip().into()), tcp);
    let stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| TunnelError::HandshakeTimeout { addr, timeout })?
        .map_err(|source| TunnelError::Handshake { addr, source })?;
    let (_, conn) = stream.get_ref();
    if conn.alpn_protocol() != Some(ALPN) {
        return Err(TunnelError::Alpn { addr });
    }
    // Full or resumed, the same identity and checks (see `tls::resumption`).
    let peer = verify::verified_peer(conn, UnixTime::now()).map_err(|e| TunnelError::Identity {
        addr,
        reason: e.to_string(),
    })?;
    Ok(Tunnel {
        stream,
        peer: peer.id,
        resumed: peer.resumed,
        addr,
        timeout,
    })
}

impl Tunnel {
    /// Sends the preamble naming `original_dst`; after it, the tunnel carries the app's bytes.
    pub async fn start(&mut self, original_dst: SocketAddr) -> Result<(), TunnelError> {
        let (addr, timeout) = (self.addr, self.timeout);
        let preamble = preamble::Preamble { original_dst }.encode();
        let send = async {
            self.stream.write_all(&preamble).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(result) => result.map_err(|source| TunnelError::Preamble { addr, source }),
            Err(_) => Err(TunnelError::Preamble {
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"),
            }),
        }
    }
}

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
        ];
        for e in answered {
            assert!(!e.nothing_answered(), "{e}");
            assert!(FAILURE_REASONS.contains(&e.reason()), "{e}");
        }
    }
}
