//! Types shared by the kernel half (`sidecar-ebpf`) and the user half (`sidecar-user`).
//!
//! Every map key and value is defined here once, `#[repr(C)]`, with no implicit padding, so
//! that a layout change is one edit checked by both compilers. Addresses are always stored in
//! a 16-byte form: IPv4 becomes the v4-mapped IPv6 address `::ffff:a.b.c.d`. That lets one key
//! type describe both families and makes a dual-stack socket talking IPv4 match its IPv4 peer.
//!
//! Byte order: address words hold bytes in network order (exactly as the kernel's
//! `user_ip6`/`remote_ip6` arrays do); ports are in host order.
#![cfg_attr(not(test), no_std)]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Names of the eBPF programs inside the object, as the loader looks them up.
pub mod programs {
    pub const CONNECT4: &str = "sidecar_connect4";
    pub const CONNECT6: &str = "sidecar_connect6";
    pub const SOCKOPS: &str = "sidecar_sockops";
    pub const SK_MSG: &str = "sidecar_sk_msg";
    /// cgroup_skb/ingress: strict inbound mode (see the program's docs), on the app cgroup
    /// (`sidecar run`) or the pods' cgroup root (`sidecar agent`).
    pub const STRICT_INBOUND: &str = "sidecar_strict_in";
    /// cgroup/getsockopt at the pods' cgroup root (`sidecar agent`): answers the proxy's
    /// `SO_ORIGINAL_DST` from `ORIG_DST`, so the proxy needs no privileges.
    pub const GETSOCKOPT: &str = "sidecar_getsockopt";
    /// cgroup/sock_release where the connect hooks are: a pass-through note still pending at
    /// a socket's release gives its workload's quota place back.
    pub const SOCK_RELEASE: &str = "sidecar_sock_release";
    /// All programs, in the order the loader loads them.
    pub const ALL: [&str; 7] = [
        CONNECT4,
        CONNECT6,
        SOCKOPS,
        SK_MSG,
        STRICT_INBOUND,
        GETSOCKOPT,
        SOCK_RELEASE,
    ];
}

/// Names of the maps inside the object. Each is pinned under the run's bpffs directory.
pub mod maps {
    /// `HashMap<u64 cgroup id, WorkloadConfig>`: which cgroups are meshed, and how.
    pub const WORKLOADS: &str = "WORKLOADS";
    /// `LpmTrie<ScopedAddr, u8>`: destinations that bypass the proxy, per workload scope.
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: written at connect, read at established.
    pub const COOKIE_ORIG_DST: &str = "COOKIE_ORIG_DST";
    /// `LruHashMap<u64 socket cookie, u8>`: the proxy's own loopback upstream sockets.
    pub const PROXY_COOKIES: &str = "PROXY_COOKIES";
    /// `LruHashMap<SockKey, OrigDst>`: original destination by the app socket's 4-tuple;
    /// the proxy looks it up with (peer, local) of an accepted socket.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// `LruHashMap<SockKey, u32>`: sockets inserted into `SOCKETS` (both ends of a splice),
    /// valued by [`owner`](crate::owner).
    pub const SPLICED: &str = "SPLICED";
    /// `LruHashMap<SockKey, u32>`: sender sockets that missed their peer once and must stay
    /// on the TCP path from then on, so bytes can never be reordered.
    pub const PASSTHRU: &str = "PASSTHRU";
    /// `SockHash<SockKey>`: the spliced sockets; `sk_msg` redirects between them.
    pub const SOCKETS: &str = "SOCKETS";
    /// `PerCpuArray<u64>`: one slot per [`Counter`](crate::Counter).
    pub const COUNTERS: &str = "COUNTERS";
    /// `HashMap<u32 workload scope, PolicyState>`: which slot of `POLICY_OUT` is live for a
    /// workload; no entry means no kernel policy.
    pub const POLICY_STATE: &str = "POLICY_STATE";
    /// `LpmTrie<ScopedAddr, PortBitmap>`: outbound policy compiled per destination prefix
    /// (the ports it denies); the key's scope is
    /// [`policy_scope`](crate::policy_scope)`(workload scope, slot)`.
    pub const POLICY_OUT: &str = "POLICY_OUT";
    /// `RingBuf` of [`PolicyDenyEvent`](crate::PolicyDenyEvent): each connect the policy
    /// refused, so user space can log it and count it by rule.
    pub const POLICY_EVENTS: &str = "POLICY_EVENTS";
    /// `LpmTrie<ScopedAddr, u8>`: destinations that have sidecars (`--mesh-cidrs`): their
    /// connects always go to the proxy, which builds the mTLS tunnel.
    pub const MESH_CIDRS: &str = "MESH_CIDRS";
    /// `LruHashMap<u64 socket cookie, DirectConn>`: connects let through to their own
    /// destination, from the connect hook until sockops sees the SYN go out.
    pub const DIRECT_PENDING: &str = "DIRECT_PENDING";
    /// `HashMap<u64 socket cookie, DirectConn>`: those connections from the SYN until close.
    pub const DIRECT_LIVE: &str = "DIRECT_LIVE";
    /// `RingBuf` of [`DirectEvent`](crate::DirectEvent): one per closed pass-through
    /// connection, turned into the same record as a proxied one.
    pub const DIRECT_EVENTS: &str = "DIRECT_EVENTS";
    /// `HashMap<CircuitKey, u8>`: destinations whose circuit is open (they keep failing):
    /// the connect hooks refuse a workload's connect to them at once. User space inserts an
    /// entry when a circuit opens and removes it when the open period ends.
    pub const OPEN_CIRCUITS: &str = "OPEN_CIRCUITS";
    /// `HashMap<CircuitKey, u64>`: pass-through connections open to each destination of
    /// each workload, from their SYN to their close, for `DIRECT_CAPS`. Not an LRU: another
    /// workload's traffic must not be able to evict a count (which would lift the cap);
    /// [`ScopeUsage::destinations`](crate::ScopeUsage) bounds each workload's share instead.
    pub const DIRECT_COUNTS: &str = "DIRECT_COUNTS";
    /// `HashMap<u32 workload scope, u32>`: pass-through connections a workload may have open
    /// to one destination (ip:port); the connect hooks refuse (EPERM) a pass-through connect
    /// past it. No entry: no cap.
    pub const DIRECT_CAPS: &str = "DIRECT_CAPS";
    /// `LpmTrie<ScopedAddr, PortBitmap>`: the same prefixes and slots as `POLICY_OUT`; its
    /// ports must reach the proxy even where kernel pass-through is on (a `[[destination]]`
    /// table asks for connect retries or a connection cap, which only the proxy can give).
    /// Read only while the policy's [`policy_flags::PROXIED_PORTS`](crate::policy_flags) is
    /// set.
    pub const POLICY_PROXIED: &str = "POLICY_PROXIED";
    /// `PerCpuHashMap<u32 workload scope, ScopeCounters>`: the counters a workload's own
    /// programs runs can be charged to (its connects, its strict inbound drops), so the node
    /// agent can show each pod its own. User space creates a workload's entry (the programs
    /// only add to entries that exist) and removes it with the workload.
    pub const SCOPE_COUNTERS: &str = "SCOPE_COUNTERS";
    /// `HashMap<u32 workload scope, ScopeUsage>`: what each workload holds of the node-wide
    /// pass-through tables, so the connect hooks can hold its quota of them
    /// ([`limits::TRACKED_PER_POD`](crate::limits), [`limits::DESTINATIONS_PER_POD`]), and the
    /// close records the ring dropped for it. Made by the connect hook at a workload's first
    /// pass-through connect; removed by the agent with the pod.
    pub const SCOPE_USAGE: &str = "SCOPE_USAGE";
}

/// Capacities. Bounded, so a flood of connections evicts (LRU) instead of failing inserts.
pub mod limits {
    pub const WORKLOADS: u32 = 1024;
    /// Destination CIDRs one registered workload (pod) may exclude.
    pub const EXCLUDED_CIDRS_PER_POD: u32 = 64;
    /// Room for every pod's full quota (`WORKLOADS` holds two entries per pod), so one pod's
    /// exclusions can never leave another pod without room. An LPM trie is never
    /// preallocated: the size costs memory only as entries are added.
    pub const EXCLUDED_CIDRS: u32 = WORKLOADS / 2 * EXCLUDED_CIDRS_PER_POD;
    pub const COOKIE_ORIG_DST: u32 = 65_536;
    pub const PROXY_COOKIES: u32 = 65_536;
    pub const ORIG_DST: u32 = 65_536;
    pub const SPLICED: u32 = 131_072;
    pub const PASSTHRU: u32 = 65_536;
    pub const SOCKETS: u32 = 131_072;
    /// Ports a workload can exclude from interception.
    pub const EXCLUDED_PORTS: usize = 16;
    /// How many ancestor levels the connect hooks walk looking for a workload entry.
    pub const CGROUP_DEPTH: i32 = 16;
    pub const POLICY_STATE: u32 = 1024;
    /// Destination prefixes of one compiled outbound policy (one slot); the map holds two
    /// slots so a reload can fill one while the other is live.
    pub const POLICY_PREFIXES: u32 = 1024;
    /// Destination prefixes of one pod's compiled policy on a node (the node agent's maps are
    /// shared by every pod): 2 of them are always taken (the whole IPv6 and IPv4 spaces).
    pub const POLICY_PREFIXES_PER_POD: u32 = 32;
    /// Room for both slots of every pod's full quota (`WORKLOADS` holds two entries per pod),
    /// so no pod's policy can leave another without room; and for a standalone run's two
    /// slots of [`POLICY_PREFIXES`]. Never preallocated: an entry costs memory (its 8 KiB
    /// port bitmap) only once it is added.
    pub const POLICY_OUT: u32 = max(
        2 * POLICY_PREFIXES,
        WORKLOADS / 2 * 2 * POLICY_PREFIXES_PER_POD,
    );
    pub const POLICY_PROXIED: u32 = POLICY_OUT;
    /// Bytes of the deny event ring (a power of two, a multiple of the page size): about
    /// 8,000 events between two reads (user space reads every 100 ms); when it is full,
    /// events are dropped (`connect_policy_denied` still counts them).
    pub const POLICY_EVENTS_BYTES: u32 = 256 * 1024;
    /// Like `EXCLUDED_CIDRS`: every pod's full quota fits, so no pod's mesh CIDRs can leave
    /// another pod without room (with 1,024, sixteen pods of 64 filled it for the node).
    pub const MESH_CIDRS: u32 = WORKLOADS / 2 * EXCLUDED_CIDRS_PER_POD;
    /// Connects between the connect hook and their SYN (normally microseconds); LRU, so a
    /// connect that failed before sending a SYN cannot leak its entry. As large as
    /// `DIRECT_LIVE`: a pod's notes here count in its [`TRACKED_PER_POD`] with its live
    /// connections, so every pod's full quota fits here too and nobody's fresh note is
    /// evicted (about 20 MiB preallocated, 80 bytes an entry).
    pub const DIRECT_PENDING: u32 = DIRECT_LIVE;
    /// Open pass-through connections the kernel can track. Beyond that a connection goes
    /// through the proxy (the note at connect fails); only if the table fills between a
    /// connect and its SYN does one go direct unrecorded, counted in `direct_records_dropped`
    /// (the per-pod quotas below make that impossible for pods).
    pub const DIRECT_LIVE: u32 = 262_144;
    /// Pods a node agent can register (`WORKLOADS` holds two entries per pod: its app and
    /// its proxy).
    pub const PODS: u32 = WORKLOADS / 2;
    /// Pass-through connections one pod may have tracked at once (noted at connect, open,
    /// or closing), by default: 262,144 / 512 pods = 512, so every pod's full quota fits
    /// `DIRECT_PENDING` and `DIRECT_LIVE` at once and no pod can leave another's pass-through
    /// connections untracked. Past it, the pod's new connections go through its proxy (which
    /// records them). `sidecar agent --tracked-per-pod` sets it lower; `sidecar run` (one
    /// workload) has the whole table.
    pub const TRACKED_PER_POD: u32 = DIRECT_LIVE / PODS;
    /// Destinations one pod may have pass-through connections open to at once, by default:
    /// 65,536 / 512 pods / 2 = 64. Half the table, because the quota is checked at connect
    /// and an entry is made at the SYN: connects of one pod to new destinations racing on
    /// other CPUs can each pass the check, and the other half is room for them. Past it, the
    /// pod's connections to a further destination go through its proxy (which holds its cap
    /// there). `sidecar agent --destinations-per-pod` sets it lower.
    pub const DESTINATIONS_PER_POD: u32 = DIRECT_COUNTS / PODS / 2;
    /// One entry per workload.
    pub const SCOPE_USAGE: u32 = WORKLOADS;
    // The shares above are only a guarantee while they all fit at once.
    const _: () = assert!(TRACKED_PER_POD * PODS <= DIRECT_LIVE);
    const _: () = assert!(TRACKED_PER_POD * PODS <= DIRECT_PENDING);
    const _: () = assert!(2 * DESTINATIONS_PER_POD * PODS <= DIRECT_COUNTS);
    const _: () = assert!(PODS <= SCOPE_USAGE);
    /// About 7,700 close records (136 bytes each with the ring's header) between two reads;
    /// when it is full, records are dropped and counted. User space reads it on a timer
    /// (every 100 ms) and when woken.
    pub const DIRECT_EVENTS_BYTES: u32 = 1024 * 1024;
    /// Unread close records (bytes) from which sockops wakes the reader. Below it records are
    /// written without a wakeup, which costs the closing thread an interrupt (a VM exit in a
    /// guest) per connection, and the timer read collects them; above it, a burst faster than
    /// the timer can keep up with still wakes the reader with three quarters of the ring free.
    pub const DIRECT_EVENTS_WAKE_BYTES: u32 = DIRECT_EVENTS_BYTES / 4;
    /// Open circuits one pod may have refused in the kernel (the node agent's maps are shared
    /// by every pod); past it the pod's proxy still fails its own connects to them at once.
    pub const OPEN_CIRCUITS_PER_POD: u32 = 32;
    /// Destinations with an open circuit, all workloads together: every pod's quota (so no
    /// pod's failing destinations leave another without room), and a standalone run's 4,096
    /// (user space keeps at most that many failing destinations per proxy).
    pub const OPEN_CIRCUITS: u32 = max(4_096, WORKLOADS / 2 * OPEN_CIRCUITS_PER_POD);
    /// Destinations with pass-through connections open, all workloads together. A plain
    /// hash map: when it is full a new destination goes uncounted (which can only let
    /// connections through, never refuse one wrongly), and per-pod quotas
    /// ([`DESTINATIONS_PER_POD`]) keep any one pod from filling it.
    pub const DIRECT_COUNTS: u32 = 65_536;
    pub const DIRECT_CAPS: u32 = WORKLOADS;
    /// One entry per workload; allocated when user space adds it (not preallocated: an
    /// entry is `Counter::COUNT` × 8 bytes per CPU).
    pub const SCOPE_COUNTERS: u32 = WORKLOADS;

    const fn max(a: u32, b: u32) -> u32 {
        if a > b { a } else { b }
    }
}

/// Role of a cgroup in [`WorkloadConfig::role`].
pub mod role {
    /// Outbound TCP connects are redirected to the proxy.
    pub const WORKLOAD: u32 = 1;
    /// The proxy itself: never redirected; its loopback upstream sockets get spliced.
    pub const PROXY: u32 = 2;
}

/// Values of [`maps::SPLICED`]: whose socket it is.
///
/// Only the proxy's own sockets *send* through the fast path. A redirect into the peer's
/// receive queue has no backpressure, and when the receiver falls behind the kernel fails the
/// sender's write with `ENOMEM`: the proxy retries that, an application would not. So the
/// app's and a local server's writes take the TCP path (with TCP's flow control) and the
/// proxy's writes are spliced into their receive queues.
pub mod owner {
    /// The proxy's socket (accepted from the app, or connected to a local upstream).
    pub const PROXY: u32 = 1;
    /// Someone else's: the app's, or a local upstream server's.
    pub const FOREIGN: u32 = 2;
}

/// The SO_MARK of the proxy's outbound listeners under [`flags::CHECK_LISTENER`].
pub const PROXY_LISTENER_MARK: u32 = 0x5eca_0001;

/// Bits of [`WorkloadConfig::flags`].
pub mod flags {
    /// The proxy listens on `[::1]`: connect6 may redirect.
    pub const IPV6_LISTENER: u16 = 1;
    /// Refuse (EPERM) connects to the cloud metadata address ([`is_cloud_metadata`]); set
    /// by the loader unless `--allow-metadata`.
    pub const DENY_METADATA: u16 = 2;
    /// Kernel pass-through: a connect the proxy would add nothing to (plaintext, allowed by
    /// policy, to a destination outside `MESH_CIDRS`) goes straight to its destination and
    /// is recorded by sockops. Set by the loader unless `--proxy-all`.
    pub const PASSTHROUGH: u16 = 4;
    /// Redirect only to the proxy's own listener: the socket listening on the proxy port
    /// must carry [`PROXY_LISTENER_MARK`] (SO_MARK needs CAP_NET_ADMIN, so no unprivileged
    /// process can forge it), else the connect is refused. Set by `sidecar run`, whose proxy
    /// marks its listeners, and by the agent for pods whose sidecar passed it its listeners
    /// to mark; a killed proxy's port bound by anyone else then gets nothing.
    pub const CHECK_LISTENER: u16 = 8;
    /// Strict inbound: a new connection from outside the host (a SYN that did not arrive on
    /// `lo`) to a socket of this workload is dropped, so only the sidecar's tunnel, which
    /// delivers over `lo`, reaches the workload's listeners. Read by the `cgroup_skb`
    /// ingress program, which only `sidecar run --inbound-mode strict` and the agent attach.
    pub const STRICT_INBOUND: u16 = 16;
}

/// The socket options the agent's `cgroup/getsockopt` program answers for the unprivileged
/// proxy (any other call keeps the kernel's answer).
pub mod sockopt {
    /// `SOL_IP` and `SOL_IPV6`.
    pub const SOL_IP: i32 = 0;
    pub const SOL_IPV6: i32 = 41;
    /// `SO_ORIGINAL_DST` (netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` (ip6_tables.h): the
    /// original destination of an accepted redirected connection, as a `sockaddr`.
    pub const SO_ORIGINAL_DST: i32 = 80;
    /// Private (`SOL_IP`, either family): a `u32`, 1 if this socket is in the sockmap fast
    /// path. No kernel option has this number, so without the program the call fails with
    /// `ENOPROTOOPT` and nothing is claimed.
    pub const SO_SPLICED: i32 = 0x5343;
}

/// Per-cgroup configuration, keyed by cgroup id in [`maps::WORKLOADS`]. The connect hooks
/// use the entry of the deepest ancestor cgroup that has one, so child cgroups are covered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// One of [`role`].
    pub role: u32,
    /// Identifies the workload in [`ScopedAddr`] keys of the CIDR exclusion trie.
    pub scope: u32,
    /// Port of the proxy's outbound listener on 127.0.0.1 / [::1], host order.
    pub proxy_port: u16,
    /// Bits from [`flags`].
    pub flags: u16,
    /// Number of valid entries in `excluded_ports`.
    pub excluded_ports_len: u32,
    /// Destination ports that bypass the proxy, host order.
    pub excluded_ports: [u16; limits::EXCLUDED_PORTS],
}

impl WorkloadConfig {
    /// Whether `port` (host order) is in the exclusion list.
    #[inline(always)]
    pub fn excludes_port(&self, port: u16) -> bool {
        let mut i = 0;
        // Written as a bounded loop over the fixed array so the verifier accepts it.
        while i < limits::EXCLUDED_PORTS {
            if (i as u32) < self.excluded_ports_len && self.excluded_ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Key data of the CIDR exclusion trie: the workload's scope (big-endian, so it forms the
/// first 32 bits of the prefix) followed by the 16-byte address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopedAddr {
    pub scope: [u8; 4],
    pub addr: [u8; 16],
}

impl ScopedAddr {
    pub const fn new(scope: u32, addr: [u8; 16]) -> Self {
        Self {
            scope: scope.to_be_bytes(),
            addr,
        }
    }
}

/// Prefix length of an LPM key for a CIDR of `prefix` bits on `addr`: 32 bits of scope, plus
/// 96 bits of `::ffff:` for IPv4.
pub const fn lpm_prefix_len(is_ipv4: bool, prefix: u8) -> u32 {
    32 + if is_ipv4 { 96 } else { 0 } + prefix as u32
}

/// Which compiled policy is live for a workload ([`maps::POLICY_STATE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyState {
    /// 0 or 1: the half of [`maps::POLICY_OUT`] the connect hooks read.
    pub slot: u32,
    /// Bits from [`policy_flags`].
    pub flags: u32,
}

/// Bits of [`PolicyState::flags`].
pub mod policy_flags {
    /// Refuse connects whose destination port bit is set (off in dry-run mode).
    pub const ENFORCE: u32 = 1;
    /// The proxy must see every connection to log it (dry run, or `audit` rules): no
    /// kernel pass-through while this policy is live.
    pub const PROXY_SEES_ALL: u32 = 2;
    /// Some `[[destination]]` table needs the proxy: look its ports up in `POLICY_PROXIED`.
    pub const PROXIED_PORTS: u32 = 4;
}

/// Key scope of a workload's policy entries in slot `slot` (0 or 1) of [`maps::POLICY_OUT`].
#[inline(always)]
pub const fn policy_scope(workload_scope: u32, slot: u32) -> u32 {
    workload_scope.wrapping_mul(2).wrapping_add(slot & 1)
}

/// One bit per destination port (bit `p & 7` of byte `p >> 3`): a set of ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortBitmap {
    pub bits: [u8; 8192],
}

impl PortBitmap {
    pub const EMPTY: Self = Self { bits: [0; 8192] };

    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        // The index goes through a volatile read so LLVM cannot prove it in bounds and drop
        // the check in `get`: verifiers before ~6.18.44 lose the range of a byte-swapped port
        // (the connect hooks read it big-endian) and reject the map access without that check.
        let index = (port >> 3) as usize;
        // SAFETY: a read of a local we own.
        let index = unsafe { core::ptr::read_volatile(&index) };
        match self.bits.get(index) {
            Some(byte) => byte & (1u8 << (port & 7)) != 0,
            None => false,
        }
    }

    pub fn set(&mut self, port: u16) {
        self.bits[(port >> 3) as usize] |= 1u8 << (port & 7);
    }
}

/// A connect the outbound policy refused in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyDenyEvent {
    /// The destination, 16-byte form (network-order words, v4-mapped for IPv4).
    pub ip: [u32; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
    /// The calling process (thread group id).
    pub pid: u32,
    /// The workload's scope (its `WORKLOADS` entry's): the node agent names the pod by it,
    /// since the process may be gone by the time the event is read.
    pub scope: u32,
}

/// A pass-through connection while the kernel tracks it ([`maps::DIRECT_PENDING`],
/// [`maps::DIRECT_LIVE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectConn {
    /// `bpf_ktime_get_ns` at the connect hook.
    pub connect_ns: u64,
    /// `bpf_ktime_get_ns` when the handshake completed; 0 until then.
    pub established_ns: u64,
    /// The workload's scope ([`WorkloadConfig::scope`]): whose record it is.
    pub scope: u32,
    /// The connecting process (thread group id).
    pub pid: u32,
}

/// What one workload holds of the node-wide pass-through tables ([`maps::SCOPE_USAGE`]).
/// The kernel changes each field with atomic adds only; user space reads them and never
/// writes an entry that exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ScopeUsage {
    /// Its pass-through connections noted at connect and not yet closed (in
    /// `DIRECT_PENDING` or `DIRECT_LIVE`), plus connects racing to be noted.
    pub tracked: u64,
    /// Its entries in `DIRECT_COUNTS` (destinations it has pass-through connections open
    /// to), plus SYNs racing to add one.
    pub destinations: u64,
    /// Its close records the ring (`DIRECT_EVENTS`) had no room for.
    pub records_dropped: u64,
}

/// A pass-through connection that closed: what sockops read from the socket at its last
/// state change ([`maps::DIRECT_EVENTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirectEvent {
    /// The app's socket: local = the app, remote = the destination it asked for.
    pub key: SockKey,
    pub cookie: u64,
    pub conn: DirectConn,
    pub closed_ns: u64,
    /// Bytes the destination acknowledged (sent by the app).
    pub bytes_acked: u64,
    /// Bytes the app's socket received.
    pub bytes_received: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    pub total_retrans: u32,
    /// Smoothed RTT and minimum RTT, microseconds.
    pub srtt_us: u32,
    pub rtt_min_us: u32,
    /// The TCP state the socket left for `TCP_CLOSE` (e.g. `SYN_SENT` = 2 for a refused
    /// connect).
    pub last_state: u32,
}

/// An original destination, as the app asked for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct OrigDst {
    /// 16-byte address, network byte order words (v4-mapped for IPv4).
    pub ip: [u32; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// A destination of one workload whose circuit is open ([`maps::OPEN_CIRCUITS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct CircuitKey {
    pub dst: OrigDst,
    /// The workload's scope (as in [`WorkloadConfig::scope`]).
    pub scope: u32,
}

impl OrigDst {
    pub fn to_socket_addr(&self) -> SocketAddr {
        SocketAddr::new(ip_from_words(self.ip), self.port)
    }

    pub fn from_socket_addr(addr: SocketAddr) -> Self {
        Self {
            ip: words_from_ip(addr.ip()),
            port: addr.port(),
            _pad: 0,
        }
    }
}

/// A TCP socket's 4-tuple from its own point of view, qualified by its network namespace:
/// sockops sees every namespace, and `127.0.0.1:x → 127.0.0.1:y` can exist in several at once.
/// The peer's key is [`SockKey::peer`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    /// The kernel's network namespace cookie (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`).
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    /// Explicit padding to the 8-byte alignment, always zero (hash keys compare all bytes).
    pub _pad: u32,
}

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    #[inline(always)]
    pub fn peer(&self) -> Self {
        Self {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }

    pub fn from_addrs(netns: u64, local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            netns,
            local_ip: words_from_ip(local.ip()),
            remote_ip: words_from_ip(remote.ip()),
            local_port: local.port(),
            remote_port: remote.port(),
            _pad: 0,
        }
    }

    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(ip_from_words(self.local_ip), self.local_port)
    }

    pub fn remote(&self) -> SocketAddr {
        SocketAddr::new(ip_from_words(self.remote_ip), self.remote_port)
    }
}

/// The v4-mapped form of an IPv4 address given as the kernel gives it (network byte order
/// in a `u32`, i.e. its in-memory bytes are the address bytes).
#[inline(always)]
pub const fn mapped_v4(ip4_net: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_net]
}

/// Whether a 16-byte address is v4-mapped (`::ffff:a.b.c.d`): IPv4 through an IPv6 socket.
#[inline(always)]
pub const fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Return values of the cgroup connect hooks.
pub mod verdict {
    /// The connect proceeds (rewritten or not).
    pub const ALLOW: i32 = 1;
    /// The app's `connect()` fails with `EPERM`.
    pub const REFUSE: i32 = 0;
}

/// What a connect hook answers for its decision: `Ok(true)` lets the connect proceed,
/// `Ok(false)` refuses it (policy, metadata), and an error refuses it too. An error means a
/// map update the redirect depends on failed; letting such a connect through unredirected
/// would bypass mTLS and policy, so the hooks fail closed.
#[inline(always)]
pub const fn connect_verdict(decided: Result<bool, i64>) -> i32 {
    match decided {
        Ok(true) => verdict::ALLOW,
        Ok(false) | Err(_) => verdict::REFUSE,
    }
}

/// Whether a 16-byte address is loopback: `::1` or v4-mapped `127.0.0.0/8`.
#[inline(always)]
pub const fn is_loopback(ip: &[u32; 4]) -> bool {
    let w3 = ip[3].to_ne_bytes();
    if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 {
        return w3[0] == 0 && w3[1] == 0 && w3[2] == 0 && w3[3] == 1;
    }
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) && w3[0] == 127
}

/// Whether a 16-byte address is a cloud metadata address: v4-mapped `169.254.169.254`
/// (AWS, GCP, Azure, OpenStack, …) or AWS's IPv6 `fd00:ec2::254`.
#[inline(always)]
pub const fn is_cloud_metadata(ip: &[u32; 4]) -> bool {
    let (w2, w3) = (ip[2].to_ne_bytes(), ip[3].to_ne_bytes());
    let w0 = ip[0].to_ne_bytes();
    let v4 = ip[0] == 0
        && ip[1] == 0
        && w2[0] == 0
        && w2[1] == 0
        && w2[2] == 0xff
        && w2[3] == 0xff
        && w3[0] == 169
        && w3[1] == 254
        && w3[2] == 169
        && w3[3] == 254;
    let v6 = w0[0] == 0xfd
        && w0[1] == 0
        && w0[2] == 0x0e
        && w0[3] == 0xc2
        && ip[1] == 0
        && ip[2] == 0
        && w3[0] == 0
        && w3[1] == 0
        && w3[2] == 0x02
        && w3[3] == 0x54;
    v4 || v6
}

/// 16-byte form of an address (IPv4 becomes v4-mapped).
pub fn words_from_ip(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut words = [0u32; 4];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ]);
    }
    words
}

/// Inverse of [`words_from_ip`]: v4-mapped addresses come back as IPv4.
pub fn ip_from_words(words: [u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// 16-byte form of an IPv4 address, as bytes (for [`ScopedAddr`]).
pub fn mapped_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The proxy's outbound listener addresses: connects are rewritten to these.
pub const PROXY_IPV4: Ipv4Addr = Ipv4Addr::LOCALHOST;
pub const PROXY_IPV6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// Every decision the kernel half makes is counted in one per-CPU slot of
/// [`maps::COUNTERS`]. The discriminant is the slot index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// TCP connects seen from a workload cgroup (both families).
    ConnectSeen = 0,
    /// Connects rewritten to the proxy.
    ConnectRedirected,
    /// Connects left alone because the destination port is excluded.
    ConnectExcludedPort,
    /// Connects left alone because the destination address is in an excluded CIDR.
    ConnectExcludedCidr,
    /// Native IPv6 connects the proxy must see, refused (EPERM) because it has no IPv6
    /// listener.
    ConnectNoV6Listener,
    /// Connects from the proxy's own cgroup (never redirected).
    ConnectFromProxy,
    /// Original destinations published under a 4-tuple for the proxy to read.
    OrigDstPublished,
    /// Sockets inserted into the sockhash.
    SockhashInsert,
    /// Sockhash inserts the kernel refused.
    SockhashInsertFailed,
    /// Messages `sk_msg` redirected to the peer socket.
    SkMsgRedirected,
    /// Bytes in those messages.
    SkMsgRedirectedBytes,
    /// Messages that found no peer and went through the TCP stack.
    SkMsgMiss,
    /// Messages of sockets that had missed once and stay on the TCP path.
    SkMsgPassthru,
    /// Messages sent by an application's (not the proxy's) spliced socket: TCP path.
    SkMsgForeignSender,
    /// Splice bookkeeping entries removed when a socket closed.
    CloseCleanup,
    /// Connects refused (EPERM) because the outbound policy denies the destination.
    ConnectPolicyDenied,
    /// Plaintext connection attempts (SYN) from outside refused by strict inbound mode.
    StrictInboundDropped,
    /// Connects under the agent's cgroup root from a cgroup with no registration (a pod
    /// whose sidecar has not registered): passed through, not intercepted.
    ConnectNotMeshed,
    /// `SO_ORIGINAL_DST` answers the getsockopt program gave the proxy from `ORIG_DST`.
    OrigDstSockopt,
    /// Connects to the cloud metadata address refused (EPERM): [`flags::DENY_METADATA`].
    ConnectMetadataDenied,
    /// Workload connects refused (EPERM) because a map update the redirect needs failed
    /// (the original destination could not be noted): never let through unredirected.
    ConnectRedirectFailed,
    /// Workload connects let through to their own destination (kernel pass-through).
    ConnectPassthrough,
    /// Pass-through records lost: the event ring was full, or the live table was.
    DirectRecordsDropped,
    /// Connects refused (EPERM) because the destination's circuit is open.
    ConnectCircuitOpen,
    /// Pass-through connects refused (EPERM) because the workload already has
    /// its cap ([`maps::DIRECT_CAPS`]) of pass-through connections open to that destination.
    ConnectOverloaded,
    /// Workload connects refused (EPERM) because what listens on the proxy port is not the
    /// proxy ([`flags::CHECK_LISTENER`]): it died and something else bound the port, or
    /// nothing listens there.
    ConnectProxyNotListening,
    /// Pass-through connects sent through the proxy instead because the workload had its
    /// quota of tracked pass-through connections ([`limits::TRACKED_PER_POD`]).
    PassthroughOverQuota,
    /// Pass-through connects to a destination new to the workload sent through the proxy
    /// instead because it had pass-through connections open to its quota of destinations
    /// ([`limits::DESTINATIONS_PER_POD`]).
    PassthroughOverDestinations,
}

impl Counter {
    /// Every counter, in slot order, with its metric-friendly name.
    pub const ALL: [(Counter, &'static str); 28] = [
        (Counter::ConnectSeen, "connect_seen"),
        (Counter::ConnectRedirected, "connect_redirected"),
        (Counter::ConnectExcludedPort, "connect_excluded_port"),
        (Counter::ConnectExcludedCidr, "connect_excluded_cidr"),
        (Counter::ConnectNoV6Listener, "connect_no_v6_listener"),
        (Counter::ConnectFromProxy, "connect_from_proxy"),
        (Counter::OrigDstPublished, "orig_dst_published"),
        (Counter::SockhashInsert, "sockhash_insert"),
        (Counter::SockhashInsertFailed, "sockhash_insert_failed"),
        (Counter::SkMsgRedirected, "sk_msg_redirected"),
        (Counter::SkMsgRedirectedBytes, "sk_msg_redirected_bytes"),
        (Counter::SkMsgMiss, "sk_msg_miss"),
        (Counter::SkMsgPassthru, "sk_msg_passthru"),
        (Counter::SkMsgForeignSender, "sk_msg_foreign_sender"),
        (Counter::CloseCleanup, "close_cleanup"),
        (Counter::ConnectPolicyDenied, "connect_policy_denied"),
        (Counter::StrictInboundDropped, "strict_inbound_dropped"),
        (Counter::ConnectNotMeshed, "connect_not_meshed"),
        (Counter::OrigDstSockopt, "orig_dst_sockopt"),
        (Counter::ConnectMetadataDenied, "connect_metadata_denied"),
        (Counter::ConnectRedirectFailed, "connect_redirect_failed"),
        (Counter::ConnectPassthrough, "connect_passthrough"),
        (Counter::DirectRecordsDropped, "direct_records_dropped"),
        (Counter::ConnectCircuitOpen, "connect_circuit_open"),
        (Counter::ConnectOverloaded, "connect_overloaded"),
        (
            Counter::ConnectProxyNotListening,
            "connect_proxy_not_listening",
        ),
        (Counter::PassthroughOverQuota, "passthrough_over_quota"),
        (
            Counter::PassthroughOverDestinations,
            "passthrough_over_destinations",
        ),
    ];
    /// Number of slots in [`maps::COUNTERS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;
    /// The counters a workload has its own of: those of its connects and strict inbound
    /// drops (charged to [`maps::SCOPE_COUNTERS`] too) and its dropped close records (kept in
    /// [`maps::SCOPE_USAGE`]). The others (the sockmap splice, the original-destination
    /// answers, close cleanups) are the node's.
    pub const PER_WORKLOAD: [Counter; 17] = [
        Counter::ConnectSeen,
        Counter::ConnectRedirected,
        Counter::ConnectExcludedPort,
        Counter::ConnectExcludedCidr,
        Counter::ConnectNoV6Listener,
        Counter::ConnectFromProxy,
        Counter::ConnectPolicyDenied,
        Counter::StrictInboundDropped,
        Counter::ConnectMetadataDenied,
        Counter::ConnectRedirectFailed,
        Counter::ConnectPassthrough,
        Counter::ConnectCircuitOpen,
        Counter::ConnectOverloaded,
        Counter::ConnectProxyNotListening,
        Counter::PassthroughOverQuota,
        Counter::PassthroughOverDestinations,
        Counter::DirectRecordsDropped,
    ];

    /// The counter's name (as in [`Counter::ALL`]).
    pub fn name(self) -> &'static str {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i].0 as u32 == self as u32 {
                return Self::ALL[i].1;
            }
            i += 1;
        }
        "unknown"
    }
}

/// One workload's share of the [`Counter`]s ([`maps::SCOPE_COUNTERS`]), indexed as
/// [`maps::COUNTERS`] is; slots the programs never charge to a workload stay 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeCounters {
    pub counts: [u64; Counter::COUNT as usize],
}

impl Default for ScopeCounters {
    fn default() -> Self {
        Self {
            counts: [0; Counter::COUNT as usize],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made of integers only, with no padding
    // (checked by the layout tests below).
    unsafe impl aya::Pod for super::WorkloadConfig {}
    unsafe impl aya::Pod for super::ScopedAddr {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::PolicyState {}
    unsafe impl aya::Pod for super::PortBitmap {}
    unsafe impl aya::Pod for super::PolicyDenyEvent {}
    unsafe impl aya::Pod for super::DirectConn {}
    unsafe impl aya::Pod for super::DirectEvent {}
    unsafe impl aya::Pod for super::CircuitKey {}
    unsafe impl aya::Pod for super::ScopeCounters {}
    unsafe impl aya::Pod for super::ScopeUsage {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<CircuitKey>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<SockKey>(), 8 + 16 + 16 + 2 + 2 + 4);
        assert_eq!(offset_of!(SockKey, local_port), 40);
        assert_eq!(size_of::<OrigDst>(), 20);
        assert_eq!(size_of::<ScopedAddr>(), 20);
        assert_eq!(
            size_of::<WorkloadConfig>(),
            4 + 4 + 2 + 2 + 4 + 2 * limits::EXCLUDED_PORTS
        );
        assert_eq!(offset_of!(WorkloadConfig, excluded_ports), 16);
    }

    #[test]
    fn v4_is_stored_mapped_in_network_order() {
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        // The kernel hands IPv4 addresses over as a u32 whose bytes are the address bytes.
        let kernel_u32 = u32::from_ne_bytes(ip.octets());
        assert_eq!(words_from_ip(IpAddr::V4(ip)), mapped_v4(kernel_u32));
        assert_eq!(ip_from_words(mapped_v4(kernel_u32)), IpAddr::V4(ip));
        let bytes = mapped_octets(IpAddr::V4(ip));
        assert_eq!(&bytes[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&bytes[12..], &[10, 1, 2, 3]);
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "2001:db8::42".parse().unwrap();
        assert_eq!(ip_from_words(words_from_ip(ip)), ip);
        assert_eq!(words_from_ip(ip)[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn loopback_detection() {
        let lo4 = words_from_ip("127.0.0.1".parse().unwrap());
        let lo4b = words_from_ip("127.200.0.9".parse().unwrap());
        let lo6 = words_from_ip("::1".parse().unwrap());
        let other4 = words_from_ip("10.0.0.1".parse().unwrap());
        let other6 = words_from_ip("2001:db8::1".parse().unwrap());
        let any6 = words_from_ip("::".parse().unwrap());
        assert!(is_loopback(&lo4) && is_loopback(&lo4b) && is_loopback(&lo6));
        assert!(!is_loopback(&other4) && !is_loopback(&other6) && !is_loopback(&any6));
    }

    #[test]
    fn v4_mapped_detection() {
        for yes in ["10.1.2.3", "::ffff:127.0.0.1", "::ffff:0.0.0.0"] {
            assert!(is_v4_mapped(&words_from_ip(yes.parse().unwrap())), "{yes}");
        }
        for no in ["::1", "::", "2001:db8::1", "::a9fe:a9fe", "::fffe:a01:203"] {
            assert!(!is_v4_mapped(&words_from_ip(no.parse().unwrap())), "{no}");
        }
    }

    #[test]
    fn connect_hooks_fail_closed_on_map_errors() {
        assert_eq!(connect_verdict(Ok(true)), verdict::ALLOW);
        assert_eq!(connect_verdict(Ok(false)), verdict::REFUSE);
        // E2BIG, ENOMEM, EBUSY: whatever the map said, the connect is refused.
        for errno in [-7, -12, -16] {
            assert_eq!(connect_verdict(Err(errno)), verdict::REFUSE, "{errno}");
        }
    }

    #[test]
    fn cloud_metadata_detection() {
        for yes in ["169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"] {
            assert!(
                is_cloud_metadata(&words_from_ip(yes.parse().unwrap())),
                "{yes}"
            );
        }
        for no in [
            "169.254.169.253",
            "127.0.0.1",
            "fd00:ec2::253",
            "fd00:ec2:0:1::254",
            "::1",
            "169.254.0.1",
            "::a9fe:a9fe",
        ] {
            assert!(
                !is_cloud_metadata(&words_from_ip(no.parse().unwrap())),
                "{no}"
            );
        }
    }

    #[test]
    fn peer_key_reverses_the_tuple() {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let k = SockKey::from_addrs(7, a, b);
        assert_eq!(k.peer(), SockKey::from_addrs(7, b, a));
        assert_ne!(k, SockKey::from_addrs(8, a, b));
        assert_eq!(k.peer().peer(), k);
        assert_eq!((k.local(), k.remote()), (a, b));
    }

    #[test]
    fn orig_dst_round_trips() {
        for s in ["192.0.2.7:8080", "[2001:db8::7]:443"] {
            let addr: SocketAddr = s.parse().unwrap();
            assert_eq!(OrigDst::from_socket_addr(addr).to_socket_addr(), addr);
        }
    }

    #[test]
    fn port_exclusion_respects_len() {
        let mut cfg = WorkloadConfig {
            role: role::WORKLOAD,
            scope: 1,
            proxy_port: 15001,
            flags: 0,
            excluded_ports_len: 2,
            excluded_ports: [0; limits::EXCLUDED_PORTS],
        };
        cfg.excluded_ports[0] = 22;
        cfg.excluded_ports[1] = 5432;
        cfg.excluded_ports[2] = 80; // beyond len: ignored
        assert!(cfg.excludes_port(22) && cfg.excludes_port(5432));
        assert!(!cfg.excludes_port(80) && !cfg.excludes_port(0));
    }

    #[test]
    fn lpm_prefix_lengths() {
        assert_eq!(lpm_prefix_len(true, 8), 32 + 96 + 8);
        assert_eq!(lpm_prefix_len(false, 64), 32 + 64);
        assert_eq!(ScopedAddr::new(0x01020304, [0; 16]).scope, [1, 2, 3, 4]);
    }

    #[test]
    fn port_bitmap_bits() {
        let mut b = PortBitmap::EMPTY;
        for p in [0u16, 7, 8, 443, 65535] {
            b.set(p);
        }
        for p in [0u16, 7, 8, 443, 65535] {
            assert!(b.contains(p), "{p}");
        }
        for p in [1u16, 6, 9, 442, 444, 65534] {
            assert!(!b.contains(p), "{p}");
        }
        assert_eq!(size_of::<PolicyState>(), 8);
        assert_eq!(size_of::<PolicyDenyEvent>(), 28);
        assert_eq!(size_of::<DirectConn>(), 24);
        assert_eq!(size_of::<ScopeUsage>(), 24);
        assert_eq!(size_of::<DirectEvent>(), 48 + 8 + 24 + 8 + 16 + 24);
        assert_eq!(policy_scope(1, 0), 2);
        assert_eq!(policy_scope(1, 1), 3);
        assert_eq!(policy_scope(1, 3), 3);
    }

    /// Every byte of each type shared with the kernel (the `aya::Pod` ones) is initialized:
    /// aya copies map keys and values as raw bytes, and reading a padding byte is undefined
    /// behaviour. Under Miri (`cargo xtask miri`) such a read is an error.
    #[test]
    fn shared_types_are_made_of_initialized_bytes() {
        fn byte_sum<T: Copy>(v: &T) -> u64 {
            // SAFETY: size_of::<T>() bytes of a live value; undefined only if T has padding,
            // which is what this test (under Miri) checks.
            let bytes = unsafe {
                core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>())
            };
            bytes.iter().map(|b| u64::from(*b)).sum()
        }
        let addr: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let key = SockKey::from_addrs(7, addr, "[::1]:15001".parse().unwrap());
        let cfg = WorkloadConfig {
            role: role::WORKLOAD,
            scope: 1,
            proxy_port: 15001,
            flags: flags::IPV6_LISTENER | flags::DENY_METADATA,
            excluded_ports_len: 1,
            excluded_ports: [22; limits::EXCLUDED_PORTS],
        };
        let mut bitmap = PortBitmap::EMPTY;
        bitmap.set(443);
        let sums = [
            byte_sum(&key),
            byte_sum(&OrigDst::from_socket_addr(addr)),
            byte_sum(&cfg),
            byte_sum(&ScopedAddr::new(3, mapped_octets(addr.ip()))),
            byte_sum(&PolicyState { slot: 1, flags: 1 }),
            byte_sum(&bitmap),
            byte_sum(&PolicyDenyEvent {
                ip: words_from_ip(addr.ip()),
                port: 443,
                _pad: 0,
                pid: 1,
                scope: 2,
            }),
        ];
        assert!(sums.iter().all(|s| *s > 0), "{sums:?}");
        // The kernel-side reads of the same code paths.
        assert!(bitmap.contains(443) && !bitmap.contains(444));
        assert!(is_cloud_metadata(&words_from_ip(
            "169.254.169.254".parse().unwrap()
        )));
    }

    #[test]
    fn counter_table_matches_discriminants() {
        for (i, (c, _)) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
