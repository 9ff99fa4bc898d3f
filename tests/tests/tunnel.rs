//! Who may reach what through the mTLS tunnel, between two sidecars in their own network
//! namespaces ("pods") joined by a veth pair: the server side delivers only to what the
//! workload exposes on its own address, the client side never downgrades to plaintext when
//! something on the tunnel port fails to prove itself, and the outbound policy can require
//! the server's verified identity per destination.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use sidecar_tests::{
    assert_no_leftovers,
    host::{self, wait_until},
    netns::PodPair,
    ports,
    protocol::{EchoLine, parse_lines},
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

/// An echo server in pod B with no sidecar around it, e.g. a localhost-only service of the
/// pod. Ends when dropped.
struct BareServer {
    child: Child,
    peers: BufReader<std::process::ChildStdout>,
}

impl BareServer {
    fn start(pods: &PodPair, addr: SocketAddr) -> Self {
        let enter = pods.b.enter();
        let mut child = Command::new(&enter[0])
            .args(&enter[1..])
            .args([CLIENT, "serve", &format!("--addr={addr}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the bare server");
        let mut peers = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut first = String::new();
        peers.read_line(&mut first).expect("reading READY");
        assert_eq!(first.trim(), "READY", "bare server on {addr}");
        Self { child, peers }
    }

    /// Every connection it accepted (one JSON line each), after it stopped.
    fn stop(mut self) -> Vec<String> {
        drop(self.child.stdin.take());
        let _ = host::wait_child(&mut self.child, Duration::from_secs(5));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut lines = Vec::new();
        let mut line = String::new();
        while self.peers.read_line(&mut line).is_ok_and(|n| n > 0) {
            lines.push(std::mem::take(&mut line));
        }
        lines
    }
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
    let local_only = BareServer::start(&pods, ([127, 0, 0, 1], LOCAL_ONLY_PORT).into());
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
    // The impostor never learnt where the app was going: no preamble, no local connect.
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
