//! Each workload's share of the node-wide pass-through tables ([`SCOPE_USAGE`]), so no pod
//! can leave another's pass-through connections untracked (unrecorded, uncapped) by filling
//! `DIRECT_PENDING`/`DIRECT_LIVE`, or another's per-destination counts without room by
//! filling `DIRECT_COUNTS`. The agent sets the quotas ([`TRACKED_QUOTA`],
//! [`DESTINATIONS_QUOTA`]) so that every pod's full share fits; `sidecar run` gives its one
//! workload the whole tables, so that past them it too goes through the proxy.
//!
//! A connection the quota does not admit goes through the workload's proxy, which records it
//! and holds its cap: the quota moves connections off the fast path, never off the record.
//!
//! Races. Counts change with atomic adds (several CPUs connect and close for one workload at
//! once); Linux 5.10 has no BPF atomic fetch or compare-and-swap, so a count is read apart
//! from its update. Each race must err towards the proxy, never towards a connection that
//! goes direct untracked:
//! - `tracked` is added to *before* it is compared, and the add is taken back when the
//!   comparison fails or the note cannot be made. A connect admitted has seen a count that
//!   includes itself and every connection admitted before it and still tracked, so admitted
//!   connections never exceed the quota; two connects racing for the last place may both
//!   see the other's add and both go to the proxy.
//! - `tracked` is taken back exactly once per admitted connection: at its close, or when its
//!   note never became a live entry, or when its socket is released with the note still
//!   pending (a connect that failed before its SYN: no route, no free local port; see
//!   `release`). Whichever removes the note gives the place back. A note the LRU evicts
//!   before either keeps its place until the pod's entry goes: that errs towards the proxy.
//!   The one way for it to err the other way: connections open across an
//!   in-place upgrade from a build without quotas never took a place, so their closes give
//!   back places never taken, and until they have all closed a pod may hold that many more.
//! - `destinations` is checked at connect but added to at the SYN (an entry of
//!   `DIRECT_COUNTS` is made only for a connection that really goes out), so connects to new
//!   destinations racing on other CPUs can overshoot the quota by how many are in flight:
//!   `limits::DESTINATIONS_PER_POD` leaves half the table for that. It is added to before the
//!   entry is made and taken back after it is removed, so it never reads lower than the
//!   workload's entries.

use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::bindings::BPF_NOEXIST;
use sidecar_common::ScopeUsage;

use crate::{
    direct_counts::atomic_add,
    maps::{DESTINATIONS_QUOTA, SCOPE_USAGE, TRACKED_QUOTA},
};

/// Whether a pass-through connect may go direct.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes; its place is taken, and [`release`] gives it back.
    Yes,
    /// No: the workload has its quota of tracked connections (or no entry could be made).
    OverTracked,
    /// No: the destination is new and the workload has its quota of destinations.
    OverDestinations,
}

/// Takes a place for one more pass-through connection of `scope` (to a destination it has
/// none open to, if `new_destination`), if its quotas leave one.
#[inline(always)]
pub fn admit(scope: u32, new_destination: bool) -> Admit {
    let (tracked_quota, destinations_quota) = (TRACKED_QUOTA.load(), DESTINATIONS_QUOTA.load());
    if tracked_quota == 0 && destinations_quota == 0 {
        return Admit::Yes;
    }
    let Some(usage) = usage_or_new(scope) else {
        // No entry, no count: the proxy takes it.
        return Admit::OverTracked;
    };
    if destinations_quota != 0 && new_destination {
        // SAFETY: `usage` is the map value, valid for the program's run.
        let held = unsafe { read_volatile(addr_of_mut!((*usage).destinations)) };
        if held as i64 >= i64::from(destinations_quota) {
            return Admit::OverDestinations;
        }
    }
    if tracked_quota != 0 {
        // SAFETY: as above; the field is 8-byte aligned.
        let held = unsafe {
            let tracked = addr_of_mut!((*usage).tracked);
            atomic_add(tracked, 1);
            read_volatile(tracked)
        };
        if held as i64 > i64::from(tracked_quota) {
            // SAFETY: as above. Adding u64::MAX is subtracting one.
            unsafe { atomic_add(addr_of_mut!((*usage).tracked), u64::MAX) };
            return Admit::OverTracked;
        }
    }
    Admit::Yes
}

/// Gives back the place [`admit`] took for a connection of `scope`: it closed, or it was
/// never noted.
#[inline(always)]
pub fn release(scope: u32) {
    if TRACKED_QUOTA.load() == 0 {
        return;
    }
    if let Some(usage) = SCOPE_USAGE.get_ptr_mut(&scope) {
        // SAFETY: the map value, valid for the program's run, 8-byte aligned.
        unsafe { atomic_add(addr_of_mut!((*usage).tracked), u64::MAX) };
    }
}

/// `scope` has one more (`1`) or one fewer (`u64::MAX`) entry in `DIRECT_COUNTS`.
#[inline(always)]
pub fn destinations(scope: u32, delta: u64) {
    if let Some(usage) = SCOPE_USAGE.get_ptr_mut(&scope) {
        // SAFETY: as in `release`.
        unsafe { atomic_add(addr_of_mut!((*usage).destinations), delta) };
    }
}

/// The ring had no room for a close record of `scope`.
#[inline(always)]
pub fn record_dropped(scope: u32) {
    if let Some(usage) = SCOPE_USAGE.get_ptr_mut(&scope) {
        // SAFETY: as in `release`.
        unsafe { atomic_add(addr_of_mut!((*usage).records_dropped), 1) };
    }
}

/// The workload's entry, made (zeroed) if it has none; `None` if the table has no room.
#[inline(always)]
fn usage_or_new(scope: u32) -> Option<*mut ScopeUsage> {
    if let Some(usage) = SCOPE_USAGE.get_ptr_mut(&scope) {
        return Some(usage);
    }
    // Another CPU may make it first (EEXIST): either way, the lookup below finds one entry.
    let _ = SCOPE_USAGE.insert(&scope, &ScopeUsage::default(), BPF_NOEXIST as u64);
    SCOPE_USAGE.get_ptr_mut(&scope)
}
