//! The manifests pass the binary's own defaults (`sidecar::defaults`): a port or path typed
//! differently in YAML would work until the day one side changes. The proxy, the agent and the
//! uninstall meet on the same socket and host directories.

use std::path::Path;

use sidecar::defaults;

use super::{Doc, pod::each_sidecar, seq};

/// Ports and paths equal the binary's defaults, and the two sides meet on the socket.
pub fn check(docs: &[Doc]) -> Vec<String> {
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
        for m in seq(&c.value["volumeMounts"]) {
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

pub fn admin_port() -> i64 {
    defaults::ADMIN_ADDR
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("ADMIN_ADDR has a port")
}

pub fn probe_port() -> i64 {
    defaults::PROBE_ADDR
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("PROBE_ADDR has a port")
}

pub fn socket_dir() -> String {
    Path::new(defaults::AGENT_SOCKET)
        .parent()
        .expect("the socket is in a directory")
        .display()
        .to_string()
}

/// A host path as the host resolves it: /var/run is /run on every systemd host.
pub fn host_canonical(p: &str) -> String {
    match p.strip_prefix("/var/run") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("/run{rest}"),
        _ => p.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::testing::{edited, run_table};

    #[test]
    fn ports_and_paths_are_the_binarys_and_every_side_meets_on_the_socket() {
        let cases = [
            ("the proxy, agent and uninstall", edited("", ""), None),
            (
                "a flag and its value as two arguments",
                edited("--proxy-port=15001", "--proxy-port\n        - \"15001\""),
                None,
            ),
            (
                "proxy port",
                edited("--proxy-port=15001", "--proxy-port=15002"),
                Some("--proxy-port is Some(\"15002\"), sidecar::defaults says \"15001\""),
            ),
            (
                "inbound port",
                edited("--inbound-port=15008", "--inbound-port=15009"),
                Some("--inbound-port is"),
            ),
            (
                "proxy's socket",
                edited(
                    "--agent-socket=/var/run/sidecar/agent.sock",
                    "--agent-socket=/run/other.sock",
                ),
                Some("--agent-socket is"),
            ),
            (
                "admin port",
                edited("--admin-addr=0.0.0.0:15000", "--admin-addr=0.0.0.0:16000"),
                Some("the --admin-addr port is Some(\"16000\")"),
            ),
            (
                "no admin address",
                edited("--admin-addr=0.0.0.0:15000", "--other"),
                Some("the --admin-addr port is None"),
            ),
            (
                "probe port",
                edited("--probe-addr=0.0.0.0:15021", "--probe-addr=0.0.0.0:15022"),
                Some("the --probe-addr port is"),
            ),
            (
                "container port admin",
                edited("containerPort: 15000", "containerPort: 15010"),
                Some("containerPort admin"),
            ),
            (
                "container port probe",
                edited("containerPort: 15021", "containerPort: 15010"),
                Some("containerPort probe"),
            ),
            (
                "container port tunnel",
                edited("containerPort: 15008", "containerPort: 15018"),
                Some("containerPort tunnel"),
            ),
            (
                "scrape annotation",
                edited(
                    "prometheus.io/port: \"15000\"",
                    "prometheus.io/port: \"9090\"",
                ),
                Some("the prometheus.io/port annotation is Some(\"9090\")"),
            ),
            (
                "agent's socket",
                edited(
                    "--socket=/var/run/sidecar/agent.sock, --state",
                    "--socket=/tmp/agent.sock, --state",
                ),
                Some("--socket is Some(\"/tmp/agent.sock\")"),
            ),
            (
                "agent's bpffs",
                edited("--bpffs=/sys/fs/bpf", "--bpffs=/mnt/bpf"),
                Some("--bpffs is"),
            ),
            (
                "bpffs from another host path",
                edited(
                    "{name: bpffs, hostPath: {path: /sys/fs/bpf}}",
                    "{name: bpffs, hostPath: {path: /mnt/bpf}}",
                ),
                Some("the hostPath at bpffs is Some(\"/mnt/bpf\")"),
            ),
            (
                "the uninstall with another state dir",
                edited(
                    "--uninstall, --bpffs=/sys/fs/bpf, --socket=/var/run/sidecar/agent.sock, --state-dir=/run/sidecar-agent",
                    "--uninstall, --bpffs=/sys/fs/bpf, --socket=/var/run/sidecar/agent.sock, --state-dir=/run/other",
                ),
                Some(
                    "--state-dir is Some(\"/run/other\"), the agent's is Some(\"/run/sidecar-agent\")",
                ),
            ),
            (
                "the uninstall mounting another bpffs",
                {
                    let all = edited("", "");
                    let at = all.rfind("{path: /sys/fs/bpf}").unwrap();
                    format!(
                        "{}{{path: /run/bpf}}{}",
                        &all[..at],
                        &all[at + "{path: /sys/fs/bpf}".len()..]
                    )
                },
                Some("mount is Some(\"/sys/fs/bpf <- Some(\\\"/run/bpf\\\")\")"),
            ),
            (
                "the proxy without the socket's directory",
                edited(
                    "mountPath: /var/run/sidecar, readOnly: true",
                    "mountPath: /socket, readOnly: true",
                ),
                Some(
                    "no hostPath volume mounted at /var/run/sidecar (the agent socket's directory)",
                ),
            ),
            (
                "the socket from another host directory",
                edited(
                    "{name: agent-socket, hostPath: {path: /var/run/sidecar}}",
                    "{name: agent-socket, hostPath: {path: /var/run/other}}",
                ),
                Some(
                    "mounts the socket directory from /var/run/other, the agent from Some(\"/var/run/sidecar\")",
                ),
            ),
            (
                "the agent's state inside the shared directory, through /var/run",
                edited(
                    "--state-dir=/run/sidecar-agent]",
                    "--state-dir=/var/run/sidecar/state]",
                ),
                Some(
                    "--state-dir /var/run/sidecar/state is inside /run/sidecar, which every meshed pod mounts",
                ),
            ),
        ];
        run_table(cases, check);
    }

    #[test]
    fn var_run_is_run_on_the_host() {
        for (path, host) in [
            ("/var/run", "/run"),
            ("/var/run/sidecar", "/run/sidecar"),
            ("/var/runner", "/var/runner"),
            ("/run/sidecar", "/run/sidecar"),
        ] {
            assert_eq!(host_canonical(path), host, "{path}");
        }
    }
}
