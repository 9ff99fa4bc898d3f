//! `cargo xtask bench [--quick]`: what each interception mode costs over a direct
//! connection, measured side by side on this host in one run.
//!
//! Scenarios (each in its own `scbm-*` network namespaces, torn down afterwards):
//! - **loopback**: client and server on 127.0.0.1 in one namespace (same host, same pod);
//! - **pods**: client and server in two namespaces joined by a veth pair.
//!
//! Modes: direct (no sidecar), iptables, ebpf (pass-through), ebpf --proxy-all, ebpf
//! --proxy-all --sockmap, HAProxy, and in the pods scenario
//! two sidecars with mTLS between them, both in iptables or both in eBPF mode (see
//! `mesh.rs`). Each round runs every mode once, A B C D A B C D…, so drift hits all alike.
//! One client run measures, in order:
//! request/response latency (64 B and 4 KiB on a persistent connection), connect-exchange-
//! close rate, bulk throughput (1 and 16 streams), and for the proxied modes the sidecar's
//! CPU time and RSS from /proc. The load generator is this binary (release build) re-invoked
//! as `bench-server` / `bench-client` (see `load.rs`); `sockperf` cross-checks one figure,
//! and in full runs `wrk` against nginx in the pods two more (`wrk.rs`).
//!
//! Output: `target/bench/report.md` and `target/bench/report.svg`; the raw per-run JSON and
//! the sidecar logs in `target/bench/raw/`.

mod haproxy;
pub mod idle;
mod kernel_cost;
pub mod load;
mod mesh;
mod netns;
mod report;
mod sockperf;
mod startup;
mod verdict;
mod windows;
mod wrk;
mod ztunnel;

use std::{
    fs,
    io::{BufRead, BufReader, IsTerminal, Write},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use self::verdict::SplitMix;
use self::{
    haproxy::Haproxy,
    load::ClientResult,
    mesh::Mesh,
    netns::{Netns, POD_CLIENT_IP, POD_SERVER_IP, Pods},
    ztunnel::ZtunnelPair,
};
use crate::{build_ebpf, cargo, run, step};

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Smoke run (under a minute): one round, fewer exchanges. Fails if any mode lacks
    /// numbers; CI runs it so the harness cannot rot.
    #[arg(long)]
    pub quick: bool,
    /// Instead of the comparison: the eBPF + mTLS pair's bulk throughput and latency with
    /// several HBONE flow-control windows, direct beside them (target/bench/windows.md).
    #[arg(long, conflicts_with = "quick")]
    pub windows: bool,
}

/// How much each round does.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub rounds: usize,
    /// Timed request/response exchanges per size per round.
    pub exchanges: usize,
    pub connections: usize,
    pub bulk_secs: f64,
    /// The seed each round's order of modes is drawn from (in the report, so a run's order
    /// can be replayed).
    pub order_seed: u64,
    /// The client reads the sidecar's program statistics around its connection loop
    /// (`kernel_cost`); only the kernel-cost run sets it.
    pub bpf_cost: bool,
}

impl Params {
    fn for_run(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                exchanges: 1_000,
                connections: 200,
                bulk_secs: 0.25,
                order_seed: 0,
                bpf_cost: false,
            }
        } else {
            // 12 × 4,000 = 48,000 timed exchanges per size, mode, scenario and placement.
            // Many rounds: they are what the targets' bootstrap draws, and a run's p50
            // depends on where the scheduler puts its threads, so more runs give a fairer
            // mix. Each mode's window within a round is long enough (a few hundred ms of each
            // test, where 1,000 exchanges and 300 connections took 50 ms) that a burst of the
            // host's noise shifts one window by a few per cent rather than a quarter: with the
            // shorter windows two full runs disagreed on 12 of 56 verdicts.
            // 1,000 connections per mode keep the client's TIME_WAIT sockets to one server
            // (9 modes per round in the pods) well inside the ephemeral port range.
            Self {
                rounds: 12,
                exchanges: 4_000,
                connections: 1_000,
                bulk_secs: 0.5,
                order_seed: 0,
                bpf_cost: false,
            }
        }
    }
}

/// The interception modes compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Iptables,
    /// The default: plaintext connections the proxy adds nothing to pass through in the
    /// kernel (connect hooks let them go, sockops records them).
    Ebpf,
    /// `--proxy-all`: every connection through the proxy (plain TCP on both legs).
    EbpfProxyAll,
    /// `--proxy-all --sockmap`: the same, the kernel splicing the local legs (opt-in).
    EbpfSockmap,
    /// HAProxy (Debian's package) in TCP mode with a fixed backend, on the client's side: a
    /// plain userspace L4 proxy, the peer the sidecar's proxied hop is compared with.
    Haproxy,
    /// Two sidecars (client pod and server pod), an mTLS tunnel between them.
    IptablesMtls,
    EbpfMtls,
    /// Istio's ztunnel in each pod (dedicated mode), HBONE between them: the anchor our
    /// pair is measured against (see `ztunnel.rs`).
    Ztunnel,
}

impl Mode {
    pub const ALL: [Mode; 9] = [
        Mode::Direct,
        Mode::Iptables,
        Mode::Ebpf,
        Mode::EbpfProxyAll,
        Mode::EbpfSockmap,
        Mode::Haproxy,
        Mode::IptablesMtls,
        Mode::EbpfMtls,
        Mode::Ztunnel,
    ];
    /// The modes with at most one sidecar: every scenario runs them.
    pub const SINGLE: [Mode; 6] = [
        Mode::Direct,
        Mode::Iptables,
        Mode::Ebpf,
        Mode::EbpfProxyAll,
        Mode::EbpfSockmap,
        Mode::Haproxy,
    ];
    /// The modes that need a server pod with a sidecar of its own.
    pub const MTLS: [Mode; 2] = [Mode::IptablesMtls, Mode::EbpfMtls];
    /// The modes with a proxy in each pod: the server pod's is measured too.
    pub const PAIRS: [Mode; 3] = [Mode::IptablesMtls, Mode::EbpfMtls, Mode::Ztunnel];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
            Mode::EbpfProxyAll => "ebpf --proxy-all",
            Mode::EbpfSockmap => "ebpf --proxy-all --sockmap",
            Mode::Haproxy => "haproxy",
            Mode::IptablesMtls => "iptables + mTLS",
            Mode::EbpfMtls => "ebpf + mTLS",
            Mode::Ztunnel => "ztunnel pair",
        }
    }

    pub fn file_key(self) -> &'static str {
        match self {
            Mode::EbpfProxyAll => "ebpf-proxyall",
            Mode::EbpfSockmap => "ebpf-sockmap",
            Mode::IptablesMtls => "iptables-mtls",
            Mode::EbpfMtls => "ebpf-mtls",
            Mode::Ztunnel => "ztunnel",
            m => m.label(),
        }
    }

    pub fn mtls(self) -> bool {
        Self::MTLS.contains(&self)
    }

    pub fn pair(self) -> bool {
        Self::PAIRS.contains(&self)
    }

    /// `sidecar run` options, or None where no sidecar runs.
    fn sidecar_args(self) -> Option<&'static [&'static str]> {
        match self {
            Mode::Direct | Mode::Haproxy | Mode::Ztunnel => None,
            Mode::Iptables | Mode::IptablesMtls => Some(&["--mode", "iptables"]),
            Mode::Ebpf | Mode::EbpfMtls => Some(&["--mode", "ebpf"]),
            Mode::EbpfProxyAll => Some(&["--mode", "ebpf", "--proxy-all"]),
            Mode::EbpfSockmap => Some(&["--mode", "ebpf", "--proxy-all", "--sockmap"]),
        }
    }

    /// How the client's connections must appear in the sidecar's report (`path`): only the
    /// default eBPF mode passes plaintext through; the mTLS modes tunnel, the rest proxy.
    pub fn path(self) -> &'static str {
        if self == Mode::Ebpf {
            "passthrough"
        } else {
            "proxy"
        }
    }
}

/// The proxy port of the bench's runs (inside its own namespaces; in the assigned range).
const PROXY_PORT: u16 = 20100;
/// The echo server's port (the sink takes the next one).
const SERVER_PORT: u16 = 20110;
/// The sockperf server's port for the cross-check.
const SOCKPERF_PORT: u16 = 20120;
/// HAProxy's frontends in the client's namespace: the echo server's, and the sink's next.
const HAPROXY_PORT: u16 = 20130;
/// nginx's port for the wrk cross-check (on the echo server's pod address).
const NGINX_PORT: u16 = 20140;

/// Where the bench's processes may run. Every scenario runs its rounds in both, and each
/// target is judged in each: a verdict that holds in one placement and not the other says
/// so instead of depending on where the scheduler happened to put things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The server side (the echo server, the server pod's proxy) on CPU 0; the client side
    /// (the load generator and the sidecar or proxy in front of it) sharing CPU 1, as in a
    /// pod with a one-CPU limit.
    Pinned,
    /// No affinity at all: the scheduler places every thread.
    Unpinned,
}

impl Placement {
    pub const BOTH: [Placement; 2] = [Placement::Pinned, Placement::Unpinned];

    pub fn label(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::Unpinned => "unpinned",
        }
    }

    /// Makes this the placement of every process started from now on, and moves the
    /// scenario's long-lived echo server (`server_pid`, server side) to it.
    pub fn apply(self, server_pid: u32) -> Result<()> {
        PLACEMENT.store(self == Placement::Unpinned, Ordering::Relaxed);
        Side::Server.repin(server_pid)
    }
}

/// Whether [`Placement::Unpinned`] is in force (the bench's driver is one thread; the flag
/// is read when a child is spawned).
static PLACEMENT: AtomicBool = AtomicBool::new(false);

/// Which side of a scenario a process belongs to, for [`Placement::Pinned`]: the server
/// side on one CPU, the client side on another. With one CPU, everything shares it.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Server,
    Client,
}

impl Side {
    pub fn cpu(self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self {
            Side::Server => 0,
            Side::Client => 1.min(cpus - 1),
        }
    }

    /// The CPUs this side may use under the current placement.
    fn cpu_set(self) -> libc::cpu_set_t {
        let cpus: Vec<usize> = if PLACEMENT.load(Ordering::Relaxed) {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        } else {
            vec![self.cpu()]
        };
        // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes within it for
        // CPU numbers below CPU_SETSIZE, which these are.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            cpus.into_iter().for_each(|c| libc::CPU_SET(c, &mut set));
            set
        }
    }

    /// Places `cmd` (and everything it starts, which inherits the mask) on this side's CPUs.
    pub fn pin(self, cmd: &mut Command) {
        let set = self.cpu_set();
        // SAFETY: sched_setaffinity is async-signal-safe; the set is copied into the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Moves every thread of a running process to this side's CPUs.
    fn repin(self, pid: u32) -> Result<()> {
        let set = self.cpu_set();
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("listing the threads of {pid}"))?;
        for task in tasks {
            let tid: libc::pid_t = task?.file_name().to_string_lossy().parse()?;
            // SAFETY: plain syscall on a thread id with a set on our stack.
            if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) }
                != 0
            {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("placing thread {tid} of {pid}"));
            }
        }
        Ok(())
    }
}

/// One scenario's results: per mode, every round's client result.
pub struct ScenarioResults {
    pub name: &'static str,
    pub placement: Placement,
    pub description: &'static str,
    pub runs: Vec<(Mode, Vec<ClientResult>)>,
    /// Attempts that failed and were repeated, with why (the report lists them).
    pub failures: Vec<String>,
}

/// Attempts per run: a failed run is repeated, and listed in the report, rather than
/// throwing away the whole bench. (It exists for the mTLS modes, where a bulk stream's last
/// bytes sometimes stall in the tunnel; see docs/performance.md.)
const ATTEMPTS: usize = 3;

pub fn bench(opts: &Options) -> Result<()> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "cargo xtask bench needs root (network namespaces, cgroups, eBPF, iptables): run it with sudo"
        );
    }
    // Before the build: a missing anchor fails at once, in one line.
    let ztunnel_bin = ztunnel::binary(&build_ebpf::workspace_root())?;
    if !opts.quick {
        wrk::check_installed()?;
    }
    build_ebpf::build(&build_ebpf::Options::default())?;
    step("building the sidecar and the load generator (release)");
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "sidecar-user",
        "-p",
        "xtask",
    ]))?;
    let root = build_ebpf::workspace_root();
    let bins = Bins {
        sidecar: root.join("target/release/sidecar"),
        load: root.join("target/release/xtask"),
    };
    let out_dir = root.join("target/bench");
    let raw = out_dir.join("raw");
    let _ = fs::remove_dir_all(&raw);
    fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;

    if opts.windows {
        return windows::sweep(&bins, &raw, &out_dir.join("windows.md"));
    }
    // The order of modes in each round is drawn from this seed, which the report gives.
    let params = Params {
        order_seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        ..Params::for_run(opts.quick)
    };
    step(&format!(
        "bench ({}): {} round(s) × {} modes (loopback) and {} modes (pods); {} exchanges per size per round",
        if opts.quick { "quick" } else { "full" },
        params.rounds,
        Mode::SINGLE.len(),
        Mode::ALL.len(),
        params.exchanges
    ));

    let load_at_start = report::load_average();
    let mut progress = Progress::new(
        params.rounds * Placement::BOTH.len() * (Mode::SINGLE.len() + Mode::ALL.len()),
    );
    let mut order_rng = SplitMix(params.order_seed);
    let mut results = Vec::new();
    let mut crosschecks = Vec::new();
    let mut http_check = None;
    let startups;
    let kernel;
    let idle;
    let meshed_idle;
    {
        let lo = Netns::create("scbm-lo")?;
        let server_addr = SocketAddr::from(([127, 0, 0, 1], SERVER_PORT));
        let server = Server::start(plain_server(&bins.load, server_addr), &lo)?;
        results.extend(run_scenario(
            (
                "loopback",
                "same host: client and server on 127.0.0.1 in one namespace",
            ),
            server.pid(),
            &Mode::SINGLE,
            &bins,
            &Client {
                ns: &lo,
                server: server_addr,
                mesh: None,
                ztunnel: None,
            },
            &params,
            &raw,
            &mut progress,
            &mut order_rng,
        )?);
        progress.say("cross-check: sockperf ping-pong, direct, 64 B");
        let place = sockperf::Place {
            name: "loopback",
            client: &lo,
            server_ns: &lo,
            server: SocketAddr::from(([127, 0, 0, 1], SOCKPERF_PORT)),
            mesh: None,
            ztunnel: None,
        };
        let secs = if opts.quick { 1 } else { 3 };
        crosschecks.push((
            "loopback",
            sockperf::crosscheck(&place, &Mode::SINGLE, secs, &raw),
        ));
        progress.say("kernel cost of a pass-through connection (bpf_stats)");
        kernel = Some(kernel_cost_run(&bins, &lo, server_addr, opts.quick, &raw));
        progress.say("sidecar startup: exec to /readyz 200, and idle RSS");
        startups = startup::measure(&bins.sidecar, &lo, if opts.quick { 2 } else { 9 }, &raw)?;
        progress.say(&format!(
            "idle connections: up to {} held open through sidecar run --proxy-all",
            idle::CONNECTIONS
        ));
        idle = idle::measure(&bins.sidecar, &bins.load, &lo, &raw)?;
    }
    {
        let pods = Pods::create()?;
        let server_addr = SocketAddr::new(POD_SERVER_IP.parse()?, SERVER_PORT);
        let server = Server::start(plain_server(&bins.load, server_addr), &pods.server)?;
        let mesh = Mesh::new(&bins.sidecar, &pods.server, server_addr)?;
        let ztunnel = ZtunnelPair::new(
            ztunnel_bin,
            (&pods.client, POD_CLIENT_IP.parse()?),
            (&pods.server, server_addr.ip()),
            &raw,
        )?;
        let wanted = if opts.quick {
            idle::QUICK_MESHED
        } else {
            idle::CONNECTIONS
        };
        progress.say(&format!(
            "idle meshed connections: up to {wanted} held open through the eBPF + mTLS pair"
        ));
        meshed_idle = idle::measure_meshed(&bins.sidecar, &bins.load, &pods, &mesh, wanted, &raw)?;
        results.extend(run_scenario(
            ("pods", "two namespaces (pods) joined by a veth pair"),
            server.pid(),
            &Mode::ALL,
            &bins,
            &Client {
                ns: &pods.client,
                server: server_addr,
                mesh: Some(&mesh),
                ztunnel: Some(&ztunnel),
            },
            &params,
            &raw,
            &mut progress,
            &mut order_rng,
        )?);
        // Full runs only: nine more sockperf runs would add ~40 s to the quick one.
        if !opts.quick {
            progress.say("cross-check: sockperf ping-pong in the pods, 64 B");
            let place = sockperf::Place {
                name: "pods",
                client: &pods.client,
                server_ns: &pods.server,
                server: SocketAddr::new(server_addr.ip(), SOCKPERF_PORT),
                mesh: Some(&mesh),
                ztunnel: Some(&ztunnel),
            };
            crosschecks.push(("pods", sockperf::crosscheck(&place, &Mode::ALL, 3, &raw)));
            progress.say("cross-check: wrk against nginx in the pods, keep-alive and close");
            let place = sockperf::Place {
                server: SocketAddr::new(server_addr.ip(), NGINX_PORT),
                ..place
            };
            http_check = Some(wrk::crosscheck(&place, &wrk::MODES, &raw));
        }
    }
    progress.done();

    let summary = report::summarize(&results)?;
    let md = report::markdown(
        &summary,
        &params,
        opts.quick,
        &report::CrossChecks {
            sockperf: &crosschecks,
            wrk: http_check.as_ref(),
            kernel: kernel.as_ref(),
        },
        &startups,
        (&idle, &meshed_idle),
        &load_at_start,
    );
    let svg = report::svg(&summary);
    fs::write(out_dir.join("report.md"), &md)?;
    fs::write(out_dir.join("verdicts.txt"), report::verdicts(&md))?;
    fs::write(out_dir.join("report.svg"), &svg)?;
    report::check(&md).context("the report lacks numbers")?;
    for (name, result) in &crosschecks {
        if let Err(e) = result {
            if opts.quick {
                step(&format!("sockperf cross-check ({name}) unavailable: {e:#}"));
            } else {
                bail!("sockperf cross-check ({name}) failed: {e:#}");
            }
        }
    }
    if let Some(Err(e)) = &http_check {
        bail!("wrk cross-check (pods) failed: {e:#}");
    }
    if let Some(Err(e)) = &kernel {
        bail!("kernel cost of a pass-through connection: {e:#}");
    }
    step(&format!(
        "wrote {} and report.svg in {:.0} s",
        out_dir.join("report.md").display(),
        started.elapsed().as_secs_f64()
    ));
    let failures: usize = summary.iter().map(|s| s.failures.len()).sum();
    if failures > 0 {
        step(&format!(
            "{failures} run(s) failed and were repeated: listed in report.md"
        ));
    }
    println!("{}", report::headline(&summary));
    Ok(())
}

struct Bins {
    sidecar: PathBuf,
    load: PathBuf,
}

/// Where a scenario's client runs and what it reaches.
struct Client<'a> {
    ns: &'a Netns,
    server: SocketAddr,
    /// The server pod's side of the mTLS modes.
    mesh: Option<&'a Mesh<'a>>,
    /// Both pods' ztunnels, for the `ztunnel pair` mode.
    ztunnel: Option<&'a ZtunnelPair<'a>>,
}

/// The scenario's rounds in each [`Placement`], the long-lived echo server (`server_pid`)
/// moved to each and back to pinned afterwards, where the cross-checks, startup and idle
/// measurements run.
#[allow(clippy::too_many_arguments)]
fn run_scenario(
    scenario: (&'static str, &'static str),
    server_pid: u32,
    modes: &[Mode],
    bins: &Bins,
    client: &Client,
    params: &Params,
    raw: &Path,
    progress: &mut Progress,
    order_rng: &mut SplitMix,
) -> Result<Vec<ScenarioResults>> {
    let mut results = Vec::new();
    for placement in Placement::BOTH {
        placement.apply(server_pid)?;
        results.push(run_rounds(
            scenario, placement, modes, bins, client, params, raw, progress, order_rng,
        )?);
    }
    Placement::Pinned.apply(server_pid)?;
    Ok(results)
}

/// Every round runs each of `modes` once, in an order drawn afresh for each round (so no
/// mode always follows the same one, or always runs first after a quiet spell); the mTLS
/// modes need the client's `mesh`, the ztunnel pair its `ztunnel`. Runs in `placement`,
/// which the caller has applied.
#[allow(clippy::too_many_arguments)]
fn run_rounds(
    (name, description): (&'static str, &'static str),
    placement: Placement,
    modes: &[Mode],
    bins: &Bins,
    client: &Client,
    params: &Params,
    raw: &Path,
    progress: &mut Progress,
    order_rng: &mut SplitMix,
) -> Result<ScenarioResults> {
    let mut runs: Vec<(Mode, Vec<ClientResult>)> = modes.iter().map(|m| (*m, Vec::new())).collect();
    let mut failures = Vec::new();
    let mut order: Vec<usize> = (0..runs.len()).collect();
    for round in 0..params.rounds {
        order_rng.shuffle(&mut order);
        for &i in &order {
            let (mode, results) = &mut runs[i];
            let what = format!(
                "{name} ({}), round {}/{}, {}",
                placement.label(),
                round + 1,
                params.rounds,
                mode.label()
            );
            for attempt in 1..=ATTEMPTS {
                progress.say(&what);
                let mut stem = format!("{name}-{}-{}-{round}", placement.label(), mode.file_key());
                if attempt > 1 {
                    stem += &format!("-retry{attempt}");
                }
                match run_client(bins, client, *mode, params, &raw.join(stem)) {
                    Ok(result) => {
                        results.push(result);
                        break;
                    }
                    Err(e) if attempt < ATTEMPTS => {
                        failures.push(format!("{what}, attempt {attempt}: {e:#}"));
                        progress.say(&format!("{what}: failed, repeating: {e:#}"));
                    }
                    Err(e) => return Err(e.context(format!("{what}, attempt {attempt}"))),
                }
            }
            progress.tick();
        }
    }
    Ok(ScenarioResults {
        name,
        placement,
        description,
        runs,
        failures,
    })
}

/// One client run in the client namespace, under `sidecar run` unless direct; with mTLS,
/// the server pod's sidecar runs for just as long.
fn run_client(
    bins: &Bins,
    Client {
        ns,
        server,
        mesh,
        ztunnel,
    }: &Client,
    mode: Mode,
    params: &Params,
    stem: &Path,
) -> Result<ClientResult> {
    let out = stem.with_extension("json");
    let log = stem.with_extension("log");
    let sidecar_report = stem.with_extension("sidecar.json");
    let mesh = match (mode.mtls(), *mesh) {
        (false, _) => None,
        (true, Some(mesh)) => Some(mesh),
        (true, None) => bail!("{} needs a server pod", mode.label()),
    };
    let peer = mesh.map(|m| m.start_server(mode, stem)).transpose()?;
    let zt_pair = match (mode == Mode::Ztunnel, *ztunnel) {
        (false, _) => None,
        (true, Some(z)) => Some(z.start(stem)?),
        (true, None) => bail!("{} needs a server pod", mode.label()),
    };
    // HAProxy stands where the sidecar would: the client connects to it instead.
    let haproxy = (mode == Mode::Haproxy)
        .then(|| Haproxy::start(ns, *server, stem))
        .transpose()?;
    let server = haproxy.as_ref().map_or(*server, Haproxy::front);
    let mut cmd = match mode.sidecar_args() {
        None => Command::new(&bins.load),
        Some(args) => {
            let mut c = Command::new(&bins.sidecar);
            c.arg("run")
                .args(args)
                .args(mesh.map(Mesh::client_args).unwrap_or_default())
                .args(["--proxy-port", &PROXY_PORT.to_string()])
                .arg("--report")
                .arg(&sidecar_report)
                .arg("--")
                .arg(&bins.load);
            c
        }
    };
    cmd.args(["bench-client", "--server", &server.to_string()])
        .args(["--exchanges", &params.exchanges.to_string()])
        .args(["--connections", &params.connections.to_string()])
        .args(["--bulk-secs", &params.bulk_secs.to_string()])
        .arg("--out")
        .arg(&out);
    if mode.sidecar_args().is_some() {
        cmd.arg("--sidecar-stats");
        if params.bpf_cost {
            cmd.arg("--bpf-cost");
        }
    }
    if let Some(h) = &haproxy {
        cmd.args(["--proxy-pid", &h.pid().to_string()]);
    }
    if let Some(peer) = &peer {
        cmd.args(["--peer-sidecar", &peer.pid().to_string()]);
    }
    if let Some(z) = &zt_pair {
        cmd.args(["--proxy-pid", &z.client_pid().to_string()])
            .args(["--peer-sidecar", &z.server_pid().to_string()]);
    }
    ns.enter(&mut cmd)?;
    Side::Client.pin(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?);
    let limit = Duration::from_secs(60) + Duration::from_secs_f64(params.bulk_secs * 4.0);
    let status = wait_bounded(&mut cmd.spawn().context("starting the client")?, limit)?;
    let peer_report = peer.map(|p| p.stop()).transpose()?;
    if let Some(h) = haproxy {
        h.stop()?;
    }
    let expected = load::SIZES.len() + params.connections + load::STREAMS.iter().sum::<usize>();
    // Stopped (and its logs checked) before the client's failure is looked at: a failed
    // client's connections do not add up anyway.
    let zt_checked = zt_pair.map(|z| z.stop_and_check(expected));
    if !status.success() {
        // The client's anyhow error and its causes, on one line.
        let text = fs::read_to_string(&log).unwrap_or_default();
        let last = text
            .lines()
            .skip_while(|l| !l.starts_with("Error: "))
            .take_while(|l| !l.starts_with("Stack backtrace"))
            .map(|l| l.trim().trim_start_matches("Error: "))
            .filter(|l| !l.is_empty() && *l != "Caused by:")
            .collect::<Vec<_>>()
            .join(": ");
        bail!(
            "the client failed ({status}): {last} (log: {})",
            log.display()
        );
    }
    if let Some(checked) = zt_checked {
        checked?;
    }
    if mode.sidecar_args().is_some() {
        let tunnel = mode.mtls().then_some(("dst_identity", mesh::SERVER_ID));
        check_carried(&sidecar_report, "outbound", mode.path(), expected, tunnel)?;
    }
    if let Some(report) = peer_report {
        check_carried(
            &report,
            "inbound",
            "proxy",
            expected,
            Some(("src_identity", mesh::CLIENT_ID)),
        )?;
    }
    let json = fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    Ok(serde_json::from_slice(&json)?)
}

/// One pass-through client run in the loopback namespace (pinned, as the cross-checks)
/// with the kernel's program statistics on for just its duration: the connect hook's and
/// sockops' time per connection of its connect-exchange-close loop.
fn kernel_cost_run(
    bins: &Bins,
    ns: &Netns,
    server: SocketAddr,
    quick: bool,
    raw: &Path,
) -> Result<kernel_cost::KernelCost> {
    let params = Params {
        rounds: 1,
        exchanges: 100,
        connections: if quick { 2_000 } else { 20_000 },
        bulk_secs: 0.05,
        order_seed: 0,
        bpf_cost: true,
    };
    let client = Client {
        ns,
        server,
        mesh: None,
        ztunnel: None,
    };
    let stem = raw.join("kernel-cost");
    let result = {
        let _stats = kernel_cost::StatsOn::new()?;
        run_client(bins, &client, Mode::Ebpf, &params, &stem)?
    };
    kernel_cost::KernelCost::from_run(
        result.crr_count,
        result.crr_bpf,
        &stem.with_extension("json"),
    )
}

/// The figures of a sidecar mode mean something only if the sidecar really carried (or, for
/// pass-through, recorded) every connection: its report must list each one (2
/// request/response, the connect-exchange-close ones, 1 + 16 bulk) in `direction`, on `path`,
/// all `ok`. With a `tunnel` (identity field, SPIFFE ID), each one must also have crossed
/// mTLS with that verified peer.
fn check_carried(
    report: &Path,
    direction: &str,
    path: &str,
    expected: usize,
    tunnel: Option<(&str, &str)>,
) -> Result<()> {
    let json: serde_json::Value = serde_json::from_slice(
        &fs::read(report).with_context(|| format!("reading {}", report.display()))?,
    )?;
    let conns: Vec<_> = json["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["direction"] == direction)
        .collect();
    let ok = conns
        .iter()
        .filter(|c| c["outcome"] == "ok" && c["path"] == path)
        .count();
    if conns.len() != expected || ok != expected {
        bail!(
            "the sidecar recorded {} {direction} connection(s), {ok} ok on path {path}, where \
             the client made {expected}: interception did not happen as it should ({})",
            conns.len(),
            report.display()
        );
    }
    if let Some((field, id)) = tunnel
        && let Some(c) = conns.iter().find(|c| c["mode"] != "mtls" || c[field] != id)
    {
        bail!(
            "a connection did not cross the mTLS tunnel with {field} {id}: {c} ({})",
            report.display()
        );
    }
    Ok(())
}

/// Waits for a child; past `limit` it gets SIGTERM (the sidecar then stops its command and
/// cleans up), and SIGKILL 10 s later.
fn wait_bounded(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let hard = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() && Instant::now() < hard {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a child that may still run: SIGTERM (a sidecar then stops its command and cleans
/// up; HAProxy and nginx stop at once), then [`wait_bounded`] for `limit`, SIGKILL after.
fn terminate(child: &mut Child, limit: Duration) -> Result<()> {
    if child.try_wait()?.is_none() {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_bounded(child, limit)?;
    }
    Ok(())
}

/// The load generator's echo/sink server, with no sidecar.
fn plain_server(load: &Path, listen: SocketAddr) -> Command {
    let mut cmd = Command::new(load);
    cmd.args(["bench-server", "--listen", &listen.to_string()])
        .stderr(Stdio::inherit());
    cmd
}

/// A server (the bench server, or a sidecar running it) in a namespace, ready once it
/// printed `ready`; stopped on drop.
struct Server(Child);

impl Server {
    fn start(mut cmd: Command, ns: &Netns) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        ns.enter(&mut cmd)?;
        Side::Server.pin(&mut cmd);
        let mut child = cmd.spawn().context("starting the bench server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let server = Self(child);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.trim() == "ready" => Ok(server),
            _ => bail!("the bench server in {} did not start", ns.name()),
        }
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for it to exit on its own (bounded: then it is stopped, and that is an error);
    /// fails unless it exited with status 0.
    fn wait(&mut self, limit: Duration) -> Result<()> {
        let status = wait_bounded(&mut self.0, limit)?;
        if !status.success() {
            bail!("exited with {status}");
        }
        Ok(())
    }

    /// SIGTERM, so that a sidecar stops its command and cleans up; SIGKILL if that takes
    /// too long.
    fn stop(&mut self) -> Result<()> {
        terminate(&mut self.0, Duration::from_secs(15))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// One status line, rewritten in place on a terminal, one line per step otherwise.
struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn say(&self, what: &str) {
        let line = format!(
            "xtask bench: [{}/{}, {:.0} s] {what}",
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        if self.tty {
            eprint!("\r\x1b[K{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }

    fn tick(&mut self) {
        self.done += 1;
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report with `n` outbound connections, `edit` applied to the last one.
    fn report(n: usize, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
        let mut conns: Vec<_> = (0..n)
            .map(|_| {
                serde_json::json!({"direction": "outbound", "outcome": "ok", "mode": "mtls",
                                   "path": "proxy", "dst_identity": mesh::SERVER_ID})
            })
            .collect();
        edit(conns.last_mut().unwrap());
        let path = std::env::temp_dir().join(format!(
            "sidecar-bench-check-{}-{n}-{}.json",
            std::process::id(),
            thread::current().name().unwrap_or("t").replace(':', "_")
        ));
        fs::write(
            &path,
            serde_json::json!({ "connections": conns }).to_string(),
        )
        .unwrap();
        path
    }

    #[test]
    fn a_run_counts_only_if_every_connection_crossed_the_tunnel() {
        let tunnel = Some(("dst_identity", mesh::SERVER_ID));
        let check = |path: PathBuf, tunnel| {
            let r = check_carried(&path, "outbound", "proxy", 3, tunnel);
            let _ = fs::remove_file(&path);
            r
        };
        assert!(check(report(3, |_| {}), tunnel).is_ok());
        assert!(check(report(2, |_| {}), tunnel).is_err(), "one missing");
        assert!(check(report(3, |c| c["outcome"] = "io_error".into()), tunnel).is_err());
        assert!(check(report(3, |c| c["mode"] = "plain".into()), tunnel).is_err());
        assert!(
            check(report(3, |c| c["path"] = "passthrough".into()), tunnel).is_err(),
            "a connection on the wrong path"
        );
        assert!(
            check(
                report(3, |c| c["dst_identity"] = "spiffe://x/y".into()),
                tunnel
            )
            .is_err()
        );
        assert!(
            check(report(3, |c| c["mode"] = "plain".into()), None).is_ok(),
            "plain modes"
        );
    }
}
