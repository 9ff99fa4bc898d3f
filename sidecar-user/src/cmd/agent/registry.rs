//! The agent's registrations: which pods have a registered sidecar, mirrored into the
//! `WORKLOADS` map (pod cgroup → WORKLOAD, the proxy's container cgroup → PROXY) and
//! persisted in the state directory so a restarted agent knows what it had.
//!
//! The map is always made to match the registrations exactly: entries of pods that are gone,
//! or that no registration explains, are removed (at start and by the periodic sweep).
//!
//! A pod's policy (the text its sidecar sent) is installed in the pod's scope of the policy
//! maps before its `WORKLOADS` entry is written, kept in force across agent restarts (the
//! text is persisted with the registration and installed again at start), and emptied out
//! with the registration.
//!
//! A pod's open circuits (destinations its proxy found failing) are refused at `connect()`
//! in the pod's scope of `OPEN_CIRCUITS` while its sidecar's registration connection lives:
//! they are the proxy's live state, not configuration, so they are neither persisted nor
//! kept past the connection (a new registration starts with none, and the sidecar sends the
//! ones it holds open again).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sidecar_common::{
    CircuitKey, OrigDst, ScopedAddr, WorkloadConfig, flags, limits, lpm_prefix_len, mapped_octets,
    role,
};

use super::pod_maps::{CidrKey, MapError, PodMaps, Trie};
use crate::{
    cidr::Cidr,
    host::cgroup,
    policy::{
        kernel::{Compiled, KernelPolicyError, PolicyMaps, PolicySlots, PolicyTrie},
        load,
    },
};

/// Destination CIDRs one pod may exclude (the kernel trie holds this many for every pod).
pub const MAX_CIDRS: usize = limits::EXCLUDED_CIDRS_PER_POD as usize;

/// Pods the node can register: `WORKLOADS` holds two entries per pod.
const MAX_PODS: u32 = limits::WORKLOADS / 2;

/// One pod's share of an `EXCLUDED_CIDRS` trie of `capacity` entries: [`MAX_CIDRS`], or less
/// on a smaller trie (adopted from an older build), so that every pod the node can register
/// still has its full share and none can starve another.
pub fn cidr_quota(capacity: u32) -> usize {
    MAX_CIDRS.min((capacity / MAX_PODS) as usize)
}

/// Destination prefixes one pod's compiled policy may have on a node whose policy tries hold
/// `capacity` entries: both slots of every pod the node can register fit, so no pod's policy
/// can leave another without room (fewer on tries adopted from an older build).
pub fn policy_quota(capacity: u32) -> usize {
    (limits::POLICY_PREFIXES as usize).min((capacity / MAX_PODS / 2) as usize)
}

/// A pod's policy as its sidecar sent it, validated and compiled (`policy::load::from_text`).
#[derive(Clone)]
pub struct PodPolicy {
    pub text: String,
    pub compiled: Compiled,
}

impl std::fmt::Debug for PodPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodPolicy")
            .field("bytes", &self.text.len())
            .field("prefixes", &self.compiled.entries.len())
            .finish()
    }
}

/// Validates and compiles a pod's policy text, as `sidecar policy check` does a file.
pub fn pod_policy(uid: &str, text: String) -> Result<PodPolicy, load::LoadError> {
    let loaded = load::from_text(&policy_name(uid), text)?;
    Ok(PodPolicy {
        text: loaded.text,
        compiled: loaded.compiled,
    })
}

/// What errors call a pod's policy ("policy file of pod … line 3: …").
fn policy_name(uid: &str) -> PathBuf {
    PathBuf::from(format!("of pod {uid}"))
}

/// File name of the persisted registrations in the state directory.
pub const FILE: &str = "registrations.json";

/// One pod's registration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    pub pod_uid: String,
    pub pod_cgroup: PathBuf,
    /// Cgroup id (inode) of the pod cgroup when it registered: a recreated directory with
    /// the same path is another pod.
    pub pod_cgroup_id: u64,
    pub proxy_cgroup: PathBuf,
    pub proxy_cgroup_id: u64,
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs that bypass the proxy, in their canonical text form.
    #[serde(default)]
    pub exclude_cidrs: Vec<String>,
    pub ipv6: bool,
    /// Connects to the cloud metadata address are allowed (else refused in the kernel).
    #[serde(default)]
    pub allow_metadata: bool,
    /// Kernel pass-through is on for the pod (asked for, and the pins support it).
    #[serde(default)]
    pub passthrough: bool,
    /// Pass-through connections the pod may have open to one destination (none if absent).
    #[serde(default)]
    pub passthrough_cap: Option<u32>,
    /// Destinations with sidecars (never passed through), in their canonical text form.
    #[serde(default)]
    pub mesh_cidrs: Vec<String>,
    /// The pod's connects are redirected only to the listeners its sidecar passed, which the
    /// agent checked and marked (`flags::CHECK_LISTENER`): a killed sidecar's port bound by
    /// anyone else gets nothing. False for a sidecar too old to pass them.
    #[serde(default)]
    pub listener_checked: bool,
    /// Strict inbound: new connections from outside the node to the pod's app containers are
    /// dropped in the kernel; only the sidecar's tunnel reaches them.
    #[serde(default)]
    pub strict_inbound: bool,
    /// Identifies the pod in scoped kernel keys (CIDR exclusions, policy).
    pub scope: u32,
    /// The proxy process that registered last (informational).
    pub pid: u32,
    /// How many times this pod's proxy registered (re-registrations after agent restarts
    /// or broken connections included).
    #[serde(default)]
    pub registrations: u64,
    /// The pod's policy (its sidecar's file, whole), in force in the pod's kernel slots; kept
    /// here so a restarted agent puts it back before the sidecar re-registers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// What a register request asks for, after the caller's pod was derived from its cgroup.
#[derive(Debug, Clone)]
pub struct Request {
    pub pod: super::pod::PodCgroup,
    pub pid: u32,
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    pub ipv6: bool,
    pub allow_metadata: bool,
    pub passthrough: bool,
    pub passthrough_cap: Option<u32>,
    pub mesh_cidrs: Vec<Cidr>,
    /// The sidecar's listeners, checked; marked only once the registration is admitted.
    pub listeners: Option<super::listener::Verified>,
    /// The pod's policy, installed before its `WORKLOADS` entry is written.
    pub policy: Option<PodPolicy>,
    pub strict_inbound: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("exclude_ports takes at most {max} ports ({0} given)", max = limits::EXCLUDED_PORTS)]
    TooManyPorts(usize),
    #[error(
        "exclude_cidrs takes at most {quota} CIDRs per pod on this node ({given} given): exclude \
         wider prefixes instead"
    )]
    TooManyCidrs { given: usize, quota: usize },
    #[error("proxy_port must not be 0")]
    NoPort,
    #[error("{0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("updating the kernel map {0}")]
    Map(#[from] MapError),
    #[error("writing {path}: {source}")]
    Persist { path: PathBuf, source: io::Error },
    #[error("the node has {MAX_PODS} registered pods already")]
    Full,
    #[error("marking the sidecar's listeners as the proxy's (SO_MARK): {0}")]
    Mark(io::Error),
    #[error(
        "pod {uid} is registered by the sidecar in {taken} (still running): another container of \
         the pod may not take over its interception"
    )]
    Taken { uid: String, taken: PathBuf },
    #[error(
        "the policy compiles to {prefixes} destination prefixes (2 of them always: the IPv4 and \
         IPv6 spaces); a pod may have at most {quota} on this node: merge CIDRs"
    )]
    PolicyOverQuota { prefixes: usize, quota: usize },
    #[error(
        "the node's pinned programs have no policy maps (installed by an older build): this \
         node cannot enforce a pod's policy until `sidecar agent --uninstall` and a restart"
    )]
    NoPolicyMaps,
    #[error("installing the pod's policy: {0}")]
    Policy(#[from] KernelPolicyError),
    #[error("this pod is not registered (any more): register it again")]
    NotRegistered,
    #[error(
        "strict inbound needs the sidecar's tunnel (an inbound port): without one nothing from \
         outside could reach the pod; give the sidecar --tls-dir or drop --inbound-mode strict"
    )]
    StrictWithoutTunnel,
    #[error(
        "the node's pinned programs have no strict inbound program (installed by an older \
         build): restart the agent with this build to upgrade them in place"
    )]
    NoStrictProgram,
    #[error(
        "the pod has {quota} open circuits refused in the kernel already (each pod's share of \
         the node's table): {dst} is refused by the proxy only"
    )]
    CircuitsOverQuota { dst: SocketAddr, quota: u32 },
}

impl RegistryError {
    /// The refusal counter this error is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::Taken { .. } => "proxy_taken",
            RegistryError::Mark(_) => "bad_listener",
            RegistryError::TooManyCidrs { .. } | RegistryError::PolicyOverQuota { .. } => {
                "over_quota"
            }
            RegistryError::NoPolicyMaps => "no_policy_maps",
            RegistryError::NoStrictProgram => "no_strict_program",
            RegistryError::CircuitsOverQuota { .. } => "over_quota",
            RegistryError::StrictWithoutTunnel => "invalid",
            RegistryError::Policy(_) => "kernel_map",
            RegistryError::NotRegistered => "not_registered",
            RegistryError::Full => "node_full",
            RegistryError::Map(_) => "kernel_map",
            RegistryError::Persist { .. } => "internal",
            RegistryError::TooManyPorts(_) | RegistryError::NoPort | RegistryError::Cgroup(_) => {
                "invalid"
            }
        }
    }

    /// Whether the refusal is the node's condition rather than the pod's request, so the
    /// sidecar should try again later instead of failing.
    pub fn retry(&self) -> bool {
        matches!(
            self,
            RegistryError::Full
                | RegistryError::Map(_)
                | RegistryError::Policy(_)
                | RegistryError::Persist { .. }
        )
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    next_scope: u32,
    pods: BTreeMap<String, Registration>,
}

pub struct Registry {
    file: PathBuf,
    next_scope: u32,
    pods: BTreeMap<String, Registration>,
    /// Refused registrations by reason, since this agent started.
    refusals: BTreeMap<&'static str, u64>,
    /// Until then, kernel entries no registration explains are kept (see [`Registry::hold`]).
    hold_until: Option<std::time::Instant>,
    /// The kernel slots of each pod's policy, by pod UID (not persisted: adopted from the
    /// maps after a restart).
    policies: BTreeMap<String, PolicySlots>,
    /// Pods whose saved policy could not be put back in force: said once, retried each sweep.
    policy_failures: BTreeSet<String>,
    /// Each pod's open circuits refused in the kernel, by pod UID (see the module's docs).
    circuits: BTreeMap<String, BTreeSet<SocketAddr>>,
}

impl Registry {
    /// Loads the persisted registrations (none if the file does not exist).
    pub fn load(state_dir: &Path) -> io::Result<Self> {
        let file = state_dir.join(FILE);
        let persisted: Persisted = match fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: unreadable ({e}); starting with no registrations",
                    file.display()
                );
                Persisted::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            file,
            next_scope: persisted.next_scope.max(1),
            pods: persisted.pods,
            refusals: BTreeMap::new(),
            hold_until: None,
            policies: BTreeMap::new(),
            policy_failures: BTreeSet::new(),
            circuits: BTreeMap::new(),
        })
    }

    /// Adopted pins without the registrations that explain them (the state directory was
    /// lost): keep every `WORKLOADS`/`EXCLUDED_CIDRS` entry for `grace` while the sidecars
    /// re-register, instead of dropping their pods' interception at once; and never hand out
    /// a scope the kernel entries still use.
    pub fn hold(&mut self, maps: &impl PodMaps, grace: std::time::Duration) {
        self.hold_until = Some(std::time::Instant::now() + grace);
        let max_scope = maps
            .workloads()
            .iter()
            .map(|(_, cfg)| cfg.scope)
            .max()
            .unwrap_or(0);
        let max_policy_scope = maps
            .policy_ref()
            .and_then(|p| p.scopes().into_iter().max())
            .unwrap_or(0);
        let max_scope = max_scope.max(max_policy_scope);
        self.next_scope = self.next_scope.max(max_scope.saturating_add(1));
    }

    pub fn pods(&self) -> impl Iterator<Item = &Registration> {
        self.pods.values()
    }

    pub fn refusals(&self) -> &BTreeMap<&'static str, u64> {
        &self.refusals
    }

    pub fn refused(&mut self, reason: &'static str) {
        *self.refusals.entry(reason).or_default() += 1;
    }

    /// Enters (or updates) a pod: PROXY on the caller's container first, so the proxy is
    /// never intercepted, then WORKLOAD on the pod.
    pub fn register(
        &mut self,
        maps: &mut impl PodMaps,
        req: Request,
    ) -> Result<Registration, RegistryError> {
        if req.exclude_ports.len() > limits::EXCLUDED_PORTS {
            return Err(RegistryError::TooManyPorts(req.exclude_ports.len()));
        }
        let quota = cidr_quota(maps.cidr_capacity());
        for given in [req.exclude_cidrs.len(), req.mesh_cidrs.len()] {
            if given > quota {
                return Err(RegistryError::TooManyCidrs { given, quota });
            }
        }
        if req.proxy_port == 0 {
            return Err(RegistryError::NoPort);
        }
        if req.strict_inbound && req.inbound_port == 0 {
            return Err(RegistryError::StrictWithoutTunnel);
        }
        if req.strict_inbound && !maps.strict_capable() {
            return Err(RegistryError::NoStrictProgram);
        }
        if let Some(policy) = &req.policy {
            check_policy_quota(maps, policy)?;
        }
        let pod_cgroup_id = cgroup::id(&req.pod.pod)?;
        let proxy_cgroup_id = cgroup::id(&req.pod.container)?;
        let previous = self.pods.get(&req.pod.uid).cloned();
        let same_pod = previous
            .as_ref()
            .filter(|p| p.pod_cgroup_id == pod_cgroup_id);
        // One sidecar per pod: while the registered proxy container lives, no other container
        // of the pod (an app that can reach the socket) may make itself the exempt PROXY. A
        // restarted sidecar gets a new container cgroup once the old one is empty or gone.
        if let Some(p) = same_pod
            && p.proxy_cgroup_id != proxy_cgroup_id
            && cgroup::id(&p.proxy_cgroup).ok() == Some(p.proxy_cgroup_id)
            && !cgroup::pids(&p.proxy_cgroup).unwrap_or_default().is_empty()
        {
            return Err(RegistryError::Taken {
                uid: p.pod_uid.clone(),
                taken: p.proxy_cgroup.clone(),
            });
        }
        if previous.is_none() && self.pods.len() as u32 >= MAX_PODS {
            return Err(RegistryError::Full);
        }
        // Admitted: the listeners become the proxy's before any entry can redirect to them.
        if let Some(listeners) = &req.listeners {
            listeners.mark().map_err(RegistryError::Mark)?;
        }
        let scope = match same_pod {
            Some(p) => p.scope,
            None => {
                let s = self.next_scope;
                self.next_scope = self.next_scope.wrapping_add(1).max(1);
                s
            }
        };
        let reg = Registration {
            pod_uid: req.pod.uid.clone(),
            pod_cgroup: req.pod.pod.clone(),
            pod_cgroup_id,
            proxy_cgroup: req.pod.container.clone(),
            proxy_cgroup_id,
            proxy_port: req.proxy_port,
            inbound_port: req.inbound_port,
            exclude_ports: req.exclude_ports,
            exclude_cidrs: req.exclude_cidrs.iter().map(Cidr::to_string).collect(),
            ipv6: req.ipv6,
            allow_metadata: req.allow_metadata,
            passthrough: req.passthrough && maps.passthrough_capable(),
            passthrough_cap: req.passthrough_cap,
            mesh_cidrs: req.mesh_cidrs.iter().map(Cidr::to_string).collect(),
            listener_checked: req.listeners.is_some(),
            strict_inbound: req.strict_inbound,
            scope,
            pid: req.pid,
            registrations: same_pod.map_or(0, |p| p.registrations) + 1,
            policy: req.policy.as_ref().map(|p| p.text.clone()),
        };
        // The policy first: no connect of the pod may find it intercepted without its policy.
        // Slots of the pod's previous scope stay as they are until everything else is in.
        let held = self.policies.remove(&reg.pod_uid);
        let (mut slots, stale) = match held {
            Some(s) if s.scope() == scope => (Some(s), None),
            other => (None, other),
        };
        if let Some(policy) = &req.policy {
            let pm = maps.policy().ok_or(RegistryError::NoPolicyMaps)?;
            let s = slots.get_or_insert_with(|| PolicySlots::adopt(pm, scope));
            if let Err(e) = s.install(pm, &policy.compiled) {
                self.keep_slots(&reg.pod_uid, slots.filter(PolicySlots::is_live).or(stale));
                return Err(e.into());
            }
        }
        // The pod's entries are written over its previous registration's (a recreated pod's
        // under its old scope and cgroups), and those left over removed once all are in.
        if let Err(e) = write(maps, &reg, previous.as_ref()) {
            restore(maps, &reg, previous.as_ref());
            if req.policy.is_some()
                && let Some(s) = &mut slots
                && let Some(pm) = maps.policy()
            {
                s.undo_install(pm);
            }
            self.keep_slots(&reg.pod_uid, slots.filter(PolicySlots::is_live).or(stale));
            return Err(e.into());
        }
        if let Some(prev) = &previous {
            remove_stale(maps, prev, &reg);
        }
        if let Some(pm) = maps.policy() {
            // Registered without a policy now: the one it had goes.
            if req.policy.is_none()
                && let Some(s) = &mut slots
            {
                s.remove(pm);
            }
            // A recreated pod's old scope.
            if let Some(mut s) = stale.filter(|s| s.scope() != scope) {
                s.remove(pm);
            }
        }
        self.keep_slots(&reg.pod_uid, slots);
        // A new registration (a restarted sidecar, or the same one after its connection
        // broke) sends the circuits it holds open again: none of the old ones stay.
        self.clear_circuits(maps, &reg.pod_uid, previous.as_ref().map(|p| p.scope));
        // The pod's own counters: without them it still works, its sidecar only shows none.
        if let Err(e) = maps.add_counters(reg.scope) {
            tracing::warn!(pod_uid = %reg.pod_uid, "no counters of its own for the pod (the sweep retries): {e}");
        }
        self.pods.insert(reg.pod_uid.clone(), reg.clone());
        self.persist()?;
        Ok(reg)
    }

    /// Opens (refuses connects to `dst` in the kernel) or closes one of the registered pod
    /// `uid`'s circuits. Over the pod's quota an open is refused and the proxy alone refuses
    /// the destination.
    pub fn set_circuit(
        &mut self,
        maps: &mut impl PodMaps,
        uid: &str,
        dst: SocketAddr,
        open: bool,
    ) -> Result<(), RegistryError> {
        let Some(reg) = self.pods.get(uid) else {
            return Err(RegistryError::NotRegistered);
        };
        let key = circuit_key(reg.scope, dst);
        let held = self.circuits.entry(uid.to_string()).or_default();
        if !open {
            held.remove(&dst);
            maps.remove_circuit(&key)?;
            return Ok(());
        }
        let quota = limits::OPEN_CIRCUITS_PER_POD;
        if !held.contains(&dst) && held.len() as u32 >= quota {
            return Err(RegistryError::CircuitsOverQuota { dst, quota });
        }
        maps.insert_circuit(&key)?;
        held.insert(dst);
        Ok(())
    }

    /// Lets through again every connect the pod `uid` had refused for an open circuit: its
    /// sidecar's connection ended (no proxy left to close them), or it registered anew.
    /// `scope`: the pod's scope when they were opened.
    pub fn clear_circuits(&mut self, maps: &mut impl PodMaps, uid: &str, scope: Option<u32>) {
        let Some(held) = self.circuits.remove(uid) else {
            return;
        };
        let Some(scope) = scope.or_else(|| self.pods.get(uid).map(|r| r.scope)) else {
            return;
        };
        for dst in held {
            if let Err(e) = maps.remove_circuit(&circuit_key(scope, dst)) {
                tracing::warn!(pod_uid = %uid, %dst, "cannot close an open circuit in the kernel (the sweep retries): {e}");
            }
        }
    }

    /// Open circuits the kernel refuses for the pod `uid`.
    pub fn circuits_of(&self, uid: &str) -> usize {
        self.circuits.get(uid).map_or(0, BTreeSet::len)
    }

    /// Replaces the policy of the registered pod `uid` (its sidecar reloaded its file). A
    /// refusal leaves the policy in force as it was.
    pub fn set_policy(
        &mut self,
        maps: &mut impl PodMaps,
        uid: &str,
        policy: PodPolicy,
    ) -> Result<(), RegistryError> {
        let Some(reg) = self.pods.get_mut(uid) else {
            return Err(RegistryError::NotRegistered);
        };
        check_policy_quota(maps, &policy)?;
        let pm = maps.policy().ok_or(RegistryError::NoPolicyMaps)?;
        let scope = reg.scope;
        let slots = self
            .policies
            .entry(uid.to_string())
            .or_insert_with(|| PolicySlots::adopt(pm, scope));
        if let Err(e) = slots.install(pm, &policy.compiled) {
            if !slots.is_live() {
                self.policies.remove(uid);
            }
            return Err(e.into());
        }
        reg.policy = Some(policy.text);
        // In force in the kernel: what the registrations file says matters only after a
        // restart, and the sidecar sends its policy again when it re-registers.
        if let Err(e) = self.persist() {
            tracing::warn!(pod_uid = %uid, "the new policy is in force but not saved: {e}");
        }
        Ok(())
    }

    /// Files `slots` as the pod's, if it has a policy in force.
    fn keep_slots(&mut self, uid: &str, slots: Option<PolicySlots>) {
        if let Some(s) = slots.filter(PolicySlots::is_live) {
            self.policies.insert(uid.to_string(), s);
        }
    }

    /// Removes a pod's interception (its sidecar deregistered, or the pod is gone).
    pub fn remove(&mut self, maps: &mut impl PodMaps, uid: &str) -> Result<bool, RegistryError> {
        let Some(reg) = self.pods.remove(uid) else {
            return Ok(false);
        };
        // WORKLOAD first: from here on the pod's connects pass through, never to a proxy
        // that is going away.
        for id in [reg.pod_cgroup_id, reg.proxy_cgroup_id] {
            maps.remove_workload(id)?;
        }
        self.policy_failures.remove(uid);
        self.clear_circuits(maps, uid, Some(reg.scope));
        let held = self.policies.remove(uid);
        if let Some(pm) = maps.policy()
            && (held.is_some() || reg.policy.is_some())
        {
            let mut slots = held
                .filter(|s| s.scope() == reg.scope)
                .unwrap_or_else(|| PolicySlots::adopt(pm, reg.scope));
            slots.remove(pm);
        }
        maps.remove_cap(reg.scope)?;
        let _ = maps.remove_counters(reg.scope);
        maps.remove_usage(reg.scope)?;
        for trie in Trie::ALL {
            for key in cidr_keys(trie, &reg) {
                let _ = maps.remove_cidr(trie, &key);
            }
        }
        self.persist()?;
        Ok(true)
    }

    /// Drops registrations whose pod cgroup is gone (or was recreated: other inode), then
    /// makes the maps match the registrations exactly. Returns the pods removed.
    pub fn reconcile(&mut self, maps: &mut impl PodMaps) -> Result<Vec<String>, RegistryError> {
        let gone: Vec<String> = self
            .pods
            .values()
            .filter(|r| cgroup::id(&r.pod_cgroup).ok() != Some(r.pod_cgroup_id))
            .map(|r| r.pod_uid.clone())
            .collect();
        for uid in &gone {
            self.remove(maps, uid)?;
            tracing::info!(pod_uid = %uid, "pod gone: interception removed");
        }
        let prune = self
            .hold_until
            .is_none_or(|t| std::time::Instant::now() >= t);
        let wanted: BTreeMap<u64, WorkloadConfig> = self
            .pods
            .values()
            .flat_map(|r| {
                let (w, p) = entries(r);
                [(r.pod_cgroup_id, w), (r.proxy_cgroup_id, p)]
            })
            .collect();
        let present: BTreeMap<u64, WorkloadConfig> = maps.workloads().into_iter().collect();
        for id in present
            .keys()
            .filter(|id| prune && !wanted.contains_key(id))
        {
            let _ = maps.remove_workload(*id);
        }
        for (id, config) in wanted.iter().filter(|(id, c)| present.get(id) != Some(c)) {
            maps.insert_workload(*id, config)?;
        }
        if let Some(present) = maps.caps() {
            let present: BTreeMap<u32, u32> = present.into_iter().collect();
            let wanted: BTreeMap<u32, u32> = self
                .pods
                .values()
                .filter_map(|r| Some((r.scope, r.passthrough_cap?)))
                .collect();
            for scope in present.keys().filter(|s| prune && !wanted.contains_key(s)) {
                let _ = maps.remove_cap(*scope);
            }
            for (scope, cap) in wanted.iter().filter(|(s, c)| present.get(s) != Some(c)) {
                maps.insert_cap(*scope, *cap)?;
            }
        }
        if prune {
            // Entries of pods that went while no agent ran (or whose removal failed): each
            // holds a place in a table every pod needs one in.
            let scopes: BTreeSet<u32> = self.pods.values().map(|r| r.scope).collect();
            for scope in maps.usage_scopes() {
                if !scopes.contains(&scope) {
                    let _ = maps.remove_usage(scope);
                }
            }
        }
        for trie in Trie::ALL {
            let wanted: Vec<CidrKey> = self
                .pods
                .values()
                .flat_map(|r| cidr_keys(trie, r))
                .collect();
            sync_trie(maps, trie, &wanted, prune)?;
        }
        if let Some(pm) = maps.policy() {
            self.sync_policies(pm, prune);
        }
        if let Some(present) = maps.counted_scopes() {
            let wanted: BTreeSet<u32> = self.pods.values().map(|r| r.scope).collect();
            for scope in present.iter().filter(|s| prune && !wanted.contains(s)) {
                let _ = maps.remove_counters(*scope);
            }
            for scope in wanted.iter().filter(|s| !present.contains(s)) {
                maps.add_counters(*scope)?;
            }
        }
        if prune && let Some(present) = maps.circuits() {
            let wanted: BTreeSet<CircuitKey> = self
                .circuits
                .iter()
                .filter_map(|(uid, held)| Some((self.pods.get(uid)?.scope, held)))
                .flat_map(|(scope, held)| held.iter().map(move |dst| circuit_key(scope, *dst)))
                .collect();
            for key in present.iter().filter(|k| !wanted.contains(k)) {
                let _ = maps.remove_circuit(key);
            }
        }
        Ok(gone)
    }

    /// Puts each registration's policy in force where it is not (after a restart: adopting
    /// what the maps hold for its scope, so nothing of the old slots is left), and with
    /// `prune` removes every policy entry of a scope that has no registered policy.
    fn sync_policies(&mut self, pm: &mut dyn PolicyMaps, prune: bool) {
        for r in self.pods.values() {
            let Some(text) = &r.policy else { continue };
            if self
                .policies
                .get(&r.pod_uid)
                .is_some_and(|s| s.scope() == r.scope && s.is_live())
            {
                continue;
            }
            let mut slots = PolicySlots::adopt(pm, r.scope);
            let installed = pod_policy(&r.pod_uid, text.clone())
                .map_err(|e| e.to_string())
                .and_then(|p| slots.install(pm, &p.compiled).map_err(|e| e.to_string()));
            match installed {
                Ok(()) => {
                    tracing::info!(pod_uid = %r.pod_uid, "the pod's policy is in force again");
                    self.policies.insert(r.pod_uid.clone(), slots);
                    self.policy_failures.remove(&r.pod_uid);
                }
                Err(e) => {
                    if self.policy_failures.insert(r.pod_uid.clone()) {
                        tracing::warn!(pod_uid = %r.pod_uid, "cannot put the pod's policy back in force (retried each sweep): {e}")
                    }
                }
            }
        }
        if !prune {
            return;
        }
        let wanted: BTreeSet<u32> = self
            .pods
            .values()
            .filter(|r| r.policy.is_some())
            .map(|r| r.scope)
            .collect();
        for scope in pm.scopes().into_iter().filter(|s| !wanted.contains(s)) {
            pm.remove_state(scope);
        }
        for trie in PolicyTrie::ALL {
            for key in pm.keys(trie) {
                if !wanted.contains(&key.owner().0) {
                    pm.remove(trie, &key);
                }
            }
        }
    }

    fn persist(&self) -> Result<(), RegistryError> {
        let persisted = Persisted {
            next_scope: self.next_scope,
            pods: self.pods.clone(),
        };
        let tmp = self.file.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&persisted).expect("registrations serialize");
        fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &self.file))
            .map_err(|source| RegistryError::Persist {
                path: self.file.clone(),
                source,
            })
    }
}

/// Refuses a policy bigger than a pod's share of the node's policy tries.
fn check_policy_quota(maps: &impl PodMaps, policy: &PodPolicy) -> Result<(), RegistryError> {
    let pm = maps.policy_ref().ok_or(RegistryError::NoPolicyMaps)?;
    let (prefixes, quota) = (policy.compiled.entries.len(), policy_quota(pm.capacity()));
    if prefixes > quota {
        return Err(RegistryError::PolicyOverQuota { prefixes, quota });
    }
    Ok(())
}

/// Writes the entries of `reg` (over `prev`, the pod's registration before, if any):
/// exclusions, mesh CIDRs and the cap before the WORKLOAD entry, so the first connect
/// honours them. Nothing `prev` needs is removed here, so [`restore`] can undo a failure.
fn write(
    maps: &mut impl PodMaps,
    reg: &Registration,
    prev: Option<&Registration>,
) -> Result<(), MapError> {
    for trie in Trie::ALL {
        // A key `prev` wrote is there already (an update of a key a full trie holds fails
        // on kernels before 6.14).
        let had = prev.map(|p| cidr_keys(trie, p)).unwrap_or_default();
        for key in cidr_keys(trie, reg).iter().filter(|k| !had.contains(k)) {
            maps.insert_cidr(trie, key)?;
        }
    }
    match reg.passthrough_cap {
        Some(cap) => maps.insert_cap(reg.scope, cap)?,
        // `prev`'s cap under another scope goes with the rest of `prev` (remove_stale).
        None => maps.remove_cap(reg.scope)?,
    }
    let (workload, proxy) = entries(reg);
    maps.insert_workload(reg.proxy_cgroup_id, &proxy)?;
    maps.insert_workload(reg.pod_cgroup_id, &workload)?;
    Ok(())
}

/// After a failed [`write`]: puts back the pod's entries as `prev` had them (none if it had
/// no registration), so a refused registration changes no map. Best effort: what cannot be
/// put back is the sweep's ([`Registry::reconcile`]) to repair.
fn restore(maps: &mut impl PodMaps, reg: &Registration, prev: Option<&Registration>) {
    let mut failed = Vec::new();
    for trie in Trie::ALL {
        let had = prev.map(|p| cidr_keys(trie, p)).unwrap_or_default();
        for key in cidr_keys(trie, reg).iter().filter(|k| !had.contains(k)) {
            failed.extend(maps.remove_cidr(trie, key).err());
        }
    }
    let prev_cap = prev
        .filter(|p| p.scope == reg.scope)
        .map(|p| p.passthrough_cap);
    failed.extend(
        match prev_cap {
            Some(Some(cap)) => maps.insert_cap(reg.scope, cap),
            _ => maps.remove_cap(reg.scope),
        }
        .err(),
    );
    let prev_entries: BTreeMap<u64, WorkloadConfig> = prev
        .map(|p| {
            let (w, x) = entries(p);
            BTreeMap::from([(p.pod_cgroup_id, w), (p.proxy_cgroup_id, x)])
        })
        .unwrap_or_default();
    for id in [reg.proxy_cgroup_id, reg.pod_cgroup_id] {
        failed.extend(
            match prev_entries.get(&id) {
                Some(config) => maps.insert_workload(id, config),
                None => maps.remove_workload(id),
            }
            .err(),
        );
    }
    for e in failed {
        tracing::warn!(pod_uid = %reg.pod_uid, "undoing a failed registration: {e} (the sweep repairs it)");
    }
}

/// Removes the entries of `prev` (the pod's registration before `reg`) that `reg` does not
/// have: CIDRs no longer asked for, a recreated pod's old scope, a restarted sidecar's old
/// container cgroup.
fn remove_stale(maps: &mut impl PodMaps, prev: &Registration, reg: &Registration) {
    for trie in Trie::ALL {
        let kept = cidr_keys(trie, reg);
        for key in cidr_keys(trie, prev).iter().filter(|k| !kept.contains(k)) {
            let _ = maps.remove_cidr(trie, key);
        }
    }
    if prev.scope != reg.scope {
        let _ = maps.remove_cap(prev.scope);
        let _ = maps.remove_counters(prev.scope);
        let _ = maps.remove_usage(prev.scope);
        if prev.policy.is_some()
            && let Some(pm) = maps.policy()
        {
            PolicySlots::adopt(pm, prev.scope).remove(pm);
        }
    }
    for id in [prev.proxy_cgroup_id, prev.pod_cgroup_id] {
        if id != reg.proxy_cgroup_id && id != reg.pod_cgroup_id {
            let _ = maps.remove_workload(id);
        }
    }
}

/// The `OPEN_CIRCUITS` key of a pod's circuit to `dst`.
fn circuit_key(scope: u32, dst: SocketAddr) -> CircuitKey {
    CircuitKey {
        dst: OrigDst::from_socket_addr(dst),
        scope,
    }
}

/// The two `WORKLOADS` values of a registration: the pod's and its proxy container's.
fn entries(r: &Registration) -> (WorkloadConfig, WorkloadConfig) {
    let mut workload = WorkloadConfig {
        role: role::WORKLOAD,
        scope: r.scope,
        proxy_port: r.proxy_port,
        flags: if r.ipv6 { flags::IPV6_LISTENER } else { 0 }
            | if r.allow_metadata {
                0
            } else {
                flags::DENY_METADATA
            }
            | if r.passthrough { flags::PASSTHROUGH } else { 0 }
            | if r.listener_checked {
                flags::CHECK_LISTENER
            } else {
                0
            }
            | if r.strict_inbound {
                flags::STRICT_INBOUND
            } else {
                0
            },
        excluded_ports_len: r.exclude_ports.len() as u32,
        excluded_ports: [0; limits::EXCLUDED_PORTS],
    };
    workload.excluded_ports[..r.exclude_ports.len()].copy_from_slice(&r.exclude_ports);
    let proxy = WorkloadConfig {
        role: role::PROXY,
        ..workload
    };
    (workload, proxy)
}

/// The keys of a registration's CIDRs in `trie`, each once, under its scope (unparsable
/// text cannot occur: it was written from a parsed `Cidr`).
pub fn cidr_keys(trie: Trie, r: &Registration) -> Vec<CidrKey> {
    let cidrs = match trie {
        Trie::Excluded => &r.exclude_cidrs,
        Trie::Meshed => &r.mesh_cidrs,
    };
    let mut keys = Vec::new();
    for c in cidrs.iter().filter_map(|c| c.parse::<Cidr>().ok()) {
        let key = CidrKey::new(
            lpm_prefix_len(c.addr.is_ipv4(), c.prefix),
            ScopedAddr::new(r.scope, mapped_octets(c.addr)),
        );
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// Makes `trie` hold `wanted`: missing keys are inserted; with `prune`, keys not wanted are
/// removed.
fn sync_trie(
    maps: &mut impl PodMaps,
    trie: Trie,
    wanted: &[CidrKey],
    prune: bool,
) -> Result<(), MapError> {
    let Some(present) = maps.cidrs(trie) else {
        return Ok(());
    };
    for key in present.iter().filter(|p| prune && !wanted.contains(p)) {
        let _ = maps.remove_cidr(trie, key);
    }
    for key in wanted.iter().filter(|w| !present.contains(w)) {
        maps.insert_cidr(trie, key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{memory_maps::MemoryMaps, pod::PodCgroup};
    use super::*;

    /// Pods as directories under a scratch root (cgroup ids are their inodes), removed on drop.
    struct Node {
        dir: PathBuf,
    }

    impl Node {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("sidecar-registry-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self { dir }
        }

        fn pod(&self, uid: &str) -> PodCgroup {
            let pod = self.dir.join(format!("pod{uid}"));
            let container = pod.join("sidecar");
            fs::create_dir_all(&container).unwrap();
            PodCgroup {
                uid: uid.into(),
                pod,
                container,
            }
        }

        fn registry(&self) -> Registry {
            Registry::load(&self.dir).unwrap()
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn request(pod: PodCgroup, exclude: &[&str], mesh: &[&str], cap: Option<u32>) -> Request {
        let parse = |cidrs: &[&str]| cidrs.iter().map(|c| c.parse().unwrap()).collect();
        Request {
            pod,
            pid: 1,
            proxy_port: 15001,
            inbound_port: 15006,
            exclude_ports: vec![22],
            exclude_cidrs: parse(exclude),
            ipv6: false,
            allow_metadata: false,
            passthrough: true,
            passthrough_cap: cap,
            mesh_cidrs: parse(mesh),
            listeners: None,
            policy: None,
            strict_inbound: false,
        }
    }

    /// The keys of `cidrs` under `scope`, as the trie holds them.
    fn keys(scope: u32, cidrs: &[&str]) -> Vec<CidrKey> {
        let cidrs = cidrs.iter().map(|c| c.parse::<Cidr>().unwrap());
        let key = |c: Cidr| {
            let data = ScopedAddr::new(scope, mapped_octets(c.addr));
            CidrKey::new(lpm_prefix_len(c.addr.is_ipv4(), c.prefix), data)
        };
        cidrs.map(key).collect()
    }

    #[test]
    fn a_cidr_with_host_bits_is_its_prefix_across_re_registrations() {
        let node = Node::new("host-bits");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let pod = node.pod("a1");
        let req = |cidr| request(pod.clone(), &[cidr], &[], None);
        let reg = registry.register(&mut maps, req("10.0.0.1/8")).unwrap();
        // The same prefix spelled otherwise: the trie has one entry for both, which the
        // re-registration once removed as the old spelling's.
        registry.register(&mut maps, req("10.0.0.2/8")).unwrap();
        let held = maps.cidrs(Trie::Excluded).unwrap();
        assert_eq!(held, keys(reg.scope, &["10.0.0.0/8"]));
    }

    #[test]
    fn a_narrower_prefix_stays_when_the_wider_one_goes() {
        let node = Node::new("narrower");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let pod = node.pod("a1");
        let both = ["10.0.0.0/8", "10.1.0.0/16"];
        let reg = registry
            .register(&mut maps, request(pod.clone(), &both, &both, None))
            .unwrap();
        // Each is written, though the kernel's lookup of the narrower one finds the wider
        // one (once taken for "already there").
        assert_eq!(maps.cidrs(Trie::Excluded).unwrap(), keys(reg.scope, &both));
        assert_eq!(maps.cidrs(Trie::Meshed).unwrap(), keys(reg.scope, &both));
        let narrow = ["10.1.0.0/16"];
        registry
            .register(&mut maps, request(pod, &narrow, &narrow, None))
            .unwrap();
        assert_eq!(
            maps.cidrs(Trie::Excluded).unwrap(),
            keys(reg.scope, &narrow)
        );
        assert_eq!(maps.cidrs(Trie::Meshed).unwrap(), keys(reg.scope, &narrow));
    }

    #[test]
    fn a_recreated_pod_leaves_nothing_under_its_old_scope() {
        let node = Node::new("recreated");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let pod = node.pod("a1");
        let req = |pod| request(pod, &["10.0.0.0/8"], &["10.2.0.0/16"], Some(5));
        let old = registry.register(&mut maps, req(pod.clone())).unwrap();
        // Moved away rather than removed, so the new directory cannot reuse its inode.
        fs::rename(&pod.pod, node.dir.join("gone")).unwrap();
        let new = registry.register(&mut maps, req(node.pod("a1"))).unwrap();
        assert_ne!(old.scope, new.scope);
        assert_eq!(
            maps.cidrs(Trie::Excluded).unwrap(),
            keys(new.scope, &["10.0.0.0/8"])
        );
        assert_eq!(
            maps.cidrs(Trie::Meshed).unwrap(),
            keys(new.scope, &["10.2.0.0/16"])
        );
        assert_eq!(maps.caps().unwrap(), [(new.scope, 5)]);
        let ids: Vec<u64> = maps.workloads().iter().map(|(id, _)| *id).collect();
        let mut want = vec![new.pod_cgroup_id, new.proxy_cgroup_id];
        want.sort();
        assert_eq!(ids, want);
    }

    #[test]
    fn a_registration_a_map_refuses_changes_no_map() {
        let node = Node::new("refused");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let (a, b) = (node.pod("a1"), node.pod("b2"));
        registry
            .register(&mut maps, request(a.clone(), &["10.0.0.0/8"], &[], Some(3)))
            .unwrap();
        registry
            .register(&mut maps, request(b, &["10.0.0.0/8"], &["fd00::/8"], None))
            .unwrap();
        let cidrs = ["10.1.0.0/16", "192.168.0.0/16"];
        // Each insert the registration makes fails in turn: a re-registration with other
        // entries, and a new pod's.
        for fail in 0..8 {
            for pod in [a.clone(), node.pod("c3")] {
                let before = maps.clone();
                maps.fail_insert_in = Some(fail);
                let req = request(pod, &cidrs, &cidrs, Some(7));
                match registry.register(&mut maps, req) {
                    Err(RegistryError::Map(_)) => {
                        maps.fail_insert_in = None;
                        assert_eq!(maps, before, "insert {fail} failed and left entries");
                    }
                    Ok(_) => {
                        // Fewer inserts than `fail`: undo it for the next round.
                        assert!(fail > 0);
                        maps.fail_insert_in = None;
                        let uid = registry.pods().last().unwrap().pod_uid.clone();
                        if uid == "c3" {
                            registry.remove(&mut maps, "c3").unwrap();
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[test]
    fn every_pod_the_node_can_register_gets_its_full_cidr_quota() {
        assert_eq!(cidr_quota(limits::EXCLUDED_CIDRS), MAX_CIDRS);
        assert!(
            cidr_quota(limits::EXCLUDED_CIDRS) * MAX_PODS as usize
                <= limits::EXCLUDED_CIDRS as usize
        );
        // A trie of 1,024 entries (an older build's) leaves 2 per pod, not 64 for 16 pods.
        assert_eq!(cidr_quota(1024), 2);
        assert!(cidr_quota(1024) * MAX_PODS as usize <= 1024);
    }

    /// Pods with their full quota of excluded and meshed CIDRs: none is refused for lack of
    /// room another pod took (with a 1,024-entry `MESH_CIDRS`, the seventeenth was, and every
    /// later one that named mesh CIDRs, for good). Twice that many pods here, each saving the
    /// registrations; that every one of `MAX_PODS` fits is the arithmetic of
    /// `every_pod_the_node_can_register_gets_its_full_cidr_quota`.
    #[test]
    fn pods_with_full_quotas_never_run_out_of_room() {
        let node = Node::new("full-quotas");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let quota = cidr_quota(maps.cidr_capacity());
        assert_eq!(quota, MAX_CIDRS);
        let cidrs: Vec<String> = (0..quota).map(|i| format!("10.{i}.0.0/16")).collect();
        let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        const PODS: usize = 32;
        for i in 0..PODS {
            let pod = node.pod(&format!("p{i}"));
            let req = request(pod, &cidrs, &cidrs, None);
            if let Err(e) = registry.register(&mut maps, req) {
                panic!("pod {i} of {PODS} refused: {e}");
            }
        }
        let held = |trie| maps.cidrs(trie).unwrap().len();
        assert_eq!(held(Trie::Meshed), PODS * quota);
        assert_eq!(held(Trie::Excluded), PODS * quota);
        assert!(quota * MAX_PODS as usize <= limits::MESH_CIDRS as usize);
    }

    /// `n` deny rules on distinct /24s: `n + 2` prefixes compiled.
    fn policy_of(n: usize, tag: u8) -> PodPolicy {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "[[rule]]\naction = \"deny\"\ndestinations = [\"10.{tag}.{i}.0/24\"]\n"
            ));
        }
        if n == 0 {
            text.push_str("[defaults]\noutbound = \"allow\"\n");
        }
        pod_policy("test", text).unwrap()
    }

    fn with_policy(pod: PodCgroup, policy: PodPolicy) -> Request {
        Request {
            policy: Some(policy),
            ..request(pod, &[], &[], None)
        }
    }

    fn policy_maps(maps: &MemoryMaps) -> &super::super::memory_maps::MemoryPolicyMaps {
        maps.policy.as_ref().unwrap()
    }

    /// Keys of workload `scope` in the denied trie.
    fn policy_keys(maps: &MemoryMaps, scope: u32) -> usize {
        let p = policy_maps(maps);
        p.denied
            .keys()
            .filter(|k| u32::from_be_bytes(k.1) / 2 == scope)
            .count()
    }

    /// A pod registered with a policy has it in force in its scope; a refused registration
    /// (its `WORKLOADS` write fails) leaves nothing of it; deregistering empties both slots
    /// and the state.
    #[test]
    fn a_pods_policy_comes_and_goes_with_its_registration() {
        let node = Node::new("policy-lifecycle");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let pod = node.pod("a1");
        // No CIDRs and no cap: the first insert that can be made to fail is the proxy's
        // WORKLOADS entry, written after the policy (whose trie inserts are not counted).
        maps.fail_insert_in = Some(0);
        let refused = registry.register(&mut maps, with_policy(pod.clone(), policy_of(3, 1)));
        assert!(matches!(refused, Err(RegistryError::Map(_))), "{refused:?}");
        assert!(policy_maps(&maps).states.is_empty());
        assert!(policy_maps(&maps).denied.is_empty());
        assert!(maps.workloads.is_empty());

        let reg = registry
            .register(&mut maps, with_policy(pod.clone(), policy_of(3, 1)))
            .unwrap();
        assert!(reg.policy.is_some());
        assert_eq!(
            policy_maps(&maps)
                .states
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [reg.scope]
        );
        assert_eq!(policy_keys(&maps, reg.scope), 5);
        // A reload fills the other slot: both are there until the next one.
        registry
            .set_policy(&mut maps, "a1", policy_of(1, 2))
            .unwrap();
        assert_eq!(policy_keys(&maps, reg.scope), 5 + 3);
        assert!(registry.remove(&mut maps, "a1").unwrap());
        assert!(!policy_maps(&maps).holds_scope(reg.scope));
    }

    /// A policy over the pod's quota is refused at registration (nothing registered) and as
    /// a replacement (the old one stays in force); so is one the tries have no room for.
    #[test]
    fn a_refused_policy_leaves_the_one_in_force() {
        let node = Node::new("policy-refused");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let quota = policy_quota(limits::POLICY_OUT);
        assert_eq!(quota, limits::POLICY_PREFIXES_PER_POD as usize);
        let pod = node.pod("a1");
        let over = policy_of(quota - 1, 1);
        let refused = registry.register(&mut maps, with_policy(pod.clone(), over.clone()));
        let e = refused.unwrap_err();
        assert_eq!(e.reason(), "over_quota", "{e}");
        assert!(e.to_string().contains("merge CIDRs"), "{e}");
        assert_eq!(registry.pods().count(), 0);
        assert_eq!(maps, MemoryMaps::default());

        let full = policy_of(quota - 2, 1);
        let reg = registry
            .register(&mut maps, with_policy(pod, full.clone()))
            .unwrap();
        let before = maps.clone();
        let e = registry.set_policy(&mut maps, "a1", over).unwrap_err();
        assert_eq!(e.reason(), "over_quota");
        assert_eq!(maps, before);
        assert_eq!(
            registry.pods().next().unwrap().policy,
            Some(full.text.clone())
        );

        // No room left in the tries: refused, and retried later.
        maps.policy.as_mut().unwrap().room = Some(quota as u32 + 1);
        let e = registry
            .set_policy(&mut maps, "a1", policy_of(3, 2))
            .unwrap_err();
        assert_eq!(e.reason(), "kernel_map", "{e}");
        assert!(e.retry());
        let p = policy_maps(&maps);
        assert_eq!(p.states, policy_maps(&before).states);
        let live = |m: &MemoryMaps| {
            let slot = policy_maps(m).states[&reg.scope].slot;
            let owner = (reg.scope * 2 + slot).to_be_bytes();
            let keys = policy_maps(m).denied.keys().filter(|k| k.1 == owner);
            keys.copied().collect::<Vec<_>>()
        };
        assert_eq!(live(&maps), live(&before));
        assert_eq!(registry.pods().next().unwrap().policy, Some(full.text));
    }

    /// A restarted agent puts each persisted policy back in force, adopting the slots the
    /// maps hold, so its later installs and the pod's removal leave none of the old keys.
    #[test]
    fn a_restarted_agent_adopts_the_pinned_slots() {
        let node = Node::new("policy-restart");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let reg = registry
            .register(&mut maps, with_policy(node.pod("a1"), policy_of(4, 1)))
            .unwrap();
        registry
            .set_policy(&mut maps, "a1", policy_of(2, 2))
            .unwrap();
        // The agent restarts, and a stale state of a pod nobody registered is pruned.
        maps.policy
            .as_mut()
            .unwrap()
            .states
            .insert(reg.scope + 50, Default::default());
        let mut registry = node.registry();
        assert_eq!(
            registry.pods().next().unwrap().policy,
            Some(policy_of(2, 2).text)
        );
        registry.reconcile(&mut maps).unwrap();
        assert_eq!(
            policy_maps(&maps)
                .states
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [reg.scope]
        );
        registry
            .set_policy(&mut maps, "a1", policy_of(1, 3))
            .unwrap();
        // The 4-rule policy's 6 keys are gone: the 2-rule one's 4 and the 1-rule one's 3.
        assert_eq!(policy_keys(&maps, reg.scope), 4 + 3);
        assert!(registry.remove(&mut maps, "a1").unwrap());
        assert!(!policy_maps(&maps).holds_scope(reg.scope));
        assert!(policy_maps(&maps).denied.is_empty());
    }

    #[test]
    fn every_pod_the_node_can_register_gets_its_full_policy_quota() {
        let quota = policy_quota(limits::POLICY_OUT);
        assert_eq!(quota, limits::POLICY_PREFIXES_PER_POD as usize);
        assert!(quota * 2 * MAX_PODS as usize <= limits::POLICY_OUT as usize);
        // Tries of an older build (2,048 entries): 2 prefixes per pod, not 32 for 32 pods.
        assert_eq!(policy_quota(2048), 2);
    }

    /// A pod's open circuits are its own share of `OPEN_CIRCUITS`: over it an open is refused
    /// and nothing written; a close, a new registration and the pod's removal take them out;
    /// the sweep removes any no pod holds (a previous agent's).
    #[test]
    fn a_pods_open_circuits_are_its_share_and_go_with_it() {
        let node = Node::new("circuits");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let dst = |port: u16| SocketAddr::from(([10, 0, 0, 9], port));
        let e = registry
            .set_circuit(&mut maps, "a1", dst(1), true)
            .unwrap_err();
        assert_eq!(e.reason(), "not_registered");
        let a = registry
            .register(&mut maps, request(node.pod("a1"), &[], &[], None))
            .unwrap();
        let b = registry
            .register(&mut maps, request(node.pod("b1"), &[], &[], None))
            .unwrap();
        let quota = limits::OPEN_CIRCUITS_PER_POD;
        assert!(quota * MAX_PODS <= limits::OPEN_CIRCUITS);
        for port in 0..quota as u16 {
            registry
                .set_circuit(&mut maps, "a1", dst(port), true)
                .unwrap();
        }
        let before = maps.clone();
        let e = registry
            .set_circuit(&mut maps, "a1", dst(9999), true)
            .unwrap_err();
        assert_eq!(e.reason(), "over_quota", "{e}");
        assert_eq!(maps, before);
        // Another pod's share is untouched by the first one's.
        registry.set_circuit(&mut maps, "b1", dst(1), true).unwrap();
        assert!(maps.circuits.contains(&circuit_key(b.scope, dst(1))));
        registry
            .set_circuit(&mut maps, "a1", dst(0), false)
            .unwrap();
        assert!(!maps.circuits.contains(&circuit_key(a.scope, dst(0))));
        registry
            .set_circuit(&mut maps, "a1", dst(9999), true)
            .unwrap();
        assert_eq!(registry.circuits_of("a1"), quota as usize);

        // Registered again (its sidecar reconnected): it sends its circuits anew.
        registry
            .register(&mut maps, request(node.pod("a1"), &[], &[], None))
            .unwrap();
        assert_eq!(registry.circuits_of("a1"), 0);
        assert!(maps.circuits.iter().all(|k| k.scope != a.scope));
        registry.set_circuit(&mut maps, "a1", dst(5), true).unwrap();
        assert!(registry.remove(&mut maps, "a1").unwrap());
        assert!(maps.circuits.iter().all(|k| k.scope != a.scope));

        // A previous agent's entry that no pod holds goes with the sweep.
        maps.circuits.insert(circuit_key(b.scope + 7, dst(2)));
        registry.reconcile(&mut maps).unwrap();
        assert_eq!(
            maps.circuits.iter().copied().collect::<Vec<_>>(),
            [circuit_key(b.scope, dst(1))]
        );
    }

    /// Strict inbound sets the pod's flag (not its proxy's role's meaning: the program drops
    /// only for the WORKLOAD role), and needs the tunnel.
    #[test]
    fn strict_inbound_needs_the_tunnel_and_sets_the_pods_flag() {
        let node = Node::new("strict");
        let (mut registry, mut maps) = (node.registry(), MemoryMaps::default());
        let mut req = request(node.pod("a1"), &[], &[], None);
        req.strict_inbound = true;
        req.inbound_port = 0;
        let e = registry.register(&mut maps, req.clone()).unwrap_err();
        assert_eq!(e.reason(), "invalid");
        assert!(e.to_string().contains("--tls-dir"), "{e}");
        assert!(maps.workloads.is_empty());
        req.inbound_port = 15008;
        let reg = registry.register(&mut maps, req).unwrap();
        let pod = maps.workloads[&reg.pod_cgroup_id];
        assert_eq!(pod.role, role::WORKLOAD);
        assert_ne!(pod.flags & flags::STRICT_INBOUND, 0);
        let plain = registry
            .register(&mut maps, request(node.pod("b1"), &[], &[], None))
            .unwrap();
        assert_eq!(
            maps.workloads[&plain.pod_cgroup_id].flags & flags::STRICT_INBOUND,
            0
        );
    }
}
