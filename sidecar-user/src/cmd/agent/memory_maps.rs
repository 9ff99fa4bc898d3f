//! [`PodMaps`] in memory, for the registry's tests and the agent's fuzz target: what the
//! kernel maps would hold. They behave as the kernel's do where the registry could tell the
//! difference: a trie key is its prefix (bits past it do not count), a full trie refuses
//! every update (kernels before 6.14 even the update of a key it holds), a full hash map
//! refuses new keys. An insert can be made to fail, to drive the registry's error paths.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

use sidecar_common::{CircuitKey, PolicyState, PortBitmap, WorkloadConfig, limits};

use super::pod_maps::{CidrKey, MapError, PodMaps, Trie};
use crate::policy::kernel::{KernelPolicyError, PolicyMaps, PolicyTrie, SlotKey};

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
    /// `POLICY_STATE`, `POLICY_OUT` and `POLICY_PROXIED` (`None`: pins without them).
    pub policy: Option<MemoryPolicyMaps>,
    /// `OPEN_CIRCUITS`.
    pub circuits: BTreeSet<CircuitKey>,
    /// The scopes with an entry in `SCOPE_COUNTERS` (their counts stay 0 here).
    pub counted: BTreeSet<u32>,
    /// The insert this many inserts from now fails (once).
    pub fail_insert_in: Option<u32>,
}

/// A policy trie's entries by (prefix length, slot scope, address).
type PolicyEntries = BTreeMap<(u32, [u8; 4], [u8; 16]), Box<PortBitmap>>;

/// The policy maps in memory: a full trie refuses new keys, as the kernel's does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPolicyMaps {
    pub states: BTreeMap<u32, PolicyState>,
    pub denied: PolicyEntries,
    pub proxied: PolicyEntries,
    pub capacity: u32,
    /// Entries a trie takes before it refuses new keys, as if other pods held the rest of
    /// its capacity (`None`: the capacity).
    pub room: Option<u32>,
}

impl Default for MemoryPolicyMaps {
    fn default() -> Self {
        Self {
            states: BTreeMap::new(),
            denied: BTreeMap::new(),
            proxied: BTreeMap::new(),
            capacity: limits::POLICY_OUT,
            room: None,
        }
    }
}

impl MemoryPolicyMaps {
    fn trie(&self, trie: PolicyTrie) -> &PolicyEntries {
        match trie {
            PolicyTrie::Denied => &self.denied,
            PolicyTrie::Proxied => &self.proxied,
        }
    }

    /// Whether the maps hold anything of workload `scope`: its state, or a key in either
    /// slot of either trie.
    pub fn holds_scope(&self, scope: u32) -> bool {
        self.states.contains_key(&scope)
            || [&self.denied, &self.proxied]
                .iter()
                .flat_map(|t| t.keys())
                .any(|(_, s, _)| u32::from_be_bytes(*s) / 2 == scope)
    }
}

impl PolicyMaps for MemoryPolicyMaps {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn state(&self, scope: u32) -> Option<PolicyState> {
        self.states.get(&scope).copied()
    }

    fn scopes(&self) -> Vec<u32> {
        self.states.keys().copied().collect()
    }

    fn set_state(&mut self, scope: u32, state: PolicyState) -> Result<(), KernelPolicyError> {
        self.states.insert(scope, state);
        Ok(())
    }

    fn remove_state(&mut self, scope: u32) {
        self.states.remove(&scope);
    }

    fn keys(&self, trie: PolicyTrie) -> Vec<SlotKey> {
        self.trie(trie)
            .keys()
            .map(|(len, scope, addr)| SlotKey {
                prefix_len: *len,
                data: sidecar_common::ScopedAddr {
                    scope: *scope,
                    addr: *addr,
                },
            })
            .collect()
    }

    fn insert(
        &mut self,
        trie: PolicyTrie,
        key: &SlotKey,
        ports: &PortBitmap,
    ) -> Result<(), KernelPolicyError> {
        let capacity = self.room.unwrap_or(self.capacity) as usize;
        let entries = match trie {
            PolicyTrie::Denied => &mut self.denied,
            PolicyTrie::Proxied => &mut self.proxied,
        };
        let id = (key.prefix_len, key.data.scope, key.data.addr);
        if entries.len() >= capacity && !entries.contains_key(&id) {
            return Err(KernelPolicyError::Map {
                name: trie.map_name(),
                source: Box::new(io::Error::from_raw_os_error(libc::ENOSPC)),
            });
        }
        entries.insert(id, Box::new(*ports));
        Ok(())
    }

    fn remove(&mut self, trie: PolicyTrie, key: &SlotKey) {
        let id = (key.prefix_len, key.data.scope, key.data.addr);
        match trie {
            PolicyTrie::Denied => self.denied.remove(&id),
            PolicyTrie::Proxied => self.proxied.remove(&id),
        };
    }
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
            policy: Some(MemoryPolicyMaps::default()),
            circuits: BTreeSet::new(),
            counted: BTreeSet::new(),
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

    fn strict_capable(&self) -> bool {
        true
    }

    fn policy(&mut self) -> Option<&mut dyn PolicyMaps> {
        self.policy.as_mut().map(|p| p as &mut dyn PolicyMaps)
    }

    fn policy_ref(&self) -> Option<&dyn PolicyMaps> {
        self.policy.as_ref().map(|p| p as &dyn PolicyMaps)
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

    fn counted_scopes(&self) -> Option<Vec<u32>> {
        Some(self.counted.iter().copied().collect())
    }

    fn add_counters(&mut self, scope: u32) -> Result<(), MapError> {
        self.counted.insert(scope);
        Ok(())
    }

    fn remove_counters(&mut self, scope: u32) -> Result<(), MapError> {
        self.counted.remove(&scope);
        Ok(())
    }

    fn counters_of(&self, scope: u32) -> Option<BTreeMap<&'static str, u64>> {
        self.counted.contains(&scope).then(|| {
            sidecar_common::Counter::PER_WORKLOAD
                .iter()
                .map(|c| (c.name(), 0))
                .collect()
        })
    }

    fn circuits(&self) -> Option<Vec<CircuitKey>> {
        Some(self.circuits.iter().copied().collect())
    }

    fn insert_circuit(&mut self, key: &CircuitKey) -> Result<(), MapError> {
        let full =
            self.circuits.len() >= limits::OPEN_CIRCUITS as usize && !self.circuits.contains(key);
        if self.insert_fails() || full {
            return Err(error("OPEN_CIRCUITS", libc::E2BIG));
        }
        self.circuits.insert(*key);
        Ok(())
    }

    fn remove_circuit(&mut self, key: &CircuitKey) -> Result<(), MapError> {
        self.circuits.remove(key);
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
