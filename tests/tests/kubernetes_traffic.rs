//! Kubernetes mode, the traffic of pods on a simulated node: mTLS between two pods through
//! their unprivileged sidecars (the original destination served by the getsockopt program,
//! IPv6 too), excluded CIDRs, the sidecar's policy file, the metadata address refused in the
//! kernel, the fast path as the sidecar reports it, and kernel pass-through with its records.
//!
//! The node (cgroups laid out like kubelet's, two pods' network namespaces, the agent, the
//! unprivileged sidecars) is `sidecar_tests::node`; the other `kubernetes_*` files test the
//! rest of Kubernetes mode on it.

use std::{fs, path::Path, process::Command, time::Duration};

use serde_json::Value;
use sidecar_common::role;
use sidecar_tests::{
    host::{output_with_timeout, wait_until},
    node::{
        ADDR_A, ADDR_B, CLIENT_ID, NS_A, NS_B, Node, SERVER_ID, STEP, access_lines, excluded_cidrs,
        host_cgroup_id, pod_status, ready, rmdir_retrying, setup, stdout_lines, strings, two_pods,
    },
    ports,
    protocol::EchoLine,
    serial, sidecar_bin,
};

/// (a) Two pods register; an app in A reaches a server in B, intercepted and mTLS'd, with
/// the original destination served to the unprivileged proxy by the getsockopt program.
#[test]
fn two_pods_register_and_talk_over_mtls_through_unprivileged_proxies() {
    let Some((_serial, node)) = setup("mtls") else {
        return;
    };
    let app_port = node.app_port;
    let admin_port = node.admin_port;
    let _agent = node.start_agent("agent");
    let (pods, proxy_a, proxy_b) = two_pods(&node);
    let mut server = node.server(&pods.b);

    // The proxies really run unprivileged: uid nobody, no capability at all.
    for p in [&proxy_a, &proxy_b] {
        let status = fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.contains("65534")),
            "{status}"
        );
        assert!(
            status.lines().any(|l| l == "CapEff:\t0000000000000000"),
            "{status}"
        );
    }

    let status = node.status();
    for pod in [&pods.a, &pods.b] {
        let reg = pod_status(&status, &pod.uid)
            .unwrap_or_else(|| panic!("{pod_uid} not registered: {status:#}", pod_uid = pod.uid));
        assert_eq!(reg["proxy_port"], node.proxy_port);
        assert_eq!(reg["pod_cgroup"], pod.cgroup.display().to_string());
    }
    let workloads = node.workloads();
    let id = |p: &Path| host_cgroup_id(p);
    assert_eq!(workloads[&id(&pods.a.cgroup)].role, role::WORKLOAD);
    assert_eq!(
        workloads[&id(&pods.a.cgroup.join("proxy"))].role,
        role::PROXY
    );
    assert_eq!(workloads.len(), 4, "{workloads:?}");

    let sockopt_before = node.counter("orig_dst_sockopt");
    let mut client = node.app(&pods.a, "client", &node.echo_args(100_000, 3));
    let out = client.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.sent == 100_000 && l.received == 100_000),
        "{lines:?}"
    );
    assert!(
        node.counter("orig_dst_sockopt") >= sockopt_before + 3,
        "the getsockopt program did not serve the proxy"
    );

    // Pod A's sidecar tunnelled each connection to B's, both identities verified.
    assert!(wait_until(STEP, || access_lines(&pods.log_a).len() == 3
        && access_lines(&pods.log_b).len() == 3));
    for l in access_lines(&pods.log_a) {
        assert_eq!(l["direction"], "outbound", "{l}");
        assert_eq!(l["mode"], "mtls", "{l}");
        assert_eq!(l["original_dst"], format!("{ADDR_B}:{app_port}"), "{l}");
        assert_eq!(l["dst_identity"], SERVER_ID, "{l}");
        assert_eq!(l["close_reason"], "ok", "{l}");
    }
    for l in access_lines(&pods.log_b) {
        assert_eq!(l["direction"], "inbound", "{l}");
        assert_eq!(l["mode"], "mtls", "{l}");
        assert_eq!(l["src_identity"], CLIENT_ID, "{l}");
    }
    // `sidecar status` against the pod sidecar's admin endpoint.
    let out = output_with_timeout(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", pods.a.ns))
            .arg(sidecar_bin())
            .args(["status", "--admin", &format!("127.0.0.1:{admin_port}")]),
        STEP,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("interception   on (agent"), "{text}");
    assert!(
        text.contains("intercepted    yes: 3 connection(s)"),
        "{text}"
    );
    assert!(text.contains("ready          yes"), "{text}");

    // The server's peer is its own sidecar, on the pod's own address (where tunnels are
    // delivered).
    server.release();
    let served = server.success(STEP);
    let peers: Vec<Value> = served
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(peers.len(), 3, "{served}");
    for p in &peers {
        let text = p.to_string();
        assert!(
            text.contains(&format!("\"{ADDR_B}:")),
            "server peer not its sidecar's socket on the pod address: {text}"
        );
    }
    for l in access_lines(&pods.log_b) {
        assert_eq!(l["original_dst"], format!("{ADDR_B}:{app_port}"), "{l}");
    }

    // A service of pod B bound to 127.0.0.1 only is out of reach of every tunnel.
    let local_only_port = ports::take();
    let local_only = node.app(
        &pods.b,
        "local-only",
        &[
            "serve".into(),
            format!("--addr=127.0.0.1:{local_only_port}"),
        ],
    );
    local_only.wait_for_stdout("READY", STEP);
    let mut probe = node.app(
        &pods.a,
        "probe",
        &strings(&["echo", &format!("--addr={ADDR_B}:{local_only_port}")]),
    );
    let status = probe.wait(STEP);
    assert!(
        !status.success(),
        "a 127.0.0.1-only service of pod B answered through the tunnel: {}",
        probe.stdout()
    );
    assert!(
        !local_only.stdout().contains("peer"),
        "{}",
        local_only.stdout()
    );
}

/// IPv6: a connect to [::1] in the pod is redirected to the proxy's [::1] listener, and the
/// getsockopt program answers `IP6T_SO_ORIGINAL_DST` with a `sockaddr_in6`.
#[test]
fn ipv6_original_destination_is_served_by_getsockopt() {
    let Some((_serial, node)) = setup("ipv6") else {
        return;
    };
    let proxy_port = node.proxy_port;
    let server_port = ports::take();
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let log = node.log_file("access-a.log");
    let proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[format!("--access-log={}", log.display())],
    );
    node.wait_ready(&a, &proxy);
    assert_eq!(
        pod_status(&node.status(), &a.uid).unwrap()["ipv6"],
        true,
        "no [::1] listener"
    );
    let mut server = node.app(
        &a,
        "server6",
        &["serve".into(), format!("--addr=[::1]:{server_port}")],
    );
    server.wait_for_stdout("READY", STEP);
    let served_before = node.counter("orig_dst_sockopt");

    let mut client = node.app(
        &a,
        "client6",
        &strings(&[
            "echo",
            &format!("--addr=[::1]:{server_port}"),
            "--size=5000",
            "--count=2",
        ]),
    );
    let out = client.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(
        lines.len() == 2 && lines.iter().all(|l| l.ok && l.received == 5000),
        "{out}"
    );
    assert_eq!(node.counter("orig_dst_sockopt"), served_before + 2);
    assert!(wait_until(STEP, || access_lines(&log).len() == 2));
    for l in access_lines(&log) {
        assert_eq!(l["original_dst"], format!("[::1]:{server_port}"), "{l}");
        assert_eq!(l["proxy"], format!("[::1]:{proxy_port}"), "{l}");
        assert_eq!(l["close_reason"], "ok", "{l}");
    }
    server.release();
    server.success(STEP);
}

/// `--exclude-cidrs`: connects to an excluded destination bypass the proxy (counted); the
/// pod's entries in the kernel trie stay while the pod does (a stopped sidecar keeps its
/// registration) and go with the pod.
#[test]
fn excluded_cidrs_bypass_the_proxy_and_go_with_the_registration() {
    let Some((_serial, node)) = setup("cidrs") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let log = node.log_file("access-a.log");
    let mut proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[
            format!("--exclude-cidrs={ADDR_B}/32,fd00:5ca1::/64"),
            format!("--access-log={}", log.display()),
        ],
    );
    node.wait_ready(&a, &proxy);
    let reg = pod_status(&node.status(), &a.uid).cloned().unwrap();
    assert_eq!(
        reg["exclude_cidrs"],
        serde_json::json!([format!("{ADDR_B}/32"), "fd00:5ca1::/64"])
    );
    assert_eq!(excluded_cidrs(&node), 2);
    let _server = node.server(&b);

    let excluded = node.counter("connect_excluded_cidr");
    let redirected = node.counter("connect_redirected");
    let mut client = node.app(&a, "client", &node.echo_args(64, 2));
    client.success(STEP);
    assert_eq!(node.counter("connect_excluded_cidr"), excluded + 2);
    assert_eq!(node.counter("connect_redirected"), redirected);
    assert!(
        access_lines(&log).is_empty(),
        "excluded connections reached the proxy"
    );

    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
    assert_eq!(excluded_cidrs(&node), 2, "a stopped sidecar dropped them");
    node.kill_all(&a.cgroup);
    for d in [
        a.cgroup.join("proxy"),
        a.cgroup.join("app"),
        a.cgroup.clone(),
    ] {
        assert!(rmdir_retrying(&d), "cannot remove {}", d.display());
    }
    assert!(
        wait_until(Duration::from_secs(5), || excluded_cidrs(&node) == 0),
        "the gone pod's exclusions stayed in the kernel"
    );
}

/// `sidecar proxy --policy` with `--proxy-all`: the agent puts the pod's policy in the kernel,
/// so a denied destination fails with EPERM at `connect()` and never reaches the proxy; an
/// edited file is picked up without a restart (in the kernel and the proxy, which then logs
/// its verdicts); an invalid file is refused before anything registers.
#[test]
fn proxy_enforces_its_policy_file_and_reloads_it() {
    let Some((_serial, node)) = setup("policy") else {
        return;
    };
    let app_port = node.app_port;
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let policy = node.scratch.path("policy.toml");
    let write_policy = |action: &str| {
        let text = format!(
            "[[rule]]\nname = \"pod-b-app\"\naction = \"{action}\"\ndirection = \"outbound\"\n\
             destinations = [\"{ADDR_B}/32\"]\nports = [{app_port}]\n"
        );
        // Written aside and renamed in, as kubelet swaps a ConfigMap volume.
        let tmp = policy.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &policy).unwrap();
    };
    write_policy("deny");
    let log = node.log_file("access-a.log");
    let mut proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[
            format!("--policy={}", policy.display()),
            format!("--access-log={}", log.display()),
        ],
    );
    node.wait_ready(&a, &proxy);
    let _server = node.server(&b);

    let mut denied = node.app(&a, "client-denied", &node.echo_args(64, 1));
    assert!(
        !denied.wait(STEP).success(),
        "a denied destination was reached: {}",
        denied.stdout()
    );
    let said = format!("{}{}", denied.stdout(), denied.stderr());
    assert!(said.contains("Operation not permitted"), "{said}");
    // Refused in the kernel: the proxy never saw it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(access_lines(&log).len(), 0, "{:?}", access_lines(&log));

    write_policy("allow");
    assert!(
        wait_until(STEP, || proxy.stderr().contains("policy reloaded")),
        "{}",
        proxy.stderr()
    );
    let mut allowed = node.app(&a, "client-allowed", &node.echo_args(64, 2));
    allowed.success(STEP);
    assert!(wait_until(STEP, || access_lines(&log).len() == 2));
    assert!(
        access_lines(&log)
            .iter()
            .all(|l| l["policy_decision"] == "allow"),
        "{:?}",
        access_lines(&log)
    );

    // An invalid file is refused before anything is bound or registered.
    fs::write(&policy, "[[rule]]\naction = \"maybe\"\n").unwrap();
    let mut bad = node.start_proxy(
        &b,
        "proxy-bad",
        "server",
        &[format!("--policy={}", policy.display())],
    );
    assert!(!bad.wait(STEP).success());
    assert!(bad.stderr().contains("policy.toml"), "{}", bad.stderr());
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
}

/// A registered pod cannot reach the cloud metadata address: the agent marks the pod so its
/// connect hook refuses it (EPERM, counted) unless its sidecar says `--allow-metadata`. The
/// pods' namespaces have no route out, so nothing could leave even if the check failed.
#[test]
fn pod_connects_to_the_metadata_address_are_refused_in_the_kernel() {
    let Some((_serial, node)) = setup("metadata") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let before = node.counter("connect_metadata_denied");
    let mut client = node.app(
        &a,
        "client-metadata",
        &[
            "echo".into(),
            "--addr=169.254.169.254:80".into(),
            "--count=1".into(),
        ],
    );
    assert!(!client.wait(STEP).success());
    assert!(
        client.stderr().contains("Operation not permitted")
            || client.stdout().contains("Operation not permitted"),
        "expected EPERM from the connect hook: {} {}",
        client.stdout(),
        client.stderr()
    );
    assert_eq!(node.counter("connect_metadata_denied"), before + 1);
}

/// The pod sidecar reports the fast path as it is: `/status` says sockmap on or off as the
/// agent's programs run, and each connection's record says whether its app leg was spliced
/// (the proxy asks its socket; it cannot read the maps).
#[test]
fn pod_sidecar_reports_the_fast_path_as_it_is() {
    if !ready() {
        return;
    }
    let _serial = serial();
    for sockmap in [true, false] {
        let node = Node::new(if sockmap {
            "fastpath-on"
        } else {
            "fastpath-off"
        });
        let flags = if sockmap {
            vec!["--sockmap".to_string()]
        } else {
            vec![]
        };
        let _agent = node.start_agent_in("agent", None, &[], &flags);
        let a = node.pod("a", NS_A, ADDR_A);
        let b = node.pod("b", NS_B, ADDR_B);
        let log = node.log_file("access-a.log");
        let proxy = node.start_proxy(
            &a,
            "proxy-a",
            "client",
            &[format!("--access-log={}", log.display())],
        );
        node.wait_ready(&a, &proxy);
        let _server = node.server(&b);
        node.app(&a, "client", &node.echo_args(64, 1)).success(STEP);
        assert!(wait_until(STEP, || access_lines(&log).len() == 1));
        let line = &access_lines(&log)[0];
        assert_eq!(line["fast_path_app"], sockmap, "sockmap {sockmap}: {line}");
        // The upstream is another pod, across the veth: never spliced.
        assert_eq!(line["fast_path_upstream"], false, "{line}");
        let (code, body) = node.admin(&a, "/status");
        assert_eq!(code, 200, "{body}");
        let status: Value = serde_json::from_str(&body).expect("/status JSON");
        assert_eq!(status["interception"]["sockmap"], sockmap, "{status:#}");
        assert_eq!(
            status["connections"]["fast_path_app_legs"],
            u64::from(sockmap),
            "{status:#}"
        );
    }
}

/// Kernel pass-through for pods: a plaintext connection from a pod without a policy goes
/// straight to its destination (the server sees the app's own socket), the agent records it,
/// and the pod's own sidecar (unprivileged) gets the record: its `/metrics` count it with the
/// bytes; the other pod's sidecar sees none of it.
#[test]
fn pods_pass_plaintext_through_and_see_only_their_own_records() {
    let Some((_serial, node)) = setup("passthrough") else {
        return;
    };
    let app_port = node.app_port;
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let log_a = node.log_file("access-a.log");
    let proxy_a = node.start_proxy_passthrough(
        &a,
        "proxy-a",
        &[format!("--access-log={}", log_a.display())],
    );
    let proxy_b = node.start_proxy_passthrough(&b, "proxy-b", &[]);
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    let status = node.status();
    for pod in [&a, &b] {
        let reg = pod_status(&status, &pod.uid).expect("registered");
        assert_eq!(reg["passthrough"], true, "{reg}");
    }
    let flags = node.workloads()[&host_cgroup_id(&a.cgroup)].flags;
    assert_ne!(
        flags & sidecar_common::flags::PASSTHROUGH,
        0,
        "flags {flags:#x}"
    );

    let server = node.server(&b);
    let mut client = node.app(&a, "client", &node.echo_args(3000, 2));
    let out = client.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");
    // Direct: the server's peers are the app's own sockets, not the proxy's.
    let mut apps: Vec<String> = lines
        .iter()
        .map(|l| l.local.expect("local").to_string())
        .collect();
    let mut peers: Vec<String> = server
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["peer"].as_str().map(String::from))
        .collect();
    apps.sort();
    peers.sort();
    assert_eq!(peers, apps, "the server saw the apps themselves");

    // Pod A's sidecar records both, from the agent's stream, with the bytes.
    let closed =
        r#"sidecar_connections_closed_total{direction="outbound",path="passthrough",reason="ok"}"#;
    assert!(
        wait_until(STEP, || node
            .admin(&a, "/metrics")
            .1
            .contains(&format!("{closed} 2"))),
        "pod A's sidecar never counted its 2 pass-through connections:\n{}\n{}",
        node.admin(&a, "/metrics").1,
        proxy_a.stderr()
    );
    let metrics_a = node.admin(&a, "/metrics").1;
    for series in [
        r#"sidecar_sent_bytes_total{direction="outbound",path="passthrough"} 6000"#,
        r#"sidecar_received_bytes_total{direction="outbound",path="passthrough"} 6000"#,
    ] {
        assert!(metrics_a.contains(series), "{series}:\n{metrics_a}");
    }
    assert!(wait_until(STEP, || access_lines(&log_a).len() == 2));
    for l in access_lines(&log_a) {
        assert_eq!(l["path"], "passthrough", "{l}");
        assert_eq!(l["bytes_sent"], 3000, "{l}");
        assert_eq!(l["original_dst"], format!("{ADDR_B}:{app_port}"), "{l}");
    }
    // Pod B's sidecar saw none of pod A's records.
    let metrics_b = node.admin(&b, "/metrics").1;
    assert!(
        metrics_b.contains(&format!("{closed} 0")),
        "pod B's sidecar got pod A's records:\n{metrics_b}"
    );
    let delivered = node.status()["passthrough_records"]["delivered"].as_u64();
    assert!(delivered >= Some(2), "{:#}", node.status());
}
