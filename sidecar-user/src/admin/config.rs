//! Observability options of the serving commands, and the pieces of the effective
//! configuration `/config` shows that they share (each command builds its own document).

use std::{net::SocketAddr, str::FromStr};

use serde_json::{Value, json};

use crate::telemetry::access_log::AccessLogTarget;

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

impl AdminListen {
    /// How `/config` shows it: the address, or `off`.
    pub fn shown(&self) -> String {
        match self {
            Self::Default => crate::admin::DEFAULT_ADDR.to_string(),
            Self::Addr(a) => a.to_string(),
            Self::Off => "off".into(),
        }
    }
}

/// Everything observability adds to a serving command (shown in `/config` under the flags'
/// names).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ObserveOptions {
    #[serde(rename = "admin_addr", serialize_with = "shown")]
    pub admin: AdminListen,
    /// The probe listener (`/healthz`, `/readyz` only); none unless asked for.
    #[serde(rename = "probe_addr")]
    pub probe: Option<SocketAddr>,
    #[serde(serialize_with = "serde_with_display")]
    pub access_log: AccessLogTarget,
    /// Distinct destinations that get their own metric series (0 = none).
    #[serde(rename = "metrics_destinations")]
    pub destination_labels: usize,
}

fn shown<S: serde::Serializer>(a: &AdminListen, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&a.shown())
}

fn serde_with_display<S: serde::Serializer>(
    v: &impl std::fmt::Display,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Keys whose values never leave the process: `/config` shows paths, never key material, and
/// a field whose name says it holds a secret is replaced wherever it appears.
const SECRET_MARKERS: [&str; 5] = ["key", "secret", "token", "password", "credential"];

/// `config` with `group`'s fields added, flat. An options group serializes itself under its
/// flags' names ([`ObserveOptions`], [`crate::proxy::ProxySettings`]), so every command that
/// has the group shows the same fields, and a field added to the group reaches them all.
pub fn with<T: serde::Serialize>(mut config: Value, group: &T) -> Value {
    let fields = serde_json::to_value(group).unwrap_or_else(|e| json!({ "error": e.to_string() }));
    if let (Some(map), Value::Object(add)) = (config.as_object_mut(), fields) {
        map.extend(add);
    }
    config
}

/// The workload's program and how many arguments it got, never the arguments: they are
/// where secrets are passed on command lines (`--password=…`, tokens, URLs with
/// credentials), and `/config` may be reachable from other hosts.
pub fn command(argv: &[std::ffi::OsString]) -> Value {
    json!({
        "program": argv.first().map(|p| p.to_string_lossy().into_owned()),
        "arguments": argv.len().saturating_sub(1),
    })
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
    fn the_command_line_shows_the_program_and_the_argument_count_only() {
        let argv: Vec<std::ffi::OsString> = ["/usr/bin/app", "--db-password=hunter2", "serve"]
            .into_iter()
            .map(Into::into)
            .collect();
        let v = command(&argv);
        assert_eq!(v, json!({"program": "/usr/bin/app", "arguments": 2}));
        assert!(!v.to_string().contains("hunter2"));
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
