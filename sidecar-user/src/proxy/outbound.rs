//! Outbound: a connection the kernel redirected from the local app.

use std::{net::SocketAddr, os::fd::AsFd, time::Instant};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{ConnectFailure, Proxy, copy, fail, finish_copy, guard, mesh::Route, resilience};
use crate::{
    policy::rules::Request,
    telemetry::{
        Conn,
        labels::{Direction, Outcome, Transport},
        tcp_info,
    },
    tls::identity::SpiffeId,
    tunnel::{self, client::PeerRefusal},
};

impl Proxy {
    pub(super) async fn outbound(&self, client: TcpStream, conn: &mut Conn) {
        // Original destination: where the app was going before the kernel redirected it.
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => return fail(conn, Outcome::IoError, e),
        };
        conn.record_mut().proxy_local = Some(local);
        let app_addr = conn.record().client;
        let dst = match self
            .redirect
            .original_destination(client.as_fd(), app_addr, local)
        {
            Ok(dst) => dst,
            Err(e) => {
                warn!("{e}");
                return fail(conn, Outcome::NoOriginalDestination, e);
            }
        };
        conn.destination(dst);
        conn.record_mut().app_leg_spliced =
            self.redirect.is_spliced(client.as_fd(), local, app_addr);
        let _ = client.set_nodelay(true);

        // The cloud metadata address, unless explicitly allowed: before the policy, which
        // may well allow everything.
        if !self.settings.allow_metadata && guard::is_cloud_metadata(dst.ip()) {
            warn!(%dst, "refused: the cloud metadata address (allow with --allow-metadata)");
            let _ = client.set_zero_linger();
            return fail(
                conn,
                Outcome::PolicyDenied,
                "the cloud metadata address is refused",
            );
        }

        // Policy: normally the kernel already refused a denied destination at connect();
        // this catches the rest (e.g. dry-run logging) from the same compiled policy. A
        // verdict that depends on who answers the tunnel (rules naming `servers`) waits for
        // the handshake.
        let route = self.mesh.as_ref().map_or(Route::Plain, |m| m.route(dst));
        let plain = Request {
            direction: Direction::Outbound,
            peer: None,
            dst,
        };
        let after_handshake = route != Route::Plain && self.depends_on_peer(&plain);
        if !after_handshake && !self.permitted(conn, &plain) {
            let _ = client.set_zero_linger();
            return fail(conn, Outcome::PolicyDenied, "denied by the outbound policy");
        }

        // One destination may not take every slot.
        let limit = self.destination_cap(dst);
        let _slot = match self.gate.admit_destination(dst, limit) {
            Ok(slot) => slot,
            Err(cap) => {
                self.count_refusal(conn.record().direction, cap);
                let _ = client.set_zero_linger();
                return fail(
                    conn,
                    Outcome::Overloaded,
                    format!("{limit} connections to {dst} open already (its connection cap)"),
                );
            }
        };

        // Route: through an HBONE stream to the destination's sidecar, or plaintext.
        if let (Some(mesh), Route::Tunnel | Route::TryTunnel) = (&self.mesh, route) {
            let opening = Instant::now();
            let peer = SocketAddr::new(dst.ip(), mesh.tunnel_port);
            // A strict tunnel is retried while nothing answers; a permissive one is not: no
            // answer there means plaintext.
            let strict = route == Route::Tunnel;
            // Boxed: the handshake's state (a rustls session) is not part of every plaintext
            // connection's task.
            let connecting = Box::pin(self.connect_upstream(
                dst,
                conn,
                |budget| {
                    let timeout = if strict {
                        budget.min(mesh.handshake_timeout)
                    } else {
                        mesh.handshake_timeout
                    };
                    mesh.pool.checkout(peer, timeout)
                },
                |e: &tunnel::TunnelError| strict && e.nothing_answered(),
            ));
            match connecting.await {
                Ok(checkout) => {
                    if route == Route::TryTunnel {
                        mesh.remember(dst.ip(), true);
                    }
                    let tunnel = Tunnelled {
                        dst,
                        peer,
                        check_server: after_handshake,
                        opening,
                    };
                    let tunnelled = Box::pin(self.tunnelled(client, checkout, tunnel, conn));
                    return tunnelled.await;
                }
                Err(ConnectFailure::Failed(e))
                    if route == Route::TryTunnel && e.nothing_answered() =>
                {
                    info!(%dst, "no sidecar answered ({e}); permissive mode: plaintext");
                    self.telemetry.tunnel_failed(e.reason());
                    mesh.remember(dst.ip(), false);
                    if after_handshake && !self.permitted(conn, &plain) {
                        let _ = client.set_zero_linger();
                        return fail(conn, Outcome::PolicyDenied, "denied by the outbound policy");
                    }
                }
                Err(ConnectFailure::Failed(e)) => {
                    // Something answered on the tunnel port and could not prove itself:
                    // never plaintext, in permissive mode too (see `nothing_answered`).
                    warn!(%dst, "{e}");
                    self.telemetry.tunnel_failed(e.reason());
                    let _ = client.set_zero_linger();
                    return fail(conn, Outcome::TunnelFailed, e);
                }
                Err(
                    refused @ (ConnectFailure::CircuitOpen { .. } | ConnectFailure::Overloaded(_)),
                ) => {
                    let _ = client.set_zero_linger();
                    return refused.fail(conn, Outcome::TunnelFailed, dst);
                }
            }
        }

        // Boxed, as the tunnel's path: a task is as large as the largest state it may reach,
        // so each path's states live in an allocation of their own.
        let plaintext = Box::pin(self.plaintext(client, dst, conn));
        plaintext.await;
    }

    /// Plaintext upstream: our own connect is exempt from redirection (proxy cgroup role).
    async fn plaintext(&self, mut client: TcpStream, dst: SocketAddr, conn: &mut Conn) {
        let connecting = Instant::now();
        let attempt = |budget| Self::connect(dst, budget);
        let connected = self.connect_upstream(dst, conn, attempt, resilience::retryable);
        let mut upstream = match connected.await {
            Ok(s) => s,
            Err(e) => {
                if let ConnectFailure::Failed(e) = &e {
                    let retries = conn.record().connect_retries;
                    info!(%dst, retries, "upstream connect failed: {e}");
                }
                // Reset the client so it fails now, the way a refused connect would.
                let _ = client.set_zero_linger();
                return e.fail(conn, Outcome::UpstreamConnectFailed, dst);
            }
        };
        conn.upstream_connected(connecting.elapsed());
        conn.established(Transport::Plain);
        let rec = conn.record_mut();
        rec.upstream_local = upstream.local_addr().ok();
        if let Some(up_local) = rec.upstream_local {
            rec.upstream_leg_spliced = self.redirect.is_spliced(upstream.as_fd(), up_local, dst);
        }
        let _ = upstream.set_nodelay(true);

        // Copy until both sides are done.
        let copied = copy::bidirectional(
            client.split(),
            upstream.split(),
            self.settings.idle_timeout,
            &self.abort,
            &*conn,
        )
        .await;
        // The kernel's view of both legs, while the sockets are still open.
        let rec = conn.record_mut();
        rec.tcp_app = tcp_info::read(&client);
        rec.tcp_upstream = tcp_info::read(&upstream);
        if copied.end.is_error() {
            // A stream that broke stays broken for both ends: each gets a reset, never the
            // clean EOF that would make a truncated response look complete.
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
        }
        finish_copy(rec, copied);
    }

    /// The copy through an HBONE stream, on the pooled connection `checkout` found. With
    /// `check_server`, the outbound policy decides now, on that server's verified identity;
    /// the CONNECT goes out only once the connection is admitted, so a refused server never
    /// learns where the app was going. A stream whose connection was lost before the peer
    /// answered (it went away, or died) is tried again on a fresh one, as a failed connect
    /// would be.
    async fn tunnelled(
        &self,
        mut client: TcpStream,
        mut checkout: tunnel::pool::Checkout,
        t: Tunnelled,
        conn: &mut Conn,
    ) {
        let Some(mesh) = &self.mesh else { return };
        let app = conn.record().client;
        let retries = self.resilience_for(t.dst).connect_retries;
        let mut tried = 0;
        let stream = loop {
            let tunnel::pool::Checkout {
                conn: pooled,
                slot,
                peer,
                handshake,
            } = checkout;
            // The tunnel is up and its server verified, whatever the policy or the server
            // then says of this connection.
            conn.tunnelled(
                handshake,
                mesh.tls.current().identity.to_string(),
                peer.to_string(),
            );
            if t.check_server && !self.server_admitted(conn, &peer, t.dst) {
                let _ = client.set_zero_linger();
                return fail(
                    conn,
                    Outcome::PolicyDenied,
                    format!("the outbound policy does not admit server {peer}"),
                );
            }
            // Boxed, as the retry's checkout below: the task keeps its largest state for the
            // connection's whole life, and these are over once the stream is open.
            let opening = Box::pin(pooled.open(slot, t.dst, app, mesh.handshake_timeout));
            let opened = opening.await;
            let e = match opened {
                Ok(stream) => break stream,
                Err(e) => e,
            };
            if tried > 0 {
                conn.connect_retried(false);
            }
            if !e.retryable() || tried >= retries {
                warn!(dst = %t.dst, "{e}");
                self.telemetry.tunnel_failed(e.reason());
                let _ = client.set_zero_linger();
                let outcome = match e.refusal() {
                    Some(PeerRefusal::Denied) => Outcome::PolicyDenied,
                    Some(PeerRefusal::Unreachable) => Outcome::UpstreamConnectFailed,
                    _ => Outcome::TunnelFailed,
                };
                return fail(conn, outcome, e);
            }
            tried += 1;
            debug!(dst = %t.dst, "{e}; trying a fresh connection");
            // As the first connect: a peer whose tunnel port is silent for a moment (its
            // sidecar just replaced, the new one not yet listening) is retried with backoff.
            let fresh = Box::pin(self.connect_upstream(
                t.dst,
                conn,
                |budget| {
                    mesh.pool
                        .checkout(t.peer, budget.min(mesh.handshake_timeout))
                },
                |e: &tunnel::TunnelError| e.nothing_answered(),
            ));
            checkout = match fresh.await {
                Ok(c) => c,
                Err(ConnectFailure::Failed(e)) => {
                    warn!(dst = %t.dst, "{e}");
                    self.telemetry.tunnel_failed(e.reason());
                    let _ = client.set_zero_linger();
                    return fail(conn, Outcome::TunnelFailed, e);
                }
                Err(refused) => {
                    let _ = client.set_zero_linger();
                    return refused.fail(conn, Outcome::TunnelFailed, t.dst);
                }
            };
        };
        if tried > 0 {
            conn.connect_retried(true);
        }
        conn.upstream_connected(t.opening.elapsed());
        debug!(dst = %t.dst, "HBONE stream open");
        let copied = copy::bidirectional(
            client.split(),
            (stream.recv, stream.send),
            self.settings.idle_timeout,
            &self.abort,
            &*conn,
        )
        .await;
        let rec = conn.record_mut();
        rec.tcp_app = tcp_info::read(&client);
        if copied.end.is_error() {
            // The stream broke (its halves, dropped unfinished, reset it): the app sees a
            // reset too, never a clean end of stream.
            let _ = client.set_zero_linger();
        }
        finish_copy(rec, copied);
    }

    /// The outbound policy's verdict on `dst` served by the verified `server` (counted).
    fn server_admitted(&self, conn: &mut Conn, server: &SpiffeId, dst: SocketAddr) -> bool {
        let verified = Request {
            direction: Direction::Outbound,
            peer: Some(server),
            dst,
        };
        if self.permitted(conn, &verified) {
            return true;
        }
        self.telemetry.tunnel_failed(tunnel::SERVER_IDENTITY_DENIED);
        false
    }
}

/// Where a tunnelled connection goes and what it must check on the way.
struct Tunnelled {
    dst: SocketAddr,
    /// The destination's sidecar: its tunnel port.
    peer: SocketAddr,
    /// The policy's verdict waits for the server's verified identity.
    check_server: bool,
    opening: Instant,
}
