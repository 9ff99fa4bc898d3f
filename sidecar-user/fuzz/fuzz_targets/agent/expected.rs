//! What the kernel maps must hold for a set of registrations, worked out from the
//! registrations' fields alone (not by the registry's own functions), so the fuzz target
//! checks the registry against an account of its own.

use std::collections::{BTreeMap, BTreeSet};

use sidecar_common::{ScopedAddr, WorkloadConfig, flags, limits, role};

use super::{
    memory_maps::{MemoryMaps, MemoryPolicyMaps},
    pod_maps::CidrKey,
    registry::Registration,
};
use crate::cidr::Cidr;

/// A trie entry as the kernel tells entries apart: prefix length, scope, masked address.
pub type Entry = (u32, [u8; 4], [u8; 16]);

/// The maps' contents, without the pending failure, and of the policy maps only what is in
/// force (the slot a scope does not use keeps an older policy until the next install).
pub fn contents(maps: &MemoryMaps) -> MemoryMaps {
    MemoryMaps {
        fail_insert_in: None,
        policy: maps.policy.as_ref().map(in_force),
        ..maps.clone()
    }
}

/// The policy maps' states and the keys of each scope's live slot.
fn in_force(p: &MemoryPolicyMaps) -> MemoryPolicyMaps {
    let live = |k: &(u32, [u8; 4], [u8; 16])| {
        let slot_scope = u32::from_be_bytes(k.1);
        p.states
            .get(&(slot_scope / 2))
            .is_some_and(|s| s.slot == slot_scope % 2)
    };
    MemoryPolicyMaps {
        denied: p
            .denied
            .iter()
            .filter(|(k, _)| live(k))
            .map(|(k, v)| (*k, v.clone()))
            .collect(),
        proxied: p
            .proxied
            .iter()
            .filter(|(k, _)| live(k))
            .map(|(k, v)| (*k, v.clone()))
            .collect(),
        ..p.clone()
    }
}

/// The workload scopes with any entry in the policy maps.
pub fn policy_scopes(p: &MemoryPolicyMaps) -> BTreeSet<u32> {
    let keys = p.denied.keys().chain(p.proxied.keys());
    keys.map(|k| u32::from_be_bytes(k.1) / 2)
        .chain(p.states.keys().copied())
        .collect()
}

/// What the maps must hold for `pods`, worked out here from the registrations' fields.
pub fn implied(pods: &BTreeMap<String, Registration>, shape: &MemoryMaps) -> MemoryMaps {
    let mut maps = MemoryMaps {
        workloads: BTreeMap::new(),
        caps: shape.caps.as_ref().map(|_| BTreeMap::new()),
        excluded: BTreeMap::new(),
        meshed: shape.meshed.as_ref().map(|_| BTreeMap::new()),
        // Every registered pod has counters of its own, and nothing else does.
        counted: pods.values().map(|r| r.scope).collect(),
        ..contents(shape)
    };
    for r in pods.values() {
        let mut ports = [0; limits::EXCLUDED_PORTS];
        ports[..r.exclude_ports.len()].copy_from_slice(&r.exclude_ports);
        let workload = WorkloadConfig {
            role: role::WORKLOAD,
            scope: r.scope,
            proxy_port: r.proxy_port,
            flags: (if r.ipv6 { flags::IPV6_LISTENER } else { 0 })
                | (if r.allow_metadata {
                    0
                } else {
                    flags::DENY_METADATA
                })
                | (if r.passthrough { flags::PASSTHROUGH } else { 0 })
                | (if r.strict_inbound {
                    flags::STRICT_INBOUND
                } else {
                    0
                }),
            excluded_ports_len: r.exclude_ports.len() as u32,
            excluded_ports: ports,
        };
        maps.workloads.insert(r.pod_cgroup_id, workload);
        let proxy = WorkloadConfig {
            role: role::PROXY,
            ..workload
        };
        maps.workloads.insert(r.proxy_cgroup_id, proxy);
        if let (Some(caps), Some(cap)) = (&mut maps.caps, r.passthrough_cap) {
            caps.insert(r.scope, cap);
        }
        for c in &r.exclude_cidrs {
            let key = trie_key(r.scope, c);
            maps.excluded.insert(key, key_of(key));
        }
        if let Some(meshed) = &mut maps.meshed {
            for c in &r.mesh_cidrs {
                let key = trie_key(r.scope, c);
                meshed.insert(key, key_of(key));
            }
        }
    }
    maps
}

/// The kernel trie's identity of a CIDR under a scope: prefix length, scope, the address's
/// bits up to the prefix.
fn trie_key(scope: u32, cidr: &str) -> Entry {
    let c: Cidr = cidr.parse().expect("registrations hold parsed CIDRs");
    let (addr, bits) = match c.addr {
        std::net::IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + u32::from(c.prefix)),
        std::net::IpAddr::V6(v6) => (v6, u32::from(c.prefix)),
    };
    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
    let masked = u128::from_be_bytes(addr.octets()) & mask;
    (32 + bits, scope.to_be_bytes(), masked.to_be_bytes())
}

fn key_of((prefix_len, scope, addr): Entry) -> CidrKey {
    CidrKey {
        prefix_len,
        data: ScopedAddr { scope, addr },
    }
}

/// The trie keys with `scope`: the excluded ones, then the meshed ones.
pub fn keys_of_scope(maps: &MemoryMaps, scope: u32) -> Vec<Entry> {
    let mine = |k: &&Entry| k.1 == scope.to_be_bytes();
    let meshed = maps.meshed.iter().flat_map(|m| m.keys());
    maps.excluded
        .keys()
        .chain(meshed)
        .filter(mine)
        .copied()
        .collect()
}
