//! Who may reach what through the mTLS tunnel, between two sidecars in their own network
//! namespaces ("pods") joined by a veth pair: the server side delivers only to what the
//! workload exposes on its own address, the client side never downgrades to plaintext when
//! something on the tunnel port fails to prove itself, and the outbound policy can require
//! the server's verified identity per destination.

use std::{net::SocketAddr, time::Duration};

use sidecar_tests::{
    assert_no_leftovers,
    host::{self, wait_until},
    netns::PodPair,
    ports,
    protocol::{EchoLine, FloodLine, RawFloodLine, parse_lines},
    report::Report,
    require,
    run::{Finished, SidecarRun},
    scratch::Scratch,
    serial,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// The server pod's app, on every address of the pod.
const APP_PORT: u16 = 33080;
/// A service of the server pod bound to 127.0.0.1 only.
const LOCAL_ONLY_PORT: u16 = 33081;
const TD: &str = "example.org";
const CLIENT_ID: &str = "spiffe://example.org/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://example.org/ns/demo/sa/server";

fn pods(tag: u8) -> PodPair {
    PodPair::create_in("stn", 213, tag)
}

/// Pod B's sidecar (tunnels on 15008) with an echo server on `0.0.0.0:APP_PORT`.
fn start_server(pods: &PodPair, tls_dir: &str, port: u16) -> SidecarRun {
    let mut run = SidecarRun::builder(port)
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(tls_dir)
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    run.wait_ready(READY_TIMEOUT);
    run
}

fn stop(mut run: SidecarRun) -> Finished {
    run.release();
    run.finish(RUN_TIMEOUT)
}

fn echo(pods: &PodPair, port: u16) -> Vec<String> {
    vec![
        CLIENT.into(),
        "echo".into(),
        format!("--addr={}:{port}", pods.b.addr),
        "--size=4096".into(),
    ]
}

fn echoed(done: &Finished) -> bool {
    let lines: Vec<EchoLine> = parse_lines(&done.stdout);
    lines.len() == 1 && lines[0].ok && lines[0].received == 4096
}

fn outbound(report: &Report) -> Vec<&sidecar_tests::report::Connection> {
    report
        .connections
        .iter()
        .filter(|c| c.direction == "outbound")
        .collect()
}

/// A service bound to 127.0.0.1 in the server pod is not reachable through a tunnel; the
/// app bound to the pod's address is, and it sees the connection come from that address.
#[test]
fn a_tunnel_reaches_the_pod_address_never_its_loopback() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("tunnel-loopback");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = pods(1);
    let local_only = pods.b.serve(([127, 0, 0, 1], LOCAL_ONLY_PORT).into());
    let server = start_server(&pods, &server_tls, ports::take());

    let client = |port: u16, dst_port: u16| {
        SidecarRun::builder(port)
            .meshed_client_of(&pods, &client_tls)
            .command(echo(&pods, dst_port))
            .start()
            .finish(RUN_TIMEOUT)
    };
    let exposed = client(ports::take(), APP_PORT);
    let private = client(ports::take(), LOCAL_ONLY_PORT);

    let local_peers = local_only.stop();
    let done = stop(server);
    assert!(
        echoed(&exposed),
        "the app on the pod address: {:#?}",
        exposed.stdout
    );
    assert!(
        !echoed(&private),
        "a 127.0.0.1-only service answered through the tunnel: {:#?}",
        private.stdout
    );
    assert!(
        local_peers.is_empty(),
        "the 127.0.0.1-only service accepted {local_peers:?}"
    );
    // The server sidecar connected the pod's own address, and says so.
    let inbound: Vec<_> = done
        .report()
        .connections
        .iter()
        .filter(|c| c.direction == "inbound")
        .collect();
    assert_eq!(inbound.len(), 2, "{inbound:#?}");
    let to = |port: u16| {
        inbound
            .iter()
            .find(|c| c.original_dst == Some(SocketAddr::new(pods.b.addr, port)))
            .unwrap_or_else(|| panic!("no inbound connection to port {port}: {inbound:#?}"))
    };
    assert_eq!(to(APP_PORT).outcome, "ok");
    assert!(
        !to(APP_PORT).upstream_leg_spliced,
        "nothing is spliced without --sockmap (mtls.rs checks the spliced hop)"
    );
    assert_eq!(to(LOCAL_ONLY_PORT).outcome, "upstream_connect_failed");
    assert_no_leftovers(done.pid);
}

/// Permissive mode: a peer that answers on the tunnel port with a certificate of another CA
/// (an active attacker, or a misconfigured sidecar) gets no plaintext fallback; the
/// connection fails and `sidecar_tunnel_failures_total{reason="handshake"}` counts it.
#[test]
fn permissive_mode_never_downgrades_after_a_failed_handshake() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("tunnel-downgrade");
    certs.ca("ca", TD);
    certs.ca("rogue", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let rogue_tls = certs.issue("rogue", SERVER_ID, "rogue-server", &[]);
    let pods = pods(2);
    // Pod B answers on 15008 with an untrusted certificate; its app listens in plaintext.
    let server = start_server(&pods, &rogue_tls, ports::take());

    let admin: SocketAddr = ([127, 0, 0, 1], ports::take()).into();
    let script = format!(
        "{}; echo ECHO-DONE; exec cat",
        echo(&pods, APP_PORT).join(" ")
    );
    let mut client = SidecarRun::builder(ports::take())
        .wrapped_in(pods.a.enter())
        .arg("--tls-dir")
        .arg(&client_tls)
        .arg("--no-inbound")
        .arg("--permissive")
        .arg("--admin-addr")
        .arg(admin.to_string())
        .command(["sh", "-c", &script])
        .start();
    assert!(
        wait_until(RUN_TIMEOUT, || client
            .stdout_lines()
            .iter()
            .any(|l| l.trim() == "ECHO-DONE")),
        "the echo did not finish: {}",
        client.stderr_text()
    );
    let metrics = pods.a.http_get(admin, "/metrics");
    let done = client.finish(RUN_TIMEOUT);
    drop(stop(server));

    assert!(
        !echoed(&done),
        "the connection fell back to plaintext: {:#?}",
        done.stdout
    );
    let conns = outbound(done.report());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(conns[0].outcome, "tunnel_failed", "{:?}", conns[0]);
    assert!(
        metrics.contains("sidecar_tunnel_failures_total{reason=\"handshake\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sidecar_tunnel_failures_total{reason=\"no_answer\"} 0"),
        "{metrics}"
    );
    assert_no_leftovers(done.pid);
}

/// The outbound policy can require the server's verified identity for a destination: a
/// sidecar of the trust domain with another identity is refused after the handshake (the
/// app's connection fails, the denying rule is counted), the expected one is let through.
#[test]
fn outbound_policy_requires_the_server_identity() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("tunnel-server-id");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let impostor_tls = certs.issue("ca", "spiffe://example.org/ns/demo/sa/impostor", "imp", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = pods(3);
    let policy = certs.write(
        "policy.toml",
        &format!(
            r#"
[[rule]]
name = "app-is-served-by-server"
action = "allow"
direction = "outbound"
destinations = ["{b}/32"]
ports = [{APP_PORT}]
servers = ["{SERVER_ID}"]

[[rule]]
name = "nobody-else"
action = "deny"
direction = "outbound"
destinations = ["{b}/32"]
ports = [{APP_PORT}]
"#,
            b = pods.b.addr
        ),
    );
    let client = |port: u16| {
        SidecarRun::builder(port)
            .meshed_client_of(&pods, &client_tls)
            .arg("--policy")
            .arg(&policy)
            .command(echo(&pods, APP_PORT))
            .start()
            .finish(RUN_TIMEOUT)
    };

    let impostor = start_server(&pods, &impostor_tls, ports::take());
    let refused = client(ports::take());
    let impostor_done = stop(impostor);
    assert!(
        !echoed(&refused),
        "an impostor server was let through: {:#?}",
        refused.stdout
    );
    let conns = outbound(refused.report());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(conns[0].outcome, "policy_denied", "{:?}", conns[0]);
    let policy = refused.report().policy.as_ref().expect("policy report");
    assert_eq!(policy.count("nobody-else", "deny"), 1, "{policy:#?}");
    // The impostor never learnt where the app was going: no CONNECT, no local connect.
    assert!(
        impostor_done
            .report()
            .connections
            .iter()
            .all(|c| c.upstream_local.is_none()),
        "{:#?}",
        impostor_done.report().connections
    );

    let server = start_server(&pods, &server_tls, ports::take());
    let allowed = client(ports::take());
    drop(stop(server));
    assert!(echoed(&allowed), "{:#?}", allowed.stdout);
    let conns = outbound(allowed.report());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(conns[0].dst_identity.as_deref(), Some(SERVER_ID));
    assert_no_leftovers(refused.pid);
    assert_no_leftovers(allowed.pid);
}

/// A peer that passed mTLS and then floods HTTP/2 with streams it resets at once ("rapid
/// reset") is sent away with GOAWAY, and counted; another peer's connections keep working
/// meanwhile and after.
#[test]
fn a_rapid_reset_flood_is_sent_away_and_other_peers_keep_working() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let Abuse {
        _certs,
        client_tls,
        abuser_tls,
        pods,
        server,
    } = abuse("tunnel-reset-flood", 4);

    // The flood: straight from pod A (no sidecar of ours), with a certificate of the mesh.
    let args = ["hbone-reset-flood".into(), "--streams=20000".into()];
    let line: FloodLine = flood_from_a(&pods, &abuser_tls, &args);
    // The flooder is cut short. It sees the GOAWAY's reason unless its own writes hit the
    // closed socket first (then it sees the broken pipe); the server's count below is what
    // says it was sent away.
    assert!(line.reset < 20_000, "the flood was cut short: {line:?}");
    assert!(
        line.goaway.is_none() || line.goaway.as_deref() == Some("ENHANCE_YOUR_CALM"),
        "{line:?}"
    );

    // Another peer, after the flood: its connection is served.
    let after = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .command(echo(&pods, APP_PORT))
        .start()
        .finish(RUN_TIMEOUT);
    assert!(echoed(&after), "a well-behaved peer: {:#?}", after.stdout);

    let done = stop(server);
    done.assert_exit_code(0);
    let rejections = &done.report().inbound_rejections;
    let sent_away: u64 = ["rapid_reset", "enhance_your_calm"]
        .iter()
        .filter_map(|r| rejections.get(*r))
        .sum();
    assert_eq!(sent_away, 1, "one connection sent away: {rejections:?}");
    assert!(
        done.stderr_text()
            .contains("HBONE connection sent away (GOAWAY)"),
        "logged:\n{}",
        done.stderr_text()
    );
    assert_no_leftovers(done.pid);
}

/// A sidecar that exits right after its app closed its connections still ends their streams
/// cleanly: their last frames, then GOAWAY and TLS close_notify reach the peer before the
/// connection closes, so the server side records every stream as `ok`, none as cut by a
/// dropped socket. The server's app closes first (it answers and hangs up), so the client's
/// END_STREAM is the last frame of each stream; 16 of them end together, and the sidecar
/// exits at once. The client's sidecar runs on one CPU (as in a pod limited to one), where
/// its exit is most likely to overtake the task that writes those frames.
#[test]
fn an_exiting_sidecar_ends_its_finished_streams_cleanly() {
    if !sidecar_tests::privileged() || !require("nsenter") || !require("taskset") {
        return;
    }
    const STREAMS: usize = 16;
    const ROUNDS: usize = 4;
    const SIZE: usize = 64 * 1024;
    const RUNS: usize = 3;
    let _serial = serial();
    let certs = Scratch::new("tunnel-exit");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = pods(5);
    let mut server = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(&server_tls)
        .command([
            CLIENT,
            "serve",
            &format!("--addr=0.0.0.0:{APP_PORT}"),
            &format!("--close-after={}", ROUNDS * SIZE),
        ])
        .start();
    server.wait_ready(READY_TIMEOUT);

    let one_cpu: Vec<String> = ["taskset", "-c", "0"]
        .into_iter()
        .map(String::from)
        .chain(pods.a.enter())
        .collect();
    for run in 0..RUNS {
        let client = SidecarRun::builder(ports::take())
            .meshed_client_of(&pods, &client_tls)
            .wrapped_in(&one_cpu)
            .command([
                CLIENT,
                "pingpong",
                &format!("--addr={}:{APP_PORT}", pods.b.addr),
                &format!("--size={SIZE}"),
                &format!("--rounds={ROUNDS}"),
                &format!("--count={STREAMS}"),
                "--parallel",
            ])
            .start()
            .finish(RUN_TIMEOUT);
        client.assert_exit_code(0);
        let conns = outbound(client.report());
        assert_eq!(conns.len(), STREAMS, "run {run}: {conns:#?}");
        assert!(conns.iter().all(|c| c.outcome == "ok"), "{conns:#?}");
    }

    let done = stop(server);
    done.assert_exit_code(0);
    let inbound: Vec<_> = done
        .report()
        .connections
        .iter()
        .filter(|c| c.direction == "inbound")
        .collect();
    assert_eq!(inbound.len(), RUNS * STREAMS, "{inbound:#?}");
    let cut: Vec<_> = inbound.iter().filter(|c| c.outcome != "ok").collect();
    assert!(cut.is_empty(), "streams the server saw cut: {cut:#?}");
    assert_no_leftovers(done.pid);
}

/// Runs a flood subcommand of `sidecar-testclient` (`args`) from pod A, with no sidecar of
/// ours in the way and a certificate of the mesh (`tls_dir`), against pod B's tunnel port and
/// app; returns the one line it prints.
fn flood_from_a<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    pods: &PodPair,
    tls_dir: &str,
    args: &[String],
) -> T {
    let enter = pods.a.enter();
    let flood = host::output_with_timeout(
        std::process::Command::new(&enter[0])
            .args(&enter[1..])
            .arg(CLIENT)
            .args(args)
            .arg(format!("--addr={}:15008", pods.b.addr))
            .arg(format!("--tls-dir={tls_dir}"))
            .arg(format!("--target={}:{APP_PORT}", pods.b.addr)),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&flood.stdout).to_string();
    assert!(
        flood.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&flood.stderr)
    );
    let [line]: [T; 1] = parse_lines(std::slice::from_ref(&stdout))
        .try_into()
        .unwrap_or_else(|l| panic!("one flood line: {l:?}"));
    line
}

/// `hbone-raw-flood --kind=<kind> --frames=<frames>` from pod A.
fn raw_flood(pods: &PodPair, tls_dir: &str, kind: &str, frames: u64) -> RawFloodLine {
    let args = [
        "hbone-raw-flood".into(),
        format!("--kind={kind}"),
        format!("--frames={frames}"),
    ];
    flood_from_a(pods, tls_dir, &args)
}

/// Two pods, pod B's sidecar serving, and certificates of the mesh for a well-behaved client
/// and for an abuser.
struct Abuse {
    _certs: Scratch,
    client_tls: String,
    abuser_tls: String,
    pods: PodPair,
    server: SidecarRun,
}

fn abuse(name: &str, tag: u8) -> Abuse {
    let certs = Scratch::new(name);
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let abuser_tls = certs.issue(
        "ca",
        "spiffe://example.org/ns/demo/sa/abuser",
        "abuser",
        &[],
    );
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = pods(tag);
    let server = start_server(&pods, &server_tls, ports::take());
    Abuse {
        _certs: certs,
        client_tls,
        abuser_tls,
        pods,
        server,
    }
}

/// A peer that passed mTLS and then sends a header block that never ends (the HTTP/2
/// CONTINUATION flood) is sent away with GOAWAY after a few frames, long before the 16 KiB
/// header list bound could be outgrown in memory, and counted; and a peer that opens more
/// streams at once than the 200 the server allows gets the rest refused: no more than 200
/// reach the app. Another peer is served after both.
#[test]
fn header_floods_and_streams_past_the_limit_are_refused_over_the_wire() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let Abuse {
        _certs,
        client_tls,
        abuser_tls,
        pods,
        server,
    } = abuse("tunnel-raw-flood", 6);

    // 1,000 CONTINUATION frames of 16 KiB would be 16 MiB of header block.
    let continuation = raw_flood(&pods, &abuser_tls, "continuation", 1000);
    assert_eq!(
        continuation.goaway.as_deref(),
        Some("ENHANCE_YOUR_CALM"),
        "{continuation:?}"
    );
    assert_eq!(continuation.answered, 0, "{continuation:?}");

    // 300 streams at once where SETTINGS_MAX_CONCURRENT_STREAMS is 200.
    let streams = raw_flood(&pods, &abuser_tls, "streams", 300);
    assert_eq!(streams.frames_sent, 300, "{streams:?}");
    assert!(streams.answered <= 200, "{streams:?}");
    assert!(streams.refused >= 100, "{streams:?}");

    let after = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .command(echo(&pods, APP_PORT))
        .start()
        .finish(RUN_TIMEOUT);
    assert!(echoed(&after), "a well-behaved peer: {:#?}", after.stdout);

    let done = stop(server);
    done.assert_exit_code(0);
    let report = done.report();
    assert_eq!(
        report.inbound_rejections.get("enhance_your_calm"),
        Some(&1),
        "the CONTINUATION flood, counted: {:?}",
        report.inbound_rejections
    );
    // What reached the app (it prints a line per accepted connection): the abuser's streams
    // that were let in, and the good peer's one.
    let accepted = done
        .stdout
        .iter()
        .filter(|l| l.contains("\"peer\""))
        .count();
    assert!(
        (2..=201).contains(&accepted),
        "{accepted} connections reached the app"
    );
    assert_no_leftovers(done.pid);
}

/// Anyone can reach the tunnel port: a scanner failing handshake after handshake gets each
/// one counted, but only the first few of a reason in an interval logged one by one, and
/// the rest summed up in one line, so the sidecar's log is not the scanner's to fill.
#[test]
fn a_scanner_of_the_tunnel_port_is_counted_not_logged_line_by_line() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    const PROBES: u64 = 60;
    let _serial = serial();
    let certs = Scratch::new("tunnel-scanner");
    certs.ca("ca", TD);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = pods(7);
    let server = start_server(&pods, &server_tls, ports::take());

    // One byte that is not a TLS ClientHello, then a read: refused, again and again.
    let enter = pods.a.enter();
    let script = format!(
        "i=0; while [ $i -lt {PROBES} ]; do {CLIENT} connect-fail --addr {}:15008 >/dev/null; \
         i=$((i+1)); done",
        pods.b.addr
    );
    let probes = host::output_with_timeout(
        std::process::Command::new(&enter[0])
            .args(&enter[1..])
            .args(["sh", "-c", &script]),
        Duration::from_secs(120),
    );
    assert!(probes.status.success(), "{probes:?}");

    let done = stop(server);
    done.assert_exit_code(0);
    let counted: u64 = done.report().inbound_rejections.values().sum();
    assert_eq!(counted, PROBES, "{:?}", done.report().inbound_rejections);
    let stderr = done.stderr_text();
    let logged = stderr
        .lines()
        .filter(|l| l.contains("inbound connection refused"))
        .count() as u64;
    let summed: u64 = stderr
        .lines()
        .filter_map(|l| {
            let (before, _) = l.split_once(" more inbound refusal(s)")?;
            before.split_whitespace().last()?.parse::<u64>().ok()
        })
        .sum();
    assert!(
        logged <= 20,
        "{logged} lines for {PROBES} refusals:\n{stderr}"
    );
    assert_eq!(
        logged + summed,
        PROBES,
        "every refusal logged or summed up:\n{stderr}"
    );
    assert_no_leftovers(done.pid);
}

/// The client end checks the server's certificate as the server checks the client's: one
/// made for clients only (extended key usage), or with no key usage at all (no X.509-SVID),
/// is refused, and the connection fails instead of reaching whatever answered. The server is
/// `openssl s_server` (a sidecar will not load such a certificate).
#[test]
fn a_server_certificate_not_made_for_servers_is_refused() {
    if !sidecar_tests::privileged() || !require("nsenter") || !require("openssl") {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("tunnel-server-usage");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let san = format!("subjectAltName = URI:{SERVER_ID}\n");
    let cases = [
        (
            certs.openssl_issue(
                "ca",
                "client-auth-only",
                &format!("{san}keyUsage = digitalSignature\nextendedKeyUsage = clientAuth\n"),
            ),
            "does not allow extended key usage for server authentication",
        ),
        (
            certs.openssl_issue(
                "ca",
                "no-key-usage",
                &format!("{san}extendedKeyUsage = serverAuth, clientAuth\n"),
            ),
            "no key usage extension",
        ),
    ];
    let pods = pods(8);
    for (server_cert, expected) in &cases {
        let enter = pods.b.enter();
        let mut server = std::process::Command::new(&enter[0])
            .args(&enter[1..])
            .args([
                "openssl", "s_server", "-accept", "15008", "-tls1_3", "-alpn", "h2",
            ])
            .arg("-cert")
            .arg(format!("{server_cert}/cert.pem"))
            .arg("-key")
            .arg(format!("{server_cert}/key.pem"))
            // s_server quits at EOF on its stdin: held open until it is killed.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting openssl s_server");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
            server.stdout.take().expect("piped stdout"),
        ));
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.contains("ACCEPT"))),
            "openssl s_server did not start"
        );
        let done = SidecarRun::builder(ports::take())
            .meshed_client_of(&pods, &client_tls)
            .command(echo(&pods, APP_PORT))
            .start()
            .finish(RUN_TIMEOUT);
        let _ = server.kill();
        let _ = server.wait();
        assert!(!echoed(&done), "{expected}: {:#?}", done.stdout);
        let conns = outbound(done.report());
        assert_eq!(conns.len(), 1, "{conns:#?}");
        assert_eq!(conns[0].outcome, "tunnel_failed", "{:?}", conns[0]);
        let error = conns[0].error.clone().unwrap_or_default();
        assert!(error.contains(expected), "{expected}: {error}");
        assert_no_leftovers(done.pid);
    }
}

/// Drain, as in a sidecar container restart: the server pod's app keeps running while its
/// sidecar gets SIGTERM and a new one takes its place, under load from the client pod.
/// `LONG` connections are mid-exchange when the SIGTERM comes: they finish on the old HBONE
/// connection, which the old sidecar drains after its GOAWAY. Short connections run one
/// after the other throughout: none fails, none is put on the connection that was sent
/// away, and those made once the replacement is up ride a new connection to it. The
/// replacement is started first, with `--port-wait-ms`: it gets ready and waits for its
/// ports; the old sidecar gives them up as its drain starts (SIGTERM), and the new one binds
/// them within milliseconds while the old one still drains. The moment in between (nothing
/// listens) is ridden out by the client's connect retries.
#[test]
fn a_server_sidecar_replaced_under_load_costs_no_connection() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    const LONG: usize = 4;
    const LONG_SIZE: usize = 16 * 1024;
    const SHORT_SIZE: usize = 4096;
    const SHORT_MAX: usize = 1000;
    /// Loops of short connections, one connection at a time each.
    const SHORT_LOOPS: usize = 3;
    /// Short connections to see before the SIGTERM, and again once the replacement is up.
    const SHORT_STEP: usize = 10;
    const STEP_TIMEOUT: Duration = Duration::from_secs(60);
    let _serial = serial();
    let certs = Scratch::new("tunnel-drain");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = pods(9);
    let app = pods.b.serve(([0, 0, 0, 0], APP_PORT).into());
    // The server pod's sidecar, with a command that only waits (the app runs beside it).
    // The replacement has the same ports, and waits for them; only its admin address
    // differs (the old sidecar answers there until it exits).
    let proxy_port = ports::take();
    let server_sidecar = |admin: SocketAddr| {
        SidecarRun::builder(proxy_port)
            .wrapped_in(pods.b.enter())
            .env("SIDECAR_LOG", "info")
            .arg("--tls-dir")
            .arg(&server_tls)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--drain-timeout-secs=120")
            .arg("--port-wait-ms=60000")
            .command(["sh", "-c", "echo READY; exec cat"])
            .start()
    };
    let old_admin: SocketAddr = ([127, 0, 0, 1], ports::take()).into();
    let mut old = server_sidecar(old_admin);
    old.wait_ready(READY_TIMEOUT);

    let (go, halt) = (certs.path("go"), certs.path("halt"));
    let dst = format!("--addr={}:{APP_PORT}", pods.b.addr);
    let long = format!(
        "{CLIENT} pingpong {dst} --size={LONG_SIZE} --rounds=1000000 --count={LONG} \
         --until={} --pause-ms=20",
        halt.display()
    );
    let short = format!(
        "{CLIENT} echo {dst} --size={SHORT_SIZE} --count={SHORT_MAX} --after={} --until={} \
         --pause-ms=20",
        go.display(),
        halt.display()
    );
    // The long connections and SHORT_LOOPS loops of short ones, each in the background;
    // the script fails if any of them did.
    let mut script = format!("{long} & pids=$!;");
    for _ in 0..SHORT_LOOPS {
        script += &format!(" {short} & pids=\"$pids $!\";");
    }
    script += " for p in $pids; do wait $p || exit 1; done";
    // Debug lines of the outbound path say when a stream had to be tried again.
    let mut client = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .env("SIDECAR_LOG", "warn,sidecar::proxy::outbound=debug")
        .command(["sh", "-c", &script])
        .start();
    let shorts_done = |client: &SidecarRun| {
        parse_lines::<EchoLine>(&client.stdout_lines())
            .iter()
            .filter(|l| l.sent == SHORT_SIZE as u64)
            .count()
    };

    // The long connections are open on the old sidecar; then the short ones start.
    let open_on_old = || {
        let raw = pods.b.http_get(old_admin, "/connections");
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str::<serde_json::Value>(body)
            .map_or(0, |v| v["count"].as_u64().unwrap_or(0) as usize)
    };
    assert!(
        wait_until(STEP_TIMEOUT, || open_on_old() >= LONG),
        "the long connections did not open: {}",
        client.stderr_text()
    );
    std::fs::write(&go, "").unwrap();
    assert!(
        wait_until(STEP_TIMEOUT, || shorts_done(&client) >= SHORT_STEP),
        "short connections: {:#?}\n{}",
        client.stdout_lines(),
        client.stderr_text()
    );

    // The replacement starts, gets ready and waits for the ports; then the SIGTERM: the old
    // sidecar gives its ports up as its drain starts, and the new one listens the moment
    // it does.
    let mut new = server_sidecar(([127, 0, 0, 1], ports::take()).into());
    assert!(
        wait_until(STEP_TIMEOUT, || new
            .stderr_text()
            .contains("waiting for them")),
        "the replacement did not wait for its ports: {}",
        new.stderr_text()
    );
    old.signal(libc::SIGTERM);
    new.wait_ready(READY_TIMEOUT);
    assert!(pods.b.listens_on(15008));
    assert!(
        old.wait_exit(Duration::ZERO).is_none(),
        "the old sidecar exited with the long connections still open: {}",
        old.stderr_text()
    );
    // Each loop's connection under way as the replacement came up may still finish on the
    // old sidecar: wait for SHORT_STEP more than those.
    let before_new = shorts_done(&client);
    assert!(
        wait_until(STEP_TIMEOUT, || shorts_done(&client)
            >= before_new + SHORT_LOOPS + SHORT_STEP),
        "short connections after the replacement: {:#?}\n{}",
        client.stdout_lines(),
        client.stderr_text()
    );
    assert!(
        old.wait_exit(Duration::ZERO).is_none(),
        "the old sidecar did not wait for the long connections: {}",
        old.stderr_text()
    );

    // The load stops: the long connections end, so the old sidecar's drain ends.
    std::fs::write(&halt, "").unwrap();
    let client = client.finish(RUN_TIMEOUT);
    let old = old.finish(RUN_TIMEOUT);
    new.signal(libc::SIGTERM);
    let new = new.finish(RUN_TIMEOUT);
    drop(app.stop());

    let lines: Vec<EchoLine> = client.parse_stdout();
    let failed: Vec<_> = lines.iter().filter(|l| !l.ok).collect();
    assert!(failed.is_empty(), "the app saw failures: {failed:#?}");
    let longs = lines.iter().filter(|l| l.sent > SHORT_SIZE as u64).count();
    assert_eq!(longs, LONG, "{lines:#?}");
    let shorts = lines.len() - LONG;
    client.assert_exit_code(0);
    let conns = outbound(client.report());
    assert_eq!(conns.len(), lines.len(), "{conns:#?}");
    let not_ok: Vec<_> = conns.iter().filter(|c| c.outcome != "ok").collect();
    assert!(not_ok.is_empty(), "{not_ok:#?}");
    // No stream was lost with the connection sent away: every stream sent before the client
    // knew finished there. A stream whose slot was taken just as the GOAWAY came in is
    // refused by h2 before it is written, or (written or still queued in h2) lies above the
    // GOAWAY's last stream id, which says the peer never processed it: either goes to a
    // fresh connection. A client cannot avoid that race and it costs nothing; anything else
    // (a reset, an I/O error) would be a stream lost.
    let goaway_refused = "not a result of an error";
    let lost: Vec<_> = client
        .stderr
        .iter()
        .filter(|l| l.contains("was lost before the stream opened"))
        .filter(|l| !l.contains(goaway_refused))
        .collect();
    assert!(lost.is_empty(), "{lost:#?}");
    let unsent = client
        .stderr
        .iter()
        .filter(|l| {
            l.contains("went away before the stream was sent")
                || (l.contains("was lost before the stream opened") && l.contains(goaway_refused))
        })
        .count();
    let retried = conns.iter().filter(|c| c.connect_retries > 0).count();
    eprintln!(
        "{shorts} short connections, {before_new} before the replacement was up; {retried} \
         rode out the moment without a listener with a connect retry; {unsent} went to a \
         fresh connection unsent"
    );

    let inbound = |done: &Finished| -> Vec<sidecar_tests::report::Connection> {
        done.report()
            .connections
            .iter()
            .filter(|c| c.direction == "inbound")
            .cloned()
            .collect()
    };
    let (on_old, on_new) = (inbound(&old), inbound(&new));
    for (name, streams) in [("old", &on_old), ("new", &on_new)] {
        let not_ok: Vec<_> = streams.iter().filter(|c| c.outcome != "ok").collect();
        assert!(
            not_ok.is_empty(),
            "the {name} sidecar's streams: {not_ok:#?}"
        );
    }
    let long_on = |streams: &[sidecar_tests::report::Connection]| {
        streams
            .iter()
            .filter(|c| c.bytes_from_client > SHORT_SIZE as u64)
            .count()
    };
    assert_eq!(long_on(&on_old), LONG, "{on_old:#?}");
    assert_eq!(long_on(&on_new), 0, "{on_new:#?}");
    assert_eq!(on_old.len() + on_new.len(), conns.len());
    // Every short connection that started after the replacement was up went to it (one per
    // loop may have been under way as it came up).
    assert!(
        on_new.len() + SHORT_LOOPS >= shorts - before_new && on_new.len() >= SHORT_STEP,
        "{} short connections, {before_new} before the replacement, {} on it",
        shorts,
        on_new.len()
    );
    assert!(
        !old.stderr_text().contains("after the drain deadline"),
        "{}",
        old.stderr_text()
    );
    assert_no_leftovers(old.pid);
    assert_no_leftovers(new.pid);
}

/// A peer whose dial hangs (its tunnel port takes the TCP connect, then never answers TLS)
/// holds up only the connects going to it: while that dial hangs, connections to another
/// peer, each needing the pool, open and finish. The pool dials one connection at a time
/// per peer and never under its lock.
#[test]
fn a_hanging_peer_does_not_hold_up_streams_to_another() {
    if !sidecar_tests::privileged() || !require("nsenter") {
        return;
    }
    const OTHERS: usize = 20;
    let _serial = serial();
    let certs = Scratch::new("tunnel-hang");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = pods(10);
    let server = start_server(&pods, &server_tls, ports::take());
    // The hanging peer: an address of pod A's own, its tunnel port a listener that never
    // accepts.
    let std::net::IpAddr::V4(a) = pods.a.addr else {
        panic!("IPv4 pods")
    };
    let [x, y, z, _] = a.octets();
    let hanging = std::net::Ipv4Addr::new(x, y, z, 200);
    let out = pods
        .a
        .run(&["ip", "addr", "add", &format!("{hanging}/32"), "dev", "lo"]);
    assert!(out.status.success(), "{out:?}");
    let silent = pods.a.listen_silently((hanging, 15008).into());

    let go = certs.path("go");
    let script = format!(
        "{CLIENT} echo --addr={hanging}:{APP_PORT} --size=64 & p=$!; \
         {CLIENT} echo --addr={b}:{APP_PORT} --size=4096 --count={OTHERS} --after={go}; \
         s=$?; wait $p; exit $s",
        b = pods.b.addr,
        go = go.display()
    );
    // A long connect deadline, so the hanging dial outlasts the test's steps by far (each
    // attempt gets a third of it).
    let mut client = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .arg("--mesh-cidrs")
        .arg(format!("{hanging}/32"))
        .arg("--connect-timeout-ms=120000")
        .command(["sh", "-c", &script])
        .start();
    assert!(
        wait_until(Duration::from_secs(60), || pods.a.tcp_sockets(15008, "01")
            > 0),
        "the dial to the hanging peer never connected: {}",
        client.stderr_text()
    );
    std::fs::write(&go, "").unwrap();
    let others_done = |client: &SidecarRun| -> Vec<EchoLine> {
        parse_lines::<EchoLine>(&client.stdout_lines())
            .into_iter()
            .filter(|l| l.sent == 4096)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || others_done(&client).len()
            == OTHERS),
        "connections to the other peer: {:#?}\n{}",
        client.stdout_lines(),
        client.stderr_text()
    );
    // All of them ended while the dial to the hanging peer still hung.
    let lines: Vec<EchoLine> = parse_lines(&client.stdout_lines());
    assert_eq!(lines.len(), OTHERS, "{lines:#?}");
    assert!(lines.iter().all(|l| l.ok), "{lines:#?}");
    assert_eq!(
        pods.a.tcp_sockets(15008, "01"),
        1,
        "the hanging dial is still queued"
    );

    // Ends the hang: the queued connection is reset, that dial fails.
    drop(silent);
    let done = client.finish(RUN_TIMEOUT);
    drop(stop(server));
    let conns = outbound(done.report());
    assert_eq!(conns.len(), OTHERS + 1, "{conns:#?}");
    let to_hanging: Vec<_> = conns
        .iter()
        .filter(|c| c.original_dst.map(|d| d.ip()) == Some(hanging.into()))
        .collect();
    assert_eq!(to_hanging.len(), 1, "{conns:#?}");
    assert_eq!(
        to_hanging[0].outcome, "tunnel_failed",
        "{:?}",
        to_hanging[0]
    );
    assert!(
        conns
            .iter()
            .filter(|c| c.original_dst.map(|d| d.ip()) == Some(pods.b.addr))
            .all(|c| c.outcome == "ok"),
        "{conns:#?}"
    );
    assert_no_leftovers(done.pid);
}
