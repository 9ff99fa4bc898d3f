//! What is remembered about each connection, proxied or passed through: the label enums
//! that name its direction, mode, path and outcome (the same strings in metrics, access log
//! and report), the finished [`ConnRecord`] and the [`Journal`] that keeps them for the exit
//! report. A proxied connection's record is filled through its [`Conn`](super::Conn) handle,
//! so each fact is written once and reaches the live table, the metrics and the record alike.

use std::{net::SocketAddr, sync::Mutex};

use serde::Serialize;

use super::tcp_info::TcpStats;

/// Declares an enum of metric-label values: the variants, their label strings and `ALL` (in
/// declaration order) come from one list, so no list of variants can drift from the enum.
/// Serialized as the same strings.
macro_rules! labels {
    ($(#[$meta:meta])* pub enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $label)] $variant,)+
        }

        impl $name {
            pub const ALL: [$name; [$(stringify!($variant)),+].len()] = [$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

labels! {
    /// Which way a connection crosses the sidecar.
    pub enum Direction {
        /// From the local app, intercepted by the kernel.
        Outbound => "outbound",
        /// From a peer sidecar, through the mTLS tunnel.
        Inbound => "inbound",
    }
}

labels! {
    /// What protects the sidecar-to-sidecar leg.
    pub enum Mode {
        Plain => "plain",
        Mtls => "mtls",
    }
}

labels! {
    /// Which way the connection's bytes went.
    pub enum Path {
        /// Through the proxy (two sockets, the proxy copying between them).
        Proxy => "proxy",
        /// Straight to the destination: the kernel let the connect through and recorded it.
        Passthrough => "passthrough",
    }
}

impl Path {
    /// Only outbound connections can pass through (inbound ones arrive in a tunnel).
    pub fn applies_to(self, direction: Direction) -> bool {
        self == Self::Proxy || direction == Direction::Outbound
    }
}

labels! {
    /// How a connection ended.
    pub enum Outcome {
        /// Both directions reached EOF.
        Ok => "ok",
        /// The accepted socket had no original destination (not an intercepted connection).
        NoOriginalDestination => "no_original_destination",
        /// Connecting to the original destination failed or timed out.
        UpstreamConnectFailed => "upstream_connect_failed",
        /// The mTLS tunnel to the destination's sidecar could not be built.
        TunnelFailed => "tunnel_failed",
        /// A read or write failed mid-stream (e.g. a reset).
        IoError => "io_error",
        /// No byte moved in either direction for the idle timeout.
        IdleTimeout => "idle_timeout",
        /// The proxy shut down before the connection finished.
        Shutdown => "shutdown",
        /// The inbound side refused the peer (TLS, identity or preamble); see `error`.
        Refused => "refused",
        /// The authorization policy denied the connection.
        PolicyDenied => "policy_denied",
        /// Too many connections to this destination were open
        /// (`--max-connections-per-destination`).
        Overloaded => "overloaded",
        /// The destination's circuit was open (it kept failing): failed without a connect.
        CircuitOpen => "circuit_open",
    }
}

impl Outcome {
    /// Ended before any byte could be forwarded (the connection never carried data).
    pub fn is_setup_failure(self) -> bool {
        matches!(
            self,
            Self::NoOriginalDestination
                | Self::UpstreamConnectFailed
                | Self::TunnelFailed
                | Self::Refused
                | Self::Overloaded
                | Self::CircuitOpen
        )
    }
}

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
    pub mode: Mode,
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
            path: Path::Proxy,
            proxy_local: None,
            upstream_connect_us: None,
            connect_retries: 0,
            src_identity: None,
            dst_identity: None,
            tls_resumed: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_serialize_as_their_strings_and_all_lists_every_variant() {
        fn check<T: Serialize + Copy>(all: &[T], label: impl Fn(T) -> &'static str) {
            for v in all {
                assert_eq!(serde_json::to_value(v).unwrap(), label(*v));
            }
        }
        check(&Direction::ALL, Direction::as_str);
        check(&Mode::ALL, Mode::as_str);
        check(&Path::ALL, Path::as_str);
        check(&Outcome::ALL, Outcome::as_str);
        // A variant missing from ALL would not compile in as_str's match, and ALL is built
        // from the same list; this pins the count the metrics pre-initialise.
        assert_eq!(Outcome::ALL.len(), 11);
        assert!(Outcome::ALL.contains(&Outcome::PolicyDenied));
    }
}
