//! The pod's open circuits, refused in the kernel by the node agent: the proxy's circuits
//! open and close them here (a [`CircuitSink`]), and the registrar hands the agent what
//! changed on the registration connection (`{"op":"circuit"}`), all of them again after each
//! registration (the agent drops a connection's circuits when it ends).
//!
//! The sink only notes what is wanted and wakes the registrar: the proxy's circuits call it
//! under their lock, so it must not wait for the agent. A circuit reaches the kernel a round
//! trip later; meanwhile the proxy refuses the destination itself, as it always does.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
};

use sidecar_common::limits::OPEN_CIRCUITS_PER_POD;
use tokio::sync::Notify;

use crate::redirect::circuits::CircuitSink;

/// The circuits the proxy holds open, for the agent.
#[derive(Default)]
pub struct AgentCircuits {
    wanted: Mutex<BTreeSet<SocketAddr>>,
    changed: Notify,
}

impl AgentCircuits {
    /// What should be refused in the kernel now.
    pub fn wanted(&self) -> BTreeSet<SocketAddr> {
        self.lock().clone()
    }

    /// Resolves once the wanted set changed since the last call returned (a change made while
    /// nobody waits is kept for the next wait).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<SocketAddr>> {
        self.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CircuitSink for AgentCircuits {
    /// `false` past the pod's share of the node's table, which the agent would refuse too:
    /// the proxy then refuses `dst` by itself.
    fn open(&self, dst: SocketAddr) -> bool {
        let mut wanted = self.lock();
        if !wanted.contains(&dst) && wanted.len() as u32 >= OPEN_CIRCUITS_PER_POD {
            return false;
        }
        wanted.insert(dst);
        drop(wanted);
        self.changed.notify_one();
        true
    }

    fn close(&self, dst: SocketAddr) {
        if self.lock().remove(&dst) {
            self.changed.notify_one();
        }
    }
}

/// What to tell the agent to make its set `sent` the `wanted` one: opens, then closes.
pub fn changes(
    wanted: &BTreeSet<SocketAddr>,
    sent: &BTreeSet<SocketAddr>,
) -> Vec<(SocketAddr, bool)> {
    let opens = wanted.difference(sent).map(|d| (*d, true));
    let closes = sent.difference(wanted).map(|d| (*d, false));
    opens.chain(closes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 9], port))
    }

    #[test]
    fn the_pods_share_is_held_here_too() {
        let c = AgentCircuits::default();
        for port in 0..OPEN_CIRCUITS_PER_POD as u16 {
            assert!(c.open(addr(port)));
        }
        assert!(!c.open(addr(9999)), "one past the share");
        assert!(c.open(addr(0)), "one already open stays open");
        c.close(addr(0));
        assert!(c.open(addr(9999)));
        assert_eq!(c.wanted().len(), OPEN_CIRCUITS_PER_POD as usize);
    }

    #[test]
    fn changes_open_what_is_new_and_close_what_went() {
        let wanted = BTreeSet::from([addr(1), addr(2)]);
        let sent = BTreeSet::from([addr(2), addr(3)]);
        assert_eq!(
            changes(&wanted, &sent),
            vec![(addr(1), true), (addr(3), false)]
        );
        assert!(changes(&wanted, &wanted).is_empty());
    }

    #[tokio::test]
    async fn a_change_made_while_nobody_waits_is_not_lost() {
        let c = AgentCircuits::default();
        assert!(c.open(addr(1)));
        tokio::time::timeout(std::time::Duration::from_secs(1), c.changed())
            .await
            .expect("the open before the wait wakes it");
    }
}
