//! `sidecar agent`: the privileged node half of the Kubernetes deployment (a DaemonSet).
//!
//! It loads the eBPF object once per node and attaches connect4/6, sockops and getsockopt at
//! the pods' cgroup root ([`pins`]), then serves a Unix socket on which each pod's unprivileged
//! `sidecar proxy` registers ([`server`], [`requests`], [`protocol`]). The caller's pod comes from its
//! SO_PEERCRED pid and `/proc/<pid>/cgroup` ([`pod`]), and interception is turned on for that
//! pod only: `WORKLOADS[pod cgroup] = WORKLOAD`, `WORKLOADS[proxy container] = PROXY`
//! ([`registry`]). A pod without a registration passes through (counted as
//! `connect_not_meshed`).
//!
//! Lifecycle: pins and registrations outlive the agent process. SIGTERM leaves everything
//! attached; the next agent adopts the pins and reconciles the registrations (pods that are
//! gone are dropped). `sidecar agent --uninstall` removes every pin, link, state file and the
//! socket.

pub mod admin;
pub mod callers;
pub mod cli;
pub mod denies;
pub mod listener;
#[cfg(test)]
mod memory_maps;
pub mod peer;
pub mod pins;
pub mod pod;
pub mod pod_maps;
pub mod records;
pub mod registry;
pub mod requests;
pub mod server;
pub mod throttle;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use self::{pins::AgentPins, pod_maps::PodMaps, registry::Registry, throttle::LogThrottle};
use crate::host::{bpffs::Bpffs, cgroup, privileges};
use crate::registration::Reply;

/// Default state directory: the persisted registrations and the agent's record.
pub const STATE_DIR: &str = crate::defaults::AGENT_STATE_DIR;
/// The agent's record in the state directory.
const AGENT_FILE: &str = "agent.json";
/// How long adopted kernel entries without registrations are kept for their sidecars to
/// re-register (they retry within 2 s of losing the agent).
const LOST_STATE_GRACE: Duration = Duration::from_secs(10);

/// Everything `sidecar agent` is told.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The pods' cgroup root; discovered (`kubepods.slice`, `kubepods`) when `None`.
    pub cgroup_root: Option<PathBuf>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// Default `<bpffs>/sidecar/agent`.
    pub pin_dir: Option<PathBuf>,
    pub sockmap: bool,
    /// How often pods that went away are looked for (and the socket file checked).
    pub sweep_interval: Duration,
    /// The admin endpoint (`/healthz`, `/metrics`, `/status`); `None`: off.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Each pod's share of the pass-through tables, for programs this agent loads.
    pub quotas: pins::Quotas,
}

impl AgentOptions {
    fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| self.bpffs.join("sidecar/agent"))
    }
}

/// What the agent writes about itself in the state directory.
#[derive(Debug, Serialize, Deserialize)]
struct AgentRecord {
    pid: u32,
    cgroup_root: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
    /// Fingerprint of the eBPF object that installed the pins.
    object: String,
    /// Whether the pinned programs were loaded with the sockmap fast path on (absent in the
    /// records of older agents).
    #[serde(default)]
    sockmap: Option<bool>,
    version: String,
}

/// The agent's shared state, behind one lock (requests and the sweep are short).
pub struct Agent {
    pub cgroup2: PathBuf,
    /// Our cgroup namespace's root under `cgroup2`, when we are in a namespace of our own
    /// (see [`pod::own_namespace_root`]).
    pub ns_root: Option<PathBuf>,
    pub root: PathBuf,
    /// The agent's own pod (the DaemonSet's), if it runs in one: its exec probes ask for
    /// `status` from there, which callers in any other pod are refused.
    pub own_pod: Option<String>,
    pub pins: AgentPins,
    pub registry: Registry,
    /// Whether the attached programs run the sockmap fast path (what they were loaded with).
    pub sockmap: bool,
    /// Refusal log lines, rate-limited per caller and reason.
    pub throttle: LogThrottle,
    /// The pods' sidecars listening for their pass-through records.
    pub records: Arc<records::Subscribers>,
    /// Pods' sidecars listening for their kernel refusals (fed by [`denies`]).
    pub denies: Arc<records::Subscribers<crate::registration::PolicyDenied>>,
}

impl Agent {
    /// Counts and logs a refused request of `caller`, and builds its answer.
    pub fn refuse(&mut self, caller: &str, reason: &'static str, error: impl ToString) -> Reply {
        let error = error.to_string();
        self.refused(caller, reason, &error);
        Reply::refused(reason, error)
    }

    /// Counts a refusal, and logs it unless `caller` had too many of them lately.
    pub fn refused(&mut self, caller: &str, reason: &'static str, error: &str) {
        self.registry.refused(reason);
        match self
            .throttle
            .admit(caller, reason, std::time::Instant::now())
        {
            Some(0) => warn!(reason, caller, "registration refused: {error}"),
            Some(left_out) => warn!(
                reason,
                caller,
                left_out,
                "registration refused: {error} ({left_out} more like it not logged)"
            ),
            None => {}
        }
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "cgroup_root": self.root,
            "pin_dir": self.pins.dir,
            "adopted": self.pins.adopted,
            "sockmap": self.sockmap,
            "pods": self.registry.pods().collect::<Vec<_>>(),
            "refusals": self.registry.refusals(),
            "counters": self.pins.counters(),
            "passthrough_records": self.records_summary(),
            "passthrough_usage": self.usage_by_pod(),
        })
    }

    /// What each pod holds of the node's pass-through tables (its share is the quota), and
    /// its close records the ring had no room for, by pod UID.
    fn usage_by_pod(&self) -> serde_json::Value {
        let usage = self.registry.pods().filter_map(|p| {
            let u = self.pins.usage(p.scope)?;
            Some((
                p.pod_uid.clone(),
                serde_json::json!({
                    "tracked": u.tracked as i64,
                    "destinations": u.destinations as i64,
                    "records_dropped": u.records_dropped,
                }),
            ))
        });
        serde_json::Value::Object(usage.collect())
    }

    fn records_summary(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "capable": self.pins.passthrough_capable(),
            "delivered": self.records.delivered.load(Relaxed),
            "undelivered": self.records.undelivered.load(Relaxed),
        })
    }

    /// What the unauthenticated admin endpoint may show: counts, never which pods (the
    /// list of registrations is for root on the node, over the socket).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "adopted": self.pins.adopted,
            "registered_pods": self.registry.pods().count(),
            "unchecked_listener_pods": self.registry.pods().filter(|p| !p.listener_checked).count(),
            "refusals": self.registry.refusals(),
            "counters": self.pins.counters(),
            "passthrough_records": self.records_summary(),
        })
    }
}

/// Runs the agent until SIGTERM/SIGINT; returns the exit code.
pub fn run(opts: AgentOptions) -> Result<i32> {
    privileges::require("sidecar agent")?;
    // Before any thread exists: setns affects only the calling thread, and every thread the
    // runtime starts later inherits it.
    enter_host_cgroup_namespace();
    let cgroup2 = cgroup::root()?;
    let ns_root = pod::own_namespace_root(&cgroup2).context("reading our cgroup namespace")?;
    if let Some(r) = &ns_root {
        info!(root = %r.display(), "in a cgroup namespace of our own: callers' cgroups are read relative to its root");
    }
    let root = pods_root(&cgroup2, opts.cgroup_root.as_deref())?;
    let own_pod = pod::cgroup_of(&cgroup2, std::process::id(), ns_root.as_deref())
        .ok()
        .and_then(|cgroup| pod::derive(&root, &cgroup).ok())
        .map(|p| p.uid);
    let _bpffs = Bpffs::ensure(&opts.bpffs)?;
    let pin_dir = opts.pin_dir();
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating the state directory {}", opts.state_dir.display()))?;
    let previous = read_record(&opts.state_dir);
    if let Some(p) = previous
        .as_ref()
        .filter(|p| p.pid != std::process::id() && pid_alive(p.pid))
    {
        bail!(
            "another agent (pid {}) uses the state directory {}: stop it first, or pick another --state-dir",
            p.pid,
            opts.state_dir.display()
        );
    }

    // Pins attached elsewhere cannot be adopted for this root: the programs would keep
    // intercepting the old one and never see these pods.
    if let Some(p) = previous.as_ref().filter(|p| p.cgroup_root != root)
        && pin_dir.exists()
    {
        bail!(
            "the pins in {} are attached at {}, not at --cgroup-root {}: run `sidecar agent \
             --uninstall` first, or keep the same --cgroup-root",
            pin_dir.display(),
            p.cgroup_root.display(),
            root.display()
        );
    }
    let mut pins = AgentPins::open_or_install(&pin_dir, &root, opts.sockmap, opts.quotas)?;
    let object = object_fingerprint();
    // A restart adopts as is; an upgrade (the pins come from another build) swaps the programs
    // in the pinned links for this build's and keeps every map.
    // Adopted programs keep the sockmap setting they were loaded with, as agent.json
    // recorded it (an older agent's record does not say: this agent's flag is the best guess).
    let kept_sockmap = previous
        .as_ref()
        .and_then(|p| p.sockmap)
        .unwrap_or(opts.sockmap);
    let (pinned_object, sockmap) = match previous.as_ref().map(|p| p.object.clone()) {
        _ if !pins.adopted => (object, opts.sockmap),
        Some(o) if o == object => (o, kept_sockmap),
        other => match pins::upgrade(&pin_dir, &root, opts.sockmap, opts.quotas) {
            Ok(()) => {
                info!(from = other.as_deref().unwrap_or("unknown"), to = %object, "eBPF programs upgraded in place");
                // The upgrade pins the maps the new object adds.
                pins.reopen_added();
                (object, opts.sockmap)
            }
            Err(e) => {
                warn!(
                    "cannot upgrade the pinned programs ({e}): the old ones stay attached (and keep \
                     intercepting) until `sidecar agent --uninstall`"
                );
                (other.unwrap_or_else(|| "unknown".into()), kept_sockmap)
            }
        },
    };
    write_record(
        &opts.state_dir,
        &AgentRecord {
            pid: std::process::id(),
            cgroup_root: root.clone(),
            pin_dir: pin_dir.clone(),
            socket: opts.socket.clone(),
            object: pinned_object,
            sockmap: Some(sockmap),
            version: env!("CARGO_PKG_VERSION").into(),
        },
    )?;

    let capacity = pins.cidr_capacity();
    if capacity < sidecar_common::limits::EXCLUDED_CIDRS {
        warn!(
            "the pinned CIDR tries hold {capacity} entries (installed by an older build; maps \
             carry over an upgrade): each pod may exclude, and name as meshed, at most {} CIDRs \
             until `sidecar agent --uninstall` and a restart create the {}-entry tries",
            registry::cidr_quota(capacity),
            sidecar_common::limits::EXCLUDED_CIDRS
        );
    }
    match pins
        .policy
        .as_ref()
        .map(crate::policy::kernel::PolicyMaps::capacity)
    {
        Some(capacity) if capacity < sidecar_common::limits::POLICY_OUT => warn!(
            "the pinned policy tries hold {capacity} entries (installed by an older build; maps \
             carry over an upgrade): a pod's policy may compile to at most {} destination \
             prefixes until `sidecar agent --uninstall` and a restart create the {}-entry tries",
            registry::policy_quota(capacity),
            sidecar_common::limits::POLICY_OUT
        ),
        Some(_) => {}
        None => warn!(
            "the pins have no policy maps (installed by an older build): pods with a policy are \
             refused until `sidecar agent --uninstall` and a restart create them"
        ),
    }
    if let Some(why) = pins.shares_unfit() {
        warn!(
            "{why} (installed by an older build; maps carry over an upgrade): until `sidecar agent --uninstall` and a restart, one pod can leave others' pass-through connections untracked"
        );
    }
    let registrations_kept = opts.state_dir.join(registry::FILE).exists();
    let mut registry = Registry::load(&opts.state_dir)
        .with_context(|| format!("reading registrations in {}", opts.state_dir.display()))?;
    if pins.adopted && !registrations_kept {
        warn!(
            "the pins are adopted but {} has no registrations: keeping the pinned interception \
             for {LOST_STATE_GRACE:?} while the sidecars re-register (keep the state directory on \
             the host, e.g. a hostPath)",
            opts.state_dir.display()
        );
        registry.hold(&pins, LOST_STATE_GRACE);
    }
    let gone = registry.reconcile(&mut pins)?;
    info!(
        kept = registry.pods().count(),
        dropped = gone.len(),
        adopted = pins.adopted,
        cgroup_root = %root.display(),
        "registrations reconciled"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let records = Arc::new(records::Subscribers::default());
    if pins.passthrough_capable() {
        let _guard = rt.enter();
        match crate::redirect::passthrough::DirectEvents::open(&pin_dir) {
            Ok(events) => {
                rt.spawn(records.clone().run(events));
            }
            Err(e) => warn!(
                "cannot read the pass-through records ({e}): pods' pass-through connections go \
                 unrecorded"
            ),
        }
    }
    let agent = Arc::new(Mutex::new(Agent {
        cgroup2,
        ns_root,
        root,
        own_pod,
        pins,
        registry,
        sockmap,
        throttle: LogThrottle::default(),
        records,
        denies: Arc::default(),
    }));

    // Bound before serving anything, so a busy address is a clean error.
    {
        let _guard = rt.enter();
        match crate::policy::pinned::DenyEvents::open(&pin_dir) {
            Ok(events) => {
                rt.spawn(denies::run(events, agent.clone()));
            }
            Err(e) => warn!(
                "cannot read the pods' policy refusals ({e}): connects the kernel refuses go \
                 unlogged (the eBPF counter connect_policy_denied still counts them)"
            ),
        }
    }

    let admin = match opts.admin_addr {
        Some(addr) => Some(std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot serve the admin endpoint on {addr}: {e}: pick another --admin-addr"
            )
        })?),
        None => None,
    };
    if let Some(listener) = admin {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        rt.spawn(admin::serve(listener, agent.clone()));
        info!(%addr, "agent admin endpoint serving");
    }
    rt.block_on(serve(agent, &opts))?;
    info!(
        "agent stopping: programs stay attached and pinned (`sidecar agent --uninstall` removes them)"
    );
    Ok(0)
}

async fn serve(agent: Arc<Mutex<Agent>>, opts: &AgentOptions) -> Result<()> {
    let mut bound = server::bind(&opts.socket, agent.clone()).with_context(|| {
        format!(
            "cannot listen on {}: pick another with --socket",
            opts.socket.display()
        )
    })?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sweep = tokio::time::interval(opts.sweep_interval);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sweep.tick() => {}
        }
        {
            let mut a = agent.lock().unwrap_or_else(|p| p.into_inner());
            let Agent { pins, registry, .. } = &mut *a;
            if let Err(e) = registry.reconcile(pins) {
                warn!("sweep: {e}");
            }
        }
        if !bound.intact() {
            warn!(socket = %opts.socket.display(), "registration socket file gone or replaced: binding it again");
            match server::bind(&opts.socket, agent.clone()) {
                Ok(new) => std::mem::replace(&mut bound, new).close(),
                Err(e) => warn!("re-binding {}: {e}", opts.socket.display()),
            }
        }
    }
    bound.close();
    Ok(())
}

/// The pods' cgroup root: the one given, or the first of kubelet's that exists.
fn pods_root(cgroup2: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        let p = if p.is_absolute() {
            p.into()
        } else {
            cgroup2.join(p)
        };
        if !p.is_dir() {
            bail!(
                "--cgroup-root {} does not exist: give the cgroup that holds the pods (kubelet's \
                 kubepods.slice or kubepods under {})",
                p.display(),
                cgroup2.display()
            );
        }
        return Ok(p);
    }
    pod::DEFAULT_ROOTS
        .iter()
        .map(|r| cgroup2.join(r))
        .find(|p| p.is_dir())
        .with_context(|| {
            format!(
                "no pods' cgroup root found ({} under {}): is this a Kubernetes node? Give it with --cgroup-root",
                pod::DEFAULT_ROOTS.join(" or "),
                cgroup2.display()
            )
        })
}

/// In a container with its own cgroup namespace, joining PID 1's (hostPID) makes callers'
/// `/proc/<pid>/cgroup` host paths. It needs CAP_SYS_ADMIN and access to PID 1's namespace
/// file; when either is missing the agent reads callers' cgroups relative to its own
/// namespace instead ([`pod::own_namespace_root`]), so this is an optimisation, not a need.
fn enter_host_cgroup_namespace() {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let ours = std::fs::metadata("/proc/self/ns/cgroup").map(|m| m.ino());
    let init = std::fs::File::open("/proc/1/ns/cgroup");
    let (Ok(ours), Ok(init)) = (ours, init) else {
        tracing::debug!("PID 1's cgroup namespace is not readable: staying in ours");
        return;
    };
    if init.metadata().map(|m| m.ino()).ok() == Some(ours) {
        return;
    }
    // SAFETY: setns on an fd we own; affects only this (still single) thread.
    if unsafe { libc::setns(init.as_raw_fd(), libc::CLONE_NEWCGROUP) } == 0 {
        info!("joined PID 1's cgroup namespace");
    } else {
        tracing::debug!(
            "cannot join PID 1's cgroup namespace ({}): staying in ours",
            std::io::Error::last_os_error()
        );
    }
}

fn read_record(state_dir: &Path) -> Option<AgentRecord> {
    let bytes = std::fs::read(state_dir.join(AGENT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_record(state_dir: &Path, record: &AgentRecord) -> Result<()> {
    let path = state_dir.join(AGENT_FILE);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// FNV-1a of the embedded eBPF object: tells an upgrade (other programs) from a restart.
fn object_fingerprint() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in crate::redirect::ebpf::OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// `sidecar agent --uninstall`: every pin (which detaches the programs), the state files and
/// the socket. Refused while an agent runs. Returns the lines to print.
pub fn uninstall(opts: &AgentOptions) -> Result<Vec<String>> {
    privileges::require("sidecar agent --uninstall")?;
    if let Some(p) = read_record(&opts.state_dir).filter(|p| pid_alive(p.pid)) {
        bail!(
            "the agent (pid {}) is running: stop it first (SIGTERM), then uninstall",
            p.pid
        );
    }
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let pin_dir = opts.pin_dir();
    let (d, f) = pins::uninstall(&pin_dir);
    done.extend(d);
    failed.extend(f);
    if opts.pin_dir.is_none() && std::fs::remove_dir(opts.bpffs.join("sidecar")).is_ok() {
        done.push(format!("removed {}", opts.bpffs.join("sidecar").display()));
    }
    for file in [registry::FILE, AGENT_FILE] {
        let path = opts.state_dir.join(file);
        if std::fs::remove_file(&path).is_ok() {
            done.push(format!("removed {}", path.display()));
        }
    }
    if std::fs::remove_dir(&opts.state_dir).is_ok() {
        done.push(format!("removed {}", opts.state_dir.display()));
    }
    if std::fs::remove_file(&opts.socket).is_ok() {
        done.push(format!("removed {}", opts.socket.display()));
    }
    if let Some(dir) = opts.socket.parent()
        && std::fs::remove_dir(dir).is_ok()
    {
        done.push(format!("removed {}", dir.display()));
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    if done.is_empty() {
        done.push("nothing to uninstall".into());
    }
    Ok(done)
}

/// `sidecar agent --status`: asks the running agent over its socket.
pub fn status(socket: &Path) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "no agent answers on {}: is `sidecar agent` running? (--socket)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply: Reply = serde_json::from_str(&line).context("the agent's answer")?;
    match (reply.ok, reply.status) {
        (true, Some(s)) => Ok(s),
        _ => bail!("the agent refused: {}", reply.error.unwrap_or_default()),
    }
}
