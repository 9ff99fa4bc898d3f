//! Kubernetes mode, registration with the node agent on a simulated node: a sidecar is ready
//! only once registered; the agent believes where a caller really is (its cgroup), not what it
//! claims, also from a cgroup namespace of its own and after the caller's pid was reused;
//! malformed, silent and greedy callers are refused and counted without starving other pods;
//! a sidecar retries a refusal marked retry, and refuses a certificate of another account; a
//! register naming listeners it did not pass is refused, and one naming none (an older
//! sidecar) is registered without the listener check.
//!
//! The node (cgroups laid out like kubelet's, two pods' network namespaces, the agent, the
//! unprivileged sidecars) is `sidecar_tests::node`; the other `kubernetes_*` files test the
//! rest of Kubernetes mode on it.

use std::{
    ffi::CString,
    fs,
    io::Write,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use sidecar_tests::{
    host::{self, output_with_timeout, wait_until},
    node::{
        ADDR_A, ADDR_B, CLIENT_ID, NS_A, NS_B, Node, Pod, Proc, SERVER_ID, STEP, excluded_cidrs,
        host_cgroup_id, pod_status, raw_register, ready, setup, spawn, strings,
    },
    ports, serial, sidecar_bin, skip, testclient_bin,
};

/// Readiness gating: a sidecar started before the agent serves, keeps trying to register, and
/// answers /readyz 503 (its pod is not intercepted, the app's connects pass through, counted)
/// until the agent comes up; then it registers by itself and turns ready. Its `/status` says
/// `mtls` (it has `--tls-dir`) from the first answer, not ready yet: an operator never reads
/// "plain" for a sidecar configured for mTLS.
#[test]
fn proxy_is_not_ready_until_registered_and_registers_when_the_agent_comes() {
    let Some((_serial, node)) = setup("readiness") else {
        return;
    };
    let admin_port = node.admin_port;
    let a = node.pod("a", NS_A, ADDR_A);
    let tls = node.certs(CLIENT_ID, "tls-readiness");
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[format!("--tls-dir={tls}")]);
    assert!(
        wait_until(STEP, || node.readyz(&a) == 503),
        "{}",
        proxy.stderr()
    );
    let (code, body) = node.admin(&a, "/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("not attached"), "{body}");
    let (code, body) = node.admin(&a, "/status");
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["mode"], "mtls", "not ready yet: {status:#}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(node.readyz(&a), 503);
    // The exec-probe form says the same with its exit code.
    let probe = |pod: &Pod| {
        output_with_timeout(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", pod.ns))
                .arg(sidecar_bin())
                .args(["status", "--require-ready", "--admin"])
                .arg(format!("127.0.0.1:{admin_port}")),
            STEP,
        )
    };
    let out = probe(&a);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not ready"));

    let _agent = node.start_agent("agent");
    let up = Instant::now();
    node.wait_ready(&a, &proxy);
    eprintln!(
        "agent up → sidecar registered and ready after {:?}",
        up.elapsed()
    );
    assert!(pod_status(&node.status(), &a.uid).is_some());
    assert!(probe(&a).status.success());
}

/// (c) A registration from a process not in the claimed pod is refused and counted: a
/// proxy claiming another pod's UID, a process outside kubepods, one in a pod cgroup itself.
#[test]
fn registrations_not_from_the_claimed_pod_are_refused_and_counted() {
    let Some((_serial, node)) = setup("refuse") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);

    // A sidecar in pod A claiming pod B: refused, and it exits with a one-line error.
    let mut impostor = node.claim(
        "impostor",
        &a.container("proxy"),
        Some(a.ns),
        node.proxy_port,
        &b.uid,
    );
    let status = impostor.wait(STEP);
    assert_eq!(status.code(), Some(1), "{}", impostor.stderr());
    let err = impostor.stderr();
    assert!(
        err.contains("error: the agent refused to register pod")
            && err.contains("is not in that pod's cgroup"),
        "{err}"
    );
    assert!(
        !err.contains(&a.uid),
        "the refusal named the pod the caller is in: {err}"
    );

    // This test process is outside kubepods.
    let reply = raw_register(&node, &a.uid);
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["reason"], "outside_pods", "{reply}");

    // A process in the pod cgroup itself, not in a container.
    let mut in_pod = node.claim("in-pod", &a.cgroup, None, ports::take(), &a.uid);
    assert_eq!(in_pod.wait(STEP).code(), Some(1), "{}", in_pod.stderr());
    assert!(
        in_pod.stderr().contains("not in one of its containers"),
        "{}",
        in_pod.stderr()
    );

    let status = node.status();
    assert_eq!(status["refusals"]["uid_mismatch"], 1, "{status:#}");
    assert_eq!(status["refusals"]["outside_pods"], 1, "{status:#}");
    assert_eq!(status["refusals"]["not_in_container"], 1, "{status:#}");
    assert_eq!(
        status["pods"].as_array().map(Vec::len),
        Some(0),
        "{status:#}"
    );
    assert!(
        node.workloads().is_empty(),
        "refused callers got WORKLOADS entries"
    );
    // The same, as the table `sidecar agent --status` prints.
    let out = output_with_timeout(
        Command::new(sidecar_bin())
            .args(["agent", "--status", "--socket"])
            .arg(&node.socket),
        STEP,
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("refusals       not_in_container 1, outside_pods 1, uid_mismatch 1"),
        "{table}"
    );
    assert!(table.contains("pods           0 registered"), "{table}");
    assert!(table.contains("connect_not_meshed"), "{table}");
}

/// Another container of a registered pod cannot take over the pod's registration (and so
/// make itself the exempt PROXY) while the registered sidecar runs.
#[test]
fn another_container_cannot_take_over_a_registered_pod() {
    let Some((_serial, node)) = setup("takeover") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let before = node.workloads();

    let mut app = node.claim(
        "app-claims",
        &a.container("app"),
        Some(a.ns),
        ports::take(),
        &a.uid,
    );
    assert_eq!(app.wait(STEP).code(), Some(1), "{}", app.stderr());
    assert!(
        app.stderr().contains("may not take over"),
        "{}",
        app.stderr()
    );
    assert_eq!(node.status()["refusals"]["proxy_taken"], 1);
    assert_eq!(
        node.workloads(),
        before,
        "the refused container changed WORKLOADS"
    );
}

/// An agent in a cgroup namespace of its own (a container's) still identifies callers: their
/// `/proc/<pid>/cgroup` reads relative to its namespace (`/../kubepods/…`) and is resolved
/// from the namespace's root.
#[test]
fn agent_in_its_own_cgroup_namespace_identifies_callers() {
    if !ready() {
        return;
    }
    if host::which("unshare").is_none() {
        skip("unshare is not installed (util-linux)");
        return;
    }
    let _serial = serial();
    let node = Node::new("cgroupns");
    let agent_cg = node.base.join("agent");
    fs::create_dir_all(&agent_cg).unwrap();
    let agent = node.start_agent_in("agent", Some(&agent_cg), &["unshare", "--cgroup"], &[]);
    let err = agent.stderr();
    assert!(
        err.contains("in a cgroup namespace of our own")
            || err.contains("joined PID 1's cgroup namespace"),
        "{err}"
    );
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let reg = pod_status(&node.status(), &a.uid)
        .cloned()
        .expect("registered");
    assert_eq!(reg["pod_cgroup"], a.cgroup.display().to_string());
    assert_eq!(
        reg["proxy_cgroup"],
        a.cgroup.join("proxy").display().to_string()
    );
    assert!(node.workloads().contains_key(&host_cgroup_id(&a.cgroup)));

    // And a claim for another pod is still seen through.
    let mut impostor = node.claim(
        "impostor",
        &b.container("proxy"),
        Some(b.ns),
        node.proxy_port,
        &a.uid,
    );
    assert_eq!(impostor.wait(STEP).code(), Some(1), "{}", impostor.stderr());
    assert_eq!(node.status()["refusals"]["uid_mismatch"], 1);
}

/// Garbage on the registration socket is refused line by line (an oversized line closes the
/// connection) and counted; the agent keeps serving.
#[test]
fn malformed_requests_are_refused_and_the_agent_keeps_serving() {
    use std::io::{BufRead, BufReader, Read};
    let Some((_serial, node)) = setup("garbage") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let mut s = std::os::unix::net::UnixStream::connect(&node.socket).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for line in [
        "not json",
        r#"{"op":"sudo"}"#,
        r#"{"op":"register"}"#,
        r#"{"op":"register","pod_uid":"x","proxy_port":70000}"#,
        r#"{"op":"deregister"}"#,
    ] {
        writeln!(s, "{line}").unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        let reply: Value = serde_json::from_str(&reply).expect("a JSON answer");
        assert_eq!(reply["ok"], false, "{line}: {reply}");
    }
    // One byte more than the longest request (4 KiB + twice the 64 KiB a policy may take)
    // without a newline: refused, and the connection closed (after reading all of it, so
    // nothing unread resets the connection before the answer is read).
    s.write_all(&vec![b'x'; sidecar::registration::MAX_LINE + 1])
        .unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"reason\":\"bad_request\""), "{rest}");
    let status = node.status();
    assert_eq!(status["refusals"]["bad_request"], 5, "{status:#}");
    assert_eq!(status["refusals"]["not_registered"], 1, "{status:#}");
}

/// A sidecar whose certificate names another service account refuses to start.
#[test]
fn proxy_refuses_a_certificate_of_another_service_account() {
    let Some((_serial, node)) = setup("identity") else {
        return;
    };
    let a = node.pod("a", NS_A, ADDR_A);
    let tls = node.certs(SERVER_ID, "tls-other");
    let mut proxy = node.start_proxy(&a, "proxy-a", "client", &[format!("--tls-dir={tls}")]);
    assert_eq!(proxy.wait(STEP).code(), Some(1));
    let err = proxy.stderr();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains(SERVER_ID) && errors[0].contains(CLIENT_ID),
        "{err}"
    );
}

/// A caller that starts a request and never finishes it is disconnected after the request
/// timeout, one pod cannot hold more than its share of connections, and meanwhile another
/// pod registers at once.
#[test]
fn silent_callers_are_disconnected_and_capped_per_pod_while_others_register() {
    let Some((_serial, node)) = setup("silent") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);

    // Pod A: 9 connections, each with half a request line.
    let mut stall = agent_ask(
        &node,
        "stall",
        &a.container("app"),
        &strings(&["--connections=9", r#"--partial={"op":"regis"#]),
    );
    // Pod B registers while A's connections hang.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut reg = agent_ask(
        &node,
        "register-b",
        &b.container("proxy"),
        &[format!(
            "--line={}",
            register_line(&b.uid, ports::take(), 0)
        )],
    );
    let out = reg.success(STEP);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answers(&out)[0]["ok"], true, "{out}");

    let out = stall.success(Duration::from_secs(30));
    let lines: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 9, "{out}");
    assert!(
        lines.iter().all(|l| l["closed"] == true),
        "a connection stayed open: {out}"
    );
    let reasons: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l["answer"].as_str().unwrap_or_default())
                .map(|a| a["reason"].clone())
                .unwrap_or(Value::Null)
        })
        .collect();
    // The 9th was refused at once (retry later), the 8 others timed out.
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "too_many_connections")
            .count(),
        1,
        "{out}"
    );
    assert_eq!(
        reasons.iter().filter(|r| *r == "timeout").count(),
        8,
        "{out}"
    );
    let slowest = lines
        .iter()
        .filter_map(|l| l["closed_after_secs"].as_f64())
        .fold(0.0, f64::max);
    assert!((4.0..12.0).contains(&slowest), "{out}");

    let status = node.status();
    assert_eq!(status["refusals"]["timeout"], 8, "{status:#}");
    assert_eq!(status["refusals"]["too_many_connections"], 1, "{status:#}");
    assert!(pod_status(&status, &b.uid).is_some(), "{status:#}");
}

/// Every pod the node can register gets its full exclusion quota: 17 pods with 64 CIDRs
/// each (more than the 1,024 one shared trie used to hold) all register; a pod asking more
/// than its quota is refused with the reason, for good (not retried), and the others keep
/// theirs.
#[test]
fn cidr_quotas_are_per_pod_and_cannot_starve_other_pods() {
    let Some((_serial, node)) = setup("quota") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let proxy_port = ports::take();
    for i in 0..17u16 {
        let pod = node.pod(&format!("{:x}", i + 1), NS_A, ADDR_A);
        let mut reg = agent_ask(
            &node,
            &format!("register-{i}"),
            &pod.container("proxy"),
            &[format!(
                "--line={}",
                register_line(&pod.uid, proxy_port, 64)
            )],
        );
        let out = reg.success(STEP);
        assert_eq!(answers(&out)[0]["ok"], true, "pod {i}: {out}");
    }
    assert_eq!(excluded_cidrs(&node), 17 * 64);

    let greedy = node.pod("ee", NS_A, ADDR_A);
    let mut reg = agent_ask(
        &node,
        "greedy",
        &greedy.container("proxy"),
        &[format!(
            "--line={}",
            register_line(&greedy.uid, ports::take(), 65)
        )],
    );
    let out = reg.success(STEP);
    let answer = &answers(&out)[0];
    assert_eq!(answer["ok"], false, "{out}");
    assert_eq!(answer["reason"], "over_quota", "{out}");
    assert!(answer.get("retry").is_none(), "{out}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 64 CIDRs per pod")),
        "{out}"
    );
    assert_eq!(
        excluded_cidrs(&node),
        17 * 64,
        "the refused pod left entries"
    );
    let status = node.status();
    assert_eq!(status["pods"].as_array().map(Vec::len), Some(17));
    assert_eq!(status["refusals"]["over_quota"], 1, "{status:#}");
}

/// A refusal that is the node's condition, not the pod's (here: the pod's connection cap is
/// held by another process of the pod), is retried by the sidecar, which says why and stays
/// up; it registers as soon as the condition clears.
#[test]
fn sidecar_retries_a_refusal_marked_retry_instead_of_exiting() {
    let Some((_serial, node)) = setup("retry") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy_cg = a.container("proxy");
    let proxy_port = ports::take();
    // 8 registered (hence idle-allowed) connections: pod A's whole share.
    let mut holder = agent_ask(
        &node,
        "holder",
        &proxy_cg,
        &[
            "--connections=8".into(),
            format!("--line={}", register_line(&a.uid, proxy_port, 0)),
            "--hold".into(),
        ],
    );
    holder.wait_for_stdout("READY", STEP);

    let mut proxy = node.claim("proxy-a", &proxy_cg, None, proxy_port, &a.uid);
    assert!(
        wait_until(STEP, || proxy
            .stderr()
            .contains("the agent cannot register this pod now")),
        "{}",
        proxy.stderr()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the sidecar exited on a retryable refusal:\n{}",
        proxy.stderr()
    );
    assert!(
        proxy.stderr().contains("too_many_connections")
            || proxy.stderr().contains("registration connections open"),
        "{}",
        proxy.stderr()
    );

    holder.release();
    holder.success(STEP);
    assert!(
        wait_until(STEP, || pod_status(&node.status(), &a.uid)
            .is_some_and(|p| p["registrations"].as_u64() > Some(8))),
        "the sidecar never registered:\n{}",
        proxy.stderr()
    );
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
}

/// A connection passed on by the process that opened it is judged by that process, not by
/// whoever holds its pid later: once it exited and its pid went to a process in pod B,
/// requests on the connection are refused as coming from a process that is gone, and no
/// answer names pod B.
#[test]
fn requests_after_the_caller_exited_are_refused_even_when_its_pid_is_reused() {
    let Some((_serial, node)) = setup("pidreuse") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);

    // A process of pod A connects (one request, so the agent has accepted and pinned it),
    // hands the connection to its child and exits.
    let mut opener = agent_ask(
        &node,
        "opener",
        &a.container("app"),
        &strings(&[r#"--line={"op":"deregister"}"#, "--orphan"]),
    );
    let pid = opener.pid();
    opener.wait_for_stdout("HANDED", STEP);
    assert!(opener.wait(STEP).success(), "{}", opener.stderr());

    // Its pid now belongs to a process in pod B's sidecar container.
    let reused = spawn_with_pid(pid, &b.container("proxy"), &["/bin/sleep", "60"]);
    assert_eq!(reused, pid);
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&b.uid), "{cgroup}");

    let proxy_port = ports::take();
    let stdin = opener.child.stdin.as_mut().unwrap();
    writeln!(stdin, "{}", register_line(&b.uid, proxy_port, 0)).unwrap();
    writeln!(stdin, "{}", register_line(&a.uid, proxy_port, 0)).unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_until(STEP, || answers(&opener.stdout()).len() == 3),
        "{}",
        opener.stdout()
    );
    let out = opener.stdout();
    let got = answers(&out);
    for answer in &got[1..] {
        assert_eq!(answer["ok"], false, "{out}");
        assert_eq!(answer["reason"], "process_gone", "{out}");
    }
    assert!(
        got.iter().all(|g| !g["error"].to_string().contains(&b.uid)),
        "a refusal named the pod that holds the pid now: {out}"
    );
    let status = node.status();
    assert_eq!(
        status["pods"].as_array().map(Vec::len),
        Some(0),
        "{status:#}"
    );
    assert!(node.workloads().is_empty(), "{:?}", node.workloads());
    host::signal(reused, libc::SIGKILL);
    // SAFETY: our own child.
    unsafe { libc::waitpid(reused as libc::pid_t, std::ptr::null_mut(), 0) };
}

/// The listeners a register request names must come with it (`bad_listener`, nothing entered);
/// a request that names none, as an older sidecar's, is registered without the listener check
/// and says so on `--status`.
#[test]
fn listeners_named_but_not_passed_are_refused_and_none_is_unchecked() {
    let Some((_serial, node)) = setup("listeners") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy_port = ports::take();
    let named = serde_json::json!({
        "op": "register",
        "pod_uid": a.uid,
        "proxy_port": proxy_port,
        "listeners": 1,
    });
    let mut ask = agent_ask(
        &node,
        "register",
        &a.container("proxy"),
        &[
            format!("--line={named}"),
            format!("--line={}", register_line(&a.uid, proxy_port, 0)),
        ],
    );
    let out = ask.success(STEP);
    let got = answers(&out);
    assert_eq!(got.len(), 2, "{out}");
    assert_eq!(got[0]["reason"], "bad_listener", "{out}");
    assert!(
        got[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("says 1 listener(s) came with it, but 0")),
        "{out}"
    );
    assert_eq!(got[1]["ok"], true, "{out}");

    let status = node.status();
    assert_eq!(status["refusals"]["bad_listener"], 1, "{status:#}");
    let reg = pod_status(&status, &a.uid).expect("registered");
    assert_eq!(reg["listener_checked"], false, "{reg}");
    let entry = node.workloads()[&host_cgroup_id(&a.cgroup)];
    assert_eq!(
        entry.flags & sidecar_common::flags::CHECK_LISTENER,
        0,
        "{entry:?}"
    );
}

/// `status` lists every pod's UID, cgroup, pid and CIDRs: a root process in a pod's container
/// (a root container) is refused (`status_from_pod`, counted), without any pod's details,
/// while root on the node is answered, and so is the agent's own pod (where the DaemonSet's
/// exec probes run `sidecar agent --status`).
#[test]
fn status_is_answered_only_outside_the_pods() {
    let Some((_serial, node)) = setup("status") else {
        return;
    };
    let agent_pod = node.pod("c", NS_A, ADDR_A);
    let _agent = node.start_agent_in("agent", Some(&agent_pod.container("agent")), &[], &[]);
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let mut reg = agent_ask(
        &node,
        "register",
        &b.container("proxy"),
        &[format!(
            "--line={}",
            register_line(&b.uid, ports::take(), 1)
        )],
    );
    let out = reg.success(STEP);
    assert_eq!(answers(&out)[0]["ok"], true, "{out}");

    let mut ask = agent_ask(
        &node,
        "status",
        &a.container("app"),
        &[r#"--line={"op":"status"}"#.to_string()],
    );
    let out = ask.success(STEP);
    let got = answers(&out);
    assert_eq!(got.len(), 1, "{out}");
    assert_eq!(got[0]["reason"], "status_from_pod", "{out}");
    assert!(got[0].get("pods").is_none(), "{out}");
    assert!(
        !out.contains(&b.uid),
        "another pod's UID in the refusal: {out}"
    );

    let mut probe = agent_ask(
        &node,
        "probe",
        &agent_pod.container("agent"),
        &[r#"--line={"op":"status"}"#.to_string()],
    );
    let out = probe.success(STEP);
    let got = answers(&out);
    assert_eq!(got.len(), 1, "{out}");
    assert!(
        pod_status(&got[0]["status"], &b.uid).is_some(),
        "the agent's pod: {out}"
    );

    let status = node.status();
    assert!(pod_status(&status, &b.uid).is_some(), "{status:#}");
    assert_eq!(status["refusals"]["status_from_pod"], 1, "{status:#}");
}

// ---------------------------------------------------------------------------------------

/// `sidecar-testclient agent-ask` in `cgroup`: talks to the agent as a process of that pod.
fn agent_ask(node: &Node, name: &str, cgroup: &Path, args: &[String]) -> Proc {
    let mut argv = vec![testclient_bin().display().to_string()];
    argv.extend(strings(&["agent-ask", "--socket"]));
    argv.push(node.socket.display().to_string());
    argv.extend(args.iter().cloned());
    spawn(&node.scratch, name, Some(cgroup), None, &argv, &[])
}

/// A register request line for pod `uid` with `cidrs` exclusion CIDRs.
fn register_line(uid: &str, proxy_port: u16, cidrs: usize) -> String {
    let cidrs: Vec<String> = (0..cidrs)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        .collect();
    serde_json::json!({
        "op": "register",
        "pod_uid": uid,
        "proxy_port": proxy_port,
        "exclude_cidrs": cidrs,
    })
    .to_string()
}

/// The `answer`s an `agent-ask` printed, parsed.
fn answers(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| serde_json::from_str(l["answer"].as_str()?).ok())
        .collect()
}

/// Starts `argv` with pid `pid` in `cgroup` (clone3 with `set_tid` and `CLONE_INTO_CGROUP`):
/// a process of another pod that now holds a pid someone else connected with.
fn spawn_with_pid(pid: u32, cgroup: &Path, argv: &[&str]) -> u32 {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let dir = fs::File::open(cgroup).expect("cgroup directory");
    let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let tid = [libc::pid_t::try_from(pid).unwrap()];
    let clone = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        cgroup: std::os::fd::AsRawFd::as_raw_fd(&dir) as u64,
        ..CloneArgs::default()
    };
    // SAFETY: the child only calls execv (on memory prepared before) and _exit.
    let rc = unsafe {
        let rc = libc::syscall(
            libc::SYS_clone3,
            &raw const clone,
            std::mem::size_of::<CloneArgs>(),
        );
        if rc == 0 {
            libc::execv(ptrs[0], ptrs.as_ptr());
            libc::_exit(127);
        }
        rc
    };
    assert!(
        rc > 0,
        "clone3 with pid {pid}: {}",
        std::io::Error::last_os_error()
    );
    rc as u32
}
