//! The server side of the tunnel: a peer sidecar's TLS 1.3 handshake on our inbound port,
//! with our ALPN and a verified SPIFFE identity in our trust domain, the mirror of
//! [`dial`](super::dial). What the connection may then reach (its CONNECTs, policy, the
//! sidecar's own ports) is the inbound proxy's to decide.

use std::{sync::Arc, time::Duration};

use rustls::{CertificateError, ServerConfig, pki_types::UnixTime};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::tls::{
    ALPN,
    identity::SpiffeId,
    verify::{self, PeerError},
};

/// A peer that did not prove itself; [`AcceptError::reason`] names why.
#[derive(Debug, Error)]
pub enum AcceptError {
    #[error("{0}")]
    Handshake(std::io::Error),
    #[error("no TLS handshake within the deadline")]
    HandshakeTimeout,
    #[error("peer did not negotiate the tunnel ALPN")]
    Alpn,
    #[error("{0}")]
    Identity(PeerError),
}

impl AcceptError {
    /// The refusal's reason label (`sidecar_inbound_rejections` and the exit report).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Handshake(e) => classify(e),
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Alpn => "alpn",
            Self::Identity(PeerError::NotValidNow { .. }) => "expired_certificate",
            Self::Identity(_) => "wrong_identity",
        }
    }
}

/// A tunnel whose peer is verified; nothing has been read from it yet.
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    pub peer: SpiffeId,
    /// The handshake resumed an earlier session instead of exchanging certificates.
    pub resumed: bool,
}

/// Completes the handshake on `tcp` with `server` (our credentials, client certificates
/// required) within `timeout`, and checks the peer: full or resumed, the same identity and
/// checks (see `tls::resumption`).
pub async fn accept(
    server: Arc<ServerConfig>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<Accepted, AcceptError> {
    let stream = match tokio::time::timeout(timeout, TlsAcceptor::from(server).accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(AcceptError::Handshake(e)),
        Err(_) => return Err(AcceptError::HandshakeTimeout),
    };
    let (_, session) = stream.get_ref();
    if session.alpn_protocol() != Some(ALPN) {
        return Err(AcceptError::Alpn);
    }
    let peer = verify::verified_peer(session, UnixTime::now()).map_err(AcceptError::Identity)?;
    Ok(Accepted {
        stream,
        peer: peer.id,
        resumed: peer.resumed,
    })
}

/// The reason label of a failed handshake.
fn classify(e: &std::io::Error) -> &'static str {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "tls_other";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "untrusted_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "expired_certificate"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::ApplicationVerificationFailure => "wrong_identity",
            // Made for the other end only (extended key usage), or no workload's at all.
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "key_usage"
            }
            CertificateError::Other(other)
                if other.0.downcast_ref::<verify::KeyUsageError>().is_some() =>
            {
                "key_usage"
            }
            _ => "bad_certificate",
        },
        rustls::Error::NoApplicationProtocol => "alpn",
        _ => "tls_other",
    }
}
