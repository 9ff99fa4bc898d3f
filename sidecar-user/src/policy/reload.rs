//! Hot reload: the policy file is polled (like certificate rotation, no inotify: it works the
//! same on every filesystem and with editors that replace the file); when its content
//! changes it is loaded whole and put in force atomically. An invalid file is refused with
//! its line and problem, and the old policy stays in force in the proxy and the kernel. A
//! file a pod's node agent could not take for a reason of its own (unreachable, restarting)
//! is tried again at every poll until it is taken or the file changes: the old policy stays
//! in force meanwhile, and the refusal is said and counted once.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use tracing::{debug, info, warn};

use super::Enforcer;

fn fingerprint(enforcer: &Enforcer) -> u64 {
    let mut h = DefaultHasher::new();
    std::fs::read(enforcer.path())
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// Watches the file until the runtime shuts down.
pub fn spawn_watcher(enforcer: Arc<Enforcer>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = fingerprint(&enforcer);
        // The file in `seen` is waiting for the agent to take it.
        let mut waiting = false;
        loop {
            tokio::time::sleep(interval).await;
            let now = fingerprint(&enforcer);
            if now == seen && !waiting {
                continue;
            }
            let first_try = now != seen;
            seen = now;
            match enforcer.reload().await {
                Ok(()) => {
                    waiting = false;
                    info!(
                        file = %enforcer.path().display(),
                        rules = enforcer.current().rules.len(),
                        "policy reloaded"
                    )
                }
                Err(e) if e.is_retry() => {
                    if first_try || !waiting {
                        enforcer.count_reload_error();
                        warn!(
                            "policy not taken yet, keeping the current one until it is (tried again each {interval:?}): {e}"
                        );
                    } else {
                        debug!("policy still not taken: {e}");
                    }
                    waiting = true;
                }
                Err(e) => {
                    waiting = false;
                    warn!("policy refused, keeping the current one: {e}")
                }
            }
        }
    })
}

/// Reads the kernel's deny events every `interval` (they are logged and counted by rule).
pub fn spawn_kernel_event_reader(
    enforcer: Arc<Enforcer>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            enforcer.drain_kernel_events();
        }
    })
}
