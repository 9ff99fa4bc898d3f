//! Looking at the kernel side of a live run through its pins, and at the programs loaded on
//! the host (to prove none of a run's programs outlive it).

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    sync::OnceLock,
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, Map, MapData, MapInfo, PerCpuArray, SockHash},
    programs::{ProgramError, loaded_programs},
};
use sidecar_common::{CircuitKey, Counter, OrigDst, SockKey, maps, programs};

use crate::{host, report::Counters};

/// Upper bound on keys read from one map: the largest of our maps holds 131 072 entries,
/// and iterating a map that changes underneath can revisit keys, so stop somewhere.
const MAX_KEYS: usize = 300_000;

/// Opens a map pinned by run `pid` under its name.
pub fn pinned_map(pid: u32, name: &str) -> Result<Map> {
    let path = host::pin_dir(pid).join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("unsupported map type at {}", path.display()))
}

/// Whether run `pid` pinned a map called `name`.
pub fn is_pinned(pid: u32, name: &str) -> bool {
    host::pin_dir(pid).join(name).exists()
}

/// Keys of the `SOCKETS` sockhash: the 4-tuples of the sockets currently spliced.
pub fn sockets_keys(pid: u32) -> Result<Vec<SockKey>> {
    let map: SockHash<MapData, SockKey> = pinned_map(pid, maps::SOCKETS)?.try_into()?;
    map.keys()
        .take(MAX_KEYS)
        .collect::<Result<_, _>>()
        .context("iterating SOCKETS")
}

pub fn sockets_count(pid: u32) -> Result<usize> {
    Ok(sockets_keys(pid)?.len())
}

/// `DIRECT_COUNTS`: open pass-through connections by destination (and workload scope).
pub fn direct_counts(pid: u32) -> Result<Vec<(std::net::SocketAddr, u64)>> {
    let map: HashMap<MapData, CircuitKey, u64> =
        pinned_map(pid, maps::DIRECT_COUNTS)?.try_into()?;
    map.iter()
        .take(MAX_KEYS)
        .map(|e| e.map(|(k, n)| (k.dst.to_socket_addr(), n)))
        .collect::<Result<_, _>>()
        .context("iterating DIRECT_COUNTS")
}

/// Entries of `SPLICED` (both ends of every splice, by 4-tuple).
pub fn spliced_count(pid: u32) -> Result<usize> {
    let map: HashMap<MapData, SockKey, u32> = pinned_map(pid, maps::SPLICED)?.try_into()?;
    Ok(map
        .keys()
        .take(MAX_KEYS)
        .collect::<Result<Vec<_>, _>>()
        .context("iterating SPLICED")?
        .len())
}

/// Entries of `ORIG_DST`: application 4-tuple → original destination.
pub fn orig_dst_entries(pid: u32) -> Result<Vec<(SockKey, OrigDst)>> {
    let map: HashMap<MapData, SockKey, OrigDst> = pinned_map(pid, maps::ORIG_DST)?.try_into()?;
    map.iter()
        .take(MAX_KEYS)
        .collect::<Result<_, _>>()
        .context("iterating ORIG_DST")
}

pub fn orig_dst_count(pid: u32) -> Result<usize> {
    Ok(orig_dst_entries(pid)?.len())
}

/// The `COUNTERS` per-CPU array summed over CPUs, under the report's names.
pub fn live_counters(pid: u32) -> Result<Counters> {
    let map: PerCpuArray<MapData, u64> = pinned_map(pid, maps::COUNTERS)?.try_into()?;
    let mut counters = BTreeMap::new();
    for (counter, name) in Counter::ALL {
        let per_cpu = map
            .get(&(counter as u32), 0)
            .with_context(|| format!("reading {name}"))?;
        counters.insert(name.to_string(), per_cpu.iter().sum());
    }
    Ok(Counters(counters))
}

// ---------------------------------------------------------------------------------------
// Loaded programs

/// A loaded program whose (possibly truncated) name is one of ours.
#[derive(Debug, Clone)]
pub struct LoadedProgram {
    pub id: u32,
    pub name: String,
    pub map_ids: Vec<u32>,
}

/// Kernel program names are cut to 15 bytes (`sidecar_connect4` shows as `sidecar_connect`),
/// so a name matches when it is a prefix of one of ours at least as long as the kernel keeps.
fn is_sidecar_program_name(name: &str) -> bool {
    const KERNEL_NAME_MAX: usize = 15;
    !name.is_empty()
        && programs::ALL
            .iter()
            .any(|full| full.starts_with(name) && name.len() >= full.len().min(KERNEL_NAME_MAX))
}

/// Every loaded program named like one of ours.
pub fn sidecar_programs() -> Result<Vec<LoadedProgram>> {
    let mut found = Vec::new();
    for info in loaded_programs() {
        let info = match info {
            Ok(info) => info,
            // A program unloaded between "next id" and "get fd" is not an error.
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("listing loaded BPF programs"),
        };
        let name = String::from_utf8_lossy(info.name()).into_owned();
        if is_sidecar_program_name(&name) {
            let map_ids = info.map_ids().ok().flatten().unwrap_or_default();
            found.push(LoadedProgram {
                id: info.id(),
                name,
                map_ids,
            });
        }
    }
    Ok(found)
}

/// Ids of our programs that were already loaded when the tests started (e.g. a sidecar
/// someone runs by hand). Recorded once; leftover checks ignore them, since no run of
/// this test binary can have created them.
pub fn baseline_program_ids() -> &'static HashSet<u32> {
    static BASELINE: OnceLock<HashSet<u32>> = OnceLock::new();
    BASELINE.get_or_init(|| {
        let ids: HashSet<u32> = sidecar_programs()
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.id)
            .collect();
        if !ids.is_empty() {
            eprintln!(
                "note: {} sidecar BPF program(s) were loaded before the tests started (ids \
                 {ids:?}); leftover checks ignore them",
                ids.len()
            );
        }
        ids
    })
}

/// Map ids pinned by runs other than `pid` (live or crashed): programs using one of those
/// maps belong to that other run, not to `pid`.
fn other_runs_map_ids(pid: u32) -> HashSet<u32> {
    let ours = format!("run-{pid}");
    let mut ids = HashSet::new();
    let Ok(runs) = fs::read_dir(host::pin_dir(pid).parent().expect("pin dir has a parent")) else {
        return ids;
    };
    for run in runs.flatten() {
        if run.file_name() == ours.as_str() {
            continue;
        }
        for pin in fs::read_dir(run.path()).into_iter().flatten().flatten() {
            // Link pins are not maps: from_pin fails on them and they are skipped.
            if let Ok(info) = MapInfo::from_pin(pin.path()) {
                ids.insert(info.id());
            }
        }
    }
    ids
}

/// Our programs still loaded that can belong to run `pid`: not in the baseline, and not
/// using a map of another run.
pub fn leftover_programs(pid: u32) -> Result<Vec<LoadedProgram>> {
    let baseline = baseline_program_ids();
    let others = other_runs_map_ids(pid);
    Ok(sidecar_programs()?
        .into_iter()
        .filter(|p| !baseline.contains(&p.id))
        .filter(|p| !p.map_ids.iter().any(|m| others.contains(m)))
        .collect())
}
