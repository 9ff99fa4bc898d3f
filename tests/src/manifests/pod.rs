//! How the rules read pods and containers: a pod template wherever a workload keeps it, and a
//! container's flags, capabilities, ports and host paths.

use serde_yaml_ng::Value;

use super::{BINARY, Doc, seq};

/// A pod template (or pod) and where it is.
pub struct Pod<'a> {
    pub doc: &'a Doc,
    pub spec: &'a Value,
}

/// The pod specs of every workload among `docs` (a Pod's own, a controller's template).
pub fn pods(docs: &[Doc]) -> Vec<Pod<'_>> {
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

/// A container, its pod, and whether it is an init container.
pub struct Container<'a> {
    pub pod: &'a Pod<'a>,
    pub init: bool,
    pub value: &'a Value,
}

impl Container<'_> {
    /// `file Kind/name container name`, how complaints name a container.
    pub fn label(&self) -> String {
        format!(
            "{} container {}",
            self.pod.doc.label(),
            self.value["name"].as_str().unwrap_or("?")
        )
    }

    /// The strings of a list field (`command`, `args`).
    pub fn strings(&self, key: &str) -> Vec<String> {
        seq(&self.value[key])
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// `--flag=value` or `--flag value` among command and args.
    pub fn flag(&self, flag: &str) -> Option<String> {
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
    pub fn mode(&self) -> Option<String> {
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

    pub fn security(&self) -> &Value {
        &self.value["securityContext"]
    }

    /// `securityContext.capabilities.<which>` (`add` or `drop`).
    pub fn capabilities(&self, which: &str) -> Vec<String> {
        seq(&self.security()["capabilities"][which])
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// The named container port's number.
    pub fn port(&self, name: &str) -> Option<i64> {
        seq(&self.value["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
    }

    /// A probe's port as a number (named ports resolved).
    pub fn probe_port(&self, probe: &str) -> Option<i64> {
        let port = &self.value[probe]["httpGet"]["port"];
        port.as_i64()
            .or_else(|| port.as_str().and_then(|name| self.port(name)))
    }

    /// The hostPath behind the volume mounted at `mount_path`, if it is one.
    pub fn host_path(&self, mount_path: &str) -> Option<String> {
        let m = seq(&self.value["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(mount_path))?;
        let name = m["name"].as_str()?;
        seq(&self.pod.spec["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .and_then(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
    }
}

/// A pod's init containers, then its containers.
pub fn containers<'a>(pod: &'a Pod<'a>) -> Vec<Container<'a>> {
    let of = |key: &str, init: bool| {
        seq(&pod.spec[key])
            .iter()
            .map(move |value| Container { pod, init, value })
            .collect::<Vec<_>>()
    };
    let mut all = of("initContainers", true);
    all.extend(of("containers", false));
    all
}

/// Runs `f` on every container of every pod that runs `sidecar <mode>`; returns how many
/// there were.
pub fn each_sidecar(docs: &[Doc], mode: &str, mut f: impl FnMut(&Container<'_>)) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse;

    /// Each container of `yaml`'s pods as (label, init, mode).
    fn modes(yaml: &str) -> Vec<(String, bool, Option<String>)> {
        let docs = parse("t.yaml", yaml);
        let pods = pods(&docs);
        pods.iter()
            .flat_map(|p| {
                containers(p)
                    .iter()
                    .map(|c| (c.label(), c.init, c.mode()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn pods_are_found_in_every_workload_kind() {
        for (kind, spec_at) in [
            ("Pod", "spec"),
            ("Deployment", "spec: {template: {spec"),
            ("Job", "spec: {template: {spec"),
            ("CronJob", "spec: {jobTemplate: {spec: {template: {spec"),
        ] {
            let close = "}".repeat(spec_at.matches('{').count());
            let yaml = format!(
                "kind: {kind}\nmetadata: {{name: w}}\n{spec_at}: {{containers: [{{name: c}}]}}{close}\n"
            );
            assert_eq!(modes(&yaml).len(), 1, "{kind}: {yaml}");
        }
        assert!(modes("kind: Service\nspec: {containers: [{name: c}]}\n").is_empty());
    }

    #[test]
    fn modes_come_from_our_binary_only() {
        let yaml = r#"
kind: Pod
metadata: {name: p}
spec:
  initContainers:
    - {name: u, command: [/usr/local/bin/sidecar, agent], args: [--uninstall]}
  containers:
    - {name: a, command: [/usr/local/bin/sidecar, agent]}
    - {name: x, command: [/sidecar, proxy]}
    - {name: n}
"#;
        let got: Vec<(bool, Option<String>)> = modes(yaml)
            .into_iter()
            .map(|(_, init, mode)| (init, mode))
            .collect();
        let want = |init, mode: Option<&str>| (init, mode.map(str::to_owned));
        assert_eq!(
            got,
            [
                want(true, Some("uninstall")),
                want(false, Some("agent")),
                want(false, None),
                want(false, None),
            ]
        );
    }

    #[test]
    fn flags_ports_and_host_paths_are_read_as_kubelet_would() {
        let docs = parse(
            "t.yaml",
            r#"
kind: Pod
metadata: {name: p}
spec:
  containers:
    - name: c
      command: [/usr/local/bin/sidecar, proxy, --a=1]
      args: [--b, "2", --c]
      ports: [{name: probe, containerPort: 15021}]
      readinessProbe: {httpGet: {port: probe}}
      livenessProbe: {httpGet: {port: 1234}}
      startupProbe: {httpGet: {port: nope}}
      volumeMounts: [{name: h, mountPath: /h}, {name: s, mountPath: /s}]
  volumes: [{name: h, hostPath: {path: /host}}, {name: s, secret: {secretName: x}}]
"#,
        );
        let pods = pods(&docs);
        let all = containers(&pods[0]);
        let c = &all[0];
        assert_eq!(c.label(), "t.yaml Pod/p container c");
        assert_eq!(c.flag("--a").as_deref(), Some("1"));
        assert_eq!(c.flag("--b").as_deref(), Some("2"));
        assert_eq!(c.flag("--c"), None);
        assert_eq!(c.flag("--d"), None);
        assert_eq!(c.probe_port("readinessProbe"), Some(15021));
        assert_eq!(c.probe_port("livenessProbe"), Some(1234));
        assert_eq!(c.probe_port("startupProbe"), None);
        assert_eq!(c.host_path("/h").as_deref(), Some("/host"));
        assert_eq!(c.host_path("/s"), None);
        assert_eq!(c.host_path("/none"), None);
    }
}
