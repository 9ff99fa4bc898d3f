//! The access log: one JSON line per closed connection, emitted as a `tracing` event on its
//! own target ([`TARGET`]) and written verbatim by [`AccessLogLayer`] to stdout or a file.
//!
//! Going through `tracing` keeps one logging pipeline (the stderr log filters this target
//! out, so `SIDECAR_LOG=info` does not duplicate it); writing the line verbatim instead of
//! through the generic JSON formatter keeps the schema ours: nested objects, nulls for the
//! fields mTLS and policy will fill, and stable names.

use std::{
    fmt,
    fs::OpenOptions,
    io::{self, LineWriter, Write},
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, layer::Context};

use crate::{
    proxy::record::{ConnRecord, Direction, Mode},
    telemetry::tcp_info::TcpStats,
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

/// One access-log line. Field meanings are documented in the README.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    pub start: String,
    pub end: String,
    pub id: u64,
    pub direction: Direction,
    pub mode: Mode,
    /// App leg: the app's socket and the proxy listener it was redirected to.
    pub src: SocketAddr,
    pub proxy: Option<SocketAddr>,
    /// Upstream leg: the proxy's socket and the original destination.
    pub upstream_src: Option<SocketAddr>,
    pub original_dst: Option<SocketAddr>,
    pub src_identity: Option<&'a str>,
    pub dst_identity: Option<&'a str>,
    pub fast_path_app: bool,
    pub fast_path_upstream: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: f64,
    pub upstream_connect_ms: Option<f64>,
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
            mode: rec.mode,
            src: rec.client,
            proxy: rec.proxy_local,
            upstream_src: rec.upstream_local,
            original_dst: rec.original_dst,
            src_identity: rec.src_identity.as_deref(),
            dst_identity: rec.dst_identity.as_deref(),
            fast_path_app: rec.app_leg_spliced,
            fast_path_upstream: rec.upstream_leg_spliced,
            bytes_sent: rec.bytes_from_client,
            bytes_received: rec.bytes_from_upstream,
            duration_ms: duration.as_micros() as f64 / 1e3,
            upstream_connect_ms: rec.upstream_connect_us.map(|us| us as f64 / 1e3),
            close_reason: rec.outcome.as_str(),
            error: rec.error.as_deref(),
            policy_decision: rec.policy_decision.unwrap_or("none"),
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

/// Writes the `record` field of [`TARGET`] events, one per line.
pub struct AccessLogLayer {
    out: Mutex<Box<dyn Write + Send>>,
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
        Ok(Some(Self {
            out: Mutex::new(out),
        }))
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
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            // A full disk must not take the data path down; the line is lost.
            let _ = out.write_all(text.as_bytes());
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
        assert_eq!(line["duration_ms"], 3.0);
    }
}
