//! The `sidecar` command line. Errors from the library are turned into one line here.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use sidecar::{
    cidr::Cidr,
    cleanup, probe,
    proxy::ProxySettings,
    redirect::Mode,
    run::{self, RunOptions},
};
use tracing_subscriber::EnvFilter;

/// A transparent interception sidecar: eBPF steers a workload's outbound TCP connections to a
/// local proxy (no iptables), and the sockmap fast path splices local hops in the kernel.
#[derive(Parser)]
#[command(name = "sidecar", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run CMD with its outbound TCP connections intercepted by the sidecar.
    ///
    /// CMD runs in a fresh cgroup v2; eBPF redirects its TCP connects to the proxy on
    /// 127.0.0.1:PROXY_PORT, which forwards each to its original destination. When CMD exits
    /// the sidecar prints a per-connection summary, removes everything it attached, pinned or
    /// created, and exits with CMD's exit code. Needs root.
    ///
    /// Example: sudo sidecar run -- curl http://127.0.0.1:8080/
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Check that this kernel and host support eBPF interception; prints each check and a fix.
    Probe {
        /// bpffs mount point to check.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Remove what a crashed `sidecar run` left behind (pins, attachments, cgroups, state).
    Cleanup {
        /// bpffs mount point the runs used.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// How connections reach the proxy: ebpf (cgroup connect hooks + sockmap) or iptables
    /// (nat REDIRECT in a chain of our own, SO_ORIGINAL_DST; the classic baseline).
    #[arg(long, value_enum, default_value_t = ModeArg::Ebpf)]
    mode: ModeArg,
    /// Port of the proxy's outbound listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = 15001)]
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
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Turn the sockmap fast path off (connects are still redirected); for comparisons.
    #[arg(long)]
    no_sockmap: bool,
    /// Print the eBPF programs' aya-log output (debug aid; costs cycles in the kernel).
    #[arg(long)]
    bpf_log: bool,
    /// How long connecting to an original destination may take, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Close a connection after this many seconds without a byte in either direction.
    #[arg(long, default_value_t = 300)]
    idle_timeout_secs: u64,
    /// On exit or SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, default_value_t = 5)]
    drain_timeout_secs: u64,
    /// Also write the summary as JSON to this file (every connection and eBPF counter).
    #[arg(long)]
    report: Option<PathBuf>,
    /// The command to run, after `--`.
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Ebpf,
    Iptables,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SIDECAR_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message above it
/// already quotes (our error types name their cause in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run(args) => run::run(RunOptions {
            mode: match args.mode {
                ModeArg::Ebpf => Mode::Ebpf,
                ModeArg::Iptables => Mode::Iptables,
            },
            proxy_port: args.proxy_port,
            exclude_ports: args.exclude_ports,
            exclude_cidrs: args.exclude_cidrs,
            cgroup: args.cgroup,
            bpffs: args.bpffs,
            sockmap: !args.no_sockmap,
            bpf_log: args.bpf_log,
            proxy: ProxySettings {
                connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            },
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            report: args.report,
            command: args.command,
        }),
        Command::Probe { bpffs } => {
            let checks = probe::probe(&bpffs);
            for c in &checks {
                println!(
                    "{} {:<14} {}",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.detail
                );
                if let Some(fix) = &c.fix {
                    println!("     {:<14} fix: {fix}", "");
                }
            }
            let failed = checks.iter().filter(|c| !c.ok).count();
            if failed == 0 {
                println!("eBPF interception is supported on this host.");
                Ok(0)
            } else {
                println!("{failed} check(s) failed.");
                Ok(1)
            }
        }
        Command::Cleanup { bpffs } => {
            let done = cleanup::cleanup(&bpffs)?;
            for a in &done.actions {
                println!("{a}");
            }
            for s in &done.skipped {
                println!("skipped: {s}");
            }
            if done.actions.is_empty() && done.skipped.is_empty() {
                println!("nothing to clean up");
            }
            Ok(if done.skipped.is_empty() { 0 } else { 1 })
        }
    }
}
