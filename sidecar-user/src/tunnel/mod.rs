//! The mTLS tunnel between sidecars: the client side dials the peer sidecar's inbound port,
//! completes a TLS 1.3 handshake with our ALPN, and sends the [`preamble`]; the server side
//! (`proxy::inbound`) checks all of that before any byte reaches its app.

pub mod preamble;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::tls::{ALPN, TlsState, identity::SpiffeId};

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("connecting to the peer sidecar at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("peer sidecar at {addr} did not agree on the tunnel protocol (ALPN)")]
    Alpn { addr: SocketAddr },
    #[error("peer sidecar at {addr} presented no usable identity: {reason}")]
    Identity { addr: SocketAddr, reason: String },
    #[error("sending the preamble to {addr}: {source}")]
    Preamble {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// An established tunnel: the TLS stream and the verified identity of the peer sidecar.
pub struct Tunnel {
    pub stream: TlsStream<TcpStream>,
    pub peer: SpiffeId,
}

/// Opens a tunnel to the sidecar of `original_dst` (same IP, port `tunnel_port`).
pub async fn open(
    tls: &Arc<TlsState>,
    original_dst: SocketAddr,
    tunnel_port: u16,
    timeout: Duration,
) -> Result<Tunnel, TunnelError> {
    let addr = SocketAddr::new(original_dst.ip(), tunnel_port);
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TunnelError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(tls.current().client.clone());
        let mut stream = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| TunnelError::Handshake { addr, source })?;
        let (_, conn) = stream.get_ref();
        if conn.alpn_protocol() != Some(ALPN) {
            return Err(TunnelError::Alpn { addr });
        }
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| TunnelError::Identity {
                addr,
                reason: "no certificate".into(),
            })
            .and_then(|c| {
                SpiffeId::from_certificate(c).map_err(|e| TunnelError::Identity {
                    addr,
                    reason: e.to_string(),
                })
            })?;
        let preamble = preamble::Preamble { original_dst }.encode();
        stream
            .write_all(&preamble)
            .await
            .map_err(|source| TunnelError::Preamble { addr, source })?;
        stream
            .flush()
            .await
            .map_err(|source| TunnelError::Preamble { addr, source })?;
        Ok(Tunnel { stream, peer })
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(TunnelError::Timeout { addr, timeout }))
}
