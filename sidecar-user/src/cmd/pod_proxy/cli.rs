//! `sidecar proxy`'s command line.

use std::{path::PathBuf, time::Duration};

use super::PodProxyOptions;
use crate::{
    admin::flags::ObserveArgs,
    cidr::Cidr,
    cmd::run::cli::InboundMode,
    proxy::{
        ProxySettingsArgs, SettingsError,
        mesh::{MeshArgs, MeshError},
    },
};

/// Why the command line cannot become [`PodProxyOptions`].
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
}

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The node agent's registration socket.
    #[arg(long, default_value = crate::defaults::AGENT_SOCKET)]
    pub agent_socket: PathBuf,
    /// The pod's UID (downward API `metadata.uid`); the agent checks it against this
    /// process's cgroup.
    #[arg(long, env = "POD_UID", default_value = "")]
    pub pod_uid: String,
    /// The pod's namespace (downward API `metadata.namespace`): with --tls-dir the
    /// certificate must be spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The pod's service account (downward API `spec.serviceAccountName`).
    #[arg(long, env = "POD_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Port of the proxy's outbound listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = crate::defaults::PROXY_PORT)]
    pub proxy_port: u16,
    /// Destination ports that bypass the proxy (comma-separated, at most 16).
    #[arg(long, value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs that bypass the proxy (comma-separated, at most 64).
    #[arg(long, value_delimiter = ',')]
    pub exclude_cidrs: Vec<Cidr>,
    #[command(flatten)]
    pub proxy: ProxySettingsArgs,
    /// On SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, default_value_t = 5)]
    pub drain_timeout_secs: u64,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// Authorization policy (TOML, the same schema as `sidecar run --policy`, at most 16 KiB):
    /// sent to the node agent, which enforces its outbound rules at connect() (EPERM), and
    /// enforced in the proxy (inbound rules on the verified peer identity). Re-read when it
    /// changes; a file refused here or by the agent leaves the old one in force in both.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Send every connection through the proxy. By default a pod without --permissive lets
    /// the agent pass plaintext connections its policy allows to destinations outside
    /// --mesh-cidrs straight through in the kernel (recorded, and streamed to this sidecar).
    #[arg(long)]
    pub proxy_all: bool,
    /// strict: only the sidecar's tunnel reaches the pod's app containers (needs --tls-dir
    /// with its inbound listener); the node agent drops other connection attempts from outside
    /// the node in the kernel. permissive: plaintext from outside is accepted too.
    #[arg(long, value_enum, default_value = "permissive")]
    pub inbound_mode: InboundMode,
    #[command(flatten)]
    pub observe: ObserveArgs,
}

impl TryFrom<ProxyArgs> for PodProxyOptions {
    type Error = ArgsError;

    /// Fails when `--tls-dir` holds none of the certificate layouts we read, or a cap is 0.
    fn try_from(a: ProxyArgs) -> Result<Self, Self::Error> {
        Ok(Self {
            agent_socket: a.agent_socket,
            pod_uid: a.pod_uid,
            pod_namespace: a.pod_namespace.filter(|s| !s.is_empty()),
            service_account: a.service_account.filter(|s| !s.is_empty()),
            proxy_port: a.proxy_port,
            exclude_ports: a.exclude_ports,
            exclude_cidrs: a.exclude_cidrs,
            proxy: a.proxy.resolve()?,
            drain_timeout: Duration::from_secs(a.drain_timeout_secs),
            mtls: a.mesh.options()?,
            policy: a.policy,
            proxy_all: a.proxy_all,
            strict_inbound: a.inbound_mode == InboundMode::Strict,
            observe: a.observe.into(),
        })
    }
}
