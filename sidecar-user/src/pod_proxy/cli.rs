//! `sidecar proxy`'s command line.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::PodProxyOptions;
use crate::{
    admin::cli::ObserveArgs,
    cidr::Cidr,
    proxy::{
        ProxySettings,
        limits::{LimitArgs, LimitError, Limits},
        mesh::MtlsOptions,
        resilience::{Resilience, ResilienceArgs, ResilienceError},
    },
    tls::{TlsFiles, layout::LayoutError},
};

/// Why the command line cannot become [`PodProxyOptions`].
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Limits(#[from] LimitError),
    #[error(transparent)]
    Resilience(#[from] ResilienceError),
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
    /// How long connecting to an original destination may take, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// Close a connection after this many seconds without a byte in either direction.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Let the workload reach the cloud metadata address (169.254.169.254, fd00:ec2::254);
    /// refused by default, in the kernel (the agent sets it per pod) and in the proxy.
    #[arg(long)]
    pub allow_metadata: bool,
    /// On SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, default_value_t = 5)]
    pub drain_timeout_secs: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub resilience: ResilienceArgs,
    /// Turn on mTLS with the credentials in DIR, in any layout `sidecar run --tls-dir` takes
    /// (ours, a cert-manager Secret, the SPIFFE helper's); rotated when the files change.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: port of the tunnel listener, here and on every peer sidecar.
    #[arg(long, default_value_t = crate::defaults::INBOUND_PORT)]
    pub inbound_port: u16,
    /// With --tls-dir: accept no tunnels (a client-only sidecar).
    #[arg(long)]
    pub no_inbound: bool,
    /// With --tls-dir: address the tunnel listener binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub inbound_addr: std::net::IpAddr,
    /// With --tls-dir: destinations that have sidecars; their traffic must be mTLS.
    #[arg(long, value_delimiter = ',')]
    pub mesh_cidrs: Vec<Cidr>,
    /// With --tls-dir: try mTLS to every other destination too, falling back to plaintext.
    #[arg(long)]
    pub permissive: bool,
    /// With --tls-dir: how long a peer has, after the handshake, to send the preamble (ms).
    #[arg(long, default_value_t = 5000)]
    pub preamble_timeout_ms: u64,
    /// Authorization policy (TOML, the same schema as `sidecar run --policy`), enforced in
    /// the proxy: outbound rules when it connects upstream, inbound rules on the verified
    /// peer identity. Re-read when it changes; an invalid file is refused, the old one stays.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Send every connection through the proxy. By default a pod without --policy and
    /// --permissive lets the agent pass plaintext connections to destinations outside
    /// --mesh-cidrs straight through in the kernel (recorded, and streamed to this sidecar).
    #[arg(long)]
    pub proxy_all: bool,
    #[command(flatten)]
    pub observe: ObserveArgs,
}

impl TryFrom<ProxyArgs> for PodProxyOptions {
    type Error = ArgsError;

    /// Fails when `--tls-dir` holds none of the certificate layouts we read, or a cap is 0.
    fn try_from(a: ProxyArgs) -> Result<Self, Self::Error> {
        let files = a.tls_dir.as_deref().map(TlsFiles::discover).transpose()?;
        Ok(Self {
            agent_socket: a.agent_socket,
            pod_uid: a.pod_uid,
            pod_namespace: a.pod_namespace.filter(|s| !s.is_empty()),
            service_account: a.service_account.filter(|s| !s.is_empty()),
            proxy_port: a.proxy_port,
            exclude_ports: a.exclude_ports,
            exclude_cidrs: a.exclude_cidrs,
            proxy: ProxySettings {
                connect_timeout: Duration::from_millis(a.connect_timeout_ms),
                idle_timeout: Duration::from_secs(a.idle_timeout_secs),
                allow_metadata: a.allow_metadata,
                limits: Limits::resolve(a.limits)?,
                resilience: Resilience::resolve(a.resilience)?,
            },
            drain_timeout: Duration::from_secs(a.drain_timeout_secs),
            mtls: files.map(|files| MtlsOptions {
                files,
                inbound: (!a.no_inbound).then(|| SocketAddr::new(a.inbound_addr, a.inbound_port)),
                tunnel_port: a.inbound_port,
                mesh_cidrs: a.mesh_cidrs,
                permissive: a.permissive,
                preamble_timeout: Duration::from_millis(a.preamble_timeout_ms),
            }),
            policy: a.policy,
            proxy_all: a.proxy_all,
            observe: a.observe.into(),
        })
    }
}
