//! The access log: one JSON line per closed connection, emitted as a `tracing` event on its
//! own target ([`TARGET`]) and written verbatim by [`AccessLogLayer`] to stdout or a file.
//!
//! Going through `tracing` keeps one logging pipeline (the stderr log filters this target
//! out, so `SIDECAR_LOG=info` does not duplicate it); writing the line verbatim instead of
//! through the generic JSON formatter keeps the schema ours: nested objects, nulls for the
//! fields mTLS and policy will fill, and stable names. The layer only queues the line; a
//! thread of its own writes it (see [`AccessLogLayer`]).

use std::{
    fmt,
    fs::OpenOptions,
    io::{self, LineWriter, Write},
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, layer::Context};

use super::{
    labels::{Decision, Direction, Path, Transport},
    record::ConnRecord,
    tcp_info::TcpStats,
};

/// The `tracing` target of access-log events.
pub const TARGET: &str = "sidecar::access";

/// Where access-log lines go (`--access-log stdout|off|FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogTarget {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

impl FromStr for AccessLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("--access-log needs a value: stdout, off, or a file path".into()),
            "off" => Ok(Self::Off),
            "stdout" | "-" => Ok(Self::Stdout),
            path => Ok(Self::File(path.into())),
        }
    }
}

impl fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Stdout => f.write_str("stdout"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One access-log line. Field meanings are documented in docs/observability.md ("Access log").
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    pub start: String,
    pub end: String,
    pub id: u64,
    pub direction: Direction,
    #[serde(rename = "mode")]
    pub transport: Transport,
    /// `proxy`, or `passthrough` (no proxy: `proxy` and `upstream_src` are null, and
    /// `tcp_app` is the app's own socket to the destination).
    pub path: Path,
    /// App leg: the app's socket and the proxy listener it was redirected to.
    pub src: SocketAddr,
    pub proxy: Option<SocketAddr>,
    /// Upstream leg: the proxy's socket and the original destination.
    pub upstream_src: Option<SocketAddr>,
    pub original_dst: Option<SocketAddr>,
    pub src_identity: Option<&'a str>,
    pub dst_identity: Option<&'a str>,
    pub tls_resumed: Option<bool>,
    /// The connection's HBONE stream rode a tunnel connection already open.
    pub tunnel_reused: Option<bool>,
    pub fast_path_app: bool,
    pub fast_path_upstream: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: f64,
    pub upstream_connect_ms: Option<f64>,
    /// Connect attempts after the first (see `--connect-retries`).
    pub connect_retries: u32,
    pub close_reason: &'static str,
    pub error: Option<&'a str>,
    /// `none` until a policy engine decides.
    pub policy_decision: &'static str,
    pub policy_rule: Option<&'a str>,
    pub tcp_app: Option<TcpStats>,
    pub tcp_upstream: Option<TcpStats>,
}

impl<'a> AccessRecord<'a> {
    pub fn new(rec: &'a ConnRecord, start: SystemTime, duration: Duration) -> Self {
        Self {
            start: rfc3339(start),
            end: rfc3339(start + duration),
            id: rec.id,
            direction: rec.direction,
            transport: rec.transport,
            path: rec.path,
            src: rec.client,
            proxy: rec.proxy_local,
            upstream_src: rec.upstream_local,
            original_dst: rec.original_dst,
            src_identity: rec.src_identity.as_deref(),
            dst_identity: rec.dst_identity.as_deref(),
            tls_resumed: rec.tls_resumed,
            tunnel_reused: rec.tunnel_reused,
            fast_path_app: rec.app_leg_spliced,
            fast_path_upstream: rec.upstream_leg_spliced,
            bytes_sent: rec.bytes_from_client,
            bytes_received: rec.bytes_from_upstream,
            duration_ms: duration.as_micros() as f64 / 1e3,
            upstream_connect_ms: rec.upstream_connect_us.map(|us| us as f64 / 1e3),
            connect_retries: rec.connect_retries,
            close_reason: rec.outcome.as_str(),
            error: rec.error.as_deref(),
            policy_decision: rec.policy_decision.map_or("none", Decision::as_str),
            policy_rule: rec.policy_rule.as_deref(),
            tcp_app: rec.tcp_app,
            tcp_upstream: rec.tcp_upstream,
        }
    }

    /// Emits the line as a `tracing` event on [`TARGET`].
    pub fn emit(&self) {
        match serde_json::to_string(self) {
            Ok(line) => tracing::info!(target: TARGET, record = line.as_str()),
            Err(e) => tracing::warn!("access log record {}: {e}", self.id),
        }
    }
}

/// Lines waiting for the writer thread. At ~600 bytes a line that is ~2.5 MB, seconds of
/// logging at a high connection rate: enough to ride out a slow disk, bounded when the
/// reader of stdout stops reading.
pub const QUEUE_LINES: usize = 4096;

/// What the writer thread is asked to do.
enum Job {
    Line(String),
    /// Acknowledge once every line queued before this one is written.
    Flush(SyncSender<()>),
}

/// The sending end of the writer thread, shared by the layer, `/metrics` and the exit path.
struct Queue {
    jobs: SyncSender<Job>,
    dropped: AtomicU64,
}

/// The queue of the process's access log, once `init_logging` opened one.
static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// Writes the `record` field of [`TARGET`] events, one per line, from its own thread: a
/// proxy worker only queues the line, so stdout or a file that backs up never stalls the
/// data path. When the queue is full the line is dropped and counted
/// (`sidecar_access_log_dropped_total`).
pub struct AccessLogLayer {
    queue: Arc<Queue>,
}

impl AccessLogLayer {
    /// `None` for [`AccessLogTarget::Off`]. A file is opened for appending (created if
    /// missing), so a restart does not erase history.
    pub fn open(target: &AccessLogTarget) -> io::Result<Option<Self>> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stdout => Box::new(LineWriter::new(io::stdout())),
            AccessLogTarget::File(path) => Box::new(LineWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
        };
        Self::with_writer(out, QUEUE_LINES).map(Some)
    }

    /// Starts the writer thread on `out`, with room for `capacity` queued lines.
    pub fn with_writer(mut out: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let (jobs, queued) = sync_channel::<Job>(capacity);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                for job in queued {
                    match job {
                        // A full disk must not take the sidecar down; the line is lost.
                        Job::Line(text) => {
                            let _ = out.write_all(text.as_bytes());
                        }
                        Job::Flush(done) => {
                            let _ = out.flush();
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Self {
            queue: Arc::new(Queue {
                jobs,
                dropped: AtomicU64::new(0),
            }),
        })
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the lines queued so far to be written.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.queue.flush(timeout)
    }
}

impl Queue {
    fn push(&self, text: String) {
        match self.jobs.try_send(Job::Line(text)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (done, written) = sync_channel(1);
        let mut job = Job::Flush(done);
        loop {
            match self.jobs.try_send(job) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    job = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        written
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// Access-log lines dropped so far because the writer fell behind (0 without an access log).
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

/// At exit: waits up to `timeout` for the queued lines to reach stdout or the file.
pub fn flush(timeout: Duration) {
    if let Some(q) = QUEUE.get() {
        q.flush(timeout);
    }
}

impl<S: Subscriber> Layer<S> for AccessLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        struct Line(Option<String>);
        impl Visit for Line {
            fn record_str(&mut self, field: &Field, value: &str) {
                if field.name() == "record" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {}
        }
        let mut line = Line(None);
        event.record(&mut line);
        if let Some(mut text) = line.0 {
            text.push('\n');
            self.queue.push(text);
        }
    }
}

/// `2026-11-25T11:30:00.123456Z` (UTC, microseconds).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Installs the process's logging: the diagnostic log on stderr (filter from `SIDECAR_LOG`,
/// `warn` by default, never the access log), and the access log to `access` if it is on.
pub fn init_logging(access: &AccessLogTarget) -> io::Result<()> {
    use tracing_subscriber::{
        EnvFilter, filter::filter_fn, layer::SubscriberExt as _, util::SubscriberInitExt as _,
    };

    let filter = EnvFilter::try_from_env("SIDECAR_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn"))
        .add_directive(format!("{TARGET}=off").parse().expect("static directive"));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_filter(filter);
    let access = AccessLogLayer::open(access)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open the access log {access}: {e} (pick a writable path, stdout, \
                     or off)"
                ),
            )
        })?
        .inspect(|l| {
            let _ = QUEUE.set(l.queue.clone());
        })
        .map(|l| l.with_filter(filter_fn(|m| m.target() == TARGET)));
    // `try_init` also bridges the `log` crate (aya-log) into tracing.
    tracing_subscriber::registry()
        .with(stderr)
        .with(access)
        .try_init()
        .map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_764_070_200_123_456);
        assert_eq!(rfc3339(t), "2025-11-25T11:30:00.123456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    /// A reader that stops reading (a stuck `kubectl logs`, a full disk) must cost the proxy
    /// dropped lines, never a blocked worker: with a real pipe nobody drains, emitting many
    /// more lines than the pipe and the queue hold returns promptly and counts the drops.
    #[test]
    fn a_stalled_writer_drops_lines_instead_of_blocking() {
        use tracing_subscriber::layer::SubscriberExt as _;

        let (reader, writer) = io::pipe().unwrap();
        let layer = AccessLogLayer::with_writer(Box::new(writer), 64).unwrap();
        let queue = layer.queue.clone();
        let (finished, done) = sync_channel(1);
        let line = "x".repeat(1000);
        const LINES: u64 = 2000;
        std::thread::spawn(move || {
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(subscriber, || {
                for _ in 0..LINES {
                    tracing::info!(target: TARGET, record = line.as_str());
                }
            });
            let _ = finished.send(());
        });
        assert!(
            done.recv_timeout(Duration::from_secs(5)).is_ok(),
            "emitting access-log lines blocked on a writer nobody reads"
        );
        // The pipe holds 64 KiB (~65 lines), the queue 64 more; the rest were dropped.
        let dropped = queue.dropped.load(Ordering::Relaxed);
        assert!((LINES - 200..LINES).contains(&dropped), "dropped {dropped}");
        drop(reader);
    }

    #[test]
    fn queued_lines_are_written_by_flush() {
        let path = std::env::temp_dir().join(format!("access-flush-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let layer = AccessLogLayer::with_writer(Box::new(LineWriter::new(file)), 16).unwrap();
        for i in 0..10 {
            layer.queue.push(format!("{{\"id\":{i}}}\n"));
        }
        assert!(layer.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text.lines().count(), 10, "{text}");
        assert_eq!(layer.dropped(), 0);
    }

    #[test]
    fn targets_parse() {
        assert_eq!("off".parse(), Ok(AccessLogTarget::Off));
        assert_eq!("stdout".parse(), Ok(AccessLogTarget::Stdout));
        assert_eq!(
            "/tmp/a.log".parse(),
            Ok(AccessLogTarget::File("/tmp/a.log".into()))
        );
        assert!("".parse::<AccessLogTarget>().is_err());
    }

    #[test]
    fn record_has_placeholders_for_mtls_and_policy() {
        let rec = ConnRecord::new(
            7,
            Direction::Outbound,
            SocketAddr::from(([127, 0, 0, 1], 4000)),
        );
        let line = serde_json::to_value(AccessRecord::new(
            &rec,
            UNIX_EPOCH,
            Duration::from_millis(3),
        ))
        .unwrap();
        assert_eq!(line["mode"], "plain");
        assert_eq!(line["policy_decision"], "none");
        assert!(line["src_identity"].is_null() && line["policy_rule"].is_null());
        assert!(
            line["tls_resumed"].is_null(),
            "no tunnel, no handshake kind"
        );
        assert_eq!(line["duration_ms"], 3.0);
    }
}
