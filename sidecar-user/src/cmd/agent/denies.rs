//! The connects the kernel refused under a pod's policy (EPERM at `connect()`): the connect
//! hooks write each to the node-wide `POLICY_EVENTS` ring with the pod's scope; the agent
//! reads it in batches and logs each refusal once per (pod, destination, pid) per batch with
//! a count, as a standalone run's `Enforcer::drain_kernel_events` does, so an app retrying a
//! denied connect in a loop cannot flood the log. The pod is named by its scope (the process
//! may be gone by the time the batch is read). Each refusal also goes to the pod's sidecar,
//! if it listens (`denies`), which counts it by rule in its own `/metrics`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::warn;

use super::Agent;
use crate::{policy::pinned::DenyEvents, registration::PolicyDenied};

/// How often the ring is read.
const POLL: Duration = Duration::from_millis(100);

/// Reads and logs the refusals until the runtime stops.
pub async fn run(mut events: DenyEvents, agent: Arc<Mutex<Agent>>) {
    loop {
        tokio::time::sleep(POLL).await;
        let drained = events.drain();
        if drained.is_empty() {
            continue;
        }
        let (pods, subscribers): (BTreeMap<u32, String>, _) = {
            let a = agent.lock().unwrap_or_else(|p| p.into_inner());
            let pods = a.registry.pods();
            let pods = pods.map(|r| (r.scope, r.pod_uid.clone())).collect();
            (pods, a.denies.clone())
        };
        let mut batch: BTreeMap<(String, SocketAddr, u32), u64> = BTreeMap::new();
        for e in drained {
            let denied = PolicyDenied {
                dst: e.dst,
                pid: e.pid,
            };
            subscribers.deliver(e.scope, denied);
            let pod_uid = pods
                .get(&e.scope)
                .cloned()
                .unwrap_or_else(|| format!("unregistered (scope {})", e.scope));
            *batch.entry((pod_uid, e.dst, e.pid)).or_default() += 1;
        }
        for ((pod_uid, dst, pid), times) in batch {
            warn!(
                direction = "outbound",
                pod_uid,
                %dst,
                pid,
                times,
                "pod policy refused connect() in the kernel (EPERM)"
            );
        }
    }
}
