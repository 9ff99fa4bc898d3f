//! `sidecar run -- CMD`: the standalone mode. Runs CMD in a fresh cgroup whose outbound TCP
//! is steered by eBPF to this process's proxy, and leaves no kernel state behind.
//!
//! Layout of one run (PID is this process):
//!
//! ```text
//! <cgroup2>/sidecar/run-PID/          connect4/connect6 attached here
//!     ├── proxy/                      this process (role PROXY: never redirected)
//!     └── app/                        CMD and its children (role WORKLOAD)
//! <cgroup2>                           sockops attached here (sees local upstreams too)
//! <bpffs>/sidecar/run-PID/            pinned maps and links
//! /run/sidecar/run-PID.json           what `sidecar cleanup` needs after a crash
//! ```
//!
//! Every object is owned by a value whose `Drop` removes it; they are declared in creation
//! order so Rust drops them in reverse: detach, leave the proxy cgroup, remove cgroups,
//! remove the state file, unmount bpffs if we mounted it.

pub mod cli;

use std::{
    ffi::{CString, OsString},
    io,
    os::unix::{ffi::OsStrExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use sidecar_common::{WorkloadConfig, flags, limits, role};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    admin::config::{self, ObserveOptions},
    cidr::Cidr,
    cmd::{
        report::Report,
        serve::{self, Listeners, Serving},
        state::{RunState, StateFile},
    },
    host::{bpffs::Bpffs, cgroup, privileges},
    policy::{self, Enforcer},
    proxy::{ProxySettings, mesh::MtlsOptions},
    redirect::{
        Mode, Redirect,
        circuits::KernelCircuits,
        ebpf::{Destinations, EbpfInterception, ScopedCidr, Settings, Workload},
        iptables::{self, IptablesInterception},
        orig_dst,
        passthrough::{Following, OpenDirect, Recorder},
    },
    telemetry::{CounterSource, InterceptionInfo, NoKernelCounters, record::Journal},
    tls::TlsState,
};

/// Everything `sidecar run` is told on the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How connections are steered to the proxy.
    pub mode: Mode,
    pub proxy_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    /// The run's cgroup; default `<cgroup2>/sidecar/run-<pid>`.
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub sockmap: bool,
    /// Every connection through the proxy (no kernel pass-through).
    pub proxy_all: bool,
    pub bpf_log: bool,
    pub proxy: ProxySettings,
    pub drain_timeout: Duration,
    /// How long a busy proxy or tunnel port is waited for (a replaced sidecar draining).
    pub port_wait: Duration,
    pub report: Option<PathBuf>,
    /// mTLS between sidecars; `None` keeps every connection plaintext.
    pub mtls: Option<MtlsOptions>,
    /// Authorization policy file (watched for changes); `None` allows everything.
    pub policy: Option<PathBuf>,
    /// Strict inbound mode: refuse plaintext connection attempts from outside to the
    /// workload (only tunnels, delivered by the sidecar over `lo`, get in).
    pub strict_inbound: bool,
    /// Leave CAP_NET_RAW to the command (dropped by default: raw sockets bypass every
    /// connect hook).
    pub keep_net_raw: bool,
    pub command: Vec<OsString>,
    pub observe: ObserveOptions,
}

/// Scope id of the one workload a standalone run has (keys the CIDR exclusion trie).
const WORKLOAD_SCOPE: u32 = 1;
/// How long connections the command left closing get to finish, for their records.
const PASSTHROUGH_SETTLE: Duration = Duration::from_secs(1);
/// Records kept for the exit summary and report.
const JOURNAL_CAPACITY: usize = 100_000;

/// Runs the command under the sidecar and returns the exit code to leave with.
pub fn run(opts: RunOptions) -> Result<i32> {
    // Everything that can be checked without touching the kernel comes first.
    if opts.exclude_ports.len() > limits::EXCLUDED_PORTS {
        bail!(
            "--exclude-ports takes at most {} ports ({} given): exclude a CIDR instead",
            limits::EXCLUDED_PORTS,
            opts.exclude_ports.len()
        );
    }
    if opts.mode == Mode::Iptables && (opts.sockmap || opts.bpf_log) {
        bail!("--sockmap and --bpf-log apply to --mode ebpf only: drop them with --mode iptables");
    }
    let program = resolve_command(&opts.command)?;
    if opts.strict_inbound && opts.mtls.as_ref().and_then(|m| m.inbound).is_none() {
        bail!(
            "--inbound-mode strict refuses every connection that does not come through the \
             sidecar's tunnel, so it needs --tls-dir with an inbound listener (not --no-inbound)"
        );
    }
    if opts.mode == Mode::Iptables && (opts.policy.is_some() || opts.strict_inbound) {
        bail!(
            "--policy and --inbound-mode strict are enforced with eBPF (connect hooks, cgroup \
             ingress) and are not available with --mode iptables yet: use --mode ebpf"
        );
    }
    // The policy is validated and compiled before anything is attached: a bad file is a
    // clean error naming its line.
    let policy = match &opts.policy {
        Some(path) => Some(policy::load(path)?),
        None => None,
    };
    privileges::require("sidecar run")?;
    let cg_root = cgroup::root()?;
    // Credentials are checked before anything is attached: a bad set is a clean error.
    let tls = match &opts.mtls {
        Some(m) => {
            Some(TlsState::load(m.files.clone()).context("loading the workload certificates")?)
        }
        None => None,
    };
    // In eBPF mode the connect hooks redirect only to listeners that carry the proxy's mark.
    let mark = |l: Listeners| -> Result<Listeners> {
        if opts.mode == Mode::Ebpf {
            l.mark_outbound(sidecar_common::PROXY_LISTENER_MARK)?;
        }
        Ok(l)
    };
    // Bound now, so a busy port is an error before anything is attached. With
    // --port-wait-ms, a busy port (the sidecar this one replaces, draining) is waited for
    // last, once everything else is ready: the replacement listens the moment the old one
    // lets go, and serves at once.
    let inbound = opts.mtls.as_ref().and_then(|m| m.inbound);
    let listeners = match Listeners::bind(opts.proxy_port, inbound) {
        Ok(l) => Some(mark(l)?),
        Err(e) if serve::is_port_busy(&e) && !opts.port_wait.is_zero() => {
            info!("{e:#}: waiting for it (--port-wait-ms) once everything else is ready");
            None
        }
        Err(e) => return Err(e),
    };
    let ipv6 = listeners
        .as_ref()
        .map_or_else(Listeners::ipv6_available, |l| l.outbound_v6.is_some());

    // Telemetry and the admin server come up before anything is attached, so `/readyz`
    // answers "not ready" until interception and listeners really are in place.
    let serving = Serving::start(
        &opts.observe,
        MtlsOptions::protection(opts.mtls.as_ref()),
        effective_config(&opts),
    )?;
    let _guard = serving.rt.enter();
    // Caught from here on, before `/readyz` can say ready: a SIGTERM that arrives between
    // ready and the command's start would otherwise kill the sidecar outright (the default
    // action) and leave the run fail-closed with its command running.
    let mut stop = StopSignals::register()?;

    let pid = std::process::id();
    // iptables mode needs no bpffs; its binaries are found before anything is created.
    let (bpffs, iptables_tool) = match opts.mode {
        Mode::Ebpf => (Some(Bpffs::ensure(&opts.bpffs)?), None),
        Mode::Iptables => (None, Some(iptables::detect()?)),
        Mode::Agent => bail!(
            "agent mode is `sidecar proxy`'s (a node agent attaches for the pod); `sidecar run` \
             attaches its own interception: --mode ebpf or --mode iptables"
        ),
    };
    let bpffs_path = bpffs
        .as_ref()
        .map_or(opts.bpffs.clone(), |b| b.path().into());
    // Killed runs whose command is gone: their state is removed now, one log line each.
    crate::cmd::cleanup::clean_dead_runs_logged(&bpffs_path, &cg_root);
    // `<bpffs>/sidecar` and `<cgroup2>/sidecar` are shared by concurrent runs: whoever
    // finishes last (finding them empty) removes them.
    let _bpffs_parent = bpffs
        .as_ref()
        .map(|b| RemoveIfEmpty(b.path().join("sidecar")));
    let _cgroup_parent = RemoveIfEmpty(cg_root.join("sidecar"));
    let run_path = opts
        .cgroup
        .clone()
        .unwrap_or_else(|| cg_root.join(format!("sidecar/run-{pid}")));
    let run_path = if run_path.is_absolute() {
        run_path
    } else {
        cg_root.join(run_path)
    };
    let original_cgroup = cgroup::of_process(&cg_root, "self")?;
    let pin_dir = bpffs_path.join(format!("sidecar/run-{pid}"));
    let iptables_settings = iptables::Settings {
        cgroup_root: cg_root.clone(),
        app_cgroup: run_path.join("app"),
        proxy_port: opts.proxy_port,
        exclude_ports: opts.exclude_ports.clone(),
        exclude_cidrs: opts.exclude_cidrs.clone(),
        ipv6,
        chain: iptables::chain_for(pid),
    };
    let iptables_rules = iptables_tool
        .as_ref()
        .map(|tool| iptables::planned(tool.clone(), &iptables_settings))
        .transpose()?;
    let _state = StateFile::write(&RunState {
        pid,
        run_cgroup: run_path.clone(),
        original_cgroup: original_cgroup.clone(),
        pin_dir: pin_dir.clone(),
        bpffs: bpffs_path.clone(),
        bpffs_mounted_by_us: bpffs.as_ref().is_some_and(Bpffs::mounted_by_us),
        iptables: iptables_rules,
    })
    .context("writing the run's state file under /run/sidecar")?;
    let run_cg = cgroup::Cgroup::create(run_path.clone())?;
    let proxy_cg = cgroup::Cgroup::create(run_path.join("proxy"))?;
    let app_cg = cgroup::Cgroup::create(run_path.join("app"))?;
    let _in_proxy = SelfInCgroup::enter(proxy_cg.path(), original_cgroup)?;

    let interception = match iptables_tool {
        None => Interception::Ebpf(Box::new(attach_ebpf(
            &opts,
            &cg_root,
            pin_dir,
            [&run_cg, &proxy_cg, &app_cg],
            ipv6,
        )?)),
        Some(tool) => {
            let rules = IptablesInterception::install(tool, &iptables_settings)?;
            info!(
                chain = %rules.rules().chain,
                backend = rules.rules().tool.backend.as_str(),
                proxy_port = opts.proxy_port,
                "iptables interception installed"
            );
            Interception::Iptables(rules)
        }
    };
    let lookups = interception.redirect();
    serving.telemetry.attached(
        InterceptionInfo {
            mode: opts.mode,
            // Off also where the kernel cannot key the sockhash by namespace (< 5.15).
            sockmap: matches!(&interception,
                Interception::Ebpf(e) if opts.sockmap && e.fast_path_unavailable().is_none()),
            proxy_port: opts.proxy_port,
            cgroup: run_cg.path().display().to_string(),
        },
        interception.counter_source(),
    );
    let journal = Arc::new(Journal::new(JOURNAL_CAPACITY));
    let mesh = serving.mesh(
        opts.mtls.as_ref(),
        tls.clone(),
        opts.proxy_port,
        opts.proxy.connect_timeout,
    );
    // In force (kernel maps filled) before CMD starts, so no connect escapes it.
    let enforcer = match (policy, &opts.policy, interception.pin_dir()) {
        (Some(loaded), Some(path), Some(pin_dir)) => {
            Some(Enforcer::start(path, loaded, pin_dir, WORKLOAD_SCOPE)?)
        }
        _ => None,
    };
    serving.secured(opts.mtls.as_ref(), tls, enforcer.clone());
    let listeners = match listeners {
        Some(l) => l,
        None => {
            info!("ready but for the ports: waiting for them");
            mark(Listeners::bind_waiting(
                opts.proxy_port,
                inbound,
                opts.port_wait,
            )?)?
        }
    };
    let proxy = serving.serve(
        opts.proxy,
        lookups.clone(),
        mesh,
        journal.clone(),
        enforcer.clone(),
        listeners,
    )?;
    // Open circuits are refused at connect() as well, for proxied and pass-through
    // connections alike.
    if let Interception::Ebpf(e) = &interception {
        proxy.refuse_open_circuits_in(Arc::new(KernelCircuits::open(e.pin_dir(), WORKLOAD_SCOPE)?));
    }
    // Connections that go straight to their destination are recorded from the kernel's
    // reports, into the same telemetry and journal.
    let passthrough = match (&interception, passes_through(&opts)) {
        (Interception::Ebpf(e), true) => {
            serving
                .telemetry
                .passing_through(Arc::new(OpenDirect::open(e.pin_dir(), WORKLOAD_SCOPE)?));
            Some(Following::start(
                &serving.rt,
                Recorder {
                    scope: WORKLOAD_SCOPE,
                    telemetry: serving.telemetry.clone(),
                    journal: journal.clone(),
                    circuits: Some(proxy.clone()),
                },
                e.pin_dir(),
            )?)
        }
        _ => None,
    };

    let status = serving.rt.block_on(run_command(
        &program,
        &opts.command[1..],
        app_cg.path(),
        opts.keep_net_raw,
        opts.drain_timeout,
        &mut stop,
    ))?;
    let leftovers = cgroup::terminate_all(app_cg.path(), Duration::from_secs(2));
    if leftovers > 0 {
        info!("stopped {leftovers} process(es) the command left in its cgroup");
    }
    serving.drain(&proxy, opts.drain_timeout);
    if let Some(following) = passthrough {
        match following.finish(&serving.rt, PASSTHROUGH_SETTLE) {
            Ok(0) => {}
            Ok(open) => warn!(
                "{open} pass-through connection(s) were still closing {}ms after the command \
                 exited: they have no record",
                PASSTHROUGH_SETTLE.as_millis()
            ),
            Err(e) => warn!("the last pass-through records could not be read: {e}"),
        }
    }
    if let Some(e) = &enforcer {
        e.drain_kernel_events();
    }
    serving.telemetry.detaching();
    drop(lookups);
    let (counters, failures) = interception.remove();
    for failure in failures {
        warn!("{failure}");
    }

    let exit_code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let (connections, dropped) = journal.snapshot();
    let report = Report {
        mode: opts.mode,
        exit_code,
        connections,
        dropped_records: dropped,
        counters,
        inbound_rejections: proxy.rejections(),
        policy: enforcer.map(|e| e.report()),
    };
    eprint!("{}", report.summary());
    if let Some(path) = &opts.report {
        report.write(path)?;
    }
    drop(serving.admin);
    Ok(exit_code)
}

/// The two interception modes behind one owner: dropping it removes whichever was set up.
enum Interception {
    Ebpf(Box<EbpfInterception>),
    Iptables(IptablesInterception),
}

impl Interception {
    /// What the proxy asks for original destinations.
    fn redirect(&self) -> Arc<dyn Redirect> {
        match self {
            Interception::Ebpf(e) => e.lookups(),
            Interception::Iptables(_) => Arc::new(orig_dst::OriginalDst),
        }
    }

    /// The eBPF pin directory (policy maps live there); none in iptables mode.
    fn pin_dir(&self) -> Option<&Path> {
        match self {
            Interception::Ebpf(e) => Some(e.pin_dir()),
            Interception::Iptables(_) => None,
        }
    }

    /// Where telemetry reads kernel counters (none in iptables mode).
    fn counter_source(&self) -> Arc<dyn CounterSource> {
        match self {
            Interception::Ebpf(e) => e.lookups(),
            Interception::Iptables(_) => Arc::new(NoKernelCounters),
        }
    }

    /// Removes it all now; returns the eBPF counters (none in iptables mode) and failures.
    fn remove(self) -> (std::collections::BTreeMap<&'static str, u64>, Vec<String>) {
        match self {
            Interception::Ebpf(e) => {
                let counters = e.lookups().counters();
                (counters, e.detach())
            }
            Interception::Iptables(i) => (Default::default(), i.remove()),
        }
    }
}

/// eBPF mode: enters the app and proxy cgroups in `WORKLOADS` and attaches the programs.
fn attach_ebpf(
    opts: &RunOptions,
    cg_root: &Path,
    pin_dir: PathBuf,
    [run_cg, proxy_cg, app_cg]: [&cgroup::Cgroup; 3],
    ipv6: bool,
) -> Result<EbpfInterception> {
    let mut app = WorkloadConfig {
        role: role::WORKLOAD,
        scope: WORKLOAD_SCOPE,
        proxy_port: opts.proxy_port,
        flags: if ipv6 { flags::IPV6_LISTENER } else { 0 }
            | if opts.proxy.allow_metadata {
                0
            } else {
                flags::DENY_METADATA
            }
            | if passes_through(opts) {
                flags::PASSTHROUGH
            } else {
                0
            }
            | if opts.strict_inbound {
                flags::STRICT_INBOUND
            } else {
                0
            }
            | flags::CHECK_LISTENER,
        excluded_ports_len: opts.exclude_ports.len() as u32,
        excluded_ports: [0; limits::EXCLUDED_PORTS],
    };
    app.excluded_ports[..opts.exclude_ports.len()].copy_from_slice(&opts.exclude_ports);
    let proxy_entry = WorkloadConfig {
        role: role::PROXY,
        ..app
    };
    let interception = EbpfInterception::attach(
        &Settings {
            connect_cgroup: run_cg.path().into(),
            sockops_cgroup: cg_root.into(),
            pin_dir,
            sockmap: opts.sockmap,
            bpf_log: opts.bpf_log,
            strict_inbound_cgroup: opts.strict_inbound.then(|| app_cg.path().into()),
        },
        &[
            Workload {
                cgroup_id: app_cg.id()?,
                config: app,
                passthrough_cap: opts.proxy.limits.passthrough_per_destination,
            },
            Workload {
                cgroup_id: proxy_cg.id()?,
                config: proxy_entry,
                passthrough_cap: None,
            },
        ],
        Destinations {
            excluded: &scoped(&opts.exclude_cidrs),
            meshed: &scoped(opts.mtls.iter().flat_map(|m| &m.mesh_cidrs)),
        },
    )?;
    info!(
        cgroup = %run_cg.path().display(),
        pins = %interception.pin_dir().display(),
        proxy_port = opts.proxy_port,
        sockmap = opts.sockmap,
        "interception attached"
    );

    Ok(interception)
}

/// Whether connections the proxy adds nothing to go straight to their destination: unless
/// `--proxy-all`, or `--permissive` (every destination may have a sidecar, which only the
/// proxy's probe can tell).
pub fn passes_through(opts: &RunOptions) -> bool {
    opts.mode == Mode::Ebpf && !opts.proxy_all && !opts.mtls.as_ref().is_some_and(|m| m.permissive)
}

fn scoped<'a>(cidrs: impl IntoIterator<Item = &'a Cidr>) -> Vec<ScopedCidr> {
    cidrs
        .into_iter()
        .map(|c| ScopedCidr {
            scope: WORKLOAD_SCOPE,
            addr: c.addr,
            prefix: c.prefix,
        })
        .collect()
}

/// Finds the program in PATH now, so a typo fails before anything is attached.
fn resolve_command(command: &[OsString]) -> Result<PathBuf> {
    let Some(name) = command.first() else {
        bail!("no command given: use `sidecar run -- CMD ARGS...`");
    };
    let name = Path::new(name);
    let candidates: Vec<PathBuf> = if name.as_os_str().as_bytes().contains(&b'/') {
        vec![name.into()]
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(name))
            .collect()
    };
    candidates
        .into_iter()
        .find(|p| is_executable(p))
        .with_context(|| {
            format!(
                "command not found: {} (check the name, or give a full path)",
                name.display()
            )
        })
}

fn is_executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated path.
    path.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
}

/// SIGINT and SIGTERM, caught (a signal that came before anyone waits is kept).
struct StopSignals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Needs the runtime entered.
    fn register() -> io::Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
        })
    }
}

/// Spawns the command inside the app cgroup, without CAP_NET_RAW unless `keep_net_raw`, and
/// waits for it. SIGINT/SIGTERM to the sidecar are passed on; a command that ignores them is
/// killed after the drain deadline.
async fn run_command(
    program: &Path,
    args: &[OsString],
    app_cgroup: &Path,
    keep_net_raw: bool,
    grace: Duration,
    stop: &mut StopSignals,
) -> Result<std::process::ExitStatus> {
    let procs = CString::new(app_cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only makes async-signal-safe syscalls (open/write/close, prctl,
    // capget/capset) on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            if keep_net_raw {
                Ok(())
            } else {
                privileges::drop_net_raw()
            }
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = child.id().unwrap_or(0) as i32;
    info!(pid, command = %program.display(), "command started");

    tokio::select! {
        status = child.wait() => return Ok(status?),
        _ = stop.sigint.recv() => info!("SIGINT: stopping the command"),
        _ = stop.sigterm.recv() => info!("SIGTERM: stopping the command"),
    }
    // SAFETY: kill(2) on the child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            warn!("the command did not stop within {grace:?}: killing it");
            child.kill().await?;
            Ok(child.wait().await?)
        }
    }
}

/// A directory removed on drop if it is empty by then.
struct RemoveIfEmpty(PathBuf);

impl Drop for RemoveIfEmpty {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// This process inside the proxy cgroup; moves back out on drop so the cgroup can be removed.
struct SelfInCgroup {
    original: PathBuf,
}

impl SelfInCgroup {
    fn enter(cgroup: &Path, original: PathBuf) -> Result<Self, cgroup::CgroupError> {
        cgroup::move_process(cgroup, std::process::id())?;
        Ok(Self { original })
    }
}

impl Drop for SelfInCgroup {
    fn drop(&mut self) {
        if let Err(e) = cgroup::move_process(&self.original, std::process::id()) {
            warn!("{e}");
        }
    }
}

/// The run's effective configuration, as `/config` shows it, secrets redacted.
fn effective_config(opts: &RunOptions) -> serde_json::Value {
    let v = serde_json::json!({
        "proxy_port": opts.proxy_port,
        "exclude_ports": opts.exclude_ports,
        "exclude_cidrs": opts.exclude_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "cgroup": opts.cgroup.as_ref().map(|p| p.display().to_string()),
        "bpffs": opts.bpffs.display().to_string(),
        "sockmap": opts.sockmap,
        "bpf_log": opts.bpf_log,
        "drain_timeout_secs": opts.drain_timeout.as_secs(),
        "port_wait_ms": u64::try_from(opts.port_wait.as_millis()).unwrap_or(u64::MAX),
        "report": opts.report.as_ref().map(|p| p.display().to_string()),
        "command": config::command(&opts.command),
        "mode": MtlsOptions::protection(opts.mtls.as_ref()),
        "tls": opts.mtls.as_ref().map(MtlsOptions::config),
        "policy": opts.policy.as_ref().map(|p| p.display().to_string()),
        "inbound_mode": if opts.strict_inbound { "strict" } else { "permissive" },
    });
    config::redact(config::with(config::with(v, &opts.observe), &opts.proxy))
}
