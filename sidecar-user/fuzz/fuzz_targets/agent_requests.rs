//! The agent's request handling against its registry, on arbitrary sequences of requests
//! from arbitrary callers: registrations with any ports, CIDRs, caps and claims, from any
//! container of any pod or from outside the pods, by root or not; deregistrations, status,
//! records; pods' policies at registration and replaced (`policy`), valid, invalid, over the
//! pod's quota or too long; connections opened, left idle and closed. Between them, what the node does: pods
//! and sidecar containers come and go, the sweep runs, the agent restarts (with its state
//! directory or without), a kernel map refuses an insert.
//!
//! The requests go through the code the agent runs (`requests::answer`, `Registry`,
//! `PerCaller`), with the kernel maps in memory and the pods' cgroups as directories under a
//! scratch root (cgroup ids are their inodes). After every step:
//! - the maps hold exactly what the registrations imply (each pod's two `WORKLOADS` entries,
//!   its cap, its CIDR keys under its scope), worked out apart from the registry
//!   (`agent/expected.rs`);
//! - no registration holds more than its quota, scopes and cgroup ids are each one pod's;
//! - a refused request changed neither a map nor a registration;
//! - a registration is the caller's own pod's (the pod its cgroup says, the one it claimed,
//!   the one its connection registered before), keeps its scope, and changed no other pod's
//!   entries;
//! - a deregistration leaves nothing of the pod in the maps, its policy included;
//! - a pod's policy is in force (`POLICY_STATE`) exactly when its registration has one, and
//!   no policy entry belongs to a scope without one; a refused `policy` changes nothing in
//!   force;
//! - `status` is answered to uid 0 outside every pod only; records are only ever the caller's own pod's;
//! - the sweep drops exactly the pods whose cgroup went; registrations survive a restart;
//! - a caller (a pod, or a uid outside the pods) holds at most its share of connections,
//!   and gets each back when one closes.
#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use libfuzzer_sys::fuzz_target;
use sidecar_common::limits;

#[path = "../../src/cidr.rs"]
#[allow(dead_code)]
mod cidr;

// The cgroup reader names its sibling `super::mounts`: both sit at the crate root here.
#[path = "../../src/host/cgroup.rs"]
#[allow(dead_code)]
mod cgroup;

#[path = "../../src/host/mounts.rs"]
#[allow(dead_code)]
mod mounts;

/// `crate::host::cgroup`, as the registry names it.
mod host {
    pub(crate) use super::cgroup;
}

// The policy's parser and compiler, as the agent validates a pod's policy with them. Their
// modules name each other as siblings (`super::rules`), so all sit at the crate root, and
// `crate::policy` names the two the agent uses.
#[path = "../../src/tls/identity.rs"]
#[allow(dead_code)]
mod identity;

/// `crate::tls::identity`, as the parser names it.
mod tls {
    pub(crate) use super::identity;
}

#[path = "../../src/telemetry/labels.rs"]
#[allow(dead_code)]
mod labels;

/// `crate::telemetry::labels`, as the parser names it.
mod telemetry {
    pub(crate) use super::labels;
}

#[path = "../../src/policy/rules.rs"]
#[allow(dead_code)]
mod rules;

#[path = "../../src/policy/destinations.rs"]
#[allow(dead_code)]
mod destinations;

#[path = "../../src/policy/schema.rs"]
#[allow(dead_code)]
mod schema;

#[path = "../../src/policy/kernel.rs"]
#[allow(dead_code)]
mod kernel;

#[path = "../../src/policy/load.rs"]
#[allow(dead_code)]
mod load;

/// `crate::policy`, as the agent names it.
mod policy {
    pub(crate) use super::{kernel, load};
}

#[path = "../../src/registration.rs"]
#[allow(dead_code)]
mod registration;

mod agent;

use agent::{
    callers::{self, CallerSlot, MAX_PER_CALLER, PerCaller},
    expected::{contents, implied, keys_of_scope, policy_scopes},
    memory_maps::MemoryMaps,
    pod::{self, PodCgroup},
    pod_maps::PodMaps,
    registry::{self, Registration, Registry},
    requests::{self, Caller, Outcome, Refusal, Session},
};

const UIDS: [&str; 3] = [
    "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    "11111111-2222-3333-4444-555555555555",
    "abcdef00-0000-0000-0000-000000000001",
];
const CONTAINERS: usize = 3;
const CONNECTIONS: usize = 4;
const MAX_STEPS: usize = 48;

/// The fuzzer's bytes, read as they are needed (zeros once they run out).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let Some((b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        *b
    }
}

/// One connection to the agent: its process's uid and cgroup, and what it registered.
struct Connection {
    uid: u32,
    pid: u32,
    cgroup: PathBuf,
    session: Session,
    /// Its caller's name, and its place among the caller's connections (`None`: refused,
    /// the caller held too many; requests on it go unanswered).
    caller: String,
    slot: Option<CallerSlot>,
}

/// The node: the pods' cgroups, the agent's registry and maps, the open connections.
struct Node {
    state_dir: PathBuf,
    root: PathBuf,
    registry: Registry,
    maps: MemoryMaps,
    connections: Vec<Connection>,
    per_caller: Arc<PerCaller>,
    /// Connections callers hold open without using them.
    idle: Vec<(String, CallerSlot)>,
    buried: usize,
}

impl Node {
    fn pod_dir(&self, pod: usize) -> PathBuf {
        self.root
            .join("burstable")
            .join(format!("pod{}", UIDS[pod]))
    }

    fn container(&self, pod: usize, container: usize) -> PathBuf {
        self.pod_dir(pod).join(format!("c{container}"))
    }

    fn create_pod(&self, pod: usize) {
        for c in 0..CONTAINERS {
            fs::create_dir_all(self.container(pod, c)).unwrap();
        }
    }

    /// Removes a cgroup directory: moved out of the pods' root rather than deleted, so no
    /// later directory reuses its inode (the kernel never reuses a cgroup id; a disk
    /// filesystem reuses inodes).
    fn bury(&mut self, dir: &Path) {
        self.buried += 1;
        fs::rename(dir, self.state_dir.join(format!("gone{}", self.buried))).unwrap();
    }

    /// A process connects: it gets a place among its caller's connections unless the caller
    /// holds as many as it may.
    fn connect(&self, uid: u32, pid: u32, cgroup: PathBuf) -> Connection {
        let caller = callers::name(pod::derive(&self.root, &cgroup).ok().as_ref(), uid);
        let open = self
            .connections
            .iter()
            .filter(|c| c.slot.is_some() && c.caller == caller);
        let idle = self.idle.iter().filter(|(c, _)| *c == caller);
        let open = open.count() + idle.count();
        let slot = self.per_caller.take(&caller);
        assert_eq!(
            slot.is_some(),
            open < MAX_PER_CALLER,
            "{caller} holds {open}"
        );
        Connection {
            uid,
            pid,
            cgroup,
            session: Session::default(),
            caller,
            slot,
        }
    }

    /// The caller's pod, as the server derives it from the cgroup.
    fn pod_of(&self, conn: usize) -> Result<PodCgroup, Refusal> {
        pod::derive(&self.root, &self.connections[conn].cgroup)
            .map_err(|e| Refusal::new(e.reason(), e))
    }

    fn pods(&self) -> BTreeMap<String, Registration> {
        let pods = self.registry.pods().map(|r| (r.pod_uid.clone(), r.clone()));
        pods.collect()
    }
}

/// Holds after every step.
fn check_node(node: &Node) {
    let pods = node.pods();
    let quota = registry::cidr_quota(node.maps.cidr_capacity());
    let mut scopes = BTreeSet::new();
    let mut cgroups = BTreeSet::new();
    for r in pods.values() {
        assert!(r.exclude_cidrs.len() <= quota && r.mesh_cidrs.len() <= quota);
        assert!(r.exclude_ports.len() <= limits::EXCLUDED_PORTS);
        assert_ne!(r.proxy_port, 0);
        assert!(!r.passthrough || node.maps.passthrough_capable);
        assert!(scopes.insert(r.scope), "scope {} held twice", r.scope);
        assert!(cgroups.insert(r.pod_cgroup_id) && cgroups.insert(r.proxy_cgroup_id));
        let excluded = node.maps.excluded.keys();
        let of_pod = excluded.filter(|k| k.1 == r.scope.to_be_bytes()).count();
        assert!(
            of_pod <= quota,
            "pod {} holds {of_pod} exclusions",
            r.pod_uid
        );
    }
    assert_eq!(
        contents(&node.maps),
        implied(&pods, &node.maps),
        "the maps are not what the registrations imply"
    );
    // Open circuits: only registered pods', each within its share.
    let mut circuits: BTreeMap<u32, u32> = BTreeMap::new();
    for key in &node.maps.circuits {
        *circuits.entry(key.scope).or_default() += 1;
    }
    for (scope, n) in circuits {
        assert!(
            scopes.contains(&scope),
            "open circuits of scope {scope}, which no pod has"
        );
        assert!(
            n <= limits::OPEN_CIRCUITS_PER_POD,
            "scope {scope} holds {n} circuits"
        );
    }
    if let Some(policy) = &node.maps.policy {
        let with_policy: BTreeSet<u32> = pods
            .values()
            .filter(|r| r.policy.is_some())
            .map(|r| r.scope)
            .collect();
        let live: BTreeSet<u32> = policy.states.keys().copied().collect();
        assert_eq!(
            live, with_policy,
            "policies in force are not the registrations'"
        );
        assert!(
            policy_scopes(policy).is_subset(&with_policy),
            "policy entries of a scope without a policy: {:?} (registered {with_policy:?})",
            policy_scopes(policy)
        );
        let quota = registry::policy_quota(policy.capacity);
        for r in pods.values().filter(|r| r.policy.is_some()) {
            let slot = policy.states[&r.scope].slot;
            let owner = (r.scope * 2 + slot).to_be_bytes();
            let live_keys = policy.denied.keys().filter(|k| k.1 == owner).count();
            assert!(
                (2..=quota).contains(&live_keys),
                "pod {} has {live_keys} prefixes in force",
                r.pod_uid
            );
        }
    }
}

/// A policy text for a register or `policy` request: valid ones (with and without a
/// destination table, dry run), and ones the agent must refuse (invalid, empty, cut short,
/// over a pod's quota, too long).
fn policy_text(bytes: &mut Bytes) -> String {
    let pick = bytes.byte();
    match pick % 8 {
        0 => format!(
            "[[rule]]\naction = \"deny\"\ndestinations = [\"10.{}.0.0/16\"]\nports = [{}]\n",
            bytes.byte(),
            bytes.byte()
        ),
        1 => "[[destination]]\ndestinations = [\"10.1.0.0/16\"]\nconnect_retries = 2\n".into(),
        2 => "dry_run = true\n[defaults]\noutbound = \"deny\"\n".into(),
        3 => "[[rule]]\naction = \"maybe\"\n".into(),
        4 => "# nothing\n".into(),
        5 => "[defaults]\noutbound = \"deny\"".into(),
        6 => (0..40)
            .map(|i| format!("[[rule]]\naction = \"deny\"\ndestinations = [\"10.9.{i}.0/24\"]\n"))
            .collect(),
        _ => format!(
            "# {}\n[defaults]\noutbound = \"allow\"\n",
            "x".repeat(registration::MAX_POLICY)
        ),
    }
}

fn cidr_list(bytes: &mut Bytes) -> Vec<String> {
    const POOL: [&str; 14] = [
        "10.0.0.0/8",
        "10.0.0.1/8",
        "10.1.0.0/16",
        "10.1.2.3/32",
        "10.1.2.3",
        "0.0.0.0/0",
        "fd00::/8",
        "fd00::1/8",
        "2001:db8::/32",
        "::/0",
        "192.168.0.0/16",
        "::ffff:10.0.0.0/104",
        "10.0.0.0/33",
        "bogus",
    ];
    let n = bytes.byte();
    // Mostly short lists, sometimes around the full quota of 64.
    let n = if n & 0x80 != 0 {
        60 + usize::from(n % 8)
    } else {
        usize::from(n % 5)
    };
    (0..n)
        .map(|_| match bytes.byte() {
            b if usize::from(b) < POOL.len() * 16 => POOL[usize::from(b) % POOL.len()].to_string(),
            b => format!("10.{}.{}.0/{}", b, bytes.byte(), 8 + bytes.byte() % 25),
        })
        .collect()
}

fn register_request(bytes: &mut Bytes) -> registration::Request {
    let claim = match bytes.byte() % 6 {
        k @ 0..3 => UIDS[usize::from(k)].to_string(),
        3 => UIDS[0].to_ascii_uppercase().replace('-', "_"),
        4 => format!(" {} ", UIDS[1]),
        _ => "not-a-pod".to_string(),
    };
    let switches = bytes.byte();
    registration::Request::Register {
        pod_uid: claim,
        proxy_port: match bytes.byte() {
            0 => 0,
            p => 15000 + u16::from(p),
        },
        inbound_port: u16::from(bytes.byte()),
        exclude_ports: (0..bytes.byte() % 20)
            .map(|_| u16::from(bytes.byte()))
            .collect(),
        exclude_cidrs: cidr_list(bytes),
        ipv6: switches & 1 != 0,
        allow_metadata: switches & 2 != 0,
        passthrough: switches & 4 != 0,
        passthrough_cap: (switches & 8 != 0).then(|| u32::from(bytes.byte())),
        mesh_cidrs: cidr_list(bytes),
        // Named but never passed (no descriptors travel here): refused, as by the agent.
        listeners: (switches >> 4) & 3,
        policy: (switches & 64 != 0).then(|| policy_text(bytes)),
        strict_inbound: switches & 128 != 0,
    }
}

/// One request on connection `conn`, and what must hold of its outcome.
fn request(node: &mut Node, conn: usize, req: registration::Request) {
    let before = contents(&node.maps);
    let pods_before = node.pods();
    let session_before = node.connections[conn].session.pod_uid.clone();
    let derived = node.pod_of(conn);
    let claim = match &req {
        registration::Request::Register { pod_uid, .. } => Some(pod::canonical_uid(pod_uid)),
        _ => None,
    };
    let is_status = req == registration::Request::Status;
    let caller = Caller {
        pid: node.connections[conn].pid,
        uid: node.connections[conn].uid,
    };
    let pod = node.pod_of(conn);
    let Node {
        registry,
        maps,
        connections,
        ..
    } = node;
    let outcome = requests::answer(
        registry,
        maps,
        caller,
        || pod,
        |named, _, _| match named {
            0 => Ok(None),
            n => Err(Refusal::new(
                "bad_listener",
                format!("the request names {n} listener(s) and none came with it"),
            )),
        },
        req,
        &mut connections[conn].session,
        None,
    );
    let session = node.connections[conn].session.pod_uid.clone();
    let pods = node.pods();
    match outcome {
        Outcome::Registered(reg) => {
            let derived = derived.expect("registered a caller outside the pods");
            assert_eq!(
                reg.pod_uid, derived.uid,
                "registered another pod than the caller's"
            );
            assert_eq!(Some(&reg.pod_uid), claim.as_ref());
            assert_eq!(reg.pod_cgroup, derived.pod);
            assert_eq!(reg.proxy_cgroup, derived.container);
            assert!(
                session_before.as_ref().is_none_or(|u| *u == reg.pod_uid),
                "a connection that registered {session_before:?} registered {}",
                reg.pod_uid
            );
            assert_eq!(session.as_ref(), Some(&reg.pod_uid));
            assert_eq!(pods.get(&reg.pod_uid), Some(&reg));
            if let Some(prev) = pods_before.get(&reg.pod_uid)
                && prev.pod_cgroup_id == reg.pod_cgroup_id
            {
                assert_eq!(prev.scope, reg.scope, "a re-registration changed the scope");
            }
            let others = |p: &BTreeMap<String, Registration>| {
                let mut p = p.clone();
                p.remove(&reg.pod_uid);
                p
            };
            assert_eq!(others(&pods_before), others(&pods), "another pod changed");
            // Every entry of another pod is as it was.
            let other_entries = |m: &MemoryMaps| -> Vec<_> {
                let entries = others(&pods).into_values().map(|r| {
                    let workloads = [r.pod_cgroup_id, r.proxy_cgroup_id]
                        .map(|id| m.workloads.get(&id).copied());
                    let cap = m.caps.as_ref().map(|c| c.get(&r.scope).copied());
                    let policy = m.policy.as_ref().map(|p| p.states.get(&r.scope).copied());
                    (workloads, cap, keys_of_scope(m, r.scope), policy)
                });
                entries.collect()
            };
            assert_eq!(other_entries(&before), other_entries(&node.maps));
        }
        Outcome::Deregistered(uid) => {
            assert_eq!(session_before.as_ref(), Some(&uid));
            assert_eq!(session, None);
            assert!(!pods.contains_key(&uid));
            if let Some(gone) = pods_before.get(&uid) {
                let maps = &node.maps;
                assert!(!maps.workloads.contains_key(&gone.pod_cgroup_id));
                assert!(!maps.workloads.contains_key(&gone.proxy_cgroup_id));
                assert!(
                    maps.caps
                        .as_ref()
                        .is_none_or(|c| !c.contains_key(&gone.scope))
                );
                assert_eq!(keys_of_scope(maps, gone.scope), []);
                assert!(
                    maps.policy
                        .as_ref()
                        .is_none_or(|p| !p.holds_scope(gone.scope)),
                    "the deregistered pod's policy stayed"
                );
            }
        }
        Outcome::PolicyReplaced(uid) => {
            assert_eq!(session_before.as_ref(), Some(&uid));
            assert_eq!(session, session_before);
            let reg = &pods[&uid];
            assert_eq!(reg.scope, pods_before[&uid].scope);
            assert!(reg.policy.is_some());
            let others = |p: &BTreeMap<String, Registration>| {
                let mut p = p.clone();
                p.remove(&uid);
                p
            };
            assert_eq!(others(&pods_before), others(&pods), "another pod changed");
        }
        Outcome::Circuit => {
            assert!(
                session_before.is_some(),
                "a circuit of a connection that registered nothing"
            );
            assert_eq!(session, session_before);
            assert_eq!(pods_before, pods, "a circuit changed a registration");
            let uid = session.expect("registered");
            let scope = pods[&uid].scope;
            let others = |m: &MemoryMaps| -> BTreeSet<_> {
                m.circuits
                    .iter()
                    .filter(|k| k.scope != scope)
                    .copied()
                    .collect()
            };
            assert_eq!(
                others(&before),
                others(&node.maps),
                "another pod's circuits changed"
            );
        }
        Outcome::Counters(_) => {
            let derived = derived.expect("counters for a caller outside the pods");
            assert!(
                pods.values().any(|r| r.pod_uid == derived.uid),
                "counters of a pod that is not registered"
            );
            assert_eq!(before, contents(&node.maps));
            assert_eq!(pods_before, pods);
        }
        Outcome::Status => {
            assert!(
                is_status && caller.uid == 0,
                "status answered to uid {}",
                caller.uid
            );
            assert!(
                derived
                    .as_ref()
                    .is_err_and(|e| e.reason == pod::OUTSIDE_PODS),
                "status answered to a caller in a pod: {derived:?}"
            );
            assert_eq!(before, contents(&node.maps));
        }
        Outcome::Refused(refusal) | Outcome::Failed(refusal) => {
            assert_eq!(
                before,
                contents(&node.maps),
                "refused ({}) but the maps changed",
                refusal.reason
            );
            assert_eq!(
                pods_before, pods,
                "refused ({}) but a registration changed",
                refusal.reason
            );
            if refusal.reason != "internal" {
                assert_eq!(session_before, session);
            }
            let node_root = caller.uid == 0
                && derived
                    .as_ref()
                    .is_err_and(|e| e.reason == pod::OUTSIDE_PODS);
            assert!(
                !is_status || !node_root,
                "status refused to the node's root"
            );
        }
    }
}

/// `records` on connection `conn`: only ever the caller's own pod's.
fn records(node: &Node, conn: usize) {
    let Ok(pod) = node.pod_of(conn) else { return };
    match requests::records_scope(&node.registry, &pod) {
        Ok(scope) => {
            let mut owners = node.registry.pods().filter(|r| r.scope == scope);
            let owner = owners.next().expect("the scope of a registration");
            assert_eq!(owner.pod_uid, pod.uid, "records of another pod");
            assert!(owner.passthrough, "records of a pod without pass-through");
            assert!(owners.next().is_none());
        }
        Err(_) => {
            let mut pods = node.registry.pods();
            assert!(!pods.any(|r| r.pod_uid == pod.uid && r.passthrough));
        }
    }
}

fn step(node: &mut Node, bytes: &mut Bytes) {
    let conn = usize::from(bytes.byte()) % CONNECTIONS;
    let op = bytes.byte() % 15;
    if (op <= 5 || op >= 12) && node.connections[conn].slot.is_none() {
        // A refused connection was closed: its requests are never read.
        return;
    }
    match op {
        0..=2 => {
            let req = register_request(bytes);
            request(node, conn, req);
        }
        3 => request(node, conn, registration::Request::Deregister),
        4 => request(node, conn, registration::Request::Status),
        5 => {
            records(node, conn);
            request(node, conn, registration::Request::Records);
        }
        6 => match bytes.byte() % 3 {
            0 => {
                // The connection closes; its process connects again, from anywhere.
                let pod = usize::from(bytes.byte()) % UIDS.len();
                let container = usize::from(bytes.byte()) % CONTAINERS;
                let cgroup = match bytes.byte() % 6 {
                    0 => node.pod_dir(pod),
                    1 => node.root.join("../system.slice/sshd.service"),
                    2 => node.container(pod, container).join("nested"),
                    _ => node.container(pod, container),
                };
                let uid = if bytes.byte() % 4 == 0 { 0 } else { 1000 };
                let pid = node.connections[conn].pid + 100;
                let Node {
                    registry,
                    maps,
                    connections,
                    ..
                } = &mut *node;
                requests::connection_ended(registry, maps, &connections[conn].session);
                node.connections[conn].slot = None;
                node.connections[conn] = node.connect(uid, pid, cgroup);
            }
            1 => {
                // The connection's caller opens another one and leaves it idle.
                let c = &node.connections[conn];
                let idle = node.connect(c.uid, c.pid, c.cgroup.clone());
                if let Some(slot) = idle.slot {
                    node.idle.push((idle.caller, slot));
                }
            }
            _ => {
                if !node.idle.is_empty() {
                    let i = usize::from(bytes.byte()) % node.idle.len();
                    node.idle.swap_remove(i);
                }
            }
        },
        7 => {
            // A pod goes away, or (its UID again) comes back as a new cgroup.
            let pod = usize::from(bytes.byte()) % UIDS.len();
            let dir = node.pod_dir(pod);
            if dir.exists() {
                node.bury(&dir);
            } else {
                node.create_pod(pod);
            }
        }
        8 => {
            // A container's processes start or end (a sidecar crashes, or restarts as a new
            // container cgroup).
            let pod = usize::from(bytes.byte()) % UIDS.len();
            let dir = node.container(pod, usize::from(bytes.byte()) % CONTAINERS);
            let procs = dir.join("cgroup.procs");
            match bytes.byte() % 3 {
                0 => drop(fs::write(procs, "4242\n")),
                1 => drop(fs::remove_file(procs)),
                _ => {
                    if dir.exists() {
                        node.bury(&dir);
                        fs::create_dir_all(&dir).unwrap();
                    }
                }
            }
        }
        9 => {
            // The sweep.
            let pods_before = node.pods();
            let gone = node.registry.reconcile(&mut node.maps);
            let gone = match gone {
                Ok(gone) => gone,
                Err(_) => {
                    // A map refused an insert: the next sweep repairs what this one left.
                    assert!(node.maps.fail_insert_in.is_none());
                    node.registry
                        .reconcile(&mut node.maps)
                        .expect("the sweep repairs")
                }
            };
            for uid in &gone {
                let r = &pods_before[uid];
                assert_ne!(host::cgroup::id(&r.pod_cgroup).ok(), Some(r.pod_cgroup_id));
            }
            for r in node.registry.pods() {
                assert_eq!(host::cgroup::id(&r.pod_cgroup).ok(), Some(r.pod_cgroup_id));
            }
        }
        10 => node.maps.fail_insert_in = Some(u32::from(bytes.byte() % 8)),
        12 => {
            let text = policy_text(bytes);
            request(node, conn, registration::Request::Policy { text });
        }
        13 => {
            // A few destinations, so opens and closes meet, and sometimes past the pod's share.
            let dst = std::net::SocketAddr::from(([10, 0, 0, 9], u16::from(bytes.byte() % 40)));
            let open = bytes.byte() % 3 != 0;
            request(node, conn, registration::Request::Circuit { dst, open });
        }
        14 => request(node, conn, registration::Request::Counters),
        _ => {
            // The agent restarts: it reads the registrations back and reconciles.
            let pods = node.pods();
            node.maps.fail_insert_in = None;
            if bytes.byte() % 4 == 0 {
                // With its state directory lost: the pinned entries no registration explains
                // are kept for a grace period (none here: time does not pass in the target),
                // then removed by the sweep.
                let _ = fs::remove_file(node.state_dir.join(registry::FILE));
                node.registry = Registry::load(&node.state_dir).unwrap();
                node.registry.hold(&node.maps, std::time::Duration::ZERO);
            } else {
                node.registry = Registry::load(&node.state_dir).unwrap();
                let restored = node.pods();
                assert_eq!(
                    pods, restored,
                    "the registrations did not survive a restart"
                );
            }
            node.registry.reconcile(&mut node.maps).unwrap();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    // On tmpfs if there is one: every step may create and move directories.
    let scratch = Path::new("/dev/shm")
        .is_dir()
        .then(|| PathBuf::from("/dev/shm"))
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("sidecar-agent-fuzz-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    let root = scratch.join("kubepods");
    fs::create_dir_all(&root).unwrap();
    let shape = bytes.byte();
    let maps = MemoryMaps {
        // This build's tries, an older build's smaller ones, ones too small for any CIDR.
        excluded_capacity: [limits::EXCLUDED_CIDRS, 1024, 3 * 512 + 1, 511][usize::from(shape % 4)],
        meshed_capacity: [limits::MESH_CIDRS, 1024, 511, 2 * 512][usize::from((shape >> 5) % 4)],
        caps: (shape & 4 == 0).then(BTreeMap::new),
        meshed: (shape & 8 == 0).then(BTreeMap::new),
        passthrough_capable: shape & 16 == 0,
        ..MemoryMaps::default()
    };
    let mut node = Node {
        registry: Registry::load(&scratch).unwrap(),
        state_dir: scratch.clone(),
        root,
        maps,
        connections: Vec::new(),
        per_caller: Arc::new(PerCaller::default()),
        idle: Vec::new(),
        buried: 0,
    };
    for pod in 0..UIDS.len() {
        node.create_pod(pod);
    }
    for i in 0..CONNECTIONS {
        // Connection 3 is from another container of the first pod.
        let cgroup = node.container(i % UIDS.len(), i / UIDS.len());
        let conn = node.connect(1000, 100 + i as u32, cgroup);
        node.connections.push(conn);
    }
    for _ in 0..MAX_STEPS {
        if bytes.0.is_empty() {
            break;
        }
        step(&mut node, &mut bytes);
        check_node(&node);
    }
    let _ = fs::remove_dir_all(&scratch);
});
