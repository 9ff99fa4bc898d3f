//! A bound on warning lines per reason: anyone can reach the tunnel port, and a scanner that
//! fails a thousand handshakes a second must not make the sidecar write (synchronously) a
//! thousand lines a second. The first few of each reason in an interval are logged one by one;
//! the rest are only counted (the report's `inbound_rejections` has every one) and summed up
//! in one line when the reason next comes up after its interval, or when the sidecar drains.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lines per reason logged one by one in an interval.
pub const LINES_PER_INTERVAL: u32 = 10;
/// How long an interval lasts.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// What to do with one more line of a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    /// Write this line.
    pub log: bool,
    /// Lines of this reason not written in the interval that just ended: say so first.
    pub suppressed: u64,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

#[derive(Debug, Default)]
pub struct LogBudget {
    windows: Mutex<HashMap<&'static str, Window>>,
}

impl LogBudget {
    /// One more line of `reason` at `now`.
    pub fn admit(&self, reason: &'static str, now: Instant) -> Admit {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let w = windows.entry(reason).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        let mut ended = 0;
        if now.duration_since(w.started) >= INTERVAL {
            ended = std::mem::take(&mut w.suppressed);
            w.started = now;
            w.logged = 0;
        }
        let log = w.logged < LINES_PER_INTERVAL;
        if log {
            w.logged += 1;
        } else {
            w.suppressed += 1;
        }
        Admit {
            log,
            suppressed: ended,
        }
    }

    /// The lines not yet summed up, by reason (and forgets them): for the summary at drain.
    pub fn take_suppressed(&self) -> Vec<(&'static str, u64)> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = windows
            .iter_mut()
            .filter(|(_, w)| w.suppressed > 0)
            .map(|(reason, w)| (*reason, std::mem::take(&mut w.suppressed)))
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_reason_is_logged_a_few_times_then_summed_up() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|_| budget.admit("untrusted_ca", t0).log)
            .count();
        assert_eq!(logged, LINES_PER_INTERVAL as usize);
        // Another reason has its own budget.
        assert!(budget.admit("alpn", t0).log);
        // The next interval starts with the sum of what was not written.
        let next = budget.admit("untrusted_ca", t0 + INTERVAL);
        assert_eq!(
            next,
            Admit {
                log: true,
                suppressed: 1000 - u64::from(LINES_PER_INTERVAL)
            }
        );
        assert_eq!(budget.take_suppressed(), vec![]);
    }

    #[test]
    fn what_is_left_at_the_end_is_handed_over_once() {
        let budget = LogBudget::default();
        let t0 = Instant::now();
        for _ in 0..15 {
            budget.admit("tls_other", t0);
        }
        assert_eq!(budget.take_suppressed(), vec![("tls_other", 5)]);
        assert_eq!(budget.take_suppressed(), vec![]);
    }
}
