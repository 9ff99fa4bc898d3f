//! What the proxy remembers about each connection, for the exit summary and the report.

use std::{net::SocketAddr, sync::Mutex};

use serde::Serialize;

use crate::telemetry::tcp_info::TcpStats;

/// Which way a connection crosses the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the local app, intercepted by the kernel.
    Outbound,
    /// From a peer sidecar, through the mTLS tunnel.
    Inbound,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// What protects the sidecar-to-sidecar leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Plain,
    Mtls,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Plain, Mode::Mtls];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Mtls => "mtls",
        }
    }
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both directions reached EOF.
    Ok,
    /// The accepted socket had no original destination (not an intercepted connection).
    NoOriginalDestination,
    /// Connecting to the original destination failed or timed out.
    UpstreamConnectFailed,
    /// The mTLS tunnel to the destination's sidecar could not be built.
    TunnelFailed,
    /// A read or write failed mid-stream (e.g. a reset).
    IoError,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// The proxy shut down before the connection finished.
    Shutdown,
    /// The inbound side refused the peer (TLS, identity or preamble); see `error`.
    Refused,
    /// The authorization policy denied the connection.
    PolicyDenied,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::NoOriginalDestination,
        Outcome::UpstreamConnectFailed,
        Outcome::TunnelFailed,
        Outcome::IoError,
        Outcome::IdleTimeout,
        Outcome::Shutdown,
        Outcome::Refused,
    ];

    /// Ended before any byte could be forwarded (the connection never carried data).
    pub fn is_setup_failure(self) -> bool {
        matches!(
            self,
            Self::NoOriginalDestination
                | Self::UpstreamConnectFailed
                | Self::TunnelFailed
                | Self::Refused
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoOriginalDestination => "no_original_destination",
            Self::UpstreamConnectFailed => "upstream_connect_failed",
            Self::TunnelFailed => "tunnel_failed",
            Self::IoError => "io_error",
            Self::IdleTimeout => "idle_timeout",
            Self::Shutdown => "shutdown",
            Self::Refused => "refused",
            Self::PolicyDenied => "policy_denied",
        }
    }
}

/// One proxied connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub id: u64,
    pub client: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    pub upstream_local: Option<SocketAddr>,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub duration_ms: u64,
    /// app ↔ proxy hop carried by the sockmap fast path.
    pub app_leg_spliced: bool,
    /// proxy ↔ upstream hop carried by the sockmap fast path (local upstreams only).
    pub upstream_leg_spliced: bool,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub direction: Direction,
    pub mode: Mode,
    /// The proxy's end of the app leg (the listener address the app was redirected to).
    pub proxy_local: Option<SocketAddr>,
    /// How long connecting to the original destination took, in microseconds.
    pub upstream_connect_us: Option<u64>,
    /// SPIFFE identities of the two ends when the connection crossed an mTLS tunnel: for
    /// outbound, ours and the verified server's; for inbound, the verified client's and ours.
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// The policy's decision (`allow`, `deny`, `audit`, `would_deny`) and the rule that
    /// made it; `None` without `--policy`.
    pub policy_decision: Option<&'static str>,
    pub policy_rule: Option<String>,
    /// The kernel's TCP view of each leg (TCP_INFO), read just before the sockets closed.
    pub tcp_app: Option<TcpStats>,
    pub tcp_upstream: Option<TcpStats>,
}

impl ConnRecord {
    /// A connection just accepted from `client`: nothing known yet but who and which way.
    pub fn new(id: u64, direction: Direction, client: SocketAddr) -> Self {
        Self {
            id,
            client,
            original_dst: None,
            upstream_local: None,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            duration_ms: 0,
            app_leg_spliced: false,
            upstream_leg_spliced: false,
            outcome: Outcome::Ok,
            error: None,
            direction,
            mode: Mode::Plain,
            proxy_local: None,
            upstream_connect_us: None,
            src_identity: None,
            dst_identity: None,
            policy_decision: None,
            policy_rule: None,
            tcp_app: None,
            tcp_upstream: None,
        }
    }

    /// The verified identity of the sidecar at the other end of the tunnel, if any.
    pub fn peer_identity(&self) -> Option<&str> {
        match self.direction {
            Direction::Outbound => self.dst_identity.as_deref(),
            Direction::Inbound => self.src_identity.as_deref(),
        }
    }
}

/// Connections the inbound side refused, by reason (`no_client_cert`, `untrusted_ca`,
/// `expired_certificate`, `wrong_identity`, `tls_other`, `alpn`, `preamble_*`, `handshake_timeout`).
#[derive(Default)]
pub struct Rejections {
    counts: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Rejections {
    pub fn count(&self, reason: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Finished connections, bounded so a long run cannot grow without limit; the count of
/// records that did not fit is kept.
pub struct Journal {
    inner: Mutex<(Vec<ConnRecord>, u64)>,
    capacity: usize,
}

impl Journal {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((Vec::new(), 0)),
            capacity,
        }
    }

    pub fn push(&self, record: ConnRecord) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.0.len() < self.capacity {
            inner.0.push(record);
        } else {
            inner.1 += 1;
        }
    }

    /// The records (ordered by id) and how many were dropped for lack of room.
    pub fn snapshot(&self) -> (Vec<ConnRecord>, u64) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut records = inner.0.clone();
        records.sort_by_key(|r| r.id);
        (records, inner.1)
    }
}
