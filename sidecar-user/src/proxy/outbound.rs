//! Outbound: a connection the kernel redirected from the local app.

use std::{net::SocketAddr, os::fd::AsFd, time::Instant};

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{ConnectFailure, Proxy, copy, fail, finish_copy, guard, mesh::Route, resilience};
use crate::{
    policy::rules::Request,
    telemetry::{
        Conn,
        labels::{Direction, Outcome, Transport},
        tcp_info,
    },
    tunnel,
};

impl Proxy {
    pub(super) async fn outbound(&self, mut client: TcpStream, conn: &mut Conn) {
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

        // Route: through an mTLS tunnel to the destination's sidecar, or plaintext.
        if let (Some(mesh), Route::Tunnel | Route::TryTunnel) = (&self.mesh, route) {
            let opening = Instant::now();
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
                    tunnel::connect(&mesh.tls, dst, mesh.tunnel_port, timeout)
                },
                |e: &tunnel::TunnelError| strict && e.nothing_answered(),
            ));
            match connecting.await {
                Ok(t) => {
                    if route == Route::TryTunnel {
                        mesh.remember(dst.ip(), true);
                    }
                    let took = opening.elapsed();
                    conn.tls_established(
                        took,
                        t.resumed,
                        mesh.tls.current().identity.to_string(),
                        t.peer.to_string(),
                    );
                    conn.upstream_connected(took);
                    return Box::pin(self.tunnelled(client, t, dst, after_handshake, conn)).await;
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

        // Plaintext upstream: our own connect is exempt from redirection (proxy cgroup role).
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

    /// The copy through a tunnel whose server is verified. With `check_server`, the outbound
    /// policy decides now, on that server's identity; the preamble goes out only once the
    /// connection is admitted, so a refused server never learns where the app was going.
    async fn tunnelled(
        &self,
        mut client: TcpStream,
        mut t: tunnel::Tunnel,
        dst: SocketAddr,
        check_server: bool,
        conn: &mut Conn,
    ) {
        let verified = Request {
            direction: Direction::Outbound,
            peer: Some(&t.peer),
            dst,
        };
        if check_server && !self.permitted(conn, &verified) {
            self.telemetry.tunnel_failed(tunnel::SERVER_IDENTITY_DENIED);
            let _ = client.set_zero_linger();
            return fail(
                conn,
                Outcome::PolicyDenied,
                format!("the outbound policy does not admit server {}", t.peer),
            );
        }
        if let Err(e) = t.start(dst).await {
            warn!(%dst, "{e}");
            self.telemetry.tunnel_failed(e.reason());
            let _ = client.set_zero_linger();
            return fail(conn, Outcome::TunnelFailed, e);
        }
        let tcp = t.stream.get_ref().0;
        conn.record_mut().upstream_local = tcp.local_addr().ok();
        // A second handle on the tunnel's socket, to read TCP_INFO after the copy has
        // consumed the stream.
        let tunnel_socket = tcp.as_fd().try_clone_to_owned().ok();
        info!(%dst, peer = %t.peer, "mTLS tunnel up");
        let copied = copy::bidirectional(
            client.split(),
            tokio::io::split(t.stream),
            self.settings.idle_timeout,
            &self.abort,
            &*conn,
        )
        .await;
        let rec = conn.record_mut();
        rec.tcp_app = tcp_info::read(&client);
        rec.tcp_upstream = tunnel_socket.as_ref().and_then(tcp_info::read);
        if copied.end.is_error() {
            let _ = client.set_zero_linger();
        }
        finish_copy(rec, copied);
    }
}
