//! The `sidecar` command line. Errors from the library are turned into one line here.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use sidecar::{
    admin::cli::{self as admin_cli, ConnsArgs, ObserveArgs, StatusArgs},
    cidr::Cidr,
    cmd::{
        cleanup, probe,
        run::{self, RunOptions},
    },
    proxy::{ProxySettingsArgs, mesh::MeshArgs},
    redirect::Mode,
    telemetry::access_log::{self, AccessLogTarget},
    tls::{certs, identity::SpiffeId},
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
    Probe {
        /// bpffs mount point to check.
        #[arg(long, default_value = sidecar::defaults::BPFFS)]
        bpffs: PathBuf,
    },
    /// Mint development certificates: a CA per trust domain, and workload certificates with
    /// SPIFFE IDs, so a demo or test mesh needs nothing outside this binary.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Check a policy file; optionally evaluate connections against it (one JSON line each).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Remove what a crashed `sidecar run` left behind (pins, attachments, cgroups, state).
    Cleanup {
        /// bpffs mount point the runs used.
        #[arg(long, default_value = sidecar::defaults::BPFFS)]
        bpffs: PathBuf,
    },
    /// Is a running sidecar intercepting and accelerating? Asks its admin endpoint.
    Status(StatusArgs),
    /// Kubernetes node agent (DaemonSet): loads and pins the eBPF programs at the pods'
    /// cgroup root and registers pod sidecars over a Unix socket. Needs privileges.
    Agent(Box<sidecar::cmd::agent::cli::AgentArgs>),
    /// Kubernetes pod sidecar: the proxy only, no privileges; registers its pod with the
    /// node agent and serves until SIGTERM (then drains).
    Proxy(Box<sidecar::cmd::pod_proxy::cli::ProxyArgs>),
    /// The connections a running sidecar has open now (`--watch` refreshes like top).
    Conns(ConnsArgs),
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a CA: writes ca.pem and ca-key.pem into DIR.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain, e.g. example.org.
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Issue a workload certificate: writes cert.pem, key.pem and bundle.pem into OUT.
    Issue {
        /// Directory of the CA (from `sidecar cert ca`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// e.g. spiffe://example.org/ns/default/sa/client
        #[arg(long)]
        spiffe_id: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in hours.
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// Start the validity this many hours in the past (e.g. to mint an expired one).
        #[arg(long, default_value_t = 0)]
        backdate_hours: u64,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate FILE (exit 1 with the line and problem if it is invalid), then print the
    /// verdict for each --outbound / --inbound connection, as the proxy and the kernel see it.
    Check {
        file: PathBuf,
        /// An outbound destination IP:PORT, or SPIFFE_ID=IP:PORT for a tunnel whose server
        /// presented that identity.
        #[arg(long)]
        outbound: Vec<String>,
        /// An inbound connection SPIFFE_ID=IP:PORT (peer identity, destination).
        #[arg(long)]
        inbound: Vec<String>,
    },
}

/// `--inbound-mode`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum InboundMode {
    /// Plaintext connections from outside reach the workload's ports as before.
    Permissive,
    /// Only tunnels (delivered by the sidecar over `lo`) reach the workload; plaintext
    /// connection attempts from outside are dropped in the kernel.
    Strict,
}

#[derive(clap::Args)]
struct RunArgs {
    /// How connections reach the proxy: ebpf (cgroup connect and sockops hooks), iptables
    /// (nat REDIRECT in a chain of our own, SO_ORIGINAL_DST; the classic baseline), or auto
    /// (ebpf when `sidecar probe`'s eBPF checks pass, else iptables with a warning).
    #[arg(long, value_enum, default_value_t = ModeArg::Ebpf)]
    mode: ModeArg,
    /// Port of the proxy's outbound listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = sidecar::defaults::PROXY_PORT)]
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
    #[arg(long, default_value = sidecar::defaults::BPFFS)]
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
    /// Also write the summary as JSON to this file (every connection and eBPF counter).
    #[arg(long)]
    report: Option<PathBuf>,
    #[command(flatten)]
    mesh: MeshArgs,
    #[command(flatten)]
    observe: ObserveArgs,
    /// Authorization policy (TOML, see docs/policy.md); re-read when it changes, an invalid
    /// file is refused and the old policy stays.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// strict: only the sidecar's tunnels reach the workload (needs --tls-dir); permissive:
    /// plaintext from outside is accepted too.
    #[arg(long, value_enum, default_value = "permissive")]
    inbound_mode: InboundMode,
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

/// `sidecar policy check`.
fn policy_check(
    file: &std::path::Path,
    outbound: &[String],
    inbound: &[String],
) -> anyhow::Result<i32> {
    use std::net::SocketAddr;

    use sidecar::{policy::rules::Request, telemetry::labels::Direction};
    let loaded = sidecar::policy::load(file)?;
    let policy = &loaded.policy;
    eprintln!(
        "{}: {} rule(s), {} kernel prefix(es){}",
        file.display(),
        policy.rules.len(),
        loaded.compiled.entries.len(),
        if policy.dry_run { ", dry run" } else { "" }
    );
    let print = |req: Request<'_>, kernel: Option<bool>| {
        let d = policy.evaluate(&req);
        let line = serde_json::json!({
            "direction": req.way.as_str(),
            "source": req.peer.filter(|_| req.way == Direction::Inbound).map(|s| s.to_string()),
            "server": req.peer.filter(|_| req.way == Direction::Outbound).map(|s| s.to_string()),
            "dst": req.dst.to_string(),
            "action": d.action.as_str(),
            "rule": policy.rule_label(&d, req.way),
            "refused": d.refuse,
            "kernel_refuses": kernel,
        });
        println!("{line}");
    };
    let connection = |flag: &str, spec: &str| -> anyhow::Result<(Option<SpiffeId>, SocketAddr)> {
        let (id, dst) = match spec.split_once('=') {
            Some((id, dst)) => (Some(id.parse::<SpiffeId>()?), dst),
            None => (None, spec),
        };
        let dst = dst.parse().map_err(|e| {
            anyhow::anyhow!("--{flag} {spec:?}: {e} (write IP:PORT or SPIFFE_ID=IP:PORT)")
        })?;
        Ok((id, dst))
    };
    for spec in outbound {
        let (server, dst) = connection("outbound", spec)?;
        let kernel = loaded.compiled.denies(dst.ip(), dst.port());
        print(
            Request {
                way: Direction::Outbound,
                peer: server.as_ref(),
                dst,
            },
            Some(kernel),
        );
    }
    for spec in inbound {
        let (id, dst) = connection("inbound", spec)?;
        let id =
            id.ok_or_else(|| anyhow::anyhow!("--inbound {spec:?}: write SPIFFE_ID=IP:PORT"))?;
        print(
            Request {
                way: Direction::Inbound,
                peer: Some(&id),
                dst,
            },
            None,
        );
    }
    Ok(0)
}

fn dispatch(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run(args) => {
            let args = *args;
            run::run(RunOptions {
                mode: match args.mode {
                    ModeArg::Ebpf => Mode::Ebpf,
                    ModeArg::Iptables => Mode::Iptables,
                    ModeArg::Auto => probe::auto_mode(&args.bpffs).unwrap_or_else(|why| {
                        eprintln!(
                            "sidecar: warning: --mode auto: eBPF interception is unavailable \
                             ({why}); using iptables mode"
                        );
                        Mode::Iptables
                    }),
                },
                proxy_port: args.proxy_port,
                exclude_ports: args.exclude_ports,
                exclude_cidrs: args.exclude_cidrs,
                cgroup: args.cgroup,
                bpffs: args.bpffs,
                sockmap: args.sockmap,
                proxy_all: args.proxy_all,
                bpf_log: args.bpf_log,
                proxy: args.proxy.resolve()?,
                drain_timeout: Duration::from_secs(args.drain_timeout_secs),
                report: args.report,
                mtls: args.mesh.options()?,
                policy: args.policy,
                strict_inbound: args.inbound_mode == InboundMode::Strict,
                command: args.command,
                observe: args.observe.into(),
            })
        }
        Command::Policy(PolicyCommand::Check {
            file,
            outbound,
            inbound,
        }) => policy_check(&file, &outbound, &inbound),
        Command::Cert(CertCommand::Ca {
            dir,
            trust_domain,
            days,
        }) => {
            certs::write_ca(&dir, &trust_domain, Duration::from_secs(days * 86_400))?;
            println!(
                "wrote {} and {}",
                dir.join(certs::CA_CERT).display(),
                dir.join(certs::CA_KEY).display()
            );
            Ok(0)
        }
        Command::Cert(CertCommand::Issue {
            ca_dir,
            spiffe_id,
            out,
            hours,
            backdate_hours,
        }) => {
            let id: SpiffeId = spiffe_id.parse()?;
            certs::write_workload(
                &ca_dir,
                &out,
                &id,
                Duration::from_secs(hours * 3600),
                Duration::from_secs(backdate_hours * 3600),
            )?;
            println!("wrote {id} to {}", out.join(certs::CERT).display());
            Ok(0)
        }
        Command::Status(args) => {
            print!("{}", admin_cli::status(&args)?);
            Ok(0)
        }
        Command::Agent(args) => sidecar::cmd::agent::cli::dispatch(&args),
        Command::Proxy(args) => sidecar::cmd::pod_proxy::run((*args).try_into()?),
        Command::Conns(args) => {
            admin_cli::conns(&args)?;
            Ok(0)
        }
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
            let iptables_ok = checks
                .iter()
                .any(|c| c.name == "iptables mode" && c.ok && !c.detail.starts_with("unavailable"));
            if failed == 0 {
                println!("eBPF interception is supported on this host.");
                Ok(0)
            } else {
                println!("{failed} check(s) failed.");
                if iptables_ok {
                    println!(
                        "iptables mode works here: `sidecar run --mode iptables`, or \
                         `--mode auto` to fall back by itself"
                    );
                }
                Ok(1)
            }
        }
        Command::Cleanup { bpffs } => {
            let done = cleanup::cleanup(&bpffs)?;
            for a in &done.actions {
                println!("{a}");
            }
            for l in &done.live {
                println!("{l}");
            }
            for s in &done.skipped {
                println!("could not clean up: {s}");
            }
            if done.actions.is_empty() && done.skipped.is_empty() {
                println!("nothing to clean up");
            }
            Ok(if done.skipped.is_empty() { 0 } else { 1 })
        }
    }
}
