//! `/status`: "is my workload really intercepted and accelerated?" answered yes or no, with
//! the counters that prove it. `sidecar status` renders the same document as a table.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::{
    proxy::record::{Direction, Mode, Outcome},
    telemetry::{InterceptionInfo, Telemetry, metrics::LEGS},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// What is attached (absent before attach and after detach).
    pub interception: Option<InterceptionInfo>,
    pub ready: bool,
    pub intercepted: Verdict,
    pub accelerated: Verdict,
    pub connections: Connections,
    /// `plain` until mTLS is built.
    pub mode: String,
    /// `none` until policy is built.
    pub policy: String,
    /// The eBPF counters, summed over CPUs (empty when not attached).
    pub ebpf: BTreeMap<String, u64>,
    pub uptime_secs: f64,
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
        };
        for d in Direction::ALL.map(Direction::as_str) {
            for mode in Mode::ALL.map(Mode::as_str) {
                c.opened += m.opened.with_label_values(&[d, mode]).get();
            }
            for o in Outcome::ALL {
                c.closed += m.closed.with_label_values(&[d, o.as_str()]).get();
                if o.is_setup_failure() {
                    c.failed += m.failed.with_label_values(&[d, o.as_str()]).get();
                }
            }
            c.active += m.active.with_label_values(&[d]).get();
            c.bytes_sent += m.sent_bytes.with_label_values(&[d]).get();
            c.bytes_received += m.received_bytes.with_label_values(&[d]).get();
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
            Some(i) if i.mode == "agent" && c.opened > 0 => verdict(
                "yes",
                format!(
                    "{} connection(s) reached the proxy through the node agent's interception",
                    c.opened
                ),
            ),
            Some(_) if k("connect_redirected") > 0 => verdict(
                "yes",
                format!(
                    "{} of {} connect(s) from the workload were redirected to the proxy \
                     ({} excluded by port, {} by CIDR)",
                    k("connect_redirected"),
                    k("connect_seen"),
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
            Some(i) if i.mode == "agent" => verdict(
                "unknown",
                "the splice counters are the node agent's: `sidecar agent --status`".into(),
            ),
            Some(i) if !i.sockmap => verdict("no", "the sockmap fast path is off".into()),
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
        Self {
            interception: info,
            ready: t.is_ready(),
            intercepted,
            accelerated,
            connections: c,
            mode: Mode::Plain.as_str().into(),
            policy: "none".into(),
            ebpf: ebpf
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            uptime_secs: t.uptime().as_secs_f64(),
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
                "{} opened, {} active, {} closed, {} failed",
                c.opened, c.active, c.closed, c.failed
            ),
        );
        row(
            &mut out,
            "bytes",
            &format!("{} sent, {} received", c.bytes_sent, c.bytes_received),
        );
        row(
            &mut out,
            "security",
            &format!("mode {}, policy {}", self.mode, self.policy),
        );
        row(&mut out, "uptime", &format!("{:.1}s", self.uptime_secs));
        if !self.ebpf.is_empty() {
            let _ = writeln!(out, "\n{:<26} {:>12}", "EBPF COUNTER", "VALUE");
            for (name, value) in &self.ebpf {
                let _ = writeln!(out, "{name:<26} {value:>12}");
            }
        }
        out
    }
}

fn verdict(answer: &str, why: String) -> Verdict {
    Verdict {
        answer: answer.into(),
        why,
    }
}
