//! The agent's admin endpoint (opt-in, `--admin-addr`): `/healthz` for the DaemonSet's
//! probes, `/metrics` with the node-wide eBPF counters (a pod sidecar cannot read them),
//! registered pods and refusals by reason, and `/status` (the `--status` document). Served
//! on the agent's runtime: the agent has no data path to protect.

use std::{
    fmt::Write,
    sync::{Arc, Mutex},
};

use tokio::net::TcpListener;

use super::Agent;
use crate::admin::http::{self, Request, Response};

/// Requests served at once; more are answered 503.
const MAX_CONCURRENT: usize = 16;

/// Every refusal reason, so each series exists from the start (at zero).
pub const REASONS: [&str; 12] = [
    "bad_request",
    "internal",
    "invalid",
    "no_peer_pid",
    "not_in_container",
    "not_in_pod",
    "not_registered",
    "not_root",
    "outside_pods",
    "process_gone",
    "proxy_taken",
    "uid_mismatch",
];

pub async fn serve(listener: TcpListener, agent: Arc<Mutex<Agent>>) {
    http::serve(listener, MAX_CONCURRENT, move |req| route(&agent, req)).await;
}

fn route(agent: &Arc<Mutex<Agent>>, req: &Request) -> Response {
    match req.path.as_str() {
        "/healthz" => Response::text(200, "ok\n"),
        "/status" => Response::json(200, &lock(agent).status()),
        "/metrics" => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&lock(agent).status()),
        ),
        "/" => Response::text(200, "sidecar agent admin: /healthz /metrics /status\n"),
        _ => Response::text(404, "not found; try /\n"),
    }
}

fn lock(agent: &Arc<Mutex<Agent>>) -> std::sync::MutexGuard<'_, Agent> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prometheus text format (0.0.4) of the agent's status document.
fn metrics(status: &serde_json::Value) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let pods = status["pods"].as_array().map_or(0, Vec::len) as u64;
    family(
        "sidecar_agent_registered_pods",
        "gauge",
        "Pods whose sidecar is registered (intercepted).",
        &[(String::new(), pods)],
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
    out
}
