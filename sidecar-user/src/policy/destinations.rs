//! Per-destination resilience settings from the policy file's `[[destination]]` tables:
//! retries, circuit breaking and the connection cap for the destinations they name, over the
//! command line's defaults. The first table that matches a destination applies; a setting a
//! table leaves out keeps the command line's value.
//!
//! ```toml
//! [[destination]]
//! name = "orders-db"               # optional; /config shows it (else destination-<n>)
//! destinations = ["10.0.5.0/24"]   # required
//! ports = [5432]                   # optional: all ports
//! connect_retries = 4
//! retry_backoff_ms = 50
//! circuit_failures = 3             # 0: no circuit breaking for these
//! circuit_open_ms = 2000
//! circuit_open_max_ms = 60000
//! max_connections = 64             # open at once to each ip:port matched
//! ```

use std::net::SocketAddr;

use serde::Serialize;

use super::rules::PortRange;
use crate::cidr::Cidr;

/// One `[[destination]]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationSettings {
    pub name: String,
    /// Line of its `[[destination]]` header.
    pub line: usize,
    #[serde(serialize_with = "display_all")]
    pub destinations: Vec<Cidr>,
    #[serde(serialize_with = "display_ports")]
    pub ports: Vec<PortRange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_backoff_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_open_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_open_max_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
}

impl DestinationSettings {
    pub fn matches(&self, dst: SocketAddr) -> bool {
        self.destinations.iter().any(|c| c.contains(dst.ip()))
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(dst.port())))
    }
}

/// Checks the values a table sets: `Err` names the field and the fix.
pub fn check(t: &DestinationSettings) -> Result<(), (&'static str, String)> {
    for (field, v) in [
        ("retry_backoff_ms", t.retry_backoff_ms),
        ("circuit_open_ms", t.circuit_open_ms),
        ("circuit_open_max_ms", t.circuit_open_max_ms),
    ] {
        if v == Some(0) {
            return Err((field, format!("`{field} = 0`: it must be at least 1 ms")));
        }
    }
    if t.max_connections == Some(0) {
        return Err((
            "max_connections",
            "`max_connections = 0` would refuse every connection: use a deny rule for that".into(),
        ));
    }
    if let (Some(open), Some(max)) = (t.circuit_open_ms, t.circuit_open_max_ms)
        && max < open
    {
        return Err((
            "circuit_open_max_ms",
            format!("circuit_open_max_ms ({max}) is shorter than circuit_open_ms ({open})"),
        ));
    }
    Ok(())
}

fn display_all<S: serde::Serializer>(v: &[Cidr], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|c| c.to_string()))
}

fn display_ports<S: serde::Serializer>(v: &[PortRange], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|p| match p.first == p.last {
        true => p.first.to_string(),
        false => format!("{}-{}", p.first, p.last),
    }))
}
