//! Requests in flight per client address, so that one address cannot take every slot.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Requests in flight per peer address. Entries exist only while a request is in flight,
/// so the map never holds more than [`super::Limits::total`] + 1 addresses.
#[derive(Clone, Default)]
pub(super) struct PeerSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One request's share of its peer's slots, given back on drop.
pub(super) struct PeerSlot {
    slots: PeerSlots,
    ip: IpAddr,
}

impl PeerSlots {
    /// A slot for `ip` if it holds fewer than `per_peer`.
    pub(super) fn take(&self, ip: IpAddr, per_peer: usize) -> Option<PeerSlot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held = map.entry(ip).or_default();
        if *held >= per_peer {
            return None;
        }
        *held += 1;
        Some(PeerSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
