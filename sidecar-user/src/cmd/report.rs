//! The end-of-run summary (for people, on stderr) and report (JSON, for scripts and tests).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::telemetry::{
    labels::{Direction, Outcome, Path as ConnPath},
    record::ConnRecord,
};

/// Rows the human summary shows before it abbreviates.
const SUMMARY_ROWS: usize = 20;

#[derive(Debug, Serialize)]
pub struct Report {
    /// The interception mode of the run.
    pub mode: crate::redirect::Mode,
    pub exit_code: i32,
    pub connections: Vec<ConnRecord>,
    /// Connections not recorded because the journal was full.
    pub dropped_records: u64,
    /// The eBPF per-CPU counters, summed.
    pub counters: BTreeMap<&'static str, u64>,
    /// Tunnels the inbound side refused, by reason.
    pub inbound_rejections: BTreeMap<&'static str, u64>,
    /// Policy decisions by rule and outcome (with `--policy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::PolicyReport>,
}

impl Report {
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        std::fs::write(path, json).with_context(|| format!("writing report {}", path.display()))
    }

    pub fn summary(&self) -> String {
        let c = |name: &str| self.counters.get(name).copied().unwrap_or(0);
        let total = self.connections.len();
        let ok = self
            .connections
            .iter()
            .filter(|r| r.outcome == Outcome::Ok)
            .count();
        let fast = self
            .connections
            .iter()
            .filter(|r| r.app_leg_spliced)
            .count();
        let fast_up = self
            .connections
            .iter()
            .filter(|r| r.upstream_leg_spliced)
            .count();
        let passed = self
            .connections
            .iter()
            .filter(|r| r.path == ConnPath::Passthrough)
            .count();
        let proxied = total - passed;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sidecar: {total} connection(s): {passed} passed through in the kernel, {proxied} \
             proxied; {ok} ok, {} failed; kernel fast path on {fast}/{proxied} proxied app legs \
             and {fast_up}/{proxied} upstream legs",
            total - ok
        );
        if self.mode == crate::redirect::Mode::Iptables {
            let _ = writeln!(
                out,
                "sidecar: iptables mode (nat REDIRECT, SO_ORIGINAL_DST): no kernel fast path"
            );
        } else {
            let _ = writeln!(
                out,
                "sidecar: eBPF saw {} connect(s): {} passed through, {} redirected, {} excluded \
                 by port, {} by CIDR; sk_msg redirected {} message(s) ({}), {} missed",
                c("connect_seen"),
                c("connect_passthrough"),
                c("connect_redirected"),
                c("connect_excluded_port"),
                c("connect_excluded_cidr"),
                c("sk_msg_redirected"),
                human_bytes(c("sk_msg_redirected_bytes")),
                c("sk_msg_miss"),
            );
            let refusals = [
                ("by policy", c("connect_policy_denied")),
                ("open circuit", c("connect_circuit_open")),
                ("over the per-destination cap", c("connect_overloaded")),
                ("cloud metadata", c("connect_metadata_denied")),
                ("redirect failed", c("connect_redirect_failed")),
            ];
            let total: u64 = refusals.iter().map(|(_, n)| n).sum();
            if total > 0 {
                let why: Vec<String> = refusals
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(why, n)| format!("{why} {n}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "sidecar: the kernel refused {total} connect(s) (EPERM): {}",
                    why.join(", ")
                );
            }
        }
        let refused: u64 = self.inbound_rejections.values().sum();
        if refused > 0 {
            let reasons: Vec<String> = self
                .inbound_rejections
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "sidecar: refused {refused} inbound tunnel(s): {}",
                reasons.join(", ")
            );
        }
        if let Some(p) = &self.policy {
            let denied_in_kernel = c("connect_policy_denied");
            let decisions: Vec<String> = p
                .decisions
                .iter()
                .map(|d| {
                    format!(
                        "{} {} {} {}",
                        d.direction.as_str(),
                        d.rule,
                        d.decision.as_str(),
                        d.count
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "sidecar: policy (generation {}{}{}): {denied_in_kernel} connect(s) refused in \
                 the kernel; proxy decisions: {}",
                p.generation,
                if p.dry_run { ", dry run" } else { "" },
                if p.reload_errors > 0 {
                    format!(", {} reload(s) refused", p.reload_errors)
                } else {
                    String::new()
                },
                if decisions.is_empty() {
                    "none".to_string()
                } else {
                    decisions.join(", ")
                }
            );
        }
        if total > 0 {
            let _ = writeln!(
                out,
                "  {:>4}  {:<3} {:<22} {:<22} {:>9} {:>9} {:>7}  {:<10} {:<12} PEER",
                "ID", "DIR", "CLIENT", "ORIGINAL DST", "SENT", "RECEIVED", "MS", "PATH", "OUTCOME"
            );
        }
        for r in self.connections.iter().take(SUMMARY_ROWS) {
            let dst = r
                .original_dst
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into());
            // How the bytes went: straight (kernel pass-through), or through the proxy with
            // the legs the sockmap spliced.
            let path = match (r.path, r.app_leg_spliced, r.upstream_leg_spliced) {
                (ConnPath::Passthrough, ..) => "kernel",
                (ConnPath::Proxy, true, true) => "proxy+both",
                (ConnPath::Proxy, true, false) => "proxy+app",
                (ConnPath::Proxy, false, true) => "proxy+up",
                (ConnPath::Proxy, false, false) => "proxy",
            };
            let dir = match r.direction {
                Direction::Outbound => "out",
                Direction::Inbound => "in",
            };
            // Over HBONE: a new tunnel connection, or a stream on one already open.
            let peer = match (r.peer_identity(), r.tunnel_reused) {
                (Some(id), Some(true)) => format!("mTLS {id} (reused tunnel)"),
                (Some(id), Some(false)) => format!("mTLS {id} (new tunnel)"),
                (Some(id), None) => format!("mTLS {id}"),
                (None, _) => "plaintext".to_string(),
            };
            let _ = writeln!(
                out,
                "  {:>4}  {:<3} {:<22} {:<22} {:>9} {:>9} {:>7}  {:<10} {:<12} {}",
                r.id,
                dir,
                r.client.to_string(),
                dst,
                human_bytes(r.bytes_from_client),
                human_bytes(r.bytes_from_upstream),
                r.duration_ms,
                path,
                r.outcome.as_str(),
                peer
            );
        }
        if total > SUMMARY_ROWS {
            let _ = writeln!(
                out,
                "  … {} more (use --report FILE for all)",
                total - SUMMARY_ROWS
            );
        }
        if c("direct_records_dropped") > 0 {
            let _ = writeln!(
                out,
                "sidecar: {} pass-through record(s) lost in the kernel (ring or table full)",
                c("direct_records_dropped")
            );
        }
        if self.dropped_records > 0 {
            let _ = writeln!(
                out,
                "  ({} connection(s) not recorded: journal full)",
                self.dropped_records
            );
        }
        out
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024 * 1024), "1.0 MiB");
    }
}
