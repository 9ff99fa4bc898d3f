//! The node agent holds exactly the capabilities it needs and is never privileged; what the
//! API server would refuse at apply time is refused here already, offline.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use super::{BINARY, Doc, pod::each_sidecar, seq};

/// The capabilities the node agent (and its uninstall) adds, and no others. deploy/agent.yaml
/// says why each is needed and why SYS_ADMIN and SYS_RESOURCE are not (docs/kubernetes.md,
/// "Capabilities of the agent", repeats it): change them together.
pub const AGENT_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

/// The node agent: exactly the listed capabilities, never privileged, what the API server
/// would refuse ruled out here already.
pub fn check(docs: &[Doc]) -> Vec<String> {
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
                    let cmd: Vec<&str> = seq(&c.value[probe]["exec"]["command"])
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
            for m in seq(&c.value["volumeMounts"]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{
        parse,
        testing::{AGENT, edited, run_table},
    };

    #[test]
    fn the_agent_has_the_documented_capabilities_and_nothing_more() {
        let uninstall_as_a_container = edited(
            "      initContainers:\n        - name: uninstall",
            "      containers:\n        - name: uninstall",
        )
        .replacen(
            "      containers:\n        - {name: done, image: pause}\n",
            "",
            1,
        );
        let cases = [
            ("the agent and its uninstall", edited("", ""), None),
            (
                "the capabilities in another order",
                edited(
                    "add: [BPF, NET_ADMIN, PERFMON]",
                    "add: [PERFMON, BPF, NET_ADMIN]",
                ),
                None,
            ),
            (
                "privileged",
                edited(
                    "          securityContext:\n",
                    "          securityContext:\n            privileged: true\n",
                ),
                Some("privileged: true"),
            ),
            (
                "an extra capability",
                edited(
                    "add: [BPF, NET_ADMIN, PERFMON]",
                    "add: [BPF, NET_ADMIN, PERFMON, SYS_ADMIN]",
                ),
                Some(
                    "adds capabilities [\"BPF\", \"NET_ADMIN\", \"PERFMON\", \"SYS_ADMIN\"], the documented list is",
                ),
            ),
            (
                "a missing capability",
                edited("add: [BPF, NET_ADMIN, PERFMON]", "add: [BPF, NET_ADMIN]"),
                Some("the documented list is"),
            ),
            (
                "a capability twice",
                edited(
                    "add: [BPF, NET_ADMIN, PERFMON]",
                    "add: [BPF, NET_ADMIN, PERFMON, BPF]",
                ),
                Some("the documented list is"),
            ),
            (
                "keeps the others",
                edited("{drop: [ALL], add: [BPF", "{add: [BPF"),
                Some("capabilities.drop is not [ALL]"),
            ),
            (
                "a probe on another socket",
                edited(
                    "--status, --socket=/var/run/sidecar/agent.sock",
                    "--status, --socket=/tmp/x.sock",
                ),
                Some(
                    "readinessProbe is not `/usr/local/bin/sidecar agent --status` on the agent's socket",
                ),
            ),
            (
                "a probe that is not --status",
                edited("agent, --status, --socket", "agent, --socket"),
                Some("readinessProbe is not"),
            ),
            (
                "the host's pids hidden",
                edited("hostPID: true", "hostPID: false"),
                Some("hostPID is not true"),
            ),
            (
                "may escalate",
                edited(
                    "            allowPrivilegeEscalation: false\n            capabilities: {drop: [ALL], add",
                    "            capabilities: {drop: [ALL], add",
                ),
                Some("allowPrivilegeEscalation is not false"),
            ),
            (
                "SYS_ADMIN without escalation",
                edited(
                    "add: [BPF, NET_ADMIN, PERFMON]",
                    "add: [BPF, NET_ADMIN, PERFMON, SYS_ADMIN]",
                ),
                Some("allowPrivilegeEscalation: false with SYS_ADMIN is refused by the API server"),
            ),
            (
                "a Bidirectional mount unprivileged",
                edited(
                    "mountPropagation: HostToContainer",
                    "mountPropagation: Bidirectional",
                ),
                Some(
                    "mount /sys/fs/bpf is Bidirectional, which the API server allows only for privileged",
                ),
            ),
            (
                "the agent as a Deployment",
                edited(
                    "kind: DaemonSet\nmetadata: {name: sidecar-agent}",
                    "kind: Deployment\nmetadata: {name: sidecar-agent}",
                ),
                Some("the agent must run as a DaemonSet"),
            ),
            (
                "the uninstall as a long-running container",
                uninstall_as_a_container,
                Some("the uninstall must be an init container"),
            ),
            (
                "no uninstall",
                edited("args: [--uninstall, ", "args: ["),
                Some("and one with --uninstall, found [2, 0]"),
            ),
            ("no agent", "kind: ConfigMap\n".into(), Some("found [0, 0]")),
        ];
        run_table(cases, check);
    }

    /// `kubectl apply -k deploy/` must never uninstall: the main kustomization may list the
    /// agent, not the uninstall (found by what a listed file runs, not by its name).
    #[test]
    fn the_main_kustomization_never_lists_the_uninstall() {
        let (agent, uninstall) = AGENT.split_once("---").unwrap();
        for (name, main, expect) in [
            ("the agent listed", "resources: [agent.yaml]", false),
            (
                "the uninstall listed",
                "resources: [agent.yaml, remove.yaml]",
                true,
            ),
        ] {
            let docs = [
                parse(
                    "deploy/kustomization.yaml",
                    &format!("kind: Kustomization\n{main}\n"),
                ),
                parse("deploy/agent.yaml", agent),
                parse("deploy/remove.yaml", uninstall),
            ]
            .concat();
            let problems = check(&docs);
            assert_eq!(
                problems.iter().any(|p| p
                    == "deploy/kustomization.yaml: lists remove.yaml, which uninstalls the agent"),
                expect,
                "{name}: {problems:#?}"
            );
        }
    }
}
