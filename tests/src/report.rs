//! The JSON the sidecar writes with `--report FILE` when it exits.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use anyhow::Context;
use serde::Deserialize;
use sidecar_common::Counter;

#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    /// The command's exit code (128+signal if it was killed).
    pub exit_code: i32,
    pub connections: Vec<Connection>,
    pub counters: Counters,
    /// Tunnels the inbound side refused, by reason.
    #[serde(default)]
    pub inbound_rejections: BTreeMap<String, u64>,
    /// With `--policy`: decisions by rule and outcome, generation, reload errors.
    #[serde(default)]
    pub policy: Option<PolicyReport>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PolicyReport {
    pub generation: u64,
    pub reload_errors: u64,
    pub dry_run: bool,
    pub decisions: Vec<PolicyDecisions>,
}

/// One counter row: decisions of `rule` with `outcome` (allow, deny, audit, would_deny).
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyDecisions {
    pub direction: String,
    pub rule: String,
    pub outcome: String,
    pub count: u64,
}

impl PolicyReport {
    /// How many decisions `rule` made with `outcome`.
    pub fn count(&self, rule: &str, outcome: &str) -> u64 {
        self.decisions
            .iter()
            .filter(|d| d.rule == rule && d.outcome == outcome)
            .map(|d| d.count)
            .sum()
    }
}

/// One connection the proxy accepted from the application.
#[derive(Debug, Clone, Deserialize)]
pub struct Connection {
    pub id: u64,
    /// `outbound` or `inbound`.
    #[serde(default)]
    pub direction: String,
    /// `plain` or `mtls`.
    #[serde(default)]
    pub mode: String,
    /// `proxy`, or `passthrough` (went straight to its destination, recorded by the kernel).
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub src_identity: Option<String>,
    #[serde(default)]
    pub dst_identity: Option<String>,
    /// Whether the tunnel's handshake resumed an earlier session; `None` without a tunnel.
    #[serde(default)]
    pub tls_resumed: Option<bool>,
    /// Whether the connection's HBONE stream rode a tunnel connection already open.
    #[serde(default)]
    pub tunnel_reused: Option<bool>,
    /// The application socket's address.
    pub client: SocketAddr,
    /// Where the application wanted to go. Optional because a connection whose original
    /// destination could not be recovered (`no_original_destination`) has none.
    pub original_dst: Option<SocketAddr>,
    /// The proxy's upstream socket; `None` when the upstream connect failed.
    pub upstream_local: Option<SocketAddr>,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub duration_ms: u64,
    pub app_leg_spliced: bool,
    pub upstream_leg_spliced: bool,
    /// `ok`, `upstream_connect_failed`, `no_original_destination`, `io_error`, `idle_timeout`.
    pub outcome: String,
    /// What went wrong, when the outcome is not `ok`.
    #[serde(default)]
    pub error: Option<String>,
    /// Connect attempts after the first (`--connect-retries`).
    #[serde(default)]
    pub connect_retries: u32,
}

/// Counter name → value, as in the report (and as read live from the pinned map).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    /// The value of `counter`; panics if the report does not have it (every counter of
    /// [`Counter::ALL`] is part of the report contract).
    pub fn get(&self, counter: Counter) -> u64 {
        let name = counter_name(counter);
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("counter {name} is missing from {:?}", self.0))
    }

    /// Names of [`Counter::ALL`] that are absent.
    pub fn missing(&self) -> Vec<&'static str> {
        Counter::ALL
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| !self.0.contains_key(*n))
            .collect()
    }
}

/// The report/metric name of a counter.
pub fn counter_name(counter: Counter) -> &'static str {
    Counter::ALL
        .iter()
        .find(|(c, _)| *c == counter)
        .map(|(_, n)| *n)
        .expect("Counter::ALL lists every counter")
}

impl Connection {
    pub fn mtls(&self) -> bool {
        self.mode == "mtls"
    }

    /// The verified identity of the sidecar at the other end of the tunnel.
    pub fn peer_identity(&self) -> Option<&str> {
        match self.direction.as_str() {
            "inbound" => self.src_identity.as_deref(),
            _ => self.dst_identity.as_deref(),
        }
    }
}

impl Report {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read report {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("report {} is not valid: {text}", path.display()))
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters.get(counter)
    }

    /// Connections whose original destination is `dst`.
    pub fn connections_to(&self, dst: SocketAddr) -> Vec<&Connection> {
        self.connections
            .iter()
            .filter(|c| c.original_dst == Some(dst))
            .collect()
    }

    /// The one connection to `dst`; panics (showing the report) if there is not exactly one.
    pub fn single_connection_to(&self, dst: SocketAddr) -> &Connection {
        match self.connections_to(dst).as_slice() {
            [one] => one,
            other => panic!(
                "expected exactly one connection to {dst} in the report, found {}: {:#?}",
                other.len(),
                self.connections
            ),
        }
    }
}
