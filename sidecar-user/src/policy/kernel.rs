//! The kernel half of the outbound policy: compiled from the same [`Policy`] the proxy
//! evaluates, into an LPM trie of destination prefixes whose values are port bitmaps, which
//! the connect hooks consult (a set bit → the app's `connect()` fails with EPERM).
//!
//! Outbound rules match on destination address and port, and optionally on the verified
//! identity of the server (`servers`), which only exists after the proxy's handshake: the
//! kernel lets those rules' connections through to the proxy (see [`at_connect`]), so
//! everything else in the outbound policy is a function of the destination and the kernel
//! enforces it. Compilation: take every destination prefix any
//! outbound rule names, plus `::/0` and `::ffff:0:0/96` (the IPv4 space, so an IPv6 rule
//! never reaches an IPv4 address — the proxy's `Cidr::contains` does the same). An address
//! whose longest matching prefix is `P` is matched, by address, by exactly the rules whose
//! prefix contains `P` (prefixes are nested or disjoint) and the rules without
//! destinations; first match over *those* rules, port by port, gives `P`'s bitmap. So the
//! trie's longest-prefix lookup and first-match evaluation agree for every address and port
//! — `tests::kernel_and_proxy_agree` checks it exhaustively over chosen points, and the
//! integration test checks the real kernel against `sidecar policy check`.
//!
//! Each prefix has a second bitmap, in a second trie with the same keys (`POLICY_PROXIED`):
//! the ports whose connects must reach the proxy even where kernel pass-through is on,
//! because the first `[[destination]]` table that matches them asks for connect retries or a
//! connection cap, which only the proxy can give. Tables are first-match over nested prefixes
//! too, so they compile the same way.

use std::{collections::BTreeSet, net::IpAddr};

use sidecar_common::{
    PolicyState, PortBitmap, ScopedAddr, limits, lpm_prefix_len, maps, policy_flags, policy_scope,
};
use thiserror::Error;

use super::{
    destinations::DestinationSettings,
    rules::{Action, Policy, PortRange},
};
use crate::{cidr::Cidr, telemetry::labels::Direction};

/// A prefix in the 128-bit space where IPv4 is v4-mapped (`::ffff:a.b.c.d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: u128,
    /// 0..=128
    pub len: u8,
}

const V4_MAPPED: Prefix = Prefix {
    addr: 0xffff << 32,
    len: 96,
};
const ALL: Prefix = Prefix { addr: 0, len: 0 };

impl Prefix {
    fn of(cidr: &Cidr) -> Self {
        let (addr, len) = match cidr.addr {
            IpAddr::V4(a) => (
                (0xffff_u128 << 32) | u128::from(u32::from(a)),
                96 + cidr.prefix,
            ),
            IpAddr::V6(a) => (u128::from(a), cidr.prefix),
        };
        Self {
            addr: addr & mask(len),
            len,
        }
    }

    fn contains(&self, other: &Prefix) -> bool {
        self.len <= other.len && other.addr & mask(self.len) == self.addr
    }

    fn contains_addr(&self, addr: u128) -> bool {
        addr & mask(self.len) == self.addr
    }

    pub fn bytes(&self) -> [u8; 16] {
        self.addr.to_be_bytes()
    }
}

fn mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

fn addr_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => (0xffff_u128 << 32) | u128::from(u32::from(a)),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (0xffff_u128 << 32) | u128::from(u32::from(v4)),
            None => u128::from(a),
        },
    }
}

/// One trie entry.
#[derive(Clone)]
pub struct Entry {
    pub prefix: Prefix,
    pub denied_ports: Box<PortBitmap>,
    pub proxied_ports: Box<PortBitmap>,
}

/// The compiled outbound policy.
#[derive(Clone)]
pub struct Compiled {
    pub entries: Vec<Entry>,
    /// False in dry-run mode: the maps are filled (so they can be inspected) but not obeyed.
    pub enforce: bool,
    /// The kernel's verdict is not the whole story, so no connection may bypass the proxy:
    /// dry run and `audit` rules are logged by the proxy, and a rule naming `servers` is
    /// decided after the handshake (the kernel lets its connections through, see
    /// [`at_connect`]).
    pub proxy_sees_all: bool,
    /// Some entry has proxied ports: the connect hooks must look them up.
    pub proxies_some: bool,
}

#[derive(Debug, Error)]
pub enum KernelPolicyError {
    #[error(
        "the outbound rules and [[destination]] tables name {0} distinct destination prefixes; \
         the kernel map holds {max} per policy: merge CIDRs",
        max = limits::POLICY_PREFIXES
    )]
    TooManyPrefixes(usize),
    #[error("kernel policy map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Compiles the outbound half of `policy` (see the module docs).
pub fn compile(policy: &Policy) -> Result<Compiled, KernelPolicyError> {
    let outbound: Vec<_> = policy
        .rules
        .iter()
        .filter(|r| r.direction != Some(Direction::Inbound))
        .collect();
    let mut prefixes: BTreeSet<Prefix> = [ALL, V4_MAPPED].into_iter().collect();
    for r in &outbound {
        prefixes.extend(r.destinations.iter().map(Prefix::of));
    }
    for t in &policy.destinations {
        prefixes.extend(t.destinations.iter().map(Prefix::of));
    }
    if prefixes.len() > limits::POLICY_PREFIXES as usize {
        return Err(KernelPolicyError::TooManyPrefixes(prefixes.len()));
    }
    let entries = prefixes
        .iter()
        .map(|p| {
            let rules = outbound
                .iter()
                .filter(|r| r.destinations.is_empty() || names(&r.destinations, p));
            let tables = policy
                .destinations
                .iter()
                .filter(|t| names(&t.destinations, p));
            Entry {
                prefix: *p,
                denied_ports: port_bitmap(
                    rules.map(|r| (r.ports.as_slice(), at_connect(r) == Action::Deny)),
                    policy.default_outbound == Action::Deny,
                ),
                proxied_ports: port_bitmap(
                    tables.map(|t| (t.ports.as_slice(), needs_proxy(t))),
                    false,
                ),
            }
        })
        .collect();
    let proxy_sees_all = policy.dry_run
        || outbound
            .iter()
            .any(|r| r.action == Action::Audit || !r.peers.is_empty());
    Ok(Compiled {
        entries,
        enforce: !policy.dry_run,
        proxy_sees_all,
        proxies_some: policy.destinations.iter().any(needs_proxy),
    })
}

/// Whether one of `cidrs` covers every address of `p`, the trie's prefix. An IPv6 block never
/// covers the IPv4 space (as in the proxy's `Cidr::contains`).
fn names(cidrs: &[Cidr], p: &Prefix) -> bool {
    let in_v4 = V4_MAPPED.contains(p);
    cidrs
        .iter()
        .any(|c| (c.addr.is_ipv4() || !in_v4) && Prefix::of(c).contains(p))
}

/// Whether the destinations of a `[[destination]]` table must reach the proxy: it asks for
/// connect retries or a connection cap. (Its circuit settings hold for pass-through
/// connections too: the proxy counts their failures from the kernel's records.)
pub fn needs_proxy(t: &DestinationSettings) -> bool {
    t.connect_retries.is_some_and(|n| n > 0) || t.max_connections.is_some()
}

/// What a rule does at `connect()`, before any handshake. A rule that names `servers`
/// depends on who answers the tunnel, which only the proxy learns: the kernel lets its
/// connections through (an allow here), and the proxy decides after the handshake with
/// the same first-match order. So the kernel refuses only what the proxy would refuse
/// whoever answered.
fn at_connect(rule: &super::rules::Rule) -> Action {
    if rule.peers.is_empty() {
        rule.action
    } else {
        Action::Allow
    }
}

/// First match, port by port, over `rules` (their port ranges, and whether a port they
/// match is in the set), else `default`.
fn port_bitmap<'a>(
    rules: impl Iterator<Item = (&'a [PortRange], bool)>,
    default: bool,
) -> Box<PortBitmap> {
    let mut decided = vec![false; 65536];
    let mut undecided = 65536usize;
    let mut bitmap = Box::new(PortBitmap::EMPTY);
    let full = [PortRange {
        first: 0,
        last: u16::MAX,
    }];
    for (ports, set) in rules {
        let ranges = if ports.is_empty() { &full[..] } else { ports };
        for r in ranges {
            for p in r.first..=r.last {
                if !decided[usize::from(p)] {
                    decided[usize::from(p)] = true;
                    undecided -= 1;
                    if set {
                        bitmap.set(p);
                    }
                }
            }
        }
        if undecided == 0 {
            return bitmap;
        }
    }
    if default {
        for p in 0..=u16::MAX {
            if !decided[usize::from(p)] {
                bitmap.set(p);
            }
        }
    }
    bitmap
}

impl Compiled {
    /// What the connect hook's lookup returns for `ip:port` (longest prefix, then the bit),
    /// computed in user space: for tests and `sidecar policy check`.
    pub fn denies(&self, ip: IpAddr, port: u16) -> bool {
        self.enforce
            && self
                .lookup(ip)
                .is_some_and(|e| e.denied_ports.contains(port))
    }

    /// Whether the connect hook sends a connect to `ip:port` to the proxy instead of letting
    /// it pass through, because a `[[destination]]` table needs the proxy (computed in user
    /// space, as [`Compiled::denies`]).
    pub fn proxies(&self, ip: IpAddr, port: u16) -> bool {
        self.enforce
            && self.proxies_some
            && self
                .lookup(ip)
                .is_some_and(|e| e.proxied_ports.contains(port))
    }

    /// The entry of the longest prefix holding `ip`.
    fn lookup(&self, ip: IpAddr) -> Option<&Entry> {
        let bits = addr_bits(ip);
        self.entries
            .iter()
            .filter(|e| e.prefix.contains_addr(bits))
            .max_by_key(|e| e.prefix.len)
    }
}

/// The two tries a compiled policy fills: `POLICY_OUT` (denied ports) and `POLICY_PROXIED`
/// (ports that must reach the proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyTrie {
    Denied,
    Proxied,
}

impl PolicyTrie {
    pub const ALL: [PolicyTrie; 2] = [PolicyTrie::Denied, PolicyTrie::Proxied];

    pub fn map_name(self) -> &'static str {
        match self {
            PolicyTrie::Denied => maps::POLICY_OUT,
            PolicyTrie::Proxied => maps::POLICY_PROXIED,
        }
    }
}

/// A key of the policy tries: prefix length (32 bits of slot scope, then the address's) and
/// the scoped address, as the kernel's LPM trie takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotKey {
    pub prefix_len: u32,
    pub data: ScopedAddr,
}

impl SlotKey {
    /// The workload scope whose policy this key belongs to, and the slot (see
    /// [`policy_scope`]).
    pub fn owner(&self) -> (u32, u32) {
        let slot_scope = u32::from_be_bytes(self.data.scope);
        (slot_scope / 2, slot_scope % 2)
    }
}

/// The policy maps as the few operations installing a policy needs: the pinned maps
/// ([`pinned::PinnedPolicyMaps`](super::pinned::PinnedPolicyMaps)) and, for the agent's tests
/// and fuzz target, maps in memory. Removing what is not there succeeds.
pub trait PolicyMaps {
    /// Entries `POLICY_OUT` holds (shared by every scope of these maps).
    fn capacity(&self) -> u32;
    /// `POLICY_STATE[scope]`.
    fn state(&self, scope: u32) -> Option<PolicyState>;
    /// Every scope with a `POLICY_STATE` entry.
    fn scopes(&self) -> Vec<u32>;
    fn set_state(&mut self, scope: u32, state: PolicyState) -> Result<(), KernelPolicyError>;
    fn remove_state(&mut self, scope: u32);
    /// Every key of `trie` (all scopes).
    fn keys(&self, trie: PolicyTrie) -> Vec<SlotKey>;
    fn insert(
        &mut self,
        trie: PolicyTrie,
        key: &SlotKey,
        ports: &PortBitmap,
    ) -> Result<(), KernelPolicyError>;
    fn remove(&mut self, trie: PolicyTrie, key: &SlotKey);
}

/// One workload's policy in the kernel: which slot is live and the keys of each. Installing
/// fills the slot that is not live (in both tries), then flips `POLICY_STATE` to it in one
/// map update: the connect hooks read the slot once per connect, so they see the old policy
/// or the new one, never a mix. The old slot is left as it is until the next install (a hook
/// that read the state just before the flip may still be looking in it), which empties it
/// first.
///
/// A slot is filled most specific prefix first and emptied least specific first, so a hook
/// that looks into one half done finds either the entry a full slot would give it or no entry
/// at all — never a shorter prefix's (the /0 entry's allow where a longer one denies) — and
/// the hook sends a miss to the proxy.
#[derive(Debug)]
pub struct PolicySlots {
    scope: u32,
    live: Option<u32>,
    keys: [Vec<SlotKey>; 2],
    /// `POLICY_STATE` before the last install, for [`PolicySlots::undo_install`].
    before: Option<PolicyState>,
}

impl PolicySlots {
    /// A scope with nothing in the maps.
    pub fn new(scope: u32) -> Self {
        Self {
            scope,
            live: None,
            keys: [Vec::new(), Vec::new()],
            before: None,
        }
    }

    /// What the maps hold for `scope` already (an earlier process installed it: the agent
    /// before a restart): the live slot from `POLICY_STATE`, each slot's keys found by
    /// walking both tries. The next install then empties the right slot, and
    /// [`PolicySlots::remove`] leaves nothing behind.
    pub fn adopt(maps: &(impl PolicyMaps + ?Sized), scope: u32) -> Self {
        let mut slots = Self::new(scope);
        slots.live = maps.state(scope).map(|s| s.slot & 1);
        for trie in PolicyTrie::ALL {
            for key in maps.keys(trie) {
                let (owner, slot) = key.owner();
                let keys = &mut slots.keys[slot as usize];
                if owner == scope && !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        // Emptied least specific first: the reverse of this order.
        for keys in &mut slots.keys {
            keys.sort_by_key(|k| std::cmp::Reverse(k.prefix_len));
        }
        slots
    }

    pub fn scope(&self) -> u32 {
        self.scope
    }

    /// Whether a policy is live for the scope.
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// Puts `compiled` in force for the scope (see the type's docs). On failure the slot
    /// being filled is emptied again and the policy in force stays.
    pub fn install(
        &mut self,
        maps: &mut (impl PolicyMaps + ?Sized),
        compiled: &Compiled,
    ) -> Result<(), KernelPolicyError> {
        let slot = self.live.map_or(0, |s| 1 - s);
        self.clear(maps, slot);
        let mut entries: Vec<_> = compiled.entries.iter().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.prefix.len));
        for e in entries {
            let key = SlotKey {
                prefix_len: lpm_prefix_len(false, e.prefix.len),
                data: ScopedAddr::new(policy_scope(self.scope, slot), e.prefix.bytes()),
            };
            // Every prefix in both tries (when any port is proxied), so the longest-prefix
            // lookup finds the same entry in each.
            self.keys[slot as usize].push(key);
            let inserted = maps
                .insert(PolicyTrie::Denied, &key, &e.denied_ports)
                .and_then(|()| {
                    if !compiled.proxies_some {
                        return Ok(());
                    }
                    maps.insert(PolicyTrie::Proxied, &key, &e.proxied_ports)
                });
            if let Err(e) = inserted {
                self.clear(maps, slot);
                return Err(e);
            }
        }
        let state = PolicyState {
            slot,
            flags: if compiled.enforce {
                policy_flags::ENFORCE
            } else {
                0
            } | if compiled.proxy_sees_all {
                policy_flags::PROXY_SEES_ALL
            } else {
                0
            } | if compiled.proxies_some {
                policy_flags::PROXIED_PORTS
            } else {
                0
            },
        };
        let before = maps.state(self.scope);
        if let Err(e) = maps.set_state(self.scope, state) {
            self.clear(maps, slot);
            return Err(e);
        }
        self.live = Some(slot);
        self.before = before;
        Ok(())
    }

    /// Puts the policy that was in force before the last install back in force (a
    /// registration that could not be completed after it): `POLICY_STATE` flips back to the
    /// old slot, which the install left intact, and the new slot is emptied; with none
    /// before, the scope's policy is removed.
    pub fn undo_install(&mut self, maps: &mut (impl PolicyMaps + ?Sized)) {
        let Some(before) = self.before.take() else {
            self.remove(maps);
            return;
        };
        let Some(new) = self.live else { return };
        if maps.set_state(self.scope, before).is_ok() {
            self.live = Some(before.slot & 1);
            self.clear(maps, new);
        }
    }

    /// Takes the scope's policy out of force and empties both slots: `POLICY_STATE` first,
    /// so no connect looks into a slot being emptied.
    pub fn remove(&mut self, maps: &mut (impl PolicyMaps + ?Sized)) {
        maps.remove_state(self.scope);
        self.live = None;
        for slot in [0, 1] {
            self.clear(maps, slot);
        }
    }

    /// Empties `slot`, least specific prefix first (the reverse of filling).
    fn clear(&mut self, maps: &mut (impl PolicyMaps + ?Sized), slot: u32) {
        for key in self.keys[slot as usize].drain(..).rev() {
            for trie in PolicyTrie::ALL {
                maps.remove(trie, &key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{
        policy::{rules::Request, schema::parse},
        telemetry::labels::Direction,
    };

    /// The kernel's verdict (computed the way the hook looks it up) equals the proxy's
    /// evaluation, for every probe address × port, across policies that overlap, nest,
    /// mix families and use defaults.
    #[test]
    fn kernel_and_proxy_agree() {
        let policies = [
            r#"
            [defaults]
            outbound = "deny"
            [[rule]]
            action = "allow"
            destinations = ["10.0.0.0/8"]
            ports = ["1000-2000"]
            [[rule]]
            action = "deny"
            destinations = ["10.1.0.0/16"]
            [[rule]]
            action = "audit"
            direction = "outbound"
            destinations = ["10.1.2.0/24", "2001:db8::/32"]
            ports = [443]
            [[rule]]
            action = "allow"
            destinations = ["::/0"]
            "#,
            r#"
            [[rule]]
            action = "deny"
            destinations = ["192.0.2.0/24"]
            ports = [22, "6000-6100"]
            [[rule]]
            action = "deny"
            ports = [25]
            [[rule]]
            action = "allow"
            direction = "inbound"
            sources = ["spiffe://td"]
            [[rule]]
            action = "deny"
            destinations = ["fd00::/8", "0.0.0.0/0"]
            ports = ["7000-7001"]
            "#,
            r#"
            dry_run = true
            [defaults]
            outbound = "deny"
            "#,
        ];
        let addrs = [
            "10.0.0.1",
            "10.1.0.1",
            "10.1.2.3",
            "10.2.0.1",
            "11.0.0.1",
            "192.0.2.9",
            "192.0.3.1",
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "2001:db8::1",
            "2001:db9::1",
            "fd00::5",
            "::1",
            "::ffff:10.1.2.3",
        ];
        let ports = [
            0u16, 22, 25, 443, 999, 1000, 1500, 2000, 2001, 6050, 7000, 7002, 65535,
        ];
        for text in policies {
            let policy = parse(text).unwrap();
            let compiled = compile(&policy).unwrap();
            for a in addrs {
                let ip: IpAddr = a.parse().unwrap();
                for &port in &ports {
                    let d = policy.evaluate(&Request {
                        direction: Direction::Outbound,
                        peer: None,
                        dst: (ip, port).into(),
                    });
                    assert_eq!(
                        compiled.denies(ip, port),
                        d.refuse,
                        "{a}:{port} in policy {text}"
                    );
                }
            }
        }
    }

    /// A connect goes to the proxy exactly when the first `[[destination]]` table matching it
    /// (as the proxy picks it) asks for retries or a cap, over nested and overlapping tables
    /// of both families, with and without ports.
    #[test]
    fn kernel_proxies_what_destination_tables_need() {
        let text = r#"
            [[destination]]
            destinations = ["10.1.2.0/24"]
            ports = [5432]
            connect_retries = 0
            [[destination]]
            destinations = ["10.1.0.0/16"]
            connect_retries = 3
            [[destination]]
            destinations = ["10.0.0.0/8", "2001:db8::/32"]
            ports = ["1000-2000"]
            max_connections = 10
            [[destination]]
            destinations = ["0.0.0.0/0"]
            circuit_failures = 2
        "#;
        let policy = parse(text).unwrap();
        let compiled = compile(&policy).unwrap();
        let mut proxied = 0;
        for a in [
            "10.1.2.3",
            "10.1.3.1",
            "10.2.0.1",
            "11.0.0.1",
            "2001:db8::1",
            "2001:db9::1",
            "::1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            for port in [0u16, 999, 1000, 1500, 2000, 2001, 5432, 65535] {
                let want = policy
                    .destination((ip, port).into())
                    .is_some_and(needs_proxy);
                assert_eq!(compiled.proxies(ip, port), want, "{a}:{port}");
                assert!(!compiled.denies(ip, port), "{a}:{port}");
                proxied += usize::from(want);
            }
        }
        // 10.1.3.1 and 10.1.2.3 (all but 5432) by retries; 10.2.0.1 and 2001:db8::1 in
        // 1000-2000 by the cap.
        assert_eq!(proxied, 8 + 7 + 3 + 3);
    }

    /// The same agreement over random policies (nested and overlapping prefixes of both
    /// families, including IPv6 blocks that contain the IPv4-mapped range, port ranges, all
    /// actions, both defaults) and probes inside and around those prefixes and range edges.
    #[test]
    fn kernel_and_proxy_agree_on_random_policies() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let bases: [(&str, u8); 8] = [
            ("0.0.0.0", 0),
            ("::", 0),
            ("10.0.0.0", 8),
            ("10.1.0.0", 16),
            ("10.1.2.0", 24),
            ("192.0.2.0", 24),
            ("2001:db8::", 32),
            ("2001:db8:1::", 48),
        ];
        let mut checked = 0;
        for _ in 0..300 {
            let mut text = format!(
                "[defaults]\noutbound = \"{}\"\n",
                if next() % 2 == 0 { "allow" } else { "deny" }
            );
            for _ in 0..(next() % 6 + 1) {
                let action = ["allow", "deny", "audit"][(next() % 3) as usize];
                text.push_str(&format!("[[rule]]\naction = \"{action}\"\n"));
                if next() % 4 != 0 {
                    let (b, len) = bases[(next() % bases.len() as u64) as usize];
                    let max = if b.contains(':') { 128 } else { 32 };
                    let len = (u32::from(len) + (next() % 9) as u32).min(max);
                    let addr = match b.parse::<IpAddr>().unwrap() {
                        IpAddr::V4(a) => IpAddr::V4(
                            (u32::from(a) & u32::MAX.checked_shl(32 - len).unwrap_or(0)).into(),
                        ),
                        IpAddr::V6(a) => IpAddr::V6(
                            (u128::from(a) & u128::MAX.checked_shl(128 - len).unwrap_or(0)).into(),
                        ),
                    };
                    text.push_str(&format!("destinations = [\"{addr}/{len}\"]\n"));
                }
                if next() % 3 != 0 {
                    let first = next() % 100;
                    let last = first + next() % 50;
                    text.push_str(&format!("ports = [\"{first}-{last}\"]\n"));
                }
            }
            // Random rules may contradict each other; those files are refused, skip them.
            let Ok(policy) = parse(&text) else { continue };
            let compiled = compile(&policy).unwrap();
            let probes = [
                "10.0.0.1",
                "10.1.0.1",
                "10.1.2.3",
                "10.1.3.1",
                "10.200.0.1",
                "192.0.2.1",
                "192.0.3.1",
                "2001:db8::1",
                "2001:db8:1::1",
                "2001:db8:2::1",
                "fd00::1",
                "::1",
            ];
            for a in probes {
                let ip: IpAddr = a.parse().unwrap();
                for port in [0u16, 1, 25, 49, 50, 99, 100, 148, 149, 150, 65535] {
                    let d = policy.evaluate(&Request {
                        direction: Direction::Outbound,
                        peer: None,
                        dst: (ip, port).into(),
                    });
                    assert_eq!(compiled.denies(ip, port), d.refuse, "{a}:{port} in\n{text}");
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 10_000,
            "too few valid random policies: {checked} checks"
        );
    }

    #[test]
    fn too_many_prefixes_is_an_error() {
        let mut text = String::new();
        for i in 0..1100 {
            text.push_str(&format!(
                "[[rule]]\naction = \"deny\"\ndestinations = [\"10.{}.{}.0/24\"]\n",
                i / 256,
                i % 256
            ));
        }
        let policy = parse(&text).unwrap();
        assert!(matches!(
            compile(&policy),
            Err(KernelPolicyError::TooManyPrefixes(1102))
        ));
    }

    /// A rule naming `servers` is decided by the proxy after the handshake: the kernel lets
    /// its connections through at connect() (it cannot know the server), even when a later
    /// rule denies them, and never refuses what the proxy would admit for some server.
    #[test]
    fn rules_on_the_server_identity_are_left_to_the_proxy() {
        use std::net::SocketAddr;

        use crate::tls::identity::SpiffeId;

        let policy = parse(
            r#"
            [[rule]]
            action = "allow"
            direction = "outbound"
            destinations = ["10.0.5.0/24"]
            ports = [5432]
            servers = ["spiffe://td/ns/db/sa/postgres"]
            [[rule]]
            action = "deny"
            destinations = ["10.0.0.0/8"]
            [[rule]]
            action = "deny"
            direction = "outbound"
            servers = ["spiffe://td/ns/evil/*"]
            "#,
        )
        .unwrap();
        let compiled = compile(&policy).unwrap();
        let ids: Vec<SpiffeId> = ["spiffe://td/ns/db/sa/postgres", "spiffe://td/ns/other/sa/x"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for (dst, kernel_refuses) in [
            ("10.0.5.7:5432", false),
            ("10.0.5.7:5433", true),
            ("10.9.0.1:5432", true),
            ("192.0.2.1:443", false),
        ] {
            let dst: SocketAddr = dst.parse().unwrap();
            assert_eq!(
                compiled.denies(dst.ip(), dst.port()),
                kernel_refuses,
                "{dst}"
            );
            let proxy_refuses = |peer: Option<&SpiffeId>| {
                policy
                    .evaluate(&Request {
                        direction: Direction::Outbound,
                        peer,
                        dst,
                    })
                    .refuse
            };
            if kernel_refuses {
                assert!(proxy_refuses(None) && ids.iter().all(|id| proxy_refuses(Some(id))));
            }
        }
        let postgres = Some(&ids[0]);
        let db: SocketAddr = "10.0.5.7:5432".parse().unwrap();
        let decide = |peer| {
            policy
                .evaluate(&Request {
                    direction: Direction::Outbound,
                    peer,
                    dst: db,
                })
                .refuse
        };
        assert!(!decide(postgres) && decide(Some(&ids[1])) && decide(None));
    }
}
