//! `sidecar proxy`: the pod sidecar of the Kubernetes deployment. No capabilities, no
//! cgroups, no eBPF: the node agent intercepts; this process binds the proxy's listeners,
//! registers the pod with the agent over its Unix socket, and serves.
//!
//! The original destination of a redirected connection comes from
//! `getsockopt(SO_ORIGINAL_DST)` on the accepted socket — the same call as iptables mode —
//! answered by the agent's `cgroup/getsockopt` program from the `ORIG_DST` map, so reading
//! it needs no privilege.
//!
//! The outbound listeners go to the agent with the register request, which marks them as the
//! proxy's: the pod's connects are redirected to them only, so after this process dies they
//! are refused (EPERM) even if another process binds the proxy port.
//!
//! Order: listeners bound → serving → registered (interception on, `/readyz` 200). SIGTERM:
//! listeners closed at once (new redirected connects are refused promptly), open connections
//! get `--drain-timeout-secs`, then exit 0 with the registration left in place: a SIGTERM may
//! be a restart of this container alone, so the pod stays intercepted (fail-closed) until
//! the restarted sidecar registers again or the pod's cgroup goes (see `register`).

pub mod circuits;
pub mod cli;
pub mod counters;
pub mod records;
pub mod register;

use std::{os::fd::OwnedFd, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use self::register::Registrar;
use crate::{
    admin::{self, config::ObserveOptions},
    cmd::serve::{Listeners, Serving},
    proxy::{ProxySettings, mesh::MtlsOptions},
    redirect::{agent::AgentSockopts, passthrough::Recorder},
    registration::{MAX_POLICY, Request},
    telemetry::{InterceptionInfo, record::Journal},
    tls::{TlsState, identity::SpiffeId},
};

/// Records kept for the exit summary.
const JOURNAL_CAPACITY: usize = 10_000;

/// Everything `sidecar proxy` is told.
#[derive(Debug, Clone)]
pub struct PodProxyOptions {
    pub agent_socket: PathBuf,
    /// The pod this sidecar claims to be in (downward API `metadata.uid`); the agent checks
    /// the claim against this process's cgroup.
    pub pod_uid: String,
    /// With mTLS: the certificate's SPIFFE ID must be `…/ns/<namespace>/sa/<service account>`.
    pub pod_namespace: Option<String>,
    pub service_account: Option<String>,
    pub proxy_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<crate::cidr::Cidr>,
    pub proxy: ProxySettings,
    pub drain_timeout: Duration,
    pub mtls: Option<MtlsOptions>,
    /// Authorization policy file (watched for changes): enforced by the proxy, and its
    /// outbound half in the kernel by the node agent, to which it goes with the registration.
    pub policy: Option<PathBuf>,
    /// Every connection through the proxy (no kernel pass-through).
    pub proxy_all: bool,
    /// Only the sidecar's tunnel reaches the pod's app containers: the agent drops other
    /// connection attempts from outside the node.
    pub strict_inbound: bool,
    pub observe: ObserveOptions,
}

impl PodProxyOptions {
    /// Whether to ask the agent for kernel pass-through. Not with `--permissive`, whose probe
    /// of each destination needs the proxy. A policy does not stop it: the agent compiles the
    /// pod's policy into the kernel, whose connect hooks refuse what it denies and send to the
    /// proxy what it must see (audit rules, dry run, `servers` rules, destination tables).
    pub fn passthrough(&self) -> bool {
        !self.proxy_all && !self.mtls.as_ref().is_some_and(|m| m.permissive)
    }
}

pub fn run(opts: PodProxyOptions) -> Result<i32> {
    if opts.pod_uid.trim().is_empty() {
        bail!(
            "no pod UID: set POD_UID from the downward API (fieldRef metadata.uid) or pass --pod-uid"
        );
    }
    if opts.exclude_cidrs.len() > crate::cmd::agent::registry::MAX_CIDRS {
        bail!(
            "--exclude-cidrs takes at most {} CIDRs ({} given)",
            crate::cmd::agent::registry::MAX_CIDRS,
            opts.exclude_cidrs.len()
        );
    }
    if opts.exclude_ports.len() > sidecar_common::limits::EXCLUDED_PORTS {
        bail!(
            "--exclude-ports takes at most {} ports ({} given)",
            sidecar_common::limits::EXCLUDED_PORTS,
            opts.exclude_ports.len()
        );
    }
    if opts.strict_inbound && opts.mtls.as_ref().and_then(|m| m.inbound).is_none() {
        bail!(
            "--inbound-mode strict refuses every connection that does not come through the \
             sidecar's tunnel, so it needs --tls-dir with an inbound listener (not --no-inbound)"
        );
    }
    let tls = match &opts.mtls {
        Some(m) => {
            let tls =
                TlsState::load(m.files.clone()).context("loading the workload certificates")?;
            check_identity(&tls.current().identity, &opts)?;
            Some(tls)
        }
        None => None,
    };
    // A bad policy file is refused before anything is bound or registered.
    let policy = match &opts.policy {
        Some(path) => Some(crate::policy::load(path)?),
        None => None,
    };
    if let (Some(loaded), Some(path)) = (&policy, &opts.policy)
        && loaded.text.len() > MAX_POLICY
    {
        bail!(
            "policy file {} is {} bytes; the node agent takes at most {MAX_POLICY} for a pod: \
             shorten it (merge rules and CIDRs)",
            path.display(),
            loaded.text.len()
        );
    }
    let policy_text = policy.as_ref().map(|l| l.text.clone());
    let listeners = Listeners::bind(opts.proxy_port, opts.mtls.as_ref().and_then(|m| m.inbound))?;
    let ipv6 = listeners.outbound_v6.is_some();
    // Copies of the outbound sockets, for the agent to check and mark (host::fd_passing).
    let passed: Vec<OwnedFd> = std::iter::once(&listeners.outbound_v4)
        .chain(&listeners.outbound_v6)
        .map(|l| l.try_clone().map(OwnedFd::from))
        .collect::<std::io::Result<_>>()
        .context("copying the proxy's listeners to pass them to the agent")?;

    let serving = Serving::start(
        &opts.observe,
        MtlsOptions::protection(opts.mtls.as_ref()),
        effective_config(&opts),
    )?;
    let _guard = serving.rt.enter();
    let mesh = serving.mesh(
        opts.mtls.as_ref(),
        tls.clone(),
        opts.proxy_port,
        opts.proxy.connect_timeout,
    );
    // The kernel half of the policy is the agent's: reloads go to it through the registrar.
    let (policy_updates, policy_reloads) = tokio::sync::mpsc::channel(1);
    let enforcer = match (policy, &opts.policy) {
        (Some(loaded), Some(path)) => Some(crate::policy::Enforcer::start_with_agent(
            path,
            loaded,
            policy_updates,
        )),
        _ => None,
    };
    serving.secured(opts.mtls.as_ref(), tls, enforcer.clone());
    let journal = Arc::new(Journal::new(JOURNAL_CAPACITY));
    // The agent's `cgroup/getsockopt` program answers SO_ORIGINAL_DST, as iptables would,
    // and whether a socket is spliced.
    let passthrough_cap = opts.proxy.limits.passthrough_per_destination;
    // The pod's kernel counters, asked of the agent; its policy refusals, streamed by the
    // agent to be counted by rule.
    let kernel_counters = Arc::new(counters::PodCounters::default());
    let poller = counters::Poller::start(opts.agent_socket.clone(), kernel_counters.clone());
    let denies = enforcer
        .clone()
        .map(|e| records::Listener::start_denies(opts.agent_socket.clone(), e));
    let proxy = serving.serve(
        opts.proxy,
        Arc::new(AgentSockopts),
        mesh,
        journal.clone(),
        enforcer,
        listeners,
    )?;

    // Interception is turned on only now that the listeners accept.
    let request = Request::Register {
        pod_uid: opts.pod_uid.clone(),
        proxy_port: opts.proxy_port,
        inbound_port: opts.mtls.as_ref().map_or(0, |m| m.tunnel_port),
        exclude_ports: opts.exclude_ports.clone(),
        exclude_cidrs: opts.exclude_cidrs.iter().map(ToString::to_string).collect(),
        ipv6,
        allow_metadata: opts.proxy.allow_metadata,
        passthrough: opts.passthrough(),
        passthrough_cap,
        mesh_cidrs: opts
            .mtls
            .iter()
            .flat_map(|m| &m.mesh_cidrs)
            .map(ToString::to_string)
            .collect(),
        listeners: passed.len() as u8,
        policy: policy_text,
        strict_inbound: opts.strict_inbound,
    };
    let registered = serving.telemetry.clone();
    let counters = kernel_counters.clone();
    let proxy_port = opts.proxy_port;
    // The listeners go with every register line (see `register`).
    let request = (request, passed);
    // Open circuits are refused at connect() by the agent, for pass-through connects too.
    let circuits = Arc::new(circuits::AgentCircuits::default());
    proxy.refuse_open_circuits_in(circuits.clone());
    let (registrar, fatal) = Registrar::start(
        opts.agent_socket.clone(),
        request,
        policy_reloads,
        circuits,
        move |reply| {
            if registered.interception().is_none() {
                info!(
                    pod_cgroup = reply.pod_cgroup.as_deref().unwrap_or("?"),
                    "registered with the agent: interception on"
                );
            }
            registered.attached(
                InterceptionInfo {
                    mode: crate::redirect::Mode::Agent,
                    // What the agent's programs run with; an agent too old to say: not claimed.
                    sockmap: reply.sockmap.unwrap_or(false),
                    proxy_port,
                    cgroup: reply.pod_cgroup.clone().unwrap_or_default(),
                },
                counters.clone(),
            );
        },
    );

    // The agent streams this pod's pass-through records on a connection of their own.
    let records = opts.passthrough().then(|| {
        records::Listener::start(
            opts.agent_socket.clone(),
            Recorder {
                scope: 0,
                telemetry: serving.telemetry.clone(),
                journal: journal.clone(),
                // Counted in this proxy's circuits, which the agent refuses at connect().
                circuits: Some(proxy.clone()),
            },
        )
    });

    let refused = serving.rt.block_on(async {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: draining"),
            _ = sigint.recv() => info!("SIGINT: draining"),
            Ok(error) = fatal => return Ok::<_, anyhow::Error>(Some(error)),
        }
        Ok(None)
    })?;
    if let Some(error) = refused {
        bail!(
            "the agent refused to register pod {}: {error}",
            opts.pod_uid
        );
    }
    // First, so its copies of the listeners close with the proxy's own: new connects are
    // then refused at once instead of waiting in a backlog nobody accepts from.
    serving.rt.block_on(registrar.stop());
    let cut = serving.drain(&proxy, opts.drain_timeout);
    if let Some(records) = records {
        serving.rt.block_on(records.stop());
    }
    if let Some(denies) = denies {
        serving.rt.block_on(denies.stop());
    }
    serving.rt.block_on(poller.stop());
    serving.telemetry.detaching();
    let (records, _) = journal.snapshot();
    info!(connections = records.len(), cut, "sidecar proxy stopped");
    drop(serving.admin);
    Ok(0)
}

/// In Kubernetes the certificate must name this pod's service account: a sidecar started
/// with another workload's credentials would let it impersonate that workload.
fn check_identity(id: &SpiffeId, opts: &PodProxyOptions) -> Result<()> {
    match (&opts.pod_namespace, &opts.service_account) {
        (Some(ns), Some(sa)) => {
            let expected = format!("spiffe://{}/ns/{ns}/sa/{sa}", id.trust_domain());
            if id.to_string() != expected {
                bail!(
                    "the certificate's SPIFFE ID is {id}, but this pod runs as {expected} \
                     (POD_NAMESPACE/POD_SERVICE_ACCOUNT): mount this service account's certificate"
                );
            }
            Ok(())
        }
        _ => {
            warn!(
                identity = %id,
                "POD_NAMESPACE or POD_SERVICE_ACCOUNT not set: the certificate's identity is not checked against the pod"
            );
            Ok(())
        }
    }
}

fn effective_config(opts: &PodProxyOptions) -> serde_json::Value {
    let config = serde_json::json!({
        "command": "proxy",
        "agent_socket": opts.agent_socket.display().to_string(),
        "pod_uid": opts.pod_uid,
        "pod_namespace": opts.pod_namespace,
        "service_account": opts.service_account,
        "proxy_port": opts.proxy_port,
        "exclude_ports": opts.exclude_ports,
        "exclude_cidrs": opts.exclude_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "drain_timeout_secs": opts.drain_timeout.as_secs(),
        "mode": MtlsOptions::protection(opts.mtls.as_ref()),
        "tls": opts.mtls.as_ref().map(MtlsOptions::config),
        "policy": opts.policy.as_ref().map(|p| p.display().to_string()),
        "passthrough": opts.passthrough(),
        "inbound_mode": if opts.strict_inbound { "strict" } else { "permissive" },
    });
    let config = admin::config::with(config, &opts.observe);
    admin::config::redact(admin::config::with(config, &opts.proxy))
}
