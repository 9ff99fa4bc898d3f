//! `sidecar status` and `sidecar conns`: clients of a running sidecar's admin endpoint.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{
    admin::{DEFAULT_ADDR, http, status::Status},
    telemetry::access_log::rfc3339,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// `sidecar status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Admin endpoint of the sidecar to ask.
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub admin: SocketAddr,
    /// Print the raw JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 unless the sidecar is ready (/readyz): an exec probe for a pod sidecar whose
    /// admin endpoint listens on localhost only.
    #[arg(long)]
    pub require_ready: bool,
}

/// `sidecar conns`.
#[derive(clap::Args, Debug)]
pub struct ConnsArgs {
    /// Admin endpoint of the sidecar to ask.
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub admin: SocketAddr,
    /// Print the raw JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Refresh like `top` until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval of --watch, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Stop --watch after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
}

fn fetch(admin: SocketAddr, path: &str) -> Result<String> {
    let (status, body) = http::get(admin, path, TIMEOUT).with_context(|| {
        format!(
            "no sidecar admin endpoint answers on {admin}: is `sidecar run` running, and with \
             which --admin-addr? (pass the same address with --admin)"
        )
    })?;
    if status != 200 {
        bail!("{admin}{path} answered HTTP {status}: {}", body.trim());
    }
    Ok(body)
}

pub fn status(args: &StatusArgs) -> Result<String> {
    let body = fetch(args.admin, "/status")?;
    if args.json && !args.require_ready {
        return Ok(body);
    }
    let status: Status = serde_json::from_str(&body)
        .with_context(|| format!("{} sent a /status this version cannot read", args.admin))?;
    if args.require_ready && !status.ready {
        anyhow::bail!(
            "the sidecar at {} is not ready (its /readyz lists the checks)",
            args.admin
        );
    }
    Ok(if args.json { body } else { status.render() })
}

#[derive(Deserialize)]
struct ConnList {
    count: usize,
    connections: Vec<ConnRow>,
    /// The pooled HBONE connections (absent from older sidecars).
    #[serde(default)]
    tunnels: Vec<crate::tunnel::pool::PoolRow>,
}

#[derive(Deserialize)]
struct ConnRow {
    id: u64,
    age_ms: u64,
    state: String,
    mode: String,
    /// `proxy` or `passthrough` (absent from older sidecars: proxy).
    #[serde(default = "proxy_path")]
    path: String,
    src: String,
    original_dst: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    src_identity: Option<String>,
    dst_identity: Option<String>,
}

fn proxy_path() -> String {
    "proxy".into()
}

/// One rendering of `sidecar conns`.
pub fn conns_once(admin: SocketAddr, json: bool) -> Result<String> {
    let body = fetch(admin, "/connections")?;
    if json {
        return Ok(body);
    }
    let list: ConnList = serde_json::from_str(&body)
        .with_context(|| format!("{admin} sent a /connections this version cannot read"))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:>8}  {:<10} {:<5} {:<11}  {:<22} {:<22} {:>10} {:>10}  IDENTITIES",
        "ID", "AGE", "STATE", "MODE", "PATH", "SRC", "ORIGINAL DST", "SENT", "RECEIVED"
    );
    for c in &list.connections {
        let ids = match (&c.src_identity, &c.dst_identity) {
            (None, None) => "-".to_string(),
            (s, d) => format!(
                "{} -> {}",
                s.as_deref().unwrap_or("?"),
                d.as_deref().unwrap_or("?")
            ),
        };
        let _ = writeln!(
            out,
            "{:>6}  {:>8}  {:<10} {:<5} {:<11}  {:<22} {:<22} {:>10} {:>10}  {}",
            c.id,
            age(c.age_ms),
            c.state,
            c.mode,
            c.path,
            c.src,
            c.original_dst.as_deref().unwrap_or("-"),
            c.bytes_sent,
            c.bytes_received,
            ids
        );
    }
    let _ = writeln!(out, "{} open connection(s)", list.count);
    if !list.tunnels.is_empty() {
        let _ = writeln!(
            out,
            "tunnels: {}",
            crate::admin::status::tunnels_summary(&list.tunnels)
        );
    }
    Ok(out)
}

/// `sidecar conns`, once or (`--watch`) refreshing until Ctrl-C or `--count`.
pub fn conns(args: &ConnsArgs) -> Result<()> {
    if !args.watch {
        print!("{}", conns_once(args.admin, args.json)?);
        return Ok(());
    }
    let mut stdout = std::io::stdout();
    let mut n = 0u64;
    loop {
        let frame = conns_once(args.admin, args.json)?;
        // Clear the screen and home the cursor, as `top` does; `--json` streams documents.
        if !args.json {
            let _ = write!(stdout, "\x1b[2J\x1b[H");
            let _ = writeln!(
                stdout,
                "sidecar conns — {} — {} (Ctrl-C to stop)\n",
                args.admin,
                rfc3339(SystemTime::now())
            );
        }
        let _ = write!(stdout, "{frame}");
        let _ = stdout.flush();
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
}

fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1e3),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(age(12), "12ms");
        assert_eq!(age(3_200), "3.2s");
        assert_eq!(age(125_000), "2m05s");
        assert_eq!(age(7_300_000), "2h01m");
    }
}
