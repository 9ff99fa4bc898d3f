//! Our rules for `deploy/` and the `Dockerfile`: what no Kubernetes schema knows.
//!
//! The schemas (checked by [`validator`]) say a manifest is well-formed; these rules say it is
//! ours and safe: the pod sidecar has no privilege at all ([`proxy`]); the app containers
//! beside it cannot open raw sockets ([`app`]); the agent has exactly
//! the documented capabilities ([`agent`]); ports, the socket and bpffs paths equal
//! `sidecar::defaults` ([`defaults`]); the images are ours at the workspace's version
//! ([`images`]); the grace period covers the drain ([`drain`]); each kustomization lists
//! every file beside it ([`kustomization`]); the cert-manager certificate carries the pod's
//! SPIFFE ID ([`certificates`]); the Dockerfile builds what the manifests run
//! ([`dockerfile`]).
//!
//! [`load`] reads a workspace's `deploy/` and `Dockerfile` into a [`Deploy`]; [`problems`]
//! runs every rule over it. Each rule is a function from documents to complaints (one line
//! each, naming the file, object and container), so a test can run it on a snippet.
//! [`pod`] is how the rules read pods and containers.

pub mod agent;
pub mod app;
pub mod certificates;
pub mod defaults;
pub mod dockerfile;
pub mod drain;
pub mod images;
pub mod kustomization;
pub mod pod;
pub mod proxy;
pub mod validator;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

/// Where both images keep the binary (Dockerfile) and what the manifests run.
pub const BINARY: &str = "/usr/local/bin/sidecar";
/// distroless's `nonroot` user; the proxy image and the pod both use it.
pub const PROXY_UID: i64 = 65532;

/// One YAML document and the file it came from (relative to the workspace).
#[derive(Clone, Debug)]
pub struct Doc {
    pub file: String,
    pub value: Value,
}

impl Doc {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    /// `file Kind/name`, how complaints name a document.
    pub fn label(&self) -> String {
        format!("{} {}/{}", self.file, self.kind(), self.name())
    }
}

/// The documents of one YAML file (empty ones dropped); `file` is what they are labelled
/// with. Panics, naming the file, on YAML that does not parse.
pub fn parse(file: &str, text: &str) -> Vec<Doc> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .map(|value| Doc {
            file: file.to_string(),
            value,
        })
        .collect()
}

/// What the rules read: the manifests, the Dockerfile and `.dockerignore`, and the workspace
/// they came from (the kustomization and Dockerfile rules look at files beside them).
#[derive(Clone, Debug)]
pub struct Deploy {
    pub workspace: PathBuf,
    pub docs: Vec<Doc>,
    pub dockerfile: String,
    pub dockerignore: String,
}

/// Every `*.yaml` (or `*.yml`) under `workspace/deploy/`, sorted. Panics if there is none.
pub fn yaml_files(workspace: &Path) -> Vec<PathBuf> {
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
    walk(&workspace.join("deploy"), &mut files);
    files.sort();
    assert!(!files.is_empty(), "deploy/ holds no YAML");
    files
}

/// Reads `deploy/`, the `Dockerfile` (which must exist) and `.dockerignore` (empty if
/// missing) of `workspace`.
pub fn load(workspace: &Path) -> Deploy {
    let docs = yaml_files(workspace)
        .iter()
        .flat_map(|path| {
            let rel = path.strip_prefix(workspace).unwrap().display().to_string();
            parse(&rel, &std::fs::read_to_string(path).unwrap())
        })
        .collect();
    Deploy {
        workspace: workspace.to_path_buf(),
        docs,
        dockerfile: std::fs::read_to_string(workspace.join("Dockerfile"))
            .expect("reading the Dockerfile"),
        dockerignore: std::fs::read_to_string(workspace.join(".dockerignore")).unwrap_or_default(),
    }
}

/// Every rule's complaints, in a fixed order; empty when the deployment is fine.
pub fn problems(deploy: &Deploy) -> Vec<String> {
    let docs = &deploy.docs;
    [
        proxy::check(docs),
        app::check(docs),
        agent::check(docs),
        defaults::check(docs),
        images::check(docs),
        drain::check(docs),
        kustomization::check(&deploy.workspace, docs),
        certificates::check(docs),
        dockerfile::check(
            &deploy.workspace,
            &deploy.dockerfile,
            &deploy.dockerignore,
            docs,
        ),
    ]
    .concat()
}

/// A YAML sequence's items; nothing for anything else (missing keys included).
pub fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// Shared by the rules' table tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Doc, parse};

    /// Runs `check` over each case's documents and compares with its expectation: `None`,
    /// no complaint at all; `Some(text)`, a complaint containing `text`. One assertion at the
    /// end lists every case that went otherwise.
    pub fn run_table<'a>(
        cases: impl IntoIterator<Item = (&'a str, String, Option<&'a str>)>,
        check: impl Fn(&[Doc]) -> Vec<String>,
    ) {
        let mut wrong = Vec::new();
        for (name, yaml, expect) in cases {
            let problems = check(&parse(&format!("{name}.yaml"), &yaml));
            let ok = match expect {
                None => problems.is_empty(),
                Some(text) => problems.iter().any(|p| p.contains(text)),
            };
            if !ok {
                wrong.push(format!("{name}: expected {expect:?}, got {problems:#?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// A meshed pod that passes every pod rule: the proxy as a native sidecar with the
    /// defaults' ports and paths, an app with a 5 s preStop, a Secret for --tls-dir.
    pub const PROXY_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: app
  namespace: demo
  annotations: {prometheus.io/port: "15000"}
spec:
  serviceAccountName: app
  terminationGracePeriodSeconds: 40
  securityContext: {seccompProfile: {type: RuntimeDefault}}
  initContainers:
    - name: sidecar
      image: registry.example/sidecar-proxy:0.1.0
      restartPolicy: Always
      command: ["/usr/local/bin/sidecar", "proxy"]
      args:
        - --agent-socket=/var/run/sidecar/agent.sock
        - --proxy-port=15001
        - --inbound-port=15008
        - --admin-addr=0.0.0.0:15000
        - --probe-addr=0.0.0.0:15021
        - --tls-dir=/etc/sidecar/tls
        - --drain-timeout-secs=20
        - --max-connections=4096
      env:
        - {name: POD_UID, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}
        - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
        - {name: POD_SERVICE_ACCOUNT, valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}}
      ports:
        - {name: admin, containerPort: 15000}
        - {name: probe, containerPort: 15021}
        - {name: tunnel, containerPort: 15008}
      startupProbe: {httpGet: {path: /readyz, port: probe}}
      readinessProbe: {httpGet: {path: /readyz, port: probe}}
      livenessProbe: {httpGet: {path: /healthz, port: 15021}}
      resources: {limits: {memory: 256Mi}}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
      volumeMounts:
        - {name: agent-socket, mountPath: /var/run/sidecar, readOnly: true}
        - {name: tls, mountPath: /etc/sidecar/tls, readOnly: true}
  containers:
    - name: app
      image: app
      securityContext: {capabilities: {drop: [ALL]}}
      lifecycle: {preStop: {sleep: {seconds: 5}}}
  volumes:
    - {name: agent-socket, hostPath: {path: /var/run/sidecar}}
    - {name: tls, secret: {secretName: app-tls}}
"#;

    /// The node agent and its uninstall, passing every agent rule and agreeing with
    /// [`PROXY_POD`] on the socket.
    pub const AGENT: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: sidecar-agent}
spec:
  template:
    spec:
      hostPID: true
      containers:
        - name: agent
          image: sidecar-agent:0.1.0
          command: ["/usr/local/bin/sidecar", "agent"]
          args: [--bpffs=/sys/fs/bpf, --socket=/var/run/sidecar/agent.sock, --state-dir=/run/sidecar-agent]
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL], add: [BPF, NET_ADMIN, PERFMON]}
          readinessProbe:
            exec: {command: [/usr/local/bin/sidecar, agent, --status, --socket=/var/run/sidecar/agent.sock]}
          livenessProbe:
            exec: {command: [/usr/local/bin/sidecar, agent, --status, --socket=/var/run/sidecar/agent.sock]}
          volumeMounts:
            - {name: bpffs, mountPath: /sys/fs/bpf, mountPropagation: HostToContainer}
            - {name: socket-dir, mountPath: /var/run/sidecar}
            - {name: state, mountPath: /run/sidecar-agent}
      volumes:
        - {name: bpffs, hostPath: {path: /sys/fs/bpf}}
        - {name: socket-dir, hostPath: {path: /var/run/sidecar}}
        - {name: state, hostPath: {path: /run/sidecar-agent}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: sidecar-uninstall}
spec:
  template:
    spec:
      hostPID: true
      initContainers:
        - name: uninstall
          image: sidecar-agent:0.1.0
          command: ["/usr/local/bin/sidecar", "agent"]
          args: [--uninstall, --bpffs=/sys/fs/bpf, --socket=/var/run/sidecar/agent.sock, --state-dir=/run/sidecar-agent]
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL], add: [BPF, NET_ADMIN, PERFMON]}
          volumeMounts:
            - {name: bpffs, mountPath: /sys/fs/bpf, mountPropagation: HostToContainer}
            - {name: socket-dir, mountPath: /var/run/sidecar}
            - {name: state, mountPath: /run/sidecar-agent}
      containers:
        - {name: done, image: pause}
      volumes:
        - {name: bpffs, hostPath: {path: /sys/fs/bpf}}
        - {name: socket-dir, hostPath: {path: /var/run/sidecar}}
        - {name: state, hostPath: {path: /run/sidecar-agent}}
"#;

    /// [`PROXY_POD`] and [`AGENT`] as one file, with `from` replaced by `to` (which must
    /// occur: a table row that edits nothing would test nothing).
    pub fn edited(from: &str, to: &str) -> String {
        let all = format!("{PROXY_POD}---{AGENT}");
        assert!(all.contains(from), "{from:?} is not in the fixture");
        all.replacen(from, to, 1)
    }

    #[test]
    fn the_fixture_parses_into_a_pod_and_two_daemonsets() {
        let docs = parse("fixture.yaml", &edited("", ""));
        let kinds: Vec<&str> = docs.iter().map(Doc::kind).collect();
        assert_eq!(kinds, ["Pod", "DaemonSet", "DaemonSet"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_labelled_by_file_kind_and_name() {
        let docs = parse(
            "deploy/x.yaml",
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n---\nkind: Pod\n",
        );
        let labels: Vec<String> = docs.iter().map(Doc::label).collect();
        assert_eq!(labels, ["deploy/x.yaml ConfigMap/a", "deploy/x.yaml Pod/"]);
    }
}
