//! Kubernetes mode, each pod's share of the node's pass-through tables: a pod that floods
//! cannot make another pod's pass-through connections go untracked (unrecorded, uncapped);
//! past its own share, its new connections go through its own proxy, which records them. The
//! close records the node's (shared) ring drops are counted per pod.
//!
//! The quotas are set low on the agent (`--tracked-per-pod`, `--destinations-per-pod`) so a
//! handful of connections reaches them; the defaults, and why every pod's full share fits the
//! tables, are in `sidecar_common::limits`. All traffic stays between the node's two pod
//! network namespaces.

use std::net::SocketAddr;

use serde_json::Value;
use sidecar_tests::{
    host::wait_until,
    node::{
        ADDR_A, ADDR_B, NS_A, NS_B, Node, Pod, Proc, STEP, access_lines, host_cgroup_id,
        rmdir_retrying, setup, stdout_lines, strings,
    },
    ports,
    protocol::{EchoLine, HoldLine},
};

/// Pass-through connections each pod may have tracked at once, on this node's agent.
const TRACKED: usize = 4;
/// Of those, how many more pod A opens: they must go through its proxy.
const OVER: usize = 3;
/// Destinations each pod may have pass-through connections open to, on this node's agent.
const DESTINATIONS: usize = 2;
/// Pod B's cap on pass-through connections to one destination.
const CAP: usize = 2;

fn agent_flags() -> Vec<String> {
    vec![
        format!("--tracked-per-pod={TRACKED}"),
        format!("--destinations-per-pod={DESTINATIONS}"),
    ]
}

/// `hold` in `pod`: `count` connections to `dst`, kept open until released; returns once all
/// are open, with the app's view of each.
fn hold(
    node: &Node,
    pod: &Pod,
    name: &str,
    dst: SocketAddr,
    count: usize,
) -> (Proc, Vec<HoldLine>) {
    let proc = node.app(
        pod,
        name,
        &[
            "hold".into(),
            format!("--addr={dst}"),
            format!("--count={count}"),
        ],
    );
    proc.wait_for_stdout("READY", STEP);
    let lines: Vec<HoldLine> = stdout_lines(&proc.stdout());
    assert_eq!(lines.len(), count, "{}", proc.stdout());
    (proc, lines)
}

/// How many of `lines` went straight to their destination (the app's socket is connected to
/// the server itself; through the proxy it is connected to the proxy's loopback listener).
fn direct(lines: &[HoldLine]) -> usize {
    lines.iter().filter(|l| !l.peer.ip().is_loopback()).count()
}

fn usage(node: &Node, pod: &Pod) -> Value {
    node.status()["passthrough_usage"][&pod.uid].clone()
}

/// An echo server in `pod` on `port`; returns once it listens.
fn serve(node: &Node, pod: &Pod, name: &str, port: u16) -> Proc {
    let server = node.app(
        pod,
        name,
        &strings(&["serve", &format!("--addr=0.0.0.0:{port}")]),
    );
    server.wait_for_stdout("READY", STEP);
    server
}

/// Pod A holds more connections than its quota of tracked pass-through connections: the
/// quota's worth go direct, the rest through A's proxy (recorded there, path `proxy`),
/// counted. Meanwhile pod B's pass-through connections are still tracked: its records arrive
/// (path `passthrough`) and its per-destination cap still refuses.
#[test]
fn a_pod_over_its_tracking_quota_goes_through_its_proxy_and_the_other_keeps_its_records_and_cap() {
    let Some((_serial, node)) = setup("quota-tracked") else {
        return;
    };
    let app_port = node.app_port;
    let _agent = node.start_agent_in("agent", None, &[], &agent_flags());
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let (log_a, log_b) = (node.log_file("access-a.log"), node.log_file("access-b.log"));
    let proxy_a = node.start_proxy_passthrough(
        &a,
        "proxy-a",
        &[format!("--access-log={}", log_a.display())],
    );
    let proxy_b = node.start_proxy_passthrough(
        &b,
        "proxy-b",
        &[
            format!("--access-log={}", log_b.display()),
            format!("--max-connections-per-destination={CAP}"),
        ],
    );
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    let _server_b = node.server(&b);
    let _server_a = node.server(&a);
    let to_b: SocketAddr = format!("{ADDR_B}:{app_port}").parse().unwrap();
    let to_a: SocketAddr = format!("{ADDR_A}:{app_port}").parse().unwrap();

    // Pod A floods (one destination, so only the tracking quota is in play).
    let (mut flood, lines) = hold(&node, &a, "flood", to_b, TRACKED + OVER);
    assert_eq!(direct(&lines), TRACKED, "{lines:#?}");
    assert_eq!(node.counter("passthrough_over_quota"), OVER as u64);
    assert_eq!(usage(&node, &a)["tracked"], TRACKED, "{:#}", node.status());

    // Pod B, while A holds its whole share: its connections still pass through, tracked.
    let mut echo = node.app(
        &b,
        "echo",
        &strings(&["echo", &format!("--addr={to_a}"), "--size=100", "--count=2"]),
    );
    let out = echo.success(STEP);
    let echoed: Vec<EchoLine> = stdout_lines(&out);
    assert!(echoed.iter().all(|l| l.ok), "{out}");
    assert!(
        echoed.iter().all(|l| l.peer == Some(to_a)),
        "pod B's connections did not pass through: {echoed:#?}"
    );
    assert!(
        wait_until(STEP, || access_lines(&log_b).len() == 2),
        "pod B's pass-through records never arrived: {:?}\n{}",
        access_lines(&log_b),
        proxy_b.stderr()
    );
    for l in access_lines(&log_b) {
        assert_eq!(l["path"], "passthrough", "{l}");
        assert_eq!(l["original_dst"], to_a.to_string(), "{l}");
    }
    // ... and capped: CAP open to A's server, the next one refused in the kernel.
    let (mut held_b, lines_b) = hold(&node, &b, "hold-b", to_a, CAP);
    assert_eq!(direct(&lines_b), CAP, "{lines_b:#?}");
    let mut over_cap = node.app(
        &b,
        "over-cap",
        &strings(&["echo", &format!("--addr={to_a}"), "--size=100", "--count=1"]),
    );
    over_cap.wait(STEP);
    let refused: Vec<EchoLine> = stdout_lines(&over_cap.stdout());
    assert!(
        refused.len() == 1 && !refused[0].ok,
        "pod B's cap did not refuse: {refused:#?}"
    );
    assert_eq!(node.counter("connect_overloaded"), 1);
    held_b.release();
    held_b.success(STEP);

    // Pod A's connections over its quota were its proxy's: recorded there once closed.
    flood.release();
    flood.success(STEP);
    assert!(
        wait_until(STEP, || access_lines(&log_a).len() == TRACKED + OVER),
        "pod A's records: {:#?}\n{}",
        access_lines(&log_a),
        proxy_a.stderr()
    );
    let paths: Vec<String> = access_lines(&log_a)
        .iter()
        .map(|l| {
            assert_eq!(l["original_dst"], to_b.to_string(), "{l}");
            l["path"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        paths.iter().filter(|p| *p == "passthrough").count(),
        TRACKED,
        "{paths:?}"
    );
    assert_eq!(
        paths.iter().filter(|p| *p == "proxy").count(),
        OVER,
        "{paths:?}"
    );
    // The places come back at close.
    assert!(
        wait_until(STEP, || usage(&node, &a)["tracked"] == 0),
        "{:#}",
        node.status()
    );
    assert_eq!(usage(&node, &a)["records_dropped"], 0);

    // The pod goes (SIGKILL, then its cgroups): its entry goes with it, so a gone pod holds
    // no place in the table every pod needs one in.
    let scope = node.workloads()[&host_cgroup_id(&a.cgroup)].scope;
    assert!(node.scope_usage().contains_key(&scope));
    drop(proxy_a);
    node.kill_all(&a.cgroup);
    for d in [
        a.cgroup.join("proxy"),
        a.cgroup.join("app"),
        a.cgroup.clone(),
    ] {
        assert!(rmdir_retrying(&d), "cannot remove {}", d.display());
    }
    assert!(
        wait_until(STEP, || !node.scope_usage().contains_key(&scope)),
        "{:?}",
        node.scope_usage()
    );
}

/// Connects that fail before any SYN goes out (here: no route) keep no place in the pod's
/// share: each socket gives its place back when it is released, so after more such failures
/// than its quota the pod's next connection still passes through, not through its proxy.
#[test]
fn connects_that_fail_before_their_syn_give_their_places_back() {
    let Some((_serial, node)) = setup("quota-unroutable") else {
        return;
    };
    let _agent = node.start_agent_in("agent", None, &[], &agent_flags());
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let proxy_a = node.start_proxy_passthrough(&a, "proxy-a", &[]);
    node.wait_ready(&a, &proxy_a);
    let _server = serve(&node, &b, "server-b", node.app_port);
    // The pods' namespaces have no route but the one between them.
    let unroutable: SocketAddr = "10.254.99.1:80".parse().unwrap();
    for i in 0..TRACKED + OVER {
        let mut probe = node.app(
            &a,
            &format!("unroutable-{i}"),
            &strings(&["connect-fail", &format!("--addr={unroutable}")]),
        );
        let out = probe.success(STEP);
        assert!(out.contains("unreachable"), "{out}");
    }
    assert_eq!(node.counter("connect_passthrough"), (TRACKED + OVER) as u64);
    assert!(
        wait_until(STEP, || usage(&node, &a)["tracked"] == 0),
        "the failed connects kept their places: {:#}",
        usage(&node, &a)
    );
    let to_b: SocketAddr = format!("{ADDR_B}:{}", node.app_port).parse().unwrap();
    let (mut held, lines) = hold(&node, &a, "after", to_b, 1);
    assert_eq!(direct(&lines), 1, "{lines:#?}");
    held.release();
    held.success(STEP);
}

/// Pod A with pass-through connections open to its quota of destinations: a connection to a
/// further destination goes through its proxy (which holds the cap there), counted; once one
/// destination's connections close, a new destination passes through again. Pod B's count of
/// a destination stays (the map is not an LRU that A's destinations could evict).
#[test]
fn a_pod_over_its_destination_quota_goes_through_its_proxy() {
    let Some((_serial, node)) = setup("quota-dests") else {
        return;
    };
    let _agent = node.start_agent_in("agent", None, &[], &agent_flags());
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let proxy_a = node.start_proxy_passthrough(&a, "proxy-a", &[]);
    let proxy_b = node.start_proxy_passthrough(
        &b,
        "proxy-b",
        &[format!("--max-connections-per-destination={CAP}")],
    );
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    let _server_a = node.server(&a);
    let to_a: SocketAddr = format!("{ADDR_A}:{}", node.app_port).parse().unwrap();
    // DESTINATIONS + 1 servers in pod B, one port each.
    let mut servers = Vec::new();
    let mut dsts = Vec::new();
    for i in 0..=DESTINATIONS {
        let port = ports::take();
        servers.push(serve(&node, &b, &format!("server-{i}"), port));
        dsts.push(format!("{ADDR_B}:{port}").parse::<SocketAddr>().unwrap());
    }

    // Pod B holds its cap to A's server: a count pod A's destinations must not evict.
    let (held_b, lines_b) = hold(&node, &b, "hold-b", to_a, CAP);
    assert_eq!(direct(&lines_b), CAP, "{lines_b:#?}");

    let mut held = Vec::new();
    for (i, dst) in dsts.iter().enumerate().take(DESTINATIONS) {
        let (p, lines) = hold(&node, &a, &format!("hold-{i}"), *dst, 1);
        assert_eq!(direct(&lines), 1, "destination {i}: {lines:#?}");
        held.push(p);
    }
    assert_eq!(
        usage(&node, &a)["destinations"],
        DESTINATIONS,
        "{:#}",
        node.status()
    );
    let (mut over, lines) = hold(&node, &a, "hold-over", dsts[DESTINATIONS], 1);
    assert_eq!(
        direct(&lines),
        0,
        "past the quota of destinations: {lines:#?}"
    );
    assert_eq!(node.counter("passthrough_over_destinations"), 1);

    // Pod B's cap still refuses.
    let mut over_cap = node.app(
        &b,
        "over-cap",
        &strings(&["echo", &format!("--addr={to_a}"), "--size=100", "--count=1"]),
    );
    over_cap.wait(STEP);
    let refused: Vec<EchoLine> = stdout_lines(&over_cap.stdout());
    assert!(
        refused.len() == 1 && !refused[0].ok,
        "pod B's cap did not refuse: {refused:#?}"
    );

    // A destination freed is a place for a new one.
    over.release();
    over.success(STEP);
    let mut first = held.remove(0);
    first.release();
    first.success(STEP);
    assert!(
        wait_until(STEP, || usage(&node, &a)["destinations"]
            == DESTINATIONS - 1),
        "{:#}",
        node.status()
    );
    let (again, lines) = hold(&node, &a, "hold-again", dsts[DESTINATIONS], 1);
    assert_eq!(direct(&lines), 1, "a freed destination's place: {lines:#?}");
    for mut p in held.into_iter().chain([again, held_b]) {
        p.release();
        p.success(STEP);
    }
}

/// With the agent stopped (SIGSTOP), nothing reads the node's ring of close records: pod A's
/// pass-through connections still work, the ring fills, and the records that did not fit
/// are counted as pod A's in the agent's status, none as pod B's.
#[test]
fn close_records_the_ring_drops_are_counted_per_pod() {
    let Some((_serial, node)) = setup("quota-ring") else {
        return;
    };
    // More close records than the ring holds (about 7,700 between two reads).
    const CONNECTIONS: u64 = 10_000;
    let agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let proxy_a = node.start_proxy_passthrough(&a, "proxy-a", &[]);
    let proxy_b = node.start_proxy_passthrough(&b, "proxy-b", &[]);
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    let _server_b = node.server(&b);
    let _server_a = node.server(&a);
    // Pod B has an entry (one pass-through connection, recorded) before the ring fills.
    let to_a = format!("{ADDR_A}:{}", node.app_port);
    let mut echo = node.app(
        &b,
        "echo-b",
        &strings(&["echo", &format!("--addr={to_a}"), "--size=100", "--count=1"]),
    );
    echo.success(STEP);

    agent.signal(libc::SIGSTOP);
    let mut flood = node.app(
        &a,
        "flood",
        &[
            "echo".into(),
            format!("--addr={ADDR_B}:{}", node.app_port),
            "--size=100".into(),
            format!("--count={CONNECTIONS}"),
            "--concurrency=4".into(),
        ],
    );
    // Bounded: a flood that does not end fails here (and the node's teardown kills it).
    let status = flood.wait(std::time::Duration::from_secs(180));
    agent.signal(libc::SIGCONT);
    assert!(
        status.success(),
        "pod A's connections failed:\n{}",
        flood.stderr()
    );

    let status = node.status();
    let dropped = node.counter("direct_records_dropped");
    assert!(
        dropped > 0,
        "the ring never overflowed: the test proves nothing"
    );
    assert_eq!(
        status["passthrough_usage"][&a.uid]["records_dropped"], dropped,
        "{status:#}"
    );
    assert_eq!(
        status["passthrough_usage"][&b.uid]["records_dropped"], 0,
        "{status:#}"
    );
}
