//! Observability options of `sidecar run`, and the effective configuration `/config` shows.

use std::{net::SocketAddr, str::FromStr};

use serde_json::{Value, json};

use crate::{run::RunOptions, telemetry::access_log::AccessLogTarget};

/// Where the admin server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminListen {
    /// 127.0.0.1:15000, skipped with a warning if busy (so concurrent runs still start).
    #[default]
    Default,
    /// An address the user chose: a busy port is an error.
    Addr(SocketAddr),
    Off,
}

impl FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse().map(Self::Addr).map_err(|_| {
            format!("{s:?} is not an admin address: use IP:PORT (e.g. 127.0.0.1:15000) or off")
        })
    }
}

/// Everything observability adds to `sidecar run`.
#[derive(Debug, Clone, Default)]
pub struct ObserveOptions {
    pub admin: AdminListen,
    pub access_log: AccessLogTarget,
    /// Distinct destinations that get their own metric series (0 = none).
    pub destination_labels: usize,
}

/// Keys whose values never leave the process (certificate keys, tokens, … once they exist).
const SECRET_MARKERS: [&str; 5] = ["key", "secret", "token", "password", "credential"];

/// The run's effective configuration, secrets redacted.
pub fn effective(opts: &RunOptions) -> Value {
    let v = json!({
        "proxy_port": opts.proxy_port,
        "exclude_ports": opts.exclude_ports,
        "exclude_cidrs": opts.exclude_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "cgroup": opts.cgroup.as_ref().map(|p| p.display().to_string()),
        "bpffs": opts.bpffs.display().to_string(),
        "sockmap": opts.sockmap,
        "bpf_log": opts.bpf_log,
        "connect_timeout_ms": opts.proxy.connect_timeout.as_millis() as u64,
        "idle_timeout_secs": opts.proxy.idle_timeout.as_secs(),
        "drain_timeout_secs": opts.drain_timeout.as_secs(),
        "report": opts.report.as_ref().map(|p| p.display().to_string()),
        "command": opts.command.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
        "admin_addr": match opts.observe.admin {
            AdminListen::Default => crate::admin::DEFAULT_ADDR.to_string(),
            AdminListen::Addr(a) => a.to_string(),
            AdminListen::Off => "off".into(),
        },
        "access_log": opts.observe.access_log.to_string(),
        "metrics_destinations": opts.observe.destination_labels,
        "mode": "plain",
        "policy": "none",
    });
    redact(v)
}

/// Replaces the value of every key that names a secret, at any depth.
pub fn redact(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    if SECRET_MARKERS.iter().any(|m| lower.contains(m)) && !v.is_null() {
                        (k, Value::String("[redacted]".into()))
                    } else {
                        (k, redact(v))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let v = redact(json!({
            "proxy_port": 1,
            "tls": {"private_key": "-----BEGIN", "cert": "c", "items": [{"api_token": "t"}]},
            "password": null,
        }));
        assert_eq!(v["proxy_port"], 1);
        assert_eq!(v["tls"]["private_key"], "[redacted]");
        assert_eq!(v["tls"]["cert"], "c");
        assert_eq!(v["tls"]["items"][0]["api_token"], "[redacted]");
        assert!(
            v["password"].is_null(),
            "absent secrets stay visibly absent"
        );
    }

    #[test]
    fn admin_addresses_parse() {
        assert_eq!("off".parse(), Ok(AdminListen::Off));
        assert_eq!(
            "127.0.0.1:17000".parse(),
            Ok(AdminListen::Addr("127.0.0.1:17000".parse().unwrap()))
        );
        assert!("localhost".parse::<AdminListen>().is_err());
    }
}
