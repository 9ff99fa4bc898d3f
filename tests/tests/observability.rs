//! Observability against the real kernel (root): known traffic through `sidecar run`, checked
//! in `/metrics` (parsed with a real Prometheus text parser), the access log, `/readyz`,
//! `/connections`, `/status` and the `sidecar status|conns` commands.
//!
//! Resources: proxy ports 17200–17299, admin ports 17000–17099, upstream servers on
//! 127.0.0.1:171xx; the cardinality guard connects to 127.77.0.1:20000–29999 and
//! 127.77.0.1:30000-30499, where nothing listens (refused; nothing leaves loopback).
//!
//! The shared helpers of `tests/src/lib.rs` were not written yet when this file was, so the
//! few it needs are at the bottom.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

// ---------------------------------------------------------------------------------------
// exact counts
// ---------------------------------------------------------------------------------------

#[test]
fn metrics_and_access_log_count_known_traffic_exactly() {
    if !privileged("metrics_and_access_log_count_known_traffic_exactly") {
        return;
    }
    const N: u64 = 5;
    const SEND: u64 = 1000;
    const REPLY: u64 = 2500;
    let server = ReplyServer::start(17110, REPLY as usize);
    let log = TempFile::new("access.log");
    let admin: SocketAddr = "127.0.0.1:17010".parse().unwrap();
    let mut run = Sidecar::spawn(
        &[
            "--proxy-port",
            "17210",
            "--admin-addr",
            "127.0.0.1:17010",
            "--access-log",
            log.path_str(),
        ],
        &[
            "requests",
            "127.0.0.1:17110",
            &N.to_string(),
            &SEND.to_string(),
            &REPLY.to_string(),
        ],
    );
    run.expect_line("ready");
    let before = Metrics::scrape(admin);
    for (name, value) in &before.ebpf() {
        assert_eq!(*value, 0.0, "eBPF counter {name} moved before any traffic");
    }
    assert_eq!(
        before.get("sidecar_connections_opened_total", &outbound_plain()),
        0.0
    );

    run.go();
    run.expect_line("done");
    let m = Metrics::scrape_until(admin, |m| {
        m.get("sidecar_connections_closed_total", &out_reason("ok")) == N as f64
    });
    let n = N as f64;
    let out = [("direction", "outbound")];
    assert_eq!(
        m.get("sidecar_connections_opened_total", &outbound_plain()),
        n
    );
    assert_eq!(
        m.get("sidecar_connections_closed_total", &out_reason("ok")),
        n
    );
    assert_eq!(
        m.sum("sidecar_connections_closed_total"),
        n,
        "only ok closes"
    );
    assert_eq!(m.sum("sidecar_connections_failed_total"), 0.0);
    assert_eq!(m.get("sidecar_connections_active", &out), 0.0);
    assert_eq!(m.get("sidecar_sent_bytes_total", &out), n * SEND as f64);
    assert_eq!(
        m.get("sidecar_received_bytes_total", &out),
        n * REPLY as f64
    );
    assert_eq!(server.received(), N * SEND, "the server saw every byte");
    for h in [
        "sidecar_connection_duration_seconds",
        "sidecar_upstream_connect_seconds",
        "sidecar_proxy_setup_seconds",
    ] {
        assert_eq!(m.histogram_count(h, &out), N, "{h} observations");
    }
    assert_eq!(
        m.histogram_count("sidecar_tls_handshake_seconds", &out),
        0,
        "no mTLS yet"
    );
    for leg in ["app", "upstream"] {
        assert_eq!(
            m.histogram_count("sidecar_tcp_srtt_seconds", &[("leg", leg)]),
            N
        );
        assert_eq!(m.get("sidecar_tcp_retransmits_total", &[("leg", leg)]), 0.0);
    }
    assert_eq!(
        m.sum("sidecar_policy_decisions_total"),
        0.0,
        "no policy yet"
    );
    assert_eq!(m.get("sidecar_certificates_loaded", &[]), 0.0);
    assert_eq!(m.get("sidecar_ready", &[]), 1.0);
    assert_eq!(m.get("sidecar_interception_attached", &[]), 1.0);

    // The kernel counters moved by exactly this traffic: N redirected connects, each with
    // four spliced sockets (app, proxy's accepted, proxy's upstream, server's accepted), and
    // every payload byte redirected once: by the proxy's write (proxy→server, proxy→app).
    // The app's and the server's own writes take the TCP path (sidecar_common::owner).
    let fast_app = m.get(
        "sidecar_fast_path_connections_total",
        &[("direction", "outbound"), ("leg", "app")],
    );
    let fast_up = m.get(
        "sidecar_fast_path_connections_total",
        &[("direction", "outbound"), ("leg", "upstream")],
    );
    assert_eq!((fast_app, fast_up), (n, n), "every leg on the fast path");
    let e = m.ebpf();
    assert_eq!(e["connect_seen"], n);
    assert_eq!(e["connect_redirected"], n);
    assert_eq!(e["orig_dst_published"], n);
    assert_eq!(e["connect_from_proxy"], n);
    assert_eq!(e["sockhash_insert"], 4.0 * n);
    assert_eq!(e["sockhash_insert_failed"], 0.0);
    // Every payload byte is spliced once unless a message missed its peer (a race in the
    // fast path, counted by sk_msg_miss): then that message and the sender's later ones
    // took the TCP path, and the count is lower by exactly those bytes.
    let all = n * (SEND + REPLY) as f64;
    assert!(
        e["sk_msg_foreign_sender"] > 0.0,
        "the app's and server's writes took TCP"
    );
    if e["sk_msg_miss"] == 0.0 && e["sk_msg_passthru"] == 0.0 {
        assert_eq!(e["sk_msg_redirected_bytes"], all, "every byte spliced");
    } else {
        println!("fast path missed {} message(s) this time", e["sk_msg_miss"]);
        assert!(e["sk_msg_redirected_bytes"] > 0.0 && e["sk_msg_redirected_bytes"] < all);
    }

    // `sidecar status` says yes, with these counters.
    let status = sidecar_cmd(&["status", "--admin", "127.0.0.1:17010"]);
    assert!(status.contains("intercepted    yes"), "{status}");
    assert!(status.contains("accelerated    yes"), "{status}");
    assert!(
        status.contains(&format!("{N} opened, 0 active, {N} closed, 0 failed")),
        "{status}"
    );
    println!("sidecar status:\n{status}");
    let json: Value = serde_json::from_str(&sidecar_cmd(&[
        "status",
        "--admin",
        "127.0.0.1:17010",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["ebpf"]["connect_redirected"], N);
    assert_eq!(json["intercepted"]["answer"], "yes");

    run.finish();

    // The access log: one line per connection, exact bytes, placeholders for mTLS/policy.
    let text = std::fs::read_to_string(&log.0).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), N as usize, "{text}");
    let mut ids = BTreeSet::new();
    for l in &lines {
        ids.insert(l["id"].as_u64().unwrap());
        assert_eq!(l["bytes_sent"], SEND, "{l}");
        assert_eq!(l["bytes_received"], REPLY, "{l}");
        assert_eq!(l["original_dst"], "127.0.0.1:17110");
        assert_eq!(l["proxy"], "127.0.0.1:17210");
        assert_eq!(l["direction"], "outbound");
        assert_eq!(l["mode"], "plain");
        assert_eq!(l["close_reason"], "ok");
        assert_eq!(l["policy_decision"], "none");
        assert!(l["src_identity"].is_null() && l["dst_identity"].is_null());
        assert_eq!(l["fast_path_app"], true);
        assert_eq!(l["fast_path_upstream"], true);
        assert!(l["src"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(
            l["upstream_src"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        assert!(l["start"].as_str().unwrap() <= l["end"].as_str().unwrap());
        assert!(l["duration_ms"].as_f64().unwrap() > 0.0);
        for leg in ["tcp_app", "tcp_upstream"] {
            assert!(l[leg]["srtt_us"].as_u64().unwrap() > 0, "{leg}: {l}");
            assert_eq!(l[leg]["retransmits"], 0);
        }
    }
    assert_eq!(ids.len(), N as usize, "distinct connection ids");
}

// ---------------------------------------------------------------------------------------
// readiness
// ---------------------------------------------------------------------------------------

#[test]
fn readyz_is_not_ready_before_attach_and_ready_after() {
    if !privileged("readyz_is_not_ready_before_attach_and_ready_after") {
        return;
    }
    let admin: SocketAddr = "127.0.0.1:17020".parse().unwrap();
    // Poll from before the sidecar starts: the admin server binds before the eBPF programs
    // are loaded, so the first answers must be 503.
    let (tx, rx) = mpsc::channel();
    let poller = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen: Vec<(u16, String)> = Vec::new();
        while Instant::now() < deadline {
            if let Ok(r) = http_get(admin, "/readyz") {
                let ready = r.0 == 200;
                seen.push(r);
                if ready {
                    break;
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        tx.send(seen).unwrap();
    });
    let mut run = Sidecar::spawn(
        &["--proxy-port", "17220", "--admin-addr", "127.0.0.1:17020"],
        &["requests", "127.0.0.1:17120", "0", "0", "0"],
    );
    let seen = rx.recv_timeout(Duration::from_secs(40)).unwrap();
    poller.join().unwrap();
    let not_ready = seen.iter().filter(|(s, _)| *s == 503).count();
    assert!(not_ready >= 1, "never saw /readyz before attach: {seen:?}");
    let first: Value = serde_json::from_str(&seen[0].1).unwrap();
    assert_eq!(first["ready"], false);
    assert_eq!(first["checks"][0]["name"], "interception");
    assert_eq!(first["checks"][0]["ok"], false);
    let (last_status, last_body) = seen.last().unwrap();
    assert_eq!(*last_status, 200, "became ready: {seen:?}");
    assert_eq!(
        serde_json::from_str::<Value>(last_body).unwrap()["ready"],
        true
    );
    println!("/readyz answered 503 {not_ready} time(s) before 200");
    // Ready stays ready while the workload runs.
    run.expect_line("ready");
    assert_eq!(http_get(admin, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(admin, "/healthz").unwrap(), (200, "ok\n".into()));
    let config: Value = serde_json::from_str(&http_get(admin, "/config").unwrap().1).unwrap();
    assert_eq!(config["proxy_port"], 17220);
    assert_eq!(config["admin_addr"], "127.0.0.1:17020");
    run.go();
    run.expect_line("done");
    run.finish();
    assert!(
        http_get(admin, "/readyz").is_err(),
        "admin server gone with the run"
    );
}

// ---------------------------------------------------------------------------------------
// live connections
// ---------------------------------------------------------------------------------------

#[test]
fn connections_lists_an_open_connection_and_drops_it_when_closed() {
    if !privileged("connections_lists_an_open_connection_and_drops_it_when_closed") {
        return;
    }
    EchoServer::start(17130);
    let admin: SocketAddr = "127.0.0.1:17030".parse().unwrap();
    let mut run = Sidecar::spawn(
        &["--proxy-port", "17230", "--admin-addr", "127.0.0.1:17030"],
        &["hold", "127.0.0.1:17130", "300"],
    );
    run.expect_line("ready");
    let empty = connections(admin);
    assert_eq!(empty["count"], 0);
    run.go();
    run.expect_line("open");
    // The proxy counts a chunk just after writing it, so the echo can reach the client a
    // moment before the count moves.
    let deadline = Instant::now() + Duration::from_secs(5);
    let list = loop {
        let list = connections(admin);
        if list["connections"][0]["bytes_received"] == 300 || Instant::now() > deadline {
            break list;
        }
        thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(list["count"], 1, "{list}");
    let c = &list["connections"][0];
    assert_eq!(c["original_dst"], "127.0.0.1:17130");
    assert_eq!(c["state"], "open");
    assert_eq!(c["mode"], "plain");
    assert_eq!(c["bytes_sent"], 300, "bytes so far, while open");
    assert_eq!(c["bytes_received"], 300);
    assert!(c["src_identity"].is_null());
    assert!(c["age_ms"].as_u64().is_some());

    let table = sidecar_cmd(&["conns", "--admin", "127.0.0.1:17030"]);
    assert!(table.contains("127.0.0.1:17130") && table.contains("1 open connection(s)"));
    let watch = sidecar_cmd(&[
        "conns",
        "--admin",
        "127.0.0.1:17030",
        "--watch",
        "--count",
        "1",
    ]);
    assert!(
        watch.contains("\x1b[2J") && watch.contains("127.0.0.1:17130"),
        "{watch}"
    );
    let json: Value = serde_json::from_str(&sidecar_cmd(&[
        "conns",
        "--admin",
        "127.0.0.1:17030",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["count"], 1);
    println!("sidecar conns:\n{table}");

    run.go();
    run.expect_line("closed");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = connections(admin);
        if list["count"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still listed after close: {list}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let m = Metrics::scrape(admin);
    assert_eq!(
        m.get("sidecar_connections_active", &[("direction", "outbound")]),
        0.0
    );
    assert_eq!(
        m.get("sidecar_sent_bytes_total", &[("direction", "outbound")]),
        300.0
    );
    run.expect_line("done");
    run.finish();
}

// ---------------------------------------------------------------------------------------
// cardinality
// ---------------------------------------------------------------------------------------

/// 10,000 connections to 10,000 distinct destination ports add no series by default: the
/// series set after 10 connections and after 10,000 is the same.
#[test]
fn ten_thousand_destination_ports_do_not_create_series() {
    if !privileged("ten_thousand_destination_ports_do_not_create_series") {
        return;
    }
    const PORTS: u16 = 10_000;
    let admin: SocketAddr = "127.0.0.1:17040".parse().unwrap();
    assert_nobody_listens(20_000, PORTS);
    let mut run = Sidecar::spawn(
        &["--proxy-port", "17240", "--admin-addr", "127.0.0.1:17040"],
        &["ports", "127.77.0.1", "20000", &PORTS.to_string(), "10"],
    );
    run.expect_line("ready");
    run.go();
    run.expect_line("paused");
    let failed = out_reason("upstream_connect_failed");
    let early = Metrics::scrape_until(admin, |m| {
        m.get("sidecar_connections_closed_total", &failed) == 10.0
    });
    let started = Instant::now();
    run.go();
    run.expect_line_within("done", Duration::from_secs(180));
    let late = Metrics::scrape_until(admin, |m| {
        m.get("sidecar_connections_closed_total", &failed) == f64::from(PORTS)
    });
    println!(
        "{} connections to distinct ports in {:.1?}; {} series before and after",
        PORTS - 10,
        started.elapsed(),
        late.series.len()
    );
    assert_eq!(
        late.get("sidecar_connections_opened_total", &outbound_plain()),
        f64::from(PORTS)
    );
    assert_eq!(
        late.get("sidecar_connections_failed_total", &failed),
        f64::from(PORTS)
    );
    assert_eq!(late.ebpf()["connect_redirected"], f64::from(PORTS));
    assert_eq!(
        early.series, late.series,
        "the set of series must not grow with destinations"
    );
    assert!(late.series.len() < 300, "{} series", late.series.len());
    assert!(
        late.series.iter().all(|s| !s.contains("127.77.0.1")),
        "no address leaks into a label"
    );
    run.finish();
}

/// Opting in to per-destination series is capped: 500 destinations with a cap of 50 give
/// exactly 50 series plus `other`. (500 are enough: the cap is reached after 50; the
/// default-off case above is the one that needs the full 10,000.)
#[test]
fn per_destination_series_are_opt_in_and_capped() {
    if !privileged("per_destination_series_are_opt_in_and_capped") {
        return;
    }
    const PORTS: u16 = 500;
    const CAP: usize = 50;
    let admin: SocketAddr = "127.0.0.1:17050".parse().unwrap();
    assert_nobody_listens(30_000, PORTS);
    let mut run = Sidecar::spawn(
        &[
            "--proxy-port",
            "17250",
            "--admin-addr",
            "127.0.0.1:17050",
            "--metrics-destinations",
            &CAP.to_string(),
        ],
        &["ports", "127.77.0.1", "30000", &PORTS.to_string(), "0"],
    );
    run.expect_line("ready");
    run.go();
    run.expect_line("paused");
    run.go();
    run.expect_line_within("done", Duration::from_secs(60));
    let m = Metrics::scrape_until(admin, |m| {
        m.sum("sidecar_destination_connections_total") == f64::from(PORTS)
    });
    let dests: Vec<&String> = m
        .series
        .iter()
        .filter(|s| s.starts_with("sidecar_destination_connections_total"))
        .collect();
    assert_eq!(dests.len(), CAP + 1, "{dests:?}");
    assert_eq!(
        m.get(
            "sidecar_destination_connections_total",
            &[("destination", "other")]
        ),
        f64::from(PORTS) - CAP as f64
    );
    assert_eq!(
        m.get(
            "sidecar_destination_connections_total",
            &[("destination", "127.77.0.1:30000")]
        ),
        1.0
    );
    run.finish();
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn outbound_plain() -> [(&'static str, &'static str); 2] {
    [("direction", "outbound"), ("mode", "plain")]
}

fn out_reason(reason: &'static str) -> [(&'static str, &'static str); 2] {
    [("direction", "outbound"), ("reason", reason)]
}

/// Root and a cgroup v2 mount are needed. Without them: skip, or fail under CI.
fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let cgroup2 = std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        })
        .unwrap_or(false);
    if root && cgroup2 {
        return true;
    }
    let why = format!("{test}: needs root and a cgroup v2 mount (root={root}, cgroup2={cgroup2})");
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so this fails instead of skipping");
    }
    eprintln!("skipped: {why}");
    false
}

/// Refuses to run a port sweep if anything listens on a wildcard address in its range (it
/// would receive our connections).
fn assert_nobody_listens(first: u16, count: u16) {
    let range = u32::from(first)..u32::from(first) + u32::from(count);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st == 0A: LISTEN; the local address is HEXIP:HEXPORT.
            if f.len() > 3 && f[3] == "0A" {
                let (ip, port) = f[1].split_once(':').unwrap();
                let port = u32::from_str_radix(port, 16).unwrap();
                let wildcard = ip.chars().all(|c| c == '0');
                assert!(
                    !(wildcard && range.contains(&port)),
                    "something listens on *:{port}, inside the sweep range"
                );
            }
        }
    }
}

fn sidecar_bin() -> PathBuf {
    // target/<profile>/deps/observability-HASH → target/<profile>/sidecar
    let path = std::env::var_os("SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("sidecar")
        });
    assert!(
        path.exists(),
        "{} missing: build it first (`cargo build`, or `cargo test` at the workspace root)",
        path.display()
    );
    path
}

/// Runs a `sidecar` client subcommand; it must succeed.
fn sidecar_cmd(args: &[&str]) -> String {
    let out = Command::new(sidecar_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "sidecar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `sidecar run -- obs-client …`, stopped (SIGTERM, then SIGKILL) if the test fails, so
/// the run's own teardown removes everything it attached.
struct Sidecar {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Sidecar {
    fn spawn(run_args: &[&str], client_args: &[&str]) -> Self {
        let mut child = Command::new(sidecar_bin())
            .arg("run")
            .args(run_args)
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_obs-client"))
            .args(client_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn expect_line(&mut self, want: &str) {
        self.expect_line_within(want, Duration::from_secs(30));
    }

    fn expect_line_within(&mut self, want: &str, timeout: Duration) {
        match self.lines.recv_timeout(timeout) {
            Ok(line) if line == want => {}
            Ok(line) => panic!("expected {want:?} from the workload, got {line:?}"),
            Err(e) => panic!(
                "no {want:?} from the workload within {timeout:?} ({e}); exit: {:?}",
                self.child.try_wait()
            ),
        }
    }

    /// Lets the workload go on to its next step.
    fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes the workload's stdin (it exits) and waits for the sidecar to exit cleanly.
    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "sidecar run exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "sidecar run did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scrape of `/metrics`, parsed by `prometheus-parse`.
struct Metrics {
    samples: Vec<prometheus_parse::Sample>,
    /// Every series as `name{labels}` (histogram buckets included), sorted.
    series: BTreeSet<String>,
}

impl Metrics {
    fn scrape(admin: SocketAddr) -> Self {
        let (status, body) = http_get(admin, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
        assert!(!scrape.samples.is_empty());
        // Every family has its HELP line.
        assert!(scrape.docs.len() >= 20, "HELP lines: {}", scrape.docs.len());
        let series = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
            .collect();
        Self {
            samples: scrape.samples,
            series,
        }
    }

    /// Scrapes until `ok` holds (the proxy records a close just after the client sees it).
    fn scrape_until(admin: SocketAddr, ok: impl Fn(&Metrics) -> bool) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = Self::scrape(admin);
            if ok(&m) {
                // One scrape is not a snapshot: series are read one after another while
                // connections close. The sidecar counts a close last, so a scrape begun
                // after the expected closes were seen has all their other series too.
                let settled = Self::scrape(admin);
                assert!(ok(&settled), "metrics went back from the expected state");
                return settled;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never reached the expected state"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> {
        self.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    fn value(s: &prometheus_parse::Sample) -> f64 {
        match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{} is not a plain value: {other:?}", s.metric),
        }
    }

    /// The one sample of `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self
            .matching(name, labels)
            .filter(|s| s.labels.len() == labels.len())
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {} samples", found.len());
        Self::value(found[0])
    }

    fn sum(&self, name: &str) -> f64 {
        self.matching(name, &[]).map(Self::value).sum()
    }

    fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let found: Vec<_> = self.matching(name, labels).collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}");
        match &found[0].value {
            prometheus_parse::Value::Histogram(buckets) => {
                let inf = buckets
                    .iter()
                    .find(|b| b.less_than == f64::INFINITY)
                    .expect("+Inf bucket");
                inf.count as u64
            }
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }

    /// The eBPF counters, by the kernel's name.
    fn ebpf(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter_map(|s| {
                let name = s.metric.strip_prefix("sidecar_ebpf_")?;
                let name = name.strip_suffix("_total").unwrap_or(name);
                Some((name.to_owned(), Self::value(s)))
            })
            .collect()
    }
}

fn connections(admin: SocketAddr) -> Value {
    let (status, body) = http_get(admin, "/connections").unwrap();
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// A plain HTTP/1.1 GET with a short timeout: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    Ok((status, body.to_owned()))
}

/// Reads each connection to EOF, then answers `reply` bytes and closes. Counts bytes read.
/// Its thread ends with the test process; it only listens on 127.0.0.1.
struct ReplyServer {
    received: Arc<AtomicU64>,
}

impl ReplyServer {
    fn start(port: u16, reply: usize) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let counter = counter.clone();
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = Vec::new();
                    if conn.read_to_end(&mut buf).is_ok() {
                        counter.fetch_add(buf.len() as u64, Ordering::SeqCst);
                        let _ = conn.write_all(&vec![b'r'; reply]);
                    }
                });
            }
        });
        Self { received }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

/// Echoes every connection until EOF (127.0.0.1 only; lives as long as the test process).
struct EchoServer;

impl EchoServer {
    fn start(port: u16) {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut reader = conn.try_clone().unwrap();
                    let _ = std::io::copy(&mut reader, &mut conn);
                });
            }
        });
    }
}

/// A file under the system temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sidecar-obs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    fn path_str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// isolation
// ---------------------------------------------------------------------------------------

/// Admin load does not get in the data path's way: with admin clients that connect and never
/// send a request and another scraping every endpoint in a loop, known traffic still
/// completes, byte-exact, and a scrape is answered at once, not after the silent clients'
/// head timeout (5 s).
#[test]
fn admin_load_does_not_block_the_data_path() {
    if !privileged("admin_load_does_not_block_the_data_path") {
        return;
    }
    const N: u64 = 300;
    let _server = ReplyServer::start(17170, 2000);
    let admin: SocketAddr = "127.0.0.1:17070".parse().unwrap();
    let mut run = Sidecar::spawn(
        &["--proxy-port", "17270", "--admin-addr", "127.0.0.1:17070"],
        &["requests", "127.0.0.1:17170", &N.to_string(), "500", "2000"],
    );
    run.expect_line("ready");
    // Stuck clients: connected, silent. The server drops each after its 5 s head timeout.
    let stuck: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let scraper = {
        let (stop, answered) = (stop.clone(), answered.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                for path in ["/metrics", "/connections", "/status"] {
                    if let Ok((200, _)) = http_get(admin, path) {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };
    let started = Instant::now();
    run.go();
    run.expect_line_within("done", Duration::from_secs(60));
    let took = started.elapsed();
    let scrape = Instant::now();
    let (status, _) = http_get(admin, "/metrics").unwrap();
    let scrape = scrape.elapsed();
    assert_eq!(status, 200);
    assert!(
        scrape < Duration::from_secs(2),
        "a scrape waited {scrape:?} behind silent admin clients"
    );
    // Keep scraping a moment after the traffic, so a scrape stuck behind the silent clients
    // gets its turn once they time out.
    let m = Metrics::scrape_until(admin, |m| {
        m.get("sidecar_connections_closed_total", &out_reason("ok")) == N as f64
    });
    stop.store(true, Ordering::SeqCst);
    scraper.join().unwrap();
    drop(stuck);
    assert_eq!(
        m.get("sidecar_sent_bytes_total", &[("direction", "outbound")]),
        (N * 500) as f64
    );
    assert!(
        answered.load(Ordering::SeqCst) > 0,
        "the scraper got answers"
    );
    println!(
        "{N} connections in {took:.2?} under admin load; {} admin answers; a scrape took \
         {scrape:?} with 20 silent admin clients connected",
        answered.load(Ordering::SeqCst)
    );
    run.finish();
}

// ---------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------

/// A busy admin address the user chose, or an access log that cannot be opened, stops the
/// run with one clear line before anything is attached.
#[test]
fn bad_observability_options_fail_cleanly() {
    if !privileged("bad_observability_options_fail_cleanly") {
        return;
    }
    let _busy = TcpListener::bind("127.0.0.1:17060").unwrap();
    for (args, expect) in [
        (
            vec!["--admin-addr", "127.0.0.1:17060"],
            "admin address 127.0.0.1:17060 is already in use",
        ),
        (
            vec!["--access-log", "/nonexistent-dir/access.log"],
            "cannot open the access log /nonexistent-dir/access.log",
        ),
        (vec!["--admin-addr", "localhost"], "is not an admin address"),
    ] {
        let out = Command::new(sidecar_bin())
            .args(["run", "--proxy-port", "17260"])
            .args(&args)
            .args(["--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "one error line: {stderr}");
    }
    // Nothing was left behind: the proxy port is free again.
    TcpListener::bind("127.0.0.1:17260").expect("proxy port released");
    // Asking a sidecar that is not there says so, and how to point at the right one.
    for cmd in ["status", "conns"] {
        let out = Command::new(sidecar_bin())
            .args([cmd, "--admin", "127.0.0.1:17061"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
        assert!(
            stderr.starts_with("error: no sidecar admin endpoint answers on 127.0.0.1:17061")
                && stderr.contains("--admin")
                && stderr.lines().count() == 1,
            "{cmd}: {stderr}"
        );
    }
}
