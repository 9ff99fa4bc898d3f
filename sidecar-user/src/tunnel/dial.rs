//! Dialling a peer's tunnel port: TCP, then TLS 1.3 with ALPN `h2` and our certificate, then
//! the check of who answered. What the connection then carries is the pool's business.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::{ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::TunnelError;
use crate::tls::{ALPN, TlsState, identity::SpiffeId, verify};

/// A verified TLS connection to a peer, nothing sent on it yet.
pub struct Dialled {
    pub stream: TlsStream<TcpStream>,
    pub peer: SpiffeId,
    /// The handshake resumed an earlier session instead of exchanging certificates.
    pub resumed: bool,
}

/// Connects to `addr` and completes the mTLS handshake; `timeout` bounds each step.
///
/// No SNI is sent (the server name is the peer's IP address, which TLS never puts in SNI),
/// as ztunnel does: SPIFFE certificates name identities, not hosts.
pub async fn dial(
    tls: &Arc<TlsState>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Dialled, TunnelError> {
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
    Ok(Dialled {
        stream,
        peer: peer.id,
        resumed: peer.resumed,
    })
}
