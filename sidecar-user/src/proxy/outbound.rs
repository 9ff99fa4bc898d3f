//! Outbound: a connection the kernel redirected from the local app.

use std::os::fd::AsFd;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{
    Proxy, copy, fail, finish_copy,
    mesh::Route,
    record::{ConnRecord, Outcome},
};
use crate::{policy::rules::Way, tunnel};

impl Proxy {
    pub(super) async fn outbound(&self, mut client: TcpStream, rec: &mut ConnRecord) {
        // Original destination: where the app was going before the kernel redirected it.
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => return fail(rec, Outcome::IoError, e),
        };
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
        rec.app_leg_spliced = self.redirect.is_spliced(local, rec.client);
        let _ = client.set_nodelay(true);

        // Policy: normally the kernel already refused a denied destination at connect();
        // this catches the rest (e.g. dry-run logging) from the same compiled policy.
        if !self.permitted(Way::Outbound, None, dst) {
            let _ = client.set_zero_linger();
            return fail(rec, Outcome::PolicyDenied, "denied by the outbound policy");
        }

        // Route: through an mTLS tunnel to the destination's sidecar, or plaintext.
        let route = self.mesh.as_ref().map_or(Route::Plain, |m| m.route(dst));
        if let (Some(mesh), Route::Tunnel | Route::TryTunnel) = (&self.mesh, route) {
            match tunnel::open(&mesh.tls, dst, mesh.tunnel_port, mesh.handshake_timeout).await {
                Ok(t) => {
                    if route == Route::TryTunnel {
                        mesh.remember(dst.ip(), true);
                    }
                    rec.mtls = true;
                    rec.peer_identity = Some(t.peer.to_string());
                    rec.upstream_local = t.stream.get_ref().0.local_addr().ok();
                    info!(%dst, peer = %t.peer, "mTLS tunnel up");
                    let copied = copy::bidirectional(
                        client.split(),
                        tokio::io::split(t.stream),
                        self.settings.idle_timeout,
                        &self.abort,
                    )
                    .await;
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
        let mut upstream = match self.connect(dst).await {
            Ok(s) => s,
            Err(e) => {
                info!(%dst, "upstream connect failed: {e}");
                // Reset the client so it fails now, the way a refused connect would.
                let _ = client.set_zero_linger();
                return fail(rec, Outcome::UpstreamConnectFailed, e);
            }
        };
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
        )
        .await;
        finish_copy(rec, copied);
    }
}
