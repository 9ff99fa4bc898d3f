//! Kernel pass-through: a plaintext connection the proxy adds nothing to goes straight to its
//! destination (the server sees the app's own socket), and is still intercepted in the ways
//! users care about: recorded from the kernel in the report, the access log and `/metrics`
//! with the exact bytes, listed while open, counted when its records do not fit, tunnelled
//! when meshed, and sent through the proxy again by `--proxy-all`. (Denies at `connect()` in
//! pass-through mode are in policy.rs, with the other refusals.)
//!
//! Every test starts with `privileged()` and holds `serial()`. Traffic stays on loopback;
//! ports come from `sidecar_tests::ports` (the app ports inside the pods' namespaces are
//! fixed). Every run is bounded in time.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use sidecar_tests::{
    EchoServer, admin::http_get, netns::PodPair, ports, privileged, require, run::SidecarRun,
    scratch::Scratch, serial,
};

/// One plain-text echo exchange per address (`local=… peer=…`, then `ok`), as a script step.
const EXCHANGE: &str = concat!(env!("CARGO_BIN_EXE_sidecar-testclient"), " exchange");
const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The `local=` address each [`EXCHANGE`] printed.
fn app_addresses(stdout: &[String]) -> Vec<SocketAddr> {
    stdout
        .iter()
        .filter_map(|l| l.strip_prefix("local="))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_passthrough_connection_goes_direct_and_is_recorded_with_its_bytes() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("passthrough-direct");
    let log = scratch.path("access.log");
    let server = EchoServer::start_v4();
    const BYTES: u64 = 70_000;
    let admin = SocketAddr::from(([127, 0, 0, 1], ports::take()));
    // The command stays alive after its exchange so `/metrics` can be read while it runs.
    let script = format!(
        "{EXCHANGE} --bytes {BYTES} {} && echo EXCHANGED && {{ read _ || true; }}",
        server.addr()
    );
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--access-log")
        .arg(&log)
        .command(["sh", "-c", &script])
        .start();

    // Recorded when the kernel reports the close: `/metrics` shows it with path=passthrough.
    // One scrape is not a snapshot (series are read one after another while the record is
    // counted, and the close is counted last), so the series are read from the next scrape.
    let deadline = Instant::now() + Duration::from_secs(30);
    let closed = r#"sidecar_connections_closed_total{direction="outbound",path="passthrough",reason="ok"} 1"#;
    let metrics = loop {
        let body = admin_body(admin, "/metrics").unwrap_or_default();
        if body.contains(closed) {
            break admin_body(admin, "/metrics").expect("GET /metrics");
        }
        assert!(
            Instant::now() < deadline,
            "no pass-through close in /metrics within 30 s:\n{body}\nstderr:\n{}",
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for series in [
        format!(r#"sidecar_sent_bytes_total{{direction="outbound",path="passthrough"}} {BYTES}"#),
        format!(
            r#"sidecar_received_bytes_total{{direction="outbound",path="passthrough"}} {BYTES}"#
        ),
        r#"sidecar_connections_opened_total{direction="outbound",mode="plain",path="passthrough"} 1"#.into(),
        r#"sidecar_connections_opened_total{direction="outbound",mode="plain",path="proxy"} 0"#.into(),
    ] {
        assert!(metrics.contains(&series), "missing {series}:\n{metrics}");
    }
    let status = admin_body(admin, "/status").expect("GET /status");
    assert!(
        status.contains("1 passed through in the kernel, 0 proxied"),
        "/status: {status}"
    );

    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let app = app_addresses(&done.stdout);
    assert_eq!(app.len(), 1, "{:?}", done.stdout);
    // Direct: the server's peer is the app's own socket, not a proxy's.
    assert_eq!(server.peers(), app, "the server saw the app itself");

    let report = done.report();
    assert_eq!(report.connections.len(), 1, "{:#?}", report.connections);
    let c = &report.connections[0];
    assert_eq!(c.path, "passthrough");
    assert_eq!(c.outcome, "ok", "{c:?}");
    assert_eq!(c.client, app[0]);
    assert_eq!(c.original_dst, Some(server.addr()));
    assert_eq!((c.bytes_from_client, c.bytes_from_upstream), (BYTES, BYTES));
    assert_eq!(report.counters.0["connect_passthrough"], 1);
    assert_eq!(report.counters.0["connect_redirected"], 0);
    assert_eq!(report.counters.0["direct_records_dropped"], 0);
    assert!(
        done.stderr_text()
            .contains("1 connection(s): 1 passed through in the kernel, 0 proxied"),
        "{}",
        done.stderr_text()
    );

    let lines = std::fs::read_to_string(&log).expect("the access log");
    let records: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(records.len(), 1, "{lines}");
    let r = &records[0];
    assert_eq!(r["path"], "passthrough");
    assert_eq!(r["close_reason"], "ok");
    assert_eq!(r["bytes_sent"], BYTES);
    assert_eq!(r["bytes_received"], BYTES);
    assert_eq!(r["src"], app[0].to_string());
    assert_eq!(r["original_dst"], server.addr().to_string());
    assert!(r["tcp_app"]["srtt_us"].as_u64().is_some(), "{r}");
}

#[test]
fn proxy_all_sends_the_same_connection_through_the_proxy() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    // The builder adds `--proxy-all` unless `.passthrough()`. The test client retries the
    // spurious EAGAIN a spliced socket can give a blocking reader (docs/operations.md,
    // Known limitations).
    let mut run = SidecarRun::builder(ports::take())
        .command([
            CLIENT,
            "echo",
            "--addr",
            &server.addr().to_string(),
            "--size",
            "1000",
        ])
        .start();
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let lines: Vec<sidecar_tests::protocol::EchoLine> = done.parse_stdout();
    let app: Vec<SocketAddr> = lines.iter().filter_map(|l| l.local).collect();
    assert_eq!(app.len(), 1, "{lines:?}");
    let peers = server.peers();
    assert_eq!(peers.len(), 1);
    assert_ne!(peers[0], app[0], "the server saw the proxy, not the app");
    let report = done.report();
    assert_eq!(report.connections.len(), 1);
    let c = &report.connections[0];
    assert_eq!(c.path, "proxy");
    assert_eq!((c.bytes_from_client, c.bytes_from_upstream), (1000, 1000));
    assert_eq!(report.counters.0["connect_passthrough"], 0);
    assert_eq!(report.counters.0["connect_redirected"], 1);
}

#[test]
fn an_open_passthrough_connection_is_listed_with_its_bytes_so_far() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    let admin = SocketAddr::from(([127, 0, 0, 1], ports::take()));
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .arg("--admin-addr")
        .arg(admin.to_string())
        .command([
            CLIENT,
            "hold",
            "--addr",
            &server.addr().to_string(),
            "--count",
            "2",
        ])
        .start();
    let held = run.wait_ready(RUN_TIMEOUT);
    assert_eq!(held.len(), 2);
    let body = admin_body(admin, "/connections").expect("GET /connections");
    let list: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let rows = list["connections"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{body}");
    for h in &held {
        let row = rows
            .iter()
            .find(|r| r["src"] == h.local.to_string())
            .unwrap_or_else(|| panic!("{} not listed: {body}", h.local));
        assert_eq!(row["path"], "passthrough", "{row}");
        assert_eq!(row["state"], "open", "{row}");
        assert_eq!(row["original_dst"], server.addr().to_string());
        // The hold client's one 64-byte ping-pong.
        assert_eq!(
            (row["bytes_sent"].as_u64(), row["bytes_received"].as_u64()),
            (Some(64), Some(64)),
            "{row}"
        );
    }
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let report = done.report();
    assert_eq!(report.connections.len(), 2, "{:#?}", report.connections);
    assert!(report.connections.iter().all(
        |c| c.path == "passthrough" && (c.bytes_from_client, c.bytes_from_upstream) == (64, 64)
    ));
}

/// With the sidecar stopped (SIGSTOP), nothing reads the kernel's ring of close reports:
/// the workload's connections still work (they do not need the proxy), the ring fills, and
/// every report that did not fit is counted, none silently lost.
#[test]
fn records_that_do_not_fit_the_ring_are_counted() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    const CONNECTIONS: u64 = 10_000;
    let admin = SocketAddr::from(([127, 0, 0, 1], ports::take()));
    // The command waits for stdin to close (the test stops the sidecar first), then makes
    // its connections quietly and says DONE.
    let script = format!(
        "read _; {CLIENT} echo --addr {} --count {CONNECTIONS} --concurrency 4 >/dev/null \
         && echo DONE",
        server.addr()
    );
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .arg("--admin-addr")
        .arg(admin.to_string())
        .command(["sh", "-c", &script])
        .start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin_body(admin, "/readyz").is_some_and(|b| b.contains("\"ready\": true")) {
        assert!(Instant::now() < deadline, "the sidecar never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    run.signal(libc::SIGSTOP);
    run.release();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !run.stdout_lines().iter().any(|l| l == "DONE") {
        if Instant::now() > deadline {
            run.signal(libc::SIGCONT);
            panic!(
                "the workload's connections did not finish within 180 s with the sidecar stopped"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    run.signal(libc::SIGCONT);
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let report = done.report();
    let recorded = report
        .connections
        .iter()
        .filter(|c| c.path == "passthrough" && c.outcome == "ok")
        .count() as u64;
    let dropped = report.counters.0["direct_records_dropped"];
    println!("{recorded} recorded, {dropped} dropped of {CONNECTIONS}");
    assert!(
        dropped > 0,
        "the ring never overflowed: the test proves nothing"
    );
    assert_eq!(
        recorded + dropped,
        CONNECTIONS,
        "every connection recorded or counted"
    );
    assert!(
        done.stderr_text()
            .contains(&format!("{dropped} pass-through record(s) lost")),
        "{}",
        done.stderr_text()
    );
}

/// With mTLS on, a destination in `--mesh-cidrs` still goes through the proxy and its tunnel
/// (the kernel's `MESH_CIDRS`), while a plaintext destination outside them passes through.
#[test]
fn meshed_destinations_are_tunnelled_and_the_rest_passes_through() {
    if !privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    const APP_PORT: u16 = 32080;
    const LOCAL_PORT: u16 = 32081;
    let certs = Scratch::new("passthrough-mesh");
    certs.ca("ca", "example.org");
    let client_tls = certs.issue(
        "ca",
        "spiffe://example.org/ns/demo/sa/client",
        "client",
        &[],
    );
    let server_tls = certs.issue(
        "ca",
        "spiffe://example.org/ns/demo/sa/server",
        "server",
        &[],
    );
    let pods = PodPair::create_in("spt", 232, 1);
    let mut server = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(&server_tls)
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(RUN_TIMEOUT);
    // In pod A: a plaintext server on its loopback (not meshed), then one exchange with each.
    // The test client's `echo`, not `exchange`: it half-closes and then blocks reading, and
    // a spliced socket may wake such a reader with EAGAIN (docs/operations.md, Known
    // limitations), which the test client retries and counts.
    let script = format!(
        "sleep 10 | {CLIENT} serve --addr 127.0.0.1:{LOCAL_PORT} >/dev/null & sleep 0.5; \
         {CLIENT} echo --addr {b}:{APP_PORT} && {CLIENT} echo --addr 127.0.0.1:{LOCAL_PORT}",
        b = pods.b.addr
    );
    let mut client = SidecarRun::builder(ports::take())
        .passthrough()
        .meshed_client_of(&pods, &client_tls)
        .command(["sh", "-c", &script])
        .start();
    let done = client.finish(RUN_TIMEOUT);
    server.release();
    let _ = server.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let report = done.report();
    let to = |port: u16| {
        report
            .connections
            .iter()
            .find(|c| c.original_dst.map(|d| d.port()) == Some(port))
            .unwrap_or_else(|| panic!("no record to port {port}: {:#?}", report.connections))
    };
    let meshed = to(APP_PORT);
    assert_eq!(
        (meshed.path.as_str(), meshed.mode.as_str()),
        ("proxy", "mtls"),
        "{meshed:?}"
    );
    assert_eq!(
        meshed.dst_identity.as_deref(),
        Some("spiffe://example.org/ns/demo/sa/server")
    );
    let local = to(LOCAL_PORT);
    assert_eq!(
        (local.path.as_str(), local.mode.as_str()),
        ("passthrough", "plain"),
        "{local:?}"
    );
    assert_eq!(
        (local.bytes_from_client, local.bytes_from_upstream),
        (64, 64)
    );
    assert_eq!(report.counters.0["connect_redirected"], 1);
    assert_eq!(report.counters.0["connect_passthrough"], 1);
}

/// The body of a `GET path` on the admin server, `None` if it does not answer.
fn admin_body(addr: SocketAddr, path: &str) -> Option<String> {
    http_get(addr, path).ok().map(|(_, body)| body)
}
