//! The agent's registrations: which pods have a registered sidecar, mirrored into the
//! `WORKLOADS` map (pod cgroup → WORKLOAD, the proxy's container cgroup → PROXY) and
//! persisted in the state directory so a restarted agent knows what it had.
//!
//! The map is always made to match the registrations exactly: entries of pods that are gone,
//! or that no registration explains, are removed (at start and by the periodic sweep).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::lpm_trie::Key;
use serde::{Deserialize, Serialize};
use sidecar_common::{
    ScopedAddr, WorkloadConfig, flags, limits, lpm_prefix_len, mapped_octets, role,
};

use super::pins::AgentPins;
use crate::{cidr::Cidr, host::cgroup};

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
    /// Identifies the pod in scoped kernel keys (CIDR exclusions, policy).
    pub scope: u32,
    /// The proxy process that registered last (informational).
    pub pid: u32,
    /// How many times this pod's proxy registered (re-registrations after agent restarts
    /// or broken connections included).
    #[serde(default)]
    pub registrations: u64,
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
    #[error("updating the kernel maps (WORKLOADS, EXCLUDED_CIDRS): {0}")]
    Map(#[from] aya::maps::MapError),
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
}

impl RegistryError {
    /// The refusal counter this error is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::Taken { .. } => "proxy_taken",
            RegistryError::Mark(_) => "bad_listener",
            RegistryError::TooManyCidrs { .. } => "over_quota",
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
            RegistryError::Full | RegistryError::Map(_) | RegistryError::Persist { .. }
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
        })
    }

    /// Adopted pins without the registrations that explain them (the state directory was
    /// lost): keep every `WORKLOADS`/`EXCLUDED_CIDRS` entry for `grace` while the sidecars
    /// re-register, instead of dropping their pods' interception at once; and never hand out
    /// a scope the kernel entries still use.
    pub fn hold(&mut self, pins: &AgentPins, grace: std::time::Duration) {
        self.hold_until = Some(std::time::Instant::now() + grace);
        let max_scope = pins
            .workloads
            .iter()
            .filter_map(Result::ok)
            .map(|(_, cfg)| cfg.scope)
            .max()
            .unwrap_or(0);
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
        pins: &mut AgentPins,
        req: Request,
    ) -> Result<Registration, RegistryError> {
        if req.exclude_ports.len() > limits::EXCLUDED_PORTS {
            return Err(RegistryError::TooManyPorts(req.exclude_ports.len()));
        }
        let quota = cidr_quota(pins.excluded_capacity);
        for given in [req.exclude_cidrs.len(), req.mesh_cidrs.len()] {
            if given > quota {
                return Err(RegistryError::TooManyCidrs { given, quota });
            }
        }
        if req.proxy_port == 0 {
            return Err(RegistryError::NoPort);
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
            passthrough: req.passthrough && pins.passthrough_capable(),
            passthrough_cap: req.passthrough_cap,
            mesh_cidrs: req.mesh_cidrs.iter().map(Cidr::to_string).collect(),
            listener_checked: req.listeners.is_some(),
            scope,
            pid: req.pid,
            registrations: same_pod.map_or(0, |p| p.registrations) + 1,
        };
        // Exclusions and mesh CIDRs before the WORKLOAD entry, so the first connect honours
        // them; a previous registration's that are no longer asked for go.
        let keys = scoped_keys(reg.scope, &reg.exclude_cidrs);
        insert_all(&mut pins.excluded, &keys)?;
        let mesh_keys = scoped_keys(reg.scope, &reg.mesh_cidrs);
        if let Some(meshed) = &mut pins.meshed {
            insert_all(meshed, &mesh_keys)?;
        }
        if let Some(prev) = same_pod {
            for old in scoped_keys(prev.scope, &prev.exclude_cidrs) {
                if !keys.iter().any(|k| same_key(k, &old)) {
                    let _ = pins.excluded.remove(&old);
                }
            }
            if let Some(meshed) = &mut pins.meshed {
                for old in scoped_keys(prev.scope, &prev.mesh_cidrs) {
                    if !mesh_keys.iter().any(|k| same_key(k, &old)) {
                        let _ = meshed.remove(&old);
                    }
                }
            }
        }
        // The cap before the WORKLOAD entry too.
        if let Some(caps) = &mut pins.direct_caps {
            match reg.passthrough_cap {
                Some(cap) => caps.insert(reg.scope, cap, 0)?,
                None => forget(caps.remove(&reg.scope))?,
            }
        }
        let (workload, proxy) = entries(&reg);
        pins.workloads.insert(reg.proxy_cgroup_id, proxy, 0)?;
        pins.workloads.insert(reg.pod_cgroup_id, workload, 0)?;
        // A restarted sidecar container has a new cgroup: its predecessor's entry goes.
        if let Some(prev) = &previous {
            for id in [prev.proxy_cgroup_id, prev.pod_cgroup_id] {
                if id != reg.proxy_cgroup_id && id != reg.pod_cgroup_id {
                    let _ = pins.workloads.remove(&id);
                }
            }
        }
        self.pods.insert(reg.pod_uid.clone(), reg.clone());
        self.persist()?;
        Ok(reg)
    }

    /// Removes a pod's interception (its sidecar deregistered, or the pod is gone).
    pub fn remove(&mut self, pins: &mut AgentPins, uid: &str) -> Result<bool, RegistryError> {
        let Some(reg) = self.pods.remove(uid) else {
            return Ok(false);
        };
        // WORKLOAD first: from here on the pod's connects pass through, never to a proxy
        // that is going away.
        for id in [reg.pod_cgroup_id, reg.proxy_cgroup_id] {
            forget(pins.workloads.remove(&id))?;
        }
        if let Some(caps) = &mut pins.direct_caps {
            forget(caps.remove(&reg.scope))?;
        }
        for key in scoped_keys(reg.scope, &reg.exclude_cidrs) {
            let _ = pins.excluded.remove(&key);
        }
        if let Some(meshed) = &mut pins.meshed {
            for key in scoped_keys(reg.scope, &reg.mesh_cidrs) {
                let _ = meshed.remove(&key);
            }
        }
        self.persist()?;
        Ok(true)
    }

    /// Drops registrations whose pod cgroup is gone (or was recreated: other inode), then
    /// makes `WORKLOADS` match the registrations exactly. Returns the pods removed.
    pub fn reconcile(&mut self, pins: &mut AgentPins) -> Result<Vec<String>, RegistryError> {
        let gone: Vec<String> = self
            .pods
            .values()
            .filter(|r| cgroup::id(&r.pod_cgroup).ok() != Some(r.pod_cgroup_id))
            .map(|r| r.pod_uid.clone())
            .collect();
        for uid in &gone {
            self.remove(pins, uid)?;
            tracing::info!(pod_uid = %uid, "pod gone: interception removed");
        }
        let wanted: BTreeMap<u64, WorkloadConfig> = self
            .pods
            .values()
            .flat_map(|r| {
                let (w, p) = entries(r);
                [(r.pod_cgroup_id, w), (r.proxy_cgroup_id, p)]
            })
            .collect();
        let prune = self
            .hold_until
            .is_none_or(|t| std::time::Instant::now() >= t);
        sync_hash(&mut pins.workloads, &wanted, prune)?;
        if let Some(caps) = &mut pins.direct_caps {
            let wanted: BTreeMap<u32, u32> = self
                .pods
                .values()
                .filter_map(|r| Some((r.scope, r.passthrough_cap?)))
                .collect();
            sync_hash(caps, &wanted, prune)?;
        }
        let wanted: Vec<Key<ScopedAddr>> = self
            .pods
            .values()
            .flat_map(|r| scoped_keys(r.scope, &r.exclude_cidrs))
            .collect();
        sync_trie(&mut pins.excluded, &wanted, prune)?;
        if let Some(meshed) = &mut pins.meshed {
            let wanted: Vec<Key<ScopedAddr>> = self
                .pods
                .values()
                .flat_map(|r| scoped_keys(r.scope, &r.mesh_cidrs))
                .collect();
            sync_trie(meshed, &wanted, prune)?;
        }
        Ok(gone)
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

/// A removal that found nothing to remove (ENOENT) is done too.
fn forget(removed: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match removed {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
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

/// The trie keys of a registration's CIDRs under its scope (unparsable text cannot occur: it
/// was written from a parsed `Cidr`).
fn scoped_keys(scope: u32, cidrs: &[String]) -> Vec<Key<ScopedAddr>> {
    cidrs
        .iter()
        .filter_map(|c| c.parse::<Cidr>().ok())
        .map(|c| {
            Key::new(
                lpm_prefix_len(c.addr.is_ipv4(), c.prefix),
                ScopedAddr::new(scope, mapped_octets(c.addr)),
            )
        })
        .collect()
}

/// Makes `trie` hold exactly `wanted` (entries nothing wants are kept unless `prune`).
/// Makes a hash map hold `wanted`: entries that differ are written; with `prune`, entries
/// not wanted are removed.
fn sync_hash<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    prune: bool,
) -> Result<(), aya::maps::MapError> {
    let present: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in present.iter().filter(|k| prune && !wanted.contains_key(k)) {
        let _ = map.remove(key);
    }
    for (key, value) in wanted {
        if map.get(key, 0).ok().as_ref() != Some(value) {
            map.insert(key, value, 0)?;
        }
    }
    Ok(())
}

fn sync_trie(
    trie: &mut aya::maps::LpmTrie<aya::maps::MapData, ScopedAddr, u8>,
    wanted: &[Key<ScopedAddr>],
    prune: bool,
) -> Result<(), aya::maps::MapError> {
    let present: Vec<Key<ScopedAddr>> = trie.keys().filter_map(Result::ok).collect();
    for key in present
        .iter()
        .filter(|p| prune && !wanted.iter().any(|w| same_key(w, p)))
    {
        let _ = trie.remove(key);
    }
    for key in wanted
        .iter()
        .filter(|w| !present.iter().any(|p| same_key(w, p)))
    {
        trie.insert(key, 1, 0)?;
    }
    Ok(())
}

/// Inserts every key, or none: on a failure the keys this call added are removed again.
fn insert_all(
    trie: &mut aya::maps::LpmTrie<aya::maps::MapData, ScopedAddr, u8>,
    keys: &[Key<ScopedAddr>],
) -> Result<(), aya::maps::MapError> {
    let mut added = Vec::new();
    for key in keys {
        if trie.get(key, 0).is_ok() {
            continue;
        }
        if let Err(e) = trie.insert(key, 1, 0) {
            for k in &added {
                let _ = trie.remove(*k);
            }
            return Err(e);
        }
        added.push(key);
    }
    Ok(())
}

fn same_key(a: &Key<ScopedAddr>, b: &Key<ScopedAddr>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
