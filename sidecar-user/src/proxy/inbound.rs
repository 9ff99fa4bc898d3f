//! Inbound: a peer sidecar's mTLS tunnel. Nothing reaches the local app until the peer has
//! proved an identity in our trust domain, agreed on our ALPN, sent a valid preamble, and the
//! policy admits that identity to the port it asked for.
//!
//! The preamble only chooses the *port*: the connection goes to the address the tunnel
//! itself arrived on — the workload's own address (the pod IP in a pod, the host address the
//! peer dialled under `sidecar run`) — as Istio does since 1.10. So a peer can never use
//! this sidecar to reach another host (no open relay), and a service bound to 127.0.0.1 (an
//! admin port, another sidecar's endpoints, a local database) stays private to the machine:
//! only what the workload exposes on its address is reachable through a tunnel. The inbound
//! policy sees that same address, the one actually connected.

use std::{collections::BTreeMap, net::SocketAddr, os::fd::AsFd, sync::Mutex, time::Instant};

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{ConnectFailure, Proxy, copy, fail, finish_copy, resilience};
use crate::{
    policy::rules::Request,
    telemetry::{
        Conn,
        labels::{Direction, Outcome},
        tcp_info,
    },
    tunnel::{self, preamble},
};

impl Proxy {
    /// `handshake_slot` counts this connection against `--max-pending-handshakes` until the
    /// peer is authenticated.
    pub(super) async fn inbound(
        &self,
        tcp: TcpStream,
        conn: &mut Conn,
        handshake_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let Some(mesh) = &self.mesh else {
            return fail(
                conn,
                Outcome::IoError,
                "inbound connection without TLS configured",
            );
        };
        let _ = tcp.set_nodelay(true);
        // The address the peer reached us on: where the workload is, and so where the tunnel
        // delivers (never the preamble's address, which the peer chose).
        let workload = match tcp.local_addr() {
            Ok(a) => a.ip().to_canonical(),
            Err(e) => return fail(conn, Outcome::IoError, e),
        };

        // mTLS handshake: the peer's chain, validity, key usage and trust domain.
        let credentials = mesh.tls.current();
        let handshaking = Instant::now();
        let accepted =
            match tunnel::accept(credentials.server.clone(), tcp, mesh.handshake_timeout).await {
                Ok(a) => a,
                Err(e) => return self.reject(conn, e.reason(), e),
            };
        let (mut tls, peer) = (accepted.stream, accepted.peer);
        drop(handshake_slot);
        conn.tls_established(
            handshaking.elapsed(),
            accepted.resumed,
            peer.to_string(),
            credentials.identity.to_string(),
        );

        // Preamble: which port of ours the peer's app was going to.
        let asked = match preamble::read(&mut tls, mesh.preamble_timeout).await {
            Ok(p) => p.original_dst,
            Err(e) => return self.reject(conn, e.reason(), e),
        };
        let local_app = SocketAddr::new(workload, asked.port());
        conn.destination(local_app);

        // Policy on the verified identity and the address the tunnel will connect, before
        // anything local is connected. Dropping `tls` closes the tunnel. (The enforcer logs
        // the decision with the identity and destination.)
        let req = Request {
            direction: Direction::Inbound,
            peer: Some(&peer),
            dst: local_app,
        };
        if !self.permitted(conn, &req) {
            self.rejections.count("policy_denied");
            return fail(conn, Outcome::PolicyDenied, "denied by the inbound policy");
        }

        // Never the sidecar itself: its admin endpoint, its proxy or its tunnel listener
        // are not the app's, whatever the policy says.
        if mesh.own_ports.contains(&local_app.port()) {
            warn!(peer = %peer, %local_app, "inbound connection refused: the sidecar's own port");
            self.rejections.count("own_port");
            return fail(
                conn,
                Outcome::Refused,
                "a tunnel may not reach the sidecar's own ports",
            );
        }

        // The local app, on the workload's own address.
        let connecting = Instant::now();
        let attempt = |budget| Self::connect(local_app, budget);
        let connected = self.connect_upstream(local_app, conn, attempt, resilience::retryable);
        let mut app = match connected.await {
            Ok(s) => s,
            Err(e) => {
                if let ConnectFailure::Failed(e) = &e {
                    let retries = conn.record().connect_retries;
                    info!(%local_app, retries, "local app connect failed: {e}");
                }
                return e.fail(conn, Outcome::UpstreamConnectFailed, local_app);
            }
        };
        conn.upstream_connected(connecting.elapsed());
        let rec = conn.record_mut();
        rec.upstream_local = app.local_addr().ok();
        if let Some(up_local) = rec.upstream_local {
            rec.upstream_leg_spliced = self.redirect.is_spliced(app.as_fd(), up_local, local_app);
        }
        let _ = app.set_nodelay(true);
        info!(peer = %peer, %local_app, "inbound tunnel accepted");

        // A second handle on the tunnel's socket, to read TCP_INFO after the copy has
        // consumed the stream.
        let tunnel_socket = tls.get_ref().0.as_fd().try_clone_to_owned().ok();
        let copied = copy::bidirectional(
            tokio::io::split(tls),
            app.split(),
            self.settings.idle_timeout,
            &self.abort,
            &*conn,
        )
        .await;
        let rec = conn.record_mut();
        rec.tcp_app = tunnel_socket.as_ref().and_then(tcp_info::read);
        rec.tcp_upstream = tcp_info::read(&app);
        if copied.end.is_error() {
            // The tunnel broke: the local app sees a reset, not a clean end of stream.
            let _ = app.set_zero_linger();
        }
        finish_copy(rec, copied);
    }

    /// Counts and logs a refused inbound connection.
    fn reject(&self, conn: &mut Conn, reason: &'static str, error: impl std::fmt::Display) {
        self.rejections.count(reason);
        let client = conn.record().client;
        warn!(reason, %client, "inbound connection refused: {error}");
        fail(conn, Outcome::Refused, format!("{reason}: {error}"));
    }
}

/// Connections the inbound side refused, by reason (`no_client_cert`, `untrusted_ca`,
/// `expired_certificate`, `wrong_identity`, `tls_other`, `alpn`, `preamble_*`, `handshake_timeout`).
#[derive(Default)]
pub struct Rejections {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Rejections {
    pub fn count(&self, reason: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
