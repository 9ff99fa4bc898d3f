//! Every map and global of the object. Names, key and value types come from `sidecar-common`.

use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
};
use sidecar_common::{
    CircuitKey, Counter, DirectConn, OrigDst, PolicyState, PortBitmap, ScopeCounters, ScopeUsage,
    ScopedAddr, SockKey, WorkloadConfig, limits,
};

#[map(name = "WORKLOADS")]
pub static WORKLOADS: HashMap<u64, WorkloadConfig> =
    HashMap::with_max_entries(limits::WORKLOADS, 0);

#[map(name = "EXCLUDED_CIDRS")]
pub static EXCLUDED_CIDRS: LpmTrie<ScopedAddr, u8> =
    LpmTrie::with_max_entries(limits::EXCLUDED_CIDRS, 0);

#[cfg(not(feature = "fillable-map-for-tests"))]
#[map(name = "COOKIE_ORIG_DST")]
pub static COOKIE_ORIG_DST: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(limits::COOKIE_ORIG_DST, 0);

/// Test-only: a plain hash map evicts nothing, so a test can fill it through its pin and make
/// the kernel's next insert at connect fail (`E2BIG`), which the LRU map never does. That is
/// how `tests/tests/fail_closed.rs` proves a failed note refuses the connect.
#[cfg(feature = "fillable-map-for-tests")]
#[map(name = "COOKIE_ORIG_DST")]
pub static COOKIE_ORIG_DST: HashMap<u64, OrigDst> =
    HashMap::with_max_entries(limits::COOKIE_ORIG_DST, 0);

#[map(name = "PROXY_COOKIES")]
pub static PROXY_COOKIES: LruHashMap<u64, u8> =
    LruHashMap::with_max_entries(limits::PROXY_COOKIES, 0);

#[map(name = "ORIG_DST")]
pub static ORIG_DST: LruHashMap<SockKey, OrigDst> =
    LruHashMap::with_max_entries(limits::ORIG_DST, 0);

#[map(name = "SPLICED")]
pub static SPLICED: LruHashMap<SockKey, u32> = LruHashMap::with_max_entries(limits::SPLICED, 0);

#[map(name = "PASSTHRU")]
pub static PASSTHRU: LruHashMap<SockKey, u32> = LruHashMap::with_max_entries(limits::PASSTHRU, 0);

#[map(name = "SOCKETS")]
pub static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(limits::SOCKETS, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "POLICY_STATE")]
pub static POLICY_STATE: HashMap<u32, PolicyState> =
    HashMap::with_max_entries(limits::POLICY_STATE, 0);

#[map(name = "POLICY_OUT")]
pub static POLICY_OUT: LpmTrie<ScopedAddr, PortBitmap> =
    LpmTrie::with_max_entries(limits::POLICY_OUT, 0);

#[map(name = "POLICY_EVENTS")]
pub static POLICY_EVENTS: RingBuf = RingBuf::with_byte_size(limits::POLICY_EVENTS_BYTES, 0);

#[map(name = "MESH_CIDRS")]
pub static MESH_CIDRS: LpmTrie<ScopedAddr, u8> = LpmTrie::with_max_entries(limits::MESH_CIDRS, 0);

#[map(name = "DIRECT_PENDING")]
pub static DIRECT_PENDING: LruHashMap<u64, DirectConn> =
    LruHashMap::with_max_entries(limits::DIRECT_PENDING, 0);

#[map(name = "DIRECT_LIVE")]
pub static DIRECT_LIVE: HashMap<u64, DirectConn> =
    HashMap::with_max_entries(limits::DIRECT_LIVE, 0);

#[map(name = "OPEN_CIRCUITS")]
pub static OPEN_CIRCUITS: HashMap<CircuitKey, u8> =
    HashMap::with_max_entries(limits::OPEN_CIRCUITS, 0);

#[map(name = "DIRECT_COUNTS")]
pub static DIRECT_COUNTS: HashMap<CircuitKey, u64> =
    HashMap::with_max_entries(limits::DIRECT_COUNTS, 0);

#[map(name = "SCOPE_USAGE")]
pub static SCOPE_USAGE: HashMap<u32, ScopeUsage> =
    HashMap::with_max_entries(limits::SCOPE_USAGE, 0);

#[map(name = "DIRECT_CAPS")]
pub static DIRECT_CAPS: HashMap<u32, u32> = HashMap::with_max_entries(limits::DIRECT_CAPS, 0);

#[map(name = "POLICY_PROXIED")]
pub static POLICY_PROXIED: LpmTrie<ScopedAddr, PortBitmap> =
    LpmTrie::with_max_entries(limits::POLICY_PROXIED, 0);

#[map(name = "DIRECT_EVENTS")]
pub static DIRECT_EVENTS: RingBuf = RingBuf::with_byte_size(limits::DIRECT_EVENTS_BYTES, 0);

/// Set by the loader: 1 splices proxied connections' local legs (sockhash + sk_msg); 0, the
/// default, leaves them to TCP (connect redirect and pass-through work the same either way).
#[unsafe(no_mangle)]
pub static SOCKMAP_ENABLED: Global<u8> = Global::new(0);

/// Set by the loader: 0 where sockops/sk_msg cannot call `bpf_get_netns_cookie` (Linux
/// < 5.15). Keys then carry netns 0, and the loader turns the sockmap fast path off. A
/// constant of the frozen `.rodata`, so the verifier drops the helper call it guards.
#[unsafe(no_mangle)]
pub static NETNS_COOKIES: Global<u8> = Global::new(1);

/// Set by the loader: pass-through connections a workload may have tracked at once (the
/// agent: [`limits::TRACKED_PER_POD`]; `sidecar run`, one workload: the whole table); 0: no
/// quota.
#[unsafe(no_mangle)]
pub static TRACKED_QUOTA: Global<u32> = Global::new(0);

/// Set by the loader: destinations a workload may have pass-through connections open to at
/// once (the agent: [`limits::DESTINATIONS_PER_POD`]; `sidecar run`: the whole table); 0: no
/// quota.
#[unsafe(no_mangle)]
pub static DESTINATIONS_QUOTA: Global<u32> = Global::new(0);

/// Adds `n` to a per-CPU counter; per-CPU slots need no atomics.
#[inline(always)]
pub fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot, valid for the program's run.
        unsafe { *slot += n };
    }
}

#[map(name = "SCOPE_COUNTERS")]
pub static SCOPE_COUNTERS: PerCpuHashMap<u32, ScopeCounters> =
    PerCpuHashMap::with_max_entries(limits::SCOPE_COUNTERS, BPF_F_NO_PREALLOC);

/// The counters of one workload: each count goes to the node's `COUNTERS` and, when user
/// space gave the workload an entry, to its own in `SCOPE_COUNTERS` too. Looked up once per
/// program run.
pub struct Counts(Option<*mut ScopeCounters>);

impl Counts {
    #[inline(always)]
    pub fn of(scope: u32) -> Self {
        Counts(SCOPE_COUNTERS.get_ptr_mut(&scope))
    }

    #[inline(always)]
    pub fn count(&self, counter: Counter, n: u64) {
        count(counter, n);
        if let Some(own) = self.0 {
            // SAFETY: the pointer is this CPU's copy of the workload's entry, valid for the
            // program's run; only programs on this CPU write it.
            if let Some(slot) = unsafe { (*own).counts.get_mut(counter as usize) } {
                *slot += n;
            }
        }
    }
}
