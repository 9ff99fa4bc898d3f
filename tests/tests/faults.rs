//! Faults around a running `sidecar run`: a killed run's state found and removed by the next
//! start, certificates deleted and restored, bpffs unmounted under a live run, and what each
//! direction does while the proxy is down (fail-open or fail-closed). (A corrupted policy
//! file is in policy.rs, with the other reloads.)
//!
//! Every test starts with `privileged()` (skips locally, fails in CI, when it cannot run) and
//! holds `serial()`. Traffic stays on 127.0.0.0/8 or inside network namespaces the test
//! created (prefix `scrl-`, addresses 10.206.x.x, no route out). Ports come from
//! `sidecar_tests::ports`. Every loop is bounded in count and time, every wait has a
//! timeout.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use sidecar_tests::{
    EchoServer, SidecarRun, assert_no_leftovers, host, leftover_files,
    netns::Netns,
    ports, privileged,
    protocol::{ConnectFailLine, EchoLine},
    require,
    scratch::Scratch,
    script::{arg, wait_for_file},
    serial,
};

/// The workload binary, built by cargo for this test target.
const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");

/// Waits (bounded) until the run's stderr contains `needle`.
fn wait_stderr(run: &SidecarRun, needle: &str, timeout: Duration) -> bool {
    host::wait_until(timeout, || run.stderr_text().contains(needle))
}

// ---------------------------------------------------------------------------------------
// A killed run's state, found by the next start

/// `sidecar run` A is SIGKILLed: its links stay attached through their pins (its app is
/// fail-closed), its cgroups, pins and state file remain.
/// - While A's command still runs, starting run B leaves A alone (its workload stays
///   fail-closed until an operator runs `sidecar cleanup`) and says so in one log line.
/// - Once A's command is gone, starting run C — no `sidecar cleanup` — removes all of A's
///   state with a log line naming A, and A's programs are unloaded.
///
/// It runs in a private mount namespace with no bpffs mounted, as on a fresh machine: A
/// mounts one, C's clean-up of A must not unmount it under C, and C, the last user, unmounts
/// it on exit.
#[test]
fn next_start_cleans_up_after_a_killed_run() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    if !host::private_mounts_without_bpffs() {
        return;
    }
    let mut a = SidecarRun::builder(ports::take())
        .arg("--admin-addr=off")
        .command(["sleep", "120"])
        .start();
    let a_pid = a.pid();
    assert!(
        host::wait_until(Duration::from_secs(20), || !a.app_pids().is_empty()),
        "run A's command did not start:\n{}",
        a.stderr_text()
    );
    let app = a.app_pids();
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(10))
        .expect("a SIGKILLed sidecar exits");
    let left = leftover_files(a_pid);
    assert_eq!(
        left.len(),
        3,
        "a killed run leaves its pins, cgroup and state file: {left:?}"
    );
    let start = |port: u16| {
        let mut run = SidecarRun::builder(port)
            .arg("--admin-addr=off")
            .command(["true"])
            .start();
        let done = run.finish(Duration::from_secs(30));
        done.assert_exit_code(0);
        assert_no_leftovers(done.pid);
        done
    };

    // A's command still runs: B leaves A's state (and so its fail-closed links) alone.
    let b = start(ports::take());
    assert!(
        b.stderr
            .iter()
            .any(|l| l.contains("killed while its command still runs")
                && l.contains(&format!("pid={a_pid}"))),
        "run B should report A as left alone:\n{}",
        b.stderr_text()
    );
    assert_eq!(
        leftover_files(a_pid).len(),
        3,
        "B must not touch A while A's app runs"
    );

    // A's command ends: C cleans up after A.
    for p in &app {
        host::kill_if_still(*p, "sleep");
    }
    assert!(host::wait_until(Duration::from_secs(5), || app
        .iter()
        .all(|p| !host::is_alive(*p))));
    let c = start(ports::take());
    let log = c.stderr_text();
    let line = c
        .stderr
        .iter()
        .find(|l| l.contains("cleaned up after a run that was killed"))
        .unwrap_or_else(|| panic!("run C logged no clean-up of run A:\n{log}"));
    assert!(line.contains(&format!("pid={a_pid}")), "{line}");
    assert!(
        leftover_files(a_pid).is_empty(),
        "run C's start left run A's state: {:?}",
        leftover_files(a_pid)
    );
    // A's programs go with its pins (links unpinned → detached; maps unpinned → freed).
    assert_no_leftovers(a_pid);
    drop(a);
    assert!(
        !host::bpffs_mounted(),
        "the host had no bpffs: the last run must unmount the one the sidecar mounted"
    );
}

// ---------------------------------------------------------------------------------------
// Helpers for runs inside network namespaces

/// `GET path` against an HTTP server at `addr` inside network namespace `ns` (the admin
/// endpoint of a sidecar in a pod). Returns (status, body).
fn get_in_netns(ns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    let raw = ns.http_get(addr, path);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The value of an unlabelled metric in a Prometheus text body.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

const APP_PORT: u16 = 8080;
const TD: &str = "example.org";
const CLIENT_ID: &str = "spiffe://example.org/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://example.org/ns/demo/sa/server";
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// One 64-byte echo from pod A through a client sidecar meshing pod B; returns the finished
/// client run (its stdout has the echo line, its report the connection).
fn probe_through_tunnel(
    pods: &sidecar_tests::netns::PodPair,
    tls_dir: &str,
    port: u16,
) -> sidecar_tests::Finished {
    let mut run = SidecarRun::builder(port)
        .meshed_client_of(pods, tls_dir)
        .arg("--admin-addr=off")
        .command([
            CLIENT.to_string(),
            "echo".into(),
            arg("--addr", SocketAddr::new(pods.b.addr, APP_PORT)),
            "--size=64".into(),
        ])
        .start();
    run.finish(RUN_TIMEOUT)
}

/// Asserts a probe's single connection was an ok mTLS tunnel to `peer`.
fn assert_tunnelled(done: &sidecar_tests::Finished, peer: &str) {
    let lines: Vec<EchoLine> = done.parse_stdout();
    assert!(
        lines.len() == 1 && lines[0].ok,
        "the echo through the tunnel failed: {lines:?}\n{}",
        done.stderr_text()
    );
    let conns = &done.report().connections;
    assert!(
        conns.len() == 1
            && conns[0].mtls()
            && conns[0].outcome == "ok"
            && conns[0].peer_identity() == Some(peer),
        "{conns:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// Certificates deleted while running

/// The server sidecar's certificate files are deleted while it runs: it keeps serving
/// tunnels with the last good credentials, logs the problem once, and says so in
/// `/metrics` (`certificates_stale` 1, `certificate_reload_errors_total`) and `/readyz`
/// (still ready: the credentials in force are valid). When the files come back it loads
/// them, logs the recovery, and the gauge drops to 0.
#[test]
fn deleted_certificates_keep_the_last_good_set_and_recover() {
    if !privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("scrl-certs-gone");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = sidecar_tests::netns::PodPair::create_in("scrl", 206, 1);
    let admin = SocketAddr::from(([127, 0, 0, 1], ports::take()));
    let mut server = SidecarRun::builder(ports::take())
        .env("SIDECAR_LOG", "info")
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(&server_tls)
        .arg(arg("--admin-addr", admin))
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(Duration::from_secs(20));
    let scrape = || get_in_netns(&pods.b, admin, "/metrics").1;
    assert_tunnelled(
        &probe_through_tunnel(&pods, &client_tls, ports::take()),
        SERVER_ID,
    );
    let before = scrape();
    assert_eq!(metric(&before, "sidecar_certificates_stale"), Some(0.0));
    assert_eq!(
        metric(&before, "sidecar_certificate_reload_errors_total"),
        Some(0.0)
    );

    // Delete all three files.
    let dir = Path::new(&server_tls);
    let files = ["cert.pem", "key.pem", "bundle.pem"];
    let saved: Vec<Vec<u8>> = files
        .iter()
        .map(|f| fs::read(dir.join(f)).unwrap())
        .collect();
    for f in files {
        fs::remove_file(dir.join(f)).unwrap();
    }
    let mut body = String::new();
    // Both in one scrape: a scrape reads the series one after another, so it can fall between
    // the watcher's two updates (seen once in a one-vCPU guest).
    assert!(
        host::wait_until(Duration::from_secs(10), || {
            body = scrape();
            metric(&body, "sidecar_certificates_stale") == Some(1.0)
                && metric(&body, "sidecar_certificate_reload_errors_total") >= Some(1.0)
        }),
        "certificates_stale did not go to 1 (with a reload error counted) after the files \
         were deleted:\n{body}"
    );
    assert_eq!(metric(&body, "sidecar_certificates_loaded"), Some(1.0));
    let (status, ready) = get_in_netns(&pods.b, admin, "/readyz");
    assert_eq!(status, 200, "still ready with the last good set: {ready}");
    assert!(ready.contains("last good certificates"), "{ready}");
    // New tunnels still work: the credentials in memory are the last good set.
    assert_tunnelled(
        &probe_through_tunnel(&pods, &client_tls, ports::take()),
        SERVER_ID,
    );
    // A few more polls pass: still one warning.
    std::thread::sleep(Duration::from_millis(2500));
    let warnings = server
        .stderr_text()
        .matches("new certificates refused")
        .count();
    assert_eq!(
        warnings,
        1,
        "the outage should be logged once:\n{}",
        server.stderr_text()
    );

    // The files come back (each written whole, one after the other).
    for (f, bytes) in files.iter().zip(&saved) {
        let tmp = dir.join(format!(".{f}.tmp"));
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, dir.join(f)).unwrap();
    }
    assert!(
        host::wait_until(Duration::from_secs(10), || {
            body = scrape();
            metric(&body, "sidecar_certificates_stale") == Some(0.0)
        }),
        "certificates_stale did not return to 0:\n{body}"
    );
    assert!(
        wait_stderr(&server, "certificates valid again", Duration::from_secs(5)),
        "{}",
        server.stderr_text()
    );
    assert_tunnelled(
        &probe_through_tunnel(&pods, &client_tls, ports::take()),
        SERVER_ID,
    );
    server.release();
    let done = server.finish(RUN_TIMEOUT);
    let inbound: Vec<_> = done
        .report()
        .connections
        .iter()
        .filter(|c| c.direction == "inbound")
        .collect();
    assert_eq!(inbound.len(), 3, "{inbound:#?}");
    assert!(inbound.iter().all(|c| c.outcome == "ok"), "{inbound:#?}");
}

// ---------------------------------------------------------------------------------------
// bpffs unmounted under a running sidecar

/// The run's bpffs (a private mount for this test: the host's `/sys/fs/bpf` is shared) is
/// unmounted while the run is intercepting. The pins vanish with the mount, but the sidecar
/// holds every link and map by fd, so interception goes on unchanged (new connects are still
/// redirected and echo exactly). On exit the links are closed — which detaches them — with
/// one clear warning that their pins were already gone, and nothing is left: no program, no
/// cgroup, no state file, no mount.
#[test]
fn unmounting_bpffs_under_a_run_keeps_interception_and_leaves_nothing() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    let scratch = Scratch::new("scrl-bpffs-gone");
    let bpffs = scratch.path("bpf");
    let go = scratch.path("go");
    let echo = format!(
        "{CLIENT} echo {} --size=65536 --count=5 --concurrency=5",
        arg("--addr", server.addr())
    );
    let script = format!("{echo}; echo ROUND1; {}; {echo}", wait_for_file(&go));
    let proxy_port = ports::take();
    let mut run = SidecarRun::builder(proxy_port)
        .arg("--admin-addr=off")
        .arg("--bpffs")
        .arg(&bpffs)
        .command(["sh", "-c", &script])
        .start();
    assert!(
        host::wait_until(Duration::from_secs(20), || run
            .stdout_lines()
            .iter()
            .any(|l| l == "ROUND1")),
        "{}",
        run.stderr_text()
    );
    let pins = bpffs.join(format!("sidecar/run-{}", run.pid()));
    assert!(
        pins.join("link-sidecar_connect4").exists(),
        "{}",
        pins.display()
    );
    let target = std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::umount2(target.as_ptr(), 0) };
    assert_eq!(
        rc,
        0,
        "umount {}: {}",
        bpffs.display(),
        std::io::Error::last_os_error()
    );
    assert!(!pins.exists(), "the pins went away with the mount");

    fs::write(&go, b"").unwrap();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let lines: Vec<EchoLine> = done.parse_stdout();
    assert_eq!(lines.len(), 10, "{lines:?}");
    let proxy = SocketAddr::from(([127, 0, 0, 1], proxy_port));
    for l in &lines {
        assert!(l.ok, "{l:?}");
        assert_eq!(l.peer, Some(proxy), "still intercepted: {l:?}");
    }
    assert_eq!(done.report().connections.len(), 10);
    let log = done.stderr_text();
    assert!(
        log.contains("link pin(s) were already gone"),
        "the exit should say why nothing was unpinned:\n{log}"
    );
    for bad in ["ERROR", "error:", "cannot unpin", "unpinning a link"] {
        assert!(
            !log.contains(bad),
            "a confusing error at exit ({bad}):\n{log}"
        );
    }
    assert_no_leftovers(done.pid);
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&*bpffs.to_string_lossy()),
        "the private bpffs is still mounted"
    );
}

// ---------------------------------------------------------------------------------------
// Fail-open or fail-closed, per direction, while the proxy is down

/// Pod B's sidecar is SIGKILLed while its app keeps serving on 0.0.0.0:8080. What reaches the
/// app from pod A afterwards, per inbound mode:
/// - a tunnel (pod A's meshed sidecar): refused — nothing listens on the tunnel port; pod A's
///   app sees its connection fail (fail-closed: no plaintext fallback for a mesh CIDR);
/// - plaintext, `--inbound-mode permissive`: reaches the app (fail-open, as without a
///   sidecar);
/// - plaintext, `--inbound-mode strict`: dropped by the ingress program, which stays attached
///   through its pin until cleanup (fail-closed); the connect times out.
///
/// The outbound direction (redirected connects to the dead proxy port are refused:
/// fail-closed) is `reliability.rs` `sigkill_mid_stream_fails_closed_until_cleanup`.
#[test]
fn inbound_with_the_proxy_down_is_fail_open_when_permissive_and_fail_closed_when_strict() {
    if !privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("scrl-inbound-down");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = sidecar_tests::netns::PodPair::create_in("scrl", 206, 2);
    let plaintext = || {
        let out = pods.a.run(&[
            CLIENT,
            "connect-fail",
            &arg("--addr", SocketAddr::new(pods.b.addr, APP_PORT)),
        ]);
        serde_json::from_slice::<ConnectFailLine>(out.stdout.trim_ascii())
            .unwrap_or_else(|e| panic!("connect-fail output: {e}: {out:?}"))
    };
    for (mode, port) in [("permissive", ports::take()), ("strict", ports::take())] {
        let mut server = SidecarRun::builder(port)
            .wrapped_in(pods.b.enter())
            .arg("--admin-addr=off")
            .arg("--tls-dir")
            .arg(&server_tls)
            .arg(arg("--inbound-mode", mode))
            .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
            .start();
        server.wait_ready(Duration::from_secs(20));
        assert_tunnelled(
            &probe_through_tunnel(&pods, &client_tls, port + 1),
            SERVER_ID,
        );
        let app = server.app_pids();
        server.signal(libc::SIGKILL);
        server
            .wait_exit(Duration::from_secs(10))
            .expect("a SIGKILLed sidecar exits");
        assert!(
            app.iter().all(|p| host::is_alive(*p)),
            "B's app keeps running after its sidecar is killed"
        );

        // Tunnels: refused, and the client's sidecar does not fall back to plaintext.
        let started = Instant::now();
        let tunnel = probe_through_tunnel(&pods, &client_tls, port + 1);
        let lines: Vec<EchoLine> = tunnel.parse_stdout();
        assert!(lines.len() == 1 && !lines[0].ok, "{mode}: {lines:?}");
        assert!(started.elapsed() < Duration::from_secs(15), "{mode}: slow");
        let conns = &tunnel.report().connections;
        assert!(
            conns.len() == 1 && conns[0].outcome == "tunnel_failed",
            "{mode}: {conns:#?}"
        );

        // Plaintext straight to the app.
        let direct = plaintext();
        match mode {
            "permissive" => assert_eq!(
                direct.error, None,
                "permissive: plaintext reaches the app with its sidecar dead: {direct:?}"
            ),
            _ => assert!(
                direct
                    .error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("connect:")),
                "strict: plaintext must stay dropped with the sidecar dead: {direct:?}"
            ),
        }
        eprintln!("{mode}: tunnel {:?}, plaintext {direct:?}", lines[0].error);
        // The harness's drop runs `sidecar cleanup` for the killed run; its app is ours to end.
        drop(server);
        for p in &app {
            host::kill_if_still(*p, "sidecar-testclient");
        }
    }
}
