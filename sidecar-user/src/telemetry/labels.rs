//! The one vocabulary the sidecar is described in: how it intercepts ([`Mode`]) and what it
//! requires of peers ([`Protection`]); for each connection, which way it crossed the sidecar,
//! what carried it, which path its bytes took and how it ended; the policy's decisions, the
//! caps, circuit changes and connect attempts the proxy counts. The same strings name it in
//! metrics, the access log, `/status`, the report and the policy (a policy rule's `direction`
//! is a [`Direction`]). Every list of values is the enum's `ALL`. Kept free of other modules
//! so the policy fuzz target can compile it, and so telemetry and the admin server can name
//! an interception mode without importing the interception code.

use serde::{Deserialize, Serialize};

/// Declares an enum of metric-label values: the variants, their label strings and `ALL` (in
/// declaration order) come from one list, so no list of variants can drift from the enum.
/// Serialized as the same strings.
macro_rules! labels {
    ($(#[$meta:meta])* pub enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

labels! {
    /// How connections are intercepted: the sidecar's one "mode". `sidecar run --mode` picks
    /// eBPF or iptables; `sidecar proxy` is always `agent`.
    pub enum Mode {
        /// cgroup connect hooks rewrite the destination (this process attached them).
        Ebpf => "ebpf",
        /// nat `REDIRECT` in a chain of our own; `SO_ORIGINAL_DST` (the classic baseline).
        Iptables => "iptables",
        /// The node agent's eBPF programs steer the pod's connections; this unprivileged
        /// process only proxies them (and its kernel counters are the agent's).
        Agent => "agent",
    }
}

labels! {
    /// What the sidecar requires of the peers it talks to (`/status`, `/config`).
    #[derive(Default)]
    pub enum Protection {
        /// No `--tls-dir`: every connection is plaintext.
        #[default]
        Plain => "plain",
        /// Meshed destinations get mTLS tunnels, and only tunnels reach them.
        Mtls => "mtls",
        /// Destinations without a sidecar fall back to plaintext.
        Permissive => "permissive",
    }
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
    /// What carried the connection between sidecars: plaintext or an mTLS tunnel. Named `mode`
    /// in the access log, `/connections` and the metric labels (the word users read there).
    pub enum Transport {
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
        /// The inbound side refused the peer (TLS, identity, HTTP/2 or its CONNECT); see `error`.
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

labels! {
    /// Which cap refused a connection: the `reason` label.
    pub enum Cap {
        /// `--max-connections`: connections served at once, both directions.
        Connections => "max_connections",
        /// `--max-pending-handshakes`: tunnel connections not through their TLS handshake yet.
        PendingHandshakes => "max_pending_handshakes",
        /// `--max-connections-per-destination`: outbound connections open to one ip:port.
        PerDestination => "max_connections_per_destination",
        /// `--max-pending-connects`: connects to destinations (or the local app) in progress.
        PendingConnects => "max_pending_connects",
    }
}

labels! {
    /// What the authorization policy decided for a connection: the `decision` label.
    pub enum Decision {
        Allow => "allow",
        Deny => "deny",
        Audit => "audit",
        /// A deny in dry-run mode: let through, logged.
        WouldDeny => "would_deny",
    }
}

labels! {
    /// Whether one connect retry connected: the `outcome` label of connect retries.
    pub enum Attempt {
        Connected => "connected",
        Failed => "failed",
    }
}

labels! {
    /// A change of a circuit's state, for the transitions counter and the open gauge.
    pub enum Transition {
        Opened => "open",
        HalfOpened => "half_open",
        Closed => "closed",
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
        check(&Mode::ALL, Mode::as_str);
        check(&Protection::ALL, Protection::as_str);
        check(&Direction::ALL, Direction::as_str);
        check(&Transport::ALL, Transport::as_str);
        check(&Path::ALL, Path::as_str);
        check(&Outcome::ALL, Outcome::as_str);
        check(&Cap::ALL, Cap::as_str);
        check(&Transition::ALL, Transition::as_str);
        check(&Decision::ALL, Decision::as_str);
        check(&Attempt::ALL, Attempt::as_str);
        // A variant missing from ALL would not compile in as_str's match, and ALL is built
        // from the same list; this pins the count the metrics pre-initialise.
        assert_eq!(Outcome::ALL.len(), 11);
        assert!(Outcome::ALL.contains(&Outcome::PolicyDenied));
    }
}
