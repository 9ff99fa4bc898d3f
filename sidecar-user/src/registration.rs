//! The registration protocol on the agent's Unix socket: newline-delimited JSON, one request
//! per line, one answer line per request, on a connection the pod's sidecar keeps open.
//!
//! ```text
//! → {"op":"register","pod_uid":"…","proxy_port":15001,"inbound_port":15008,"exclude_ports":[],"exclude_cidrs":[],"ipv6":true,"allow_metadata":false,"listeners":2,"policy":"[[rule]]\n…"}
//!   (+ SCM_RIGHTS: the proxy's outbound listeners, 127.0.0.1 and [::1]; see `host::fd_passing`)
//! ← {"ok":true,"pod_uid":"…","pod_cgroup":"…","proxy_cgroup":"…","scope":3,"sockmap":true}
//! ← {"ok":false,"error":"…","reason":"uid_mismatch"}
//! ← {"ok":false,"error":"…","reason":"bad_policy"}               (nothing of the pod is registered)
//! ← {"ok":false,"error":"…","reason":"node_full","retry":true}   (try again later; not the pod's fault)
//! → {"op":"policy","text":"[[rule]]\n…"}   (this connection's pod: replace its policy)
//! ← {"ok":true}  or  {"ok":false,"error":"…","reason":"bad_policy"}   (refused: the old one stays)
//! → {"op":"circuit","dst":"10.0.0.9:5432","open":true}   (this connection's pod: refuse its
//!   connects to dst at connect() while the proxy's circuit for it is open; false: let them go)
//! ← {"ok":true}  or  {"ok":false,"error":"…","reason":"over_quota"}   (the proxy alone refuses it)
//! → {"op":"counters"}              (the caller's own pod's kernel counters, named by its cgroup)
//! ← {"ok":true,"counters":{"connect_seen":12,"connect_passthrough":9,…}}
//! → {"op":"deregister"}            (this connection's registration)
//! → {"op":"status"}                (uid 0 callers only: registrations, refusals, counters)
//! → {"op":"records"}               (the caller's own pod's pass-through records, streamed)
//! ← {"ok":true}
//! ← {"local":"10.0.0.5:41000","remote":"10.0.0.9:80","started_unix_us":…,…}   (one per close)
//! → {"op":"denies"}                (the connects the kernel refused under the caller's own pod's policy, streamed)
//! ← {"ok":true}
//! ← {"dst":"10.0.0.9:5432","pid":4242}                                          (one per refusal)
//! ```
//!
//! The caller is identified by SO_PEERCRED (its pid) and that pid's cgroup, never by what it
//! sends: `pod_uid` is a claim the agent checks against the cgroup.
//!
//! `policy` is the whole text of the sidecar's policy file (`sidecar proxy --policy`): the
//! agent validates and compiles it as `sidecar policy check` does and installs its outbound
//! half in the pod's kernel slots before the pod's connects are intercepted, so the pod's
//! denied connects fail with EPERM at `connect()` from the first one.

use serde::{Deserialize, Serialize};

/// Longest policy text a pod may hand the agent. Its kernel share is bounded anyway (see
/// the agent's per-pod prefix quota: 32 prefixes fit in far less), and any connection may
/// send a line this long, so it bounds the agent's memory for request lines: 8 connections
/// per pod × 36 KiB.
pub const MAX_POLICY: usize = 16 * 1024;

/// Longest request line the agent reads; longer ones are refused and the connection closed.
/// Room for a policy of [`MAX_POLICY`] bytes escaped in JSON (a valid TOML file has no
/// control characters but tabs and line breaks, each escaped in two bytes, as are quotes and
/// backslashes) and the rest of a register line.
pub const MAX_LINE: usize = 4096 + 2 * MAX_POLICY;

/// Why a request line is not a request.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("request longer than {MAX_LINE} bytes (a policy may be at most {MAX_POLICY} bytes)")]
    TooLong,
    #[error("not a request: {0}")]
    NotARequest(#[from] serde_json::Error),
}

/// Parses one request line (with or without its newline). Everything a caller sends goes
/// through here, so this is what the fuzz target exercises.
pub fn parse_request(line: &[u8]) -> Result<Request, ParseError> {
    if line.len() > MAX_LINE {
        return Err(ParseError::TooLong);
    }
    Ok(serde_json::from_slice(line)?)
}

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
        /// Plaintext connects the proxy adds nothing to may go straight to their destination
        /// (the sidecar has no policy, no `--permissive`, no `--proxy-all`); the agent
        /// records them and streams the records back (`records`).
        #[serde(default)]
        passthrough: bool,
        /// Pass-through connections the pod may have open to one destination (the sidecar's
        /// explicit `--max-connections-per-destination`); the connect hooks refuse more.
        #[serde(default)]
        passthrough_cap: Option<u32>,
        /// Destinations that have sidecars: always through the proxy (mTLS).
        #[serde(default)]
        mesh_cidrs: Vec<String>,
        /// How many listening sockets came with this line (`host::fd_passing`): the proxy's
        /// outbound listeners, which the agent checks and marks so the pod's connects are
        /// redirected to them only. 0 (an older sidecar): registered without that check.
        #[serde(default)]
        listeners: u8,
        /// The sidecar's policy file, whole (at most [`MAX_POLICY`] bytes): the agent
        /// installs its outbound half in the pod's kernel slots before interception starts,
        /// or refuses the registration (`bad_policy`, `over_quota`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
        /// Strict inbound (`sidecar proxy --inbound-mode strict`): new connections from
        /// outside the node to the pod's app containers are dropped in the kernel, so only
        /// the sidecar's tunnel (`inbound_port`, required) reaches them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        strict_inbound: bool,
    },
    /// The pod's proxy opened (`open`) or closed the circuit of `dst`: its connects there are
    /// refused at `connect()` in the kernel while it is open, pass-through ones included.
    /// Held while this connection lives (see the agent's registry).
    Circuit {
        dst: std::net::SocketAddr,
        open: bool,
    },
    /// Replaces the policy of the pod this connection registered (the sidecar reloaded its
    /// file). Refused: the policy in force stays, in the kernel and (the sidecar's side) in
    /// the proxy.
    Policy {
        text: String,
    },
    Deregister,
    Status,
    /// Streams the pass-through records of the caller's pod (named by the caller's cgroup,
    /// never by anything it sends) on this connection until it closes.
    Records,
    /// Streams the connects the kernel refused under the caller's pod's policy (the pod
    /// named as for `records`), so its sidecar counts and logs them by rule.
    Denies,
    /// The kernel's counters of the caller's pod (named as for `records`): what its
    /// connects and strict inbound drops were charged, for its sidecar's `/metrics`.
    Counters,
}

/// A connect of the pod the kernel refused under its policy (EPERM), as the agent streams it
/// to the pod's sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDenied {
    pub dst: std::net::SocketAddr,
    /// The process that called `connect()`.
    pub pid: u32,
}

/// A pass-through connection that closed, as the agent streams it to its pod's sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedThrough {
    /// The app's socket, and the destination it asked for.
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// When the app called `connect()`, microseconds since the epoch.
    pub started_unix_us: u64,
    /// `connect()` to close.
    pub duration_us: u64,
    /// `connect()` to the end of the handshake; `None` if it never completed.
    pub connect_us: Option<u64>,
    /// The socket's sequence-space counters (see `redirect::passthrough`).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub srtt_us: u32,
    pub rtt_min_us: u32,
    pub retransmits: u32,
    /// The TCP state the socket closed from.
    pub last_state: u32,
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
    /// `register` only: whether the node's programs run the sockmap fast path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockmap: Option<bool>,
    /// `register` only: whether the pod's plaintext connections may pass through in the
    /// kernel (asked for, and this node's programs can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<bool>,
    /// `status` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// `counters` only: the pod's own kernel counters by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<std::collections::BTreeMap<String, u64>>,
    /// A refusal for a reason outside the pod's control (the node is full, too many
    /// connections): the sidecar retries instead of exiting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    pub fn refused(reason: &str, error: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(error.to_string()),
            reason: Some(reason.into()),
            ..Self::default()
        }
    }

    /// A refusal the sidecar should retry later (see [`Reply::retry`]).
    pub fn retry_later(reason: &str, error: impl ToString) -> Self {
        Self {
            retry: true,
            ..Self::refused(reason, error)
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
                passthrough: false,
                passthrough_cap: None,
                mesh_cidrs: vec![],
                listeners: 0,
                policy: None,
                strict_inbound: false,
            }
        );
        let with_policy = Request::Register {
            pod_uid: "u".into(),
            proxy_port: 15001,
            inbound_port: 0,
            exclude_ports: vec![],
            exclude_cidrs: vec![],
            ipv6: false,
            allow_metadata: false,
            passthrough: true,
            passthrough_cap: None,
            mesh_cidrs: vec![],
            listeners: 2,
            policy: Some("[[rule]]\naction = \"deny\"\nports = [22]\n".into()),
            strict_inbound: true,
        };
        let line = serde_json::to_string(&with_policy).unwrap();
        assert!(line.contains(r#""policy":"[[rule]]\naction = \"deny\"\nports = [22]\n""#));
        assert_eq!(parse_request(line.as_bytes()).unwrap(), with_policy);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"policy","text":"x"}"#).unwrap(),
            Request::Policy { text: "x".into() }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"policy"}"#).is_err());
        assert!(line.contains(r#""strict_inbound":true"#), "{line}");
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"circuit","dst":"10.0.0.9:80","open":true}"#)
                .unwrap(),
            Request::Circuit {
                dst: "10.0.0.9:80".parse().unwrap(),
                open: true
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"records"}"#).unwrap(),
            Request::Records
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"denies"}"#).unwrap(),
            Request::Denies
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"counters"}"#).unwrap(),
            Request::Counters
        );
        let denied: PolicyDenied =
            serde_json::from_str(r#"{"dst":"10.0.0.9:5432","pid":7}"#).unwrap();
        assert_eq!(denied.dst, "10.0.0.9:5432".parse().unwrap());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"deregister"}"#).unwrap(),
            Request::Deregister
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"sudo"}"#).is_err());
        let line = serde_json::to_string(&Reply::refused("uid_mismatch", "no")).unwrap();
        assert_eq!(line, r#"{"ok":false,"error":"no","reason":"uid_mismatch"}"#);
        let line = serde_json::to_string(&Reply::retry_later("node_full", "full")).unwrap();
        assert_eq!(
            line,
            r#"{"ok":false,"error":"full","reason":"node_full","retry":true}"#
        );
    }

    #[test]
    fn parse_request_bounds_the_line() {
        assert!(matches!(
            parse_request(&vec![b' '; MAX_LINE + 1]),
            Err(ParseError::TooLong)
        ));
        assert!(matches!(
            parse_request(b"{\"op\":\"sudo\"}\n"),
            Err(ParseError::NotARequest(_))
        ));
        assert_eq!(
            parse_request(b"{\"op\":\"status\"}\n").unwrap(),
            Request::Status
        );
    }

    /// The largest policy the agent takes fits in a line, however it is escaped, as long as
    /// it is a policy (no control characters but tabs and line breaks).
    #[test]
    fn a_policy_of_the_largest_size_fits_in_a_line() {
        let worst: String = "\"\\\n\t".repeat(MAX_POLICY / 4);
        assert_eq!(worst.len(), MAX_POLICY);
        let request = Request::Policy { text: worst };
        let line = serde_json::to_vec(&request).unwrap();
        assert!(line.len() <= MAX_LINE, "{} > {MAX_LINE}", line.len());
        assert_eq!(parse_request(&line).unwrap(), request);
    }
}
