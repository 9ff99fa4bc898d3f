//! What the sidecar tells operators about the connections it handles: Prometheus
//! [`metrics`], the JSON [`access_log`], the kernel's TCP view ([`tcp_info`]), the live
//! connection table and readiness. The admin server (`crate::admin`) serves all of it.
//!
//! A proxied connection has one handle, the [`Conn`] that [`Telemetry::accept`] returns when
//! it arrives: it meters bytes as they move, and each fact the proxy learns (destination,
//! tunnel, retries, upstream connected) is told to it once, landing in the live table, the
//! metrics and the connection's [`ConnRecord`] together. [`Telemetry::close`] takes the handle
//! back and returns the finished record for the journal. Everything else — aggregation, eBPF
//! counters, rendering — happens on the admin thread when someone asks.

pub mod access_log;
pub mod labels;
pub mod metrics;
pub mod process;
pub mod record;
pub mod tcp_info;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus::{Histogram, IntCounter, IntGauge};
use serde::Serialize;

use self::{
    access_log::AccessRecord,
    labels::{Attempt, Cap, Decision, Direction, Mode, Path, Protection, Transition, Transport},
    metrics::Metrics,
    record::ConnRecord,
};

/// Told about every chunk as it is forwarded, so live views and byte counters move while a
/// long connection is still open.
pub trait Meter {
    fn client_to_upstream(&self, n: u64);
    fn upstream_to_client(&self, n: u64);
}

/// Where the eBPF counters come from (the eBPF loader's map reader; other interception
/// modes can supply their own).
pub trait CounterSource: Send + Sync {
    /// Every counter by name, summed over CPUs.
    fn counters(&self) -> BTreeMap<&'static str, u64>;
}

/// Open connections that have no proxy socket (kernel pass-through), listed by whoever can
/// see them (the eBPF loader's live table and the kernel's socket table).
pub trait OpenConnections: Send + Sync {
    fn open(&self) -> Vec<LiveRow>;
}

/// What `/status` reports about mTLS and policy, read when asked (credentials rotate and
/// policies reload while the sidecar runs).
pub trait SecuritySource: Send + Sync {
    fn security(&self) -> Security;
}

/// The connection security in force.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Security {
    pub mode: Protection,
    pub tls: Option<TlsStatus>,
    pub policy: Option<PolicyStatus>,
}

/// The workload credentials in force.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TlsStatus {
    pub identity: String,
    pub certificate: String,
    pub bundle: String,
    /// Seconds since the epoch.
    pub not_after_unix: u64,
    pub mesh_cidrs: Vec<String>,
    /// Where tunnels are accepted (`None`: client-only).
    pub inbound: Option<String>,
}

/// The policy in force.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PolicyStatus {
    pub file: String,
    pub rules: usize,
    pub dry_run: bool,
    /// The `[[destination]]` resilience settings in force, as the file names them.
    #[serde(default)]
    pub destinations: Vec<serde_json::Value>,
    /// 1 for the policy loaded at start, +1 per successful reload.
    pub generation: u64,
    /// When the policy in force was loaded, seconds since the epoch.
    pub loaded_unix: u64,
    pub reload_errors: u64,
}

impl Security {
    /// No `--tls-dir`, no `--policy`.
    pub fn plain() -> Self {
        Self {
            mode: Protection::Plain,
            tls: None,
            policy: None,
        }
    }
}

/// Seconds since the epoch (0 for times before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// For interception that keeps no counters of its own in the kernel (iptables mode; a pod
/// sidecar's are the node agent's, but for the policy refusals the agent streams to it).
pub struct NoKernelCounters;

impl CounterSource for NoKernelCounters {
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::new()
    }
}

/// How telemetry behaves (from `sidecar run`'s options).
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetrySettings {
    /// Emit one access-log event per closed connection.
    pub access_log: bool,
    /// Distinct destinations that get their own metric series (0 = none).
    pub destination_labels: usize,
    /// What the sidecar was started to require of its peers: `/status` says so from its
    /// first answer, before the credentials and policy are loaded and in force.
    pub protection: Protection,
}

/// What is intercepting, for `/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct InterceptionInfo {
    pub mode: Mode,
    pub sockmap: bool,
    pub proxy_port: u16,
    pub cgroup: String,
}

/// The individual readiness checks behind `/readyz`.
#[derive(Debug, Default)]
pub struct Readiness {
    pub interception_attached: AtomicBool,
    pub listeners_serving: AtomicBool,
    pub draining: AtomicBool,
}

#[derive(Debug, Serialize)]
pub struct ReadyCheck {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Shared by the proxy (writes) and the admin server (reads).
pub struct Telemetry {
    settings: TelemetrySettings,
    pub metrics: Metrics,
    pub readiness: Readiness,
    started: Instant,
    /// Exec to the first time every readiness check passed (unset until then).
    startup: OnceLock<Duration>,
    live: Mutex<BTreeMap<u64, Arc<LiveConn>>>,
    kernel: Mutex<Option<Arc<dyn CounterSource>>>,
    interception: Mutex<Option<InterceptionInfo>>,
    security: Mutex<Option<Arc<dyn SecuritySource>>>,
    passing_through: Mutex<Option<Arc<dyn OpenConnections>>>,
    /// The outbound HBONE pool, for `/status` and `/connections` (`None`: no mTLS).
    pool: Mutex<Option<Arc<crate::tunnel::pool::Pool>>>,
    /// The end of the workload certificate's validity (`None`: mTLS off).
    certificate_not_after: Mutex<Option<SystemTime>>,
    /// Cached label children per direction (outbound, inbound) of proxied connections, so
    /// the data path never looks labels up.
    handles: [DirectionHandles; 2],
    /// The same for outbound pass-through connections (recorded by the kernel).
    passthrough: PassthroughHandles,
    /// Connection ids, shared by the proxy and the kernel's pass-through records so every
    /// connection of a run has one id.
    next_id: AtomicU64,
}

struct DirectionHandles {
    opened_plain: IntCounter,
    opened_mtls: IntCounter,
    tls_handshake: Histogram,
    handshakes_full: IntCounter,
    handshakes_resumed: IntCounter,
    handshakes_avoided: IntCounter,
    hbone_connections: IntGauge,
    hbone_streams: Histogram,
    active: IntGauge,
    sent: IntCounter,
    received: IntCounter,
    upstream_connect: Histogram,
    proxy_setup: Histogram,
    duration: Histogram,
}

impl DirectionHandles {
    fn new(m: &Metrics, d: Direction) -> Self {
        let d = d.as_str();
        let p = Path::Proxy.as_str();
        let [full, resumed] = metrics::HANDSHAKE_KINDS;
        Self {
            opened_plain: m
                .opened
                .with_label_values(&[d, Transport::Plain.as_str(), p]),
            opened_mtls: m
                .opened
                .with_label_values(&[d, Transport::Mtls.as_str(), p]),
            tls_handshake: m.tls_handshake.with_label_values(&[d]),
            handshakes_full: m.tls_handshakes.with_label_values(&[d, full]),
            handshakes_resumed: m.tls_handshakes.with_label_values(&[d, resumed]),
            handshakes_avoided: m.hbone_handshakes_avoided.with_label_values(&[d]),
            hbone_connections: m.hbone_connections.with_label_values(&[d]),
            hbone_streams: m.hbone_streams_per_connection.with_label_values(&[d]),
            active: m.active.with_label_values(&[d]),
            sent: m.sent_bytes.with_label_values(&[d, p]),
            received: m.received_bytes.with_label_values(&[d, p]),
            upstream_connect: m.upstream_connect.with_label_values(&[d]),
            proxy_setup: m.proxy_setup.with_label_values(&[d]),
            duration: m.duration.with_label_values(&[d, p]),
        }
    }
}

struct PassthroughHandles {
    opened: IntCounter,
    sent: IntCounter,
    received: IntCounter,
    duration: Histogram,
}

impl PassthroughHandles {
    fn new(m: &Metrics) -> Self {
        let d = Direction::Outbound.as_str();
        let p = Path::Passthrough.as_str();
        Self {
            opened: m
                .opened
                .with_label_values(&[d, Transport::Plain.as_str(), p]),
            sent: m.sent_bytes.with_label_values(&[d, p]),
            received: m.received_bytes.with_label_values(&[d, p]),
            duration: m.duration.with_label_values(&[d, p]),
        }
    }
}

/// One open connection as `/connections` shows it. Bytes are updated as they move.
#[derive(Debug)]
pub struct LiveConn {
    pub id: u64,
    pub direction: Direction,
    /// Set once known: when the upstream leg (plain or tunnel) is up.
    pub transport: OnceLock<Transport>,
    pub client: SocketAddr,
    pub started: Instant,
    pub started_wall: SystemTime,
    pub original_dst: OnceLock<SocketAddr>,
    pub upstream_ready: AtomicBool,
    /// Connect attempts after the first so far.
    pub connect_retries: AtomicU32,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Filled by mTLS once the handshake has verified them.
    pub src_identity: OnceLock<String>,
    pub dst_identity: OnceLock<String>,
}

/// A snapshot row of `/connections`.
#[derive(Debug, Serialize)]
pub struct LiveRow {
    /// 0 for a pass-through connection: it gets its id when the kernel reports its close.
    pub id: u64,
    pub path: Path,
    pub age_ms: u64,
    pub started: String,
    pub direction: Direction,
    #[serde(rename = "mode")]
    pub transport: Transport,
    pub state: &'static str,
    pub src: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    pub connect_retries: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
}

impl Telemetry {
    pub fn new(settings: TelemetrySettings) -> Arc<Self> {
        let metrics = Metrics::new(settings.destination_labels);
        let handles = Direction::ALL.map(|d| DirectionHandles::new(&metrics, d));
        let passthrough = PassthroughHandles::new(&metrics);
        Arc::new(Self {
            settings,
            metrics,
            readiness: Readiness::default(),
            started: Instant::now(),
            startup: OnceLock::new(),
            live: Mutex::new(BTreeMap::new()),
            kernel: Mutex::new(None),
            interception: Mutex::new(None),
            security: Mutex::new(None),
            passing_through: Mutex::new(None),
            pool: Mutex::new(None),
            certificate_not_after: Mutex::new(None),
            handles,
            passthrough,
            next_id: AtomicU64::new(1),
        })
    }

    /// A fresh connection id (never 0).
    pub fn connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn settings(&self) -> TelemetrySettings {
        self.settings
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Interception is attached: counters come from `source` from now on.
    pub fn attached(&self, info: InterceptionInfo, source: Arc<dyn CounterSource>) {
        *lock(&self.interception) = Some(info);
        *lock(&self.kernel) = Some(source);
        self.readiness
            .interception_attached
            .store(true, Ordering::SeqCst);
        self.metrics.interception_attached.set(1);
        self.update_ready();
    }

    /// Interception is being removed: keeps the last counters, reports not attached.
    pub fn detaching(&self) {
        self.refresh_kernel_counters();
        *lock(&self.kernel) = None;
        self.readiness
            .interception_attached
            .store(false, Ordering::SeqCst);
        self.metrics.interception_attached.set(0);
        self.update_ready();
    }

    pub fn listeners_serving(&self) {
        self.readiness
            .listeners_serving
            .store(true, Ordering::SeqCst);
        self.update_ready();
    }

    pub fn draining(&self) {
        self.readiness.draining.store(true, Ordering::SeqCst);
        self.update_ready();
    }

    fn update_ready(&self) {
        let ready = self.is_ready();
        self.metrics.ready.set(i64::from(ready));
        if ready {
            // From exec, so loading the binary and parsing options count too; from when
            // telemetry was set up if /proc cannot say.
            let took = self
                .startup
                .get_or_init(|| process::since_exec().unwrap_or_else(|| self.started.elapsed()));
            self.metrics.startup.set(took.as_secs_f64());
        }
    }

    /// Exec to ready, once the sidecar has been ready (later readiness changes keep it).
    pub fn startup(&self) -> Option<Duration> {
        self.startup.get().copied()
    }

    pub fn interception(&self) -> Option<InterceptionInfo> {
        lock(&self.interception).clone()
    }

    /// mTLS and policy are in force: `/status` reads them from `source` from now on.
    pub fn secured(&self, source: Arc<dyn SecuritySource>) {
        *lock(&self.security) = Some(source);
    }

    /// The connection security in force; until [`Telemetry::secured`], the protection the
    /// sidecar was started with (never `plain` for a sidecar started with `--tls-dir`).
    pub fn security(&self) -> Security {
        let source = lock(&self.security).clone();
        source.map_or_else(
            || Security {
                mode: self.settings.protection,
                ..Security::plain()
            },
            |s| s.security(),
        )
    }

    pub fn ready_checks(&self) -> Vec<ReadyCheck> {
        let r = &self.readiness;
        let attached = r.interception_attached.load(Ordering::SeqCst);
        let serving = r.listeners_serving.load(Ordering::SeqCst);
        let draining = r.draining.load(Ordering::SeqCst);
        vec![
            ReadyCheck {
                name: "interception",
                ok: attached,
                detail: if attached {
                    "eBPF programs attached"
                } else {
                    "eBPF programs not attached"
                }
                .into(),
            },
            ReadyCheck {
                name: "listeners",
                ok: serving && !draining,
                detail: match (serving, draining) {
                    (_, true) => "draining: no longer accepting",
                    (true, false) => "proxy listeners bound and accepting",
                    (false, false) => "proxy listeners not accepting yet",
                }
                .into(),
            },
            self.certificate_check(SystemTime::now()),
        ]
    }

    /// Peers refuse an expired certificate in every handshake, so a sidecar whose
    /// certificate expired (and was not rotated) is not ready: every tunnel would fail.
    /// Serving the last good set after a refused rotation is fine while it is valid.
    fn certificate_check(&self, now: SystemTime) -> ReadyCheck {
        let check = |ok, detail: String| ReadyCheck {
            name: "certificates",
            ok,
            detail,
        };
        let Some(not_after) = *lock(&self.certificate_not_after) else {
            return check(true, "not required: mTLS off (--tls-dir not given)".into());
        };
        if let Ok(ago) = now.duration_since(not_after) {
            return check(
                false,
                format!(
                    "the workload certificate expired {}s ago (not after {} unix time) and no \
                     valid replacement was loaded: peers refuse every tunnel; rotate it",
                    ago.as_secs(),
                    unix_secs(not_after)
                ),
            );
        }
        let stale = self.metrics.certificates_stale.get() > 0;
        check(
            true,
            if stale {
                "serving the last good certificates: the files on disk are missing or \
                 invalid (see the log)"
            } else {
                "workload certificates loaded"
            }
            .into(),
        )
    }

    pub fn is_ready(&self) -> bool {
        self.ready_checks().iter().all(|c| c.ok)
    }

    /// Reads the kernel counters (if attached), advances the metrics, and returns them.
    pub fn refresh_kernel_counters(&self) -> Option<BTreeMap<&'static str, u64>> {
        let source = lock(&self.kernel).clone()?;
        let counters = source.counters();
        self.metrics.update_ebpf(&counters);
        Some(counters)
    }

    /// The `/metrics` body.
    pub fn render_metrics(&self) -> String {
        self.refresh_kernel_counters();
        let dropped = access_log::dropped();
        let counted = self.metrics.access_log_dropped.get();
        if dropped > counted {
            self.metrics.access_log_dropped.inc_by(dropped - counted);
        }
        // Readiness also changes with the clock (a certificate expiring), not only on events.
        self.update_ready();
        self.metrics.render()
    }

    fn handles(&self, d: Direction) -> &DirectionHandles {
        &self.handles[d as usize]
    }

    /// A new connection from `client`: listed as live, metered from now on, and its record
    /// started. It is counted as opened once its mode is known ([`Conn::established`]), or at
    /// close if it never got that far.
    pub fn accept(self: &Arc<Self>, id: u64, direction: Direction, client: SocketAddr) -> Conn {
        let live = Arc::new(LiveConn {
            id,
            direction,
            transport: OnceLock::new(),
            client,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            original_dst: OnceLock::new(),
            upstream_ready: AtomicBool::new(false),
            connect_retries: AtomicU32::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            src_identity: OnceLock::new(),
            dst_identity: OnceLock::new(),
        });
        self.handles(direction).active.inc();
        lock(&self.live).insert(id, live.clone());
        Conn {
            record: ConnRecord::new(id, direction, client),
            listed: Listed {
                live,
                telemetry: self.clone(),
            },
        }
    }

    /// The connection is over: close counters, histograms, TCP stats, the access log. Returns
    /// its finished record (its duration measured from accept, like the histogram's), for
    /// the journal.
    pub fn close(&self, mut conn: Conn) -> ConnRecord {
        let duration = conn.live().started.elapsed();
        let started_wall = conn.live().started_wall;
        // A connection that failed before its mode was known still counts as opened.
        conn.established(conn.record.transport);
        let Conn { mut record, listed } = conn;
        record.duration_ms = duration.as_millis() as u64;
        // Out of the active gauge before it counts as closed, so no scrape sees a connection
        // both closed and active (the VM matrix caught that window under TCG).
        drop(listed);
        self.handles(record.direction)
            .duration
            .observe(duration.as_secs_f64());
        self.finish(&record, started_wall, duration);
        record
    }

    /// A pass-through connection the kernel reported closed: the same series and access log
    /// as a proxied one, with `path="passthrough"`.
    pub fn passed_through(&self, rec: &ConnRecord, started_wall: SystemTime, duration: Duration) {
        let h = &self.passthrough;
        h.opened.inc();
        h.sent.inc_by(rec.bytes_from_client);
        h.received.inc_by(rec.bytes_from_upstream);
        h.duration.observe(duration.as_secs_f64());
        self.finish(rec, started_wall, duration);
    }

    /// What every closed connection updates, whichever path it took.
    fn finish(&self, rec: &ConnRecord, started_wall: SystemTime, duration: Duration) {
        let m = &self.metrics;
        let d = rec.direction.as_str();
        if rec.app_leg_spliced {
            m.fast_path.with_label_values(&[d, "app"]).inc();
        }
        if rec.upstream_leg_spliced {
            m.fast_path.with_label_values(&[d, "upstream"]).inc();
        }
        for (leg, stats) in [("app", rec.tcp_app), ("upstream", rec.tcp_upstream)] {
            let Some(s) = stats else { continue };
            m.tcp_srtt
                .with_label_values(&[leg])
                .observe(f64::from(s.srtt_us) / 1e6);
            m.tcp_retransmits
                .with_label_values(&[leg])
                .inc_by(u64::from(s.retransmits));
            if let Some(rate) = s.delivery_rate_bytes_per_sec {
                m.tcp_delivery_rate
                    .with_label_values(&[leg])
                    .observe(rate as f64);
            }
        }
        if let Some(dst) = rec.original_dst {
            m.count_destination(dst, rec.bytes_from_client, rec.bytes_from_upstream);
        }
        // Counted as closed last: a reader that has seen `closed_total` reach N and then
        // scrapes again sees every other series of those N connections complete (a single
        // scrape is not a snapshot; the VM matrix caught a histogram one behind the count).
        if rec.outcome.is_setup_failure() {
            m.failed.with_label_values(&[d, rec.outcome.as_str()]).inc();
        }
        m.closed
            .with_label_values(&[d, rec.outcome.as_str(), rec.path.as_str()])
            .inc();
        if self.settings.access_log {
            AccessRecord::new(rec, started_wall, duration).emit();
        }
    }

    /// One policy decision (`allow`, `deny`, `audit`, `would_deny`) on a connection.
    /// A circuit changed state; `open` circuits are open or half-open now.
    pub fn circuit(&self, transition: Transition, open: usize) {
        let m = &self.metrics;
        m.circuit_transitions
            .with_label_values(&[transition.as_str()])
            .inc();
        m.circuits_open.set(open as i64);
    }

    /// A connection failed at once: its destination's circuit is open.
    pub fn circuit_fast_failed(&self) {
        self.metrics.circuit_fast_failed.inc();
    }

    /// A connection was refused: `cap` was reached.
    pub fn refused_at_cap(&self, direction: Direction, cap: Cap) {
        self.metrics
            .refused_at_cap
            .with_label_values(&[direction.as_str(), cap.as_str()])
            .inc();
    }

    pub fn policy_decision(&self, direction: Direction, decision: Decision) {
        self.metrics
            .policy_decisions
            .with_label_values(&[direction.as_str(), decision.as_str()])
            .inc();
    }

    /// An HBONE connection opened (`true`) or closed.
    pub fn hbone_connection(&self, direction: Direction, opened: bool) {
        let gauge = &self.handles(direction).hbone_connections;
        if opened { gauge.inc() } else { gauge.dec() }
    }

    /// An HBONE connection that closed had carried `streams` streams.
    pub fn hbone_carried(&self, direction: Direction, streams: u64) {
        self.handles(direction)
            .hbone_streams
            .observe(streams as f64);
    }

    /// An inbound HBONE connection was sent away for `reason` (one of
    /// `tunnel::server::VIOLATIONS`).
    pub fn hbone_violation(&self, reason: &str) {
        self.metrics
            .hbone_violations
            .with_label_values(&[reason])
            .inc();
    }

    /// An outbound tunnel was not used, for `reason` (one of `tunnel::FAILURE_REASONS`).
    pub fn tunnel_failed(&self, reason: &str) {
        self.metrics
            .tunnel_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// The certificate files changed and were refused: the last good set stays in force.
    pub fn certificates_refused(&self) {
        self.metrics.certificate_reload_errors.inc();
        self.metrics.certificates_stale.set(1);
    }

    /// A set of workload credentials is in force (at start and after each rotation).
    pub fn certificates(&self, not_after: SystemTime) {
        *lock(&self.certificate_not_after) = Some(not_after);
        let m = &self.metrics;
        m.certificates_loaded.set(1);
        m.certificates_stale.set(0);
        m.certificate_expiry.reset();
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        m.certificate_expiry
            .with_label_values(&["workload"])
            .set(secs);
        self.update_ready();
    }

    /// Open pass-through connections are listed from `source` from now on.
    pub fn passing_through(&self, source: Arc<dyn OpenConnections>) {
        *lock(&self.passing_through) = Some(source);
    }

    /// The outbound HBONE pool, shown by `/status` and `/connections` from now on.
    pub fn pooling(&self, pool: Arc<crate::tunnel::pool::Pool>) {
        *lock(&self.pool) = Some(pool);
    }

    /// The pooled HBONE connections open now (none without mTLS).
    pub fn tunnel_pool(&self) -> Vec<crate::tunnel::pool::PoolRow> {
        lock(&self.pool)
            .as_ref()
            .map_or_else(Vec::new, |p| p.rows())
    }

    /// The live table: proxied connections oldest first, then pass-through ones.
    pub fn live_connections(&self) -> Vec<LiveRow> {
        let conns: Vec<Arc<LiveConn>> = lock(&self.live).values().cloned().collect();
        let passing = lock(&self.passing_through).clone();
        let mut rows: Vec<LiveRow> = conns
            .iter()
            .map(|c| LiveRow {
                id: c.id,
                path: Path::Proxy,
                age_ms: c.started.elapsed().as_millis() as u64,
                started: access_log::rfc3339(c.started_wall),
                direction: c.direction,
                transport: c.transport.get().copied().unwrap_or(Transport::Plain),
                state: if c.upstream_ready.load(Ordering::Relaxed) {
                    "open"
                } else {
                    "connecting"
                },
                src: c.client,
                original_dst: c.original_dst.get().copied(),
                connect_retries: c.connect_retries.load(Ordering::Relaxed),
                bytes_sent: c.sent.load(Ordering::Relaxed),
                bytes_received: c.received.load(Ordering::Relaxed),
                src_identity: c.src_identity.get().cloned(),
                dst_identity: c.dst_identity.get().cloned(),
            })
            .collect();
        if let Some(source) = passing {
            rows.extend(source.open());
        }
        rows
    }
}

/// The outbound pool's connections and streams, counted in the metrics.
pub struct PoolTelemetry(pub Arc<Telemetry>);

impl crate::tunnel::pool::PoolEvents for PoolTelemetry {
    fn connection(&self, opened: bool) {
        self.0.hbone_connection(Direction::Outbound, opened);
    }

    fn carried(&self, streams: u64) {
        self.0.hbone_carried(Direction::Outbound, streams);
    }
}

/// The proxy's handle on one connection: its place in the live table and the record it
/// will close with. Each fact goes through one method here, which writes it to both (and to
/// the metrics), so the live view and the final record cannot disagree. Facts only the final
/// record keeps (bytes, outcome, TCP stats, policy decision, …) go through [`Conn::record_mut`].
/// Dropping it (also on panic) takes the connection out of the live table and the active gauge.
pub struct Conn {
    record: ConnRecord,
    listed: Listed,
}

/// A connection's row in the live table and its place in the active gauge, given up when
/// dropped. Apart from [`Conn`]'s record so [`Telemetry::close`] can end the listing (before
/// the connection counts as closed) and still keep the record.
struct Listed {
    live: Arc<LiveConn>,
    telemetry: Arc<Telemetry>,
}

impl Conn {
    /// The record so far.
    pub fn record(&self) -> &ConnRecord {
        &self.record
    }

    /// For the facts only the finished record holds; the ones the live table shows too go
    /// through this handle's other methods.
    pub fn record_mut(&mut self) -> &mut ConnRecord {
        &mut self.record
    }

    fn live(&self) -> &LiveConn {
        &self.listed.live
    }

    fn handles(&self) -> &DirectionHandles {
        self.listed.telemetry.handles(self.live().direction)
    }

    /// The original destination is known.
    pub fn destination(&mut self, dst: SocketAddr) {
        self.record.original_dst = Some(dst);
        let _ = self.live().original_dst.set(dst);
    }

    /// The connection's transport is settled (plain upstream, or an mTLS tunnel): recorded and
    /// counted as opened, once.
    pub fn established(&mut self, transport: Transport) {
        if self.live().transport.set(transport).is_ok() {
            self.record.transport = transport;
            let h = self.handles();
            match transport {
                Transport::Plain => h.opened_plain.inc(),
                Transport::Mtls => h.opened_mtls.inc(),
            }
        }
    }

    /// The connection rides an HBONE stream between these verified identities: the
    /// connection's transport is mTLS. `handshake` is how long the tunnel's dial and TLS
    /// handshake took and whether TLS resumed an earlier session, or `None` when the stream
    /// rode a connection already open (no handshake at all).
    pub fn tunnelled(&mut self, handshake: Option<(Duration, bool)>, src: String, dst: String) {
        let h = self.handles();
        match handshake {
            Some((took, resumed)) => {
                h.tls_handshake.observe(took.as_secs_f64());
                match resumed {
                    true => h.handshakes_resumed.inc(),
                    false => h.handshakes_full.inc(),
                }
                self.record.tls_resumed = Some(resumed);
            }
            None => h.handshakes_avoided.inc(),
        }
        self.record.tunnel_reused = Some(handshake.is_none());
        let _ = self.live().src_identity.set(src.clone());
        let _ = self.live().dst_identity.set(dst.clone());
        self.record.src_identity = Some(src);
        self.record.dst_identity = Some(dst);
        self.established(Transport::Mtls);
    }

    /// Another connect attempt (after a failed one) connected or failed.
    pub fn connect_retried(&mut self, connected: bool) {
        self.record.connect_retries += 1;
        self.live().connect_retries.fetch_add(1, Ordering::Relaxed);
        let d = self.live().direction.as_str();
        let outcome = if connected {
            Attempt::Connected
        } else {
            Attempt::Failed
        };
        self.listed
            .telemetry
            .metrics
            .connect_retries
            .with_label_values(&[d, outcome.as_str()])
            .inc();
    }

    /// The destination (or its sidecar, through the tunnel) answered after `connect_time`;
    /// everything else since accept was the proxy's own work.
    pub fn upstream_connected(&mut self, connect_time: Duration) {
        self.record.upstream_connect_us = Some(connect_time.as_micros() as u64);
        let h = self.handles();
        h.upstream_connect.observe(connect_time.as_secs_f64());
        let setup = self.live().started.elapsed().saturating_sub(connect_time);
        h.proxy_setup.observe(setup.as_secs_f64());
        self.live().upstream_ready.store(true, Ordering::Relaxed);
    }
}

impl Meter for Conn {
    fn client_to_upstream(&self, n: u64) {
        self.live().sent.fetch_add(n, Ordering::Relaxed);
        self.handles().sent.inc_by(n);
    }

    fn upstream_to_client(&self, n: u64) {
        self.live().received.fetch_add(n, Ordering::Relaxed);
        self.handles().received.inc_by(n);
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.telemetry.handles(self.live.direction).active.dec();
        lock(&self.telemetry.live).remove(&self.live.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificates_check(t: &Telemetry) -> ReadyCheck {
        t.ready_checks()
            .into_iter()
            .find(|c| c.name == "certificates")
            .expect("a certificates check")
    }

    #[test]
    fn status_shows_the_configured_protection_before_the_credentials_are_in_force() {
        let t = Telemetry::new(TelemetrySettings {
            protection: Protection::Mtls,
            ..TelemetrySettings::default()
        });
        let early = t.security();
        assert_eq!(early.mode, Protection::Mtls);
        assert!(
            early.tls.is_none(),
            "no credentials shown before they are loaded"
        );
    }

    #[test]
    fn startup_is_measured_from_exec_to_the_first_ready() {
        let t = Telemetry::new(TelemetrySettings::default());
        let info = InterceptionInfo {
            mode: Mode::Ebpf,
            sockmap: false,
            proxy_port: 0,
            cgroup: "/test".into(),
        };
        t.attached(info.clone(), Arc::new(NoKernelCounters));
        assert_eq!(t.startup(), None, "listeners not serving yet");
        assert_eq!(t.metrics.startup.get(), 0.0);

        t.listeners_serving();
        let startup = t.startup().expect("ready now");
        let age = process::since_exec().unwrap();
        assert!(
            startup > Duration::ZERO && startup <= age,
            "{startup:?} vs {age:?}"
        );
        assert_eq!(t.metrics.startup.get(), startup.as_secs_f64());

        // Not ready and ready again (a drain, a re-attach): the first start is what counts.
        t.detaching();
        t.attached(info, Arc::new(NoKernelCounters));
        assert_eq!(t.startup(), Some(startup));
        assert_eq!(t.metrics.startup.get(), startup.as_secs_f64());
    }

    #[test]
    fn each_fact_told_to_the_handle_reaches_the_live_row_and_the_record() {
        let t = Telemetry::new(TelemetrySettings::default());
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let mut conn = t.accept(7, Direction::Outbound, client);
        conn.destination(dst);
        conn.connect_retried(true);
        conn.tunnelled(
            Some((Duration::from_millis(2), true)),
            "spiffe://td/a".into(),
            "spiffe://td/b".into(),
        );
        conn.upstream_connected(Duration::from_micros(1500));
        conn.record_mut().bytes_from_client = 3;

        let rows = t.live_connections();
        let [row] = rows.as_slice() else {
            panic!("{rows:?}")
        };
        assert_eq!(
            (row.id, row.original_dst, row.transport),
            (7, Some(dst), Transport::Mtls)
        );
        assert_eq!((row.connect_retries, row.state), (1, "open"));
        assert_eq!(row.src_identity.as_deref(), Some("spiffe://td/a"));
        assert_eq!(row.dst_identity.as_deref(), Some("spiffe://td/b"));

        let rec = t.close(conn);
        assert_eq!(
            (rec.id, rec.client, rec.original_dst),
            (7, client, Some(dst))
        );
        assert_eq!((rec.transport, rec.connect_retries), (Transport::Mtls, 1));
        assert_eq!(rec.src_identity.as_deref(), Some("spiffe://td/a"));
        assert_eq!(rec.dst_identity.as_deref(), Some("spiffe://td/b"));
        assert_eq!(
            (rec.tls_resumed, rec.upstream_connect_us),
            (Some(true), Some(1500))
        );
        assert_eq!(rec.bytes_from_client, 3);
        assert!(
            t.live_connections().is_empty(),
            "closed: out of the live table"
        );
        let m = &t.metrics;
        assert_eq!(m.active.with_label_values(&["outbound"]).get(), 0);
        let opened = m.opened.with_label_values(&["outbound", "mtls", "proxy"]);
        assert_eq!(opened.get(), 1);
        let closed = m.closed.with_label_values(&["outbound", "ok", "proxy"]);
        assert_eq!(closed.get(), 1);
    }

    #[test]
    fn a_connection_that_failed_before_its_mode_was_known_closes_as_opened_plain() {
        let t = Telemetry::new(TelemetrySettings::default());
        let mut conn = t.accept(1, Direction::Inbound, "10.0.0.1:1".parse().unwrap());
        conn.record_mut().outcome = labels::Outcome::Refused;
        let rec = t.close(conn);
        assert_eq!(
            (rec.transport, rec.outcome),
            (Transport::Plain, labels::Outcome::Refused)
        );
        let m = &t.metrics;
        assert_eq!(
            m.opened
                .with_label_values(&["inbound", "plain", "proxy"])
                .get(),
            1
        );
        assert_eq!(m.active.with_label_values(&["inbound"]).get(), 0);
    }

    #[test]
    fn an_expired_certificate_makes_the_sidecar_not_ready_and_says_why() {
        let t = Telemetry::new(TelemetrySettings::default());
        assert!(certificates_check(&t).ok, "mTLS off: nothing to check");

        t.certificates(SystemTime::now() + Duration::from_secs(3600));
        assert!(certificates_check(&t).ok);

        t.certificates(SystemTime::now() - Duration::from_secs(90));
        let check = certificates_check(&t);
        assert!(!check.ok, "{check:?}");
        assert!(check.detail.contains("expired"), "{}", check.detail);
        assert!(!t.is_ready());
        assert_eq!(t.metrics.ready.get(), 0);

        // A refused rotation keeps the expired set: still not ready.
        t.certificates_refused();
        assert!(!certificates_check(&t).ok);

        // A valid rotation makes it ready again (as far as certificates go).
        t.certificates(SystemTime::now() + Duration::from_secs(3600));
        assert!(certificates_check(&t).ok);
    }
}
