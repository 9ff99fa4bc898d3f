//! What a request on the registration socket does once its caller is pinned: the checks on
//! what the caller claims, and the registry's work. The [`server`](super::server) reads the
//! caller (its pid, uid and cgroup) and writes the answer; everything between is here, apart
//! from the socket, so the agent's fuzz target drives the same code against maps in memory.

use super::{
    listener::Verified,
    pod::{self, PodCgroup},
    pod_maps::PodMaps,
    registry::{self, PodPolicy, Registration, Registry},
};
use crate::registration::{MAX_POLICY, Request};

/// What one connection has registered: it may deregister only that pod, and never register
/// another.
#[derive(Debug, Default)]
pub struct Session {
    pub pod_uid: Option<String>,
    /// Which of the pod's registrations this connection made (`Registration::registrations`):
    /// when it ends, what it held goes only if no newer connection registered the pod since.
    pub registration: u64,
}

/// Who sent a request, as SO_PEERCRED says.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
}

/// A request not done: `reason` is its counter, `error` the one line answered.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub error: String,
    /// The node's condition rather than the request's: the sidecar tries again later.
    pub retry: bool,
}

impl Refusal {
    pub fn new(reason: &'static str, error: impl ToString) -> Self {
        Self {
            reason,
            error: error.to_string(),
            retry: false,
        }
    }
}

/// What became of a request; the server answers it.
#[derive(Debug)]
pub enum Outcome {
    Registered(Registration),
    Deregistered(String),
    /// The pod's policy was replaced (`policy`).
    PolicyReplaced(String),
    /// A circuit of the pod was opened or closed in the kernel (`circuit`).
    Circuit,
    /// The caller's pod's own kernel counters (`counters`).
    Counters(std::collections::BTreeMap<&'static str, u64>),
    /// `status` from root on the node, outside every pod: the server writes it.
    Status,
    /// Refused: counted under its reason and logged as the caller's.
    Refused(Refusal),
    /// Not done, and not the caller's refusal to count: the agent's own failure, or a
    /// request with no place here.
    Failed(Refusal),
}

/// Does `req` of `caller` on a connection with `session`. `pod` reads the caller's pod from
/// its cgroup, afresh: a registration needs it, and `status`, which only a caller outside
/// every pod gets, or one in `agent_pod` (the agent's own pod, where its probes run).
/// `listeners` checks the listeners that came with a registration (how many it names, its
/// proxy port, whether IPv6): `None` for a sidecar that passes none.
#[allow(clippy::too_many_arguments)]
pub fn answer(
    registry: &mut Registry,
    maps: &mut impl PodMaps,
    caller: Caller,
    pod: impl FnOnce() -> Result<PodCgroup, Refusal>,
    listeners: impl FnOnce(u8, u16, bool) -> Result<Option<Verified>, Refusal>,
    req: Request,
    session: &mut Session,
    agent_pod: Option<&str>,
) -> Outcome {
    let pid = caller.pid;
    match req {
        Request::Register {
            pod_uid,
            proxy_port,
            inbound_port,
            exclude_ports,
            exclude_cidrs,
            ipv6,
            allow_metadata,
            passthrough,
            passthrough_cap,
            mesh_cidrs,
            listeners: named,
            policy,
            strict_inbound,
        } => {
            let pod = match pod() {
                Ok(p) => p,
                Err(refusal) => return Outcome::Refused(refusal),
            };
            let claimed = pod::canonical_uid(&pod_uid);
            // The answer never names the pod the caller is really in: only the claim it sent.
            if claimed != pod.uid {
                return Outcome::Refused(Refusal::new(
                    "uid_mismatch",
                    format!(
                        "pid {pid} claims pod {claimed} but is not in that pod's cgroup: set \
                         POD_UID from the downward API (metadata.uid)"
                    ),
                ));
            }
            if session.pod_uid.as_ref().is_some_and(|u| *u != pod.uid) {
                return Outcome::Refused(Refusal::new(
                    "uid_mismatch",
                    "this connection registered another pod already",
                ));
            }
            let cidrs: Result<Vec<crate::cidr::Cidr>, _> =
                exclude_cidrs.iter().map(|c| c.parse()).collect();
            let exclude_cidrs = match cidrs {
                Ok(c) => c,
                Err(e) => {
                    let error = format!("exclude_cidrs: {e}");
                    return Outcome::Refused(Refusal::new("bad_request", error));
                }
            };
            let cidrs: Result<Vec<crate::cidr::Cidr>, _> =
                mesh_cidrs.iter().map(|c| c.parse()).collect();
            let mesh_cidrs = match cidrs {
                Ok(c) => c,
                Err(e) => {
                    let error = format!("mesh_cidrs: {e}");
                    return Outcome::Refused(Refusal::new("bad_request", error));
                }
            };
            let policy = match policy.map(|text| check_policy(&pod.uid, text)) {
                None => None,
                Some(Ok(p)) => Some(p),
                Some(Err(refusal)) => return Outcome::Refused(refusal),
            };
            let listeners = match listeners(named, proxy_port, ipv6) {
                Ok(l) => l,
                Err(refusal) => return Outcome::Refused(refusal),
            };
            let req = registry::Request {
                pod,
                pid,
                proxy_port,
                inbound_port,
                exclude_ports,
                exclude_cidrs,
                ipv6,
                allow_metadata,
                passthrough,
                passthrough_cap,
                mesh_cidrs,
                listeners,
                policy,
                strict_inbound,
            };
            match registry.register(maps, req) {
                Ok(reg) => {
                    session.pod_uid = Some(reg.pod_uid.clone());
                    session.registration = reg.registrations;
                    Outcome::Registered(reg)
                }
                Err(e) => Outcome::Refused(Refusal {
                    retry: e.retry(),
                    ..Refusal::new(e.reason(), e)
                }),
            }
        }
        Request::Policy { text } => {
            let Some(uid) = session.pod_uid.clone() else {
                return Outcome::Refused(Refusal::new(
                    "not_registered",
                    "policy: this connection has not registered a pod",
                ));
            };
            let policy = match check_policy(&uid, text) {
                Ok(p) => p,
                Err(refusal) => return Outcome::Refused(refusal),
            };
            match registry.set_policy(maps, &uid, policy) {
                Ok(()) => Outcome::PolicyReplaced(uid),
                Err(e) => Outcome::Refused(Refusal {
                    retry: e.retry(),
                    ..Refusal::new(e.reason(), e)
                }),
            }
        }
        Request::Circuit { dst, open } => {
            let Some(uid) = session.pod_uid.clone() else {
                return Outcome::Refused(Refusal::new(
                    "not_registered",
                    "circuit: this connection has not registered a pod",
                ));
            };
            match registry.set_circuit(maps, &uid, dst, open) {
                Ok(()) => Outcome::Circuit,
                Err(e) => Outcome::Refused(Refusal {
                    retry: e.retry(),
                    ..Refusal::new(e.reason(), e)
                }),
            }
        }
        // Asked once a second by every sidecar, also while its pod is not registered (yet, or
        // again after an agent restart): answered, not counted as the caller's refusal.
        Request::Counters => {
            let scope = match pod().and_then(|pod| denies_scope(registry, &pod)) {
                Ok(scope) => scope,
                Err(refusal) => return Outcome::Failed(refusal),
            };
            match maps.counters_of(scope) {
                Some(counters) => Outcome::Counters(counters),
                None => Outcome::Failed(Refusal::new(
                    "no_counters",
                    "the node's pins have no counters per pod (installed by an older build) \
                     or the sweep has not given this pod its own yet",
                )),
            }
        }
        Request::Deregister => {
            let Some(uid) = session.pod_uid.take() else {
                return Outcome::Refused(Refusal::new(
                    "not_registered",
                    "this connection has not registered a pod",
                ));
            };
            match registry.remove(maps, &uid) {
                Ok(_) => Outcome::Deregistered(uid),
                Err(e) => Outcome::Failed(Refusal::new("internal", e)),
            }
        }
        // Streams: served by the server itself (see [`records_scope`], [`denies_scope`]).
        Request::Records | Request::Denies => Outcome::Failed(Refusal::new(
            "bad_request",
            "records and denies are answered by a stream",
        )),
        // Every pod's UID, cgroup, pid and CIDRs: for the node's own root processes and the
        // agent's own pod only. A root container in a pod is uid 0 too, so where the caller is
        // decides.
        Request::Status => {
            if caller.uid != 0 {
                return Outcome::Refused(Refusal::new(
                    "not_root",
                    "status is for root on the node (uid 0)",
                ));
            }
            let why = match pod() {
                Err(outside) if outside.reason == pod::OUTSIDE_PODS => return Outcome::Status,
                Ok(pod) if agent_pod == Some(pod.uid.as_str()) => return Outcome::Status,
                Ok(pod) => format!("pid {pid} is in pod {}", pod.uid),
                Err(other) => other.error,
            };
            Outcome::Refused(Refusal::new(
                "status_from_pod",
                format!("status is for the node's own processes and the agent's pod: {why}"),
            ))
        }
    }
}

/// The registration connection `session` ended: the open circuits it sent go, unless a newer
/// connection registered the pod since (a sidecar that reconnected sends its own again).
pub fn connection_ended(registry: &mut Registry, maps: &mut impl PodMaps, session: &Session) {
    let Some(uid) = &session.pod_uid else { return };
    if registry
        .pods()
        .any(|r| r.pod_uid == *uid && r.registrations == session.registration)
    {
        registry.clear_circuits(maps, uid, None);
    }
}

/// A pod's policy text checked as `sidecar policy check` checks a file (whole, valid,
/// compilable), and no longer than [`MAX_POLICY`].
fn check_policy(uid: &str, text: String) -> Result<PodPolicy, Refusal> {
    if text.len() > MAX_POLICY {
        return Err(Refusal::new(
            "bad_policy",
            format!(
                "the policy of pod {uid} is {} bytes; the agent takes at most {MAX_POLICY}: \
                 shorten it (merge rules and CIDRs)",
                text.len()
            ),
        ));
    }
    registry::pod_policy(uid, text).map_err(|e| Refusal::new("bad_policy", e))
}

/// The scope whose pass-through records the caller may read: its own pod's (`pod`, from its
/// cgroup), if that pod is registered with pass-through on.
pub fn records_scope(registry: &Registry, pod: &PodCgroup) -> Result<u32, Refusal> {
    registry
        .pods()
        .find(|r| r.pod_uid == pod.uid && r.passthrough)
        .map(|r| r.scope)
        .ok_or_else(|| {
            Refusal::new(
                "not_registered",
                "records: this pod has no registration with kernel pass-through on",
            )
        })
}

/// The scope whose kernel refusals the caller may read: its own pod's (`pod`, from its
/// cgroup), if that pod is registered.
pub fn denies_scope(registry: &Registry, pod: &PodCgroup) -> Result<u32, Refusal> {
    registry
        .pods()
        .find(|r| r.pod_uid == pod.uid)
        .map(|r| r.scope)
        .ok_or_else(|| Refusal::new("not_registered", "denies: this pod is not registered"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's policy is checked as `sidecar policy check` checks a file, and refused in one
    /// line that says why; one over the size cap is refused before it is parsed.
    #[test]
    fn bad_and_oversized_policies_are_refused_in_one_line() {
        let bad = check_policy("u1", "[[rule]]\naction = \"maybe\"\n".into()).unwrap_err();
        assert_eq!(bad.reason, "bad_policy");
        assert!(bad.error.contains("of pod u1 line 2"), "{}", bad.error);
        assert!(!bad.error.contains('\n'), "{}", bad.error);
        for cut in ["", "# only a comment\n", "[defaults]\noutbound = \"deny\""] {
            let r = check_policy("u1", cut.into()).unwrap_err();
            assert_eq!(r.reason, "bad_policy", "{cut:?}: {}", r.error);
        }
        let big = format!(
            "# {}\n[defaults]\noutbound = \"allow\"\n",
            "x".repeat(MAX_POLICY)
        );
        let r = check_policy("u1", big).unwrap_err();
        assert_eq!(r.reason, "bad_policy");
        assert!(
            r.error.contains(&format!("at most {MAX_POLICY}")),
            "{}",
            r.error
        );
        let ok = check_policy("u1", "[defaults]\noutbound = \"deny\"\n".into()).unwrap();
        assert_eq!(ok.compiled.entries.len(), 2);
    }
}
