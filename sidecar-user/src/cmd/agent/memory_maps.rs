//! [`PodMaps`] in memory, for the registry's tests and the agent's fuzz target: what the
//! kernel maps would hold. They behave as the kernel's do where the registry could tell the
//! difference: a trie key is its prefix (bits past it do not count), a full trie refuses
//! every update (kernels before 6.14 even the update of a key it holds), a full hash map
//! refuses new keys. An insert can be made to fail, to drive the registry's error paths.

use std::{collections::BTreeMap, io};

use sidecar_common::{WorkloadConfig, limits};

use super::pod_maps::{CidrKey, MapError, PodMaps, Trie};

/// Trie entries by (prefix length, scope, masked address).
type TrieEntries = BTreeMap<(u32, [u8; 4], [u8; 16]), CidrKey>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMaps {
    pub workloads: BTreeMap<u64, WorkloadConfig>,
    pub caps: Option<BTreeMap<u32, u32>>,
    pub excluded: TrieEntries,
    pub meshed: Option<TrieEntries>,
    pub excluded_capacity: u32,
    pub meshed_capacity: u32,
    pub passthrough_capable: bool,
    /// The insert this many inserts from now fails (once).
    pub fail_insert_in: Option<u32>,
}

impl Default for MemoryMaps {
    /// The maps of this build's pins.
    fn default() -> Self {
        Self {
            workloads: BTreeMap::new(),
            caps: Some(BTreeMap::new()),
            excluded: BTreeMap::new(),
            meshed: Some(BTreeMap::new()),
            excluded_capacity: limits::EXCLUDED_CIDRS,
            meshed_capacity: limits::MESH_CIDRS,
            passthrough_capable: true,
            fail_insert_in: None,
        }
    }
}

impl MemoryMaps {
    /// Counts an insert down to the one that is to fail.
    fn insert_fails(&mut self) -> bool {
        match self.fail_insert_in {
            Some(0) => {
                self.fail_insert_in = None;
                true
            }
            Some(n) => {
                self.fail_insert_in = Some(n - 1);
                false
            }
            None => false,
        }
    }

    fn trie(&self, trie: Trie) -> Option<&TrieEntries> {
        match trie {
            Trie::Excluded => Some(&self.excluded),
            Trie::Meshed => self.meshed.as_ref(),
        }
    }

    fn trie_mut(&mut self, trie: Trie) -> Option<(&mut TrieEntries, u32, &'static str)> {
        match trie {
            Trie::Excluded => Some((&mut self.excluded, self.excluded_capacity, "EXCLUDED_CIDRS")),
            Trie::Meshed => self
                .meshed
                .as_mut()
                .map(|m| (m, self.meshed_capacity, "MESH_CIDRS")),
        }
    }
}

fn error(map: &'static str, errno: i32) -> MapError {
    MapError {
        map,
        source: Box::new(io::Error::from_raw_os_error(errno)),
    }
}

/// The kernel's identity of a trie key: its prefix length and the bits up to it (worked out
/// here, apart from [`CidrKey::new`], so the registry's masking is checked, not assumed).
fn entry_of(key: &CidrKey) -> (u32, [u8; 4], [u8; 16]) {
    let addr_bits = key.prefix_len.saturating_sub(32).min(128);
    let mask = u128::MAX.checked_shl(128 - addr_bits).unwrap_or(0);
    let addr = u128::from_be_bytes(key.data.addr) & mask;
    (key.prefix_len, key.data.scope, addr.to_be_bytes())
}

impl PodMaps for MemoryMaps {
    fn excluded_capacity(&self) -> u32 {
        self.excluded_capacity
    }

    fn meshed_capacity(&self) -> Option<u32> {
        self.meshed.as_ref().map(|_| self.meshed_capacity)
    }

    fn passthrough_capable(&self) -> bool {
        self.passthrough_capable
    }

    fn workloads(&self) -> Vec<(u64, WorkloadConfig)> {
        self.workloads.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn insert_workload(&mut self, cgroup_id: u64, config: &WorkloadConfig) -> Result<(), MapError> {
        let full = self.workloads.len() >= limits::WORKLOADS as usize
            && !self.workloads.contains_key(&cgroup_id);
        if self.insert_fails() || full {
            return Err(error("WORKLOADS", libc::E2BIG));
        }
        self.workloads.insert(cgroup_id, *config);
        Ok(())
    }

    fn remove_workload(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        self.workloads.remove(&cgroup_id);
        Ok(())
    }

    fn caps(&self) -> Option<Vec<(u32, u32)>> {
        let caps = self.caps.as_ref()?;
        Some(caps.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn insert_cap(&mut self, scope: u32, cap: u32) -> Result<(), MapError> {
        if self.caps.is_none() {
            return Ok(());
        }
        if self.insert_fails() {
            return Err(error("DIRECT_CAPS", libc::E2BIG));
        }
        if let Some(caps) = &mut self.caps {
            caps.insert(scope, cap);
        }
        Ok(())
    }

    fn remove_cap(&mut self, scope: u32) -> Result<(), MapError> {
        if let Some(caps) = &mut self.caps {
            caps.remove(&scope);
        }
        Ok(())
    }

    fn cidrs(&self, trie: Trie) -> Option<Vec<CidrKey>> {
        Some(self.trie(trie)?.values().copied().collect())
    }

    fn insert_cidr(&mut self, trie: Trie, key: &CidrKey) -> Result<(), MapError> {
        if self.trie(trie).is_none() {
            return Ok(());
        }
        let fails = self.insert_fails();
        let Some((entries, capacity, name)) = self.trie_mut(trie) else {
            return Ok(());
        };
        if fails || entries.len() >= capacity as usize {
            return Err(error(name, libc::ENOSPC));
        }
        // The kernel keeps the address as written, bits past the prefix included.
        entries.insert(entry_of(key), *key);
        Ok(())
    }

    fn remove_cidr(&mut self, trie: Trie, key: &CidrKey) -> Result<(), MapError> {
        if let Some((entries, _, _)) = self.trie_mut(trie) {
            entries.remove(&entry_of(key));
        }
        Ok(())
    }
}
