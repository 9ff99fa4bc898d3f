//! Kubernetes mode, a pod's policy in the kernel: the pod sidecar hands its policy file to
//! the node agent with its registration, the agent compiles it into the pod's slots of the
//! node's policy maps, and the connect hooks decide each of the pod's connects as `sidecar
//! run` does for its workload: a denied destination fails with EPERM at `connect()` (nothing
//! reaches it), an allowed plaintext one passes through in the kernel, and one a
//! `[[destination]]` table asks retries for goes through the proxy. Reloads, agent restarts
//! and sidecar restarts keep the kernel and the proxy on the same policy; the pod's removal
//! leaves nothing of it in the maps.
//!
//! These sidecars run without `--proxy-all` (kernel pass-through on), unlike the other
//! `kubernetes_*` tests.

use std::{fs, path::Path, time::Duration};

use serde_json::Value;
use sidecar_tests::{
    host::wait_until,
    node::{
        ADDR_A, ADDR_B, NS_A, NS_B, Node, Pod, Proc, STEP, access_lines, pod_status,
        policy_entries, setup, stdout_lines,
    },
    ports,
    protocol::EchoLine,
};

/// What the policy in force must do to a connect from pod A to one of pod B's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// EPERM at `connect()`; the server never sees a connection.
    Denied,
    /// Straight to the server: it sees the app's own socket.
    PassedThrough,
    /// Through pod A's proxy: the server sees the proxy's socket.
    Proxied,
}

/// Pod B's three servers and the policy that gives each port its fate.
struct Servers {
    ports: [u16; 3],
    procs: Vec<Proc>,
}

impl Servers {
    fn start(node: &Node, b: &Pod) -> Self {
        let ports = [ports::take(), ports::take(), ports::take()];
        let procs = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let s = node.app(
                    b,
                    &format!("server-{i}"),
                    &["serve".into(), format!("--addr=0.0.0.0:{port}")],
                );
                s.wait_for_stdout("READY", STEP);
                s
            })
            .collect();
        Self { ports, procs }
    }

    /// The peers server `i` has seen so far.
    fn peers(&self, i: usize) -> Vec<String> {
        self.procs[i]
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["peer"].as_str().map(String::from))
            .collect()
    }
}

/// A policy that denies `fates`' `Denied` port, sends its `Proxied` port to the proxy (a
/// `[[destination]]` table with connect retries, which only the proxy can give) and allows
/// the rest, written aside and renamed over `path` (as kubelet swaps a ConfigMap volume).
/// [`V1`]'s also denies a block nothing here uses, so its slot holds one prefix more than
/// [`V2`]'s: a slot left behind shows in the key count.
fn write_policy(path: &Path, servers: &Servers, fates: [Fate; 3]) {
    let port = |fate| {
        let i = fates
            .iter()
            .position(|f| *f == fate)
            .expect("each fate once");
        servers.ports[i]
    };
    let text = format!(
        "[[rule]]\nname = \"deny-b\"\naction = \"deny\"\ndirection = \"outbound\"\n\
         destinations = [\"{ADDR_B}/32\"]\nports = [{denied}]\n\n\
         [[destination]]\ndestinations = [\"{ADDR_B}/32\"]\nports = [{proxied}]\nconnect_retries = 1\n",
        denied = port(Fate::Denied),
        proxied = port(Fate::Proxied),
    );
    let extra = if fates == V1 {
        "\n[[rule]]\nname = \"unused\"\naction = \"deny\"\ndestinations = [\"10.99.0.0/16\"]\n"
    } else {
        ""
    };
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, format!("{text}{extra}")).unwrap();
    fs::rename(&tmp, path).unwrap();
}

const V1: [Fate; 3] = [Fate::Denied, Fate::PassedThrough, Fate::Proxied];
const V2: [Fate; 3] = [Fate::Proxied, Fate::Denied, Fate::PassedThrough];
/// Keys of one slot of each policy, in both tries (both have proxied ports): `::/0`, the
/// IPv4 space, pod B's /32, and for V1 the unused /16.
const V1_KEYS: usize = 2 * 4;
const V2_KEYS: usize = 2 * 3;

/// Connects from pod A to each server once and checks its fate; `round` names the clients.
fn check_fates(node: &Node, a: &Pod, servers: &Servers, fates: [Fate; 3], round: &str) {
    for (i, fate) in fates.iter().enumerate() {
        let port = servers.ports[i];
        let seen_before = servers.peers(i).len();
        let mut client = node.app(
            a,
            &format!("client-{round}-{i}"),
            &[
                "echo".into(),
                format!("--addr={ADDR_B}:{port}"),
                "--size=100".into(),
                "--count=1".into(),
            ],
        );
        let what = format!("{round}: port {port} should be {fate:?}");
        match fate {
            Fate::Denied => {
                assert!(!client.wait(STEP).success(), "{what}: {}", client.stdout());
                let said = format!("{}{}", client.stdout(), client.stderr());
                assert!(
                    said.contains("Operation not permitted"),
                    "{what}: expected EPERM at connect(): {said}"
                );
                // Give a connection that got through time to be logged by the server.
                std::thread::sleep(Duration::from_millis(200));
                assert_eq!(
                    servers.peers(i).len(),
                    seen_before,
                    "{what}: the denied server was reached"
                );
            }
            Fate::PassedThrough | Fate::Proxied => {
                let out = client.success(STEP);
                let lines: Vec<EchoLine> = stdout_lines(&out);
                assert!(lines.len() == 1 && lines[0].ok, "{what}: {out}");
                let local = lines[0].local.expect("local").to_string();
                assert!(
                    wait_until(STEP, || servers.peers(i).len() == seen_before + 1),
                    "{what}: the server never saw the connection"
                );
                let peer = servers.peers(i)[seen_before].clone();
                if *fate == Fate::PassedThrough {
                    assert_eq!(peer, local, "{what}: the server saw the proxy, not the app");
                } else {
                    assert_ne!(peer, local, "{what}: the app reached the server directly");
                }
            }
        }
    }
}

/// The pass-through record of a connection to `port` reached the pod's sidecar.
fn passthrough_recorded(log: &Path, port: u16) -> bool {
    access_lines(log)
        .iter()
        .any(|l| l["path"] == "passthrough" && l["original_dst"] == format!("{ADDR_B}:{port}"))
}

/// The kernel refusals pod `pod`'s sidecar counts in its `/metrics` (streamed by the agent).
fn kernel_denies(node: &Node, pod: &Pod) -> u64 {
    node.admin(pod, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix("sidecar_ebpf_connect_policy_denied_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the sidecar's stderr says `needle` more than `before` times.
fn wait_log(proc: &Proc, needle: &str, before: usize) {
    assert!(
        wait_until(STEP, || proc.stderr().matches(needle).count() > before),
        "{} never logged {needle:?}\n{}",
        proc.name,
        proc.stderr()
    );
}

/// A pod with a policy, its sidecar without `--proxy-all`: denied destinations fail with
/// EPERM at `connect()`, allowed plaintext passes through (recorded by the sidecar as
/// `passthrough`), a destination with connect retries goes through the proxy; a reload
/// changes all three; the same after the agent restarts and after the sidecar restarts; a
/// reload the agent refuses (over the pod's quota) leaves the old policy in force in the
/// kernel and the proxy, counted in `reload_errors`; the pod's removal leaves nothing of its
/// policy in the maps.
#[test]
fn a_pods_policy_is_enforced_in_the_kernel_across_reloads_and_restarts() {
    let Some((_serial, node)) = setup("pod-policy") else {
        return;
    };
    let mut agent = node.start_agent_in("agent", None, &[], &["--sweep-interval-ms=200".into()]);
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let servers = Servers::start(&node, &b);
    let policy = node.scratch.path("policy.toml");
    let (v1, v2) = (V1, V2);
    write_policy(&policy, &servers, v1);
    let log = node.log_file("access-a.log");
    let args = [
        format!("--policy={}", policy.display()),
        format!("--access-log={}", log.display()),
    ];
    let mut proxy = node.start_proxy_passthrough(&a, "proxy-a", &args);
    node.wait_ready(&a, &proxy);
    let reg = pod_status(&node.status(), &a.uid)
        .expect("registered")
        .clone();
    assert_eq!(
        reg["passthrough"], true,
        "a policy no longer turns pass-through off: {reg}"
    );
    let scope = reg["scope"].as_u64().expect("scope") as u32;
    let slot_keys = || policy_entries(&node).1.get(&scope).copied().unwrap_or(0);
    let (states, _) = policy_entries(&node);
    assert_eq!(states, [scope], "the pod's policy is live in its scope");
    assert_eq!(slot_keys(), V1_KEYS);

    check_fates(&node, &a, &servers, v1, "v1");
    // The agent read the kernel's refusal from the node's deny ring and named the pod.
    assert!(
        wait_until(STEP, || agent.stderr().lines().any(|l| {
            l.contains("pod policy refused connect() in the kernel (EPERM)")
                && l.contains(&a.uid)
                && l.contains(&format!("{ADDR_B}:{}", servers.ports[0]))
        })),
        "the agent never logged the refusal:\n{}",
        agent.stderr()
    );
    assert!(
        wait_until(STEP, || passthrough_recorded(&log, servers.ports[1])),
        "the pass-through connection was never recorded:\n{:?}",
        access_lines(&log)
    );

    // Reload: every port's fate changes, in the kernel and the proxy together.
    write_policy(&policy, &servers, v2);
    wait_log(&proxy, "policy reloaded", 0);
    check_fates(&node, &a, &servers, v2, "v2");
    assert_eq!(slot_keys(), V1_KEYS + V2_KEYS, "both slots filled");
    // The agent streams the pod's kernel refusals to its sidecar, which counts them in its
    // own /metrics as `sidecar run` does its kernel's (the denied connects never reached
    // its proxy, whose decisions count none).
    assert!(
        wait_until(STEP, || kernel_denies(&node, &a) >= 1),
        "pod A's sidecar never counted its kernel refusals:\n{}",
        node.admin(&a, "/metrics").1
    );
    assert!(
        proxy.stderr().lines().any(|l| l
            .contains("policy refused connect() in the kernel (EPERM)")
            && l.contains("deny-b")),
        "the sidecar never logged a kernel refusal with its rule:\n{}",
        proxy.stderr()
    );
    assert!(wait_until(STEP, || passthrough_recorded(
        &log,
        servers.ports[2]
    )));

    // The agent restarts: the pinned policy holds, and the new agent neither loses it nor
    // leaves the slot it does not use filled after the sidecar re-registers.
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(STEP).success(), "{}", agent.stderr());
    check_fates(&node, &a, &servers, v2, "agent-down");
    agent = node.start_agent_in("agent-2", None, &[], &["--sweep-interval-ms=200".into()]);
    check_fates(&node, &a, &servers, v2, "agent-restarted");
    assert!(
        wait_until(STEP, || node
            .try_status()
            .and_then(
                |s| pod_status(&s, &a.uid).map(|p| p["registrations"] == 2)
            )
            == Some(true)),
        "the sidecar never registered again:\n{}",
        proxy.stderr()
    );
    check_fates(&node, &a, &servers, v2, "re-registered");
    // The new agent put the saved policy back at its start, before the sidecar registered
    // again (and sent it again).
    let agent_log = agent.stderr();
    let (back, registered) = (
        agent_log.find("the pod's policy is in force again"),
        agent_log.find("pod registered: interception on"),
    );
    assert!(
        back.is_some() && back < registered,
        "the restarted agent did not put the policy back first:\n{agent_log}"
    );
    // Two installs of V2 since (at start, at the re-registration): both slots hold V2, none
    // of V1's keys is left behind (the new agent adopted the pinned slots).
    assert_eq!(
        slot_keys(),
        2 * V2_KEYS,
        "stale keys after the agent restart"
    );

    // A reload after the agent's restart goes to the new agent.
    write_policy(&policy, &servers, v1);
    wait_log(&proxy, "policy reloaded", 1);
    check_fates(&node, &a, &servers, v1, "v1-again");

    // The sidecar restarts (a new container cgroup, as a runtime gives it): it registers
    // with the policy in force, and its reloads still reach the kernel.
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
    proxy = node.start_proxy_passthrough_in(&a, "proxy2", "proxy-a2", &args);
    node.wait_ready(&a, &proxy);
    check_fates(&node, &a, &servers, v1, "sidecar-restarted");
    write_policy(&policy, &servers, v2);
    wait_log(&proxy, "policy reloaded", 0);
    check_fates(&node, &a, &servers, v2, "v2-after-sidecar-restart");

    // A reload the agent refuses (more prefixes than a pod's quota): the policy in force
    // stays in the kernel and in the proxy, and the refusal is counted.
    let tmp = policy.with_extension("tmp");
    let mut big = String::new();
    for i in 0..40 {
        big.push_str(&format!(
            "[[rule]]\naction = \"deny\"\ndestinations = [\"10.99.{i}.0/24\"]\n"
        ));
    }
    fs::write(&tmp, big).unwrap();
    fs::rename(&tmp, &policy).unwrap();
    wait_log(&proxy, "policy refused, keeping the current one", 0);
    assert!(
        proxy.stderr().contains("over_quota") || proxy.stderr().contains("merge CIDRs"),
        "{}",
        proxy.stderr()
    );
    let (_, status) = node.admin(&a, "/status");
    let status: Value = serde_json::from_str(&status).expect("/status JSON");
    assert_eq!(status["policy"]["reload_errors"], 1, "{status:#}");
    assert!(node.status()["refusals"]["over_quota"].as_u64() >= Some(1));
    check_fates(&node, &a, &servers, v2, "refused-reload");

    // The pod goes: its policy leaves the kernel with its registration.
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
    node.kill_all(&a.cgroup);
    let mut dirs = Vec::new();
    sidecar_tests::node::collect_dirs(&a.cgroup, &mut dirs);
    for d in dirs.iter().rev() {
        sidecar_tests::node::rmdir_retrying(d);
    }
    assert!(
        wait_until(STEP, || policy_entries(&node)
            == (vec![], Default::default())),
        "the gone pod's policy stayed in the kernel: {:?}",
        policy_entries(&node)
    );
    drop(agent);
}

/// A policy the agent refuses (more destination prefixes than a pod's quota) refuses the
/// registration: the sidecar exits with the agent's one-line reason, the refusal is counted,
/// and nothing of the pod is in the maps. A policy over the 16 KiB a registration carries is
/// refused by the sidecar itself, before it registers.
#[test]
fn a_pod_whose_policy_the_agent_refuses_is_not_registered() {
    let Some((_serial, node)) = setup("pod-policy-refused") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let policy = node.scratch.path("policy.toml");
    let mut big = String::new();
    for i in 0..40 {
        big.push_str(&format!(
            "[[rule]]\naction = \"deny\"\ndestinations = [\"10.99.{i}.0/24\"]\n"
        ));
    }
    fs::write(&policy, &big).unwrap();
    let mut proxy =
        node.start_proxy_passthrough(&a, "proxy-a", &[format!("--policy={}", policy.display())]);
    assert_eq!(proxy.wait(STEP).code(), Some(1), "{}", proxy.stderr());
    let err = proxy.stderr();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("42 destination prefixes") && errors[0].contains("merge CIDRs"),
        "{err}"
    );
    let status = node.status();
    assert_eq!(status["refusals"]["over_quota"], 1, "{status:#}");
    assert!(pod_status(&status, &a.uid).is_none(), "{status:#}");
    assert!(node.workloads().is_empty(), "{:?}", node.workloads());
    assert_eq!(policy_entries(&node), (vec![], Default::default()));

    // Too long to send: refused by the sidecar, the agent never asked.
    let long = format!(
        "# {}\n[defaults]\noutbound = \"allow\"\n",
        "x".repeat(17 * 1024)
    );
    fs::write(&policy, long).unwrap();
    let mut proxy = node.start_proxy_passthrough(
        &a,
        "proxy-a-long",
        &[format!("--policy={}", policy.display())],
    );
    assert_eq!(proxy.wait(STEP).code(), Some(1), "{}", proxy.stderr());
    assert!(
        proxy.stderr().contains("at most 16384"),
        "{}",
        proxy.stderr()
    );
    assert_eq!(node.status()["refusals"]["bad_policy"], Value::Null);
}

/// The example application as `deploy/` ships it (`deploy/example-app.yaml`'s sidecar
/// container, its arguments, environment, user and volumes, and `deploy/policy.yaml` as its
/// policy file): it registers with pass-through on and the policy in the kernel; the app's
/// plaintext connection to a pod outside `--mesh-cidrs` passes straight through (the server
/// sees the app's own socket; the sidecar records it as `passthrough`), and its connect to
/// the cloud metadata address, which the shipped policy denies, fails with EPERM at
/// `connect()`, counted and logged by the sidecar as the kernel's refusal under the policy's
/// own rule (not only the agent's default metadata refusal).
#[test]
fn the_shipped_example_app_passes_through_and_is_denied_in_the_kernel() {
    let Some((_serial, node)) = setup("pod-policy-shipped") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let shipped = node.start_shipped_sidecar(&a);
    node.wait_shipped_ready(&a, &shipped);
    assert!(
        shipped.policy.contains("169.254.169.254/32"),
        "{}",
        shipped.policy
    );
    let status = node.status();
    let reg = pod_status(&status, &a.uid).expect("registered");
    assert_eq!(reg["passthrough"], true, "{reg}");
    assert_eq!(
        reg["policy"].as_str(),
        Some(shipped.policy.as_str()),
        "{reg}"
    );

    let server = node.server(&b);
    let peers = || -> Vec<String> {
        server
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["peer"].as_str().map(String::from))
            .collect()
    };
    let out = node
        .shipped_app(&a, &shipped, "app-echo", &node.echo_args(100, 1))
        .success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(lines.len() == 1 && lines[0].ok, "{out}");
    let local = lines[0].local.expect("local").to_string();
    assert!(
        wait_until(STEP, || peers().len() == 1),
        "the server saw nothing"
    );
    assert_eq!(peers(), [local], "the server saw the proxy, not the app");
    let metrics = || node.admin_on(&a, shipped.admin_port, "/metrics").1;
    let closed = r#"sidecar_connections_closed_total{direction="outbound",path="passthrough",reason="ok"} 1"#;
    assert!(
        wait_until(STEP, || metrics().contains(closed)),
        "the sidecar never recorded the pass-through connection:\n{}",
        metrics()
    );

    let mut denied = node.shipped_app(
        &a,
        &shipped,
        "app-metadata",
        &["connect-fail".into(), "--addr=169.254.169.254:80".into()],
    );
    let out = denied.success(STEP);
    assert!(
        out.contains("Operation not permitted"),
        "the metadata address must be refused at connect(): {out}"
    );
    assert!(
        wait_until(STEP, || metrics()
            .lines()
            .any(|l| l == "sidecar_ebpf_connect_policy_denied_total 1")),
        "the kernel's refusal under the pod's policy was not counted:\n{}",
        metrics()
    );
    assert!(
        wait_until(STEP, || shipped
            .sidecar
            .stderr()
            .contains("policy refused connect() in the kernel")
            && shipped.sidecar.stderr().contains("no-metadata")),
        "{}",
        shipped.sidecar.stderr()
    );
}

/// A reload made while the agent is down is not lost: the sidecar keeps the old policy in
/// force in both halves (said and counted once in `reload_errors`), tries the same file again
/// until the agent takes it, and once the restarted agent has the pod registered again the
/// new policy is in force in the kernel and the proxy, without the file changing again.
#[test]
fn a_reload_made_while_the_agent_is_down_is_put_in_force_when_it_is_back() {
    let Some((_serial, node)) = setup("pod-policy-agent-down") else {
        return;
    };
    let agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let servers = Servers::start(&node, &b);
    let policy = node.scratch.path("policy.toml");
    write_policy(&policy, &servers, V1);
    let proxy =
        node.start_proxy_passthrough(&a, "proxy-a", &[format!("--policy={}", policy.display())]);
    node.wait_ready(&a, &proxy);
    check_fates(&node, &a, &servers, V1, "v1");

    drop(agent);
    write_policy(&policy, &servers, V2);
    wait_log(&proxy, "policy not taken yet", 0);
    check_fates(&node, &a, &servers, V1, "agent-down");
    let status: Value = serde_json::from_str(&node.admin(&a, "/status").1).expect("/status");
    assert_eq!(status["policy"]["reload_errors"], 1, "{status:#}");

    let _agent = node.start_agent("agent-2");
    wait_log(&proxy, "policy reloaded", 0);
    check_fates(&node, &a, &servers, V2, "agent-back");
    // Retried quietly: the refusal was said and counted once.
    assert_eq!(proxy.stderr().matches("policy not taken yet").count(), 1);
    let status: Value = serde_json::from_str(&node.admin(&a, "/status").1).expect("/status");
    assert_eq!(status["policy"]["reload_errors"], 1, "{status:#}");
}
