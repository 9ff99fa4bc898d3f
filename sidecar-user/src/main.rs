//! The `sidecar` command line: which command runs (each owns its flags and options, in
//! `cmd/`); errors from the library are turned into one line here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sidecar::{
    cmd::{
        agent::cli::AgentArgs,
        cert::CertCommand,
        cleanup::CleanupArgs,
        pod_proxy::cli::ProxyArgs,
        policy::PolicyCommand,
        probe::ProbeArgs,
        run::{self, cli::RunArgs},
        status::{self, ConnsArgs, StatusArgs},
    },
    telemetry::access_log::{self, AccessLogTarget},
};

/// A transparent interception sidecar: eBPF steers a workload's outbound TCP connections to a
/// local proxy (no iptables), or lets those the proxy adds nothing to go straight to their
/// destination, recorded by the kernel.
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
    Run(Box<RunArgs>),
    /// Check that this kernel and host support eBPF interception; prints each check and a fix.
    Probe(ProbeArgs),
    /// Mint development certificates: a CA per trust domain, and workload certificates with
    /// SPIFFE IDs, so a demo or test mesh needs nothing outside this binary.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Check a policy file; optionally evaluate connections against it (one JSON line each).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Remove what a crashed `sidecar run` left behind (pins, attachments, cgroups, state).
    Cleanup(CleanupArgs),
    /// Is a running sidecar intercepting and accelerating? Asks its admin endpoint.
    Status(StatusArgs),
    /// Kubernetes node agent (DaemonSet): loads and pins the eBPF programs at the pods'
    /// cgroup root and registers pod sidecars over a Unix socket. Needs privileges.
    Agent(Box<AgentArgs>),
    /// Kubernetes pod sidecar: the proxy only, no privileges; registers its pod with the
    /// node agent and serves until SIGTERM (then drains).
    Proxy(Box<ProxyArgs>),
    /// The connections a running sidecar has open now (`--watch` refreshes like top).
    Conns(ConnsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let access = match &cli.command {
        Command::Run(args) => args.observe.access_log.clone(),
        Command::Proxy(args) => args.observe.access_log.clone(),
        _ => AccessLogTarget::Off,
    };
    if let Err(e) = access_log::init_logging(&access) {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let result = dispatch(cli.command);
    // The access log is written from its own thread: let it catch up before exiting.
    access_log::flush(std::time::Duration::from_secs(2));
    match result {
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
        Command::Run(args) => run::run(args.options()?),
        Command::Probe(args) => Ok(args.run()),
        Command::Cert(cert) => cert.run(),
        Command::Policy(policy) => policy.run(),
        Command::Cleanup(args) => args.run(),
        Command::Status(args) => {
            print!("{}", status::status(&args)?);
            Ok(0)
        }
        Command::Agent(args) => sidecar::cmd::agent::cli::dispatch(&args),
        Command::Proxy(args) => sidecar::cmd::pod_proxy::run((*args).try_into()?),
        Command::Conns(args) => {
            status::conns(&args)?;
            Ok(0)
        }
    }
}
