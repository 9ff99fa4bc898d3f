//! What the sidecar tells operators about the connections it handles: Prometheus
//! [`metrics`], the JSON [`access_log`], the kernel's TCP view ([`tcp_info`]), the live
//! connection table and readiness. The admin server (`crate::admin`) serves all of it.
//!
//! The proxy touches telemetry at three points, each one call: [`Telemetry::accept`] when a
//! connection arrives (returns the [`Conn`] handle that also meters bytes as they move),
//! [`Conn::upstream_connected`] once the destination answers, and [`Telemetry::close`] with
//! the finished record. Everything else — aggregation, eBPF counters, rendering — happens on
//! the admin thread when someone asks.

pub mod access_log;
pub mod metrics;
pub mod tcp_info;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus::{Histogram, IntCounter, IntGauge};
use serde::Serialize;

use self::{access_log::AccessRecord, metrics::Metrics};
use crate::proxy::{
    copy::Meter,
    record::{ConnRecord, Direction, Mode},
};

/// Where the eBPF counters come from (the eBPF loader's map reader; other interception
/// modes can supply their own).
pub trait CounterSource: Send + Sync {
    /// Every counter by name, summed over CPUs.
    fn counters(&self) -> BTreeMap<&'static str, u64>;
}

/// For interception that keeps no counters of its own in the kernel (iptables mode, and a
/// pod sidecar, whose kernel counters are the node agent's).
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
}

/// What is intercepting, for `/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct InterceptionInfo {
    /// `ebpf` today; `iptables` when that mode lands.
    pub mode: String,
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
    pub detail: &'static str,
}

/// Shared by the proxy (writes) and the admin server (reads).
pub struct Telemetry {
    settings: TelemetrySettings,
    pub metrics: Metrics,
    pub readiness: Readiness,
    started: Instant,
    live: Mutex<BTreeMap<u64, Arc<LiveConn>>>,
    kernel: Mutex<Option<Arc<dyn CounterSource>>>,
    interception: Mutex<Option<InterceptionInfo>>,
    /// Cached label children per direction (outbound, inbound), so the data path never
    /// looks labels up.
    handles: [DirectionHandles; 2],
}

struct DirectionHandles {
    opened_plain: IntCounter,
    opened_mtls: IntCounter,
    tls_handshake: Histogram,
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
        Self {
            opened_plain: m.opened.with_label_values(&[d, Mode::Plain.as_str()]),
            opened_mtls: m.opened.with_label_values(&[d, Mode::Mtls.as_str()]),
            tls_handshake: m.tls_handshake.with_label_values(&[d]),
            active: m.active.with_label_values(&[d]),
            sent: m.sent_bytes.with_label_values(&[d]),
            received: m.received_bytes.with_label_values(&[d]),
            upstream_connect: m.upstream_connect.with_label_values(&[d]),
            proxy_setup: m.proxy_setup.with_label_values(&[d]),
            duration: m.duration.with_label_values(&[d]),
        }
    }
}

/// One open connection as `/connections` shows it. Bytes are updated as they move.
#[derive(Debug)]
pub struct LiveConn {
    pub id: u64,
    pub direction: Direction,
    /// Set once known: when the upstream leg (plain or tunnel) is up.
    pub mode: OnceLock<Mode>,
    pub client: SocketAddr,
    pub started: Instant,
    pub started_wall: SystemTime,
    pub original_dst: OnceLock<SocketAddr>,
    pub upstream_ready: AtomicBool,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Filled by mTLS once the handshake has verified them.
    pub src_identity: OnceLock<String>,
    pub dst_identity: OnceLock<String>,
}

/// A snapshot row of `/connections`.
#[derive(Debug, Serialize)]
pub struct LiveRow {
    pub id: u64,
    pub age_ms: u64,
    pub started: String,
    pub direction: Direction,
    pub mode: Mode,
    pub state: &'static str,
    pub src: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
}

impl Telemetry {
    pub fn new(settings: TelemetrySettings) -> Arc<Self> {
        let metrics = Metrics::new(settings.destination_labels);
        let handles = Direction::ALL.map(|d| DirectionHandles::new(&metrics, d));
        Arc::new(Self {
            settings,
            metrics,
            readiness: Readiness::default(),
            started: Instant::now(),
            live: Mutex::new(BTreeMap::new()),
            kernel: Mutex::new(None),
            interception: Mutex::new(None),
            handles,
        })
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
        self.metrics.ready.set(i64::from(self.is_ready()));
    }

    pub fn interception(&self) -> Option<InterceptionInfo> {
        lock(&self.interception).clone()
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
                },
            },
            ReadyCheck {
                name: "listeners",
                ok: serving && !draining,
                detail: match (serving, draining) {
                    (_, true) => "draining: no longer accepting",
                    (true, false) => "proxy listeners bound and accepting",
                    (false, false) => "proxy listeners not accepting yet",
                },
            },
            ReadyCheck {
                name: "certificates",
                ok: true,
                detail: if self.metrics.certificates_stale.get() > 0 {
                    "serving the last good certificates: the files on disk are missing or \
                     invalid (see the log)"
                } else if self.metrics.certificates_loaded.get() > 0 {
                    "workload certificates loaded"
                } else {
                    "not required: mTLS off (--tls-dir not given)"
                },
            },
        ]
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
        self.metrics.render()
    }

    fn handles(&self, d: Direction) -> &DirectionHandles {
        &self.handles[d as usize]
    }

    /// A new connection from `client`: listed as live, metered from now on. It is counted
    /// as opened once its mode is known ([`Conn::established`]), or at close if it never got
    /// that far.
    pub fn accept(self: &Arc<Self>, id: u64, direction: Direction, client: SocketAddr) -> Conn {
        let live = Arc::new(LiveConn {
            id,
            direction,
            mode: OnceLock::new(),
            client,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            original_dst: OnceLock::new(),
            upstream_ready: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            src_identity: OnceLock::new(),
            dst_identity: OnceLock::new(),
        });
        self.handles(direction).active.inc();
        lock(&self.live).insert(id, live.clone());
        Conn {
            live,
            telemetry: self.clone(),
        }
    }

    /// The connection is over: close counters, histograms, TCP stats, the access log.
    pub fn close(&self, conn: Conn, rec: &ConnRecord) {
        let duration = conn.live.started.elapsed();
        let started_wall = conn.live.started_wall;
        let m = &self.metrics;
        let d = rec.direction.as_str();
        let h = self.handles(rec.direction);
        // A connection that failed before its mode was known still counts as opened.
        conn.established(rec.mode);
        // Out of the active gauge before it counts as closed, so no scrape sees a connection
        // both closed and active (the VM matrix caught that window under TCG).
        drop(conn);
        h.duration.observe(duration.as_secs_f64());
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
        m.closed.with_label_values(&[d, rec.outcome.as_str()]).inc();
        if self.settings.access_log {
            AccessRecord::new(rec, started_wall, duration).emit();
        }
    }

    /// One policy decision (`allow`, `deny`, `audit`, `would_deny`) on a connection.
    pub fn policy_decision(&self, direction: Direction, decision: &str) {
        self.metrics
            .policy_decisions
            .with_label_values(&[direction.as_str(), decision])
            .inc();
    }

    /// The certificate files changed and were refused: the last good set stays in force.
    pub fn certificates_refused(&self) {
        self.metrics.certificate_reload_errors.inc();
        self.metrics.certificates_stale.set(1);
    }

    /// A set of workload credentials is in force (at start and after each rotation).
    pub fn certificates(&self, not_after: SystemTime) {
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
    }

    /// The live table, oldest first.
    pub fn live_connections(&self) -> Vec<LiveRow> {
        let conns: Vec<Arc<LiveConn>> = lock(&self.live).values().cloned().collect();
        conns
            .iter()
            .map(|c| LiveRow {
                id: c.id,
                age_ms: c.started.elapsed().as_millis() as u64,
                started: access_log::rfc3339(c.started_wall),
                direction: c.direction,
                mode: c.mode.get().copied().unwrap_or(Mode::Plain),
                state: if c.upstream_ready.load(Ordering::Relaxed) {
                    "open"
                } else {
                    "connecting"
                },
                src: c.client,
                original_dst: c.original_dst.get().copied(),
                bytes_sent: c.sent.load(Ordering::Relaxed),
                bytes_received: c.received.load(Ordering::Relaxed),
                src_identity: c.src_identity.get().cloned(),
                dst_identity: c.dst_identity.get().cloned(),
            })
            .collect()
    }
}

/// The proxy's handle on one connection. Dropping it (also on panic) takes the connection
/// out of the live table and the active gauge.
pub struct Conn {
    live: Arc<LiveConn>,
    telemetry: Arc<Telemetry>,
}

impl Conn {
    pub fn destination(&self, dst: SocketAddr) {
        let _ = self.live.original_dst.set(dst);
    }

    /// The connection's mode is settled (plain upstream, or an mTLS tunnel): counted as
    /// opened, once.
    pub fn established(&self, mode: Mode) {
        if self.live.mode.set(mode).is_ok() {
            let h = self.telemetry.handles(self.live.direction);
            match mode {
                Mode::Plain => h.opened_plain.inc(),
                Mode::Mtls => h.opened_mtls.inc(),
            }
        }
    }

    /// An mTLS handshake completed after `took`, verifying these identities.
    pub fn tls_established(&self, took: Duration, src: Option<String>, dst: Option<String>) {
        self.telemetry
            .handles(self.live.direction)
            .tls_handshake
            .observe(took.as_secs_f64());
        if let Some(src) = src {
            let _ = self.live.src_identity.set(src);
        }
        if let Some(dst) = dst {
            let _ = self.live.dst_identity.set(dst);
        }
        self.established(Mode::Mtls);
    }

    /// The destination answered after `connect_time`; everything else since accept was the
    /// proxy's own work.
    pub fn upstream_connected(&self, connect_time: Duration) {
        let h = self.telemetry.handles(self.live.direction);
        h.upstream_connect.observe(connect_time.as_secs_f64());
        let setup = self.live.started.elapsed().saturating_sub(connect_time);
        h.proxy_setup.observe(setup.as_secs_f64());
        self.live.upstream_ready.store(true, Ordering::Relaxed);
    }
}

impl Meter for Conn {
    fn client_to_upstream(&self, n: u64) {
        self.live.sent.fetch_add(n, Ordering::Relaxed);
        self.telemetry.handles(self.live.direction).sent.inc_by(n);
    }

    fn upstream_to_client(&self, n: u64) {
        self.live.received.fetch_add(n, Ordering::Relaxed);
        self.telemetry
            .handles(self.live.direction)
            .received
            .inc_by(n);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.telemetry.handles(self.live.direction).active.dec();
        lock(&self.telemetry.live).remove(&self.live.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CounterSource for crate::redirect::ebpf::KernelLookups {
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        crate::redirect::ebpf::KernelLookups::counters(self)
    }
}
