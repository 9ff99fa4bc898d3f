//! `sidecar run`'s flags, and the run's options built from them.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use super::RunOptions;
use crate::{
    admin::flags::ObserveArgs,
    cidr::Cidr,
    cmd::probe,
    proxy::{ProxySettingsArgs, mesh::MeshArgs},
    redirect::Mode,
};

/// `--inbound-mode`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum InboundMode {
    /// Plaintext connections from outside reach the workload's ports as before.
    Permissive,
    /// Only tunnels (delivered by the sidecar over `lo`) reach the workload; plaintext
    /// connection attempts from outside are dropped in the kernel.
    Strict,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// How connections reach the proxy: ebpf (cgroup connect and sockops hooks), iptables
    /// (nat REDIRECT in a chain of our own, SO_ORIGINAL_DST; the classic baseline), or auto
    /// (ebpf when `sidecar probe`'s eBPF checks pass, else iptables with a warning).
    #[arg(long, value_enum, default_value_t = ModeArg::Ebpf)]
    mode: ModeArg,
    /// Port of the proxy's outbound listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = crate::defaults::PROXY_PORT)]
    proxy_port: u16,
    /// Destination ports that bypass the proxy (comma-separated, at most 16).
    #[arg(long, value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// Destination CIDRs that bypass the proxy (comma-separated, e.g. 10.0.0.0/8,fd00::/8).
    #[arg(long, value_delimiter = ',')]
    exclude_cidrs: Vec<Cidr>,
    /// cgroup v2 directory to create for this run (absolute, or relative to the cgroup2
    /// mount). Default: <cgroup2>/sidecar/run-<pid>.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs mount point for pins (mounted there if needed).
    #[arg(long, default_value = crate::defaults::BPFFS)]
    bpffs: PathBuf,
    /// Splice the local legs of proxied connections in the kernel (sockops + sk_msg on a
    /// sockhash). Off by default: measured, it was slower than the plain proxied hop, and a
    /// spliced socket can return EAGAIN early to a blocking reader (docs/operations.md).
    #[arg(long)]
    sockmap: bool,
    /// Send every connection through the proxy. By default (eBPF mode) a connection the
    /// proxy adds nothing to (plaintext, allowed by the policy, not to --mesh-cidrs) goes
    /// straight to its destination and is recorded by the kernel.
    #[arg(long)]
    proxy_all: bool,
    /// Print the eBPF programs' aya-log output (debug aid; costs cycles in the kernel).
    #[arg(long)]
    bpf_log: bool,
    #[command(flatten)]
    proxy: ProxySettingsArgs,
    /// On exit or SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, default_value_t = 5)]
    drain_timeout_secs: u64,
    /// If the proxy or tunnel port is held by another process (the sidecar this one
    /// replaces, still draining: it gives its ports up as its drain starts), wait up to this
    /// many milliseconds for it instead of failing at once.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    port_wait_ms: u64,
    /// Also write the summary as JSON to this file (every connection and eBPF counter).
    #[arg(long)]
    report: Option<PathBuf>,
    #[command(flatten)]
    mesh: MeshArgs,
    #[command(flatten)]
    pub observe: ObserveArgs,
    /// Authorization policy (TOML, see docs/policy.md); re-read when it changes, an invalid
    /// file is refused and the old policy stays.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// strict: only the sidecar's tunnels reach the workload (needs --tls-dir); permissive:
    /// plaintext from outside is accepted too.
    #[arg(long, value_enum, default_value = "permissive")]
    inbound_mode: InboundMode,
    /// Leave CAP_NET_RAW to the command. By default it is dropped (from the bounding set
    /// too): raw sockets send without `connect()`, so no connect hook sees them and the mesh's
    /// policy, metadata refusal and mTLS do not apply to what they send.
    #[arg(long)]
    keep_net_raw: bool,
    /// The command to run, after `--`.
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Ebpf,
    Iptables,
    Auto,
}

impl RunArgs {
    /// The run's options: `--mode auto` is decided here (probing the kernel), and every
    /// flag group is checked; a bad value is a one-line error naming the flag.
    pub fn options(self) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            mode: match self.mode {
                ModeArg::Ebpf => Mode::Ebpf,
                ModeArg::Iptables => Mode::Iptables,
                ModeArg::Auto => probe::auto_mode(&self.bpffs).unwrap_or_else(|why| {
                    eprintln!(
                        "sidecar: warning: --mode auto: eBPF interception is unavailable \
                         ({why}); using iptables mode"
                    );
                    Mode::Iptables
                }),
            },
            proxy_port: self.proxy_port,
            exclude_ports: self.exclude_ports,
            exclude_cidrs: self.exclude_cidrs,
            cgroup: self.cgroup,
            bpffs: self.bpffs,
            sockmap: self.sockmap,
            proxy_all: self.proxy_all,
            bpf_log: self.bpf_log,
            proxy: self.proxy.resolve()?,
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            port_wait: Duration::from_millis(self.port_wait_ms),
            report: self.report,
            mtls: self.mesh.options()?,
            policy: self.policy,
            strict_inbound: self.inbound_mode == InboundMode::Strict,
            keep_net_raw: self.keep_net_raw,
            command: self.command,
            observe: self.observe.into(),
        })
    }
}
