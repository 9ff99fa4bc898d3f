//! The agent's admin endpoint (opt-in, `--admin-addr`): `/healthz` for the DaemonSet's
//! probes, `/metrics` with the node-wide eBPF counters (a pod sidecar cannot read them),
//! registered pods and refusals by reason, the agent's own CPU, memory and descriptors (the
//! standard `process_*` families), and `/status` (counts only: which pods are registered is
//! for root on the node, `sidecar agent --status`). Served on the agent's runtime: the agent
//! has no data path to protect.

use std::{
    fmt::Write,
    sync::{Arc, Mutex},
};

use tokio::net::TcpListener;

use super::Agent;
use crate::{
    admin::http::{self, Request, Response},
    telemetry::process,
};

/// Requests served at once (16, 4 per peer address); more are answered 503.
const LIMITS: http::Limits = http::Limits {
    total: 16,
    per_peer: 4,
    head_timeout: http::HEAD_TIMEOUT,
    answer_timeout: http::ANSWER_TIMEOUT,
};

/// Every refusal reason, so each series exists from the start (at zero).
pub const REASONS: [&str; 19] = [
    "bad_listener",
    "bad_request",
    "internal",
    "invalid",
    "kernel_map",
    "no_peer_pid",
    "node_full",
    "not_in_container",
    "not_in_pod",
    "not_registered",
    "not_root",
    "outside_pods",
    "over_quota",
    "process_gone",
    "proxy_taken",
    "status_from_pod",
    "timeout",
    "too_many_connections",
    "uid_mismatch",
];

pub async fn serve(listener: TcpListener, agent: Arc<Mutex<Agent>>) {
    http::serve(listener, LIMITS, move |req| route(&agent, req)).await;
}

fn route(agent: &Arc<Mutex<Agent>>, req: &Request) -> Response {
    match req.path.as_str() {
        "/healthz" => Response::text(200, "ok\n"),
        "/status" => Response::json(200, &lock(agent).summary()),
        "/metrics" => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&lock(agent).summary()),
        ),
        "/" => Response::text(200, "sidecar agent admin: /healthz /metrics /status\n"),
        _ => Response::text(404, "not found; try /\n"),
    }
}

fn lock(agent: &Arc<Mutex<Agent>>) -> std::sync::MutexGuard<'_, Agent> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prometheus text format (0.0.4) of the agent's summary.
fn metrics(status: &serde_json::Value) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let pods = status["registered_pods"].as_u64().unwrap_or(0);
    family(
        "sidecar_agent_registered_pods",
        "gauge",
        "Pods whose sidecar is registered (intercepted).",
        &[(String::new(), pods)],
    );
    family(
        "sidecar_agent_unchecked_listener_pods",
        "gauge",
        "Registered pods whose sidecar passed no listeners (older than the agent): their \
         connects go to whatever listens on the proxy port, also after the sidecar dies.",
        &[(
            String::new(),
            status["unchecked_listener_pods"].as_u64().unwrap_or(0),
        )],
    );
    family(
        "sidecar_agent_pins_adopted",
        "gauge",
        "1 if this agent adopted pinned programs instead of installing them.",
        &[(String::new(), u64::from(status["adopted"] == true))],
    );
    let refusals = status["refusals"].as_object().cloned().unwrap_or_default();
    let mut reasons: Vec<String> = REASONS.iter().map(|r| r.to_string()).collect();
    reasons.extend(
        refusals
            .keys()
            .filter(|k| !REASONS.contains(&k.as_str()))
            .cloned(),
    );
    let samples: Vec<(String, u64)> = reasons
        .iter()
        .map(|r| {
            let v = refusals.get(r).and_then(|v| v.as_u64()).unwrap_or(0);
            (format!("{{reason=\"{r}\"}}"), v)
        })
        .collect();
    family(
        "sidecar_agent_registration_refusals_total",
        "counter",
        "Registrations refused, by reason.",
        &samples,
    );
    if let Some(counters) = status["counters"].as_object() {
        for (k, v) in counters {
            family(
                &format!("sidecar_ebpf_{k}_total"),
                "counter",
                &format!("eBPF counter {k}, node-wide, summed over CPUs."),
                &[(String::new(), v.as_u64().unwrap_or(0))],
            );
        }
    }
    out.push_str(&process::render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_exports_its_own_cost() {
        let text = metrics(&serde_json::json!({"registered_pods": 2}));
        assert!(text.contains("sidecar_agent_registered_pods 2\n"), "{text}");
        let value = |family: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{family} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {family}:\n{text}"))
        };
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(value("process_resident_memory_bytes") > 0.0);
        assert!(value("process_open_fds") >= 3.0);
        // After 2020, and not in the future.
        let start = value("process_start_time_seconds");
        assert!(
            start > 1.6e9
                && start <= crate::telemetry::unix_secs(std::time::SystemTime::now()) as f64 + 1.0
        );
    }
}
