//! Inbound: a peer sidecar's mTLS tunnel. Nothing reaches the local app until the peer has
//! proved an identity in our trust domain, agreed on our ALPN, sent a valid preamble, and the
//! policy admits that identity to the port it asked for.
//!
//! The preamble only chooses the local *port*: the connection always goes to loopback, so a
//! peer can never use this sidecar to reach another host (no open relay).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    time::Instant,
};

use rustls::CertificateError;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::{
    Proxy, copy, fail, finish_copy,
    record::{ConnRecord, Mode, Outcome},
};
use crate::{
    policy::rules::Way,
    telemetry::{Conn, tcp_info},
    tls::{ALPN, identity::SpiffeId},
    tunnel::preamble,
};

impl Proxy {
    pub(super) async fn inbound(&self, tcp: TcpStream, rec: &mut ConnRecord, conn: &Conn) {
        let Some(mesh) = &self.mesh else {
            return fail(
                rec,
                Outcome::IoError,
                "inbound connection without TLS configured",
            );
        };
        let _ = tcp.set_nodelay(true);

        // mTLS handshake: the peer's chain, validity, key usage and trust domain.
        let credentials = mesh.tls.current();
        let acceptor = TlsAcceptor::from(credentials.server.clone());
        let handshaking = Instant::now();
        let mut tls = match tokio::time::timeout(mesh.handshake_timeout, acceptor.accept(tcp)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.reject(rec, classify(&e), e),
            Err(_) => {
                return self.reject(
                    rec,
                    "handshake_timeout",
                    "no TLS handshake within the deadline",
                );
            }
        };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN) {
            return self.reject(rec, "alpn", "peer did not negotiate the tunnel ALPN");
        }
        let peer = match session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| SpiffeId::from_certificate(c))
        {
            Some(Ok(id)) => id,
            _ => return self.reject(rec, "wrong_identity", "peer certificate has no SPIFFE ID"),
        };
        rec.mode = Mode::Mtls;
        rec.src_identity = Some(peer.to_string());
        rec.dst_identity = Some(credentials.identity.to_string());
        conn.tls_established(
            handshaking.elapsed(),
            rec.src_identity.clone(),
            rec.dst_identity.clone(),
        );

        // Preamble: where the peer's app was going.
        let dst = match preamble::read(&mut tls, mesh.preamble_timeout).await {
            Ok(p) => p.original_dst,
            Err(e) => return self.reject(rec, e.reason(), e),
        };
        rec.original_dst = Some(dst);
        conn.destination(dst);

        // Policy on the verified identity and the destination port the peer asked for,
        // before anything local is connected. Dropping `tls` closes the tunnel. (The
        // enforcer logs the decision with the identity and destination.)
        if !self.permitted(rec, Way::Inbound, Some(&peer), dst) {
            self.rejections.count("policy_denied");
            return fail(rec, Outcome::PolicyDenied, "denied by the inbound policy");
        }

        // Never the sidecar itself: its admin endpoint, its proxy or its tunnel listener
        // are not the app's, whatever the policy says.
        if mesh.own_ports.contains(&dst.port()) {
            warn!(peer = %peer, %dst, "inbound connection refused: the sidecar's own port");
            self.rejections.count("own_port");
            return fail(
                rec,
                Outcome::Refused,
                "a tunnel may not reach the sidecar's own ports",
            );
        }

        // The local app, always on loopback.
        let local_app = SocketAddr::new(
            match dst.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            },
            dst.port(),
        );
        let connecting = Instant::now();
        let mut app = match self.connect(local_app).await {
            Ok(s) => s,
            Err(e) => {
                info!(%local_app, "local app connect failed: {e}");
                return fail(rec, Outcome::UpstreamConnectFailed, e);
            }
        };
        rec.upstream_connect_us = Some(connecting.elapsed().as_micros() as u64);
        conn.upstream_connected(connecting.elapsed());
        rec.upstream_local = app.local_addr().ok();
        if let Some(up_local) = rec.upstream_local {
            rec.upstream_leg_spliced = self.redirect.is_spliced(up_local, local_app);
        }
        let _ = app.set_nodelay(true);
        info!(peer = %peer, %dst, "inbound tunnel accepted");

        // A second handle on the tunnel's socket, to read TCP_INFO after the copy has
        // consumed the stream.
        let tunnel_socket = tls.get_ref().0.as_fd().try_clone_to_owned().ok();
        let copied = copy::bidirectional(
            tokio::io::split(tls),
            app.split(),
            self.settings.idle_timeout,
            &self.abort,
            conn,
        )
        .await;
        rec.tcp_app = tunnel_socket.as_ref().and_then(tcp_info::read);
        rec.tcp_upstream = tcp_info::read(&app);
        if copied.end.is_error() {
            // The tunnel broke: the local app sees a reset, not a clean end of stream.
            let _ = app.set_zero_linger();
        }
        finish_copy(rec, copied);
    }

    /// Counts and logs a refused inbound connection.
    fn reject(&self, rec: &mut ConnRecord, reason: &'static str, error: impl std::fmt::Display) {
        self.rejections.count(reason);
        warn!(reason, client = %rec.client, "inbound connection refused: {error}");
        fail(rec, Outcome::Refused, format!("{reason}: {error}"));
    }
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
            _ => "bad_certificate",
        },
        rustls::Error::NoApplicationProtocol => "alpn",
        _ => "tls_other",
    }
}
