//! How many pass-through connections each workload has open to each destination
//! ([`DIRECT_COUNTS`]), so the connect hooks can hold the workload's cap (`DIRECT_CAPS`):
//! sockops adds one at a pass-through connection's SYN and takes it away at its close.
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

use crate::maps::DIRECT_COUNTS;

/// Open pass-through connections to `dst` (0 if none, or if the count went below zero).
#[inline(always)]
pub fn open(dst: &CircuitKey) -> u32 {
    match DIRECT_COUNTS.get_ptr(dst) {
        // SAFETY: the pointer is the map value, valid for the program's run.
        Some(n) => clamp(unsafe { read_volatile(n) }),
        None => 0,
    }
}

/// One more connection to `dst`. If the table cannot take the entry the connection goes
/// uncounted (it is already on its way: a SYN cannot be refused from sockops).
#[inline(always)]
pub fn add(dst: &CircuitKey) {
    // Looked up first: an insert into an LRU map takes a free entry before it finds the key
    // already there, so inserting unconditionally cost every connection to a destination with
    // others open a wasted allocation.
    if DIRECT_COUNTS.get_ptr_mut(dst).is_none() {
        let _ = DIRECT_COUNTS.insert(dst, &0, BPF_NOEXIST as u64);
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
    if left as i64 <= 0 {
        let _ = DIRECT_COUNTS.remove(dst);
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
unsafe fn atomic_add(n: *mut u64, v: u64) {
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
