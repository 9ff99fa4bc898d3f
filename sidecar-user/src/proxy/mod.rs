//! The proxy. Two data paths, each reading top to bottom in its own module:
//!
//! * [`outbound`]: accept (kernel-redirected) → original destination → policy → mesh route →
//!   upstream (plain, or mTLS tunnel to the destination's sidecar) → copy → record
//! * [`inbound`]: accept (tunnel port) → mTLS handshake, peer identity → preamble → policy →
//!   connect the local app → copy → record
//!
//! Both share one accept loop and one drain mechanism.

pub mod copy;
pub mod guard;
pub mod inbound;
pub mod mesh;
pub mod outbound;
pub mod record;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info_span, warn};

use self::{
    copy::{Copied, CopyEnd},
    mesh::Mesh,
    record::{ConnRecord, Direction, Journal, Outcome, Rejections},
};
use crate::{
    policy::{
        Enforcer,
        rules::{Request, Way},
    },
    redirect::Redirect,
    telemetry::Telemetry,
    tls::identity::SpiffeId,
};

/// Timeouts of the data path.
#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    /// How long connecting to the original destination (or its sidecar) may take.
    pub connect_timeout: Duration,
    /// A connection with no byte moving in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Let connections to the cloud metadata address through (refused by default).
    pub allow_metadata: bool,
}

/// The proxy and its one drain mechanism: `stop_accepting` ends the accept loops,
/// `abort` cuts the connections still open when the drain deadline passes.
pub struct Proxy {
    settings: ProxySettings,
    redirect: Arc<dyn Redirect>,
    mesh: Option<Mesh>,
    journal: Arc<Journal>,
    telemetry: Arc<Telemetry>,
    /// Authorization policy; `None` allows everything.
    policy: Option<Arc<Enforcer>>,
    rejections: Rejections,
    next_id: AtomicU64,
    stop_accepting: CancellationToken,
    abort: CancellationToken,
    tasks: TaskTracker,
}

impl Proxy {
    pub fn new(
        settings: ProxySettings,
        redirect: Arc<dyn Redirect>,
        mesh: Option<Mesh>,
        journal: Arc<Journal>,
        telemetry: Arc<Telemetry>,
        policy: Option<Arc<Enforcer>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            redirect,
            mesh,
            journal,
            telemetry,
            policy,
            rejections: Rejections::default(),
            next_id: AtomicU64::new(1),
            stop_accepting: CancellationToken::new(),
            abort: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Connections the inbound side refused, by reason.
    pub fn rejections(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.rejections.snapshot()
    }

    /// Accepts until [`Proxy::drain`] starts; each connection runs in its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, direction: Direction) {
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
            let span = info_span!("conn", id, dir = ?direction, client = %peer);
            self.tasks.spawn(
                async move {
                    let started = Instant::now();
                    let conn = this.telemetry.accept(id, direction, peer);
                    let mut record = ConnRecord::new(id, direction, peer);
                    match direction {
                        Direction::Outbound => this.outbound(client, &mut record, &conn).await,
                        Direction::Inbound => this.inbound(client, &mut record, &conn).await,
                    }
                    record.duration_ms = started.elapsed().as_millis() as u64;
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

    /// Whether the policy lets this connection proceed (counted, logged, and recorded in
    /// the connection's record and metrics either way).
    fn permitted(
        &self,
        rec: &mut ConnRecord,
        way: Way,
        source: Option<&SpiffeId>,
        dst: SocketAddr,
    ) -> bool {
        let Some(policy) = &self.policy else {
            return true;
        };
        let verdict = policy.check(&Request { way, source, dst });
        self.telemetry
            .policy_decision(rec.direction, verdict.outcome.as_str());
        rec.policy_decision = Some(verdict.outcome.as_str());
        rec.policy_rule = Some(verdict.rule);
        verdict.allowed
    }

    async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, TcpStream::connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
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

/// Copies the byte counts and the way the copy ended into the record.
fn finish_copy(record: &mut ConnRecord, copied: Copied) {
    record.bytes_from_client = copied.from_client;
    record.bytes_from_upstream = copied.from_upstream;
    (record.outcome, record.error) = match copied.end {
        CopyEnd::Done => (Outcome::Ok, None),
        CopyEnd::Idle => (Outcome::IdleTimeout, None),
        CopyEnd::Aborted => (Outcome::Shutdown, None),
        CopyEnd::Error(e) => (Outcome::IoError, Some(e.to_string())),
    };
}

fn fail(record: &mut ConnRecord, outcome: Outcome, error: impl ToString) {
    record.outcome = outcome;
    record.error = Some(error.to_string());
}
