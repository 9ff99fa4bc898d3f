//! What the sidecar refuses, against the real kernel and real sockets: outbound policy denies
//! refused by the connect hook (EPERM) exactly where the proxy's evaluation says so, also
//! for destinations that bypass the proxy and in pass-through mode; dry-run and audit; hot
//! reload under streaming load, and a corrupted or deleted policy file refused until a valid
//! one returns; the cloud metadata address, refused unless allowed; inbound identity rules
//! after the mTLS handshake, and strict inbound mode.
//!
//! Ports come from `sidecar_tests::ports` (the app port inside the pods' namespaces is
//! fixed); namespaces `scp-*`, addresses 10.204.0.0/16, and `scrl-*`, 10.205.x.x, for the
//! metadata test.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use sidecar_tests::{
    EchoServer, assert_no_leftovers, host,
    host::wait_until,
    netns::PodPair,
    ports, privileged,
    protocol::{ConnectFailLine, EchoLine},
    require,
    run::{Finished, SidecarRun},
    scratch::Scratch,
    script::{arg, wait_for_file},
    serial,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
/// One plain-text echo exchange per address (`local=… peer=…`, then `ok`), as a script step.
const EXCHANGE: &str = concat!(env!("CARGO_BIN_EXE_sidecar-testclient"), " exchange");
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

/// Waits (bounded) until the run's stderr contains `needle`.
fn wait_stderr(run: &SidecarRun, needle: &str, timeout: Duration) -> bool {
    wait_until(timeout, || run.stderr_text().contains(needle))
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

    let mut run = SidecarRun::builder(ports::take())
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
    let mut run = SidecarRun::builder(ports::take())
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
            ports::take(),
        ),
        (
            format!(
                "[[rule]]\nname = \"watch\"\naction = \"audit\"\nports = [{}]\n",
                echo.port()
            ),
            "policy audit",
            ("watch", "audit"),
            ports::take(),
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
    let mut run = SidecarRun::builder(ports::take())
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

/// The policy file is overwritten with garbage, then deleted, while the run enforces it: each
/// change is refused (logged, counted in the report's `reload_errors`), and the old policy
/// stays in force in the kernel (the denied connect still fails with EPERM). A valid file
/// then replaces it and is put in force (the connect goes through).
#[test]
fn corrupted_policy_keeps_the_old_one_until_a_valid_file_returns() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    let scratch = Scratch::new("scrl-policy-corrupt");
    let policy = scratch.write(
        "policy.toml",
        &format!(
            "[[rule]]\nname = \"no-echo\"\naction = \"deny\"\ndirection = \"outbound\"\n\
             ports = [{}]\n",
            server.port()
        ),
    );
    let (go1, go2) = (scratch.path("go1"), scratch.path("go2"));
    let try_connect = format!("{CLIENT} connect-fail {}", arg("--addr", server.addr()));
    let script = format!(
        "{try_connect}; {}; {try_connect}; {}; {try_connect}",
        wait_for_file(&go1),
        wait_for_file(&go2)
    );
    let mut run = SidecarRun::builder(ports::take())
        .env("SIDECAR_LOG", "info")
        .arg("--admin-addr=off")
        .arg("--policy")
        .arg(&policy)
        .command(["sh", "-c", &script])
        .start();
    let results = |n: usize| {
        let mut lines = Vec::new();
        host::wait_until(Duration::from_secs(20), || {
            lines = sidecar_tests::protocol::parse_lines::<ConnectFailLine>(&run.stdout_lines());
            lines.len() >= n
        });
        assert!(lines.len() >= n, "{lines:?}\n{}", run.stderr_text());
        lines
    };
    let eperm = |l: &ConnectFailLine| {
        l.error
            .as_deref()
            .is_some_and(|e| e.contains("Operation not permitted"))
    };
    assert!(eperm(&results(1)[0]), "{:?}", results(1));

    // Garbage (not UTF-8, half a rule), then no file at all: both refused.
    fs::write(&policy, b"[[rule]\nname = \xff\xfe\naction = ").unwrap();
    assert!(
        wait_stderr(
            &run,
            "policy refused, keeping the current one",
            Duration::from_secs(5)
        ),
        "{}",
        run.stderr_text()
    );
    fs::remove_file(&policy).unwrap();
    assert!(
        host::wait_until(Duration::from_secs(5), || {
            run.stderr_text()
                .matches("policy refused, keeping the current one")
                .count()
                >= 2
        }),
        "{}",
        run.stderr_text()
    );
    fs::write(&go1, b"").unwrap();
    let second = &results(2)[1];
    assert!(
        eperm(second),
        "the old policy should still deny: {second:?}"
    );

    // A valid file (no rules: everything allowed) is put in force.
    scratch.write("policy.toml", "[defaults]\noutbound = \"allow\"\n");
    assert!(
        wait_stderr(&run, "policy reloaded", Duration::from_secs(5)),
        "{}",
        run.stderr_text()
    );
    fs::write(&go2, b"").unwrap();
    let third = &results(3)[2];
    assert_eq!(third.error, None, "the new policy allows it: {third:?}");
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let report = done.report().policy.clone().expect("a policy report");
    assert_eq!(report.reload_errors, 2, "{report:?}");
    assert!(
        done.stderr_text().contains("2 reload(s) refused"),
        "the exit summary counts the refused reloads:\n{}",
        done.stderr_text()
    );
    assert_eq!(report.generation, 2, "{report:?}");
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
    let mut run = SidecarRun::builder(ports::take())
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

// ---- the metadata address -------------------------------------------------------------

/// The cloud metadata address is refused by default, in the kernel: the connect hooks fail
/// the app's `connect()` with EPERM (counted as `connect_metadata_denied`) for both
/// 169.254.169.254 and fd00:ec2::254, before the proxy sees anything. The sidecar and its app
/// run in a network namespace with no route out (a veth to a second empty namespace, nothing
/// else), so nothing could leave even if the check failed: with `--allow-metadata` the same
/// IPv4 connect gets as far as the proxy's upstream connect, which fails for lack of a route —
/// proving it is the guard, not the network, that refuses by default. (The proxy keeps its own
/// check too, for `--mode iptables`.)
#[test]
fn cloud_metadata_address_is_refused_unless_allowed() {
    if !privileged() || host::which("nsenter").is_none() && !sidecar_tests::skip("no nsenter") {
        return;
    }
    let _serial = serial();
    let pods = sidecar_tests::netns::PodPair::create_in("scrl", 205, 2);
    let metadata = SocketAddr::from((Ipv4Addr::new(169, 254, 169, 254), 80));
    let metadata6: SocketAddr = "[fd00:ec2::254]:80".parse().unwrap();
    let run = |port: u16, allow: bool, targets: &[SocketAddr]| {
        let mut builder = SidecarRun::builder(port)
            .wrapped_in(pods.a.enter())
            .arg("--admin-addr=off");
        if allow {
            builder = builder.arg("--allow-metadata");
        }
        let script = targets
            .iter()
            .map(|t| format!("{CLIENT} connect-fail {}", arg("--addr", t)))
            .collect::<Vec<_>>()
            .join("; ");
        let mut run = builder.command(["sh", "-c", &script]).start();
        let done = run.finish(Duration::from_secs(30));
        done.assert_exit_code(0);
        let lines: Vec<ConnectFailLine> = done.parse_stdout();
        assert_eq!(
            lines.len(),
            targets.len(),
            "one connect-fail result per target: {lines:?}\n{}",
            done.stderr_text()
        );
        for line in &lines {
            assert!(
                line.error.is_some(),
                "the metadata address answered: {line:?}"
            );
            assert!(line.elapsed_ms < 2000, "failing took too long: {line:?}");
        }
        (lines, done)
    };

    let (lines, done) = run(ports::take(), false, &[metadata, metadata6]);
    for line in &lines {
        let error = line.error.as_deref().unwrap_or_default();
        assert!(
            !line.connected && error.contains("Operation not permitted"),
            "connect() should fail with EPERM in the kernel: {line:?}"
        );
    }
    assert!(
        done.report().connections.is_empty(),
        "the proxy should not even see the connects: {:#?}",
        done.report().connections
    );
    assert_eq!(
        done.report()
            .counter(sidecar_common::Counter::ConnectMetadataDenied),
        2,
        "{:?}",
        done.report().counters
    );
    assert_no_leftovers(done.pid);

    let (lines, done) = run(ports::take(), true, &[metadata]);
    let conn = done.report().single_connection_to(metadata);
    assert_eq!(
        conn.outcome, "upstream_connect_failed",
        "with --allow-metadata the proxy tries (and, with no route out, fails): {conn:#?}\n{lines:?}"
    );
    assert_eq!(
        done.report()
            .counter(sidecar_common::Counter::ConnectMetadataDenied),
        0
    );
    assert_no_leftovers(done.pid);
}

/// In pass-through mode too, the connect hooks refuse a policy deny and the metadata address
/// with EPERM (counted), and a connect the destination refuses is recorded with its outcome.
#[test]
fn denies_still_refuse_connect_and_failed_connects_are_recorded() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("passthrough-deny");
    let open = EchoServer::start_v4();
    let denied = EchoServer::start_v4();
    // A port nothing listens on: the connect is refused by the destination itself.
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let policy = scratch.write(
        "policy.toml",
        &format!(
            "[[rule]]\nname = \"no-denied\"\naction = \"deny\"\ndirection = \"outbound\"\n\
             destinations = [\"127.0.0.0/8\"]\nports = [{}]\n",
            denied.port()
        ),
    );
    let script = format!(
        "{EXCHANGE} {open}; {EXCHANGE} {denied}; {EXCHANGE} 169.254.169.254:80; {EXCHANGE} {closed}; exit 0",
        open = open.addr(),
        denied = denied.addr(),
    );
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .arg("--policy")
        .arg(&policy)
        .command(["sh", "-c", &script])
        .start();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let out = done.stdout.join("\n");
    // `exchange` prints its error to stderr; the sidecar passes the command's stderr on.
    let err = done.stderr_text();
    for refused in [denied.addr().to_string(), "169.254.169.254:80".into()] {
        assert!(
            err.lines()
                .any(|l| l.contains(&refused) && l.contains("Operation not permitted")),
            "{refused} was not refused with EPERM at connect:\n{err}"
        );
    }
    assert!(denied.peers().is_empty(), "the denied server was reached");
    assert_eq!(open.peers().len(), 1, "{out}");

    let report = done.report();
    assert_eq!(report.counters.0["connect_policy_denied"], 1);
    assert_eq!(report.counters.0["connect_metadata_denied"], 1);
    assert_eq!(
        report.counters.0["connect_passthrough"], 2,
        "open and closed"
    );
    let by_dst = |dst: SocketAddr| {
        report
            .connections
            .iter()
            .find(|c| c.original_dst == Some(dst))
            .unwrap_or_else(|| panic!("no record for {dst}: {:#?}", report.connections))
    };
    let ok = by_dst(open.addr());
    assert_eq!(
        (ok.path.as_str(), ok.outcome.as_str()),
        ("passthrough", "ok")
    );
    let refused = by_dst(closed);
    assert_eq!(
        (refused.path.as_str(), refused.outcome.as_str()),
        ("passthrough", "upstream_connect_failed")
    );
    assert_eq!(report.connections.len(), 2, "{:#?}", report.connections);
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
    let mut server = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(dir(&scratch, "server"))
        .arg("--policy")
        .arg(&file)
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(READY_TIMEOUT);

    let allowed = echo_from_a(&pods, &scratch, "client", ports::take());
    allowed.assert_exit_code(0);
    let lines: Vec<EchoLine> = allowed.parse_stdout();
    assert!(lines.len() == 1 && lines[0].ok, "allowed: {lines:#?}");

    let denied = echo_from_a(&pods, &scratch, "intruder", ports::take());
    let lines: Vec<EchoLine> = denied.parse_stdout();
    assert!(
        lines.len() == 1 && !lines[0].ok && lines[0].received == 0,
        "the intruder must get nothing back: {lines:#?}"
    );
    // The intruder's sidecar did complete the handshake: it verified the server.
    let conn = &denied.report().connections[0];
    assert_eq!(conn.peer_identity(), Some(SERVER_ID), "{conn:?}");

    let audited = echo_from_a(&pods, &scratch, "audited", ports::take());
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
    let mut server = SidecarRun::builder(ports::take())
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

    let tunnelled = echo_from_a(&pods, &scratch, "client", ports::take());
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
    let mut run = SidecarRun::builder(ports::take())
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

/// Every entry of a policy trie (`POLICY_OUT` or `POLICY_PROXIED`) of run `pid`, removed: what
/// a connect hook sees when it looks into a slot a reload is emptying or filling.
fn empty_policy_trie(pid: u32, name: &str) -> usize {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    use sidecar_common::{PortBitmap, ScopedAddr};
    let mut trie: LpmTrie<aya::maps::MapData, ScopedAddr, PortBitmap> =
        sidecar_tests::bpf::pinned_map(pid, name)
            .expect("the run's policy trie")
            .try_into()
            .expect("an LPM trie");
    let keys: Vec<Key<ScopedAddr>> = trie
        .keys()
        .take(10_000)
        .collect::<Result<_, _>>()
        .expect("reading the trie's keys");
    for key in &keys {
        trie.remove(key).expect("removing a trie entry");
    }
    keys.len()
}

/// A connect hook that finds no entry in the live policy slot (a reload emptying or filling
/// it under the hook) sends the connection to the proxy, which holds the policy in force and
/// refuses it; it never lets it pass through. The test empties the tries through the run's
/// pins, which is what a hook sees in that window, then connects to a denied destination
/// that would answer if reached.
#[test]
fn a_connect_that_finds_the_policy_slot_empty_goes_to_the_proxy_not_through() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-empty-slot");
    let echo = EchoServer::start_v4();
    let denied: SocketAddr = ([127, 0, 0, 1], echo.port()).into();
    let file = scratch.write(
        "policy.toml",
        &format!(
            "[[rule]]\naction = \"deny\"\ndestinations = [\"127.0.0.1/32\"]\nports = [{}]\n",
            echo.port()
        ),
    );
    let go = scratch.path("go");
    let script = format!(
        "echo READY; {}; {CLIENT} connect-fail --addr '{denied}'",
        wait_for_file(&go)
    );
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .arg("--policy")
        .arg(&file)
        .command(["sh", "-c", &script])
        .start();
    wait_for_line(&run, "READY");
    let removed = empty_policy_trie(run.pid(), sidecar_common::maps::POLICY_OUT);
    assert!(
        removed >= 2,
        "the policy's entries were in the trie ({removed})"
    );
    fs::write(&go, "").expect("letting the script go");
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);

    let lines: Vec<ConnectFailLine> = done.parse_stdout();
    assert_eq!(lines.len(), 1, "{:?}", done.stdout);
    assert!(
        lines[0].error.is_some(),
        "the denied destination answered: {lines:?}"
    );
    assert!(
        echo.peers().is_empty(),
        "reached the echo server: {:?}",
        echo.peers()
    );
    let conns = &done.report().connections;
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(conns[0].path, "proxy", "{:?}", conns[0]);
    assert_eq!(conns[0].original_dst, Some(denied), "{:?}", conns[0]);
    assert_eq!(
        done.report()
            .counters
            .get(sidecar_common::Counter::ConnectPolicyDenied),
        0
    );
    assert_no_leftovers(done.pid);
}

/// Entries of a policy trie of run `pid` (every slot).
fn policy_trie_len(pid: u32, name: &str) -> usize {
    use aya::maps::lpm_trie::LpmTrie;
    use sidecar_common::{PortBitmap, ScopedAddr};
    let trie: LpmTrie<aya::maps::MapData, ScopedAddr, PortBitmap> =
        sidecar_tests::bpf::pinned_map(pid, name)
            .expect("the run's policy trie")
            .try_into()
            .expect("an LPM trie");
    trie.keys().take(10_000).filter(Result::is_ok).count()
}

/// Reloads never open a window: the command connects to a denied destination in a loop
/// while the test reloads the policy (two files that both deny it) again and again, and
/// every connect fails with EPERM at `connect()`; none reaches the server. After each reload
/// both slots hold a policy: the one that was live before is emptied only by the next
/// install, so a hook that read the old slot number just before the switch still finds the
/// old policy there (a slot emptied right after the switch was such a window).
#[test]
fn reloading_in_a_loop_never_lets_a_denied_connect_through() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("policy-reload-loop");
    let echo = EchoServer::start_v4();
    let denied: SocketAddr = ([127, 0, 0, 1], echo.port()).into();
    let rule = |name: &str| {
        format!(
            "[[rule]]\nname = \"{name}\"\naction = \"deny\"\ndestinations = [\"127.0.0.1/32\"]\nports = [{}]\n",
            echo.port()
        )
    };
    let file = scratch.write("policy.toml", &rule("deny-a"));
    // Bounded: the loop stops at the stop file, or after this many connects.
    const MAX_CONNECTS: usize = 5_000;
    const RELOADS: usize = 6;
    let stop = scratch.path("stop");
    let script = format!(
        "echo READY; i=0; while [ ! -e '{}' ] && [ $i -lt {MAX_CONNECTS} ]; do \
         {CLIENT} connect-fail --addr '{denied}'; i=$((i + 1)); done",
        stop.display()
    );
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .wrapped_in(["env", "SIDECAR_LOG=info"])
        .arg("--policy")
        .arg(&file)
        .command(["sh", "-c", &script])
        .start();
    wait_for_line(&run, "READY");
    let one_slot = policy_trie_len(run.pid(), sidecar_common::maps::POLICY_OUT);
    assert!(one_slot > 0, "the policy is in the trie");
    for reload in 1..=RELOADS {
        let name = if reload % 2 == 0 { "deny-a" } else { "deny-b" };
        scratch.write("policy.toml", &rule(name));
        wait_for_logs(&run, "policy reloaded", reload);
        let held = policy_trie_len(run.pid(), sidecar_common::maps::POLICY_OUT);
        assert_eq!(
            held,
            2 * one_slot,
            "after reload {reload}: the slot that was live before must stay filled until the \
             next install"
        );
    }
    fs::write(&stop, "").expect("stopping the loop");
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let lines: Vec<ConnectFailLine> = done.parse_stdout();
    assert!(
        lines.len() >= RELOADS,
        "only {} connects across {RELOADS} reloads",
        lines.len()
    );
    let through: Vec<&ConnectFailLine> = lines.iter().filter(|l| !refused_by_kernel(l)).collect();
    assert!(
        through.is_empty(),
        "{} of {} connects were not refused at connect() across {RELOADS} reloads: {through:?}",
        through.len(),
        lines.len()
    );
    assert!(
        echo.peers().is_empty(),
        "reached the denied server: {:?}",
        echo.peers()
    );
    eprintln!("{} connects refused across {RELOADS} reloads", lines.len());
    assert_no_leftovers(done.pid);
}

// ---- raw sockets -------------------------------------------------------------------------

/// A raw socket sends without `connect()`, so no connect hook sees it: `sidecar run` takes
/// CAP_NET_RAW from its command (bounding set included, so not even an exec of a setuid
/// binary gets it back), and leaves it only with `--keep-net-raw`. The command runs as root
/// in both runs, so only the sidecar's drop can make the socket fail.
#[test]
fn the_command_cannot_open_raw_sockets_unless_allowed() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    // Shell builtins only (the kernel matrix's guests have no grep): the shell's own
    // capabilities are the command's.
    let script = format!(
        "{CLIENT} raw-socket; while read -r key value; do case $key in CapEff:|CapBnd:) \
         echo \"$key $value\";; esac; done < /proc/self/status"
    );
    let run = |keep: bool| {
        let mut builder = SidecarRun::builder(ports::take()).arg("--admin-addr=off");
        if keep {
            builder = builder.arg("--keep-net-raw");
        }
        let mut run = builder.command(["sh", "-c", &script]).start();
        let done = run.finish(RUN_TIMEOUT);
        done.assert_exit_code(0);
        let lines = done.stdout.clone();
        let cap = |name: &str| -> u64 {
            let line = lines
                .iter()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} line: {lines:?}"));
            u64::from_str_radix(line.trim(), 16).unwrap()
        };
        let net_raw = 1u64 << 13;
        let has = (cap("CapEff:") & net_raw != 0, cap("CapBnd:") & net_raw != 0);
        assert_no_leftovers(done.pid);
        (lines[0].clone(), has)
    };
    let (socket, (effective, bounding)) = run(false);
    assert_eq!(
        socket, "raw socket: Operation not permitted (os error 1)",
        "the command opened a raw socket"
    );
    assert!(!effective && !bounding, "CAP_NET_RAW left to the command");
    let (socket, (effective, bounding)) = run(true);
    assert_eq!(socket, "raw socket: ok", "--keep-net-raw");
    assert!(effective && bounding, "--keep-net-raw kept CAP_NET_RAW");
}
