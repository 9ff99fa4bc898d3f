//! Rate limit for the agent's refusal log lines. Any process on the node can make the agent
//! refuse requests as fast as it can connect; every refusal is still counted (`--status`,
//! `/metrics`), but only the first few per caller and reason in each window are logged, and
//! the next line logged says how many were left out.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Lines logged per caller and reason in each window.
const BURST: u32 = 5;
const WINDOW: Duration = Duration::from_secs(60);
/// Keys remembered at most; past that, finished windows are forgotten.
const MAX_KEYS: usize = 4096;

#[derive(Default)]
pub struct LogThrottle {
    windows: HashMap<(String, &'static str), Window>,
}

struct Window {
    start: Instant,
    logged: u32,
    /// Left out since the last line logged for this key.
    suppressed: u64,
}

impl LogThrottle {
    /// Whether a refusal of `caller` for `reason` may be logged now; if so, how many of
    /// theirs were left out before it.
    pub fn admit(&mut self, caller: &str, reason: &'static str, now: Instant) -> Option<u64> {
        if self.windows.len() >= MAX_KEYS {
            self.windows
                .retain(|_, w| now.duration_since(w.start) < WINDOW);
        }
        if self.windows.len() >= MAX_KEYS {
            // Every key is busy: log nothing new rather than grow without bound.
            return None;
        }
        let w = self
            .windows
            .entry((caller.to_string(), reason))
            .or_insert(Window {
                start: now,
                logged: 0,
                suppressed: 0,
            });
        if now.duration_since(w.start) >= WINDOW {
            w.start = now;
            w.logged = 0;
        }
        if w.logged >= BURST {
            w.suppressed += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_caller_and_reason_then_a_count_of_what_was_left_out() {
        let mut t = LogThrottle::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(t.admit("pod-a", "uid_mismatch", t0), Some(0));
        }
        for _ in 0..10 {
            assert_eq!(t.admit("pod-a", "uid_mismatch", t0), None);
        }
        // Another caller, or another reason, is not silenced by pod-a.
        assert_eq!(t.admit("pod-b", "uid_mismatch", t0), Some(0));
        assert_eq!(t.admit("pod-a", "bad_request", t0), Some(0));
        // The next window logs again and says how many were left out.
        assert_eq!(t.admit("pod-a", "uid_mismatch", t0 + WINDOW), Some(10));
        assert_eq!(t.admit("pod-a", "uid_mismatch", t0 + WINDOW), Some(0));
    }

    #[test]
    fn keys_are_bounded() {
        let mut t = LogThrottle::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            t.admit(&format!("c{i}"), "timeout", t0);
        }
        assert_eq!(t.admit("late", "timeout", t0), None);
        assert_eq!(t.admit("late", "timeout", t0 + WINDOW), Some(0));
        assert!(t.windows.len() <= MAX_KEYS);
    }
}
