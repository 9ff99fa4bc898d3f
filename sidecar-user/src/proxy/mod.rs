//! The proxy. Two data paths, each reading top to bottom in its own module:
//!
//! * [`outbound`]: accept (kernel-redirected) → original destination → mesh route → upstream
//!   (plain, or an HBONE stream to the destination's sidecar: a pooled mTLS connection,
//!   policy on the verified server, then CONNECT) or policy then plain upstream → copy →
//!   record
//! * [`inbound`]: accept (tunnel port) → mTLS handshake, peer identity → HTTP/2; per CONNECT
//!   stream: address check → policy → connect the workload's own address → 200 → copy →
//!   record
//!
//! Both share one accept loop and one drain mechanism.

pub mod copy;
pub mod guard;
pub mod inbound;
pub mod limits;
pub mod log_budget;
pub mod mesh;
pub mod outbound;
pub mod resilience;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info_span, warn};

use self::{
    copy::{Copied, CopyEnd},
    inbound::Rejections,
    mesh::Mesh,
};
use crate::{
    policy::{Enforcer, rules::Request},
    redirect::{
        Redirect,
        circuits::{CircuitSink, ConnectOutcomes},
    },
    telemetry::{
        Conn, Telemetry,
        labels::{Cap, Direction, Outcome, Transition},
        record::{ConnRecord, Journal},
    },
};

/// What the data path is allowed: timeouts, the metadata address, caps, retries and circuits.
/// It serializes itself flat, under its flags' names, into `/config` of every command that
/// proxies, so a setting added here is shown without touching a command.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ProxySettings {
    /// How long connecting to the original destination (or its sidecar) may take.
    #[serde(rename = "connect_timeout_ms", serialize_with = "as_millis")]
    pub connect_timeout: Duration,
    /// A connection with no byte moving in either direction for this long is closed.
    #[serde(rename = "idle_timeout_secs", serialize_with = "as_secs")]
    pub idle_timeout: Duration,
    /// Let connections to the cloud metadata address through (refused by default).
    pub allow_metadata: bool,
    /// Caps on connections and tunnel handshakes in progress.
    #[serde(flatten)]
    pub limits: limits::Limits,
    /// Connect retries and circuit breaking.
    #[serde(flatten)]
    pub resilience: resilience::Resilience,
}

/// A duration as whole milliseconds (the unit of the flag that sets it).
fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A duration as whole seconds (the unit of the flag that sets it).
fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// The flags that make [`ProxySettings`], one help text each, shared by `sidecar run` and
/// `sidecar proxy`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ProxySettingsArgs {
    /// How long connecting to an original destination may take, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// Close a connection after this many seconds without a byte in either direction.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Let the workload reach the cloud metadata address (169.254.169.254, fd00:ec2::254);
    /// refused by default (in the kernel and in the proxy), since it hands out the node's
    /// credentials.
    #[arg(long)]
    pub allow_metadata: bool,
    #[command(flatten)]
    pub limits: limits::LimitArgs,
    #[command(flatten)]
    pub resilience: resilience::ResilienceArgs,
}

/// Flags that cannot become [`ProxySettings`].
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Limits(#[from] limits::LimitError),
    #[error(transparent)]
    Resilience(#[from] resilience::ResilienceError),
}

impl ProxySettingsArgs {
    /// Fails when a cap is 0 or a retry setting is out of range.
    pub fn resolve(self) -> Result<ProxySettings, SettingsError> {
        Ok(ProxySettings {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            allow_metadata: self.allow_metadata,
            limits: limits::Limits::resolve(self.limits)?,
            resilience: resilience::Resilience::resolve(self.resilience)?,
        })
    }
}

/// The proxy and its one drain mechanism: `stop_accepting` ends the accept loops, `go_away`
/// (once the tunnel listener is closed) sends the peers' tunnel connections GOAWAY, and
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
    /// Bounds the warning lines of inbound refusals, per reason.
    refusal_lines: log_budget::LogBudget,
    gate: limits::Gate,
    circuits: resilience::Circuits,
    stop_accepting: CancellationToken,
    /// Cancelled once the tunnel listener is closed: a peer told to go away that dials
    /// again never reaches it (its queue would be reset), only a replacement or nothing.
    go_away: CancellationToken,
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
            refusal_lines: log_budget::LogBudget::default(),
            gate: limits::Gate::new(settings.limits),
            circuits: resilience::Circuits::new(settings.connect_timeout),
            stop_accepting: CancellationToken::new(),
            go_away: CancellationToken::new(),
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
                () = self.stop_accepting.cancelled() => {
                    return self.stop_listening(listener, direction);
                }
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
            self.handle(client, peer, direction);
        }
    }

    /// Closes `listener` as the drain starts, so a replacement can bind its port at once.
    /// Connections the kernel had already queued on it are taken first: closing would reset
    /// them, and their peers dialled before they could know of the drain. Only then are the
    /// tunnel connections sent GOAWAY, so a peer that dials again after it reaches the
    /// replacement (or nothing, and retries), never a listener about to close.
    fn stop_listening(self: &Arc<Self>, listener: TcpListener, direction: Direction) {
        if let Ok(listener) = listener.into_std() {
            while let Ok((client, peer)) = listener.accept() {
                match client
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(client))
                {
                    Ok(client) => self.handle(client, peer, direction),
                    Err(e) => warn!("a connection queued at the drain was lost: {e}"),
                }
            }
        }
        if direction == Direction::Inbound {
            self.go_away.cancel();
        }
    }

    /// One accepted connection: admitted under the caps, then run in its own task.
    fn handle(self: &Arc<Self>, client: TcpStream, peer: SocketAddr, direction: Direction) {
        let slots = match self.gate.admit(direction == Direction::Inbound) {
            Ok(slots) => slots,
            Err(cap) => return self.refuse_at_cap(client, direction, cap),
        };
        let this = self.clone();
        let id = self.telemetry.connection_id();
        let span = info_span!("conn", id, dir = ?direction, client = %peer);
        self.tasks.spawn(
            async move {
                let _slot = slots.connection;
                // Boxed apart: a task is as large as the largest state it may reach, and
                // the TLS states (a rustls session each) would make every plaintext
                // connection carry their size for its whole life. Each box is bound to a
                // local before it is awaited: in `Box::pin(f()).await` the unboxed future is
                // a temporary that lives to the end of the statement, so the task would keep
                // room for it as well (2.4 KiB more per connection). The proxy's other boxed
                // awaits are written the same way.
                match direction {
                    Direction::Outbound => {
                        let mut conn = this.telemetry.accept(id, direction, peer);
                        let outbound = Box::pin(this.outbound(client, &mut conn));
                        outbound.await;
                        this.finish(conn);
                    }
                    // One HBONE connection: each of its streams is a connection of its
                    // own, with its own record.
                    Direction::Inbound => {
                        let inbound = Box::pin(this.inbound(client, peer, slots.handshake));
                        inbound.await;
                    }
                }
            }
            .instrument(span),
        );
    }

    /// The connection is over: its record goes to the metrics, the access log and the
    /// journal.
    fn finish(&self, conn: Conn) {
        let record = self.telemetry.close(conn);
        debug!(
            outcome = record.outcome.as_str(),
            up = record.bytes_from_client,
            down = record.bytes_from_upstream,
            "closed"
        );
        self.journal.push(record);
    }

    /// Resets a connection over a cap at once (the client sees the refusal, not a hang), and
    /// counts and logs it (rate-limited).
    fn refuse_at_cap(&self, client: TcpStream, direction: Direction, cap: Cap) {
        let _ = client.set_zero_linger();
        drop(client);
        self.count_refusal(direction, cap);
    }

    /// A connection refused by `cap`: counted, and logged (rate-limited).
    fn count_refusal(&self, direction: Direction, cap: Cap) {
        self.telemetry.refused_at_cap(direction, cap);
        self.gate.log_refusal(cap);
    }

    /// Whether the policy lets this connection proceed (counted, logged, and recorded in
    /// the connection's record and metrics either way).
    fn permitted(&self, conn: &mut Conn, req: &Request<'_>) -> bool {
        let Some(policy) = &self.policy else {
            return true;
        };
        let verdict = policy.check(req);
        let rec = conn.record_mut();
        self.telemetry
            .policy_decision(rec.direction, verdict.decision);
        rec.policy_decision = Some(verdict.decision);
        rec.policy_rule = Some(verdict.rule);
        verdict.allowed
    }

    /// Whether the policy's verdict on `req` waits for the peer's verified identity.
    fn depends_on_peer(&self, req: &Request<'_>) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.current().depends_on_peer(req))
    }

    /// A plain TCP connect to `dst` that gives up after `timeout`.
    async fn connect(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        match tokio::time::timeout(timeout, TcpStream::connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )),
        }
    }

    /// Connects for a connection to `dst` with `attempt` (given each try's time budget):
    /// asks `dst`'s circuit first, then tries again after each failure that `retryable`
    /// accepts, with a growing backoff, until `--connect-retries` or the connect deadline
    /// runs out. Every attempt's result feeds the circuit.
    async fn connect_upstream<T, E, Fut>(
        &self,
        dst: SocketAddr,
        conn: &mut Conn,
        mut attempt: impl FnMut(Duration) -> Fut,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, ConnectFailure<E>>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let _connecting = match self.gate.admit_connect() {
            Ok(slot) => slot,
            Err(cap) => {
                self.count_refusal(conn.record().direction, cap);
                return Err(ConnectFailure::Overloaded(cap));
            }
        };
        let settings = self.resilience_for(dst);
        let (admission, transition) = self.circuits.admit(dst, &settings, Instant::now());
        self.circuit_moved(transition);
        if let resilience::Admission::Open { failures } = admission {
            self.telemetry.circuit_fast_failed();
            return Err(ConnectFailure::CircuitOpen { failures });
        }
        let deadline = Instant::now() + self.settings.connect_timeout;
        let mut jitter = resilience::jitter_seed();
        let mut retries = 0;
        loop {
            // The attempts left share what is left of the deadline, so an unanswered one
            // leaves time for the next.
            let left = settings.connect_retries - retries + 1;
            let budget = deadline.saturating_duration_since(Instant::now()) / left;
            let result = attempt(budget).await;
            if retries > 0 {
                conn.connect_retried(result.is_ok());
            }
            let e = match result {
                Ok(t) => {
                    self.circuit_moved(self.circuits.succeeded(dst));
                    return Ok(t);
                }
                Err(e) => e,
            };
            self.circuit_moved(self.circuits.failed(dst, &settings, Instant::now()));
            jitter = jitter.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
            let wait = settings.backoff(retries + 1, jitter);
            let out_of_time = Instant::now() + wait >= deadline;
            if retries == settings.connect_retries || !retryable(&e) || out_of_time {
                return Err(ConnectFailure::Failed(e));
            }
            // The circuit opened on this very failure: no point trying again now.
            if let (resilience::Admission::Open { failures }, _) =
                self.circuits.admit(dst, &settings, Instant::now())
            {
                self.telemetry.circuit_fast_failed();
                return Err(ConnectFailure::CircuitOpen { failures });
            }
            retries += 1;
            debug!(%dst, retry = retries, "connect failed, retrying in {wait:?}");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.abort.cancelled() => return Err(ConnectFailure::Failed(e)),
            }
        }
    }

    /// Open circuits are refused at `connect()` in `sink` too from now on (eBPF mode), and a
    /// task ends their open periods there. Needs the runtime entered.
    pub fn refuse_open_circuits_in(self: &Arc<Self>, sink: Arc<dyn CircuitSink>) {
        self.circuits.refuse_in(sink);
        let proxy = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CIRCUIT_EXPIRY_POLL).await;
                let Some(proxy) = proxy.upgrade() else { return };
                proxy.circuits.expire(Instant::now());
            }
        });
    }

    /// Retries and circuit settings for `dst`: the command line's, under the policy file's
    /// `[[destination]]` table for it if there is one.
    fn resilience_for(&self, dst: SocketAddr) -> resilience::Resilience {
        let base = self.settings.resilience;
        match &self.policy {
            Some(p) => p.current().destination(dst).map_or(base, |d| base.under(d)),
            None => base,
        }
    }

    /// How many connections may be open to `dst` at once (the policy file may say).
    fn destination_cap(&self, dst: SocketAddr) -> usize {
        let base = self.settings.limits.max_connections_per_destination;
        let policy = self.policy.as_ref().map(|p| p.current());
        policy
            .and_then(|p| p.destination(dst).and_then(|d| d.max_connections))
            .unwrap_or(base)
    }

    fn circuit_moved(&self, transition: Option<Transition>) {
        if let Some(t) = transition {
            self.telemetry.circuit(t, self.circuits.open_count());
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
            self.close_pool().await;
            self.summarize_refusal_lines();
            return 0;
        }
        let cut = self.tasks.len();
        // Normally cancelled as the tunnel listener closed; never left for the cut streams'
        // connections to wait on.
        self.go_away.cancel();
        self.abort.cancel();
        self.tasks.wait().await;
        self.close_pool().await;
        self.summarize_refusal_lines();
        cut
    }

    /// Sums up the refusals whose lines were held back and not yet summed up.
    fn summarize_refusal_lines(&self) {
        for (reason, n) in self.refusal_lines.take_suppressed() {
            warn!(
                reason,
                "{n} more inbound refusal(s) for {reason} were not logged one by one \
                 (each is counted in the report's inbound_rejections)"
            );
        }
    }

    /// Closes the pooled tunnel connections, and waits (a few seconds at most) until each has
    /// sent what its streams left behind and said goodbye to its peer.
    async fn close_pool(&self) {
        if let Some(mesh) = &self.mesh {
            mesh.pool.close().await;
        }
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

/// How often open periods are checked for their end in the kernel (a circuit opens for
/// 1 s by default: this is its precision).
const CIRCUIT_EXPIRY_POLL: Duration = Duration::from_millis(25);

impl ConnectOutcomes for Proxy {
    /// A pass-through connect the kernel reported: it counts for its destination's circuit
    /// like one of the proxy's own.
    fn connect_outcome(&self, dst: SocketAddr, connected: bool) {
        let transition = if connected {
            self.circuits.succeeded(dst)
        } else {
            let settings = self.resilience_for(dst);
            self.circuits.failed(dst, &settings, Instant::now())
        };
        self.circuit_moved(transition);
    }
}

/// Why [`Proxy::connect_upstream`] gave up.
enum ConnectFailure<E> {
    /// The destination's circuit is open: no attempt was made.
    CircuitOpen { failures: u32 },
    /// Too many connects in progress: no attempt was made.
    Overloaded(Cap),
    /// The last attempt's error.
    Failed(E),
}

impl<E: std::fmt::Display> ConnectFailure<E> {
    /// Fails `conn` with this: `circuit_open`, or `outcome` with the error.
    fn fail(self, conn: &mut Conn, outcome: Outcome, dst: SocketAddr) {
        match self {
            Self::CircuitOpen { failures } => fail(
                conn,
                Outcome::CircuitOpen,
                format!("the circuit of {dst} is open after {failures} failed connects"),
            ),
            Self::Overloaded(cap) => fail(
                conn,
                Outcome::Overloaded,
                format!(
                    "too many connects in progress (--{})",
                    cap.as_str().replace('_', "-")
                ),
            ),
            Self::Failed(e) => fail(conn, outcome, e),
        }
    }
}

/// Ends `conn` with `outcome` and why.
fn fail(conn: &mut Conn, outcome: Outcome, error: impl ToString) {
    let record = conn.record_mut();
    record.outcome = outcome;
    record.error = Some(error.to_string());
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: ProxySettingsArgs,
    }

    /// `/config` shows every setting under the name of the flag that sets it, so a flag
    /// added to the group (and its field here) is shown by every command without more code.
    #[test]
    fn settings_show_in_config_under_their_flags_names() {
        let settings = Cli::parse_from(["t"]).settings.resolve().unwrap();
        let shown = serde_json::to_value(settings).unwrap();
        let flags: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
            .collect();
        let keys: Vec<&String> = shown.as_object().unwrap().keys().collect();
        for flag in &flags {
            assert!(keys.contains(&flag), "--{flag} is not shown in /config");
        }
        for key in keys {
            // Derived, not set by a flag of its own: explained in `Limits`.
            if key != "passthrough_max_connections_per_destination" {
                assert!(flags.contains(key), "/config shows {key}, which is no flag");
            }
        }
        assert_eq!(shown["connect_timeout_ms"], 5000);
        assert_eq!(shown["idle_timeout_secs"], 300);
        assert_eq!(shown["allow_metadata"], false);
    }
}
