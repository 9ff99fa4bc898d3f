//! Who holds the registration socket's connections: any process on the node can connect, so
//! one caller (a pod, or a user outside the pods) holds at most [`MAX_PER_CALLER`] of them
//! and the rest stay for the other pods.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::pod::PodCgroup;

/// Connections one caller may hold open at once. A sidecar uses one (two for a moment while
/// it reconnects).
pub const MAX_PER_CALLER: usize = 8;

/// A caller's name for the per-caller limit and the log: `pod <uid>` for a process in a pod
/// (`pod`, from its cgroup), else `uid <n>`.
pub fn name(pod: Option<&PodCgroup>, uid: u32) -> String {
    match pod {
        Some(pod) => format!("pod {}", pod.uid),
        None => format!("uid {uid}"),
    }
}

/// Open connections per caller (named by [`name`]).
#[derive(Default)]
pub struct PerCaller(Mutex<HashMap<String, usize>>);

/// One of a caller's connections; gives its place back when dropped.
pub struct CallerSlot {
    counts: Arc<PerCaller>,
    caller: String,
}

impl PerCaller {
    /// A place for one more connection of `caller`, unless it holds [`MAX_PER_CALLER`].
    pub fn take(self: &Arc<Self>, caller: &str) -> Option<CallerSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(caller.to_string()).or_default();
        if *n >= MAX_PER_CALLER {
            return None;
        }
        *n += 1;
        Some(CallerSlot {
            counts: self.clone(),
            caller: caller.to_string(),
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_holds_its_share_and_gets_each_place_back() {
        let per_caller = Arc::new(PerCaller::default());
        let held: Vec<CallerSlot> = (0..MAX_PER_CALLER)
            .map(|_| per_caller.take("pod a").unwrap())
            .collect();
        assert!(per_caller.take("pod a").is_none());
        // Another caller is not held up by this one.
        assert!(per_caller.take("uid 1000").is_some());
        drop(held);
        assert!(per_caller.take("pod a").is_some());
        assert!(
            per_caller.0.lock().unwrap().is_empty(),
            "no count left behind"
        );
    }
}
