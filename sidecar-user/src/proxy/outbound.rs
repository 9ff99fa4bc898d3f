//! Outbound: a connection the kernel redirected from the local app.

use std::{os::fd::AsFd, time::Instant};

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{
    Proxy, copy, fail, finish_copy, guard,
    mesh::Route,
    record::{ConnRecord, Mode, Outcome},
};
use crate::{
    policy::rules::Way,
    telemetry::{Conn, tcp_info},
    tunnel,
};

impl Proxy {
    pub(super) async fn outbound(&self, mut client: TcpStream, rec: &mut ConnRecord, conn: &Conn) {
        // Original destination: where the app was going before the kernel redirected it.
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => return fail(rec, Outcome::IoError, e),
        };
        rec.proxy_local = Some(local);
        let dst = match self
            .redirect
            .original_destination(client.as_fd(), rec.client, local)
        {
            Ok(dst) => dst,
            Err(e) => {
                warn!("{e}");
                return fail(rec, Outcome::NoOriginalDestination, e);
            }
        };
        rec.original_dst = Some(dst);
        conn.destination(dst);
        rec.app_leg_spliced = self.redirect.is_spliced(local, rec.client);
        let _ = client.set_nodelay(true);

        // The cloud metadata address, unless explicitly allowed: before the policy, which
        // may well allow everything.
        if !self.settings.allow_metadata && guard::is_cloud_metadata(dst.ip()) {
            warn!(%dst, "refused: the cloud metadata address (allow with --allow-metadata)");
            let _ = client.set_zero_linger();
            return fail(
                rec,
                Outcome::PolicyDenied,
                "the cloud metadata address is refused",
            );
        }

        // Policy: normally the kernel already refused a denied destination at connect();
        // this catches the rest (e.g. dry-run logging) from the same compiled policy.
        if !self.permitted(rec, Way::Outbound, None, dst) {
            let _ = client.set_zero_linger();
            return fail(rec, Outcome::PolicyDenied, "denied by the outbound policy");
        }

        // Route: through an mTLS tunnel to the destination's sidecar, or plaintext.
        let route = self.mesh.as_ref().map_or(Route::Plain, |m| m.route(dst));
        if let (Some(mesh), Route::Tunnel | Route::TryTunnel) = (&self.mesh, route) {
            let opening = Instant::now();
            match tunnel::open(&mesh.tls, dst, mesh.tunnel_port, mesh.handshake_timeout).await {
                Ok(t) => {
                    if route == Route::TryTunnel {
                        mesh.remember(dst.ip(), true);
                    }
                    let took = opening.elapsed();
                    rec.mode = Mode::Mtls;
                    rec.src_identity = Some(mesh.tls.current().identity.to_string());
                    rec.dst_identity = Some(t.peer.to_string());
                    rec.upstream_connect_us = Some(took.as_micros() as u64);
                    conn.tls_established(took, rec.src_identity.clone(), rec.dst_identity.clone());
                    conn.upstream_connected(took);
                    let tcp = t.stream.get_ref().0;
                    rec.upstream_local = tcp.local_addr().ok();
                    // A second handle on the tunnel's socket, to read TCP_INFO after the copy
                    // has consumed the stream.
                    let tunnel_socket = tcp.as_fd().try_clone_to_owned().ok();
                    info!(%dst, peer = %t.peer, "mTLS tunnel up");
                    let copied = copy::bidirectional(
                        client.split(),
                        tokio::io::split(t.stream),
                        self.settings.idle_timeout,
                        &self.abort,
                        conn,
                    )
                    .await;
                    rec.tcp_app = tcp_info::read(&client);
                    rec.tcp_upstream = tunnel_socket.as_ref().and_then(tcp_info::read);
                    if copied.end.is_error() {
                        let _ = client.set_zero_linger();
                    }
                    return finish_copy(rec, copied);
                }
                Err(e) if route == Route::Tunnel => {
                    warn!(%dst, "{e}");
                    let _ = client.set_zero_linger();
                    return fail(rec, Outcome::TunnelFailed, e);
                }
                Err(e) => {
                    info!(%dst, "no sidecar answered ({e}); permissive mode: plaintext");
                    mesh.remember(dst.ip(), false);
                }
            }
        }

        // Plaintext upstream: our own connect is exempt from redirection (proxy cgroup role).
        let connecting = Instant::now();
        let mut upstream = match self.connect(dst).await {
            Ok(s) => s,
            Err(e) => {
                info!(%dst, "upstream connect failed: {e}");
                // Reset the client so it fails now, the way a refused connect would.
                let _ = client.set_zero_linger();
                return fail(rec, Outcome::UpstreamConnectFailed, e);
            }
        };
        rec.upstream_connect_us = Some(connecting.elapsed().as_micros() as u64);
        conn.upstream_connected(connecting.elapsed());
        conn.established(Mode::Plain);
        rec.upstream_local = upstream.local_addr().ok();
        if let Some(up_local) = rec.upstream_local {
            rec.upstream_leg_spliced = self.redirect.is_spliced(up_local, dst);
        }
        let _ = upstream.set_nodelay(true);

        // Copy until both sides are done.
        let copied = copy::bidirectional(
            client.split(),
            upstream.split(),
            self.settings.idle_timeout,
            &self.abort,
            conn,
        )
        .await;
        // The kernel's view of both legs, while the sockets are still open.
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
}
