//! Authorization policy: which connections may be made (outbound) and accepted (inbound).
//!
//! * [`schema`]: the TOML file, parsed strictly and validated; errors name the line.
//! * [`rules`]: the validated policy and its pure evaluation (first match wins).
//! * [`destinations`]: per-destination retries, circuit breaking and connection caps.
//! * [`load`]: a policy's text checked whole, parsed and compiled (files and pods alike).
//! * [`kernel`]: the outbound half compiled for the connect hooks (EPERM at `connect`), and
//!   put in force in a workload's two slots; [`pinned`]: those maps as pinned.
//! * [`stats`]: decisions counted by direction, rule and decision.
//! * [`reload`]: the file watched and swapped atomically, kernel maps first.
//!
//! [`Enforcer`] ties them together for the proxy: one live policy behind an `Arc` swapped
//! whole, so each connection is decided by one consistent policy.

pub mod destinations;
pub mod kernel;
pub mod load;
pub mod pinned;
pub mod reload;
pub mod rules;
pub mod schema;
pub mod stats;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;
use tracing::{info, warn};

pub use self::{
    load::{LoadError, Loaded, load},
    schema::PolicyError,
};
use self::{
    pinned::{DenyEvents, KernelPolicy},
    rules::{Action, Policy, Request},
    stats::{DecisionCount, PolicyStats},
};
use crate::telemetry::labels::{Decision, Direction};

/// How often the policy file is checked for changes.
const POLICY_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the kernel's deny events are read (and logged).
const EVENT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// A policy for the node agent to install in a pod's kernel maps, and where to say whether
/// it did (`Err`: its one-line refusal).
pub struct KernelUpdate {
    pub text: String,
    pub done: tokio::sync::oneshot::Sender<Result<(), AgentRefusal>>,
}

/// Why the node agent did not install a pod's policy.
#[derive(Debug)]
pub struct AgentRefusal {
    pub error: String,
    /// The agent's state, not the policy: unreachable, the pod not registered right now, or
    /// a refusal the agent marks `retry` (a kernel map update failed).
    pub retry: bool,
}

/// Who enforces the outbound policy at `connect()`: nobody (a proxy-only policy), the run's
/// own pinned maps (`sidecar run`), or the node agent, for a pod (`sidecar proxy`), reached
/// through the sidecar's registration connection.
pub enum KernelHalf {
    None,
    Local(Box<Mutex<KernelPolicy>>),
    Agent(tokio::sync::mpsc::Sender<KernelUpdate>),
}

impl KernelHalf {
    /// Puts `loaded` in force in the kernel; the proxy's half follows only if this succeeds.
    async fn install(&self, path: &Path, loaded: &Loaded) -> Result<(), LoadError> {
        match self {
            KernelHalf::None => Ok(()),
            KernelHalf::Local(k) => k
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .install(&loaded.compiled)
                .map_err(|error| LoadError::Kernel {
                    path: path.into(),
                    error,
                }),
            KernelHalf::Agent(agent) => {
                let error = |r: AgentRefusal| LoadError::Agent {
                    path: path.into(),
                    error: r.error,
                    retry: r.retry,
                };
                let stopped = || AgentRefusal {
                    error: "the registration with the agent has stopped".into(),
                    retry: false,
                };
                let (done, answer) = tokio::sync::oneshot::channel();
                let update = KernelUpdate {
                    text: loaded.text.clone(),
                    done,
                };
                agent.send(update).await.map_err(|_| error(stopped()))?;
                answer.await.map_err(|_| error(stopped()))?.map_err(error)
            }
        }
    }
}

/// The live policy, its kernel maps and its counters.
pub struct Enforcer {
    path: PathBuf,
    live: RwLock<Arc<Policy>>,
    kernel: KernelHalf,
    /// Connects the kernel refused, read by [`Enforcer::drain_kernel_events`].
    kernel_events: Mutex<Option<DenyEvents>>,
    stats: PolicyStats,
    generation: AtomicU64,
    reload_errors: AtomicU64,
    /// When the policy in force was read (for `/status`).
    loaded_at: Mutex<std::time::SystemTime>,
}

/// What the report shows under `policy`.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub file: PathBuf,
    /// 1 for the policy loaded at start, +1 per successful reload.
    pub generation: u64,
    pub reload_errors: u64,
    pub dry_run: bool,
    pub rules: usize,
    pub decisions: Vec<DecisionCount>,
}

/// What the policy decided for one connection.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub allowed: bool,
    /// The rule that matched (or the default), as counted and logged.
    pub rule: String,
    pub decision: Decision,
}

impl Enforcer {
    /// Puts `loaded` in force, in the run's own kernel maps (if `kernel` is given) first.
    pub fn new(
        path: PathBuf,
        loaded: Loaded,
        kernel: Option<KernelPolicy>,
        kernel_events: Option<DenyEvents>,
    ) -> Result<Arc<Self>, LoadError> {
        let kernel = match kernel {
            Some(mut k) => {
                k.install(&loaded.compiled)
                    .map_err(|error| LoadError::Kernel {
                        path: path.clone(),
                        error,
                    })?;
                KernelHalf::Local(Box::new(Mutex::new(k)))
            }
            None => KernelHalf::None,
        };
        Ok(Self::with_kernel(path, loaded, kernel, kernel_events))
    }

    /// `loaded` is in force in `kernel` already (or there is none).
    fn with_kernel(
        path: PathBuf,
        loaded: Loaded,
        kernel: KernelHalf,
        kernel_events: Option<DenyEvents>,
    ) -> Arc<Self> {
        Arc::new(Self {
            path,
            live: RwLock::new(Arc::new(loaded.policy)),
            kernel,
            kernel_events: Mutex::new(kernel_events),
            stats: PolicyStats::default(),
            generation: AtomicU64::new(1),
            reload_errors: AtomicU64::new(0),
            loaded_at: Mutex::new(std::time::SystemTime::now()),
        })
    }

    /// For a run whose maps are pinned in `pin_dir`: puts `loaded` in force in the kernel
    /// (for the workload `scope`) and the proxy, then starts watching the file and reading
    /// the kernel's deny events. Needs a tokio runtime.
    pub fn start(
        path: &Path,
        loaded: Loaded,
        pin_dir: &Path,
        scope: u32,
    ) -> Result<Arc<Self>, LoadError> {
        let kernel_error = |error| LoadError::Kernel {
            path: path.into(),
            error,
        };
        let kernel = KernelPolicy::open(pin_dir, scope).map_err(kernel_error)?;
        let events = DenyEvents::open(pin_dir).map_err(kernel_error)?;
        let enforcer = Self::new(path.into(), loaded, Some(kernel), Some(events))?;
        info!(
            file = %path.display(),
            rules = enforcer.current().rules.len(),
            "policy in force"
        );
        reload::spawn_watcher(enforcer.clone(), POLICY_POLL);
        reload::spawn_kernel_event_reader(enforcer.clone(), EVENT_POLL);
        Ok(enforcer)
    }

    /// For `sidecar proxy`, which has no access to the kernel maps: the node agent installs
    /// the pod's policy in them (`loaded` goes with the registration, so it is in force in the
    /// kernel before the pod's first intercepted connect), and each reload goes to the agent
    /// through `agent` before the proxy takes it. Starts watching the file. Needs a tokio
    /// runtime.
    pub fn start_with_agent(
        path: &Path,
        loaded: Loaded,
        agent: tokio::sync::mpsc::Sender<KernelUpdate>,
    ) -> Arc<Self> {
        let enforcer = Self::with_kernel(path.into(), loaded, KernelHalf::Agent(agent), None);
        info!(
            file = %path.display(),
            rules = enforcer.current().rules.len(),
            "policy in force in the proxy, and in the kernel once the node agent registers the pod"
        );
        reload::spawn_watcher(enforcer.clone(), POLICY_POLL);
        enforcer
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Arc<Policy> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the file; a valid policy replaces the live one (kernel half first, so a
    /// kernel or agent refusal leaves the old policy whole in both halves). A refusal is
    /// counted in `reload_errors`, except one worth retrying ([`LoadError::is_retry`]): the
    /// watcher counts that once per file ([`Enforcer::count_reload_error`]), however often it
    /// tries.
    pub async fn reload(&self) -> Result<(), LoadError> {
        let result = match load(&self.path) {
            Ok(loaded) => self.kernel.install(&self.path, &loaded).await.map(|()| {
                *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded.policy);
            }),
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) => {
                self.generation.fetch_add(1, Ordering::Relaxed);
                *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) =
                    std::time::SystemTime::now();
            }
            Err(e) if e.is_retry() => {}
            Err(_) => self.count_reload_error(),
        }
        result
    }

    /// One more refused reload in `reload_errors`.
    pub fn count_reload_error(&self) {
        self.reload_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Decides on one connection, counts it and logs it. Returns the verdict: whether it
    /// may proceed, the rule that decided, and the decision.
    pub fn check(&self, req: &Request<'_>) -> Verdict {
        let policy = self.current();
        let evaluation = policy.evaluate(req);
        let rule = policy.rule_label(&evaluation, req.direction);
        let decision = match (evaluation.action, evaluation.refuse) {
            (Action::Deny, true) => Decision::Deny,
            (Action::Deny, false) => Decision::WouldDeny,
            (Action::Audit, _) => Decision::Audit,
            (Action::Allow, _) => Decision::Allow,
        };
        self.stats.count(req.direction, &rule, decision);
        let identity = req.peer.map(|s| s.to_string());
        let identity = identity.as_deref().unwrap_or("-");
        let (direction, dst) = (req.direction.as_str(), req.dst);
        match decision {
            Decision::Deny => {
                warn!(direction, %rule, identity, %dst, "policy denied the connection")
            }
            Decision::WouldDeny => {
                warn!(direction, %rule, identity, %dst, "policy would deny the connection (dry run)")
            }
            Decision::Audit => warn!(direction, %rule, identity, %dst, "policy audit"),
            Decision::Allow => info!(direction, %rule, identity, %dst, "policy allowed"),
        }
        Verdict {
            allowed: !evaluation.refuse,
            rule: rule.to_string(),
            decision,
        }
    }

    /// Logs and counts (by rule, decision `deny`) every connect the kernel refused since the
    /// last call. The rule is found by evaluating the destination against the policy in
    /// force now — the one the kernel used, unless a reload happened in between.
    pub fn drain_kernel_events(&self) {
        let events = match self
            .kernel_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(ring) => ring.drain(),
            None => return,
        };
        self.record_kernel_denies(events.into_iter().map(|e| (e.dst, e.pid)));
    }

    /// Logs and counts connects the kernel refused, by destination and pid: read from the
    /// run's own ring, or (a pod's) streamed by the node agent.
    pub fn record_kernel_denies(
        &self,
        events: impl IntoIterator<Item = (std::net::SocketAddr, u32)>,
    ) {
        let events: Vec<_> = events.into_iter().collect();
        if events.is_empty() {
            return;
        }
        let policy = self.current();
        // One log line per (rule, destination, pid) per batch, with a count: an app retrying
        // a denied connect in a loop must not flood the log.
        let mut batch: std::collections::BTreeMap<(String, std::net::SocketAddr, u32), u64> =
            Default::default();
        for (dst, pid) in events {
            let req = Request {
                direction: Direction::Outbound,
                peer: None,
                dst,
            };
            let evaluation = policy.evaluate(&req);
            let rule = policy.rule_label(&evaluation, req.direction);
            self.stats.count(req.direction, &rule, Decision::Deny);
            *batch.entry((rule, dst, pid)).or_default() += 1;
        }
        for ((rule, dst, pid), times) in batch {
            warn!(
                direction = "outbound",
                %rule,
                identity = "-",
                %dst,
                pid,
                times,
                "policy refused connect() in the kernel (EPERM)"
            );
        }
    }

    /// What `/status` shows: the file, its rules, and when it was last (re)loaded.
    pub fn status(&self) -> crate::telemetry::PolicyStatus {
        let policy = self.current();
        let loaded_at = *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner());
        crate::telemetry::PolicyStatus {
            file: self.path.display().to_string(),
            rules: policy.rules.len(),
            dry_run: policy.dry_run,
            destinations: policy
                .destinations
                .iter()
                .filter_map(|d| serde_json::to_value(d).ok())
                .collect(),
            generation: self.generation.load(Ordering::Relaxed),
            loaded_unix: crate::telemetry::unix_secs(loaded_at),
            reload_errors: self.reload_errors.load(Ordering::Relaxed),
        }
    }

    pub fn report(&self) -> PolicyReport {
        let policy = self.current();
        PolicyReport {
            file: self.path.clone(),
            generation: self.generation.load(Ordering::Relaxed),
            reload_errors: self.reload_errors.load(Ordering::Relaxed),
            dry_run: policy.dry_run,
            rules: policy.rules.len(),
            decisions: self.stats.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests;
