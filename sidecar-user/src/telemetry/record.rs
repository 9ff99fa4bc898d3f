//! What is remembered about each connection, proxied or passed through: the finished
//! [`ConnRecord`] (in the [`labels`](super::labels) vocabulary) and the [`Journal`] that
//! keeps them for the exit report. A proxied connection's record is filled through its [`Conn`](super::Conn) handle,
//! so each fact is written once and reaches the live table, the metrics and the record alike.

use std::{net::SocketAddr, sync::Mutex};

use serde::Serialize;

use super::{
    labels::{Decision, Direction, Outcome, Path, Transport},
    tcp_info::TcpStats,
};

/// One connection: proxied, or passed through in the kernel ([`Path`]).
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
    #[serde(rename = "mode")]
    pub transport: Transport,
    pub path: Path,
    /// The proxy's end of the app leg (the listener address the app was redirected to).
    pub proxy_local: Option<SocketAddr>,
    /// How long connecting to the original destination took, in microseconds.
    pub upstream_connect_us: Option<u64>,
    /// Connect attempts after the first (the destination refused, was unreachable or did
    /// not answer, and the retry came before any byte was forwarded).
    pub connect_retries: u32,
    /// SPIFFE identities of the two ends when the connection crossed an mTLS tunnel: for
    /// outbound, ours and the verified server's; for inbound, the verified client's and ours.
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// Whether the tunnel's TLS handshake resumed an earlier session (a ticket, no certificate
    /// exchange) rather than doing a full one; `None` when no tunnel was built. Resumption is
    /// what makes new tunnels cheap, so a rate of `false` says whether it works.
    pub tls_resumed: Option<bool>,
    /// Whether the connection's HBONE stream rode a tunnel connection already open (no
    /// handshake of its own: pooling at work); `None` when no tunnel was used.
    pub tunnel_reused: Option<bool>,
    /// The policy's decision (`allow`, `deny`, `audit`, `would_deny`) and the rule that
    /// made it; `None` without `--policy`.
    pub policy_decision: Option<Decision>,
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
            transport: Transport::Plain,
            path: Path::Proxy,
            proxy_local: None,
            upstream_connect_us: None,
            connect_retries: 0,
            src_identity: None,
            dst_identity: None,
            tls_resumed: None,
            tunnel_reused: None,
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

/// Finished connections, bounded so a long run cannot grow without limit; the count of
/// records that did not fit is kept.
pub struct Journal {
    inner: Mutex<(Vec<ConnRecord>, u64)>,
    capacity: usize,
}

impl Journal {
    /// Reserves room for `capacity` records at once: the kernel backs only the pages records
    /// are written to, so the cost grows record by record, never by a doubling.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((Vec::with_capacity(capacity), 0)),
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
