//! `deploy/` and the `Dockerfile`, checked offline.
//!
//! 1. Every file goes through `kubernetes-validate` (PyPI; bundled OpenAPI schemas, strict
//!    mode: unknown fields are errors) for [`KUBERNETES_VERSION`]. Kinds it has no schema for
//!    are errors too, except the ones named in [`CRD_KINDS`].
//! 2. Our own rules, which no schema knows: the pod sidecar has no privilege at all; the
//!    agent has exactly [`AGENT_CAPABILITIES`]; ports, the socket and bpffs paths equal
//!    `sidecar::defaults`; images and the binary path agree with the Dockerfile; the grace
//!    period covers the drain; the kustomization lists every file; the cert-manager
//!    certificate carries the pod's SPIFFE ID.
//!
//! Each rule is shown to fail: `each_rule_catches_its_fault` breaks the real manifests one
//! fault at a time and expects that rule's complaint.
//!
//! The validator is installed by `cargo xtask setup` (which `cargo xtask test` and `.ci/run`
//! run) into `target/kubernetes-validate` (a venv); with `CI` set its absence fails the test,
//! elsewhere it skips (the message says how to install).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::Deserialize;
use serde_yaml_ng::Value;
use sidecar::defaults;
use sidecar_tests::{host::output_with_timeout, scratch::Scratch, sidecar_bin, skip};

/// The Kubernetes release whose schemas the manifests must satisfy (kubernetes-validate
/// 1.37.0 bundles 1.25–1.37; `.ci/run` pins that version).
const KUBERNETES_VERSION: &str = "1.37.0";
/// The oldest release the manifests are for, validated too: native sidecars came in 1.29,
/// `appArmorProfile` and the `sleep` preStop action in 1.30 (1.29's schema refuses the first).
const OLDEST_KUBERNETES_VERSION: &str = "1.30.0";
/// The capabilities the node agent (and its uninstall) adds, and no others. deploy/agent.yaml
/// says why each is needed and why SYS_ADMIN and SYS_RESOURCE are not (docs/kubernetes.md,
/// "Capabilities of the agent", repeats it): change them together.
const AGENT_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];
/// (apiVersion, kind) the validator has no schema for and lets through with a warning:
/// cert-manager's CRDs and kustomize's own file. Any other unknown kind (a typo'd apiVersion,
/// say) is an error. Their fields are checked by [`check_certificates`] and
/// [`check_kustomization`] instead.
const CRD_KINDS: [(&str, &str); 3] = [
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
];
/// Where both images keep the binary (Dockerfile) and what the manifests run.
const BINARY: &str = "/usr/local/bin/sidecar";
/// Image names (repository part) and the Dockerfile stage each is built from.
const AGENT_IMAGE: (&str, &str) = ("sidecar-agent", "agent");
const PROXY_IMAGE: (&str, &str) = ("sidecar-proxy", "proxy");
/// distroless's `nonroot` user; the proxy image and the pod both use it.
const PROXY_UID: i64 = 65532;
/// Seconds the app may take to exit after its preStop, before the sidecar's drain begins.
const APP_EXIT_MARGIN_SECS: i64 = 10;
/// The trust domain the example certificates use.
const TRUST_DOMAIN: &str = "cluster.local";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

// ---- loading -------------------------------------------------------------------------------

/// One YAML document and the file it came from (relative to the workspace).
#[derive(Clone)]
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn label(&self) -> String {
        format!("{} {}/{}", self.file, self.kind(), self.name())
    }
}

fn parse(file: &str, text: &str) -> Vec<Doc> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .map(|value| Doc {
            file: file.to_string(),
            value,
        })
        .collect()
}

/// Every `*.yaml` under `deploy/`, sorted.
fn yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("reading deploy/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&workspace().join("deploy"), &mut files);
    files.sort();
    assert!(!files.is_empty(), "deploy/ holds no YAML");
    files
}

fn load_deploy() -> Vec<Doc> {
    let root = workspace();
    yaml_files()
        .iter()
        .flat_map(|path| {
            let rel = path.strip_prefix(&root).unwrap().display().to_string();
            parse(&rel, &std::fs::read_to_string(path).unwrap())
        })
        .collect()
}

fn dockerfile() -> String {
    std::fs::read_to_string(workspace().join("Dockerfile")).expect("reading the Dockerfile")
}

// ---- reading pods --------------------------------------------------------------------------

/// A pod template (or pod) and where it is.
struct Pod<'a> {
    doc: &'a Doc,
    spec: &'a Value,
}

fn pods(docs: &[Doc]) -> Vec<Pod<'_>> {
    docs.iter()
        .filter_map(|doc| {
            let spec = match doc.kind() {
                "Pod" => &doc.value["spec"],
                "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
                    &doc.value["spec"]["template"]["spec"]
                }
                "CronJob" => &doc.value["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => return None,
            };
            Some(Pod { doc, spec })
        })
        .collect()
}

/// A container and whether it is an init container.
struct Container<'a> {
    pod: &'a Pod<'a>,
    init: bool,
    c: &'a Value,
}

impl Container<'_> {
    fn label(&self) -> String {
        format!(
            "{} container {}",
            self.pod.doc.label(),
            self.c["name"].as_str().unwrap_or("?")
        )
    }

    fn strings(&self, key: &str) -> Vec<String> {
        seq(&self.c[key])
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// `--flag=value` or `--flag value` among command and args.
    fn flag(&self, flag: &str) -> Option<String> {
        let argv: Vec<String> = [self.strings("command"), self.strings("args")].concat();
        let eq = format!("{flag}=");
        argv.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix(&eq)
                .map(str::to_owned)
                .or_else(|| (a == flag).then(|| argv.get(i + 1).cloned()).flatten())
        })
    }

    /// The sidecar subcommand this container runs, if its command is our binary; the
    /// agent's `--uninstall` run counts as `uninstall`.
    fn mode(&self) -> Option<String> {
        let cmd = self.strings("command");
        let mode = (cmd.first().map(String::as_str) == Some(BINARY))
            .then(|| cmd.get(1).cloned())
            .flatten()?;
        let uninstall = [cmd, self.strings("args")]
            .concat()
            .iter()
            .any(|a| a == "--uninstall");
        Some(if mode == "agent" && uninstall {
            "uninstall".into()
        } else {
            mode
        })
    }

    fn security(&self) -> &Value {
        &self.c["securityContext"]
    }

    fn capabilities(&self, which: &str) -> Vec<String> {
        seq(&self.security()["capabilities"][which])
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// The named container port's number.
    fn port(&self, name: &str) -> Option<i64> {
        seq(&self.c["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
    }

    /// A probe's port as a number (named ports resolved).
    fn probe_port(&self, probe: &str) -> Option<i64> {
        let port = &self.c[probe]["httpGet"]["port"];
        port.as_i64()
            .or_else(|| port.as_str().and_then(|name| self.port(name)))
    }

    /// The hostPath behind the volume mounted at `mount_path`, if it is one.
    fn host_path(&self, mount_path: &str) -> Option<String> {
        let m = seq(&self.c["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(mount_path))?;
        let name = m["name"].as_str()?;
        seq(&self.pod.spec["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .and_then(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
    }
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn containers<'a>(pod: &'a Pod<'a>) -> Vec<Container<'a>> {
    let of = |key: &str, init: bool| {
        seq(&pod.spec[key])
            .iter()
            .map(move |c| Container { pod, init, c })
            .collect::<Vec<_>>()
    };
    let mut all = of("initContainers", true);
    all.extend(of("containers", false));
    all
}

/// Runs `f` on every container of every pod that runs `sidecar <mode>`.
fn each_sidecar(docs: &[Doc], mode: &str, mut f: impl FnMut(&Container<'_>)) -> usize {
    let mut n = 0;
    for pod in pods(docs) {
        for c in containers(&pod) {
            if c.mode().as_deref() == Some(mode) {
                n += 1;
                f(&c);
            }
        }
    }
    n
}

fn admin_port() -> i64 {
    defaults::ADMIN_ADDR
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("ADMIN_ADDR has a port")
}

fn probe_port() -> i64 {
    defaults::PROBE_ADDR
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("PROBE_ADDR has a port")
}

fn socket_dir() -> String {
    Path::new(defaults::AGENT_SOCKET)
        .parent()
        .expect("the socket is in a directory")
        .display()
        .to_string()
}

/// A host path as the host resolves it: /var/run is /run on every systemd host.
fn host_canonical(p: &str) -> String {
    match p.strip_prefix("/var/run") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("/run{rest}"),
        _ => p.to_string(),
    }
}

// ---- our rules -----------------------------------------------------------------------------

/// The pod sidecar: a native sidecar without any privilege, identity from the downward API,
/// probes on the admin port, updates of its files visible.
fn check_proxy(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let n = each_sidecar(docs, "proxy", |c| {
        let l = c.label();
        if !c.init || c.c["restartPolicy"].as_str() != Some("Always") {
            p.push(format!(
                "{l}: not a native sidecar (initContainers with restartPolicy: Always)"
            ));
        }
        let s = c.security();
        if s["privileged"].as_bool() == Some(true) {
            p.push(format!("{l}: privileged: true"));
        }
        if s["runAsNonRoot"].as_bool() != Some(true) {
            p.push(format!("{l}: runAsNonRoot is not true"));
        }
        if s["runAsUser"].as_i64() != Some(PROXY_UID) {
            p.push(format!("{l}: runAsUser is not {PROXY_UID}"));
        }
        if s["allowPrivilegeEscalation"].as_bool() != Some(false) {
            p.push(format!("{l}: allowPrivilegeEscalation is not false"));
        }
        if c.capabilities("drop") != ["ALL"] {
            p.push(format!("{l}: capabilities.drop is not [ALL]"));
        }
        if !c.capabilities("add").is_empty() {
            p.push(format!(
                "{l}: adds capabilities {:?}",
                c.capabilities("add")
            ));
        }
        if s["readOnlyRootFilesystem"].as_bool() != Some(true) {
            p.push(format!("{l}: readOnlyRootFilesystem is not true"));
        }
        let seccomp = s["seccompProfile"]["type"]
            .as_str()
            .or(c.pod.spec["securityContext"]["seccompProfile"]["type"].as_str());
        if seccomp != Some("RuntimeDefault") {
            p.push(format!("{l}: seccompProfile is not RuntimeDefault"));
        }
        for key in ["hostPID", "hostNetwork", "hostIPC"] {
            if c.pod.spec[key].as_bool() == Some(true) {
                p.push(format!("{l}: the pod sets {key}"));
            }
        }
        for (var, field) in [
            ("POD_UID", "metadata.uid"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ] {
            let from = seq(&c.c["env"])
                .iter()
                .find(|e| e["name"].as_str() == Some(var))
                .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str());
            if from != Some(field) {
                p.push(format!("{l}: env {var} is not the downward API's {field}"));
            }
        }
        for (probe, path) in [
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            if c.c[probe]["httpGet"]["path"].as_str() != Some(path) {
                p.push(format!("{l}: {probe} does not GET {path}"));
            }
            if c.probe_port(probe) != Some(probe_port()) {
                p.push(format!(
                    "{l}: {probe} is not on the probe port {} (the admin port's slots can be \
                     held by any client in the pod network)",
                    probe_port()
                ));
            }
        }
        // The probes come from the node: the probe listener must listen beyond loopback.
        match c.flag("--probe-addr") {
            Some(a) if a.starts_with("0.0.0.0:") || a.starts_with("[::]:") => {}
            other => p.push(format!(
                "{l}: --probe-addr {other:?} is not reachable by kubelet's probes (bind 0.0.0.0)"
            )),
        }
        // The default --max-connections comes from RLIMIT_NOFILE, which container runtimes
        // set to about a million: the manifest must set a cap its memory limit can hold.
        // Worst case per open connection: both copy buffers in use (2 × 16 KiB,
        // `proxy/copy.rs` BUF_SIZE) and about 8 KiB of task and socket state (the reliability
        // test measures ~4.5 KiB per idle one), on top of a 32 MiB base (idle RSS ~10 MiB).
        const PER_CONNECTION: u64 = 40 * 1024;
        const BASE: u64 = 32 << 20;
        let cap = c
            .flag("--max-connections")
            .and_then(|v| v.parse::<u64>().ok());
        let limit = c.c["resources"]["limits"]["memory"]
            .as_str()
            .and_then(memory_bytes);
        match (cap, limit) {
            (Some(cap), Some(limit)) if BASE + cap * PER_CONNECTION <= limit => {}
            (Some(cap), Some(limit)) => p.push(format!(
                "{l}: --max-connections={cap} needs up to {} MiB, above the memory limit of {} MiB",
                (BASE + cap * PER_CONNECTION) >> 20,
                limit >> 20
            )),
            (None, _) => p.push(format!(
                "{l}: no --max-connections: the default follows RLIMIT_NOFILE (about a million \
                 in a container), far past any memory limit"
            )),
            (_, None) => p.push(format!("{l}: no memory limit")),
        }
        for m in seq(&c.c["volumeMounts"]) {
            if !m["subPath"].is_null() || !m["subPathExpr"].is_null() {
                p.push(format!(
                    "{l}: mount {} uses subPath, which never sees kubelet's updates",
                    m["mountPath"].as_str().unwrap_or("?")
                ));
            }
        }
    });
    if n == 0 {
        p.push(format!("no container runs [{BINARY}, proxy]"));
    }
    p
}

/// A Kubernetes memory quantity (`256Mi`, `1Gi`, `512000`) in bytes.
fn memory_bytes(q: &str) -> Option<u64> {
    let (num, unit) = q
        .find(|ch: char| !ch.is_ascii_digit())
        .map_or((q, ""), |i| q.split_at(i));
    let factor = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    num.parse::<u64>().ok().map(|n| n * factor)
}

/// The node agent: exactly the listed capabilities, never privileged, what the API server
/// would refuse ruled out here already.
fn check_agent(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let mut counts = [0; 2];
    for (i, mode) in ["agent", "uninstall"].into_iter().enumerate() {
        counts[i] = each_sidecar(docs, mode, |c| {
            let l = c.label();
            if c.pod.doc.kind() != "DaemonSet" {
                p.push(format!("{l}: the {mode} must run as a DaemonSet"));
            }
            if mode == "uninstall" && !c.init {
                p.push(format!(
                    "{l}: the uninstall must be an init container (it runs once)"
                ));
            }
            let s = c.security();
            let privileged = s["privileged"].as_bool() == Some(true);
            if privileged {
                p.push(format!("{l}: privileged: true"));
            }
            let added: BTreeSet<String> = c.capabilities("add").into_iter().collect();
            let expected: BTreeSet<String> =
                AGENT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
            if added != expected || c.capabilities("add").len() != added.len() {
                p.push(format!(
                    "{l}: adds capabilities {:?}, the documented list is {AGENT_CAPABILITIES:?}",
                    c.capabilities("add")
                ));
            }
            if c.capabilities("drop") != ["ALL"] {
                p.push(format!("{l}: capabilities.drop is not [ALL]"));
            }
            if mode == "agent" {
                for probe in ["readinessProbe", "livenessProbe"] {
                    let cmd: Vec<&str> = seq(&c.c[probe]["exec"]["command"])
                        .iter()
                        .filter_map(Value::as_str)
                        .collect();
                    let socket = c.flag("--socket").map(|s| format!("--socket={s}"));
                    if cmd.get(..3) != Some(&[BINARY, "agent", "--status"][..])
                        || !cmd.iter().any(|a| Some(*a) == socket.as_deref())
                    {
                        p.push(format!(
                            "{l}: {probe} is not `{BINARY} agent --status` on the agent's socket"
                        ));
                    }
                }
            }
            if c.pod.spec["hostPID"].as_bool() != Some(true) {
                p.push(format!(
                    "{l}: hostPID is not true (SO_PEERCRED pids must be the host's)"
                ));
            }
            if !added.contains("SYS_ADMIN")
                && s["allowPrivilegeEscalation"].as_bool() != Some(false)
            {
                p.push(format!("{l}: allowPrivilegeEscalation is not false"));
            }
            if s["allowPrivilegeEscalation"].as_bool() == Some(false) && added.contains("SYS_ADMIN")
            {
                p.push(format!(
                "{l}: allowPrivilegeEscalation: false with SYS_ADMIN is refused by the API server"
            ));
            }
            for m in seq(&c.c["volumeMounts"]) {
                if m["mountPropagation"].as_str() == Some("Bidirectional") && !privileged {
                    p.push(format!(
                        "{l}: mount {} is Bidirectional, which the API server allows only for \
                     privileged containers",
                        m["mountPath"].as_str().unwrap_or("?")
                    ));
                }
            }
        });
    }
    if counts != [1, 1] {
        p.push(format!(
            "expected one container running [{BINARY}, agent] and one with --uninstall, found \
             {counts:?}"
        ));
    }
    // `kubectl apply -k deploy/` must never uninstall.
    for doc in docs
        .iter()
        .filter(|d| d.file == "deploy/kustomization.yaml")
    {
        for r in seq(&doc.value["resources"])
            .iter()
            .filter_map(Value::as_str)
        {
            let file = format!("deploy/{r}");
            let listed: Vec<Doc> = docs.iter().filter(|d| d.file == file).cloned().collect();
            if each_sidecar(&listed, "uninstall", |_| {}) > 0 {
                p.push(format!(
                    "{}: lists {r}, which uninstalls the agent",
                    doc.file
                ));
            }
        }
    }
    p
}

/// Ports and paths equal the binary's defaults, and the two sides meet on the socket.
fn check_defaults(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let want = |p: &mut Vec<String>, l: &str, what: &str, got: Option<String>, want: String| {
        if got.as_deref() != Some(want.as_str()) {
            p.push(format!(
                "{l}: {what} is {got:?}, sidecar::defaults says {want:?}"
            ));
        }
    };
    let mut socket_hosts = Vec::new();
    let mut agent_state = Vec::new();
    each_sidecar(docs, "proxy", |c| {
        let l = c.label();
        let flag = |f: &str| c.flag(f);
        want(
            &mut p,
            &l,
            "--proxy-port",
            flag("--proxy-port"),
            defaults::PROXY_PORT.to_string(),
        );
        want(
            &mut p,
            &l,
            "--inbound-port",
            flag("--inbound-port"),
            defaults::INBOUND_PORT.to_string(),
        );
        want(
            &mut p,
            &l,
            "--agent-socket",
            flag("--agent-socket"),
            defaults::AGENT_SOCKET.into(),
        );
        want(
            &mut p,
            &l,
            "the --admin-addr port",
            flag("--admin-addr").and_then(|a| a.rsplit_once(':').map(|(_, port)| port.to_owned())),
            admin_port().to_string(),
        );
        want(
            &mut p,
            &l,
            "containerPort admin",
            c.port("admin").map(|n| n.to_string()),
            admin_port().to_string(),
        );
        want(
            &mut p,
            &l,
            "the --probe-addr port",
            flag("--probe-addr").and_then(|a| a.rsplit_once(':').map(|(_, port)| port.to_owned())),
            probe_port().to_string(),
        );
        want(
            &mut p,
            &l,
            "containerPort probe",
            c.port("probe").map(|n| n.to_string()),
            probe_port().to_string(),
        );
        want(
            &mut p,
            &l,
            "containerPort tunnel",
            c.port("tunnel").map(|n| n.to_string()),
            defaults::INBOUND_PORT.to_string(),
        );
        socket_hosts.push((l.clone(), c.host_path(&socket_dir())));
        let annotations = match c.pod.doc.kind() {
            "Pod" => &c.pod.doc.value["metadata"]["annotations"],
            _ => &c.pod.doc.value["spec"]["template"]["metadata"]["annotations"],
        };
        if let Some(port) = annotations["prometheus.io/port"].as_str() {
            want(
                &mut p,
                &l,
                "the prometheus.io/port annotation",
                Some(port.to_string()),
                admin_port().to_string(),
            );
        }
    });
    each_sidecar(docs, "agent", |c| {
        let l = c.label();
        want(
            &mut p,
            &l,
            "--socket",
            c.flag("--socket"),
            defaults::AGENT_SOCKET.into(),
        );
        want(
            &mut p,
            &l,
            "--bpffs",
            c.flag("--bpffs"),
            defaults::BPFFS.into(),
        );
        want(
            &mut p,
            &l,
            "the hostPath at bpffs",
            c.host_path(defaults::BPFFS),
            defaults::BPFFS.into(),
        );
        socket_hosts.push((l.clone(), c.host_path(&socket_dir())));
        if let Some(state) = c.flag("--state-dir") {
            agent_state.push((l, state.clone(), c.host_path(&state)));
        }
    });
    // The uninstall finds what the agent made: the same flags, the same host paths.
    let mut agent_paths = Vec::new();
    each_sidecar(docs, "agent", |c| {
        for flag in ["--socket", "--bpffs", "--state-dir"] {
            agent_paths.push((flag, c.flag(flag)));
        }
        for m in seq(&c.c["volumeMounts"]) {
            let path = m["mountPath"].as_str().unwrap_or("");
            agent_paths.push(("mount", Some(format!("{path} <- {:?}", c.host_path(path)))));
        }
    });
    each_sidecar(docs, "uninstall", |c| {
        for (flag, value) in &agent_paths {
            let got = if *flag == "mount" {
                let path = value
                    .as_deref()
                    .unwrap_or("")
                    .split(" <- ")
                    .next()
                    .unwrap_or("");
                Some(format!("{path} <- {:?}", c.host_path(path)))
            } else {
                c.flag(flag)
            };
            if got != *value {
                p.push(format!(
                    "{}: {flag} is {got:?}, the agent's is {value:?}",
                    c.label()
                ));
            }
        }
    });
    // Every side mounts the socket's directory from the same host directory.
    let agent_host = socket_hosts.last().and_then(|(_, h)| h.clone());
    for (l, host) in &socket_hosts {
        match host {
            None => p.push(format!(
                "{l}: no hostPath volume mounted at {} (the agent socket's directory)",
                socket_dir()
            )),
            Some(h) if Some(h) != agent_host.as_ref() => p.push(format!(
                "{l}: mounts the socket directory from {h}, the agent from {agent_host:?}"
            )),
            Some(_) => {}
        }
    }
    // The agent's state must not be visible to pods through the shared socket directory.
    if let Some(shared) = agent_host {
        let shared = host_canonical(&shared);
        for (l, state, host) in agent_state {
            let host = host_canonical(host.as_deref().unwrap_or(&state));
            if host == shared || host.starts_with(&format!("{shared}/")) {
                p.push(format!(
                    "{l}: --state-dir {state} is inside {shared}, which every meshed pod mounts"
                ));
            }
        }
    }
    p
}

/// `name:tag` of an image reference (registry and digest ignored).
fn image_name_tag(image: &str) -> (String, Option<String>) {
    let last = image.rsplit('/').next().unwrap_or(image);
    let without_digest = last.split('@').next().unwrap_or(last);
    match without_digest.split_once(':') {
        Some((n, t)) => (n.to_string(), Some(t.to_string())),
        None => (without_digest.to_string(), None),
    }
}

/// Our two images, by their names, at the workspace's version; the kustomization can retag
/// exactly those.
fn check_images(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let version = env!("CARGO_PKG_VERSION");
    for (mode, (image, _)) in [
        ("agent", AGENT_IMAGE),
        ("uninstall", AGENT_IMAGE),
        ("proxy", PROXY_IMAGE),
    ] {
        each_sidecar(docs, mode, |c| {
            let got = c.c["image"].as_str().unwrap_or("");
            let (name, tag) = image_name_tag(got);
            if name != image || tag.as_deref() != Some(version) {
                p.push(format!(
                    "{}: image {got:?}, expected {image}:{version}",
                    c.label()
                ));
            }
        });
    }
    let ours = [AGENT_IMAGE.0, PROXY_IMAGE.0];
    for doc in docs.iter().filter(|d| d.kind() == "Kustomization") {
        let mut names = BTreeSet::new();
        for i in seq(&doc.value["images"]) {
            let name = i["name"].as_str().unwrap_or("");
            names.insert(name);
            if !ours.contains(&name) || i["newTag"].as_str() != Some(version) {
                p.push(format!(
                    "{}: images entry {name}:{:?} is not one of ours ({ours:?}) at {version}",
                    doc.file,
                    i["newTag"].as_str()
                ));
            }
        }
        if doc.file == "deploy/kustomization.yaml" && names != ours.into_iter().collect() {
            p.push(format!("{}: images {names:?}, expected {ours:?}", doc.file));
        }
    }
    p
}

/// The pod's grace period covers the app's preStop, its exit and the sidecar's drain (the
/// sidecar is signalled only once the app has exited).
fn check_drain(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    each_sidecar(docs, "proxy", |c| {
        let Some(drain) = c
            .flag("--drain-timeout-secs")
            .and_then(|d| d.parse::<i64>().ok())
        else {
            p.push(format!("{}: no --drain-timeout-secs", c.label()));
            return;
        };
        let grace = c.pod.spec["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30);
        let pre_stop = seq(&c.pod.spec["containers"])
            .iter()
            .filter_map(|a| a["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64())
            .max()
            .unwrap_or(0);
        let need = pre_stop + APP_EXIT_MARGIN_SECS + drain;
        if grace < need {
            p.push(format!(
                "{}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} + app exit \
                 {APP_EXIT_MARGIN_SECS} + --drain-timeout-secs {drain} = {need}",
                c.pod.doc.label()
            ));
        }
    });
    p
}

/// Each kustomization lists exactly the YAML files beside it, and they exist.
fn check_kustomization(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let root = workspace();
    for doc in docs.iter().filter(|d| d.kind() == "Kustomization") {
        let dir = root.join(&doc.file).parent().unwrap().to_path_buf();
        let listed: BTreeSet<String> = seq(&doc.value["resources"])
            .iter()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        let present: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
            .collect();
        for missing in listed.difference(&present) {
            p.push(format!("{}: lists {missing}, which is not there", doc.file));
        }
        for unlisted in present.difference(&listed) {
            p.push(format!("{}: does not list {unlisted}", doc.file));
        }
    }
    p
}

/// The cert-manager certificate fills the Secret the pod mounts as --tls-dir, with the pod's
/// SPIFFE ID and both usages mTLS needs.
fn check_certificates(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let certs: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Certificate").collect();
    if certs.is_empty() {
        return p;
    }
    each_sidecar(docs, "proxy", |c| {
        let Some(tls_dir) = c.flag("--tls-dir") else {
            return;
        };
        let volume = seq(&c.c["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(tls_dir.as_str()))
            .and_then(|m| m["name"].as_str())
            .and_then(|name| {
                seq(&c.pod.spec["volumes"])
                    .iter()
                    .find(|v| v["name"].as_str() == Some(name))
            });
        let Some(secret) = volume.and_then(|v| v["secret"]["secretName"].as_str()) else {
            p.push(format!(
                "{}: --tls-dir {tls_dir} is not a Secret volume",
                c.label()
            ));
            return;
        };
        let ns = c.pod.doc.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let sa = c.pod.spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let id = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}");
        let Some(cert) = certs.iter().find(|d| {
            d.value["spec"]["secretName"].as_str() == Some(secret)
                && d.value["metadata"]["namespace"].as_str() == Some(ns)
        }) else {
            p.push(format!(
                "{}: no Certificate writes Secret {ns}/{secret}",
                c.label()
            ));
            return;
        };
        let uris: Vec<&str> = seq(&cert.value["spec"]["uris"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if uris != [id.as_str()] {
            p.push(format!(
                "{}: uris {uris:?}, the pod's SPIFFE ID is {id}",
                cert.label()
            ));
        }
        if !seq(&cert.value["spec"]["dnsNames"]).is_empty() {
            p.push(format!(
                "{}: dnsNames play no part in SPIFFE identities",
                cert.label()
            ));
        }
        let usages: Vec<&str> = seq(&cert.value["spec"]["usages"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for needed in ["server auth", "client auth"] {
            if !usages.contains(&needed) {
                p.push(format!("{}: usages lack {needed:?}", cert.label()));
            }
        }
    });
    p
}

/// The Dockerfile builds what the manifests run: the stages exist, every COPY source is in
/// the repository (and not dockerignored), the binary lands where the manifests call it, the
/// proxy image is not root.
fn check_dockerfile(text: &str, dockerignore: &str, docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let root = workspace();
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Logical lines: continuations joined.
    let joined = text.replace("\\\n", " ");
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for line in joined.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_uppercase()).as_deref() {
            Some("FROM") => {
                let name = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("AS"))
                    .and_then(|i| words.get(i + 1))
                    .unwrap_or(&"")
                    .to_string();
                stages.push((name, Vec::new()));
            }
            Some(_) => {
                if let Some((_, lines)) = stages.last_mut() {
                    lines.push(line.to_string());
                }
            }
            None => {}
        }
    }
    let stage = |name: &str| stages.iter().find(|(n, _)| n == name).map(|(_, l)| l);
    for name in ["builder", AGENT_IMAGE.1, PROXY_IMAGE.1] {
        if stage(name).is_none() {
            p.push(format!("Dockerfile: no stage {name:?}"));
        }
    }
    for (name, lines) in &stages {
        for line in lines
            .iter()
            .filter(|l| l.to_ascii_uppercase().starts_with("COPY "))
        {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            if words.iter().any(|w| w.starts_with("--from=")) {
                continue;
            }
            let args: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
            for src in &args[..args.len().saturating_sub(1)] {
                let src = src.trim_end_matches('/');
                if src == "." {
                    continue;
                }
                if !root.join(src).exists() {
                    p.push(format!(
                        "Dockerfile stage {name}: COPY {src}: not in the repository"
                    ));
                }
                if ignored.iter().any(|i| i.trim_end_matches('/') == src) {
                    p.push(format!(
                        "Dockerfile stage {name}: COPY {src}: excluded by .dockerignore"
                    ));
                }
            }
        }
    }
    for target in [AGENT_IMAGE.1, PROXY_IMAGE.1] {
        let Some(lines) = stage(target) else { continue };
        let copies_binary = lines.iter().any(|l| {
            l.to_ascii_uppercase().starts_with("COPY ")
                && l.contains("--from=builder")
                && l.split_whitespace().last() == Some(BINARY)
        });
        if !copies_binary {
            p.push(format!(
                "Dockerfile stage {target}: does not COPY --from=builder the binary to {BINARY}"
            ));
        }
        let user = lines
            .iter()
            .rfind(|l| l.to_ascii_uppercase().starts_with("USER "))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(|u| u.split(':').next().unwrap_or(u).to_string());
        if target == PROXY_IMAGE.1 && user.as_deref() != Some(&PROXY_UID.to_string()) {
            p.push(format!(
                "Dockerfile stage {target}: USER is {user:?}, not the numeric non-root {PROXY_UID} \
                 (runAsNonRoot can only verify a numeric user)"
            ));
        }
    }
    // The manifests run the binary of the image built from the matching stage.
    for (mode, (image, _)) in [("agent", AGENT_IMAGE), ("proxy", PROXY_IMAGE)] {
        each_sidecar(docs, mode, |c| {
            let (name, _) = image_name_tag(c.c["image"].as_str().unwrap_or(""));
            if name != image {
                p.push(format!(
                    "{}: runs `sidecar {mode}` from image {name}",
                    c.label()
                ));
            }
        });
    }
    // The builder is a developer machine: the workspace's toolchain, xtask's eBPF build.
    if let Some(lines) = stage("builder") {
        let runs = lines
            .iter()
            .filter(|l| l.to_ascii_uppercase().starts_with("RUN "))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        for needed in ["cargo xtask build-ebpf", "--locked"] {
            if !runs.contains(needed) {
                p.push(format!("Dockerfile stage builder: no RUN uses {needed:?}"));
            }
        }
    }
    let cargo_toml = std::fs::read_to_string(root.join("Cargo.toml")).unwrap_or_default();
    let rust_version = cargo_toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string());
    let arg = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG RUST_VERSION="))
        .map(str::to_owned);
    if arg.is_none() || arg != rust_version {
        p.push(format!(
            "Dockerfile: ARG RUST_VERSION={arg:?}, the workspace's rust-version is {rust_version:?}"
        ));
    }
    if !ignored.iter().any(|i| i.trim_end_matches('/') == "target") {
        p.push(".dockerignore: target/ is not excluded (gigabytes of build context)".into());
    }
    p
}

fn all_problems(docs: &[Doc], dockerfile: &str, dockerignore: &str) -> Vec<String> {
    [
        check_proxy(docs),
        check_agent(docs),
        check_defaults(docs),
        check_images(docs),
        check_drain(docs),
        check_kustomization(docs),
        check_certificates(docs),
        check_dockerfile(dockerfile, dockerignore, docs),
    ]
    .concat()
}

fn dockerignore() -> String {
    std::fs::read_to_string(workspace().join(".dockerignore")).unwrap_or_default()
}

#[test]
fn deploy_passes_our_checks() {
    let docs = load_deploy();
    let problems = all_problems(&docs, &dockerfile(), &dockerignore());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- the schema validator ------------------------------------------------------------------

/// `$SIDECAR_KUBERNETES_VALIDATE`, else `.ci/run`'s venv under target/, else PATH.
fn validator() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SIDECAR_KUBERNETES_VALIDATE") {
        return Some(p.into());
    }
    let venv = workspace().join("target/kubernetes-validate/bin/kubernetes-validate");
    if venv.is_file() {
        return Some(venv);
    }
    sidecar_tests::host::which("kubernetes-validate")
}

const INSTALL_HINT: &str = "kubernetes-validate is not installed: `python3 -m venv \
     target/kubernetes-validate && target/kubernetes-validate/bin/pip install \
     kubernetes-validate==1.37.0` (what .ci/run does)";

/// Runs the validator on `files`; returns the problems (errors, and warnings other than a
/// missing schema for one of [`CRD_KINDS`]).
fn validate(bin: &Path, version: &str, files: &[PathBuf]) -> Vec<String> {
    let out = output_with_timeout(
        Command::new(bin)
            .args(["--strict", "--kubernetes-version", version])
            .args(files),
        Duration::from_secs(120),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    let mut problems: Vec<String> = text
        .lines()
        .filter(|l| {
            if l.starts_with("INFO ") {
                return false;
            }
            !CRD_KINDS.iter().any(|(api, kind)| {
                l.starts_with("WARN ")
                    && l.contains(&format!(
                        "Couldn't find schema for kind {kind} with api version {api} "
                    ))
            })
        })
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("kubernetes-validate exited with {}", out.status));
    }
    problems
}

#[test]
fn deploy_passes_the_schema_validator_in_strict_mode() {
    let Some(bin) = validator() else {
        skip(INSTALL_HINT);
        return;
    };
    let version = output_with_timeout(Command::new(&bin).arg("--version"), Duration::from_secs(30));
    eprintln!(
        "validator {} against Kubernetes {KUBERNETES_VERSION}",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    for version in [KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION] {
        let problems = validate(&bin, version, &yaml_files());
        assert!(
            problems.is_empty(),
            "Kubernetes {version}:\n{}",
            problems.join("\n")
        );
    }
}

/// The validator is really strict and our filter lets through only the listed CRDs: an
/// unknown field, a wrong type and an unknown apiVersion are each reported; and the release
/// before the oldest we claim does refuse the agent's manifest.
#[test]
fn the_validator_refuses_bad_manifests() {
    let Some(bin) = validator() else {
        skip(INSTALL_HINT);
        return;
    };
    let scratch = Scratch::new("pkg-validator");
    for (name, text, expect) in [
        (
            "unknown-field",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  nmespace: x\ndata: {}\n",
            "nmespace",
        ),
        (
            "wrong-type",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  ports:\n    - port: \"eighty\"\n",
            "eighty",
        ),
        (
            "unknown-api",
            "apiVersion: apps/v2\nkind: Deployment\nmetadata:\n  name: a\n",
            "Couldn't find schema for kind Deployment",
        ),
    ] {
        let path = scratch.write(&format!("{name}.yaml"), text);
        let problems = validate(&bin, KUBERNETES_VERSION, &[path]);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{name}: expected a problem mentioning {expect:?}, got {problems:?}"
        );
    }
    let problems = validate(&bin, "1.29.0", &[workspace().join("deploy/agent.yaml")]);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("'appArmorProfile' was unexpected")),
        "1.29 should refuse appArmorProfile: {problems:?}"
    );
}

// ---- the flags exist ------------------------------------------------------------------------

/// Every `--flag` a manifest passes to `sidecar agent|proxy` (args and exec probes) is an
/// option of that subcommand, as `sidecar <sub> --help` lists them. A subcommand this build
/// does not have yet (the agent and proxy come from another branch) is reported and skipped.
#[test]
fn manifest_flags_are_options_of_the_binary() {
    let docs = load_deploy();
    let mut uses: Vec<(String, String, Vec<String>)> = Vec::new();
    for pod in pods(&docs) {
        for c in containers(&pod) {
            let Some(mode) = c.mode() else { continue };
            let sub = if mode == "uninstall" {
                "agent".to_string()
            } else {
                mode
            };
            let mut argv: Vec<String> = c.strings("command").into_iter().skip(2).collect();
            argv.extend(c.strings("args"));
            uses.push((c.label(), sub.clone(), argv));
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let cmd: Vec<String> = seq(&c.c[probe]["exec"]["command"])
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                if cmd.first().map(String::as_str) == Some(BINARY) && cmd.len() > 1 {
                    uses.push((
                        format!("{} {probe}", c.label()),
                        cmd[1].clone(),
                        cmd[2..].to_vec(),
                    ));
                }
            }
        }
    }
    assert!(!uses.is_empty());
    let mut problems = Vec::new();
    let mut checked = 0;
    for (label, sub, argv) in uses {
        let help = output_with_timeout(
            Command::new(sidecar_bin()).args([sub.as_str(), "--help"]),
            Duration::from_secs(10),
        );
        if !help.status.success() {
            let stderr = String::from_utf8_lossy(&help.stderr);
            assert!(
                stderr.contains("unrecognized subcommand"),
                "sidecar {sub} --help: {stderr}"
            );
            eprintln!("not checked: this build has no `sidecar {sub}` ({label})");
            continue;
        }
        let text = String::from_utf8_lossy(&help.stdout);
        let known: BTreeSet<&str> = text
            .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .collect();
        for arg in argv.iter().filter(|a| a.starts_with("--")) {
            let name = arg.split('=').next().unwrap_or(arg);
            checked += 1;
            if !known.contains(name) {
                problems.push(format!("{label}: `sidecar {sub}` has no option {name}"));
            }
        }
    }
    eprintln!("{checked} flag(s) checked against the binary's --help");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- the example policy ----------------------------------------------------------------------

#[test]
fn the_example_policy_passes_sidecar_policy_check() {
    let docs = load_deploy();
    let scratch = Scratch::new("pkg-policy");
    let mut n = 0;
    for doc in docs.iter().filter(|d| d.kind() == "ConfigMap") {
        let Some(data) = doc.value["data"].as_mapping() else {
            continue;
        };
        for (key, text) in data {
            let (Some(key), Some(text)) = (key.as_str(), text.as_str()) else {
                continue;
            };
            if !key.ends_with(".toml") {
                continue;
            }
            let path = scratch.write(key, text);
            let out = output_with_timeout(
                Command::new(sidecar_bin())
                    .args(["policy", "check"])
                    .arg(&path)
                    .args(["--outbound", "169.254.169.254:80"]),
                Duration::from_secs(30),
            );
            assert!(
                out.status.success(),
                "{}: {}",
                doc.label(),
                String::from_utf8_lossy(&out.stderr)
            );
            // The metadata rule is in force.
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains("\"action\":\"deny\""), "{stdout}");
            n += 1;
        }
    }
    assert!(n > 0, "no policy ConfigMap in deploy/");
}

// ---- each rule can fail ------------------------------------------------------------------------

/// The value at `path` (map keys and sequence indices, `/`-separated, `~1` for a `/` in a
/// key as in JSON pointers), created if missing.
fn at<'a>(v: &'a mut Value, path: &str) -> &'a mut Value {
    path.split('/').filter(|s| !s.is_empty()).fold(v, |v, seg| {
        let seg = seg.replace("~1", "/");
        if let Ok(i) = seg.parse::<usize>() {
            &mut v.as_sequence_mut().expect("a sequence")[i]
        } else {
            if v.is_null() {
                *v = Value::Mapping(Default::default());
            }
            let map = v.as_mapping_mut().expect("a mapping");
            map.entry(Value::String(seg)).or_insert(Value::Null)
        }
    })
}

fn doc_mut<'a>(docs: &'a mut [Doc], kind: &str) -> &'a mut Value {
    &mut docs
        .iter_mut()
        .find(|d| d.kind() == kind)
        .expect(kind)
        .value
}

fn file_mut<'a>(docs: &'a mut [Doc], file: &str) -> &'a mut Value {
    &mut docs.iter_mut().find(|d| d.file == file).expect(file).value
}

fn named_mut<'a>(docs: &'a mut [Doc], kind: &str, name: &str) -> &'a mut Value {
    &mut docs
        .iter_mut()
        .find(|d| d.kind() == kind && d.name() == name)
        .expect(name)
        .value
}

fn yaml(s: &str) -> Value {
    serde_yaml_ng::from_str(s).unwrap()
}

/// Replaces the argument starting `prefix` in `args`.
fn set_arg(args: &mut Value, prefix: &str, new: &str) {
    let seq = args.as_sequence_mut().expect("args");
    let i = seq
        .iter()
        .position(|a| a.as_str().is_some_and(|s| s.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no arg {prefix}"));
    seq[i] = Value::String(new.into());
}

const SIDECAR: &str = "spec/template/spec/initContainers/0";
const AGENT: &str = "spec/template/spec/containers/0";

type Fault = (&'static str, fn(&mut Vec<Doc>, &mut String), &'static str);

#[test]
fn each_rule_catches_its_fault() {
    let faults: Vec<Fault> = vec![
        (
            "sidecar privileged",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/privileged"),
                ) = Value::Bool(true)
            },
            "privileged: true",
        ),
        (
            "sidecar as root",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/runAsUser"),
                ) = yaml("0")
            },
            "runAsUser is not 65532",
        ),
        (
            "sidecar runAsNonRoot off",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/runAsNonRoot"),
                ) = Value::Bool(false)
            },
            "runAsNonRoot is not true",
        ),
        (
            "sidecar escalation",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/allowPrivilegeEscalation"),
                ) = Value::Bool(true)
            },
            "allowPrivilegeEscalation is not false",
        ),
        (
            "sidecar keeps capabilities",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/capabilities/drop"),
                ) = yaml("[NET_RAW]")
            },
            "capabilities.drop is not [ALL]",
        ),
        (
            "sidecar adds a capability",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/capabilities/add"),
                ) = yaml("[NET_ADMIN]")
            },
            "adds capabilities [\"NET_ADMIN\"]",
        ),
        (
            "sidecar writable root",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/readOnlyRootFilesystem"),
                ) = Value::Bool(false)
            },
            "readOnlyRootFilesystem is not true",
        ),
        (
            "sidecar unconfined seccomp",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/securityContext/seccompProfile/type"),
                ) = yaml("Unconfined");
            },
            "seccompProfile is not RuntimeDefault",
        ),
        (
            "sidecar not native",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/restartPolicy"),
                ) = Value::Null
            },
            "not a native sidecar",
        ),
        (
            "pod hostNetwork",
            |d, _| {
                *at(doc_mut(d, "Deployment"), "spec/template/spec/hostNetwork") = Value::Bool(true)
            },
            "the pod sets hostNetwork",
        ),
        (
            "env from the wrong field",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/env/2/valueFrom/fieldRef/fieldPath"),
                ) = yaml("metadata.name")
            },
            "env POD_SERVICE_ACCOUNT",
        ),
        (
            "liveness on /readyz",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/livenessProbe/httpGet/path"),
                ) = yaml("/readyz")
            },
            "livenessProbe does not GET /healthz",
        ),
        (
            "probe on another port",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/startupProbe/httpGet/port"),
                ) = yaml("15001")
            },
            "startupProbe is not on the probe port",
        ),
        (
            "probes on the admin port",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/readinessProbe/httpGet/port"),
                ) = yaml("admin")
            },
            "readinessProbe is not on the probe port",
        ),
        (
            "probe listener on loopback",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "Deployment"), &format!("{SIDECAR}/args")),
                    "--probe-addr",
                    "--probe-addr=127.0.0.1:15021",
                )
            },
            "not reachable by kubelet's probes",
        ),
        (
            "more connections than the memory limit holds",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "Deployment"), &format!("{SIDECAR}/args")),
                    "--max-connections",
                    "--max-connections=100000",
                )
            },
            "above the memory limit",
        ),
        (
            "tls via subPath",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/volumeMounts/1/subPath"),
                ) = yaml("tls.crt")
            },
            "uses subPath",
        ),
        (
            "agent privileged",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/securityContext/privileged"),
                ) = Value::Bool(true)
            },
            "privileged: true",
        ),
        (
            "agent extra capability",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/securityContext/capabilities/add"),
                ) = yaml("[BPF, NET_ADMIN, PERFMON, SYS_ADMIN]")
            },
            "the documented list is",
        ),
        (
            "agent missing capability",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/securityContext/capabilities/add"),
                ) = yaml("[BPF, NET_ADMIN]")
            },
            "the documented list is",
        ),
        (
            "agent keeps capabilities",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/securityContext/capabilities/drop"),
                ) = Value::Null
            },
            "capabilities.drop is not [ALL]",
        ),
        (
            "agent without hostPID",
            |d, _| *at(doc_mut(d, "DaemonSet"), "spec/template/spec/hostPID") = Value::Bool(false),
            "hostPID is not true",
        ),
        (
            "agent no-escalation with SYS_ADMIN",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/securityContext/capabilities/add"),
                ) = yaml("[BPF, NET_ADMIN, PERFMON, SYS_ADMIN]")
            },
            "refused by the API server",
        ),
        (
            "agent may escalate",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/securityContext/allowPrivilegeEscalation"),
                ) = Value::Null
            },
            "allowPrivilegeEscalation is not false",
        ),
        (
            "agent Bidirectional unprivileged",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/volumeMounts/0/mountPropagation"),
                ) = yaml("Bidirectional")
            },
            "only for privileged containers",
        ),
        (
            "agent as a Deployment",
            |d, _| *at(doc_mut(d, "DaemonSet"), "kind") = yaml("Deployment"),
            "must run as a DaemonSet",
        ),
        (
            "proxy port",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "Deployment"), &format!("{SIDECAR}/args")),
                    "--proxy-port",
                    "--proxy-port=15002",
                )
            },
            "--proxy-port is Some(\"15002\")",
        ),
        (
            "inbound port",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "Deployment"), &format!("{SIDECAR}/args")),
                    "--inbound-port",
                    "--inbound-port=15009",
                )
            },
            "--inbound-port is",
        ),
        (
            "admin port",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "Deployment"), &format!("{SIDECAR}/args")),
                    "--admin-addr",
                    "--admin-addr=0.0.0.0:16000",
                )
            },
            "the --admin-addr port is",
        ),
        (
            "scrape annotation",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    "spec/template/metadata/annotations/prometheus.io~1port",
                ) = yaml("'9090'")
            },
            "the prometheus.io/port annotation is",
        ),
        (
            "container port",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    &format!("{SIDECAR}/ports/2/containerPort"),
                ) = yaml("15018")
            },
            "containerPort tunnel",
        ),
        (
            "proxy socket",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "Deployment"), &format!("{SIDECAR}/args")),
                    "--agent-socket",
                    "--agent-socket=/run/other.sock",
                )
            },
            "--agent-socket is",
        ),
        (
            "agent socket",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "DaemonSet"), &format!("{AGENT}/args")),
                    "--socket",
                    "--socket=/tmp/agent.sock",
                )
            },
            "--socket is",
        ),
        (
            "agent bpffs",
            |d, _| {
                set_arg(
                    at(doc_mut(d, "DaemonSet"), &format!("{AGENT}/args")),
                    "--bpffs",
                    "--bpffs=/mnt/bpf",
                )
            },
            "--bpffs is",
        ),
        (
            "socket from another host dir",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    "spec/template/spec/volumes/0/hostPath/path",
                ) = yaml("/var/run/other")
            },
            "mounts the socket directory from /var/run/other",
        ),
        (
            "state inside the shared dir",
            |d, _| {
                let ds = doc_mut(d, "DaemonSet");
                set_arg(
                    at(ds, &format!("{AGENT}/args")),
                    "--state-dir",
                    "--state-dir=/run/sidecar/agent",
                );
            },
            "which every meshed pod mounts",
        ),
        (
            "wrong image",
            |d, _| {
                *at(doc_mut(d, "Deployment"), &format!("{SIDECAR}/image")) =
                    yaml("sidecar-agent:0.1.0")
            },
            "expected sidecar-proxy",
        ),
        (
            "wrong tag",
            |d, _| {
                *at(doc_mut(d, "DaemonSet"), &format!("{AGENT}/image")) =
                    yaml("sidecar-agent:latest")
            },
            "expected sidecar-agent:",
        ),
        (
            "agent probe on another socket",
            |d, _| {
                *at(
                    doc_mut(d, "DaemonSet"),
                    &format!("{AGENT}/livenessProbe/exec/command/3"),
                ) = yaml("--socket=/tmp/x.sock")
            },
            "livenessProbe is not",
        ),
        (
            "uninstall with another state dir",
            |d, _| {
                set_arg(
                    at(
                        named_mut(d, "DaemonSet", "sidecar-uninstall"),
                        "spec/template/spec/initContainers/0/args",
                    ),
                    "--state-dir",
                    "--state-dir=/run/other",
                )
            },
            "--state-dir is Some(\"/run/other\"), the agent's is",
        ),
        (
            "uninstall from another bpffs",
            |d, _| {
                *at(
                    named_mut(d, "DaemonSet", "sidecar-uninstall"),
                    "spec/template/spec/volumes/0/hostPath/path",
                ) = yaml("/run/bpf")
            },
            "mount is Some(\"/sys/fs/bpf <- Some(\\\"/run/bpf\\\")\")",
        ),
        (
            "uninstall in the main kustomization",
            |d, _| {
                at(file_mut(d, "deploy/kustomization.yaml"), "resources")
                    .as_sequence_mut()
                    .unwrap()
                    .push(yaml("uninstall/uninstall.yaml"))
            },
            "which uninstalls the agent",
        ),
        (
            "uninstall as a long-running container",
            |d, _| {
                let spec = at(
                    named_mut(d, "DaemonSet", "sidecar-uninstall"),
                    "spec/template/spec",
                );
                let init = at(spec, "initContainers").clone();
                *at(spec, "containers") = init;
                *at(spec, "initContainers") = Value::Null;
            },
            "must be an init container",
        ),
        (
            "kustomize retags something else",
            |d, _| *at(file_mut(d, "deploy/kustomization.yaml"), "images/0/name") = yaml("sidecar"),
            "is not one of ours",
        ),
        (
            "grace shorter than the drain",
            |d, _| {
                *at(
                    doc_mut(d, "Deployment"),
                    "spec/template/spec/terminationGracePeriodSeconds",
                ) = yaml("20")
            },
            "terminationGracePeriodSeconds 20 <",
        ),
        (
            "unlisted file",
            |d, _| {
                let k = file_mut(d, "deploy/kustomization.yaml");
                at(k, "resources").as_sequence_mut().unwrap().pop();
            },
            "does not list",
        ),
        (
            "certificate for another identity",
            |d, _| {
                *at(
                    named_mut(d, "Certificate", "demo-app-sidecar"),
                    "spec/uris/0",
                ) = yaml("spiffe://cluster.local/ns/x/sa/y")
            },
            "the pod's SPIFFE ID is",
        ),
        (
            "command not our binary",
            |d, _| *at(doc_mut(d, "DaemonSet"), &format!("{AGENT}/command/0")) = yaml("/sidecar"),
            "expected one container running [/usr/local/bin/sidecar, agent] and one with --uninstall",
        ),
        (
            "Dockerfile on another toolchain",
            |_, f| *f = f.replace("ARG RUST_VERSION=1.95", "ARG RUST_VERSION=1.90"),
            "the workspace's rust-version is",
        ),
        (
            "Dockerfile without xtask's eBPF build",
            |_, f| *f = f.replace(" && cargo xtask build-ebpf", ""),
            "no RUN uses \"cargo xtask build-ebpf\"",
        ),
        (
            "Dockerfile proxy as root",
            |_, f| *f = f.replace("USER 65532:65532", "USER root"),
            "USER is Some(\"root\")",
        ),
        (
            "Dockerfile stage renamed",
            |_, f| *f = f.replace("AS agent", "AS node-agent"),
            "no stage \"agent\"",
        ),
        (
            "Dockerfile COPY of a missing path",
            |_, f| *f = f.replace("COPY xtask xtask", "COPY tools tools"),
            "COPY tools: not in the repository",
        ),
        (
            "Dockerfile binary elsewhere",
            |_, f| {
                *f = f.replace(
                    "/out/sidecar /usr/local/bin/sidecar",
                    "/out/sidecar /sidecar",
                )
            },
            "does not COPY --from=builder the binary",
        ),
    ];
    let (docs, file, ignore) = (load_deploy(), dockerfile(), dockerignore());
    assert!(
        all_problems(&docs, &file, &ignore).is_empty(),
        "the real files must pass first"
    );
    let mut missed = Vec::new();
    for (what, fault, expect) in faults {
        let (mut d, mut f) = (docs.clone(), file.clone());
        fault(&mut d, &mut f);
        let problems = all_problems(&d, &f, &ignore);
        if !problems.iter().any(|p| p.contains(expect)) {
            missed.push(format!("{what}: expected {expect:?}, got {problems:#?}"));
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
    assert!(
        check_dockerfile(&file, "# nothing ignored\n", &docs)
            .iter()
            .any(|p| p.contains("target/ is not excluded")),
        "an unignored target/ is reported"
    );
}

/// The rules on a manifest written from scratch, as a reader would write a bad one.
#[test]
fn a_privileged_sidecar_from_a_string_is_refused() {
    let bad = r#"
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: default}
spec:
  initContainers:
    - name: sidecar
      image: sidecar-proxy:0.1.0
      restartPolicy: Always
      command: ["/usr/local/bin/sidecar", "proxy"]
      securityContext:
        privileged: true
        capabilities: {add: [NET_ADMIN]}
  containers:
    - {name: app, image: app}
"#;
    let problems = check_proxy(&parse("bad.yaml", bad));
    for expect in [
        "privileged: true",
        "runAsNonRoot is not true",
        "adds capabilities [\"NET_ADMIN\"]",
        "capabilities.drop is not [ALL]",
        "startupProbe does not GET /readyz",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{expect:?} not in {problems:#?}"
        );
    }
}
