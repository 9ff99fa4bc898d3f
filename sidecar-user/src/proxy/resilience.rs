//! What the proxy does when a destination fails: it retries the connect, and it stops
//! sending connections to a destination that keeps failing (a circuit breaker).
//!
//! Both act only before the first byte is forwarded, so they are always safe: the app sees
//! one connection that works, or one failure, never a request sent twice.
//!
//! * **Retries**: a connect that was refused, found no route, or got no answer is tried
//!   again after a backoff that doubles each time (with jitter, so clients that failed
//!   together do not retry together), as long as the connect deadline allows.
//! * **Circuits**: after `failures` consecutive failed connects to one destination (ip:port)
//!   its circuit opens: new connections to it fail at once for `open` (no connect timeout to
//!   wait out), then one trial connection is let through (half-open). A trial that connects
//!   closes the circuit; one that fails opens it again for twice as long, up to `open_max`.
//!   The table holds only destinations that failed lately, at most [`CIRCUIT_TABLE`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::telemetry::labels::Transition;
use crate::{policy::destinations::DestinationSettings, redirect::circuits::CircuitSink};

/// Destinations with a failure history kept at once; the oldest goes when a new one fails.
pub const CIRCUIT_TABLE: usize = 4096;
/// The longest a retry waits, whatever the doubling says.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The command-line flags, shared by `sidecar run` and `sidecar proxy`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ResilienceArgs {
    /// Connect attempts after the first when the destination refuses, is unreachable or does
    /// not answer (only before any byte moved; all within --connect-timeout-ms). 0: off.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub connect_retries: u32,
    /// Backoff before the first retry, in milliseconds; it doubles for each next one (up to
    /// 1 s), with jitter.
    #[arg(long, value_name = "MS", default_value_t = 25)]
    pub retry_backoff_ms: u64,
    /// Consecutive failed connects to one destination (ip:port) that open its circuit: new
    /// connections to it then fail at once. 0: no circuit breaking.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub circuit_failures: u32,
    /// How long a circuit stays open before one trial connection; doubles after each failed
    /// trial, up to --circuit-open-max-ms.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub circuit_open_ms: u64,
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub circuit_open_max_ms: u64,
}

impl Default for ResilienceArgs {
    fn default() -> Self {
        Self {
            connect_retries: 2,
            retry_backoff_ms: 25,
            circuit_failures: 5,
            circuit_open_ms: 1000,
            circuit_open_max_ms: 30_000,
        }
    }
}

/// Retries and circuit breaking in force (shown in `/config` under their flags' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Resilience {
    pub connect_retries: u32,
    #[serde(rename = "retry_backoff_ms", serialize_with = "super::as_millis")]
    pub retry_backoff: Duration,
    /// 0: no circuit breaking.
    pub circuit_failures: u32,
    #[serde(rename = "circuit_open_ms", serialize_with = "super::as_millis")]
    pub circuit_open: Duration,
    #[serde(rename = "circuit_open_max_ms", serialize_with = "super::as_millis")]
    pub circuit_open_max: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ResilienceError {
    #[error("--{flag} must be at least 1 ms")]
    ZeroDuration { flag: &'static str },
    #[error("--circuit-open-max-ms ({max}) is shorter than --circuit-open-ms ({open})")]
    MaxBelowOpen { open: u64, max: u64 },
}

impl Resilience {
    pub fn resolve(a: ResilienceArgs) -> Result<Self, ResilienceError> {
        for (flag, ms) in [
            ("retry-backoff-ms", a.retry_backoff_ms),
            ("circuit-open-ms", a.circuit_open_ms),
        ] {
            if ms == 0 {
                return Err(ResilienceError::ZeroDuration { flag });
            }
        }
        if a.circuit_open_max_ms < a.circuit_open_ms {
            return Err(ResilienceError::MaxBelowOpen {
                open: a.circuit_open_ms,
                max: a.circuit_open_max_ms,
            });
        }
        Ok(Self {
            connect_retries: a.connect_retries,
            retry_backoff: Duration::from_millis(a.retry_backoff_ms),
            circuit_failures: a.circuit_failures,
            circuit_open: Duration::from_millis(a.circuit_open_ms),
            circuit_open_max: Duration::from_millis(a.circuit_open_max_ms),
        })
    }

    /// These settings under a policy file's `[[destination]]` table: what the table sets
    /// wins, the rest stays.
    pub fn under(&self, d: &DestinationSettings) -> Resilience {
        let ms = Duration::from_millis;
        let open = d.circuit_open_ms.map_or(self.circuit_open, ms);
        Resilience {
            connect_retries: d.connect_retries.unwrap_or(self.connect_retries),
            retry_backoff: d.retry_backoff_ms.map_or(self.retry_backoff, ms),
            circuit_failures: d.circuit_failures.unwrap_or(self.circuit_failures),
            circuit_open: open,
            // Never below the open period, whichever of the two the table sets.
            circuit_open_max: d
                .circuit_open_max_ms
                .map_or(self.circuit_open_max, ms)
                .max(open),
        }
    }

    /// How long to wait before retry number `n` (1 for the first): half the doubled
    /// backoff, plus a random part of the other half.
    pub fn backoff(&self, n: u32, jitter: u64) -> Duration {
        let full = self
            .retry_backoff
            .saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        let half = full / 2;
        let spread = half.as_micros().max(1) as u64;
        half + Duration::from_micros(jitter % spread)
    }
}

/// Whether a failed connect may be tried again: the destination said no or said nothing.
/// Anything else (a permission error, an address the kernel refuses) would fail again.
pub fn retryable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable | ConnectionReset
    )
}

/// A cheap random number for jitter (xorshift on the clock; not for anything secret).
pub fn jitter_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut x = t | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// What the circuit of a destination says about a new connection to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed circuit: go ahead.
    Go,
    /// The circuit was open long enough: this connection is the one trial.
    Trial,
    /// Open (or a trial is under way): fail now; `failures` opened it.
    Open { failures: u32 },
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Failing, not yet at the threshold.
    Closed { failures: u32 },
    Open {
        until: Instant,
        period: Duration,
        failures: u32,
    },
    /// One trial connection is under way since `since`.
    HalfOpen {
        since: Instant,
        period: Duration,
        failures: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: State,
    /// The kernel refuses connects to it (set while open, with a [`CircuitSink`]).
    in_kernel: bool,
}

/// The circuits of every destination that failed lately. The settings come with each call:
/// the policy file may give a destination its own, and reload them.
pub struct Circuits {
    /// A trial that reports nothing for this long (its task was cut) lets another one go.
    trial_timeout: Duration,
    table: Mutex<HashMap<SocketAddr, Entry>>,
    sink: OnceLock<Arc<dyn CircuitSink>>,
    /// Entries the kernel refuses now: [`Circuits::expire`] has nothing to do while 0.
    in_kernel: AtomicUsize,
}

impl Circuits {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            trial_timeout: connect_timeout * 2,
            table: Mutex::new(HashMap::new()),
            sink: OnceLock::new(),
            in_kernel: AtomicUsize::new(0),
        }
    }

    /// From now on open circuits are refused in `sink` too (set once).
    pub fn refuse_in(&self, sink: Arc<dyn CircuitSink>) {
        let _ = self.sink.set(sink);
    }

    /// Lets the kernel pass connects to the destinations whose open period is over, so the
    /// next one reaches the proxy's trial (or, passing through, is the trial). Returns when
    /// the next one is due, if any is open.
    pub fn expire(&self, now: Instant) -> Option<Instant> {
        let sink = self.sink.get()?;
        if self.in_kernel.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: Option<Instant> = None;
        for (dst, entry) in table.iter_mut() {
            if let State::Open { until, .. } = entry.state
                && entry.in_kernel
            {
                if until <= now {
                    sink.close(*dst);
                    entry.in_kernel = false;
                    self.in_kernel.fetch_sub(1, Ordering::Relaxed);
                } else {
                    next = Some(next.map_or(until, |n| n.min(until)));
                }
            }
        }
        next
    }

    fn kernel_open(&self, dst: SocketAddr) -> bool {
        let opened = self.sink.get().is_some_and(|s| s.open(dst));
        if opened {
            self.in_kernel.fetch_add(1, Ordering::Relaxed);
        }
        opened
    }

    fn kernel_close(&self, dst: SocketAddr, entry: &Entry) {
        if entry.in_kernel
            && let Some(s) = self.sink.get()
        {
            s.close(dst);
            self.in_kernel.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Circuits open or half-open now.
    pub fn open_count(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .values()
            .filter(|e| !matches!(e.state, State::Closed { .. }))
            .count()
    }

    /// May a new connection to `dst` try to connect? (With the transition it caused.)
    pub fn admit(
        &self,
        dst: SocketAddr,
        s: &Resilience,
        now: Instant,
    ) -> (Admission, Option<Transition>) {
        if s.circuit_failures == 0 {
            return (Admission::Go, None);
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = table.get_mut(&dst) else {
            return (Admission::Go, None);
        };
        // Open past its period, or a trial lost for too long: this connection is the trial.
        let (period, failures, transition) = match entry.state {
            State::Closed { .. } => return (Admission::Go, None),
            State::Open {
                until,
                period,
                failures,
            } if now >= until => (period, failures, Some(Transition::HalfOpened)),
            State::HalfOpen {
                since,
                period,
                failures,
            } if now.duration_since(since) >= self.trial_timeout => (period, failures, None),
            State::Open { failures, .. } | State::HalfOpen { failures, .. } => {
                return (Admission::Open { failures }, None);
            }
        };
        entry.state = State::HalfOpen {
            since: now,
            period,
            failures,
        };
        let was = *entry;
        entry.in_kernel = false;
        self.kernel_close(dst, &was);
        (Admission::Trial, transition)
    }

    /// A connect to `dst` succeeded: its circuit closes and its history is forgotten.
    pub fn succeeded(&self, dst: SocketAddr) -> Option<Transition> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let was = table.remove(&dst)?;
        self.kernel_close(dst, &was);
        match was.state {
            State::Closed { .. } => None,
            State::Open { .. } | State::HalfOpen { .. } => {
                info!(%dst, "circuit closed: the destination answers again");
                Some(Transition::Closed)
            }
        }
    }

    /// A connect to `dst` failed (each attempt counts, retries included).
    pub fn failed(&self, dst: SocketAddr, s: &Resilience, now: Instant) -> Option<Transition> {
        if s.circuit_failures == 0 {
            return None;
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !table.contains_key(&dst) && table.len() >= CIRCUIT_TABLE {
            // A destination that is only counting failures goes first (the first one found:
            // a scan for the oldest would cost a walk of the table on every new failure);
            // an open one only when every entry is open.
            let victim = table
                .iter()
                .find(|(_, e)| matches!(e.state, State::Closed { .. }))
                .or_else(|| table.iter().next())
                .map(|(k, _)| *k);
            if let Some(gone) = victim.and_then(|k| Some((k, table.remove(&k)?))) {
                self.kernel_close(gone.0, &gone.1);
            }
        }
        let entry = table.entry(dst).or_insert(Entry {
            state: State::Closed { failures: 0 },
            in_kernel: false,
        });
        let (state, transition) = match entry.state {
            State::Closed { failures } if failures + 1 >= s.circuit_failures => {
                let failures = failures + 1;
                warn!(
                    %dst,
                    failures,
                    "circuit opened: new connections to this destination fail at once for {:?}",
                    s.circuit_open
                );
                (
                    State::Open {
                        until: now + s.circuit_open,
                        period: s.circuit_open,
                        failures,
                    },
                    Some(Transition::Opened),
                )
            }
            State::Closed { failures } => (
                State::Closed {
                    failures: failures + 1,
                },
                None,
            ),
            State::HalfOpen {
                period, failures, ..
            } => {
                let period = (period * 2).min(s.circuit_open_max);
                warn!(%dst, "circuit trial failed: open again for {period:?}");
                (
                    State::Open {
                        until: now + period,
                        period,
                        failures: failures + 1,
                    },
                    Some(Transition::Opened),
                )
            }
            // A connection admitted before the circuit opened failed later: it stays open.
            open @ State::Open { .. } => (open, None),
        };
        entry.state = state;
        if transition == Some(Transition::Opened) && !entry.in_kernel {
            entry.in_kernel = self.kernel_open(dst);
        }
        transition
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Resilience {
        Resilience::resolve(ResilienceArgs {
            circuit_failures: 3,
            circuit_open_ms: 100,
            circuit_open_max_ms: 300,
            ..ResilienceArgs::default()
        })
        .unwrap()
    }

    fn dst(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn opens_after_the_threshold_then_one_trial_decides() {
        let (c, s) = (Circuits::new(Duration::from_secs(1)), settings());
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(c.failed(dst(1), &s, t0), None);
        assert_eq!(c.failed(dst(1), &s, t0), None);
        assert_eq!(c.admit(dst(1), &s, t0), (Admission::Go, None));
        assert_eq!(c.failed(dst(1), &s, t0), Some(Transition::Opened));
        assert_eq!(c.open_count(), 1);
        // Open: fail at once; other destinations unaffected.
        assert_eq!(
            c.admit(dst(1), &s, ms(50)).0,
            Admission::Open { failures: 3 }
        );
        assert_eq!(c.admit(dst(2), &s, ms(50)).0, Admission::Go);
        // After the open period: one trial, the others still fail.
        assert_eq!(
            c.admit(dst(1), &s, ms(100)),
            (Admission::Trial, Some(Transition::HalfOpened))
        );
        assert!(matches!(
            c.admit(dst(1), &s, ms(101)).0,
            Admission::Open { .. }
        ));
        // The trial fails: open for twice as long (200 ms).
        assert_eq!(c.failed(dst(1), &s, ms(110)), Some(Transition::Opened));
        assert!(matches!(
            c.admit(dst(1), &s, ms(300)).0,
            Admission::Open { .. }
        ));
        assert_eq!(c.admit(dst(1), &s, ms(310)).0, Admission::Trial);
        // Failing again caps the period at 300 ms.
        c.failed(dst(1), &s, ms(320));
        assert!(matches!(
            c.admit(dst(1), &s, ms(610)).0,
            Admission::Open { .. }
        ));
        assert_eq!(c.admit(dst(1), &s, ms(620)).0, Admission::Trial);
        // The trial connects: closed, forgotten.
        assert_eq!(c.succeeded(dst(1)), Some(Transition::Closed));
        assert_eq!(c.open_count(), 0);
        assert_eq!(c.admit(dst(1), &s, ms(621)), (Admission::Go, None));
    }

    #[test]
    fn a_success_resets_the_count_and_a_lost_trial_is_replaced() {
        let (c, s) = (Circuits::new(Duration::from_millis(50)), settings());
        let t0 = Instant::now();
        c.failed(dst(1), &s, t0);
        c.failed(dst(1), &s, t0);
        assert_eq!(c.succeeded(dst(1)), None);
        c.failed(dst(1), &s, t0);
        c.failed(dst(1), &s, t0);
        assert_eq!(c.admit(dst(1), &s, t0).0, Admission::Go);
        c.failed(dst(1), &s, t0);
        let later = t0 + Duration::from_millis(100);
        assert_eq!(c.admit(dst(1), &s, later).0, Admission::Trial);
        // The trial never reports (its task was cut): after twice the connect timeout,
        // another one may go.
        let much_later = later + Duration::from_millis(101);
        assert_eq!(c.admit(dst(1), &s, much_later).0, Admission::Trial);
    }

    #[test]
    fn the_table_is_bounded_and_zero_failures_turns_it_off() {
        let (c, s) = (Circuits::new(Duration::from_secs(1)), settings());
        let t0 = Instant::now();
        // An open circuit outlives a flood of destinations that failed once.
        for _ in 0..3 {
            c.failed(dst(60_000), &s, t0);
        }
        for port in 0..(CIRCUIT_TABLE as u16 + 10) {
            c.failed(dst(port), &s, t0);
        }
        assert_eq!(c.table.lock().unwrap().len(), CIRCUIT_TABLE);
        assert_eq!(c.open_count(), 1);
        assert!(matches!(
            c.admit(dst(60_000), &s, t0).0,
            Admission::Open { .. }
        ));
        let off = Resilience {
            circuit_failures: 0,
            ..settings()
        };
        for _ in 0..10 {
            assert_eq!(c.failed(dst(99_00), &off, t0), None);
        }
        assert_eq!(c.admit(dst(99_00), &off, t0), (Admission::Go, None));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let s = settings();
        for jitter in [0, 7, u64::MAX] {
            let b1 = s.backoff(1, jitter);
            assert!(b1 >= Duration::from_micros(12_500) && b1 < Duration::from_millis(25));
            let b3 = s.backoff(3, jitter);
            assert!(b3 >= Duration::from_millis(50) && b3 < Duration::from_millis(100));
            assert!(s.backoff(30, jitter) < MAX_BACKOFF);
        }
    }

    #[test]
    fn bad_flags_are_refused() {
        let e = Resilience::resolve(ResilienceArgs {
            circuit_open_ms: 0,
            ..ResilienceArgs::default()
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "--circuit-open-ms must be at least 1 ms");
        let e = Resilience::resolve(ResilienceArgs {
            circuit_open_max_ms: 10,
            ..ResilienceArgs::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("shorter than"), "{e}");
    }

    /// Records what the kernel was told.
    #[derive(Default)]
    struct Kernel(Mutex<Vec<(bool, SocketAddr)>>);

    impl CircuitSink for Kernel {
        fn open(&self, dst: SocketAddr) -> bool {
            self.0.lock().unwrap().push((true, dst));
            true
        }
        fn close(&self, dst: SocketAddr) {
            self.0.lock().unwrap().push((false, dst));
        }
    }

    #[test]
    fn the_kernel_refuses_while_open_and_lets_the_trial_through() {
        let (c, s) = (Circuits::new(Duration::from_secs(1)), settings());
        let kernel = Arc::new(Kernel::default());
        c.refuse_in(kernel.clone());
        let told = || kernel.0.lock().unwrap().clone();
        let t0 = Instant::now();
        for _ in 0..3 {
            c.failed(dst(1), &s, t0);
        }
        assert_eq!(told(), [(true, dst(1))]);
        // Not yet over: nothing changes, and the end is when the next check is due.
        assert_eq!(c.expire(t0), Some(t0 + Duration::from_millis(100)));
        assert_eq!(told().len(), 1);
        // Over: the kernel lets connects through; the next one is the trial.
        assert_eq!(c.expire(t0 + Duration::from_millis(100)), None);
        assert_eq!(told(), [(true, dst(1)), (false, dst(1))]);
        let later = t0 + Duration::from_millis(150);
        assert_eq!(c.admit(dst(1), &s, later).0, Admission::Trial);
        // The trial fails: refused in the kernel again; then it connects: let through.
        c.failed(dst(1), &s, later);
        assert_eq!(told().len(), 3);
        assert_eq!(c.succeeded(dst(1)), Some(Transition::Closed));
        assert_eq!(told().last(), Some(&(false, dst(1))));
        assert_eq!(told().len(), 4);
    }

    #[test]
    fn destination_tables_apply_first_match_over_the_command_line() {
        let policy = crate::policy::schema::parse(
            r#"
[[destination]]
name = "db"
destinations = ["10.0.5.0/24"]
ports = [5432, "6000-6001"]
connect_retries = 4
circuit_open_ms = 5000
max_connections = 7

[[destination]]
destinations = ["10.0.0.0/8"]
circuit_failures = 0
"#,
        )
        .unwrap();
        let base = Resilience::resolve(ResilienceArgs::default()).unwrap();
        let at = |s: &str| policy.destination(s.parse().unwrap());
        let db = at("10.0.5.9:5432").unwrap();
        assert_eq!((db.name.as_str(), db.line), ("db", 2));
        let r = base.under(db);
        assert_eq!(r.connect_retries, 4);
        assert_eq!(r.circuit_open, Duration::from_secs(5));
        // The open period's cap never falls below the period itself.
        assert_eq!(r.circuit_open_max, Duration::from_secs(30));
        assert_eq!(r.circuit_failures, base.circuit_failures);
        assert_eq!(db.max_connections, Some(7));
        assert_eq!(at("10.0.5.9:6001").unwrap().name, "db");
        // Another port of the same block falls to the second table.
        let wide = at("10.0.5.9:80").unwrap();
        assert_eq!(wide.name, "destination-2");
        assert_eq!(base.under(wide).circuit_failures, 0);
        assert_eq!(base.under(wide).connect_retries, base.connect_retries);
        assert!(at("192.168.1.1:5432").is_none());
        // What /config and /status show: the file's own words.
        let shown = serde_json::to_value(db).unwrap();
        assert_eq!(shown["destinations"], serde_json::json!(["10.0.5.0/24"]));
        assert_eq!(shown["ports"], serde_json::json!(["5432", "6000-6001"]));
        assert!(shown.get("retry_backoff_ms").is_none());
    }
}
