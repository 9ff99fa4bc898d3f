//! The kernel maps the [`registry`](super::registry) keeps in step with its registrations,
//! as the few operations it needs: list, insert and remove entries of `WORKLOADS`,
//! `DIRECT_CAPS`, `OPEN_CIRCUITS` and the two per-pod CIDR tries, and the policy maps
//! ([`PolicyMaps`]). The agent's pinned maps implement it
//! ([`AgentPins`](super::pins::AgentPins)); the registry's tests and the agent's fuzz target
//! use maps in memory (`memory_maps.rs`), so the registry's bookkeeping is checked without a
//! kernel.

#[cfg(doc)]
use sidecar_common::Counter;
use sidecar_common::{CircuitKey, ScopedAddr, WorkloadConfig};

use crate::policy::kernel::PolicyMaps;

/// The per-pod CIDR tries, keyed by [`CidrKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trie {
    /// `EXCLUDED_CIDRS`: destinations that bypass the proxy.
    Excluded,
    /// `MESH_CIDRS`: destinations with sidecars (absent from pins of builds without kernel
    /// pass-through).
    Meshed,
}

impl Trie {
    pub const ALL: [Trie; 2] = [Trie::Excluded, Trie::Meshed];
}

/// A key of a per-pod CIDR trie: the pod's scope and a destination prefix, as the kernel's
/// LPM trie takes them. The address bits past the prefix are cleared: the trie ignores them
/// (two keys that differ only there are one entry), so the registry must too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrKey {
    /// Bits of `data` that count: 32 of scope, then the address's.
    pub prefix_len: u32,
    pub data: ScopedAddr,
}

impl CidrKey {
    pub fn new(prefix_len: u32, data: ScopedAddr) -> Self {
        let mut addr = data.addr;
        let addr_bits = prefix_len.saturating_sub(32) as usize;
        for (i, byte) in addr.iter_mut().enumerate() {
            let kept = addr_bits.saturating_sub(i * 8).min(8);
            *byte &= !(0xffu8.checked_shr(kept as u32).unwrap_or(0));
        }
        Self {
            prefix_len,
            data: ScopedAddr { addr, ..data },
        }
    }
}

/// A kernel map refused an update.
#[derive(Debug, thiserror::Error)]
#[error("{map}: {source}")]
pub struct MapError {
    pub map: &'static str,
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// What the registry reads and writes. A map the pins do not have (`MESH_CIDRS`,
/// `DIRECT_CAPS` of an older build) lists as `None` and takes every write as a no-op.
/// Removing an entry that is not there succeeds.
pub trait PodMaps {
    /// Entries `EXCLUDED_CIDRS` holds.
    fn excluded_capacity(&self) -> u32;
    /// Entries `MESH_CIDRS` holds (`None`: the pins have no such trie).
    fn meshed_capacity(&self) -> Option<u32>;
    /// Entries the smaller of the two CIDR tries holds: each pod's quota is its share of both
    /// (see [`cidr_quota`](super::registry::cidr_quota)).
    fn cidr_capacity(&self) -> u32 {
        let excluded = self.excluded_capacity();
        self.meshed_capacity()
            .map_or(excluded, |meshed| excluded.min(meshed))
    }
    /// Whether the programs can pass connections through (see
    /// [`AgentPins::passthrough_capable`](super::pins::AgentPins::passthrough_capable)).
    fn passthrough_capable(&self) -> bool;
    /// Whether the strict inbound program is attached at the pods' root (pins of an older
    /// build may lack it until their upgrade).
    fn strict_capable(&self) -> bool;

    /// `POLICY_STATE` and the two policy tries, where pods' policies are installed (`None`:
    /// pins without them, where a pod with a policy is refused).
    fn policy(&mut self) -> Option<&mut dyn PolicyMaps>;
    fn policy_ref(&self) -> Option<&dyn PolicyMaps>;

    /// `WORKLOADS`: cgroup id → the configuration of the pod or proxy in that cgroup.
    fn workloads(&self) -> Vec<(u64, WorkloadConfig)>;
    fn insert_workload(&mut self, cgroup_id: u64, config: &WorkloadConfig) -> Result<(), MapError>;
    fn remove_workload(&mut self, cgroup_id: u64) -> Result<(), MapError>;

    /// `DIRECT_CAPS`: scope → the pod's cap on pass-through connections per destination.
    fn caps(&self) -> Option<Vec<(u32, u32)>>;
    fn insert_cap(&mut self, scope: u32, cap: u32) -> Result<(), MapError>;
    fn remove_cap(&mut self, scope: u32) -> Result<(), MapError>;

    /// `OPEN_CIRCUITS`: a pod's destinations whose connects are refused while their
    /// circuit is open (`None`: pins without the map).
    fn circuits(&self) -> Option<Vec<CircuitKey>>;
    fn insert_circuit(&mut self, key: &CircuitKey) -> Result<(), MapError>;
    fn remove_circuit(&mut self, key: &CircuitKey) -> Result<(), MapError>;

    /// `SCOPE_COUNTERS`: the scopes with their own counters (`None`: pins without the map).
    fn counted_scopes(&self) -> Option<Vec<u32>>;
    /// Gives `scope` its own counters, zero, unless it has them (a restarted agent's pods
    /// keep theirs).
    fn add_counters(&mut self, scope: u32) -> Result<(), MapError>;
    fn remove_counters(&mut self, scope: u32) -> Result<(), MapError>;
    /// `scope`'s own counters, summed over CPUs, by name ([`Counter::PER_WORKLOAD`]).
    fn counters_of(&self, scope: u32) -> Option<std::collections::BTreeMap<&'static str, u64>>;
    /// `SCOPE_USAGE`: forgets what a pod that is gone held of the pass-through tables (the
    /// kernel makes the entry; its closes after this find none and change nothing).
    fn remove_usage(&mut self, _scope: u32) -> Result<(), MapError> {
        Ok(())
    }
    /// The scopes `SCOPE_USAGE` has entries for.
    fn usage_scopes(&self) -> Vec<u32> {
        Vec::new()
    }

    fn cidrs(&self, trie: Trie) -> Option<Vec<CidrKey>>;
    fn insert_cidr(&mut self, trie: Trie, key: &CidrKey) -> Result<(), MapError>;
    fn remove_cidr(&mut self, trie: Trie, key: &CidrKey) -> Result<(), MapError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_its_prefix() {
        let key = |bits, addr: [u8; 16]| CidrKey::new(bits, ScopedAddr::new(7, addr));
        let mut a = [0u8; 16];
        a[10..].copy_from_slice(&[0xff, 0xff, 10, 1, 2, 3]);
        let mut b = a;
        b[15] = 9;
        // 10.1.2.3/8 and 10.1.2.9/8 are 10.0.0.0/8.
        assert_eq!(key(32 + 96 + 8, a), key(32 + 96 + 8, b));
        assert_eq!(key(32 + 96 + 8, a).data.addr[12..], [10, 0, 0, 0]);
        assert_ne!(key(32 + 128, a), key(32 + 128, b));
        assert_eq!(key(32 + 96 + 12, a).data.addr[12..], [10, 0, 0, 0]);
        assert_eq!(key(32 + 96 + 15, a).data.addr[12..], [10, 0, 0, 0]);
        assert_eq!(key(32 + 96 + 16, a).data.addr[12..], [10, 1, 0, 0]);
        assert_eq!(key(32, a).data.addr, [0; 16]);
        assert_eq!(key(32, a).data.scope, 7u32.to_be_bytes());
    }
}
