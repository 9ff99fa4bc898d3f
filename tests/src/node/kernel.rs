//! What the kernel holds for the simulated node: the agent's pinned maps, cgroup ids, and
//! the cgroup tree the node tears down.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use sidecar_common::{ScopeUsage, WorkloadConfig};

use super::Node;
use crate::host::wait_until;

impl Node {
    /// The pinned `WORKLOADS` map: cgroup id → configuration.
    pub fn workloads(&self) -> BTreeMap<u64, WorkloadConfig> {
        let data = MapData::from_pin(self.pin_dir.join("WORKLOADS")).expect("pinned WORKLOADS");
        let map: BpfHashMap<MapData, u64, WorkloadConfig> = aya::maps::Map::HashMap(data)
            .try_into()
            .expect("WORKLOADS is a hash map");
        map.iter().map(|r| r.expect("WORKLOADS entry")).collect()
    }

    /// `DIRECT_CAPS`: pods' caps on pass-through connections per destination, by scope.
    pub fn direct_caps(&self) -> BTreeMap<u32, u32> {
        let data = MapData::from_pin(self.pin_dir.join("DIRECT_CAPS")).expect("pinned DIRECT_CAPS");
        let map: BpfHashMap<MapData, u32, u32> = aya::maps::Map::HashMap(data)
            .try_into()
            .expect("DIRECT_CAPS is a hash map");
        map.iter().map(|r| r.expect("DIRECT_CAPS entry")).collect()
    }

    /// `OPEN_CIRCUITS`: the destinations each pod's connects are refused for, by scope.
    pub fn open_circuits(&self) -> Vec<(u32, std::net::SocketAddr)> {
        let data =
            MapData::from_pin(self.pin_dir.join("OPEN_CIRCUITS")).expect("pinned OPEN_CIRCUITS");
        let map: BpfHashMap<MapData, sidecar_common::CircuitKey, u8> =
            aya::maps::Map::HashMap(data)
                .try_into()
                .expect("OPEN_CIRCUITS is a hash map");
        map.keys()
            .map(|k| k.expect("OPEN_CIRCUITS key"))
            .map(|k| (k.scope, k.dst.to_socket_addr()))
            .collect()
    }

    /// `SCOPE_USAGE`: what each pod scope holds of the pass-through tables.
    pub fn scope_usage(&self) -> BTreeMap<u32, ScopeUsage> {
        let data = MapData::from_pin(self.pin_dir.join("SCOPE_USAGE")).expect("pinned SCOPE_USAGE");
        let map: BpfHashMap<MapData, u32, ScopeUsage> = aya::maps::Map::HashMap(data)
            .try_into()
            .expect("SCOPE_USAGE is a hash map");
        map.iter().map(|r| r.expect("SCOPE_USAGE entry")).collect()
    }
}

/// Entries in the pinned `EXCLUDED_CIDRS` trie.
pub fn excluded_cidrs(node: &Node) -> usize {
    let data = MapData::from_pin(node.pin_dir.join("EXCLUDED_CIDRS")).expect("pinned trie");
    let trie: aya::maps::LpmTrie<MapData, sidecar_common::ScopedAddr, u8> =
        aya::maps::Map::LpmTrie(data)
            .try_into()
            .expect("an LPM trie");
    trie.keys().filter_map(Result::ok).count()
}

/// What the pinned policy maps hold: the scopes with a `POLICY_STATE` entry, and the
/// `POLICY_OUT` and `POLICY_PROXIED` keys by the workload scope they belong to (each key's
/// scope is `workload scope * 2 + slot`).
pub fn policy_entries(node: &Node) -> (Vec<u32>, BTreeMap<u32, usize>) {
    let data = MapData::from_pin(node.pin_dir.join("POLICY_STATE")).expect("pinned POLICY_STATE");
    let state: BpfHashMap<MapData, u32, sidecar_common::PolicyState> =
        aya::maps::Map::HashMap(data)
            .try_into()
            .expect("POLICY_STATE is a hash map");
    let scopes = state.keys().filter_map(Result::ok).collect();
    let mut keys = BTreeMap::new();
    for name in ["POLICY_OUT", "POLICY_PROXIED"] {
        let data = MapData::from_pin(node.pin_dir.join(name)).expect("pinned policy trie");
        let trie: aya::maps::LpmTrie<
            MapData,
            sidecar_common::ScopedAddr,
            sidecar_common::PortBitmap,
        > = aya::maps::Map::LpmTrie(data)
            .try_into()
            .expect("an LPM trie");
        for k in trie.keys().filter_map(Result::ok) {
            *keys
                .entry(u32::from_be_bytes(k.data().scope) / 2)
                .or_default() += 1;
        }
    }
    (scopes, keys)
}

/// The id the kernel (and so the agent's maps) knows a cgroup by: its inode number.
pub fn host_cgroup_id(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("cgroup").ino()
}

/// Directories of a cgroup tree, parents before children.
pub fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    if !path.is_dir() {
        return;
    }
    out.push(path.into());
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// rmdir with a short retry (a cgroup stays busy for a moment after its last process), as
/// kubelet removes a pod's cgroups; true once it is gone.
pub fn rmdir_retrying(path: &Path) -> bool {
    wait_until(Duration::from_secs(2), || {
        fs::remove_dir(path).is_ok() || !path.exists()
    })
}
