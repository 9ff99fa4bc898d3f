//! Inbound: a peer's HBONE connection to our tunnel port. Nothing reaches the local app until
//! the peer has proved an identity in our trust domain and agreed on `h2`; then each CONNECT
//! stream is one application connection, checked on its own: the address it names, the
//! policy on the verified identity, the sidecar's own ports, then the local app.
//!
//! A stream only chooses the *port*: its CONNECT must name the address the peer dialled (the
//! workload's own address: the pod IP in a pod, the host address under `sidecar run`), and
//! the connection goes to that address, as Istio does. So a peer can never use this sidecar
//! to reach another host (no open relay), and a service bound to 127.0.0.1 (an admin port,
//! another sidecar's endpoints, a local database) stays private to the machine: only what the
//! workload exposes on its address is reachable through a tunnel. The inbound policy sees
//! that same address, the one actually connected.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{ConnectFailure, Proxy, copy, fail, finish_copy, resilience};
use crate::{
    policy::rules::Request,
    telemetry::{
        Conn,
        labels::{Direction, Outcome},
        tcp_info,
    },
    tls::identity::SpiffeId,
    tunnel::{
        self,
        request::Refusal,
        server::{End, Incoming},
    },
};

/// What every stream of one inbound connection shares: who the peer is, who we are, where
/// it reached us, and the handshake the first stream is charged with.
struct Peer {
    /// The peer's socket (its sidecar's, or ztunnel's).
    addr: SocketAddr,
    id: SpiffeId,
    own: String,
    /// Our address as the peer dialled it: where the workload is.
    workload: IpAddr,
    handshake: Mutex<Option<(Duration, bool)>>,
}

impl Proxy {
    /// `handshake_slot` counts this connection against `--max-pending-handshakes` until the
    /// peer is authenticated.
    pub(super) async fn inbound(
        self: &Arc<Self>,
        tcp: TcpStream,
        addr: SocketAddr,
        handshake_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let Some(mesh) = &self.mesh else {
            return self.refused(addr, Outcome::IoError, "no_tls", "inbound without TLS");
        };
        let _ = tcp.set_nodelay(true);
        // The address the peer reached us on: where the workload is, and the only address a
        // stream may name.
        let workload = match tcp.local_addr() {
            Ok(a) => a.ip().to_canonical(),
            Err(e) => return self.refused(addr, Outcome::IoError, "tls_other", e),
        };

        // mTLS handshake: the peer's chain, validity, key usage and trust domain.
        let credentials = mesh.tls.current();
        let handshaking = Instant::now();
        let accepted =
            match tunnel::accept(credentials.server.clone(), tcp, mesh.handshake_timeout).await {
                Ok(a) => a,
                Err(e) => return self.refused(addr, Outcome::Refused, e.reason(), e),
            };
        drop(handshake_slot);
        let peer = Arc::new(Peer {
            addr,
            id: accepted.peer,
            own: credentials.identity.to_string(),
            workload,
            handshake: Mutex::new(Some((handshaking.elapsed(), accepted.resumed))),
        });
        debug!(peer = %peer.id, "HBONE connection accepted");

        // HTTP/2: every stream its own task and record. GOAWAY when the sidecar drains, or
        // once our credentials rotate: the peer's new streams then go out on a connection
        // made with the new certificate.
        let drain = self.go_away.child_token();
        let rotation = tokio::spawn(go_away_on_rotation(
            mesh.tls.clone(),
            mesh.tls.generation(),
            drain.clone(),
        ));
        self.telemetry.hbone_connection(Direction::Inbound, true);
        let (end, streams) = tunnel::server::serve(
            accepted.stream,
            workload,
            &mesh.tunnel,
            mesh.preface_timeout,
            drain,
            |incoming| {
                let (this, peer) = (self.clone(), peer.clone());
                let id = self.telemetry.connection_id();
                let span = info_span!("stream", id, peer = %peer.id);
                self.tasks.spawn(
                    async move {
                        let stream = Box::pin(this.inbound_stream(id, incoming, &peer));
                        stream.await
                    }
                    .instrument(span),
                );
            },
        )
        .await;
        rotation.abort();
        self.telemetry.hbone_connection(Direction::Inbound, false);
        self.telemetry.hbone_carried(Direction::Inbound, streams);
        match end {
            End::Closed => debug!(peer = %peer.id, "HBONE connection closed"),
            End::Refused(reason) => {
                self.rejections.count(reason);
                self.refusal_line(reason, || {
                    warn!(peer = %peer.id, %addr, reason, "inbound connection refused: no HTTP/2");
                });
            }
            End::Violation(reason) => {
                self.telemetry.hbone_violation(reason);
                self.rejections.count(reason);
                self.refusal_line(reason, || {
                    warn!(peer = %peer.id, %addr, reason, "HBONE connection sent away (GOAWAY)");
                });
            }
            End::Failed(e) => debug!(peer = %peer.id, "HBONE connection failed: {e}"),
        }
    }

    /// One stream: one application connection, one record.
    async fn inbound_stream(&self, id: u64, incoming: Incoming, peer: &Peer) {
        let mut conn = self.telemetry.accept(id, Direction::Inbound, peer.addr);
        let handshake = peer
            .handshake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        conn.tunnelled(handshake, peer.id.to_string(), peer.own.clone());
        self.serve_stream(incoming, peer, &mut conn).await;
        self.finish(conn);
    }

    async fn serve_stream(&self, incoming: Incoming, peer: &Peer, conn: &mut Conn) {
        let target = match &incoming.target {
            Ok(t) => t.clone(),
            Err(refusal) => {
                let refusal = *refusal;
                return self.refuse_stream(conn, incoming, refusal, Outcome::Refused);
            }
        };
        let local_app = SocketAddr::new(peer.workload, target.original_dst.port());
        conn.destination(local_app);

        // Policy on the verified identity and the address the stream will connect, before
        // anything local is connected. (The enforcer logs the decision with the identity
        // and destination.)
        let req = Request {
            direction: Direction::Inbound,
            peer: Some(&peer.id),
            dst: local_app,
        };
        if !self.permitted(conn, &req) {
            return self.refuse_stream(conn, incoming, Refusal::Denied, Outcome::PolicyDenied);
        }

        // Never the sidecar itself: its admin endpoint, its proxy or its tunnel listener
        // are not the app's, whatever the policy says.
        let own_ports = self.mesh.as_ref().map_or(&[][..], |m| &m.own_ports[..]);
        if own_ports.contains(&local_app.port()) {
            warn!(peer = %peer.id, %local_app, "inbound stream refused: the sidecar's own port");
            return self.refuse_stream(conn, incoming, Refusal::OwnPort, Outcome::Refused);
        }

        // One stream is one connection for the connection cap too.
        let _slot = match self.gate.admit(false) {
            Ok(slots) => slots.connection,
            Err(cap) => {
                self.count_refusal(Direction::Inbound, cap);
                return self.refuse_stream(
                    conn,
                    incoming,
                    Refusal::Unreachable,
                    Outcome::Overloaded,
                );
            }
        };

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
                self.answer_refusal(incoming, Refusal::Unreachable);
                return e.fail(conn, Outcome::UpstreamConnectFailed, local_app);
            }
        };
        conn.upstream_connected(connecting.elapsed());
        let _ = app.set_nodelay(true);
        let rec = conn.record_mut();
        rec.upstream_local = app.local_addr().ok();
        if let Some(up_local) = rec.upstream_local {
            rec.upstream_leg_spliced = self.redirect.is_spliced(app.as_fd(), up_local, local_app);
        }
        let stream = match incoming.accept() {
            Ok(s) => s,
            Err(e) => {
                return fail(
                    conn,
                    Outcome::IoError,
                    format!("the peer reset the stream: {e}"),
                );
            }
        };
        debug!(%local_app, "inbound stream open");

        let copied = copy::bidirectional(
            (stream.recv, stream.send),
            app.split(),
            self.settings.idle_timeout,
            &self.abort,
            &*conn,
        )
        .await;
        let rec = conn.record_mut();
        rec.tcp_upstream = tcp_info::read(&app);
        if copied.end.is_error() {
            // The stream broke (the halves, dropped unfinished, reset it): the local app sees
            // a reset, not a clean end of stream.
            let _ = app.set_zero_linger();
        }
        finish_copy(rec, copied);
    }

    /// Refuses a stream (answered and counted), logs it, and ends its record with `outcome`.
    fn refuse_stream(
        &self,
        conn: &mut Conn,
        incoming: Incoming,
        refusal: Refusal,
        outcome: Outcome,
    ) {
        self.answer_refusal(incoming, refusal);
        debug!(
            reason = refusal.reason(),
            "inbound stream refused: {refusal}"
        );
        fail(conn, outcome, format!("{}: {refusal}", refusal.reason()));
    }

    /// Answers a stream with the refusal's status, and counts it.
    fn answer_refusal(&self, incoming: Incoming, refusal: Refusal) {
        incoming.refuse(refusal);
        self.rejections.count(refusal.reason());
    }

    /// Writes a refusal's warning line (`line`) if its reason is within its budget, after a
    /// summary of the lines of that reason held back in the interval that ended.
    fn refusal_line(&self, reason: &'static str, line: impl FnOnce()) {
        let admit = self.refusal_lines.admit(reason, Instant::now());
        if admit.suppressed > 0 {
            warn!(
                reason,
                "{} more inbound refusal(s) for {reason} in the last {} s were not logged one \
                 by one (each is counted in the report's inbound_rejections)",
                admit.suppressed,
                super::log_budget::INTERVAL.as_secs()
            );
        }
        if admit.log {
            line();
        }
    }

    /// A connection refused before any stream: counted, logged (within a budget per reason),
    /// and one record.
    fn refused(
        &self,
        addr: SocketAddr,
        outcome: Outcome,
        reason: &'static str,
        error: impl std::fmt::Display,
    ) {
        self.rejections.count(reason);
        self.refusal_line(reason, || {
            warn!(reason, client = %addr, "inbound connection refused: {error}");
        });
        let mut conn =
            self.telemetry
                .accept(self.telemetry.connection_id(), Direction::Inbound, addr);
        fail(&mut conn, outcome, format!("{reason}: {error}"));
        self.finish(conn);
    }
}

/// Cancels `drain` once the credentials are no longer those of `generation`.
async fn go_away_on_rotation(
    tls: Arc<crate::tls::TlsState>,
    generation: u64,
    drain: tokio_util::sync::CancellationToken,
) {
    while tls.generation() == generation {
        tokio::time::sleep(ROTATION_POLL).await;
    }
    drain.cancel();
}

/// How soon an inbound connection notices that our credentials rotated.
const ROTATION_POLL: Duration = Duration::from_secs(1);

/// Connections and streams the inbound side refused, by reason (`no_client_cert`,
/// `untrusted_ca`, `expired_certificate`, `wrong_identity`, `tls_other`, `alpn`,
/// `handshake_timeout`, `bad_request`, `wrong_address`, `own_port`, `policy_denied`,
/// `unreachable`, and the HTTP/2 violations).
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
