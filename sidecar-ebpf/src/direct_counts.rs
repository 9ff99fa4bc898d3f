//! How many pass-through connections each workload has open to each destination
//! ([`DIRECT_COUNTS`]), so the connect hooks can hold the workload's cap (`DIRECT_CAPS`):
//! sockops adds one at a pass-through connection's SYN and takes it away at its close.
//!
//! The map is a plain hash, not an LRU: another workload's traffic must not be able to evict
//! a count, which would lift the cap. Each workload's entries are bounded by its quota of
//! destinations instead ([`crate::quota`]), checked at connect; when the map is full anyway, a
//! new destination goes uncounted, which also only lets connections through.
//!
//! Counts are changed with atomic adds (two CPUs may open or close connections to the same
//! destination at once). Linux 5.10 has no atomic compare-and-swap or fetch for BPF, so a
//! count is read apart from its update; every race that leaves it wrong leaves it too low,
//! never too high, so it can only let a connection through, never refuse one wrongly: a
//! count that went below zero reads as zero and its entry is dropped at the next close.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::read_volatile,
};

use aya_ebpf::bindings::BPF_NOEXIST;
use sidecar_common::CircuitKey;

use crate::{maps::DIRECT_COUNTS, quota};

/// Open pass-through connections to `dst` (0 if the count went below zero); `None` if it
/// has no entry (a destination new to the workload).
#[inline(always)]
pub fn open(dst: &CircuitKey) -> Option<u32> {
    match DIRECT_COUNTS.get_ptr(dst) {
        // SAFETY: the pointer is the map value, valid for the program's run.
        Some(n) => Some(clamp(unsafe { read_volatile(n) })),
        None => None,
    }
}

/// One more connection to `dst`. If the table cannot take the entry the connection goes
/// uncounted (it is already on its way: a SYN cannot be refused from sockops).
#[inline(always)]
pub fn add(dst: &CircuitKey) {
    // Looked up first: only a new entry counts in the workload's destinations, added to
    // before it exists and taken back if it could not be made (or another CPU made it), so
    // that count never reads lower than the workload's entries.
    if DIRECT_COUNTS.get_ptr_mut(dst).is_none() {
        quota::destinations(dst.scope, 1);
        if DIRECT_COUNTS.insert(dst, &0, BPF_NOEXIST as u64).is_err() {
            quota::destinations(dst.scope, u64::MAX);
        }
    }
    if let Some(n) = DIRECT_COUNTS.get_ptr_mut(dst) {
        // SAFETY: the pointer is the map value, 8-byte aligned, valid for the program's run.
        unsafe { atomic_add(n, 1) };
    }
}

/// One connection to `dst` fewer; the entry goes when no connection is left.
#[inline(always)]
pub fn remove(dst: &CircuitKey) {
    let Some(n) = DIRECT_COUNTS.get_ptr_mut(dst) else {
        return;
    };
    // SAFETY: as in `add`. Adding u64::MAX is subtracting one.
    let left = unsafe {
        atomic_add(n, u64::MAX);
        read_volatile(n)
    };
    // Two CPUs may both see the last connection go: only the one whose remove succeeds
    // takes the destination off the workload's count.
    if left as i64 <= 0 && DIRECT_COUNTS.remove(dst).is_ok() {
        quota::destinations(dst.scope, u64::MAX);
    }
}

/// `*n += v` as one atomic add. The BPF target has no compare-and-swap, so core's `AtomicU64`
/// has no `fetch_add` there; the intrinsic with its result unused compiles to the plain
/// atomic add (`lock *(u64 *)(r + 0) += v`), which every kernel in the matrix (5.10 on)
/// verifies, unlike the fetching form (5.12+).
///
/// # Safety
/// `n` must be valid and 8-byte aligned for the program's run.
#[inline(always)]
pub unsafe fn atomic_add(n: *mut u64, v: u64) {
    // SAFETY: forwarded from the caller.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, v) };
}

/// A count as the cap compares it: below zero (a race, see the module docs) is zero, and
/// more than `u32::MAX` open connections cannot happen.
#[inline(always)]
fn clamp(n: u64) -> u32 {
    if (n as i64) <= 0 {
        0
    } else {
        n.min(u64::from(u32::MAX)) as u32
    }
}
