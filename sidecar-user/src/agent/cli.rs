//! `sidecar agent`'s command line.

use std::{path::PathBuf, time::Duration};

use super::AgentOptions;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The cgroup that holds the pods (absolute, or relative to the cgroup2 mount). Default:
    /// <cgroup2>/kubepods.slice or <cgroup2>/kubepods, whichever exists.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// The registration socket (a hostPath shared with the pods).
    #[arg(long, default_value = crate::defaults::AGENT_SOCKET)]
    pub socket: PathBuf,
    /// Where registrations and the agent's record persist across restarts.
    #[arg(long, default_value = super::STATE_DIR)]
    pub state_dir: PathBuf,
    /// bpffs mount point (mounted there if needed).
    #[arg(long, default_value = crate::defaults::BPFFS)]
    pub bpffs: PathBuf,
    /// Directory on bpffs for the agent's pins. Default: <bpffs>/sidecar/agent.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Turn the sockmap fast path off (connects are still redirected).
    #[arg(long)]
    pub no_sockmap: bool,
    /// How often pods that went away are removed, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub sweep_interval_ms: u64,
    /// Remove every pin, link, state file and the socket (the agent must be stopped), then exit.
    #[arg(long, conflicts_with = "status")]
    pub uninstall: bool,
    /// Ask the running agent for its registrations, refusals and counters (JSON), then exit.
    #[arg(long)]
    pub status: bool,
}

impl From<&AgentArgs> for AgentOptions {
    fn from(a: &AgentArgs) -> Self {
        Self {
            cgroup_root: a.cgroup_root.clone(),
            socket: a.socket.clone(),
            state_dir: a.state_dir.clone(),
            bpffs: a.bpffs.clone(),
            pin_dir: a.pin_dir.clone(),
            sockmap: !a.no_sockmap,
            sweep_interval: Duration::from_millis(a.sweep_interval_ms.max(100)),
        }
    }
}

/// Runs the command the flags ask for; returns the exit code.
pub fn dispatch(args: &AgentArgs) -> anyhow::Result<i32> {
    let opts = AgentOptions::from(args);
    if args.uninstall {
        for line in super::uninstall(&opts)? {
            println!("{line}");
        }
        return Ok(0);
    }
    if args.status {
        println!(
            "{}",
            serde_json::to_string_pretty(&super::status(&opts.socket)?)?
        );
        return Ok(0);
    }
    super::run(opts)
}
