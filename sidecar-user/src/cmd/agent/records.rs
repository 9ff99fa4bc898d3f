//! Pass-through records for the pods: the agent reads the node's one ring of close reports
//! (`DIRECT_EVENTS`) and hands each record to the sidecar of the pod it belongs to (by the
//! scope the kernel stamped at `connect()`), over that sidecar's own `records` connection.
//! A pod sees only its own records: the connection's pod is derived from the caller's cgroup
//! by the server, never from what it sends.
//!
//! Records for a pod whose sidecar is not listening (restarting, or too slow: its queue is
//! full) are dropped and counted (`undelivered`), never queued without bound. The same
//! delivery carries the connects the kernel refused under a pod's policy
//! ([`Subscribers<PolicyDenied>`](crate::registration::PolicyDenied), fed by
//! [`denies`](super::denies)).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;
use tracing::warn;

use crate::redirect::passthrough::{Clock, DirectEvents, passed_through};
use crate::registration::PassedThrough;

/// Records queued per subscribed sidecar before further ones are dropped.
const QUEUE: usize = 4096;

/// Who listens for which pod's records (or refusals).
pub struct Subscribers<T = PassedThrough> {
    by_scope: Mutex<HashMap<u32, Vec<mpsc::Sender<T>>>>,
    /// Records no sidecar took (none subscribed, or its queue was full).
    pub undelivered: AtomicU64,
    pub delivered: AtomicU64,
}

impl<T> Default for Subscribers<T> {
    fn default() -> Self {
        Self {
            by_scope: Mutex::default(),
            undelivered: AtomicU64::default(),
            delivered: AtomicU64::default(),
        }
    }
}

impl<T: Copy> Subscribers<T> {
    /// A new listener for the pod with `scope`; dropping the receiver unsubscribes it.
    pub fn subscribe(&self, scope: u32) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.by_scope
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(scope)
            .or_default()
            .push(tx);
        rx
    }

    pub fn deliver(&self, scope: u32, record: T) {
        let mut by_scope = self.by_scope.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = false;
        if let Some(senders) = by_scope.get_mut(&scope) {
            senders.retain(|tx| !tx.is_closed());
            for tx in senders.iter() {
                taken |= tx.try_send(record).is_ok();
            }
            if senders.is_empty() {
                by_scope.remove(&scope);
            }
        }
        let counter = if taken {
            &self.delivered
        } else {
            &self.undelivered
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Subscribers {
    /// Reads the ring for as long as it can and delivers every report.
    pub async fn run(self: Arc<Self>, mut events: DirectEvents) {
        loop {
            match events.next_batch().await {
                Ok(batch) => {
                    let clock = Clock::now();
                    for e in &batch {
                        self.deliver(e.conn.scope, passed_through(e, &clock));
                    }
                }
                Err(e) => {
                    warn!("pass-through records stopped: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> PassedThrough {
        PassedThrough {
            local: "10.0.0.1:4000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            started_unix_us: 1,
            duration_us: 2,
            connect_us: Some(1),
            bytes_acked: 3,
            bytes_received: 4,
            srtt_us: 5,
            rtt_min_us: 6,
            retransmits: 0,
            last_state: 5,
        }
    }

    #[test]
    fn a_pod_gets_only_its_own_records_and_the_rest_are_counted() {
        let subs = Subscribers::<PassedThrough>::default();
        let mut a = subs.subscribe(1);
        let mut b = subs.subscribe(2);
        subs.deliver(1, record());
        subs.deliver(3, record());
        assert_eq!(a.try_recv().unwrap(), record());
        assert!(a.try_recv().is_err());
        assert!(b.try_recv().is_err(), "pod 2 saw pod 1's record");
        assert_eq!(subs.delivered.load(Ordering::Relaxed), 1);
        assert_eq!(
            subs.undelivered.load(Ordering::Relaxed),
            1,
            "nobody listens for 3"
        );
        drop(a);
        subs.deliver(1, record());
        assert_eq!(subs.undelivered.load(Ordering::Relaxed), 2, "pod 1 left");
    }
}
