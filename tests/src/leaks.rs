//! What a live sidecar holds — open fds, memory, entries in its pinned per-connection maps —
//! measured from outside, so the load and soak tests can tell a leak from a busy moment.

use std::{fs, time::Duration};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use sidecar_common::{OrigDst, SockKey, maps};

use crate::{bpf, host};

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

/// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Entries of a pinned hash (or LRU hash) map of run `pid`.
pub fn map_len<K: Pod, V: Pod>(pid: u32, name: &str) -> usize {
    let map: HashMap<MapData, K, V> = bpf::pinned_map(pid, name)
        .and_then(|m| Ok(m.try_into()?))
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    map.keys().take(300_000).filter(Result::is_ok).count()
}

/// The per-connection state the sidecar keeps, in the process and in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub fds: usize,
    pub spliced: usize,
    pub orig_dst: usize,
    pub passthru: usize,
    pub cookie_orig_dst: usize,
}

impl Held {
    /// A snapshot of run `pid` now.
    pub fn of(pid: u32) -> Self {
        Self {
            fds: fd_count(pid),
            spliced: map_len::<SockKey, u32>(pid, maps::SPLICED),
            orig_dst: map_len::<SockKey, OrigDst>(pid, maps::ORIG_DST),
            passthru: map_len::<SockKey, u32>(pid, maps::PASSTHRU),
            cookie_orig_dst: map_len::<u64, OrigDst>(pid, maps::COOKIE_ORIG_DST),
        }
    }

    /// Whether every count is at most `b`'s.
    pub fn at_most(&self, b: &Held) -> bool {
        self.fds <= b.fds
            && self.spliced <= b.spliced
            && self.orig_dst <= b.orig_dst
            && self.passthru <= b.passthru
            && self.cookie_orig_dst <= b.cookie_orig_dst
    }
}

/// Waits (bounded by `timeout`, a snapshot every `poll`) until the idle sidecar's state stops
/// changing — or, with a `baseline`, until it is back at most at it. Returns the last
/// snapshot and whether that happened in time; the caller decides whether a timeout fails
/// its test (without a baseline, a state still moving is simply the best there is).
pub fn settle(pid: u32, baseline: Option<Held>, timeout: Duration, poll: Duration) -> (Held, bool) {
    let mut last = Held::of(pid);
    let ok = host::wait_until(timeout, || {
        std::thread::sleep(poll);
        let now = Held::of(pid);
        let done = match &baseline {
            None => now == last,
            Some(b) => now.at_most(b),
        };
        last = now;
        done
    });
    (last, ok)
}
