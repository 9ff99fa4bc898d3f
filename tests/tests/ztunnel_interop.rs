//! Interop with Istio's ztunnel, the reference HBONE peer: our sidecar and a ztunnel (built
//! from Istio's source, `../shared/interop/ztunnel/`) in two "pods" (network namespaces joined
//! by a veth pair, no route out), each side checking the other's verified identity.
//!
//! HBONE, as ztunnel speaks it: TLS 1.3 to the peer's port 15008 with ALPN `h2`, no SNI, no
//! resumption (ztunnel's client disables it, its server starts each handshake afresh), both
//! certificates carrying one SPIFFE URI SAN (ztunnel checks the server's against the identity
//! its `local.yaml` gives the destination, and serverAuth/clientAuth EKUs when the extension
//! is there); then one HTTP/2 CONNECT per connection with `:authority` = the original
//! destination `ip:port` (which must be an address of the workload ztunnel serves),
//! `forwarded: for="<client ip:port>"`, `baggage` and `traceparent`; `200` opens the stream,
//! `401` is ztunnel's policy deny, `503` an upstream that refused. Certificates for our side
//! come from ztunnel's test CA (`sidecar cert issue --ca-dir ../shared/interop/ztunnel`).
//!
//! - `ztunnel_pair_carries_hbone_and_enforces_its_deny_policy`: ztunnel to ztunnel, no
//!   sidecar of ours: the anchor (if it fails, the environment is at fault, not our HBONE);
//! - (a) our client → ztunnel's server, (b) ztunnel's client → our server, (c) 200
//!   concurrent streams and 64 MiB byte-exact both ways in both orientations, (d) a policy
//!   deny on either side refuses the stream, and the other side counts it.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use sidecar_tests::{
    assert_no_leftovers,
    host::output_with_timeout,
    netns::{Netns, PodPair},
    ports,
    protocol::{EchoLine, parse_lines},
    report::{Connection, Report},
    require,
    run::{Finished, SidecarRun},
    scratch::Scratch,
    serial,
    ztunnel::{self, AccessLine, LocalConfig, Ztunnel},
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Generous: 64 MiB each way through a debug build of the sidecar.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long ztunnel may take to write the access line of a connection that ended.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
const SMALL: usize = 4096;
const LARGE: usize = 64 << 20;
const CONCURRENT: usize = 200;

fn client_id() -> String {
    ztunnel::identity("client")
}

fn server_id() -> String {
    ztunnel::identity("server")
}

/// Pod A (`client`) at 10.214.<tag>.1, pod B (`server`) at 10.214.<tag>.2.
fn pods(tag: u8) -> PodPair {
    PodPair::create_in("szt", 214, tag)
}

/// Whether this test can run here (privileges, tools, the ztunnel binary). Fails in CI.
fn can_run(redirect: bool) -> bool {
    sidecar_tests::privileged()
        && require("nsenter")
        && (!redirect || require("iptables"))
        && ztunnel::available()
}

/// The `peer` of each JSON line of a `serve` app.
fn peers_of(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter_map(|v| v["peer"].as_str().map(String::from))
        .collect()
}

fn echo_args(dst: SocketAddr, size: usize, count: usize) -> Vec<String> {
    vec![
        CLIENT.into(),
        "echo".into(),
        format!("--addr={dst}"),
        format!("--size={size}"),
        format!("--count={count}"),
        format!("--concurrency={count}"),
    ]
}

/// `echo` run in a pod by itself (behind that pod's ztunnel and its redirect rule).
fn echo_in(ns: &Netns, dst: SocketAddr, size: usize, count: usize) -> Vec<EchoLine> {
    let enter = ns.enter();
    let out = output_with_timeout(
        Command::new(&enter[0])
            .args(&enter[1..])
            .args(echo_args(dst, size, count)),
        RUN_TIMEOUT,
    );
    let stdout: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    if !out.status.success() {
        eprintln!(
            "echo in {} exited {}: {}",
            ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_lines(&stdout)
}

/// `echo` in pod A under our sidecar, which tunnels to pod B (`--mesh-cidrs <B>/32`).
fn echo_through_our_client(
    pods: &PodPair,
    tls: &str,
    dst: SocketAddr,
    size: usize,
    count: usize,
) -> Finished {
    SidecarRun::builder(ports::take())
        .meshed_client_of(pods, tls)
        .command(echo_args(dst, size, count))
        .start()
        .finish(RUN_TIMEOUT)
}

/// Our sidecar in pod B (HBONE on 15008), its app an echo server on `0.0.0.0:port`.
fn our_server(pods: &PodPair, tls: &str, port: u16, extra: &[&str]) -> SidecarRun {
    let mut builder = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(tls);
    for a in extra {
        builder = builder.arg(a);
    }
    let mut run = builder
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{port}")])
        .start();
    run.wait_ready(READY_TIMEOUT);
    run
}

fn stop(mut run: SidecarRun) -> Finished {
    run.release();
    run.finish(RUN_TIMEOUT)
}

fn all_ok(lines: &[EchoLine], count: usize, size: usize) -> bool {
    lines.len() == count && lines.iter().all(|l| l.ok && l.received == size as u64)
}

fn in_direction<'a>(report: &'a Report, direction: &str) -> Vec<&'a Connection> {
    report
        .connections
        .iter()
        .filter(|c| c.direction == direction)
        .collect()
}

/// Every connection of `direction` is an mTLS tunnel with `peer` at the other end, and ok.
fn assert_tunnelled(report: &Report, direction: &str, peer: &str, count: usize) {
    let conns = in_direction(report, direction);
    assert_eq!(conns.len(), count, "{direction}: {:#?}", report.connections);
    for c in conns {
        assert!(c.mtls(), "not an mTLS tunnel: {c:?}");
        assert_eq!(c.peer_identity(), Some(peer), "verified peer: {c:?}");
        assert_eq!(c.outcome, "ok", "{c:?}");
    }
}

/// ztunnel's access lines of `direction` for streams to `dst` (`dst.hbone_addr`).
fn access_to(zt: &Ztunnel, direction: &str, dst: SocketAddr, count: usize) -> Vec<AccessLine> {
    let dst = dst.to_string();
    let direction = direction.to_string();
    zt.wait_access(count, LOG_TIMEOUT, move |a| {
        a.direction() == Some(&direction) && a.get("dst.hbone_addr") == Some(&dst)
    })
}

/// Each line is a completed stream between our two identities, `size` bytes each way.
fn assert_access_ok(lines: &[AccessLine], count: usize, size: usize) {
    assert_eq!(lines.len(), count, "ztunnel access lines: {lines:#?}");
    for a in lines {
        assert!(a.ok(), "ztunnel logged a failure: {a:?}");
        assert_eq!(a.get("src.identity"), Some(client_id().as_str()), "{a:?}");
        assert_eq!(a.get("dst.identity"), Some(server_id().as_str()), "{a:?}");
        assert_eq!(
            (a.bytes("bytes_sent"), a.bytes("bytes_recv")),
            (size as u64, size as u64),
            "{a:?}"
        );
    }
}

fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// No sidecar of ours: a client behind ztunnel in A reaches an app behind ztunnel in B over
/// HBONE, both ztunnels log both identities; B's deny policy refuses the stream to one port
/// (401 to A, which logs it), the other port still works. Proves the harness, the pods, the
/// CA and the policy YAML the other tests rely on.
#[test]
fn ztunnel_pair_carries_hbone_and_enforces_its_deny_policy() {
    if !can_run(true) {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("zt-anchor");
    let pods = pods(1);
    let [open_port, denied_port] = ports::take_each();
    let open_app = pods.b.serve(([0, 0, 0, 0], open_port).into());
    let denied_app = pods.b.serve(([0, 0, 0, 0], denied_port).into());
    let config = LocalConfig::pods(&pods).deny("no-client", &[&client_id()], &[denied_port]);
    let server = Ztunnel::builder(&pods.b, "server")
        .config(&config)
        .start(&scratch);
    let client = Ztunnel::builder(&pods.a, "client")
        .config(&config)
        .redirect_outbound()
        .start(&scratch);
    let (open, denied) = (addr(pods.b.addr, open_port), addr(pods.b.addr, denied_port));

    let lines = echo_in(&pods.a, open, SMALL, 3);
    assert!(all_ok(&lines, 3, SMALL), "through two ztunnels: {lines:#?}");
    let lines = echo_in(&pods.a, denied, SMALL, 1);
    assert!(
        lines.len() == 1 && !lines[0].ok && lines[0].received == 0,
        "the denied stream: {lines:#?}"
    );

    assert_access_ok(&access_to(&server, "inbound", open, 3), 3, SMALL);
    assert_access_ok(&access_to(&client, "outbound", open, 3), 3, SMALL);
    let refused = access_to(&server, "inbound", denied, 1);
    assert!(
        refused.len() == 1
            && refused[0]
                .error()
                .is_some_and(|e| e.contains("explicitly denied by: default/no-client")),
        "{refused:#?}"
    );
    let told = access_to(&client, "outbound", denied, 1);
    assert!(
        told.len() == 1 && told[0].error() == Some("http status: 401 Unauthorized"),
        "{told:#?}"
    );
    assert_eq!(
        server.metric_sum(
            "istio_tcp_connections_failed_total",
            &["reporter=\"destination\"", "response_flags=\"DENY\""]
        ),
        1,
        "{}",
        server.metrics()
    );
    let app_peers = peers_of(&open_app.stop());
    assert_eq!(app_peers.len(), 3, "{app_peers:?}");
    assert!(
        peers_of(&denied_app.stop()).is_empty(),
        "a denied stream reached the app"
    );
    for zt in [client.stop(), server.stop()] {
        assert!(zt.status.success(), "ztunnel exited {}", zt.status);
    }
}

/// (a) An app behind OUR sidecar in A reaches an echo server behind ztunnel in B over HBONE.
/// Our record names ztunnel's verified identity; ztunnel's access log names ours.
#[test]
fn our_client_reaches_an_app_behind_ztunnel() {
    if !can_run(false) {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("zt-ours-to-zt");
    let client_tls = ztunnel::issue(&scratch, "client", "client");
    let pods = pods(2);
    let app_port = ports::take();
    let app = pods.b.serve(([0, 0, 0, 0], app_port).into());
    let zt = Ztunnel::builder(&pods.b, "server")
        .config(&LocalConfig::pods(&pods))
        .start(&scratch);
    let dst = addr(pods.b.addr, app_port);

    let done = echo_through_our_client(&pods, &client_tls, dst, SMALL, 3);
    done.assert_exit_code(0);
    let lines: Vec<EchoLine> = done.parse_stdout();
    assert!(all_ok(&lines, 3, SMALL), "{lines:#?}");
    assert_tunnelled(done.report(), "outbound", &server_id(), 3);
    for c in in_direction(done.report(), "outbound") {
        assert_eq!(
            c.dst_identity.as_deref(),
            Some(server_id().as_str()),
            "{c:?}"
        );
        assert_eq!(c.original_dst, Some(dst), "{c:?}");
    }
    assert_access_ok(&access_to(&zt, "inbound", dst, 3), 3, SMALL);
    // ztunnel delivers from pod B's own address (ENABLE_ORIG_SRC=false).
    let peers = peers_of(&app.stop());
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert!(
        peers
            .iter()
            .all(|p| p.starts_with(&format!("{}:", pods.b.addr))),
        "{peers:?}"
    );
    assert!(zt.stop().status.success());
    assert_no_leftovers(done.pid);
}

/// (b) A client behind ztunnel in A reaches an app behind OUR sidecar in B (inbound HBONE on
/// 15008). ztunnel verified our certificate against the identity its config gives pod B and
/// logs both; our record names ztunnel's verified client identity.
#[test]
fn a_client_behind_ztunnel_reaches_our_sidecar() {
    if !can_run(true) {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("zt-zt-to-ours");
    let server_tls = ztunnel::issue(&scratch, "server", "server");
    let pods = pods(3);
    let app_port = ports::take();
    let server = our_server(&pods, &server_tls, app_port, &[]);
    let zt = Ztunnel::builder(&pods.a, "client")
        .config(&LocalConfig::pods(&pods))
        .redirect_outbound()
        .start(&scratch);
    let dst = addr(pods.b.addr, app_port);

    let lines = echo_in(&pods.a, dst, SMALL, 3);
    assert!(all_ok(&lines, 3, SMALL), "{lines:#?}");
    assert_access_ok(&access_to(&zt, "outbound", dst, 3), 3, SMALL);

    let server_pid = server.pid();
    let done = stop(server);
    done.assert_exit_code(0);
    assert_tunnelled(done.report(), "inbound", &client_id(), 3);
    for c in in_direction(done.report(), "inbound") {
        assert_eq!(
            c.src_identity.as_deref(),
            Some(client_id().as_str()),
            "{c:?}"
        );
        assert_eq!(c.original_dst, Some(dst), "{c:?}");
        assert_eq!(
            (c.bytes_from_client, c.bytes_from_upstream),
            (SMALL as u64, SMALL as u64),
            "{c:?}"
        );
    }
    assert_eq!(peers_of(&done.stdout).len(), 3, "{:#?}", done.stdout);
    assert!(zt.stop().status.success());
    assert_no_leftovers(server_pid);
}

/// (c) Load, both orientations: 200 concurrent streams (ztunnel's pool opens a second HBONE
/// connection past 100 streams) and one 64 MiB stream echoed byte for byte, so 64 MiB each
/// way, first from our client to ztunnel, then from ztunnel's client to our server.
#[test]
fn concurrent_streams_and_64_mib_each_way_in_both_orientations() {
    if !can_run(true) {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("zt-load");
    let client_tls = ztunnel::issue(&scratch, "client", "client");
    let server_tls = ztunnel::issue(&scratch, "server", "server");
    let pods = pods(4);
    let app_port = ports::take();
    let dst = addr(pods.b.addr, app_port);
    let config = LocalConfig::pods(&pods);

    // Our client → ztunnel's server.
    {
        let app = pods.b.serve(([0, 0, 0, 0], app_port).into());
        let zt = Ztunnel::builder(&pods.b, "server")
            .config(&config)
            .start(&scratch);
        let many = echo_through_our_client(&pods, &client_tls, dst, SMALL, CONCURRENT);
        many.assert_exit_code(0);
        let lines: Vec<EchoLine> = many.parse_stdout();
        assert!(
            all_ok(&lines, CONCURRENT, SMALL),
            "{} of {CONCURRENT} ok: {:#?}",
            lines.iter().filter(|l| l.ok).count(),
            lines.iter().filter(|l| !l.ok).take(5).collect::<Vec<_>>()
        );
        assert_tunnelled(many.report(), "outbound", &server_id(), CONCURRENT);

        let large = echo_through_our_client(&pods, &client_tls, dst, LARGE, 1);
        large.assert_exit_code(0);
        let lines: Vec<EchoLine> = large.parse_stdout();
        assert!(all_ok(&lines, 1, LARGE), "64 MiB: {lines:#?}");
        assert_tunnelled(large.report(), "outbound", &server_id(), 1);
        let c = in_direction(large.report(), "outbound")[0];
        assert_eq!(
            (c.bytes_from_client, c.bytes_from_upstream),
            (LARGE as u64, LARGE as u64),
            "{c:?}"
        );

        let logged = access_to(&zt, "inbound", dst, CONCURRENT + 1);
        assert_eq!(
            logged.len(),
            CONCURRENT + 1,
            "{:#?}",
            &logged[..5.min(logged.len())]
        );
        assert!(logged.iter().all(AccessLine::ok), "{logged:#?}");
        assert_eq!(
            logged
                .iter()
                .filter(|a| a.bytes("bytes_recv") == LARGE as u64
                    && a.bytes("bytes_sent") == LARGE as u64)
                .count(),
            1,
            "the 64 MiB stream in ztunnel's log"
        );
        assert_eq!(peers_of(&app.stop()).len(), CONCURRENT + 1);
        assert!(zt.stop().status.success());
        assert_no_leftovers(many.pid);
        assert_no_leftovers(large.pid);
    }

    // ztunnel's client → our server (pod B's 15008 is free again).
    let server = our_server(&pods, &server_tls, app_port, &[]);
    let zt = Ztunnel::builder(&pods.a, "client")
        .config(&config)
        .redirect_outbound()
        .start(&scratch);
    let lines = echo_in(&pods.a, dst, SMALL, CONCURRENT);
    assert!(
        all_ok(&lines, CONCURRENT, SMALL),
        "{} of {CONCURRENT} ok: {:#?}",
        lines.iter().filter(|l| l.ok).count(),
        lines.iter().filter(|l| !l.ok).take(5).collect::<Vec<_>>()
    );
    let lines = echo_in(&pods.a, dst, LARGE, 1);
    assert!(all_ok(&lines, 1, LARGE), "64 MiB: {lines:#?}");
    let logged = access_to(&zt, "outbound", dst, CONCURRENT + 1);
    assert_eq!(logged.len(), CONCURRENT + 1);
    assert!(logged.iter().all(AccessLine::ok), "{logged:#?}");

    let server_pid = server.pid();
    let done = stop(server);
    done.assert_exit_code(0);
    assert_tunnelled(done.report(), "inbound", &client_id(), CONCURRENT + 1);
    assert!(
        in_direction(done.report(), "inbound").iter().any(|c| {
            (c.bytes_from_client, c.bytes_from_upstream) == (LARGE as u64, LARGE as u64)
        }),
        "the 64 MiB stream in our report"
    );
    assert_eq!(peers_of(&done.stdout).len(), CONCURRENT + 1);
    assert!(zt.stop().status.success());
    assert_no_leftovers(server_pid);
}

/// (d) A policy deny on either side refuses the stream, after the handshake, and the other
/// side counts it; a port the policy does not name still works, so the deny is the policy's.
/// ztunnel's deny (an `AuthorizationPolicy` of action `Deny` in its local.yaml) answers the
/// CONNECT with 401: our client must record the connection as failed, saying so, and give
/// the app nothing. Our deny (an inbound rule on ztunnel's verified client identity) must be
/// counted by us (`inbound_rejections`, the rule's counter) and logged by ztunnel as a failed
/// outbound stream.
#[test]
fn a_policy_deny_on_either_side_refuses_the_stream_and_the_other_side_counts_it() {
    if !can_run(true) {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("zt-deny");
    let client_tls = ztunnel::issue(&scratch, "client", "client");
    let server_tls = ztunnel::issue(&scratch, "server", "server");
    let pods = pods(5);
    let [open_port, denied_port] = ports::take_each();
    let (open, denied) = (addr(pods.b.addr, open_port), addr(pods.b.addr, denied_port));

    // ztunnel denies; our client counts it.
    {
        let open_app = pods.b.serve(([0, 0, 0, 0], open_port).into());
        let denied_app = pods.b.serve(([0, 0, 0, 0], denied_port).into());
        let config = LocalConfig::pods(&pods).deny("no-client", &[&client_id()], &[denied_port]);
        let zt = Ztunnel::builder(&pods.b, "server")
            .config(&config)
            .start(&scratch);
        let allowed = echo_through_our_client(&pods, &client_tls, open, SMALL, 1);
        allowed.assert_exit_code(0);
        assert_tunnelled(allowed.report(), "outbound", &server_id(), 1);

        let refused = echo_through_our_client(&pods, &client_tls, denied, SMALL, 1);
        let lines: Vec<EchoLine> = refused.parse_stdout();
        assert!(
            lines.len() == 1 && !lines[0].ok && lines[0].received == 0,
            "the app behind our client must get nothing back: {lines:#?}"
        );
        let conns = in_direction(refused.report(), "outbound");
        assert_eq!(conns.len(), 1, "{conns:#?}");
        let c = conns[0];
        // The handshake succeeded (ztunnel's certificate was verified, ztunnel logged ours)
        // and only then was the CONNECT refused: the record keeps the tunnel and the peer.
        assert!(
            c.mtls() && c.dst_identity.as_deref() == Some(server_id().as_str()),
            "the refused stream went over a verified mTLS tunnel: {c:?}"
        );
        assert_ne!(c.outcome, "ok", "a refused stream recorded as ok: {c:?}");
        assert!(
            c.error.as_deref().is_some_and(|e| e.contains("401")),
            "the record says the peer answered 401: {c:?}"
        );

        let logged = access_to(&zt, "inbound", denied, 1);
        assert!(
            logged.len() == 1
                && logged[0].get("src.identity") == Some(client_id().as_str())
                && logged[0]
                    .error()
                    .is_some_and(|e| e.contains("explicitly denied by: default/no-client")),
            "{logged:#?}"
        );
        assert_eq!(
            zt.metric_sum(
                "istio_tcp_connections_failed_total",
                &["reporter=\"destination\"", "response_flags=\"DENY\""]
            ),
            1
        );
        assert_eq!(peers_of(&open_app.stop()).len(), 1);
        assert!(
            peers_of(&denied_app.stop()).is_empty(),
            "a denied stream reached the app"
        );
        assert!(zt.stop().status.success());
        assert_no_leftovers(allowed.pid);
        assert_no_leftovers(refused.pid);
    }

    // Our sidecar denies; ztunnel's client counts it. The allowed port's app runs beside our
    // sidecar's in pod B (our inbound delivers to any listener on the pod's address).
    let policy = scratch.write(
        "policy.toml",
        &format!(
            "[[rule]]\nname = \"no-ztunnel-client\"\naction = \"deny\"\ndirection = \
             \"inbound\"\nsources = [\"{}\"]\nports = [{denied_port}]\n",
            client_id()
        ),
    );
    let policy = policy.display().to_string();
    let server = our_server(&pods, &server_tls, denied_port, &["--policy", &policy]);
    let open_app = pods.b.serve(([0, 0, 0, 0], open_port).into());
    let zt = Ztunnel::builder(&pods.a, "client")
        .config(&LocalConfig::pods(&pods))
        .redirect_outbound()
        .start(&scratch);
    let lines = echo_in(&pods.a, open, SMALL, 1);
    assert!(all_ok(&lines, 1, SMALL), "the allowed port: {lines:#?}");
    let lines = echo_in(&pods.a, denied, SMALL, 1);
    assert!(
        lines.len() == 1 && !lines[0].ok && lines[0].received == 0,
        "the client behind ztunnel must get nothing back: {lines:#?}"
    );
    let told = access_to(&zt, "outbound", denied, 1);
    assert!(
        told.len() == 1
            && told[0].error().is_some()
            && told[0].bytes("bytes_recv") == 0
            && told[0].get("dst.identity") == Some(server_id().as_str()),
        "ztunnel logs the refused stream as failed: {told:#?}"
    );
    assert_access_ok(&access_to(&zt, "outbound", open, 1), 1, SMALL);

    let server_pid = server.pid();
    let done = stop(server);
    let report = done.report();
    assert_eq!(
        report.inbound_rejections.get("policy_denied"),
        Some(&1),
        "{:?}",
        report.inbound_rejections
    );
    let counted = report.policy.as_ref().expect("policy report");
    assert_eq!(
        counted.count("no-ztunnel-client", "deny"),
        1,
        "{counted:#?}"
    );
    assert!(
        done.stderr_text()
            .lines()
            .any(|l| l.contains("policy denied the connection") && l.contains(&client_id())),
        "the denial is logged with ztunnel's identity:\n{}",
        done.stderr_text()
    );
    assert!(
        peers_of(&done.stdout).is_empty(),
        "a denied stream reached our app"
    );
    assert_eq!(peers_of(&open_app.stop()).len(), 1);
    assert!(zt.stop().status.success());
    assert_no_leftovers(server_pid);
}
