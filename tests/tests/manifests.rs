//! `deploy/` and the `Dockerfile`, checked offline.
//!
//! 1. Every file goes through `kubernetes-validate` (PyPI; bundled OpenAPI schemas, strict
//!    mode: unknown fields are errors) for [`KUBERNETES_VERSION`]. Kinds it has no schema for
//!    are errors too, except the ones named in `validator::CRD_KINDS`.
//! 2. Our own rules, which no schema knows (`sidecar_tests::manifests`, one module per rule
//!    group, each with table tests of its own): the pod sidecar has no privilege at all; the
//!    agent has exactly `agent::AGENT_CAPABILITIES`; ports, the socket and bpffs paths equal
//!    `sidecar::defaults`; images and the binary path agree with the Dockerfile; the grace
//!    period covers the drain; the kustomization lists every file; the cert-manager
//!    certificate carries the pod's SPIFFE ID.
//!
//! Each rule is shown to fail on the real files too: `each_rule_catches_its_fault` breaks
//! them one fault at a time and expects that rule's complaint.
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

use serde_yaml_ng::Value;
use sidecar_tests::{
    host::output_with_timeout,
    manifests::{
        self, BINARY, Deploy, Doc,
        pod::{containers, pods},
        seq,
        validator::{self, INSTALL_HINT, KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION, validate},
    },
    scratch::Scratch,
    sidecar_bin, skip,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn load_deploy() -> Deploy {
    manifests::load(&workspace())
}

fn yaml_files() -> Vec<PathBuf> {
    manifests::yaml_files(&workspace())
}

fn validator() -> Option<PathBuf> {
    validator::find(&workspace())
}

#[test]
fn deploy_passes_our_checks() {
    let deploy = load_deploy();
    let problems = manifests::problems(&deploy);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- the schema validator ------------------------------------------------------------------

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
    let docs = load_deploy().docs;
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
                let cmd: Vec<String> = seq(&c.value[probe]["exec"]["command"])
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
    let docs = load_deploy().docs;
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
    let deploy = load_deploy();
    assert!(
        manifests::problems(&deploy).is_empty(),
        "the real files must pass first"
    );
    let mut missed = Vec::new();
    for (what, fault, expect) in faults {
        let mut d = deploy.clone();
        fault(&mut d.docs, &mut d.dockerfile);
        let problems = manifests::problems(&d);
        if !problems.iter().any(|p| p.contains(expect)) {
            missed.push(format!("{what}: expected {expect:?}, got {problems:#?}"));
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
    assert!(
        manifests::dockerfile::check(
            &deploy.workspace,
            &deploy.dockerfile,
            "# nothing ignored\n",
            &deploy.docs
        )
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
    let problems = manifests::proxy::check(&manifests::parse("bad.yaml", bad));
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
