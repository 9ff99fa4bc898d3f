//! Authorization policy against the real kernel and real sockets: outbound denies refused by
//! the connect hook (EPERM) exactly where the proxy's evaluation says so, dry-run and audit,
//! hot reload under streaming load, inbound identity rules after the mTLS handshake, and
//! strict inbound mode. Proxy ports 19100–19199; namespaces `scp-*`, addresses 10.204.0.0/16.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use sidecar_tests::{
    EchoServer, assert_no_leftovers,
    host::wait_until,
    netns::PodPair,
    protocol::{ConnectFailLine, EchoLine},
    require,
    run::{Finished, SidecarRun},
    scratch::Scratch,
    serial,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const EPERM: &str = "connect: Operation not permitted";

/// Whether `connect()` itself failed with EPERM (the connect hook refused it).
fn refused_by_kernel(line: &ConnectFailLine) -> bool {
    !line.connected && line.error.as_deref().is_some_and(|e| e.starts_with(EPERM))
}

/// The proxy's verdict for each outbound destination, from `sidecar policy check`.
fn proxy_refuses(scratch: &Scratch, policy: &Path, dsts: &[SocketAddr]) -> Vec<bool> {
    let mut args = vec![
        "policy".to_string(),
        "check".into(),
        policy.display().to_string(),
    ];
    for d in dsts {
        args.push(format!("--outbound={d}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = scratch.sidecar(&args);
    let verdicts: Vec<bool> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("policy check JSON line");
            v["refused"].as_bool().expect("refused is a bool")
        })
        .collect();
    assert_eq!(verdicts.len(), dsts.len(), "policy check output: {out}");
    verdicts
}

/// A shell command running `connect-fail` to each destination in turn.
fn connect_each(dsts: &[SocketAddr]) -> Vec<String> {
    let script: Vec<String> = dsts
        .iter()
        .map(|d| format!("{CLIENT} connect-fail --addr '{d}'"))
        .collect();
    vec!["sh".into(), "-c".into(), script.join("; ")]
}

fn wait_for_line(run: &SidecarRun, line: &str) {
    let seen = wait_until(STEP_TIMEOUT, || {
        run.stdout_lines().iter().any(|l| l.trim() == line)
    });
    assert!(
        seen,
        "no {line:?} from the workload within {STEP_TIMEOUT:?}; stdout {:#?}\nstderr:\n{}",
        run.stdout_lines(),
        run.stderr_text()
    );
}

fn wait_for_log(run: &SidecarRun, needle: &str) {
    wait_for_logs(run, needle, 1);
}

fn wait_for_logs(run: &SidecarRun, needle: &str, times: usize) {
    let seen = wait_until(STEP_TIMEOUT, || {
        run.stderr_text().matches(needle).count() >= times
    });
    assert!(
        seen,
        "the sidecar did not log {needle:?} within {STEP_TIMEOUT:?}; stderr:\n{}",
        run.stderr_text()
    );
}

/// For a set of destinations, the kernel's verdict (EPERM from `connect()` or not) is the
/// proxy's evaluation of the same policy; allowed destinations work end to end, refused ones
/// never reach the proxy.
#[test]
fn kernel_refuses_exactly_what_the_policy_denies() {
    if !sidecar_tests::privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-kernel");
    let open = EchoServer::start_v4();
    let closed = EchoServer::start_v4();
    let v6 = EchoServer::start_v6().ok();
    let (o, c) = (open.port(), closed.port());
    let mut policy = format!(
        r#"
[defaults]
outbound = "deny"

[[rule]]
name = "deny-closed"
action = "deny"
direction = "outbound"
destinations = ["127.0.0.0/8"]
ports = [{c}]

[[rule]]
name = "deny-range"
action = "deny"
destinations = ["127.0.0.2/32"]
ports = ["{o}-{}"]

[[rule]]
name = "loopback"
action = "allow"
destinations = ["127.0.0.0/8"]
"#,
        o.saturating_add(10)
    );
    if let Some(v6) = &v6 {
        policy.push_str(&format!(
            "\n[[rule]]\nname = \"v6\"\naction = \"allow\"\ndestinations = [\"::1/128\"]\nports = [{}]\n",
            v6.port()
        ));
    }
    let file = scratch.write("policy.toml", &policy);
    let mut dsts: Vec<SocketAddr> = vec![
        format!("127.0.0.1:{o}").parse().unwrap(),
        format!("127.0.0.1:{c}").parse().unwrap(),
        format!("127.0.0.2:{c}").parse().unwrap(),
        format!("127.0.0.2:{o}").parse().unwrap(),
        format!("127.0.0.2:{}", o.saturating_add(10))
            .parse()
            .unwrap(),
        format!("127.0.0.2:{}", o.saturating_add(11))
            .parse()
            .unwrap(),
        format!("127.0.0.3:{o}").parse().unwrap(),
    ];
    if let Some(v6) = &v6 {
        dsts.push(v6.addr());
        // Default deny: ::1 on any other port.
        dsts.push(format!("[::1]:{o}").parse().unwrap());
    }
    let expected = proxy_refuses(&scratch, &file, &dsts);
    assert!(
        expected.iter().any(|r| *r) && expected.iter().any(|r| !*r),
        "the destinations must include both verdicts: {expected:?}"
    );

    let mut run = SidecarRun::builder(19110)
        .arg("--policy")
        .arg(&file)
        .command(connect_each(&dsts))
        .start();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let lines: Vec<ConnectFailLine> = done.parse_stdout();
    assert_eq!(lines.len(), dsts.len(), "{lines:#?}");
    for ((dst, line), refuse) in dsts.iter().zip(&lines).zip(&expected) {
        let kernel_refused = refused_by_kernel(line);
        assert_eq!(
            kernel_refused, *refuse,
            "{dst}: kernel says {line:?}, the policy says refuse={refuse}"
        );
    }
    // The allowed destinations with a listener answered (a byte came back).
    for (dst, line) in dsts.iter().zip(&lines) {
        if *dst == open.addr() || v6.as_ref().is_some_and(|s| s.addr() == *dst) {
            assert!(line.connected && line.error.is_none(), "{dst}: {line:?}");
        }
    }
    let report = done.report();
    let refused = expected.iter().filter(|r| **r).count() as u64;
    assert_eq!(
        report.counters.0.get("connect_policy_denied").copied(),
        Some(refused),
        "kernel refusals counted"
    );
    for (dst, refuse) in dsts.iter().zip(&expected) {
        if *refuse {
            assert!(
                report.connections_to(*dst).is_empty(),
                "{dst} was refused in the kernel but reached the proxy"
            );
        }
    }
    let policy = report
        .policy
        .as_ref()
        .expect("a policy section in the report");
    assert_eq!(policy.generation, 1);
    assert_eq!(
        policy.count("loopback", "allow"),
        3,
        "proxy decisions: {policy:#?}"
    );
    assert_no_leftovers(done.pid);
}

/// Destinations excluded from interception (`--exclude-ports`, `--exclude-cidrs`) bypass the
/// proxy, not the policy: the kernel checks the policy first.
#[test]
fn deny_holds_for_destinations_that_bypass_the_proxy() {
    if !sidecar_tests::privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-exclude");
    let echo = EchoServer::start_v4();
    let p = echo.port();
    let file = scratch.write(
        "policy.toml",
        &format!(
            "[[rule]]\naction = \"deny\"\ndestinations = [\"127.0.0.2/32\", \"127.0.0.3/32\"]\n\
             ports = [{p}]\n"
        ),
    );
    let dsts: Vec<SocketAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|a| format!("{a}:{p}").parse().unwrap())
        .collect();
    let mut run = SidecarRun::builder(19115)
        .arg("--policy")
        .arg(&file)
        .arg("--exclude-ports")
        .arg(p.to_string())
        .arg("--exclude-cidrs")
        .arg("127.0.0.3/32")
        .command(connect_each(&dsts))
        .start();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let lines: Vec<ConnectFailLine> = done.parse_stdout();
    let refused: Vec<bool> = lines.iter().map(refused_by_kernel).collect();
    assert_eq!(refused, [false, true, true], "{lines:#?}");
    assert!(lines[0].connected && lines[0].error.is_none(), "{lines:#?}");
    let report = done.report();
    assert!(
        report.connections.is_empty(),
        "the excluded destination bypassed the proxy: {:#?}",
        report.connections
    );
    assert_eq!(report.counters.0.get("connect_policy_denied"), Some(&2));
    assert_no_leftovers(done.pid);
}

/// Dry run lets a denied connection through and logs it as `would deny`; an audit rule lets
/// it through and logs it; neither refuses anything in the kernel.
#[test]
fn dry_run_and_audit_let_through_and_log() {
    if !sidecar_tests::privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-dryrun");
    let echo = EchoServer::start_v4();
    let cases = [
        (
            format!(
                "dry_run = true\n[[rule]]\nname = \"block\"\naction = \"deny\"\nports = [{}]\n",
                echo.port()
            ),
            "would deny the connection (dry run)",
            ("block", "would_deny"),
            19111,
        ),
        (
            format!(
                "[[rule]]\nname = \"watch\"\naction = \"audit\"\nports = [{}]\n",
                echo.port()
            ),
            "policy audit",
            ("watch", "audit"),
            19112,
        ),
    ];
    for (text, log, (rule, outcome), port) in cases {
        let file = scratch.write("policy.toml", &text);
        let mut run = SidecarRun::builder(port)
            .arg("--policy")
            .arg(&file)
            .command([
                CLIENT,
                "echo",
                &format!("--addr={}", echo.addr()),
                "--count=2",
            ])
            .start();
        let done = run.finish(RUN_TIMEOUT);
        done.assert_exit_code(0);
        let lines: Vec<EchoLine> = done.parse_stdout();
        assert!(
            lines.len() == 2 && lines.iter().all(|l| l.ok),
            "{rule}: {lines:#?}"
        );
        let stderr = done.stderr_text();
        assert_eq!(
            stderr.matches(log).count(),
            2,
            "{rule}: every connection logged as {log:?}:\n{stderr}"
        );
        assert!(stderr.contains(&echo.addr().to_string()), "{stderr}");
        let report = done.report();
        assert_eq!(report.counters.0.get("connect_policy_denied"), Some(&0));
        assert_eq!(report.policy.as_ref().unwrap().count(rule, outcome), 2);
        assert_no_leftovers(done.pid);
    }
}

/// While two connections stream, the policy is replaced (allowed streams keep going, the new
/// rules apply to new connects in the kernel), then an invalid file is refused with its line
/// and the policy in force does not change, then a policy of no rules lifts every deny.
#[test]
fn reload_keeps_allowed_streams_and_refuses_invalid_files() {
    if !sidecar_tests::privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-reload");
    let (stream, b, c) = (
        EchoServer::start_v4(),
        EchoServer::start_v4(),
        EchoServer::start_v4(),
    );
    let rule = |port: u16| {
        format!("[[rule]]\nname = \"deny-{port}\"\naction = \"deny\"\nports = [{port}]\n")
    };
    let file = scratch.write("policy.toml", &rule(b.port()));
    let wait_for = |marker: &Path| {
        format!(
            "i=0; while [ ! -e '{}' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
            marker.display()
        )
    };
    let (go1, go2, go3, stream_out) = (
        scratch.path("go1"),
        scratch.path("go2"),
        scratch.path("go3"),
        scratch.path("stream.out"),
    );
    let fail = |s: &EchoServer| format!("{CLIENT} connect-fail --addr {}", s.addr());
    let script = [
        format!(
            "{CLIENT} pingpong --addr {} --count 2 --seconds 8 > '{}' &",
            stream.addr(),
            stream_out.display()
        ),
        fail(&b),
        "echo PHASE1".into(),
        wait_for(&go1),
        fail(&b),
        fail(&c),
        "echo PHASE2".into(),
        wait_for(&go2),
        fail(&b),
        fail(&c),
        "echo PHASE3".into(),
        wait_for(&go3),
        fail(&b),
        fail(&c),
        "wait".into(),
        format!("cat '{}'", stream_out.display()),
    ]
    .join("\n");
    let mut run = SidecarRun::builder(19113)
        .wrapped_in(["env", "SIDECAR_LOG=info"])
        .arg("--policy")
        .arg(&file)
        .command(["sh", "-c", &script])
        .start();
    wait_for_line(&run, "PHASE1");
    scratch.write("policy.toml", &rule(c.port()));
    wait_for_log(&run, "policy reloaded");
    std::fs::write(&go1, b"").unwrap();
    wait_for_line(&run, "PHASE2");
    scratch.write(
        "policy.toml",
        &format!(
            "{}\n[[rule]]\naction = \"deny\"\nports = [\"9-8\"]\n",
            rule(b.port())
        ),
    );
    wait_for_log(&run, "policy refused, keeping the current one");
    std::fs::write(&go2, b"").unwrap();
    // Back to the first kernel slot, with a policy of no rules: nothing of the first policy
    // (deny b) may linger there. (An empty file is refused: allow-all is said explicitly.)
    wait_for_line(&run, "PHASE3");
    scratch.write(
        "policy.toml",
        "# allow everything\n[defaults]\noutbound = \"allow\"\n",
    );
    wait_for_logs(&run, "policy reloaded", 2);
    std::fs::write(&go3, b"").unwrap();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);

    let fails: Vec<ConnectFailLine> = done.parse_stdout();
    let refused: Vec<bool> = fails.iter().map(refused_by_kernel).collect();
    assert_eq!(
        refused,
        [true, false, true, false, true, false, false],
        "b; b and c after the reload; b and c after the invalid file; b and c after the \
         rule-less policy: {fails:#?}"
    );
    for l in fails.iter().filter(|l| !refused_by_kernel(l)) {
        assert!(l.connected && l.error.is_none(), "allowed connect: {l:?}");
    }
    let streams: Vec<EchoLine> = done.parse_stdout();
    assert!(
        streams.len() == 2 && streams.iter().all(|l| l.ok && l.received > 0),
        "streams across both reloads: {streams:#?}"
    );
    let stderr = done.stderr_text();
    assert!(
        stderr.contains("line 8: port range \"9-8\" is empty"),
        "the refusal names the line and the problem:\n{stderr}"
    );
    let policy = done.report().policy.clone().expect("policy report");
    assert_eq!((policy.generation, policy.reload_errors), (3, 1));
    assert_no_leftovers(done.pid);
}

/// A bad policy at startup is a one-line error naming the line; nothing is attached.
#[test]
fn invalid_policy_at_startup_is_a_clean_error() {
    if !sidecar_tests::privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-startup");
    let file = scratch.write(
        "policy.toml",
        "[[rule]]\naction = \"deny\"\ndestinations = [\"10.0.0.0/40\"]\n",
    );
    let mut run = SidecarRun::builder(19114)
        .no_report()
        .arg("--policy")
        .arg(&file)
        .command(["true"])
        .start();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(1);
    let errors = done.error_lines();
    assert_eq!(errors.len(), 1, "{}", done.stderr_text());
    assert!(
        errors[0].contains("line 3") && errors[0].contains("prefix length"),
        "{}",
        errors[0]
    );
    assert_no_leftovers(done.pid);
}

// ---- two pods -------------------------------------------------------------------------

const TD: &str = "example.org";
const CLIENT_ID: &str = "spiffe://example.org/ns/demo/sa/client";
const INTRUDER_ID: &str = "spiffe://example.org/ns/demo/sa/intruder";
const AUDITED_ID: &str = "spiffe://example.org/ns/ops/sa/debug";
const SERVER_ID: &str = "spiffe://example.org/ns/demo/sa/server";
const APP_PORT: u16 = 8080;

/// A CA and workload certificates from `sidecar cert` (as in the mTLS tests).
fn mint(scratch: &Scratch, ids: &[(&str, &str)]) {
    scratch.ca("ca", TD);
    for (id, out) in ids {
        scratch.issue("ca", id, out, &[]);
    }
}

fn dir(scratch: &Scratch, name: &str) -> String {
    scratch.arg(name)
}

fn echo_from_a(pods: &PodPair, scratch: &Scratch, tls: &str, port: u16) -> Finished {
    let mut run = SidecarRun::builder(port)
        .meshed_client_of(pods, dir(scratch, tls))
        .command([
            CLIENT,
            "echo",
            &format!("--addr={}:{APP_PORT}", pods.b.addr),
        ])
        .start();
    run.finish(RUN_TIMEOUT)
}

/// Lines of the server app (`serve`) naming a peer: one per connection that reached it.
fn app_connections(done: &Finished) -> usize {
    done.stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("peer").is_some())
        .count()
}

/// The server's policy admits one identity; another identity of the same trust domain
/// completes the handshake, is refused by policy, and never reaches the app; a third, under
/// an audit rule, gets through and is logged.
#[test]
fn inbound_policy_refuses_an_identity_after_the_handshake() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-inbound");
    mint(
        &scratch,
        &[
            (CLIENT_ID, "client"),
            (INTRUDER_ID, "intruder"),
            (AUDITED_ID, "audited"),
            (SERVER_ID, "server"),
        ],
    );
    let file = scratch.write(
        "policy.toml",
        &format!(
            "[defaults]\ninbound = \"deny\"\n\n[[rule]]\nname = \"clients\"\naction = \"allow\"\n\
             direction = \"inbound\"\nsources = [\"{CLIENT_ID}\"]\nports = [{APP_PORT}]\n\n\
             [[rule]]\nname = \"ops\"\naction = \"audit\"\ndirection = \"inbound\"\n\
             sources = [\"spiffe://example.org/ns/ops/*\"]\n"
        ),
    );
    let pods = PodPair::create_in("scp", 204, 1);
    let mut server = SidecarRun::builder(19120)
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(dir(&scratch, "server"))
        .arg("--policy")
        .arg(&file)
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(READY_TIMEOUT);

    let allowed = echo_from_a(&pods, &scratch, "client", 19121);
    allowed.assert_exit_code(0);
    let lines: Vec<EchoLine> = allowed.parse_stdout();
    assert!(lines.len() == 1 && lines[0].ok, "allowed: {lines:#?}");

    let denied = echo_from_a(&pods, &scratch, "intruder", 19122);
    let lines: Vec<EchoLine> = denied.parse_stdout();
    assert!(
        lines.len() == 1 && !lines[0].ok && lines[0].received == 0,
        "the intruder must get nothing back: {lines:#?}"
    );
    // The intruder's sidecar did complete the handshake: it verified the server.
    let conn = &denied.report().connections[0];
    assert_eq!(conn.peer_identity(), Some(SERVER_ID), "{conn:?}");

    let audited = echo_from_a(&pods, &scratch, "audited", 19123);
    audited.assert_exit_code(0);
    let lines: Vec<EchoLine> = audited.parse_stdout();
    assert!(lines.len() == 1 && lines[0].ok, "audited: {lines:#?}");

    server.release();
    let done = server.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let report = done.report();
    assert_eq!(
        report.inbound_rejections.get("policy_denied"),
        Some(&1),
        "{:?}",
        report.inbound_rejections
    );
    let policy = report.policy.as_ref().expect("policy report");
    assert_eq!(policy.count("clients", "allow"), 1, "{policy:#?}");
    assert_eq!(policy.count("default-inbound", "deny"), 1, "{policy:#?}");
    assert_eq!(policy.count("ops", "audit"), 1, "{policy:#?}");
    assert_eq!(
        app_connections(&done),
        2,
        "the allowed and the audited client reached the app, the intruder did not"
    );
    let stderr = done.stderr_text();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("policy denied the connection") && l.contains(INTRUDER_ID)),
        "the denial is logged with the identity:\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("policy audit") && l.contains(AUDITED_ID)),
        "the audit is logged with the identity:\n{stderr}"
    );
    assert_no_leftovers(done.pid);
    assert_no_leftovers(allowed.pid);
    assert_no_leftovers(denied.pid);
    assert_no_leftovers(audited.pid);
}

/// A process started in a network namespace, killed on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect_fail_from_a(pods: &PodPair, addr: SocketAddr) -> ConnectFailLine {
    let out = pods
        .a
        .run(&[CLIENT, "connect-fail", "--addr", &addr.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("connect-fail output {text:?}: {e}"))
}

/// Strict inbound: a plaintext connect from the other pod to the app's port gets nowhere,
/// the same pod's server outside the run is untouched, and the tunnel still works.
#[test]
fn strict_inbound_refuses_plaintext_but_not_tunnels_or_other_processes() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-strict");
    mint(&scratch, &[(CLIENT_ID, "client"), (SERVER_ID, "server")]);
    let pods = PodPair::create_in("scp", 204, 2);
    let mut server = SidecarRun::builder(19130)
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(dir(&scratch, "server"))
        .arg("--inbound-mode")
        .arg("strict")
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(READY_TIMEOUT);
    // Another process in pod B, outside the run.
    let enter = pods.b.enter();
    let outside_port = APP_PORT + 1;
    let _outside = Background(
        Command::new(&enter[0])
            .args(&enter[1..])
            .args([
                CLIENT,
                "serve",
                "--addr",
                &format!("0.0.0.0:{outside_port}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting a server outside the run"),
    );
    let outside: SocketAddr = (pods.b.addr, outside_port).into();
    assert!(
        wait_until(READY_TIMEOUT, || {
            connect_fail_from_a(&pods, outside).error.is_none()
        }),
        "the server outside the run must answer plaintext from pod A"
    );

    let plain = connect_fail_from_a(&pods, (pods.b.addr, APP_PORT).into());
    assert!(
        !plain.connected && plain.error.is_some(),
        "plaintext to the app in strict mode must not connect: {plain:?}"
    );

    let tunnelled = echo_from_a(&pods, &scratch, "client", 19131);
    tunnelled.assert_exit_code(0);
    let lines: Vec<EchoLine> = tunnelled.parse_stdout();
    assert!(
        lines.len() == 1 && lines[0].ok,
        "through the tunnel: {lines:#?}"
    );

    server.release();
    let done = server.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let dropped = done
        .report()
        .counters
        .0
        .get("strict_inbound_dropped")
        .copied()
        .unwrap_or(0);
    assert!(
        dropped >= 1,
        "the kernel counted the dropped SYNs: {dropped}"
    );
    assert_eq!(app_connections(&done), 1, "only the tunnel reached the app");
    assert_no_leftovers(done.pid);
    assert_no_leftovers(tunnelled.pid);
}

/// Strict mode without a tunnel listener would lock the workload out: refused up front.
#[test]
fn strict_inbound_without_tls_is_refused() {
    if !sidecar_tests::privileged() {
        return;
    }
    let _serial = serial();
    let mut run = SidecarRun::builder(19132)
        .no_report()
        .arg("--inbound-mode")
        .arg("strict")
        .command(["true"])
        .start();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(1);
    let errors = done.error_lines();
    assert!(
        errors.len() == 1 && errors[0].contains("--tls-dir"),
        "{}",
        done.stderr_text()
    );
    assert_no_leftovers(done.pid);
}
