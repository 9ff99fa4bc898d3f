//! `/status`: "is my workload really intercepted and accelerated?" answered yes or no, with
//! the counters that prove it. `sidecar status` renders the same document as a table.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::{
    telemetry::{
        InterceptionInfo, PolicyStatus, Telemetry, TlsStatus,
        labels::{Direction, Mode, Outcome, Path, Protection, Transport},
        metrics::LEGS,
        process::Usage,
        unix_secs,
    },
    tunnel::pool::PoolRow,
};

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// What is attached (absent before attach and after detach).
    pub interception: Option<InterceptionInfo>,
    pub ready: bool,
    pub intercepted: Verdict,
    pub accelerated: Verdict,
    pub connections: Connections,
    /// What the sidecar requires of peers (see [`crate::telemetry::Security`]).
    pub mode: Protection,
    /// The workload credentials in force (`None`: plain).
    pub tls: Option<TlsStatus>,
    /// The policy in force (`None`: no `--policy`, everything allowed).
    pub policy: Option<PolicyStatus>,
    /// The pooled HBONE connections to peers open now (absent from older sidecars).
    #[serde(default)]
    pub tunnels: Vec<PoolRow>,
    /// The eBPF counters, summed over CPUs (empty when not attached).
    pub ebpf: BTreeMap<String, u64>,
    pub uptime_secs: f64,
    /// What the sidecar itself costs (absent from older sidecars, and where `/proc/self`
    /// cannot be read).
    #[serde(default)]
    pub process: Option<ProcessStatus>,
}

/// The sidecar's own cost, as its `process_*` metrics and `sidecar_startup_seconds` say.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
    /// Exec to the first time `/readyz` was ready (`None`: not ready yet).
    pub startup_seconds: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Verdict {
    /// `yes`, `no`, or `not yet` (attached, but no traffic has proved it).
    pub answer: String,
    pub why: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Connections {
    pub opened: u64,
    pub active: i64,
    pub closed: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub fast_path_app_legs: u64,
    pub fast_path_upstream_legs: u64,
    /// Of `closed`: connections that went straight to their destination (kernel
    /// pass-through, recorded at close) and connections the proxy carried.
    #[serde(default)]
    pub passed_through: u64,
    #[serde(default)]
    pub proxied: u64,
}

impl Status {
    pub fn collect(t: &Telemetry) -> Self {
        let ebpf = t.refresh_kernel_counters();
        let info = t.interception();
        let m = &t.metrics;
        let mut c = Connections {
            opened: 0,
            active: 0,
            closed: 0,
            failed: 0,
            bytes_sent: 0,
            bytes_received: 0,
            fast_path_app_legs: 0,
            fast_path_upstream_legs: 0,
            passed_through: 0,
            proxied: 0,
        };
        for direction in Direction::ALL {
            let d = direction.as_str();
            for path in Path::ALL.into_iter().filter(|p| p.applies_to(direction)) {
                let p = path.as_str();
                for mode in Transport::ALL.map(Transport::as_str) {
                    c.opened += m.opened.with_label_values(&[d, mode, p]).get();
                }
                for o in Outcome::ALL {
                    let closed = m.closed.with_label_values(&[d, o.as_str(), p]).get();
                    c.closed += closed;
                    match path {
                        Path::Proxy => c.proxied += closed,
                        Path::Passthrough => c.passed_through += closed,
                    }
                }
                c.bytes_sent += m.sent_bytes.with_label_values(&[d, p]).get();
                c.bytes_received += m.received_bytes.with_label_values(&[d, p]).get();
            }
            for o in Outcome::ALL.into_iter().filter(|o| o.is_setup_failure()) {
                c.failed += m.failed.with_label_values(&[d, o.as_str()]).get();
            }
            c.active += m.active.with_label_values(&[d]).get();
            c.fast_path_app_legs += m.fast_path.with_label_values(&[d, LEGS[0]]).get();
            c.fast_path_upstream_legs += m.fast_path.with_label_values(&[d, LEGS[1]]).get();
        }
        let k = |name: &str| {
            ebpf.as_ref()
                .and_then(|e| e.get(name).copied())
                .unwrap_or(0)
        };
        let intercepted = match &info {
            None => verdict("no", "no interception is attached".into()),
            // `sidecar proxy`: the kernel counters are the node agent's, not this process's.
            Some(i) if i.mode == Mode::Agent && c.opened > 0 => verdict(
                "yes",
                format!(
                    "{} connection(s) intercepted by the node agent: {} passed through in the \
                     kernel, {} proxied (closed ones)",
                    c.opened, c.passed_through, c.proxied
                ),
            ),
            Some(_) if k("connect_redirected") + k("connect_passthrough") > 0 => verdict(
                "yes",
                format!(
                    "{} of {} connect(s) from the workload were intercepted: {} passed through \
                     in the kernel, {} proxied ({} excluded by port, {} by CIDR)",
                    k("connect_redirected") + k("connect_passthrough"),
                    k("connect_seen"),
                    k("connect_passthrough"),
                    k("connect_redirected"),
                    k("connect_excluded_port"),
                    k("connect_excluded_cidr")
                ),
            ),
            Some(_) => verdict(
                "not yet",
                "attached, but the workload has not connected anywhere yet".into(),
            ),
        };
        let accelerated = match &info {
            None => verdict("no", "no interception is attached".into()),
            Some(i) if i.mode == Mode::Agent => verdict(
                "unknown",
                "the splice counters are the node agent's: `sidecar agent --status`".into(),
            ),
            Some(i) if !i.sockmap => verdict(
                "no",
                "the sockmap splice of proxied connections is off (the default; --sockmap \
                 turns it on)"
                    .into(),
            ),
            Some(_) if k("sk_msg_redirected") > 0 => verdict(
                "yes",
                format!(
                    "the kernel spliced {} message(s), {} bytes ({} missed); fast path on {} \
                     app leg(s) and {} upstream leg(s) of {} closed connection(s)",
                    k("sk_msg_redirected"),
                    k("sk_msg_redirected_bytes"),
                    k("sk_msg_miss"),
                    c.fast_path_app_legs,
                    c.fast_path_upstream_legs,
                    c.closed
                ),
            ),
            Some(_) => verdict(
                "not yet",
                "fast path enabled, but no message has been spliced yet".into(),
            ),
        };
        let security = t.security();
        Self {
            interception: info,
            ready: t.is_ready(),
            intercepted,
            accelerated,
            connections: c,
            mode: security.mode,
            tls: security.tls,
            policy: security.policy,
            tunnels: t.tunnel_pool(),
            ebpf: ebpf
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            uptime_secs: t.uptime().as_secs_f64(),
            process: Usage::read().ok().map(|u| ProcessStatus {
                cpu_seconds: u.cpu_seconds,
                resident_memory_bytes: u.resident_memory_bytes,
                open_fds: u.open_fds,
                threads: u.threads,
                startup_seconds: t.startup().map(|d| d.as_secs_f64()),
            }),
        }
    }

    /// The table `sidecar status` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let row = |out: &mut String, k: &str, v: &str| {
            let _ = writeln!(out, "{k:<14} {v}");
        };
        match &self.interception {
            Some(i) => row(
                &mut out,
                "interception",
                &format!(
                    "on ({}, proxy port {}, sockmap {}, cgroup {})",
                    i.mode,
                    i.proxy_port,
                    if i.sockmap { "on" } else { "off" },
                    i.cgroup
                ),
            ),
            None => row(&mut out, "interception", "off"),
        }
        row(
            &mut out,
            "intercepted",
            &format!("{}: {}", self.intercepted.answer, self.intercepted.why),
        );
        row(
            &mut out,
            "accelerated",
            &format!("{}: {}", self.accelerated.answer, self.accelerated.why),
        );
        row(&mut out, "ready", if self.ready { "yes" } else { "no" });
        let c = &self.connections;
        row(
            &mut out,
            "connections",
            &format!(
                "{} opened, {} active, {} closed ({} passed through in the kernel, {} proxied), \
                 {} failed",
                c.opened, c.active, c.closed, c.passed_through, c.proxied, c.failed
            ),
        );
        row(
            &mut out,
            "bytes",
            &format!("{} sent, {} received", c.bytes_sent, c.bytes_received),
        );
        let now = unix_secs(std::time::SystemTime::now());
        row(
            &mut out,
            "security",
            &format!("mode {}, policy {}", self.mode, policy_summary(self, now)),
        );
        if let Some(tls) = &self.tls {
            row(&mut out, "tls", &tls_summary(tls, now));
            row(&mut out, "tunnels", &tunnels_summary(&self.tunnels));
        }
        row(&mut out, "uptime", &format!("{:.1}s", self.uptime_secs));
        if let Some(p) = &self.process {
            row(&mut out, "process", &process_summary(p));
        }
        if !self.ebpf.is_empty() {
            let _ = writeln!(out, "\n{:<26} {:>12}", "EBPF COUNTER", "VALUE");
            for (name, value) in &self.ebpf {
                let _ = writeln!(out, "{name:<26} {value:>12}");
            }
        }
        out
    }
}

fn policy_summary(status: &Status, now: u64) -> String {
    let Some(p) = &status.policy else {
        return "none (everything allowed)".into();
    };
    format!(
        "{} ({} rule(s){}, loaded {}s ago, generation {}, {} refused reload(s))",
        p.file,
        p.rules,
        if p.dry_run { ", dry run" } else { "" },
        now.saturating_sub(p.loaded_unix),
        p.generation,
        p.reload_errors
    )
}

fn tls_summary(tls: &TlsStatus, now: u64) -> String {
    let validity = match tls.not_after_unix.checked_sub(now) {
        Some(left) => format!("expires in {}s", left),
        None => format!("EXPIRED {}s ago", now - tls.not_after_unix),
    };
    format!(
        "{}, {validity} ({}), mesh [{}], inbound {}",
        tls.identity,
        tls.certificate,
        tls.mesh_cidrs.join(", "),
        tls.inbound.as_deref().unwrap_or("off")
    )
}

/// The pool in one line: connections, peers, streams, then each connection.
pub fn tunnels_summary(tunnels: &[PoolRow]) -> String {
    let mut peers: Vec<_> = tunnels.iter().map(|t| t.peer).collect();
    peers.dedup();
    let streams: u32 = tunnels.iter().map(|t| t.streams).sum();
    let each: Vec<String> = tunnels
        .iter()
        .map(|t| format!("{} {} ({} stream(s))", t.peer, t.identity, t.streams))
        .collect();
    let mut line = format!(
        "{} pooled HBONE connection(s) to {} peer(s), {streams} stream(s) open",
        tunnels.len(),
        peers.len()
    );
    if !each.is_empty() {
        let _ = write!(line, ": {}", each.join(", "));
    }
    line
}

fn process_summary(p: &ProcessStatus) -> String {
    let startup = match p.startup_seconds {
        Some(s) => format!("ready {s:.3}s after exec"),
        None => "not ready yet".into(),
    };
    format!(
        "cpu {:.2}s, {:.1} MiB resident, {} open fds, {} threads; {startup}",
        p.cpu_seconds,
        p.resident_memory_bytes as f64 / (1024.0 * 1024.0),
        p.open_fds,
        p.threads
    )
}

fn verdict(answer: &str, why: String) -> Verdict {
    Verdict {
        answer: answer.into(),
        why,
    }
}
