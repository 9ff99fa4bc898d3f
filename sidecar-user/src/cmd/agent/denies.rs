//! The connects the kernel refused under a pod's policy (EPERM at `connect()`): the connect
//! hooks write each to the node-wide `POLICY_EVENTS` ring; the agent reads it in batches and
//! logs each refusal once per (pod, destination, pid) per batch with a count, as a standalone
//! run's `Enforcer::drain_kernel_events` does, so an app retrying a denied connect in a loop
//! cannot flood the log. The pod is found from the pid's cgroup, read when the batch is.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::warn;

use super::{Agent, pod};
use crate::policy::pinned::DenyEvents;

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
        let (cgroup2, ns_root, root): (PathBuf, Option<PathBuf>, PathBuf) = {
            let a = agent.lock().unwrap_or_else(|p| p.into_inner());
            (a.cgroup2.clone(), a.ns_root.clone(), a.root.clone())
        };
        let mut pods: BTreeMap<u32, String> = BTreeMap::new();
        let mut batch: BTreeMap<(String, SocketAddr, u32), u64> = BTreeMap::new();
        for e in drained {
            let pod_uid = pods
                .entry(e.pid)
                .or_insert_with(|| {
                    pod::cgroup_of(&cgroup2, e.pid, ns_root.as_deref())
                        .ok()
                        .and_then(|c| pod::derive(&root, &c).ok())
                        .map_or_else(|| "unknown (the process is gone)".into(), |p| p.uid)
                })
                .clone();
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
