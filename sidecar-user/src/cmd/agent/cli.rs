//! `sidecar agent`'s command line.

use std::{path::PathBuf, time::Duration};

use sidecar_common::limits;

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
    /// Splice the local legs of pods' proxied connections in the kernel (sockops + sk_msg).
    /// Off by default: measured slower than the plain hop, and a spliced socket can return
    /// EAGAIN early to a blocking reader (docs/operations.md).
    #[arg(long)]
    pub sockmap: bool,
    /// How often pods that went away are removed, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub sweep_interval_ms: u64,
    /// Admin endpoint (/healthz, /metrics with the node-wide eBPF counters, /status): IP:PORT,
    /// or off.
    #[arg(long, value_name = "ADDR|off", default_value = "off", value_parser = parse_admin)]
    pub admin_addr: MaybeAddr,
    /// Pass-through connections each pod may have tracked at once; past it, its new
    /// connections go through its proxy. The default is the most that lets every pod's share
    /// fit the node's tracking table. Applies when this agent loads the programs (adopted
    /// pins keep theirs).
    #[arg(long, default_value_t = limits::TRACKED_PER_POD,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::TRACKED_PER_POD)))]
    pub tracked_per_pod: u32,
    /// Destinations each pod may have pass-through connections open to at once; past it,
    /// connections to a further destination go through its proxy. The default is the most
    /// that lets every pod's share fit the node's per-destination counts.
    #[arg(long, default_value_t = limits::DESTINATIONS_PER_POD,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::DESTINATIONS_PER_POD)))]
    pub destinations_per_pod: u32,
    /// Remove every pin, link, state file and the socket (the agent must be stopped), then exit.
    #[arg(long, conflicts_with = "status")]
    pub uninstall: bool,
    /// Ask the running agent for its registrations, refusals and eBPF counters, then exit.
    #[arg(long)]
    pub status: bool,
    /// With --status: print the agent's JSON document instead of the table.
    #[arg(long, requires = "status")]
    pub json: bool,
}

impl From<&AgentArgs> for AgentOptions {
    fn from(a: &AgentArgs) -> Self {
        Self {
            cgroup_root: a.cgroup_root.clone(),
            socket: a.socket.clone(),
            state_dir: a.state_dir.clone(),
            bpffs: a.bpffs.clone(),
            pin_dir: a.pin_dir.clone(),
            sockmap: a.sockmap,
            sweep_interval: Duration::from_millis(a.sweep_interval_ms.max(100)),
            admin_addr: a.admin_addr,
            quotas: super::pins::Quotas {
                tracked_per_pod: a.tracked_per_pod,
                destinations_per_pod: a.destinations_per_pod,
            },
        }
    }
}

/// An alias, so clap takes the parser's `Option` as the value (`off` → `None`) instead of
/// making the flag optional.
pub type MaybeAddr = Option<std::net::SocketAddr>;

fn parse_admin(s: &str) -> Result<MaybeAddr, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("{e}: give IP:PORT or off"))
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
        let status = super::status(&opts.socket)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            print!("{}", render_status(&status));
        }
        return Ok(0);
    }
    super::run(opts)
}

/// The table `sidecar agent --status` prints.
pub fn render_status(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let _ = writeln!(
        out,
        "agent          pid {}, {} programs",
        text(&s["pid"]),
        if s["adopted"] == true {
            "adopted pinned"
        } else {
            "installed"
        }
    );
    let _ = writeln!(out, "cgroup root    {}", text(&s["cgroup_root"]));
    let _ = writeln!(out, "pins           {}", text(&s["pin_dir"]));
    let pods = s["pods"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "pods           {} registered", pods.len());
    let refusals: Vec<String> = s["refusals"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "refusals       {}",
        if refusals.is_empty() {
            "none".to_string()
        } else {
            refusals.join(", ")
        }
    );
    if !pods.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<38} {:>6} {:>5} {:>8}  PROXY CGROUP",
            "POD UID", "PORT", "REGS", "PID"
        );
        for p in &pods {
            let _ = writeln!(
                out,
                "{:<38} {:>6} {:>5} {:>8}  {}",
                text(&p["pod_uid"]),
                text(&p["proxy_port"]),
                text(&p["registrations"]),
                text(&p["pid"]),
                text(&p["proxy_cgroup"])
            );
        }
    }
    if let Some(counters) = s["counters"].as_object() {
        let _ = writeln!(out, "\n{:<28} {:>12}", "EBPF COUNTER", "VALUE");
        for (k, v) in counters {
            let _ = writeln!(out, "{k:<28} {:>12}", text(v));
        }
    }
    out
}
