//! Kubernetes mode, what a pod's sidecar protects besides its policy, in the kernel as
//! `sidecar run` does: open circuits refused at the app's `connect()` (pass-through connects
//! included), and strict inbound (only the sidecar's tunnel reaches the pod's apps).
//!
//! The pod sidecars here run without `--proxy-all` where pass-through matters.

use std::net::SocketAddr;

use sidecar_tests::{
    host::wait_until,
    node::{
        ADDR_A, ADDR_B, CLIENT_ID, NS_A, NS_B, Node, Pod, Proc, SERVER_ID, STEP, pod_status, setup,
        spawn, stdout_lines,
    },
    ports,
    protocol::{ConnectFailLine, EchoLine},
    testclient_bin,
};

/// `connect-fail` to `addr` from the pod's app container: one try, how it failed.
fn connect_from_app(node: &Node, pod: &Pod, name: &str, addr: SocketAddr) -> ConnectFailLine {
    let out = node
        .app(
            pod,
            name,
            &["connect-fail".into(), format!("--addr={addr}")],
        )
        .success(STEP);
    parse_one(&out)
}

/// `connect-fail` to `addr` from a process of the node in network namespace `ns`, outside
/// every pod's cgroup: no connect hook of a pod applies to it, so it is plaintext from
/// outside the destination pod, as another node's would be.
fn connect_from_outside(node: &Node, ns: &str, name: &str, addr: SocketAddr) -> ConnectFailLine {
    let argv = vec![
        testclient_bin().display().to_string(),
        "connect-fail".into(),
        format!("--addr={addr}"),
    ];
    let out = spawn(&node.scratch, name, None, Some(ns), &argv, &[]).success(STEP * 2);
    parse_one(&out)
}

fn parse_one(out: &str) -> ConnectFailLine {
    let lines: Vec<ConnectFailLine> = stdout_lines(out);
    assert_eq!(lines.len(), 1, "{out}");
    lines.into_iter().next().unwrap()
}

/// A sample of the pod sidecar's `/metrics`, 0 if absent.
fn metric(node: &Node, pod: &Pod, name: &str) -> f64 {
    node.admin(pod, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The scope the agent gave `pod`.
fn scope_of(node: &Node, pod: &Pod) -> u32 {
    let status = node.status();
    let reg = pod_status(&status, &pod.uid).expect("registered");
    reg["scope"].as_u64().expect("scope") as u32
}

/// A pod whose destination keeps failing: its sidecar's circuit opens from the kernel's
/// reports of the failed pass-through connects, the agent puts it in the pod's scope of
/// `OPEN_CIRCUITS`, and the app's next `connect()` there fails with EPERM at once while
/// another destination still passes through. The circuit is the sidecar's live state: when
/// the sidecar dies it is lifted (a plain refusal again), not left to refuse forever.
#[test]
fn a_pods_open_circuit_is_refused_at_connect_and_goes_with_its_sidecar() {
    let Some((_serial, node)) = setup("pod-circuits") else {
        return;
    };
    const THRESHOLD: usize = 3;
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let sidecar_args = [
        "--connect-retries=0".to_string(),
        format!("--circuit-failures={THRESHOLD}"),
        // Open for the rest of the test (the longest open period): only the sidecar's end lifts it.
        "--circuit-open-ms=30000".into(),
    ];
    let mut proxy_a = node.start_proxy_passthrough(&a, "proxy-a", &sidecar_args);
    node.wait_ready(&a, &proxy_a);
    let _server = node.server(&b);
    // Nothing listens there: each connect is reset by pod B's kernel.
    let dead: SocketAddr = format!("{ADDR_B}:{}", ports::take()).parse().unwrap();
    let scope = scope_of(&node, &a);

    for i in 0..THRESHOLD {
        let p = connect_from_app(&node, &a, &format!("fail-{i}"), dead);
        assert!(!p.connected, "the dead destination answered: {p:?}");
        let error = p.error.unwrap_or_default();
        assert!(error.contains("refused"), "a reset, not a refusal: {error}");
    }
    assert!(
        wait_until(STEP, || metric(&node, &a, "sidecar_circuits_open") == 1.0),
        "pod A's circuit did not open after {THRESHOLD} failed pass-through connects:\n{}",
        proxy_a.stderr()
    );
    assert!(
        wait_until(STEP, || node.open_circuits() == [(scope, dead)]),
        "the agent did not refuse the circuit in pod A's scope: {:?} (scope {scope})",
        node.open_circuits()
    );
    let p = connect_from_app(&node, &a, "refused", dead);
    assert!(!p.connected, "{p:?}");
    let error = p.error.clone().unwrap_or_default();
    assert!(
        error.contains("Operation not permitted"),
        "with the circuit open, connect() must fail with EPERM: {p:?}"
    );
    assert!(node.counter("connect_circuit_open") >= 1);
    // Another destination is not affected, and still passes through.
    let out = node.app(&a, "other", &node.echo_args(64, 1)).success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(lines.len() == 1 && lines[0].ok, "{out}");

    // The sidecar dies: nothing would ever close the circuit, so the agent lifts it.
    proxy_a.signal(libc::SIGKILL);
    proxy_a.wait(STEP);
    assert!(
        wait_until(STEP, || node.open_circuits().is_empty()),
        "the dead sidecar's circuit stayed: {:?}",
        node.open_circuits()
    );
    let p = connect_from_app(&node, &a, "after", dead);
    let error = p.error.unwrap_or_default();
    assert!(
        error.contains("refused"),
        "with no circuit, the destination's own refusal: {error}"
    );
}

/// A pod sidecar with `--inbound-mode strict`: plaintext from outside the pod to its app's
/// port is dropped in the kernel (the connect times out, counted), while the meshed client
/// pod reaches the same app through pod B's sidecar tunnel (the sidecar container of a strict
/// pod still takes connections from outside). A pod without strict inbound is untouched by
/// the same program.
#[test]
fn strict_inbound_for_a_pod_admits_only_its_sidecars_tunnel() {
    let Some((_serial, node)) = setup("pod-strict") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let tls_a = node.certs(CLIENT_ID, "tls-a");
    let tls_b = node.certs(SERVER_ID, "tls-b");
    let proxy_b = node.start_proxy(
        &b,
        "proxy-b",
        "server",
        &[format!("--tls-dir={tls_b}"), "--inbound-mode=strict".into()],
    );
    let proxy_a = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[
            format!("--tls-dir={tls_a}"),
            format!("--mesh-cidrs={}/32", b.addr),
        ],
    );
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    let flags =
        |pod: &Pod| node.workloads()[&sidecar_tests::node::host_cgroup_id(&pod.cgroup)].flags;
    assert_ne!(flags(&b) & sidecar_common::flags::STRICT_INBOUND, 0);
    assert_eq!(flags(&a) & sidecar_common::flags::STRICT_INBOUND, 0);
    let _server_b = node.server(&b);
    let app_b: SocketAddr = format!("{ADDR_B}:{}", node.app_port).parse().unwrap();

    let dropped_before = node.counter("strict_inbound_dropped");
    let plain = connect_from_outside(&node, NS_A, "plain", app_b);
    assert!(
        !plain.connected && plain.error.is_some(),
        "plaintext to a strict pod's app must not connect: {plain:?}"
    );
    assert!(node.counter("strict_inbound_dropped") > dropped_before);

    let out = node.app(&a, "meshed", &node.echo_args(64, 1)).success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(
        lines.len() == 1 && lines[0].ok,
        "through pod B's tunnel: {out}\n{}",
        proxy_b.stderr()
    );

    // Pod A is not strict: the program at the pods' root lets plaintext reach its server.
    let port_a = ports::take();
    let server_a: Proc = node.app(
        &a,
        "server-a",
        &["serve".into(), format!("--addr=0.0.0.0:{port_a}")],
    );
    server_a.wait_for_stdout("READY", STEP);
    let to_a: SocketAddr = format!("{ADDR_A}:{port_a}").parse().unwrap();
    let plain_a = connect_from_outside(&node, NS_B, "plain-a", to_a);
    assert!(
        plain_a.connected && plain_a.error.is_none(),
        "plaintext to a pod without strict inbound: {plain_a:?}"
    );
}

/// Strict inbound without a tunnel would cut the pod off: the sidecar refuses to start, in
/// one line, before registering anything.
#[test]
fn strict_inbound_without_a_tunnel_is_refused_by_the_pod_sidecar() {
    let Some((_serial, node)) = setup("pod-strict-no-tls") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let mut proxy = node.start_proxy_passthrough(&a, "proxy-a", &["--inbound-mode=strict".into()]);
    let status = proxy.wait(STEP);
    assert!(!status.success());
    let err = proxy.stderr();
    assert!(
        err.contains("--inbound-mode strict") && err.contains("--tls-dir"),
        "{err}"
    );
    assert!(
        pod_status(&node.status(), &a.uid).is_none(),
        "registered anyway"
    );
}
