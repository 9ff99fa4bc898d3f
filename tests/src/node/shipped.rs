//! The example application's pod as `deploy/` ships it, on the simulated node: the sidecar
//! container's command, arguments, environment (the downward API's fields resolved for the
//! pod), user and capabilities exactly as `deploy/example-app.yaml` says, its volumes made of
//! what they name (the agent's socket directory, a certificate for the pod's service account,
//! the `deploy/policy.yaml` ConfigMap's files), and the app container's user and
//! capabilities for the test's app processes.
//!
//! The YAML is compiled in, so the guests of the kernel matrix (which carry no checkout)
//! apply the same files. What the node supplies instead of Kubernetes: the pod's UID and
//! network namespace, the paths the volumes stand for, and the app's image (the test client
//! runs in its place, as the app container's user).

use std::{collections::BTreeMap, fs, path::PathBuf};

use serde_yaml_ng::Value;

use super::{Node, Pod, Proc, spawn};
use crate::{
    manifests::{Doc, parse, seq},
    testclient_bin,
};

const EXAMPLE_APP: &str = include_str!("../../../deploy/example-app.yaml");
const POLICY: &str = include_str!("../../../deploy/policy.yaml");

/// The example app's sidecar, running as shipped in a pod of the node.
pub struct ShippedPod {
    pub sidecar: Proc,
    /// Its `--admin-addr` and `--probe-addr` ports (in the pod's network namespace).
    pub admin_port: u16,
    pub probe_port: u16,
    /// The policy file as the ConfigMap mounts it.
    pub policy: String,
    /// The app container's `runAsUser`.
    pub app_uid: u32,
}

/// The Deployment's namespace, service account and pod spec.
struct Template {
    namespace: String,
    service_account: String,
    spec: Value,
}

fn template() -> Template {
    let docs = parse("deploy/example-app.yaml", EXAMPLE_APP);
    let deployment = docs
        .iter()
        .find(|d| d.kind() == "Deployment")
        .expect("deploy/example-app.yaml has a Deployment");
    let spec = deployment.value["spec"]["template"]["spec"].clone();
    Template {
        namespace: text(&deployment.value["metadata"]["namespace"]),
        service_account: text(&spec["serviceAccountName"]),
        spec,
    }
}

fn text(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string in the manifest, found {v:?}"))
        .to_owned()
}

fn strings(v: &Value) -> Vec<String> {
    seq(v).iter().map(text).collect()
}

/// The container `name` of the pod spec (init containers included).
fn container<'a>(spec: &'a Value, name: &str) -> &'a Value {
    seq(&spec["initContainers"])
        .iter()
        .chain(seq(&spec["containers"]))
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("the example app's pod has no container {name}"))
}

/// The container's named port.
fn port(c: &Value, name: &str) -> u16 {
    seq(&c["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port {name}")) as u16
}

/// `runAsUser` and `runAsGroup` (the user's own group if absent), with every capability
/// dropped: anything else is not what the manifest rules allow, and not simulated here.
fn user(c: &Value) -> (u32, u32) {
    let sc = &c["securityContext"];
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        ["ALL"],
        "the test applies containers that drop every capability"
    );
    assert!(
        seq(&sc["capabilities"]["add"]).is_empty(),
        "the test applies containers that add no capability"
    );
    let uid = sc["runAsUser"].as_u64().expect("runAsUser") as u32;
    let gid = sc["runAsGroup"].as_u64().map_or(uid, |g| g as u32);
    (uid, gid)
}

/// `setpriv` running as `(uid, gid)` with no capabilities, then `argv`.
fn as_user((uid, gid): (u32, u32), argv: Vec<String>) -> Vec<String> {
    let mut full: Vec<String> = [
        "setpriv".to_string(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        "--inh-caps=-all".into(),
        "--bounding-set=-all".into(),
    ]
    .into();
    full.extend(argv);
    full
}

impl Node {
    /// Starts the example app's sidecar in `pod` as `deploy/` ships it; returns once its
    /// process runs (wait for its probe port's `/readyz`, [`Node::wait_shipped_ready`]).
    pub fn start_shipped_sidecar(&self, pod: &Pod) -> ShippedPod {
        let t = template();
        let c = container(&t.spec, "sidecar");
        // The volumes, by name: where each mount's files are on this node.
        let mut local: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut policy = String::new();
        for v in seq(&t.spec["volumes"]) {
            let name = text(&v["name"]);
            let dir = if v["hostPath"].is_mapping() {
                // The only host directory a meshed pod mounts: the agent's socket's.
                let socket_dir = self.socket.parent().expect("socket dir").to_path_buf();
                assert!(
                    strings(&c["args"])
                        .iter()
                        .any(|a| a.starts_with("--agent-socket=")
                            && a.contains(&text(&v["hostPath"]["path"]))),
                    "hostPath volume {name} is not the agent socket's directory"
                );
                socket_dir
            } else if v["secret"].is_mapping() {
                let id = format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    super::TD,
                    t.namespace,
                    t.service_account
                );
                PathBuf::from(self.certs(&id, &format!("secret-{name}")))
            } else if v["configMap"].is_mapping() {
                let cm_name = text(&v["configMap"]["name"]);
                let docs: Vec<Doc> = parse("deploy/policy.yaml", POLICY);
                let cm = docs
                    .iter()
                    .find(|d| d.kind() == "ConfigMap" && d.name() == cm_name)
                    .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not in deploy/policy.yaml"));
                let dir = self.scratch.path(&format!("configmap-{name}"));
                fs::create_dir_all(&dir).unwrap();
                for (file, content) in cm.value["data"].as_mapping().expect("data") {
                    let content = text(content);
                    fs::write(dir.join(text(file)), &content).unwrap();
                    policy = content;
                }
                dir
            } else {
                panic!("volume {name}: the simulated node cannot provide its kind");
            };
            local.insert(name, dir);
        }
        let mounts: Vec<(String, String)> = seq(&c["volumeMounts"])
            .iter()
            .map(|m| {
                let dir = &local[&text(&m["name"])];
                (text(&m["mountPath"]), dir.display().to_string())
            })
            .collect();
        let in_pod = |arg: &str| {
            mounts
                .iter()
                .fold(arg.to_owned(), |a, (from, to)| a.replace(from.as_str(), to))
        };
        let command = strings(&c["command"]);
        assert_eq!(command[0], crate::manifests::BINARY);
        let mut argv = vec![self.unprivileged_bin().display().to_string()];
        argv.extend(command[1..].iter().map(|a| in_pod(a)));
        argv.extend(strings(&c["args"]).iter().map(|a| in_pod(a)));
        let env: Vec<(String, String)> = seq(&c["env"])
            .iter()
            .map(|e| {
                let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    None => text(&e["value"]),
                    Some("metadata.uid") => pod.uid.clone(),
                    Some("metadata.namespace") => t.namespace.clone(),
                    Some("spec.serviceAccountName") => t.service_account.clone(),
                    Some(other) => panic!("the simulated node has no field {other}"),
                };
                (text(&e["name"]), value)
            })
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sidecar = spawn(
            &self.scratch,
            "shipped-sidecar",
            Some(&pod.container("sidecar")),
            Some(pod.ns),
            &as_user(user(c), argv),
            &env,
        );
        ShippedPod {
            sidecar,
            admin_port: port(c, "admin"),
            probe_port: port(c, "probe"),
            policy,
            app_uid: user(container(&t.spec, "app")).0,
        }
    }

    /// Waits until the shipped sidecar answers its startup probe (`/readyz` on the probe
    /// port) with 200, as kubelet would before it starts the app.
    pub fn wait_shipped_ready(&self, pod: &Pod, shipped: &ShippedPod) {
        assert!(
            crate::host::wait_until(super::STEP, || {
                self.admin_on(pod, shipped.probe_port, "/readyz").0 == 200
            }),
            "the shipped sidecar never passed its startup probe\n{}",
            shipped.sidecar.stderr()
        );
    }

    /// The test client in the pod's `app` container, as the shipped app container's user
    /// with no capabilities.
    pub fn shipped_app(
        &self,
        pod: &Pod,
        shipped: &ShippedPod,
        name: &str,
        args: &[String],
    ) -> Proc {
        let mut argv = vec![self.for_nobody(testclient_bin()).display().to_string()];
        argv.extend(args.iter().cloned());
        let app = template();
        let (uid, gid) = user(container(&app.spec, "app"));
        assert_eq!(uid, shipped.app_uid);
        spawn(
            &self.scratch,
            name,
            Some(&pod.container("app")),
            Some(pod.ns),
            &as_user((uid, gid), argv),
            &[],
        )
    }
}
