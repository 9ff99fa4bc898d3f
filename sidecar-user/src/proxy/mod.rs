//! The transparent TCP proxy. One intercepted connection goes, top to bottom:
//!
//! accept → original destination → (policy) → connect upstream → copy both ways → record
//!
//! Each arrow is a function call in [`Proxy::handle`].

pub mod copy;
pub mod record;

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};

use self::{
    copy::CopyEnd,
    record::{ConnRecord, Journal, Outcome},
};
use crate::{
    redirect::Redirect,
    telemetry::{self, Telemetry, TelemetrySettings},
};

/// Timeouts of the data path.
#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    /// How long connecting to the original destination may take.
    pub connect_timeout: Duration,
    /// A connection with no byte moving in either direction for this long is closed.
    pub idle_timeout: Duration,
}

/// The proxy and its one drain mechanism: `stop_accepting` ends the accept loops,
/// `abort` cuts the connections still open when the drain deadline passes.
pub struct Proxy {
    settings: ProxySettings,
    redirect: Arc<dyn Redirect>,
    journal: Arc<Journal>,
    telemetry: Arc<Telemetry>,
    next_id: AtomicU64,
    stop_accepting: CancellationToken,
    abort: CancellationToken,
    tasks: TaskTracker,
}

impl Proxy {
    pub fn new(
        settings: ProxySettings,
        redirect: Arc<dyn Redirect>,
        journal: Arc<Journal>,
    ) -> Arc<Self> {
        Self::with_telemetry(
            settings,
            redirect,
            journal,
            Telemetry::new(TelemetrySettings::default()),
        )
    }

    /// A proxy that reports to `telemetry` (metrics, access log, live table).
    pub fn with_telemetry(
        settings: ProxySettings,
        redirect: Arc<dyn Redirect>,
        journal: Arc<Journal>,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            redirect,
            journal,
            telemetry,
            next_id: AtomicU64::new(1),
            stop_accepting: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Accepts until [`Proxy::drain`] starts; each connection runs in its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = self.stop_accepting.cancelled() => return,
            };
            let (client, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            let span = info_span!("conn", id, client = %peer);
            self.tasks.spawn(
                async move {
                    let conn = this.telemetry.accept(id, peer);
                    let record = this.handle(client, peer, id, &conn).await;
                    this.telemetry.close(conn, &record);
                    debug!(
                        outcome = record.outcome.as_str(),
                        up = record.bytes_from_client,
                        down = record.bytes_from_upstream,
                        "closed"
                    );
                    this.journal.push(record);
                }
                .instrument(span),
            );
        }
    }

    /// The data path of one intercepted connection.
    async fn handle(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        id: u64,
        conn: &telemetry::Conn,
    ) -> ConnRecord {
        let started = Instant::now();
        let mut rec = ConnRecord::new(id, peer);
        let finish = |mut rec: ConnRecord, outcome: Outcome, error: Option<String>| {
            rec.outcome = outcome;
            rec.error = error;
            rec.duration_ms = started.elapsed().as_millis() as u64;
            rec
        };

        // Original destination: where the app was going before the kernel redirected it.
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => return finish(rec, Outcome::IoError, Some(e.to_string())),
        };
        rec.proxy_local = Some(local);
        let dst = match self
            .redirect
            .original_destination(client.as_fd(), peer, local)
        {
            Ok(dst) => dst,
            Err(e) => {
                warn!("{e}");
                return finish(rec, Outcome::NoOriginalDestination, Some(e.to_string()));
            }
        };
        rec.original_dst = Some(dst);
        conn.destination(dst);
        rec.app_leg_spliced = self.redirect.is_spliced(local, peer);

        // Upstream: our own connect is exempt from redirection (the proxy's cgroup role).
        let connecting = Instant::now();
        let mut upstream = match self.connect_upstream(dst).await {
            Ok(s) => s,
            Err(e) => {
                info!(%dst, "upstream connect failed: {e}");
                // Reset the client so it fails now, the way a refused connect would.
                let _ = client.set_zero_linger();
                return finish(rec, Outcome::UpstreamConnectFailed, Some(e.to_string()));
            }
        };
        let connect_time = connecting.elapsed();
        rec.upstream_connect_us = Some(connect_time.as_micros() as u64);
        conn.upstream_connected(connect_time);
        rec.upstream_local = upstream.local_addr().ok();
        if let Some(up_local) = rec.upstream_local {
            rec.upstream_leg_spliced = self.redirect.is_spliced(up_local, dst);
        }
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);

        // Copy until both sides are done.
        let copied = copy::bidirectional(
            &mut client,
            &mut upstream,
            self.settings.idle_timeout,
            &self.abort,
            conn,
        )
        .await;
        // The kernel's view of both legs, while the sockets are still open.
        rec.tcp_app = telemetry::tcp_info::read(&client);
        rec.tcp_upstream = telemetry::tcp_info::read(&upstream);
        rec.bytes_from_client = copied.from_client;
        rec.bytes_from_upstream = copied.from_upstream;
        match copied.end {
            CopyEnd::Done => finish(rec, Outcome::Ok, None),
            CopyEnd::Idle => finish(rec, Outcome::IdleTimeout, None),
            CopyEnd::Aborted => finish(rec, Outcome::Shutdown, None),
            CopyEnd::Error(e) => finish(rec, Outcome::IoError, Some(e.to_string())),
        }
    }

    async fn connect_upstream(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        match tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.settings.connect_timeout),
            )),
        }
    }

    /// Stops accepting, lets open connections finish for up to `deadline`, then cuts the
    /// rest. Returns how many had to be cut.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.stop_accepting.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cut = self.tasks.len();
        self.abort.cancel();
        self.tasks.wait().await;
        cut
    }
}
