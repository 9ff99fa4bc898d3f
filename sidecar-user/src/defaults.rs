//! Default ports and paths, in one place: the command line, the Kubernetes manifests in
//! `deploy/` and the checks that compare the two all read them from here.

/// The proxy's outbound listener on 127.0.0.1 and [::1].
pub const PROXY_PORT: u16 = 15001;
/// The mTLS tunnel listener, here and on every peer sidecar.
pub const INBOUND_PORT: u16 = 15008;
/// The admin endpoint (metrics, health, connection table); localhost only by default.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// The probe listener (`--probe-addr`: `/healthz` and `/readyz` only) in the Kubernetes
/// manifests; off unless asked for, since a standalone run needs none.
pub const PROBE_ADDR: &str = "0.0.0.0:15021";
/// The node agent's registration socket (a hostPath shared with pods in Kubernetes).
pub const AGENT_SOCKET: &str = "/var/run/sidecar/agent.sock";
/// Where bpffs is mounted (and mounted by us if it is not).
pub const BPFFS: &str = "/sys/fs/bpf";
/// `sidecar run`'s state files (one per run, for crash recovery) and the bpffs lock.
pub const RUN_STATE_DIR: &str = "/run/sidecar";
/// The node agent's state (registrations). Not under /run/sidecar: on a host /var/run is
/// /run, so that would put it inside the socket directory every meshed pod mounts.
pub const AGENT_STATE_DIR: &str = "/run/sidecar-agent";
