//! mTLS between two sidecars, each in its own network namespace ("pod"), joined by a veth
//! pair with no route out of the machine. Real sockets, real handshakes, real kernel.
//!
//! Pod A runs the client app under a sidecar with `--mesh-cidrs` covering pod B; pod B runs
//! an echo server under a sidecar that accepts tunnels on port 15008.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sidecar_tests::{
    assert_no_leftovers,
    host::{self, output_with_timeout},
    netns::PodPair,
    ports,
    protocol::{EchoLine, assert_streams_intact, pattern},
    report::Report,
    require,
    run::{Finished, SidecarRun},
    scratch::Scratch,
    script::{arg, wait_for_file},
    serial,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const APP_PORT: u16 = 8080;
const TD: &str = "example.org";
const CLIENT_ID: &str = "spiffe://example.org/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://example.org/ns/demo/sa/server";

/// A scratch directory with a CA (`ca`) of our trust domain, for one test.
fn certs(name: &str) -> Scratch {
    let certs = Scratch::new(&format!("mtls-{name}"));
    certs.ca("ca", TD);
    certs
}

/// Pod B's sidecar and echo server. `wait_ready` returns once the server listens.
fn start_server(pods: &PodPair, tls_dir: &str, port: u16) -> SidecarRun {
    let mut run = SidecarRun::builder(port)
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(tls_dir)
        .arg("--hbone-preface-timeout-ms")
        .arg("1000")
        // The splice (off by default) is on, to check it takes the hop to the pod address.
        .arg("--sockmap")
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    run.wait_ready(READY_TIMEOUT);
    run
}

/// Runs `argv` (a test-client command) in pod A under a sidecar meshing pod B.
fn client_run(pods: &PodPair, tls_dir: &str, port: u16, argv: Vec<String>) -> SidecarRun {
    SidecarRun::builder(port)
        .meshed_client_of(pods, tls_dir)
        .command(argv)
        .start()
}

fn echo_args(pods: &PodPair, size: usize, count: usize) -> Vec<String> {
    vec![
        CLIENT.into(),
        "echo".into(),
        format!("--addr={}:{APP_PORT}", pods.b.addr),
        format!("--size={size}"),
        format!("--count={count}"),
    ]
}

/// Stops pod B's server (stdin EOF ends the echo server) and returns the finished run.
fn stop(mut run: SidecarRun) -> Finished {
    run.release();
    run.finish(RUN_TIMEOUT)
}

fn assert_all_tunnelled(report: &Report, direction: &str, peer: &str, count: usize) {
    let conns: Vec<_> = report
        .connections
        .iter()
        .filter(|c| c.direction == direction)
        .collect();
    assert_eq!(
        conns.len(),
        count,
        "{direction} connections: {:#?}",
        report.connections
    );
    for c in conns {
        assert!(c.mtls(), "{direction} connection not mTLS: {c:?}");
        assert_eq!(
            c.peer_identity(),
            Some(peer),
            "verified peer identity: {c:?}"
        );
        assert_eq!(c.outcome, "ok", "{c:?}");
    }
}

#[test]
fn mtls_round_trips_small_and_large_payloads_between_two_pods() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = certs("roundtrip");
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = PodPair::create(11);
    let server = start_server(&pods, &server_tls, ports::take());

    let access_log = certs.dir.join("client-access.log");
    let mut small = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .arg("--access-log")
        .arg(&access_log)
        .command(echo_args(&pods, 64, 5))
        .start();
    let small = small.finish(RUN_TIMEOUT);
    small.assert_exit_code(0);
    let lines: Vec<EchoLine> = small.parse_stdout();
    assert!(
        lines.len() == 5 && lines.iter().all(|l| l.ok),
        "small echoes: {lines:#?}"
    );
    assert_all_tunnelled(small.report(), "outbound", SERVER_ID, 5);
    // The access log carries the tunnel's mode and both verified identities.
    let log = std::fs::read_to_string(&access_log).expect("reading the access log");
    let records: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(records.len(), 5, "access log:\n{log}");
    for r in &records {
        assert_eq!(r["mode"], "mtls", "{r}");
        assert_eq!(r["src_identity"], CLIENT_ID, "{r}");
        assert_eq!(r["dst_identity"], SERVER_ID, "{r}");
        assert_eq!(
            (r["bytes_sent"].as_u64(), r["bytes_received"].as_u64()),
            (Some(64), Some(64)),
            "{r}"
        );
    }

    let mut large = client_run(
        &pods,
        &client_tls,
        ports::take(),
        echo_args(&pods, 8 << 20, 1),
    );
    let large = large.finish(RUN_TIMEOUT);
    large.assert_exit_code(0);
    let lines: Vec<EchoLine> = large.parse_stdout();
    assert!(
        lines.len() == 1 && lines[0].ok && lines[0].received == 8 << 20,
        "8 MiB echo: {lines:#?}"
    );
    assert_all_tunnelled(large.report(), "outbound", SERVER_ID, 1);

    let server_pid = server.pid();
    let done = stop(server);
    done.assert_exit_code(0);
    let report = done.report();
    assert_all_tunnelled(report, "inbound", CLIENT_ID, 6);
    // The server app's peers are its own sidecar's sockets on pod B's own address (where
    // the tunnel delivers), never pod A.
    let app_peers: Vec<String> = done
        .stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["peer"].as_str().map(String::from))
        .collect();
    let sidecar_sockets: Vec<String> = report
        .connections
        .iter()
        .filter_map(|c| c.upstream_local.map(|a| a.to_string()))
        .collect();
    assert_eq!(app_peers.len(), 6, "server app saw: {app_peers:?}");
    for peer in &app_peers {
        assert!(
            peer.starts_with(&format!("{}:", pods.b.addr)),
            "server app peer {peer} is not on pod B's own address"
        );
        assert!(
            sidecar_sockets.contains(peer),
            "{peer} is not one of the sidecar's sockets {sidecar_sockets:?}"
        );
    }
    assert!(
        report.connections.iter().all(|c| c.upstream_leg_spliced),
        "local hop to the app spliced"
    );
    assert_no_leftovers(server_pid);
    assert_no_leftovers(small.pid);
    assert_no_leftovers(large.pid);
}

/// A capture on the veth between the pods: a plaintext control connection's payload is
/// visible in it (so the capture works), a tunnelled connection's payload is not.
#[test]
fn tunnel_traffic_shows_no_plaintext_on_the_wire() {
    if !sidecar_tests::privileged() || !require("nsenter") || !require("tcpdump") {
        return;
    }
    let _serial = serial();
    let certs = certs("capture");
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = PodPair::create(12);
    let server = start_server(&pods, &server_tls, ports::take());
    let size = 64 * 1024;
    // Echo connection 0 sends pattern(0, size); a 48-byte window of it identifies it.
    let needle = pattern(0, size)[1000..1048].to_vec();

    // Control: the same client straight from pod A to the app port, no sidecar.
    let capture = Capture::start(&pods, &certs.dir.join("plain.pcap"));
    let mut argv = echo_args(&pods, size, 1);
    let enter = pods.a.enter();
    let out = output_with_timeout(
        Command::new(&enter[0]).args(&enter[1..]).args(&argv),
        RUN_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "plaintext control: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = capture.finish();
    assert!(
        contains(&plain, &needle),
        "the capture must see a plaintext payload ({} bytes)",
        plain.len()
    );

    // Through the sidecars: mTLS on the wire.
    let capture = Capture::start(&pods, &certs.dir.join("mtls.pcap"));
    argv = echo_args(&pods, size, 1);
    let mut run = client_run(&pods, &client_tls, ports::take(), argv);
    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    assert_all_tunnelled(done.report(), "outbound", SERVER_ID, 1);
    let tunnelled = capture.finish();
    assert!(
        tunnelled.len() > 2 * size,
        "the tunnel's bytes were captured ({} bytes)",
        tunnelled.len()
    );
    assert!(
        !contains(&tunnelled, &needle),
        "plaintext payload visible between the pods"
    );
    drop(stop(server));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// tcpdump on pod A's veth, writing a pcap; `finish` stops it and returns the file.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(pods: &PodPair, file: &Path) -> Self {
        let enter = pods.a.enter();
        let mut child = Command::new(&enter[0])
            .args(&enter[1..])
            .args([
                "tcpdump",
                "--immediate-mode",
                "-i",
                &pods.veth_a(),
                "-s",
                "0",
                "-U",
                "-n",
                "-w",
            ])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        // tcpdump says "listening on" once the capture is armed.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("tcpdump did not start listening");
        Self {
            child,
            file: file.into(),
        }
    }

    fn finish(mut self) -> Vec<u8> {
        host::signal(self.child.id(), libc::SIGINT);
        host::wait_child(&mut self.child, Duration::from_secs(10)).expect("tcpdump did not stop");
        std::fs::read(&self.file).expect("reading the capture")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a raw TLS client (openssl s_client, in pod A) sends to pod B's tunnel port.
struct Attempt<'a> {
    reason: &'static str,
    cert: Option<&'a str>,
    bytes: Vec<u8>,
    /// Keep the connection open this long after sending (to trip the HTTP/2 preface deadline).
    linger: Duration,
}

fn s_client(pods: &PodPair, attempt: &Attempt<'_>) {
    use std::io::Write;
    let enter = pods.a.enter();
    let mut cmd = Command::new(&enter[0]);
    cmd.args(&enter[1..]).args([
        "openssl",
        "s_client",
        "-connect",
        &format!("{}:15008", pods.b.addr),
        "-tls1_3",
        "-alpn",
        "h2",
        "-quiet",
        "-no_ign_eof",
    ]);
    if let Some(dir) = attempt.cert {
        cmd.arg("-cert")
            .arg(format!("{dir}/cert.pem"))
            .arg("-key")
            .arg(format!("{dir}/key.pem"));
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting openssl s_client");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let _ = stdin.write_all(&attempt.bytes);
    std::thread::sleep(attempt.linger);
    drop(stdin);
    if host::wait_child(&mut child, Duration::from_secs(10)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn inbound_refusals_are_counted_and_logged_by_reason() {
    if !sidecar_tests::privileged() || !require("nsenter") || !require("openssl") {
        return;
    }
    let _serial = serial();
    let certs = certs("refusals");
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let good = certs.issue("ca", CLIENT_ID, "client", &[]);
    let other_td = certs.issue(
        "ca",
        "spiffe://other.org/ns/demo/sa/client",
        "other-td",
        &[],
    );
    let expired = certs.issue(
        "ca",
        CLIENT_ID,
        "expired",
        &["--hours=1", "--backdate-hours=48"],
    );
    certs.ca("rogue-ca", TD);
    let untrusted = certs.issue("rogue-ca", CLIENT_ID, "untrusted", &[]);
    let san = format!("subjectAltName = URI:{CLIENT_ID}\n");
    let server_auth_only = certs.openssl_issue(
        "ca",
        "server-auth-only",
        &format!("{san}keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n"),
    );
    let no_key_usage = certs.openssl_issue(
        "ca",
        "no-key-usage",
        &format!("{san}extendedKeyUsage = serverAuth, clientAuth\n"),
    );
    let pods = PodPair::create(13);
    let server = start_server(&pods, &server_tls, ports::take());

    let no_wait = Duration::from_millis(300);
    let attempts = [
        Attempt {
            reason: "no_client_cert",
            cert: None,
            bytes: vec![],
            linger: no_wait,
        },
        Attempt {
            reason: "wrong_identity",
            cert: Some(&other_td),
            bytes: vec![],
            linger: no_wait,
        },
        Attempt {
            reason: "expired_certificate",
            cert: Some(&expired),
            bytes: vec![],
            linger: no_wait,
        },
        Attempt {
            reason: "untrusted_ca",
            cert: Some(&untrusted),
            bytes: vec![],
            linger: no_wait,
        },
        // A certificate made for servers only, presented by a client.
        Attempt {
            reason: "key_usage",
            cert: Some(&server_auth_only),
            bytes: vec![],
            linger: no_wait,
        },
        // No key usage extension: no workload certificate (X.509-SVID).
        Attempt {
            reason: "key_usage",
            cert: Some(&no_key_usage),
            bytes: vec![],
            linger: no_wait,
        },
        Attempt {
            reason: "http2_preface",
            cert: Some(&good),
            bytes: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            linger: no_wait,
        },
        Attempt {
            reason: "http2_timeout",
            cert: Some(&good),
            bytes: vec![],
            linger: Duration::from_millis(2500),
        },
    ];
    for attempt in &attempts {
        s_client(&pods, attempt);
    }
    // Give the last refusals time to be recorded before stopping.
    std::thread::sleep(Duration::from_millis(500));
    let done = stop(server);
    done.assert_exit_code(0);
    let rejections = &done.report().inbound_rejections;
    let stderr = done.stderr_text();
    for attempt in &attempts {
        let expected = attempts
            .iter()
            .filter(|a| a.reason == attempt.reason)
            .count() as u64;
        assert_eq!(
            rejections.get(attempt.reason).copied(),
            Some(expected),
            "{} refusals counted: {rejections:?}\nstderr:\n{stderr}",
            attempt.reason
        );
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("inbound connection refused") && l.contains(attempt.reason)),
            "no log line for {}:\n{stderr}",
            attempt.reason
        );
    }
    let total: u64 = rejections.values().sum();
    assert_eq!(
        total,
        attempts.len() as u64,
        "no other refusals: {rejections:?}"
    );
    assert!(
        done.report()
            .connections
            .iter()
            .all(|c| c.bytes_from_upstream == 0),
        "nothing reached the app for a refused peer"
    );
}

/// Streams run across a certificate rotation: a half-written (invalid) set is refused and the
/// old one stays; a valid set is picked up by new handshakes; no stream breaks.
#[test]
fn certificates_rotate_without_dropping_streams() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = certs("rotation");
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = PodPair::create(14);
    let server = start_server(&pods, &server_tls, ports::take());

    let streams = 4;
    let argv = vec![
        CLIENT.into(),
        "pingpong".into(),
        format!("--addr={}:{APP_PORT}", pods.b.addr),
        "--size=1024".into(),
        format!("--count={streams}"),
        "--seconds=5".into(),
    ];
    let mut long = client_run(&pods, &client_tls, ports::take(), argv);
    std::thread::sleep(Duration::from_millis(1200));

    // A half-written certificate: refused, the old set stays in force.
    let cert_path = PathBuf::from(&server_tls).join("cert.pem");
    let original = std::fs::read(&cert_path).expect("reading the server certificate");
    std::fs::write(&cert_path, &original[..original.len() / 2])
        .expect("truncating the certificate");
    std::thread::sleep(Duration::from_millis(1600));
    let mut probe = client_run(&pods, &client_tls, ports::take(), echo_args(&pods, 64, 1));
    let probe = probe.finish(RUN_TIMEOUT);
    probe.assert_exit_code(0);
    assert_all_tunnelled(probe.report(), "outbound", SERVER_ID, 1);

    // A valid new set with a new identity: new handshakes present it.
    let rotated_id = "spiffe://example.org/ns/demo/sa/server-v2";
    certs.issue("ca", rotated_id, "server", &[]);
    std::thread::sleep(Duration::from_millis(1600));
    let mut after = client_run(&pods, &client_tls, ports::take(), echo_args(&pods, 64, 1));
    let after = after.finish(RUN_TIMEOUT);
    after.assert_exit_code(0);
    assert_all_tunnelled(after.report(), "outbound", rotated_id, 1);

    // The streams opened before the rotation ran to the end, byte-exact.
    let long = long.finish(RUN_TIMEOUT);
    long.assert_exit_code(0);
    assert_streams_intact(&long.parse_stdout::<EchoLine>(), streams);
    assert_all_tunnelled(long.report(), "outbound", SERVER_ID, streams);

    let done = stop(server);
    let stderr = done.stderr_text();
    assert!(
        stderr.contains("new certificates refused"),
        "the invalid set was not reported:\n{stderr}"
    );
}

/// Waits for a line of `run`'s output (stdout or stderr) containing `needle`.
fn wait_output(run: &SidecarRun, needle: &str) {
    let seen = host::wait_until(Duration::from_secs(15), || {
        run.stdout_lines().iter().any(|l| l.contains(needle)) || run.stderr_text().contains(needle)
    });
    assert!(
        seen,
        "no {needle:?} within 15 s\nstdout: {:#?}\nstderr:\n{}",
        run.stdout_lines(),
        run.stderr_text()
    );
}

/// How each of `report`'s connections in `direction` got its tunnel, by id: (TLS resumed,
/// rode a connection already open, peer identity).
type Handshake = (Option<bool>, Option<bool>, Option<String>);

fn handshakes(report: &Report, direction: &str) -> Vec<Handshake> {
    let mut conns: Vec<_> = report
        .connections
        .iter()
        .filter(|c| c.direction == direction)
        .collect();
    conns.sort_by_key(|c| c.id);
    for c in &conns {
        assert!(c.mtls() && c.outcome == "ok", "{c:?}");
        assert_eq!(
            (c.bytes_from_client, c.bytes_from_upstream),
            (64, 64),
            "{c:?}"
        );
    }
    conns
        .iter()
        .map(|c| {
            (
                c.tls_resumed,
                c.tunnel_reused,
                c.peer_identity().map(String::from),
            )
        })
        .collect()
}

/// A second connection to a peer rides the first one's HBONE connection (a stream, no
/// handshake at all) and still carries both verified identities. A rotation of either end's
/// certificate ends that: the next connection is a new tunnel with a full handshake presenting
/// the new certificate (the client's pool keys on its credentials; the server sends GOAWAY on
/// connections made before its rotation), never a stream on, or a resumption of, a connection
/// made under the old one.
#[test]
fn streams_share_a_connection_until_either_end_rotates_its_certificate() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = certs("rotation");
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let (client_v2, server_v2) = (
        "spiffe://example.org/ns/demo/sa/client-v2",
        "spiffe://example.org/ns/demo/sa/server-v2",
    );
    let pods = PodPair::create(16);
    let mut server = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .env("SIDECAR_LOG", "info")
        .arg("--tls-dir")
        .arg(&server_tls)
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(READY_TIMEOUT);

    // Two connections one after the other, per stage; a stage waits for its go file.
    let (go_client, go_server) = (certs.path("go-client"), certs.path("go-server"));
    let echo = |count: usize| {
        format!(
            "{CLIENT} echo {} {} {}",
            arg("--addr", format!("{}:{APP_PORT}", pods.b.addr)),
            arg("--size", 64),
            arg("--count", count)
        )
    };
    let script = format!(
        "{e}; echo \"STAGE1 $?\"; {wait_client}; {e}; echo \"STAGE2 $?\"; {wait_server}; {e}; \
         echo \"STAGE3 $?\"",
        e = echo(2),
        wait_client = wait_for_file(&go_client),
        wait_server = wait_for_file(&go_server),
    );
    let access_log = certs.dir.join("client-access.log");
    let mut client = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .env("SIDECAR_LOG", "info")
        .arg("--access-log")
        .arg(&access_log)
        .command(["sh", "-c", &script])
        .start();

    wait_output(&client, "STAGE1 0");
    // Between the stages the client's pool holds the one connection, idle, to pod B.
    let status = pods.a.http_get(([127, 0, 0, 1], 15000).into(), "/status");
    let body = status.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let status: serde_json::Value = serde_json::from_str(body).expect("/status is JSON");
    assert_eq!(
        status["tunnels"],
        serde_json::json!([{
            "peer": format!("{}:15008", pods.b.addr),
            "identity": SERVER_ID,
            "streams": 0,
        }]),
        "{status:#}"
    );
    certs.issue("ca", client_v2, "client", &[]);
    wait_output(&client, "rotated to new certificates");
    std::fs::write(&go_client, b"").unwrap();
    wait_output(&client, "STAGE2 0");
    certs.issue("ca", server_v2, "server", &[]);
    wait_output(&server, "rotated to new certificates");
    // The server notices its rotation within a second and sends GOAWAY on the old
    // connections; the client's next stream must not race it.
    std::thread::sleep(Duration::from_millis(2500));
    std::fs::write(&go_server, b"").unwrap();

    let client = client.finish(RUN_TIMEOUT);
    client.assert_exit_code(0);
    let lines: Vec<EchoLine> = client.parse_stdout();
    assert!(
        lines.len() == 6 && lines.iter().all(|l| l.ok),
        "echoes: {lines:#?}"
    );
    let (full, new, reused) = (Some(false), Some(false), Some(true));
    let id = |s: &str| Some(s.to_string());
    assert_eq!(
        handshakes(client.report(), "outbound"),
        vec![
            (full, new, id(SERVER_ID)),
            (None, reused, id(SERVER_ID)),
            // The client rotated: a new connection, and its new session cache has nothing
            // to offer.
            (full, new, id(SERVER_ID)),
            (None, reused, id(SERVER_ID)),
            // The server rotated: GOAWAY, and its new ticket key cannot open the client's
            // ticket.
            (full, new, id(server_v2)),
            (None, reused, id(server_v2)),
        ],
        "outbound tunnels (resumed, reused, server identity)"
    );
    let log = std::fs::read_to_string(&access_log).expect("reading the access log");
    let logged: Vec<(Option<bool>, Option<bool>)> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|r| (r["tls_resumed"].as_bool(), r["tunnel_reused"].as_bool()))
        .collect();
    assert_eq!(
        logged,
        [(full, new), (None, reused)].repeat(3),
        "access log:\n{log}"
    );

    let done = stop(server);
    done.assert_exit_code(0);
    assert_eq!(
        handshakes(done.report(), "inbound"),
        vec![
            (full, new, id(CLIENT_ID)),
            (None, reused, id(CLIENT_ID)),
            (full, new, id(client_v2)),
            (None, reused, id(client_v2)),
            (full, new, id(client_v2)),
            (None, reused, id(client_v2)),
        ],
        "inbound tunnels (resumed, reused, client identity)"
    );
}

/// Permissive mode: a destination whose host runs a sidecar gets mTLS; one without falls
/// back to plaintext, and the connection still works.
#[test]
fn permissive_mode_uses_mtls_where_a_sidecar_answers_and_plaintext_elsewhere() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = certs("permissive");
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = PodPair::create(15);
    let permissive = |port: u16| {
        SidecarRun::builder(port)
            .wrapped_in(pods.a.enter())
            .arg("--tls-dir")
            .arg(&client_tls)
            .arg("--no-inbound")
            .arg("--permissive")
            .command(echo_args(&pods, 4096, 2))
    };

    // Pod B without a sidecar: nothing listens on the tunnel port.
    let enter = pods.b.enter();
    let mut bare = Command::new(&enter[0])
        .args(&enter[1..])
        .args([CLIENT, "serve", &format!("--addr=0.0.0.0:{APP_PORT}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the bare server");
    {
        use std::io::BufRead;
        let stdout = bare.stdout.take().expect("piped stdout");
        let mut first = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .expect("reading READY");
        assert_eq!(first.trim(), "READY");
    }
    let plain = permissive(ports::take()).start().finish(RUN_TIMEOUT);
    drop(bare.stdin.take());
    let _ = host::wait_child(&mut bare, Duration::from_secs(5));
    let _ = bare.kill();
    plain.assert_exit_code(0);
    let conns = &plain.report().connections;
    assert_eq!(conns.len(), 2, "{conns:#?}");
    assert!(
        conns.iter().all(|c| !c.mtls() && c.outcome == "ok"),
        "plaintext fallback: {conns:#?}"
    );

    // Pod B with a sidecar: the same client settings now get mTLS.
    let server = start_server(&pods, &server_tls, ports::take());
    let tunnelled = permissive(ports::take()).start().finish(RUN_TIMEOUT);
    tunnelled.assert_exit_code(0);
    assert_all_tunnelled(tunnelled.report(), "outbound", SERVER_ID, 2);
    drop(stop(server));
}
