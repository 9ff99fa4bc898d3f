//! The policy maps as pinned in bpffs: [`PinnedPolicyMaps`] implements
//! [`PolicyMaps`](super::kernel::PolicyMaps) on them (`sidecar run` opens them for its one
//! workload, the node agent for every pod), and [`DenyEvents`] reads the connects the hooks
//! refused.

use std::path::Path;

use aya::maps::{HashMap, LpmTrie, MapData, RingBuf, lpm_trie::Key};
use sidecar_common::{PolicyDenyEvent, PolicyState, PortBitmap, ScopedAddr, ip_from_words, maps};

use super::kernel::{Compiled, KernelPolicyError, PolicyMaps, PolicySlots, PolicyTrie, SlotKey};

/// `POLICY_STATE`, `POLICY_OUT` and `POLICY_PROXIED`, opened from their pins.
pub struct PinnedPolicyMaps {
    state: HashMap<MapData, u32, PolicyState>,
    denied: LpmTrie<MapData, ScopedAddr, PortBitmap>,
    proxied: LpmTrie<MapData, ScopedAddr, PortBitmap>,
    capacity: u32,
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> KernelPolicyError {
    move |source| KernelPolicyError::Map {
        name,
        source: Box::new(source),
    }
}

impl PinnedPolicyMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, KernelPolicyError> {
        fn open<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            dir: &Path,
            name: &'static str,
        ) -> Result<(T, u32), KernelPolicyError> {
            let err = map_error(name);
            let data = MapData::from_pin(dir.join(name)).map_err(&err)?;
            let capacity = data.info().map(|i| i.max_entries()).map_err(&err)?;
            let map =
                T::try_from(aya::maps::Map::from_map_data(data).map_err(&err)?).map_err(&err)?;
            Ok((map, capacity))
        }
        let (denied, capacity) = open(pin_dir, maps::POLICY_OUT)?;
        Ok(Self {
            state: open(pin_dir, maps::POLICY_STATE)?.0,
            denied,
            proxied: open(pin_dir, maps::POLICY_PROXIED)?.0,
            capacity,
        })
    }

    fn trie(&self, trie: PolicyTrie) -> &LpmTrie<MapData, ScopedAddr, PortBitmap> {
        match trie {
            PolicyTrie::Denied => &self.denied,
            PolicyTrie::Proxied => &self.proxied,
        }
    }

    fn trie_mut(&mut self, trie: PolicyTrie) -> &mut LpmTrie<MapData, ScopedAddr, PortBitmap> {
        match trie {
            PolicyTrie::Denied => &mut self.denied,
            PolicyTrie::Proxied => &mut self.proxied,
        }
    }
}

impl PolicyMaps for PinnedPolicyMaps {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn state(&self, scope: u32) -> Option<PolicyState> {
        self.state.get(&scope, 0).ok()
    }

    fn scopes(&self) -> Vec<u32> {
        self.state.keys().filter_map(Result::ok).collect()
    }

    fn set_state(&mut self, scope: u32, state: PolicyState) -> Result<(), KernelPolicyError> {
        self.state
            .insert(scope, state, 0)
            .map_err(map_error(maps::POLICY_STATE))
    }

    fn remove_state(&mut self, scope: u32) {
        let _ = self.state.remove(&scope);
    }

    fn keys(&self, trie: PolicyTrie) -> Vec<SlotKey> {
        self.trie(trie)
            .keys()
            .filter_map(Result::ok)
            .map(|k| SlotKey {
                prefix_len: k.prefix_len(),
                data: k.data(),
            })
            .collect()
    }

    fn insert(
        &mut self,
        trie: PolicyTrie,
        key: &SlotKey,
        ports: &PortBitmap,
    ) -> Result<(), KernelPolicyError> {
        let k = Key::new(key.prefix_len, key.data);
        self.trie_mut(trie)
            .insert(&k, *ports, 0)
            .map_err(map_error(trie.map_name()))
    }

    fn remove(&mut self, trie: PolicyTrie, key: &SlotKey) {
        let _ = self
            .trie_mut(trie)
            .remove(&Key::new(key.prefix_len, key.data));
    }
}

/// A standalone run's policy maps: its one workload's slots over the run's pinned maps.
pub struct KernelPolicy {
    maps: PinnedPolicyMaps,
    slots: PolicySlots,
}

impl KernelPolicy {
    pub fn open(pin_dir: &Path, scope: u32) -> Result<Self, KernelPolicyError> {
        Ok(Self {
            maps: PinnedPolicyMaps::open(pin_dir)?,
            slots: PolicySlots::new(scope),
        })
    }

    /// Puts `compiled` in force (see [`PolicySlots::install`]).
    pub fn install(&mut self, compiled: &Compiled) -> Result<(), KernelPolicyError> {
        self.slots.install(&mut self.maps, compiled)
    }
}

/// The connects the kernel refused, as it reported them ([`maps::POLICY_EVENTS`]).
pub struct DenyEvents {
    ring: RingBuf<MapData>,
}

/// One refused connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelDeny {
    pub dst: std::net::SocketAddr,
    pub pid: u32,
    /// The workload scope whose policy refused it.
    pub scope: u32,
}

impl DenyEvents {
    pub fn open(pin_dir: &Path) -> Result<Self, KernelPolicyError> {
        let name = maps::POLICY_EVENTS;
        let err = map_error(name);
        let data = MapData::from_pin(pin_dir.join(name)).map_err(&err)?;
        let map = aya::maps::Map::from_map_data(data).map_err(&err)?;
        Ok(Self {
            ring: RingBuf::try_from(map).map_err(&err)?,
        })
    }

    /// Every event waiting in the ring (never blocks).
    pub fn drain(&mut self) -> Vec<KernelDeny> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            out.extend(decode_deny(&item));
        }
        out
    }
}

/// One ring item as the kernel wrote it (a `PolicyDenyEvent`, at any alignment); `None` if
/// it is too short. Pure Rust around one unsafe read: checked by Miri (`cargo xtask miri`).
fn decode_deny(item: &[u8]) -> Option<KernelDeny> {
    if item.len() < std::mem::size_of::<PolicyDenyEvent>() {
        return None;
    }
    // SAFETY: `item` holds at least size_of::<PolicyDenyEvent>() initialized bytes (checked
    // above); the type is plain integers, valid for any bits; the read is unaligned-safe.
    let e: PolicyDenyEvent =
        unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PolicyDenyEvent>()) };
    Some(KernelDeny {
        dst: std::net::SocketAddr::new(ip_from_words(e.ip), e.port),
        pid: e.pid,
        scope: e.scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_events_decode_at_any_alignment() {
        let event = PolicyDenyEvent {
            ip: sidecar_common::words_from_ip("10.1.2.3".parse().unwrap()),
            port: 5432,
            _pad: 0,
            pid: 4242,
            scope: 7,
        };
        let size = std::mem::size_of::<PolicyDenyEvent>();
        let mut bytes = Vec::new();
        for w in event.ip {
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        bytes.extend_from_slice(&event.port.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&event.pid.to_ne_bytes());
        bytes.extend_from_slice(&event.scope.to_ne_bytes());
        assert_eq!(bytes.len(), size);
        for offset in 0..4 {
            let mut buf = vec![0xa5u8; offset];
            buf.extend_from_slice(&bytes);
            let got = decode_deny(&buf[offset..]).expect("a whole event");
            assert_eq!(got.dst, "10.1.2.3:5432".parse().unwrap());
            assert_eq!(got.pid, 4242);
            assert_eq!(got.scope, 7);
            assert!(decode_deny(&buf[offset..offset + size - 1]).is_none());
        }
    }
}
