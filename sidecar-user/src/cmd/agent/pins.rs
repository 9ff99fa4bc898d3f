//! The agent's kernel objects: one load of the eBPF object per node, attached at the pods'
//! cgroup root and pinned under `<bpffs>/sidecar/agent/` (or `--pin-dir`).
//!
//! Pins are what make an agent restart or upgrade invisible to pods: the programs stay
//! attached through their pinned links while no agent runs, and the next agent *adopts* the
//! pins (opens the maps, checks the links) instead of loading again. Only
//! `sidecar agent --uninstall` removes them.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key},
    programs::{CgroupSkb, CgroupSock, CgroupSockAddr, CgroupSockopt, SkMsg, SockOps},
};
use sidecar_common::{
    CircuitKey, Counter, ScopeCounters, ScopeUsage, ScopedAddr, WorkloadConfig, limits, maps,
    programs,
};

use super::pod_maps::{CidrKey, MapError, PodMaps, Trie};
use crate::policy::{kernel::PolicyMaps, pinned::PinnedPolicyMaps};

use crate::redirect::ebpf::{
    EbpfError, OBJECT, attach_error, attach_to_cgroup, link_pin_name, open_cgroup, open_pinned,
    program,
};

/// The pinned links, in attach order (sockops and the original-destination answer before
/// the connect hooks, so the first redirected connection finds everything in place).
pub const LINKS: [&str; 4] = [
    programs::SOCKOPS,
    programs::GETSOCKOPT,
    programs::CONNECT4,
    programs::CONNECT6,
];
/// `BPF_NOEXIST` (uapi/linux/bpf.h): create the entry only if it is not there.
const BPF_NOEXIST: u64 = 1;

/// The strict inbound program's link, at the pods' root too: it drops outside SYNs only for
/// pods registered with strict inbound. Not required to adopt an installation: pins of a
/// build without it get it at the next upgrade, and refuse strict pods until then.
pub const STRICT_LINK: &str = programs::STRICT_INBOUND;
/// The links attached after [`LINKS`] that an installation may lack (pins of an older build
/// get them at their upgrade): the strict inbound program, and the release hook that gives
/// a socket's pending pass-through place back (without it a pod's failed connects keep
/// theirs until the pod is gone).
const OPTIONAL_LINKS: [&str; 2] = [STRICT_LINK, programs::SOCK_RELEASE];
/// Maps the agent needs to find pinned to adopt an installation.
const REQUIRED_MAPS: [&str; 4] = [
    maps::WORKLOADS,
    maps::COUNTERS,
    maps::ORIG_DST,
    maps::SOCKETS,
];

/// The installation this agent works with: fresh, or adopted from the pins.
pub struct AgentPins {
    pub dir: PathBuf,
    /// Whether the pins were already there (restart/upgrade) rather than created now.
    pub adopted: bool,
    pub workloads: HashMap<MapData, u64, WorkloadConfig>,
    /// Destination CIDRs that bypass the proxy, per pod scope.
    pub excluded: LpmTrie<MapData, ScopedAddr, u8>,
    /// Entries the pinned `EXCLUDED_CIDRS` trie holds: pins adopted from an older build may
    /// hold fewer than this build creates, and the per-pod quota is cut to fit.
    pub excluded_capacity: u32,
    /// The same of `MESH_CIDRS` (when the pins have it).
    pub meshed_capacity: Option<u32>,
    /// Destinations with sidecars, per pod scope (`None`: pins of a build without kernel
    /// pass-through, whose pods are then always proxied).
    pub meshed: Option<LpmTrie<MapData, ScopedAddr, u8>>,
    /// Pods' caps on pass-through connections per destination, by scope (`None`: pins of a
    /// build without them, whose programs hold no such cap).
    pub direct_caps: Option<HashMap<MapData, u32, u32>>,
    /// Pods' policies, by scope (`None`: pins without the policy maps).
    pub policy: Option<PinnedPolicyMaps>,
    /// Pods' open circuits, refused at `connect()` (`None`: pins without the map).
    pub circuits: Option<HashMap<MapData, CircuitKey, u8>>,
    /// Each pod's own counters, by scope (`None`: pins without the map).
    pub scope_counters: Option<PerCpuHashMap<MapData, u32, ScopeCounters>>,
    /// The strict inbound program is attached ([`STRICT_LINK`] is pinned).
    pub strict_capable: bool,
    /// What each pod holds of the pass-through tables, and its dropped close records, by
    /// scope (`None`: pins of a build without per-pod quotas).
    pub scope_usage: Option<HashMap<MapData, u32, ScopeUsage>>,
    counters: PerCpuArray<MapData, u64>,
}

/// Each pod's share of the node-wide pass-through tables, as the programs are loaded with it
/// (see `limits::TRACKED_PER_POD` and `limits::DESTINATIONS_PER_POD` for why the defaults
/// are the most that lets every pod's share fit). Pins adopted as they are keep the quotas
/// they were loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Pass-through connections a pod may have tracked at once.
    pub tracked_per_pod: u32,
    /// Destinations a pod may have pass-through connections open to at once.
    pub destinations_per_pod: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            tracked_per_pod: limits::TRACKED_PER_POD,
            destinations_per_pod: limits::DESTINATIONS_PER_POD,
        }
    }
}

impl Quotas {
    fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader
            .override_global("TRACKED_QUOTA", &self.tracked_per_pod, true)
            .override_global("DESTINATIONS_QUOTA", &self.destinations_per_pod, true);
    }
}

impl AgentPins {
    /// Adopts a complete installation in `dir`, or installs one at `cgroup_root`. A partial
    /// one (an agent killed halfway through installing) is removed first.
    pub fn open_or_install(
        dir: &Path,
        cgroup_root: &Path,
        sockmap: bool,
        quotas: Quotas,
    ) -> Result<Self, EbpfError> {
        let adopted = if is_complete(dir) {
            tracing::info!(pins = %dir.display(), "adopting the pinned programs and maps: no reload");
            true
        } else {
            if dir.exists() {
                tracing::warn!(pins = %dir.display(), "incomplete installation found: removing it and installing again");
                for failure in uninstall(dir).1 {
                    tracing::warn!("{failure}");
                }
            }
            install(dir, cgroup_root, sockmap, quotas)?;
            false
        };
        Ok(Self {
            dir: dir.into(),
            adopted,
            workloads: open_pinned(dir, maps::WORKLOADS)?,
            excluded: open_pinned(dir, maps::EXCLUDED_CIDRS)?,
            excluded_capacity: capacity(dir, maps::EXCLUDED_CIDRS)?,
            meshed_capacity: capacity(dir, maps::MESH_CIDRS).ok(),
            meshed: open_pinned(dir, maps::MESH_CIDRS).ok(),
            direct_caps: open_pinned(dir, maps::DIRECT_CAPS).ok(),
            policy: PinnedPolicyMaps::open(dir).ok(),
            circuits: open_pinned(dir, maps::OPEN_CIRCUITS).ok(),
            scope_counters: open_pinned(dir, maps::SCOPE_COUNTERS).ok(),
            strict_capable: dir.join(link_pin_name(STRICT_LINK)).exists(),
            scope_usage: open_pinned(dir, maps::SCOPE_USAGE).ok(),
            counters: open_pinned(dir, maps::COUNTERS)?,
        })
    }

    /// Opens the maps an in-place upgrade added (they were not there when the pins were
    /// adopted).
    pub fn reopen_added(&mut self) {
        if self.meshed.is_none() {
            self.meshed = open_pinned(&self.dir, maps::MESH_CIDRS).ok();
            self.meshed_capacity = capacity(&self.dir, maps::MESH_CIDRS).ok();
        }
        if self.direct_caps.is_none() {
            self.direct_caps = open_pinned(&self.dir, maps::DIRECT_CAPS).ok();
        }
        if self.policy.is_none() {
            self.policy = PinnedPolicyMaps::open(&self.dir).ok();
        }
        if self.circuits.is_none() {
            self.circuits = open_pinned(&self.dir, maps::OPEN_CIRCUITS).ok();
        }
        if self.scope_counters.is_none() {
            self.scope_counters = open_pinned(&self.dir, maps::SCOPE_COUNTERS).ok();
        }
        self.strict_capable = self.dir.join(link_pin_name(STRICT_LINK)).exists();
        if self.scope_usage.is_none() {
            self.scope_usage = open_pinned(&self.dir, maps::SCOPE_USAGE).ok();
        }
    }

    /// Why every pod's share may not fit the pinned pass-through tables: pins installed by an
    /// older build keep their maps across an upgrade (a smaller `DIRECT_PENDING`, no
    /// `SCOPE_USAGE`, so no quotas at all). `None`: they fit.
    pub fn shares_unfit(&self) -> Option<String> {
        if self.scope_usage.is_none() {
            return Some("the pins have no SCOPE_USAGE map: pods have no share".into());
        }
        let pending = capacity(&self.dir, maps::DIRECT_PENDING).ok()?;
        (pending < limits::DIRECT_PENDING).then(|| {
            format!(
                "the pinned DIRECT_PENDING holds {pending} notes, fewer than every pod's share \
                 ({})",
                limits::DIRECT_PENDING
            )
        })
    }

    /// What pod scope `scope` holds of the pass-through tables (`None`: no entry yet, or
    /// pins without them).
    pub fn usage(&self, scope: u32) -> Option<ScopeUsage> {
        self.scope_usage.as_ref()?.get(&scope, 0).ok()
    }

    /// Whether these pins can pass connections through: the maps the programs need for it
    /// are there (a build without them never sets the flag).
    pub fn passthrough_capable(&self) -> bool {
        self.meshed.is_some() && self.dir.join(maps::DIRECT_EVENTS).exists()
    }

    /// Sum over CPUs of every eBPF counter, by name.
    pub fn counters(&self) -> std::collections::BTreeMap<&'static str, u64> {
        crate::redirect::ebpf::sum_counters(&self.counters)
    }
}

/// Entries the pinned map `name` in `dir` can hold.
fn capacity(dir: &Path, name: &'static str) -> Result<u32, EbpfError> {
    MapData::from_pin(dir.join(name))
        .and_then(|m| m.info())
        .map(|info| info.max_entries())
        .map_err(|source| EbpfError::Map { name, source })
}

/// The registry's view of the pinned maps.
impl PodMaps for AgentPins {
    fn excluded_capacity(&self) -> u32 {
        self.excluded_capacity
    }

    fn meshed_capacity(&self) -> Option<u32> {
        self.meshed_capacity
    }

    fn passthrough_capable(&self) -> bool {
        AgentPins::passthrough_capable(self)
    }

    fn strict_capable(&self) -> bool {
        self.strict_capable
    }

    fn policy(&mut self) -> Option<&mut dyn PolicyMaps> {
        self.policy.as_mut().map(|p| p as &mut dyn PolicyMaps)
    }

    fn policy_ref(&self) -> Option<&dyn PolicyMaps> {
        self.policy.as_ref().map(|p| p as &dyn PolicyMaps)
    }

    fn workloads(&self) -> Vec<(u64, WorkloadConfig)> {
        self.workloads.iter().filter_map(Result::ok).collect()
    }

    fn insert_workload(&mut self, cgroup_id: u64, config: &WorkloadConfig) -> Result<(), MapError> {
        let inserted = self.workloads.insert(cgroup_id, config, 0);
        inserted.map_err(map_error(maps::WORKLOADS))
    }

    fn remove_workload(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        forget(self.workloads.remove(&cgroup_id)).map_err(map_error(maps::WORKLOADS))
    }

    fn caps(&self) -> Option<Vec<(u32, u32)>> {
        let caps = self.direct_caps.as_ref()?;
        Some(caps.iter().filter_map(Result::ok).collect())
    }

    fn insert_cap(&mut self, scope: u32, cap: u32) -> Result<(), MapError> {
        let Some(caps) = &mut self.direct_caps else {
            return Ok(());
        };
        caps.insert(scope, cap, 0)
            .map_err(map_error(maps::DIRECT_CAPS))
    }

    fn remove_cap(&mut self, scope: u32) -> Result<(), MapError> {
        let Some(caps) = &mut self.direct_caps else {
            return Ok(());
        };
        forget(caps.remove(&scope)).map_err(map_error(maps::DIRECT_CAPS))
    }

    fn counted_scopes(&self) -> Option<Vec<u32>> {
        let map = self.scope_counters.as_ref()?;
        Some(map.keys().filter_map(Result::ok).collect())
    }

    fn add_counters(&mut self, scope: u32) -> Result<(), MapError> {
        let Some(map) = &mut self.scope_counters else {
            return Ok(());
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError {
            map: maps::SCOPE_COUNTERS,
            source: Box::new(e),
        })?;
        let zero =
            PerCpuValues::try_from(vec![ScopeCounters::default(); cpus]).map_err(|e| MapError {
                map: maps::SCOPE_COUNTERS,
                source: Box::new(e),
            })?;
        match map.insert(scope, zero, BPF_NOEXIST) {
            // Already there: a restarted agent's pod keeps its counts.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            other => other.map_err(map_error(maps::SCOPE_COUNTERS)),
        }
    }

    fn remove_counters(&mut self, scope: u32) -> Result<(), MapError> {
        let Some(map) = &mut self.scope_counters else {
            return Ok(());
        };
        forget(map.remove(&scope)).map_err(map_error(maps::SCOPE_COUNTERS))
    }

    fn counters_of(&self, scope: u32) -> Option<std::collections::BTreeMap<&'static str, u64>> {
        let per_cpu = self.scope_counters.as_ref()?.get(&scope, 0).ok()?;
        let mut counters: std::collections::BTreeMap<&'static str, u64> = Counter::PER_WORKLOAD
            .iter()
            .map(|c| {
                let total = per_cpu.iter().map(|v| v.counts[*c as usize]).sum();
                (c.name(), total)
            })
            .collect();
        // Sockops counts a pod's dropped close records in its usage entry (made at its first
        // pass-through connect: none yet, none dropped).
        let dropped = self.usage(scope).map_or(0, |u| u.records_dropped);
        counters.insert(Counter::DirectRecordsDropped.name(), dropped);
        Some(counters)
    }

    fn circuits(&self) -> Option<Vec<CircuitKey>> {
        let circuits = self.circuits.as_ref()?;
        Some(circuits.keys().filter_map(Result::ok).collect())
    }

    fn insert_circuit(&mut self, key: &CircuitKey) -> Result<(), MapError> {
        let Some(circuits) = &mut self.circuits else {
            return Ok(());
        };
        circuits
            .insert(key, 1, 0)
            .map_err(map_error(maps::OPEN_CIRCUITS))
    }

    fn remove_circuit(&mut self, key: &CircuitKey) -> Result<(), MapError> {
        let Some(circuits) = &mut self.circuits else {
            return Ok(());
        };
        forget(circuits.remove(key)).map_err(map_error(maps::OPEN_CIRCUITS))
    }

    fn usage_scopes(&self) -> Vec<u32> {
        let Some(usage) = &self.scope_usage else {
            return Vec::new();
        };
        usage.keys().filter_map(Result::ok).collect()
    }

    fn remove_usage(&mut self, scope: u32) -> Result<(), MapError> {
        let Some(usage) = &mut self.scope_usage else {
            return Ok(());
        };
        forget(usage.remove(&scope)).map_err(map_error(maps::SCOPE_USAGE))
    }

    fn cidrs(&self, trie: Trie) -> Option<Vec<CidrKey>> {
        let keys = match trie {
            Trie::Excluded => self.excluded.keys(),
            Trie::Meshed => self.meshed.as_ref()?.keys(),
        };
        let keys = keys.filter_map(Result::ok);
        Some(
            keys.map(|k| CidrKey::new(k.prefix_len(), k.data()))
                .collect(),
        )
    }

    fn insert_cidr(&mut self, trie: Trie, key: &CidrKey) -> Result<(), MapError> {
        let Some((map, name)) = self.trie(trie) else {
            return Ok(());
        };
        let key = Key::new(key.prefix_len, key.data);
        map.insert(&key, 1, 0).map_err(map_error(name))
    }

    fn remove_cidr(&mut self, trie: Trie, key: &CidrKey) -> Result<(), MapError> {
        let Some((map, name)) = self.trie(trie) else {
            return Ok(());
        };
        let key = Key::new(key.prefix_len, key.data);
        forget(map.remove(&key)).map_err(map_error(name))
    }
}

impl AgentPins {
    /// The pinned trie behind `trie` and its map name; `None` for `MESH_CIDRS` in pins of an
    /// older build that lacks it (its writes are no-ops, see [`PodMaps`]).
    fn trie(
        &mut self,
        trie: Trie,
    ) -> Option<(&mut LpmTrie<MapData, ScopedAddr, u8>, &'static str)> {
        match trie {
            Trie::Excluded => Some((&mut self.excluded, maps::EXCLUDED_CIDRS)),
            Trie::Meshed => Some((self.meshed.as_mut()?, maps::MESH_CIDRS)),
        }
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

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> MapError {
    move |e| MapError {
        map,
        source: Box::new(e),
    }
}

/// Every link and required map is pinned.
fn is_complete(dir: &Path) -> bool {
    LINKS
        .iter()
        .map(|l| dir.join(link_pin_name(l)))
        .chain(REQUIRED_MAPS.iter().map(|m| dir.join(m)))
        .all(|p| p.exists())
}

/// Loads the object, pins its maps, attaches and pins the links. On failure everything
/// created so far is removed again.
fn install(dir: &Path, root: &Path, sockmap: bool, quotas: Quotas) -> Result<(), EbpfError> {
    fs::create_dir_all(dir).map_err(|source| EbpfError::PinDir {
        path: dir.into(),
        source,
    })?;
    let result = install_into(dir, root, sockmap, quotas);
    if result.is_err() {
        for failure in uninstall(dir).1 {
            tracing::warn!("{failure}");
        }
    }
    result
}

fn install_into(dir: &Path, root: &Path, sockmap: bool, quotas: Quotas) -> Result<(), EbpfError> {
    let mut loader = EbpfLoader::new();
    quotas.apply(&mut loader);
    let mut ebpf = loader
        .override_global("SOCKMAP_ENABLED", &u8::from(sockmap), true)
        .override_global(aya_log::LEVEL, &0u8, true)
        .load(OBJECT)
        .map_err(EbpfError::Load)?;
    for (name, map) in ebpf.maps() {
        if name.starts_with('.') {
            continue;
        }
        let path = dir.join(name);
        map.pin(&path)
            .map_err(|source| EbpfError::Pin { path, source })?;
    }

    attach_sk_msg(&mut ebpf)?;

    let cgroup = open_cgroup(root)?;
    for name in LINKS {
        let link = match name {
            programs::SOCKOPS => attach_to_cgroup::<SockOps>(&mut ebpf, name, &cgroup, root)?,
            programs::GETSOCKOPT => {
                // aya 0.14 cannot turn a sockopt link into a pinnable `FdLink`: create the
                // BPF link ourselves (same syscall aya uses for the others) and pin it.
                let prog_fd = program_fd(&mut ebpf, name)?;
                let link =
                    raw::link_create(prog_fd.as_fd(), cgroup.as_fd(), raw::BPF_CGROUP_GETSOCKOPT)
                        .map_err(|e| attach_error(name, root, io_program_error(e)))?;
                let path = dir.join(link_pin_name(name));
                raw::obj_pin(link.as_fd(), &path)
                    .map_err(|e| attach_error(name, root, io_program_error(e)))?;
                continue;
            }
            _ => attach_to_cgroup::<CgroupSockAddr>(&mut ebpf, name, &cgroup, root)?,
        };
        let path = dir.join(link_pin_name(name));
        link.pin(&path)
            .map_err(|source| EbpfError::Pin { path, source })?;
    }
    for name in OPTIONAL_LINKS {
        attach_optional(&mut ebpf, name, dir, root)?;
    }
    tracing::info!(cgroup = %root.display(), pins = %dir.display(), "eBPF programs loaded, attached and pinned");
    Ok(())
}

/// Attaches one of the [`OPTIONAL_LINKS`] at the pods' root and pins its link.
fn attach_optional(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    dir: &Path,
    root: &Path,
) -> Result<(), EbpfError> {
    let cgroup = open_cgroup(root)?;
    let link = if name == STRICT_LINK {
        attach_to_cgroup::<CgroupSkb>(ebpf, name, &cgroup, root)?
    } else {
        attach_to_cgroup::<CgroupSock>(ebpf, name, &cgroup, root)?
    };
    let path = dir.join(link_pin_name(name));
    link.pin(&path)
        .map_err(|source| EbpfError::Pin { path, source })?;
    Ok(())
}

/// sk_msg is attached to the sockhash with BPF_PROG_ATTACH (which replaces a program
/// attached before: the upgrade path): the map holds the program from then on. aya would
/// detach it when the `Ebpf` drops, so the link handle is taken and forgotten; the
/// attachment lives as long as the pinned map.
fn attach_sk_msg(ebpf: &mut aya::Ebpf) -> Result<(), EbpfError> {
    let id = crate::redirect::ebpf::attach_sk_msg(ebpf)?;
    let prog: &mut SkMsg = program(ebpf, programs::SK_MSG)?;
    let link = prog.take_link(id).map_err(|source| EbpfError::Attach {
        name: programs::SK_MSG,
        target: maps::SOCKETS.into(),
        source,
    })?;
    std::mem::forget(link);
    Ok(())
}

/// A loaded program's fd, whatever its type (the getsockopt program and the upgrade path
/// need only the fd).
fn program_fd(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<aya::programs::ProgramFd, EbpfError> {
    let fd = match name {
        programs::SOCKOPS => program::<SockOps>(ebpf, name)?.fd(),
        programs::GETSOCKOPT => program::<CgroupSockopt>(ebpf, name)?.fd(),
        STRICT_LINK => program::<CgroupSkb>(ebpf, name)?.fd(),
        programs::SOCK_RELEASE => program::<CgroupSock>(ebpf, name)?.fd(),
        _ => program::<CgroupSockAddr>(ebpf, name)?.fd(),
    };
    fd.and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|source| EbpfError::Attach {
            name,
            target: "(program fd)".into(),
            source,
        })
}

/// Upgrade in place: load this binary's programs against the *pinned* maps (so every
/// registration, original destination and splice entry survives), swap each pinned link to
/// its new program with `BPF_LINK_UPDATE` (atomic: no connect sees no program), and attach the
/// new sk_msg to the sockhash (replacing the old one). Maps the new object adds are created
/// and pinned. On any failure nothing attached has changed, or the links that were updated
/// run new programs against the same maps; the error says which.
pub fn upgrade(dir: &Path, root: &Path, sockmap: bool, quotas: Quotas) -> Result<(), EbpfError> {
    let pinned: Vec<String> = fs::read_dir(dir)
        .map_err(|source| EbpfError::PinDir {
            path: dir.into(),
            source,
        })?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("link-"))
        .collect();
    let sockmap = u8::from(sockmap);
    let mut loader = EbpfLoader::new();
    quotas.apply(&mut loader);
    loader
        .override_global("SOCKMAP_ENABLED", &sockmap, true)
        .override_global(aya_log::LEVEL, &0u8, true);
    for name in &pinned {
        loader.map_pin_path(name.as_str(), dir.join(name));
    }
    let mut ebpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
    for (name, map) in ebpf.maps() {
        let path = dir.join(name);
        if name.starts_with('.') || path.exists() {
            continue;
        }
        map.pin(&path)
            .map_err(|source| EbpfError::Pin { path, source })?;
    }
    // Load (verify) every program before touching any link.
    let mut fds = Vec::new();
    let (pinned, missing): (Vec<&str>, Vec<&str>) = OPTIONAL_LINKS
        .into_iter()
        .partition(|name| dir.join(link_pin_name(name)).exists());
    for name in LINKS.into_iter().chain(pinned) {
        fds.push((name, program_fd(&mut ebpf, name)?));
    }
    attach_sk_msg(&mut ebpf)?;
    // Pins from a build without them: attached now, for the first time.
    for name in missing {
        attach_optional(&mut ebpf, name, dir, root)?;
    }
    for (name, fd) in fds {
        let path = dir.join(link_pin_name(name));
        let link = raw::obj_get(&path).map_err(|e| EbpfError::Attach {
            name,
            target: path.display().to_string(),
            source: io_program_error(e),
        })?;
        raw::link_update(link.as_fd(), fd.as_fd()).map_err(|e| EbpfError::Attach {
            name,
            target: path.display().to_string(),
            source: io_program_error(e),
        })?;
    }
    tracing::info!(pins = %dir.display(), "upgraded: the pinned links run this build's programs, maps kept");
    Ok(())
}

/// For `sidecar probe`: installs at a scratch cgroup and pin directory, then removes it all.
pub fn probe(cgroup: &Path, dir: &Path) -> Result<(), EbpfError> {
    install(dir, cgroup, true, Quotas::default())?;
    let (_, failed) = uninstall(dir);
    match failed.into_iter().next() {
        None => Ok(()),
        Some(f) => Err(EbpfError::PinDir {
            path: dir.into(),
            source: std::io::Error::other(f),
        }),
    }
}

/// Removes every pin in `dir` (links first, which detaches their programs once no process
/// holds them, then maps) and the directory. Returns what was removed and what failed.
pub fn uninstall(dir: &Path) -> (Vec<String>, Vec<String>) {
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    let Ok(entries) = fs::read_dir(dir) else {
        return (done, failed);
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    // Links before maps: detach first, so no program runs against a half-removed set.
    files.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link-"))
    });
    for file in files {
        match fs::remove_file(&file) {
            Ok(()) => done.push(format!("unpinned {}", file.display())),
            Err(e) => failed.push(format!("removing {}: {e}", file.display())),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => done.push(format!("removed {}", dir.display())),
        Err(e) => failed.push(format!("removing {}: {e}", dir.display())),
    }
    (done, failed)
}

fn io_program_error(e: std::io::Error) -> aya::programs::ProgramError {
    aya::programs::ProgramError::IOError(e)
}

/// The two BPF syscalls aya 0.14 does not offer for cgroup sockopt programs.
mod raw {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        },
        path::Path,
    };

    /// `enum bpf_attach_type` value (uapi/linux/bpf.h).
    pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_LINK_UPDATE: libc::c_long = 29;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 8]) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a zero-filled buffer larger than the fields each command reads.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr) as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// `BPF_LINK_CREATE` of a program on a cgroup (links are multi-attach).
    pub fn link_create(
        prog: BorrowedFd<'_>,
        cgroup: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<OwnedFd> {
        let mut attr = [0u64; 8];
        // prog_fd, target_fd | attach_type, flags
        attr[0] = u64::from(prog.as_raw_fd() as u32) | (u64::from(cgroup.as_raw_fd() as u32) << 32);
        attr[1] = u64::from(attach_type);
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new fd that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `BPF_LINK_UPDATE`: the link runs `prog` from now on (atomically).
    pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
        let mut attr = [0u64; 8];
        attr[0] = u64::from(link.as_raw_fd() as u32) | (u64::from(prog.as_raw_fd() as u32) << 32);
        bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
    }

    /// `BPF_OBJ_GET`: opens a pinned object.
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        let mut attr = [0u64; 8];
        attr[0] = c.as_ptr() as u64;
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: the kernel returned a new fd that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `BPF_OBJ_PIN` of a link (or any BPF object) at `path` on bpffs.
    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        let mut attr = [0u64; 8];
        attr[0] = c.as_ptr() as u64;
        attr[1] = u64::from(fd.as_raw_fd() as u32);
        bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
    }
}
