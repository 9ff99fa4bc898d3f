//! The pod sidecar holds no privilege at all: the node agent does everything that needs one.
//! A proxy that could escalate would make every meshed pod as powerful as the agent.

use super::{BINARY, Doc, PROXY_UID, defaults, pod::each_sidecar, seq};

/// The pod sidecar: a native sidecar without any privilege, identity from the downward API,
/// probes on a listener of their own, updates of its files visible.
pub fn check(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let n = each_sidecar(docs, "proxy", |c| {
        let l = c.label();
        if !c.init || c.value["restartPolicy"].as_str() != Some("Always") {
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
            let from = seq(&c.value["env"])
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
            if c.value[probe]["httpGet"]["path"].as_str() != Some(path) {
                p.push(format!("{l}: {probe} does not GET {path}"));
            }
            if c.probe_port(probe) != Some(defaults::probe_port()) {
                p.push(format!(
                    "{l}: {probe} is not on the probe port {} (the admin port's slots can be \
                     held by any client in the pod network)",
                    defaults::probe_port()
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
        let limit = c.value["resources"]["limits"]["memory"]
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
        for m in seq(&c.value["volumeMounts"]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::testing::{edited, run_table};

    #[test]
    fn each_privilege_and_each_missing_setting_is_a_complaint() {
        let cases = [
            ("a good pod", edited("", ""), None),
            (
                "a flag and its value as two arguments",
                edited(
                    "--max-connections=4096",
                    "--max-connections\n        - \"4096\"",
                ),
                None,
            ),
            (
                "a limit in Gi",
                edited("memory: 256Mi", "memory: 1Gi"),
                None,
            ),
            (
                "seccomp set on the container",
                edited(
                    "  securityContext: {seccompProfile: {type: RuntimeDefault}}\n",
                    "",
                )
                .replacen(
                    "        runAsNonRoot: true",
                    "        seccompProfile: {type: RuntimeDefault}\n        runAsNonRoot: true",
                    1,
                ),
                None,
            ),
            (
                "no proxy at all",
                "kind: ConfigMap\nmetadata: {name: c}\n".into(),
                Some("no container runs [/usr/local/bin/sidecar, proxy]"),
            ),
            (
                "a plain init container",
                edited("restartPolicy: Always", "restartPolicy: OnFailure"),
                Some("not a native sidecar"),
            ),
            (
                "privileged",
                edited(
                    "runAsNonRoot: true",
                    "runAsNonRoot: true\n        privileged: true",
                ),
                Some("privileged: true"),
            ),
            (
                "runAsNonRoot off",
                edited("runAsNonRoot: true", "runAsNonRoot: false"),
                Some("runAsNonRoot is not true"),
            ),
            (
                "root",
                edited("runAsUser: 65532", "runAsUser: 0"),
                Some("runAsUser is not 65532"),
            ),
            (
                "may escalate",
                edited(
                    "allowPrivilegeEscalation: false",
                    "allowPrivilegeEscalation: true",
                ),
                Some("allowPrivilegeEscalation is not false"),
            ),
            (
                "drops less than all",
                edited(
                    "capabilities: {drop: [ALL]}",
                    "capabilities: {drop: [NET_RAW]}",
                ),
                Some("capabilities.drop is not [ALL]"),
            ),
            (
                "adds a capability",
                edited(
                    "capabilities: {drop: [ALL]}",
                    "capabilities: {drop: [ALL], add: [NET_ADMIN]}",
                ),
                Some("adds capabilities [\"NET_ADMIN\"]"),
            ),
            (
                "writable root",
                edited(
                    "readOnlyRootFilesystem: true",
                    "readOnlyRootFilesystem: false",
                ),
                Some("readOnlyRootFilesystem is not true"),
            ),
            (
                "unconfined seccomp",
                edited("type: RuntimeDefault", "type: Unconfined"),
                Some("seccompProfile is not RuntimeDefault"),
            ),
            (
                "host network",
                edited(
                    "serviceAccountName: app",
                    "serviceAccountName: app\n  hostNetwork: true",
                ),
                Some("the pod sets hostNetwork"),
            ),
            (
                "identity from the wrong field",
                edited(
                    "fieldPath: spec.serviceAccountName",
                    "fieldPath: metadata.name",
                ),
                Some("env POD_SERVICE_ACCOUNT is not the downward API's spec.serviceAccountName"),
            ),
            (
                "liveness on /readyz",
                edited("path: /healthz", "path: /readyz"),
                Some("livenessProbe does not GET /healthz"),
            ),
            (
                "probes on the admin port",
                edited(
                    "readinessProbe: {httpGet: {path: /readyz, port: probe}}",
                    "readinessProbe: {httpGet: {path: /readyz, port: admin}}",
                ),
                Some("readinessProbe is not on the probe port 15021"),
            ),
            (
                "probe listener on loopback",
                edited("--probe-addr=0.0.0.0:15021", "--probe-addr=127.0.0.1:15021"),
                Some("not reachable by kubelet's probes"),
            ),
            (
                "no probe listener",
                edited("--probe-addr=0.0.0.0:15021", "--other"),
                Some("--probe-addr None is not reachable"),
            ),
            (
                "more connections than the limit holds",
                edited("--max-connections=4096", "--max-connections=100000"),
                Some(
                    "--max-connections=100000 needs up to 3938 MiB, above the memory limit of 256 MiB",
                ),
            ),
            (
                "no connection cap",
                edited("--max-connections=4096", "--other"),
                Some("no --max-connections"),
            ),
            (
                "no memory limit",
                edited("resources: {limits: {memory: 256Mi}}", "resources: {}"),
                Some("no memory limit"),
            ),
            (
                "a limit in an unknown unit",
                edited("memory: 256Mi", "memory: 256Ti"),
                Some("no memory limit"),
            ),
            (
                "certificates through subPath",
                edited(
                    "mountPath: /etc/sidecar/tls,",
                    "mountPath: /etc/sidecar/tls, subPath: tls.crt,",
                ),
                Some("mount /etc/sidecar/tls uses subPath"),
            ),
        ];
        run_table(cases, check);
    }

    #[test]
    fn memory_quantities_are_read_in_both_unit_systems() {
        for (quantity, bytes) in [
            ("512000", Some(512_000)),
            ("64Ki", Some(64 << 10)),
            ("256Mi", Some(256 << 20)),
            ("1Gi", Some(1 << 30)),
            ("2K", Some(2_000)),
            ("3M", Some(3_000_000)),
            ("1G", Some(1_000_000_000)),
            ("1Ti", None),
            ("0.5Gi", None),
            ("Mi", None),
        ] {
            assert_eq!(memory_bytes(quantity), bytes, "{quantity}");
        }
    }
}
