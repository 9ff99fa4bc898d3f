//! The registration protocol on the agent's Unix socket: newline-delimited JSON, one request
//! per line, one answer line per request, on a connection the pod's sidecar keeps open.
//!
//! ```text
//! → {"op":"register","pod_uid":"…","proxy_port":15001,"inbound_port":15008,"exclude_ports":[],"exclude_cidrs":[],"ipv6":true,"allow_metadata":false}
//! ← {"ok":true,"pod_uid":"…","pod_cgroup":"…","proxy_cgroup":"…","scope":3}
//! ← {"ok":false,"error":"…","reason":"uid_mismatch"}
//! → {"op":"deregister"}            (this connection's registration)
//! → {"op":"status"}                (uid 0 callers only: registrations, refusals, counters)
//! ```
//!
//! The caller is identified by SO_PEERCRED (its pid) and that pid's cgroup, never by what it
//! sends: `pod_uid` is a claim the agent checks against the cgroup.

use serde::{Deserialize, Serialize};

/// Longest request line the agent reads; longer ones are refused and the connection closed.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Register {
        pod_uid: String,
        proxy_port: u16,
        #[serde(default)]
        inbound_port: u16,
        #[serde(default)]
        exclude_ports: Vec<u16>,
        /// Destination CIDRs that bypass the proxy, e.g. `10.96.0.1/32`.
        #[serde(default)]
        exclude_cidrs: Vec<String>,
        /// The proxy listens on `[::1]` too: IPv6 connects may be redirected.
        #[serde(default)]
        ipv6: bool,
        /// The pod may reach the cloud metadata address (`sidecar proxy --allow-metadata`);
        /// otherwise its connects there are refused in the kernel.
        #[serde(default)]
        allow_metadata: bool,
    },
    Deregister,
    Status,
}

/// Every answer: `ok`, and on failure `error` (one line) and `reason` (a counter name).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
    /// `status` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

impl Reply {
    pub fn refused(reason: &str, error: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(error.to_string()),
            reason: Some(reason.into()),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(
            r#"{"op":"register","pod_uid":"u","proxy_port":15001,"inbound_port":15008,"exclude_ports":[22]}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Register {
                pod_uid: "u".into(),
                proxy_port: 15001,
                inbound_port: 15008,
                exclude_ports: vec![22],
                exclude_cidrs: vec![],
                ipv6: false,
                allow_metadata: false,
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"deregister"}"#).unwrap(),
            Request::Deregister
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"sudo"}"#).is_err());
        let line = serde_json::to_string(&Reply::refused("uid_mismatch", "no")).unwrap();
        assert_eq!(line, r#"{"ok":false,"error":"no","reason":"uid_mismatch"}"#);
    }
}
