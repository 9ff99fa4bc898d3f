//! Kubernetes mode, a pod's life on a simulated node: its sidecar drained by SIGTERM (and cut
//! at the deadline), the sidecar container restarted alone, the sidecar killed and its port
//! taken by another process, and the pod removed; through all of it the pod stays intercepted
//! or loses its interception, never passes around the proxy.
//!
//! The node (cgroups laid out like kubelet's, two pods' network namespaces, the agent, the
//! unprivileged sidecars) is `sidecar_tests::node`; the other `kubernetes_*` files test the
//! rest of Kubernetes mode on it.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use sidecar::host::bpffs::Bpffs;
use sidecar_common::{flags, role};
use sidecar_tests::{
    host::{PublicCopy, wait_until},
    node::{
        ADDR_A, ADDR_B, NS_A, NS_B, STEP, host_cgroup_id, pod_status, ready, rmdir_retrying, setup,
        spawn, stdout_lines, strings, two_pods,
    },
    ports,
    protocol::{ConnectFailLine, EchoLine},
    testclient_bin,
};

/// How a connect the kernel refuses reads in the test client's lines: a pod whose sidecar is
/// gone (or draining) is refused at `connect()` by the connect hooks, since the proxy port
/// has no listener the agent marked.
const EPERM: &str = "Operation not permitted";

/// `setpriv` arguments that leave the agent exactly the capabilities its DaemonSet grants
/// (deploy/agent.yaml).
const AGENT_CAPABILITIES_ONLY: [&str; 3] = [
    "setpriv",
    "--inh-caps=-all",
    "--bounding-set=-all,+bpf,+net_admin,+perfmon",
];

/// (d) Removing a pod (processes killed, cgroup removed) removes its WORKLOADS entries (and its
/// cap on pass-through connections) within a bounded time, without any deregistration.
#[test]
fn removing_a_pod_removes_its_interception() {
    let Some((_serial, node)) = setup("podgone") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &strings(&["--max-connections-per-destination=7"]),
    );
    node.wait_ready(&a, &proxy);
    let ids = [
        host_cgroup_id(&a.cgroup),
        host_cgroup_id(&a.cgroup.join("proxy")),
    ];
    let workloads = node.workloads();
    assert!(
        ids.iter().all(|id| workloads.contains_key(id)),
        "{workloads:?}"
    );
    let scope = workloads[&ids[0]].scope;
    assert_eq!(node.direct_caps(), BTreeMap::from([(scope, 7)]));

    // The pod goes: SIGKILL (no deregistration), then kubelet removes its cgroups.
    drop(proxy);
    node.kill_all(&a.cgroup);
    let removed = Instant::now();
    for d in [
        a.cgroup.join("proxy"),
        a.cgroup.join("app"),
        a.cgroup.clone(),
    ] {
        assert!(rmdir_retrying(&d), "cannot remove {}", d.display());
    }
    assert!(
        wait_until(Duration::from_secs(5), || node.workloads().is_empty()),
        "WORKLOADS still has the removed pod: {:?}",
        node.workloads()
    );
    let took = removed.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(node.status()["pods"].as_array().map(Vec::len), Some(0));
    assert!(node.direct_caps().is_empty(), "{:?}", node.direct_caps());
    eprintln!("pod removed → WORKLOADS entries gone after {took:?}");
}

/// (e) SIGTERM to `sidecar proxy` with open connections: they finish within the deadline,
/// new connects are refused promptly and cleanly, and the proxy exits 0 with its pod still
/// intercepted: the app's connects keep being refused, never passed through.
#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let Some((_serial, node)) = setup("drain") else {
        return;
    };
    let app_port = node.app_port;
    let _agent = node.start_agent("agent");
    let (pods, mut proxy_a, _proxy_b) = two_pods(&node);
    let _server = node.server(&pods.b);
    let _ = fs::remove_file(&pods.log_a); // drain test reads the stderr summary instead

    let mut held = node.app(
        &pods.a,
        "hold",
        &strings(&["hold", &format!("--addr={ADDR_B}:{app_port}"), "--count=2"]),
    );
    held.wait_for_stdout("READY", STEP);

    let term = Instant::now();
    proxy_a.signal(libc::SIGTERM);
    assert!(
        wait_until(STEP, || node.readyz(&pods.a) == 503),
        "/readyz stayed ready while draining"
    );
    // A new connect now: refused at once (the listener is closed, so none the agent marked
    // listens), not hung.
    let mut probe = node.app(
        &pods.a,
        "refused",
        &strings(&["connect-fail", &format!("--addr={ADDR_B}:{app_port}")]),
    );
    let out = probe.success(STEP);
    let line: ConnectFailLine = stdout_lines(&out).pop().expect("connect-fail line");
    assert!(!line.connected, "{line:?}");
    assert!(
        line.error.as_deref().is_some_and(|e| e.contains(EPERM)),
        "{line:?}"
    );
    assert!(line.elapsed_ms < 500, "{line:?}");

    // The held connections finish (the app closes them) well within the 5 s deadline.
    std::thread::sleep(Duration::from_millis(300));
    held.release();
    held.success(STEP);
    let status = proxy_a.wait(STEP);
    let drained = term.elapsed();
    assert!(status.success(), "{}", proxy_a.stderr());
    assert!(drained < Duration::from_secs(4), "drain took {drained:?}");
    let err = proxy_a.stderr();
    assert!(err.contains("registration left in place"), "{err}");
    assert!(err.contains("cut=0"), "connections were cut: {err}");
    assert!(
        !err.contains("were still open after the drain deadline"),
        "{err}"
    );

    // Still registered after the exit: pod A's connects are refused, none passes through.
    assert!(pod_status(&node.status(), &pods.a.uid).is_some());
    let not_meshed = node.counter("connect_not_meshed");
    let mut after = node.app(
        &pods.a,
        "after-exit",
        &strings(&["connect-fail", &format!("--addr={ADDR_B}:{app_port}")]),
    );
    let line: ConnectFailLine = stdout_lines(&after.success(STEP))
        .pop()
        .expect("connect-fail line");
    assert!(
        !line.connected && line.error.as_deref().is_some_and(|e| e.contains(EPERM)),
        "{line:?}"
    );
    assert_eq!(node.counter("connect_not_meshed"), not_meshed);
    eprintln!(
        "drain: SIGTERM → refused connect in {} ms; exit 0 after {drained:?} (held connections closed at +300 ms)",
        line.elapsed_ms
    );
}

/// The drain deadline: a connection still open when `--drain-timeout-secs` expires is cut,
/// and the sidecar exits 0 right after the deadline (not before, not much later).
#[test]
fn drain_deadline_cuts_connections_that_stay_open() {
    let Some((_serial, node)) = setup("deadline") else {
        return;
    };
    let app_port = node.app_port;
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let mut proxy = node.start_proxy(&a, "proxy-a", "client", &["--drain-timeout-secs=1".into()]);
    node.wait_ready(&a, &proxy);
    let _server = node.server(&b);
    let mut held = node.app(
        &a,
        "hold",
        &strings(&["hold", &format!("--addr={ADDR_B}:{app_port}"), "--count=1"]),
    );
    held.wait_for_stdout("READY", STEP);

    let term = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait(STEP);
    let took = term.elapsed();
    assert!(status.success(), "{}", proxy.stderr());
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "exit {took:?} after SIGTERM with a 1 s deadline"
    );
    let err = proxy.stderr();
    assert!(
        err.contains("1 connection(s) were still open after the drain deadline"),
        "{err}"
    );
    assert!(err.contains("registration left in place"), "{err}");
    held.release();
    eprintln!("drain deadline 1 s: sidecar exited 0 after {took:?}, 1 connection cut");
}

/// kubelet restarts the sidecar container alone (liveness failure, OOM kill, image update)
/// while the app connects in a loop: no connect reaches the server without the proxy. While
/// no proxy runs the connects are refused; the restarted sidecar, in a new container cgroup,
/// takes the registration back (the old container's entry goes), and a second live claimant
/// is still refused.
#[test]
fn restarting_the_pod_sidecar_keeps_its_pod_intercepted() {
    let Some((_serial, node)) = setup("restart") else {
        return;
    };
    let proxy_port = node.proxy_port;
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let mut proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let _server = node.server(&b);
    let old_proxy_id = host_cgroup_id(&a.cgroup.join("proxy"));
    let not_meshed = node.counter("connect_not_meshed");

    // The app: batches of sequential echo connections until told to stop (bounded), while
    // kubelet restarts the sidecar: SIGTERM, the container exits, restart backoff, a new
    // container.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (lines, _restarted) = std::thread::scope(|s| {
        let looper = s.spawn(|| {
            let mut lines: Vec<EchoLine> = Vec::new();
            let until = Instant::now() + Duration::from_secs(60);
            let mut batch = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                let mut p = node.app(&a, &format!("loop-{batch}"), &node.echo_args(64, 50));
                p.wait(STEP);
                lines.extend(stdout_lines::<EchoLine>(&p.stdout()));
                batch += 1;
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(500));
        proxy.signal(libc::SIGTERM);
        assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
        std::thread::sleep(Duration::from_millis(700));
        let restarted = node.start_proxy_in(&a, "proxy-1", "proxy-a-restarted", "client", &[]);
        node.wait_ready(&a, &restarted);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (looper.join().expect("the app loop panicked"), restarted)
    });

    let proxied = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let direct: Vec<&EchoLine> = lines
        .iter()
        .filter(|l| l.peer.is_some_and(|p| p != proxied))
        .collect();
    assert!(
        direct.is_empty(),
        "{} of {} connects reached the server without the proxy: {:?}",
        direct.len(),
        lines.len(),
        direct.first()
    );
    let refused = lines
        .iter()
        .filter(|l| !l.ok && l.error.as_deref().is_some_and(|e| e.contains(EPERM)))
        .count();
    let ok = lines.iter().filter(|l| l.ok).count();
    let other: Vec<&EchoLine> = lines
        .iter()
        .filter(|l| !l.ok && !l.error.as_deref().is_some_and(|e| e.contains(EPERM)))
        .collect();
    // Proxied before the SIGTERM, refused while no proxy ran, proxied again after.
    let first_refused = lines.iter().position(|l| !l.ok);
    let last_refused = lines.iter().rposition(|l| !l.ok);
    assert!(
        refused > 0
            && first_refused.is_some_and(|i| i > 0)
            && last_refused.is_some_and(|i| lines[i + 1..].iter().any(|l| l.ok)),
        "{ok} ok, {refused} refused, in order: first refused {first_refused:?}, last {last_refused:?}"
    );
    // A connection the old proxy had accepted may be cut by its exit; nothing else fails.
    assert!(other.len() <= 1, "{other:?}");
    assert_eq!(node.counter("connect_not_meshed"), not_meshed);

    // The restarted sidecar owns the registration; the old container's entry is gone.
    let reg = pod_status(&node.status(), &a.uid)
        .cloned()
        .expect("registered");
    assert_eq!(reg["registrations"], 2, "{reg}");
    assert!(
        reg["proxy_cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("/proxy-1")),
        "{reg}"
    );
    let workloads = node.workloads();
    assert!(!workloads.contains_key(&old_proxy_id), "{workloads:?}");
    assert_eq!(
        workloads
            .get(&host_cgroup_id(&a.cgroup.join("proxy-1")))
            .map(|c| c.role),
        Some(role::PROXY)
    );
    assert_eq!(
        workloads.get(&host_cgroup_id(&a.cgroup)).map(|c| c.role),
        Some(role::WORKLOAD)
    );
    // A second live claimant (from the old, now empty, container) is refused.
    let mut second = node.claim(
        "second",
        &a.container("proxy"),
        Some(a.ns),
        ports::take(),
        &a.uid,
    );
    assert_eq!(second.wait(STEP).code(), Some(1), "{}", second.stderr());
    assert!(
        second.stderr().contains("may not take over"),
        "{}",
        second.stderr()
    );
    eprintln!(
        "sidecar restart: {} connects, {ok} proxied, {refused} refused while no proxy ran, 0 direct",
        lines.len()
    );
}

/// Fail-closed means refused. The pod sidecar passed its listeners with its registration and
/// the agent, with no capability beyond its DaemonSet's, marked them; after a SIGKILL the pod
/// stays intercepted, and when `nobody` binds the proxy port in the pod's network namespace
/// the app's connect is refused (EPERM) at `connect()`: the squatter accepts nothing and the
/// server sees nothing. While the sidecar lived, the same connects went through it.
#[test]
fn a_killed_pod_sidecar_s_port_bound_by_nobody_receives_nothing() {
    if !ready() {
        return;
    }
    // Without CAP_SYS_ADMIN the agent cannot mount bpffs: as on a node, one is mounted before
    // it starts (held the way a run holds it, and unmounted after the node's pins are gone if
    // it was mounted here).
    let _bpffs = Bpffs::ensure(Path::new("/sys/fs/bpf")).expect("bpffs at /sys/fs/bpf");
    let Some((_serial, node)) = setup("squat") else {
        return;
    };
    let (proxy_port, app_port) = (node.proxy_port, node.app_port);
    let agent = node.start_agent_in("agent", None, &AGENT_CAPABILITIES_ONLY, &[]);
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    assert!(
        status.lines().any(|l| l == "CapEff:\t000000c000001000"),
        "the agent should hold BPF, NET_ADMIN and PERFMON only: {status}"
    );
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let mut proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let server = node.server(&b);

    let reg = pod_status(&node.status(), &a.uid)
        .cloned()
        .expect("registered");
    assert_eq!(reg["listener_checked"], true, "{reg}");
    let entry = node.workloads()[&host_cgroup_id(&a.cgroup)];
    assert_ne!(entry.flags & flags::CHECK_LISTENER, 0, "{entry:?}");

    // Live: through the proxy.
    let mut live = node.app(&a, "live", &node.echo_args(1000, 2));
    let out = live.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    let proxied: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    assert!(
        lines.len() == 2 && lines.iter().all(|l| l.ok && l.peer == Some(proxied)),
        "{out}"
    );

    // Killed: no drain, no deregistration. nobody, in the pod's app container and network
    // namespace, takes the port (an echo server that prints a line per connection).
    proxy.signal(libc::SIGKILL);
    proxy.wait(STEP);
    assert!(pod_status(&node.status(), &a.uid).is_some());
    let public = PublicCopy::of(&testclient_bin());
    let squatter = spawn(
        &node.scratch,
        "squatter",
        Some(&a.container("app")),
        Some(a.ns),
        &strings(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            &public.path().display().to_string(),
            "serve",
            &format!("--addr=127.0.0.1:{proxy_port}"),
        ]),
        &[],
    );
    squatter.wait_for_stdout("READY", STEP);

    let refused_before = node.counter("connect_proxy_not_listening");
    let mut probe = node.app(
        &a,
        "probe",
        &strings(&["connect-fail", &format!("--addr={ADDR_B}:{app_port}")]),
    );
    let line: ConnectFailLine = stdout_lines(&probe.success(STEP))
        .pop()
        .expect("connect-fail line");
    let mut echo = node.app(&a, "after-kill", &node.echo_args(1000, 1));
    echo.wait(STEP);
    let after: Vec<EchoLine> = stdout_lines(&echo.stdout());
    assert!(
        !line.connected && line.error.as_deref().is_some_and(|e| e.contains(EPERM)),
        "the app's connect should be refused at connect(): {line:?}"
    );
    assert!(
        after.len() == 1 && !after[0].ok && after[0].peer.is_none(),
        "{after:?}"
    );
    assert_eq!(
        node.counter("connect_proxy_not_listening"),
        refused_before + 2
    );
    let accepted: Vec<String> = squatter
        .stdout()
        .lines()
        .filter(|l| l.trim() != "READY")
        .map(String::from)
        .collect();
    assert!(accepted.is_empty(), "the squatter received {accepted:?}");
    let reached: Vec<String> = server
        .stdout()
        .lines()
        .filter(|l| l.trim() != "READY")
        .map(String::from)
        .collect();
    assert_eq!(reached.len(), 2, "only the live connections: {reached:?}");
    eprintln!(
        "killed pod sidecar: its port bound by nobody, the app's connect refused with EPERM in \
         {} ms, nothing accepted",
        line.elapsed_ms
    );
}
