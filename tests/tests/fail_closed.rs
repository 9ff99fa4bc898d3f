//! Interception that must not be escaped, and a proxy that must not be exhausted: IPv4 through
//! an IPv6 socket when `[::1]` cannot be bound, and the caps on connections and pending tunnel
//! handshakes; a connect refused when the kernel cannot note where it was going.
//!
//! Every test starts with `privileged()` and holds `serial()`. Traffic stays inside network
//! namespaces the test created (prefix `kfc-`, addresses 10.231.x.x, no route out) or on
//! loopback. Ports come from `sidecar_tests::ports`, except inside the namespaces: the app
//! port and the tunnel port (15008) there are fixed. Every loop is bounded in count and
//! time, every wait has a timeout.

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use sidecar_common::{Counter, OrigDst, limits, maps};
use sidecar_tests::{
    EchoServer, assert_no_leftovers, bpf,
    host::{self, wait_child},
    netns::{Netns, PodPair},
    ports, privileged,
    protocol::{ConnectFailLine, EchoLine},
    require,
    run::SidecarRun,
    scratch::Scratch,
    serial, sidecar_fillable_map_bin,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const APP_PORT: u16 = 31080;
const TD: &str = "example.org";
const CLIENT_ID: &str = "spiffe://example.org/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://example.org/ns/demo/sa/server";
/// The sidecars' tunnel port inside the pods (the default).
const TUNNEL_PORT: u16 = 15008;

/// An echo server (`sidecar-testclient serve`) in a namespace, stopped on drop.
struct Server(Child);

impl Server {
    fn start(ns: &Netns) -> Self {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the echo server");
        let mut out = child.stdout.take().expect("piped");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("READY") {
            assert!(Instant::now() < deadline, "the echo server never listened");
            match out.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => panic!("the echo server exited: {}", String::from_utf8_lossy(&seen)),
            }
        }
        Self(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        if wait_child(&mut self.0, Duration::from_secs(5)).is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Writes `value` to `/proc/sys/<key>` inside the namespace.
fn sysctl(ns: &Netns, key: &str, value: &str) {
    let out = ns.run(&["sh", "-c", &format!("echo {value} > /proc/sys/{key}")]);
    assert!(
        out.status.success(),
        "{key}={value}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pod A has IPv6 on its veth and off on its loopback, so the sidecar cannot bind `[::1]` and
/// has no IPv6 listener; pod B's app listens on an IPv6 address. A native IPv6 connect that
/// would pass through (nothing to add) still passes; one the proxy must see (`--proxy-all`,
/// or a policy in dry run, which logs every connection) is refused with EPERM and counted,
/// never let through to the app unseen.
#[test]
fn native_ipv6_that_needs_the_proxy_is_refused_without_an_ipv6_listener() {
    if !privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let pods = PodPair::create_in("kfc", 231, 3);
    let (a6, b6) = ("fd77:231:3::1", "fd77:231:3::2");
    for (ns, dev, addr) in [(&pods.a, pods.veth_a(), a6), (&pods.b, pods.veth_b(), b6)] {
        let out = ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            &dev,
            "nodad",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    sysctl(&pods.a, "net/ipv6/conf/lo/disable_ipv6", "1");
    let app: SocketAddr = format!("[{b6}]:{APP_PORT}").parse().unwrap();
    let server = pods.b.serve(app);
    let scratch = Scratch::new("fail-closed-v6");
    let dry_run = scratch.write("policy.toml", "dry_run = true\n");

    let connect = |passthrough: bool, extra: &[&str]| {
        let mut builder = SidecarRun::builder(ports::take())
            .wrapped_in(pods.a.enter())
            .arg("--admin-addr=off");
        if passthrough {
            builder = builder.passthrough();
        }
        for a in extra {
            builder = builder.arg(a);
        }
        let done = builder
            .command([CLIENT, "connect-fail", &format!("--addr={app}")])
            .start()
            .finish(RUN_TIMEOUT);
        done.assert_exit_code(0);
        let lines: Vec<ConnectFailLine> = done.parse_stdout();
        assert_eq!(lines.len(), 1, "{:?}", done.stdout);
        assert_no_leftovers(done.pid);
        (lines[0].clone(), done.report().clone())
    };

    let (line, report) = connect(true, &[]);
    assert!(
        line.connected && line.error.is_none(),
        "pass-through: {line:?}"
    );
    assert_eq!(report.counter(Counter::ConnectPassthrough), 1);
    let policy = format!("--policy={}", dry_run.display());
    for (what, passthrough, extra) in [
        ("--proxy-all", false, vec![]),
        ("a dry-run policy", true, vec![policy.as_str()]),
    ] {
        let (line, report) = connect(passthrough, &extra);
        assert!(
            !line.connected
                && line
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("Operation not permitted")),
            "{what}: {line:?}"
        );
        assert_eq!(report.counter(Counter::ConnectNoV6Listener), 1, "{what}");
        assert_eq!(report.counter(Counter::ConnectPassthrough), 0, "{what}");
    }
    let peers = server.stop();
    assert_eq!(
        peers.len(),
        1,
        "only the pass-through connection reached the app: {peers:?}"
    );
}

/// Pod A has IPv6 turned off (`disable_ipv6=1`, so `[::1]` cannot be bound and the sidecar
/// has no IPv6 listener), and its app dials pod B's IPv4 address through an IPv6 socket
/// (`::ffff:a.b.c.d`). Every such connect goes through the proxy's IPv4 listener; none
/// reaches the server directly.
#[test]
fn ipv4_through_an_ipv6_socket_is_intercepted_without_an_ipv6_listener() {
    if !privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let pods = PodPair::create_in("kfc", 231, 1);
    for key in ["all", "default", "lo"] {
        sysctl(&pods.a, &format!("net/ipv6/conf/{key}/disable_ipv6"), "1");
    }
    let _server = Server::start(&pods.b);
    let mapped: SocketAddr = format!("[::ffff:{}]:{APP_PORT}", pods.b.addr)
        .parse()
        .unwrap();
    let proxy_port = ports::take();
    let mut run = SidecarRun::builder(proxy_port)
        .wrapped_in(pods.a.enter())
        .arg("--admin-addr=off")
        .command([
            CLIENT.to_string(),
            "echo".into(),
            format!("--addr={mapped}"),
            "--count=3".into(),
        ])
        .start();
    let done = run.finish(RUN_TIMEOUT);
    let stderr = done.stderr.join("\n");
    assert!(
        stderr.contains("no IPv6 listener"),
        "the sidecar had an IPv6 listener after all:\n{stderr}"
    );
    let lines: Vec<EchoLine> = done.parse_stdout();
    let proxied: SocketAddr = format!("[::ffff:127.0.0.1]:{proxy_port}").parse().unwrap();
    assert_eq!(lines.len(), 3, "{lines:#?}\n{stderr}");
    for l in &lines {
        assert_eq!(
            l.peer,
            Some(proxied),
            "a v4-mapped connect was not intercepted: {l:?}"
        );
        assert!(l.ok, "{l:?}");
    }
    done.assert_exit_code(0);
    let report = done.report();
    assert_eq!(report.counter(Counter::ConnectNoV6Listener), 0);
    assert!(report.counter(Counter::ConnectRedirected) >= 3);
    let upstream: SocketAddr = SocketAddr::new(pods.b.addr, APP_PORT);
    let conns = report.connections_to(upstream);
    assert_eq!(conns.len(), 3, "{:#?}", report.connections);
    assert!(conns.iter().all(|c| c.outcome == "ok"), "{conns:#?}");
    assert_no_leftovers(done.pid);
}

/// TCP connections to `addr` opened from inside `ns`, sending nothing (a silent TLS client).
/// `None`: the server reset it before `connect()` had even returned.
fn silent_connections(ns: &Netns, addr: SocketAddr, count: usize) -> Vec<Option<TcpStream>> {
    let file = std::fs::File::open(ns.path()).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns on an fd we own, for this thread only (it ends right after; the
        // sockets keep the namespace they were created in).
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        (0..count)
            .map(
                |_| match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => Some(s),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
                    Err(e) => panic!("connect {addr}: {e}"),
                },
            )
            .collect()
    })
    .join()
    .expect("the connecting thread panicked")
}

/// Whether the peer has closed or reset `s` by now (a non-blocking read that does not find
/// the socket merely idle).
fn closed_by_now(s: &Option<TcpStream>) -> bool {
    let Some(s) = s else {
        return true;
    };
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    match (&*s).read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// The value of a Prometheus sample line `name{labels} value` in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// More silent TLS clients on the tunnel port than `--max-pending-handshakes`: those over the
/// cap are reset at once (not held for the 5 s handshake deadline), counted in /metrics and
/// logged once; once the silent ones go, a legitimate tunnel works. /config shows both caps.
#[test]
fn pending_handshakes_over_the_cap_are_refused_promptly_and_counted() {
    if !privileged() || !require("nsenter") {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("kfc-caps");
    certs.ca("ca", TD);
    let client_tls = certs.issue("ca", CLIENT_ID, "client", &[]);
    let server_tls = certs.issue("ca", SERVER_ID, "server", &[]);
    let pods = PodPair::create_in("kfc", 231, 2);
    let admin: SocketAddr = "127.0.0.1:31090".parse().unwrap();
    let cap = 4;
    let flood = 12;
    let mut server = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(&server_tls)
        .arg(format!("--admin-addr={admin}"))
        .arg(format!("--max-pending-handshakes={cap}"))
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(Duration::from_secs(20));

    let tunnel = SocketAddr::new(pods.b.addr, TUNNEL_PORT);
    let silent = silent_connections(&pods.a, tunnel, flood);
    // Well inside the 5 s handshake deadline: only the refusals can have closed anything.
    std::thread::sleep(Duration::from_secs(1));
    let closed: Vec<bool> = silent.iter().map(closed_by_now).collect();
    let refused = closed.iter().filter(|c| **c).count();
    assert_eq!(
        refused,
        flood - cap,
        "{refused} of {flood} silent connections closed within 1 s with a cap of {cap}: {closed:?}"
    );

    let metrics = pods.b.http_get(admin, "/metrics");
    let series =
        r#"sidecar_connections_refused_total{direction="inbound",reason="max_pending_handshakes"}"#;
    assert_eq!(
        sample(&metrics, series),
        Some((flood - cap) as f64),
        "{metrics}"
    );
    // The kernel's refusals of connects whose redirect could not be noted are exported
    // like every eBPF counter (no map update fails here, so it stays 0).
    assert_eq!(
        sample(&metrics, "sidecar_ebpf_connect_redirect_failed_total"),
        Some(0.0),
        "{metrics}"
    );
    let config = pods.b.http_get(admin, "/config");
    let body: serde_json::Value = config
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or_else(|| panic!("/config: {config}"));
    assert_eq!(body["max_pending_handshakes"], cap, "{body}");
    assert!(
        body["max_connections"].as_u64() >= Some(cap as u64),
        "{body}"
    );
    let logged = server.stderr_text().matches("refusing new ones").count();
    assert_eq!(logged, 1, "{}", server.stderr_text());

    // The silent clients give up: their handshakes fail at once and free the slots.
    drop(silent);
    let active = r#"sidecar_connections_active{direction="inbound"}"#;
    assert!(
        host::wait_until(Duration::from_secs(5), || {
            sample(&pods.b.http_get(admin, "/metrics"), active) == Some(0.0)
        }),
        "the silent connections' handshakes did not end"
    );
    let mut client = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .arg("--admin-addr=off")
        .command([
            CLIENT.to_string(),
            "echo".into(),
            format!("--addr={}:{APP_PORT}", pods.b.addr),
            "--count=2".into(),
        ])
        .start();
    let done = client.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let lines: Vec<EchoLine> = done.parse_stdout();
    assert!(lines.len() == 2 && lines.iter().all(|l| l.ok), "{lines:#?}");
    let report = done.report();
    assert!(
        report.connections.iter().all(|c| c.mtls()),
        "{:#?}",
        report.connections
    );
    server.release();
    let server_done = server.finish(RUN_TIMEOUT);
    server_done.assert_exit_code(0);
    assert_no_leftovers(server_done.pid);
    assert_no_leftovers(done.pid);
}

/// `--max-connections 2` and six app connections open at once: the cap holds (the proxy
/// serves at most two at a time and refuses the rest right after accept: the app sees the
/// refusal at once, nothing half-served), and the cap is logged once. How many are refused
/// depends on how many the proxy has accepted before the first two finish: all six connect
/// before any sends (the client's barrier), but a slow accept loop may take the last ones
/// only after the first two closed, and serve them. A 1 MiB echo keeps the first two open
/// long enough that at least one is refused.
#[test]
fn connections_over_the_cap_are_reset_at_once() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let server_addr = SocketAddr::from(([127, 0, 0, 1], ports::take()));
    let server = EchoServer::bind(server_addr)
        .unwrap_or_else(|e| panic!("binding the echo server on {server_addr}: {e}"));
    let mut run = SidecarRun::builder(ports::take())
        .arg("--admin-addr=off")
        .arg("--max-connections=2")
        .command([
            CLIENT.to_string(),
            "echo".into(),
            format!("--addr={}", server.addr()),
            "--size=1048576".into(),
            "--count=6".into(),
            "--concurrency=6".into(),
        ])
        .start();
    let done = run.finish(RUN_TIMEOUT);
    let lines: Vec<EchoLine> = done.parse_stdout();
    let stderr = done.stderr.join("\n");
    assert_eq!(lines.len(), 6, "{lines:#?}\n{stderr}");
    let ok = lines.iter().filter(|l| l.ok).count();
    assert!((2..6).contains(&ok), "{ok} served: {lines:#?}");
    // Refused, not half-served: nothing came back on the four.
    assert!(
        lines.iter().filter(|l| !l.ok).all(|l| l.received == 0),
        "{lines:#?}"
    );
    assert_eq!(stderr.matches("refusing new ones").count(), 1, "{stderr}");
    assert!(stderr.contains("--max-connections"), "{stderr}");
    assert_eq!(done.report().connections.len(), ok);
    assert_no_leftovers(done.pid);
}

/// The connect hook notes a redirected connect's original destination in `COOKIE_ORIG_DST`
/// before it rewrites the connect to the proxy. When that insert fails, the connect must be
/// refused (EPERM) and counted: rewritten anyway, it would reach a proxy that cannot tell
/// where it was going. The shipped map is LRU, whose inserts evict rather than fail, so this
/// runs the sidecar built with the test-only object whose map evicts nothing
/// (`fillable-map-for-tests`), fills the map through its pin, and only then connects.
#[test]
fn a_connect_whose_destination_cannot_be_noted_is_refused() {
    if !privileged() || !require("sh") {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    let addr = format!("--addr={}", server.addr());
    let mut run = SidecarRun::builder(ports::take())
        .binary(sidecar_fillable_map_bin())
        .arg("--admin-addr=off")
        // Connects once the test closes the sidecar's stdin (`finish`): after the fill.
        .command([
            "sh",
            "-c",
            r#"read -r _; exec "$0" connect-fail "$1""#,
            CLIENT,
            &addr,
        ])
        .start();
    let pid = run.pid();
    // The command starts once everything is attached: before that the pin may still be
    // replaced (below 5.15 a first load is dropped and the programs are loaded again).
    assert!(
        host::wait_until(Duration::from_secs(20), || !run.app_pids().is_empty()),
        "run {pid} never started its command:\n{}",
        run.stderr_text()
    );
    {
        let map = bpf::pinned_map(pid, maps::COOKIE_ORIG_DST).expect("opening the pin");
        assert!(
            matches!(map, Map::HashMap(_)),
            "{} is not a plain hash map: {} is not the fillable-map build",
            maps::COOKIE_ORIG_DST,
            sidecar_fillable_map_bin().display()
        );
        let mut map: HashMap<MapData, u64, OrigDst> = map.try_into().expect("a hash map");
        // Cookies count up from 1, so these never name a real socket.
        let fake = |i: u32| u64::MAX - u64::from(i);
        for i in 0..limits::COOKIE_ORIG_DST {
            map.insert(fake(i), OrigDst::default(), 0)
                .unwrap_or_else(|e| panic!("filling {}: entry {i}: {e}", maps::COOKIE_ORIG_DST));
        }
        assert!(
            map.insert(fake(limits::COOKIE_ORIG_DST), OrigDst::default(), 0)
                .is_err(),
            "{} took more than its {} entries",
            maps::COOKIE_ORIG_DST,
            limits::COOKIE_ORIG_DST
        );
    }

    let done = run.finish(RUN_TIMEOUT);
    done.assert_exit_code(0);
    let lines: Vec<ConnectFailLine> = done.parse_stdout();
    assert_eq!(lines.len(), 1, "{:?}\n{}", done.stdout, done.stderr_text());
    assert!(
        !lines[0].connected
            && lines[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("Operation not permitted")),
        "the connect was not refused: {:?}",
        lines[0]
    );
    let report = done.report();
    assert_eq!(report.counter(Counter::ConnectRedirectFailed), 1);
    assert_eq!(report.counter(Counter::ConnectRedirected), 0);
    assert!(
        report.connections.is_empty(),
        "the proxy saw a connection: {:#?}",
        report.connections
    );
    assert!(
        server.peers().is_empty(),
        "the server was reached: {:?}",
        server.peers()
    );
    assert_no_leftovers(done.pid);
}
