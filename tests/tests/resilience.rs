//! What the proxy adds when destinations fail or are busy: connect retries, circuit breaking
//! per destination, and the per-destination connection cap, on the real kernel.
//!
//! Every test starts with `privileged()` (skips locally, fails in CI, when it cannot run) and
//! holds `serial()`. Traffic stays on 127.0.0.1; ports come from `sidecar_tests::ports`.
//! Every wait is bounded.
//! Also for kernel pass-through: the kernel holds the per-destination cap at `connect()`, and
//! a `[[destination]]` table that asks for retries sends its destinations through the proxy.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sidecar_tests::{
    EchoServer, SidecarRun,
    admin::{http_get, metric_value},
    assert_no_leftovers, bpf, host, leaks, ports, privileged,
    protocol::{ConnectFailLine, EchoLine, parse_lines},
    scratch::Scratch,
    script::{arg, wait_for_file},
    serial,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Waits (bounded) for a line starting with `marker` on the run's stdout; all lines so far.
fn wait_line(run: &SidecarRun, marker: &str) -> Vec<String> {
    let found = host::wait_until(STEP_TIMEOUT, || {
        run.stdout_lines().iter().any(|l| l.starts_with(marker))
    });
    let lines = run.stdout_lines();
    assert!(
        found,
        "no {marker:?} line within {STEP_TIMEOUT:?}; stdout: {lines:#?}\nstderr:\n{}",
        run.stderr_text()
    );
    lines
}

/// The value of an unlabelled metric in a scrape of `admin`.
fn metric(admin: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").expect("GET /metrics");
    metric_value(&body, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// A labelled series' value in a scrape of `admin` (`labels` as written in the exposition).
fn series(admin: SocketAddr, name: &str, labels: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").expect("GET /metrics");
    let prefix = format!("{name}{{{labels}}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in /metrics:\n{body}"))
}

/// `connect-fail` lines the app printed, in order.
fn probes(lines: &[String]) -> Vec<ConnectFailLine> {
    parse_lines(lines)
}

/// The access log's JSON lines.
fn access_log(path: &std::path::Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An upstream that refuses for at least 300 ms (and until every connection has seen it
/// refuse) and then comes up: with retries on, every connection the app made during the
/// outage succeeds, and the access log says how often each was retried. With retries off,
/// the same connections fail at once.
#[test]
fn retries_ride_out_an_upstream_that_comes_up_late() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    const CONNECTIONS: usize = 4;
    let scratch = Scratch::new("res-retry");
    for retries in [12, 0] {
        let [port, admin_port] = ports::take_each();
        let (upstream, admin) = (local(port), local(admin_port));
        let go = scratch.dir.join(format!("go-{retries}"));
        let log = scratch.dir.join(format!("access-{retries}.log"));
        let script = format!(
            "echo STARTED; {}; {CLIENT} echo {} {} {} {}; echo \"DONE $?\"",
            wait_for_file(&go),
            arg("--addr", upstream),
            arg("--size", 64),
            arg("--count", CONNECTIONS),
            arg("--concurrency", CONNECTIONS),
        );
        let mut run = SidecarRun::builder(ports::take())
            .arg(format!("--admin-addr={admin}"))
            .arg(format!("--connect-retries={retries}"))
            .arg("--retry-backoff-ms=50")
            // Room for every retry (a refused connect is immediate; the backoffs add up to
            // 2-10 s), also in a slow guest.
            .arg("--connect-timeout-ms=30000")
            // Every failed attempt would count towards opening the circuit: off here.
            .arg("--circuit-failures=0")
            .arg(format!("--access-log={}", log.display()))
            .command(["sh", "-c", &script])
            .start();
        // The command starts once the admin server serves.
        wait_line(&run, "STARTED");
        fs::write(&go, b"").unwrap();
        // With retries, the outage lasts 300 ms and until every connection is open and has
        // had a retry refused (/connections shows each one's retries so far); without, until
        // every connection has failed, however slowly the app gets to make them.
        let (lines, _upstream) = if retries > 0 {
            let outage = Instant::now() + Duration::from_millis(300);
            let retried = || {
                let (_, body) = http_get(admin, "/connections").expect("GET /connections");
                let list: Value = serde_json::from_str(&body).unwrap();
                let rows = list["connections"].as_array().cloned().unwrap_or_default();
                rows.iter()
                    .filter(|c| c["original_dst"] == upstream.to_string())
                    .filter(|c| c["connect_retries"].as_u64() >= Some(1))
                    .count()
            };
            assert!(
                host::wait_until(STEP_TIMEOUT, || retried() == CONNECTIONS),
                "the connections were not all retried during the outage"
            );
            thread::sleep(outage.saturating_duration_since(Instant::now()));
            let server = EchoServer::bind(upstream).expect("binding the late upstream");
            (wait_line(&run, "DONE"), Some(server))
        } else {
            (wait_line(&run, "DONE"), None)
        };
        let done = run.finish(STEP_TIMEOUT);
        done.assert_exit_code(0);
        let echoed: Vec<EchoLine> = parse_lines(&lines);
        assert_eq!(echoed.len(), CONNECTIONS, "{lines:#?}");
        let logged: Vec<Value> = access_log(&log)
            .into_iter()
            .filter(|l| l["original_dst"] == upstream.to_string())
            .collect();
        assert_eq!(logged.len(), CONNECTIONS, "access log: {logged:#?}");
        if retries > 0 {
            assert!(
                echoed.iter().all(|l| l.ok),
                "with retries, every connection made during the outage must succeed: \
                 {echoed:#?}\nstderr:\n{}",
                done.stderr.join("\n")
            );
            for l in &logged {
                let n = l["connect_retries"].as_u64().unwrap();
                assert!(
                    (1..=retries).contains(&n),
                    "a connection made during the outage was retried {n} times: {l}"
                );
                assert_eq!(l["close_reason"], "ok", "{l}");
            }
            let report = done.report();
            assert!(report.connections.iter().all(|c| c.connect_retries >= 1));
        } else {
            assert!(
                echoed.iter().all(|l| !l.ok),
                "without retries, connections to a refusing upstream fail: {echoed:#?}"
            );
            for l in &logged {
                assert_eq!(l["connect_retries"], 0, "{l}");
                assert_eq!(l["close_reason"], "upstream_connect_failed", "{l}");
                let ms = l["duration_ms"].as_f64().unwrap();
                // Not after the 30 s connect timeout (room for an emulated guest).
                assert!(ms < 1000.0, "a refused connect took {ms} ms to fail: {l}");
            }
        }
        assert_no_leftovers(done.pid);
    }
}

/// Where the circuit of a dead upstream is enforced, by how the connection would go.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// eBPF, `--proxy-all`: the kernel refuses the app's connect (EPERM).
    Proxied,
    /// eBPF pass-through: the kernel's reports of failed connects open it, and the kernel
    /// refuses the next ones.
    Passthrough,
    /// iptables mode: the proxy accepts and resets at once.
    Iptables,
}

/// A dead upstream: after the threshold its circuit opens and new connections to it fail
/// within 5 ms (measured by the app), while another destination works; once the upstream
/// is back and the open period has passed, the one trial connection closes the circuit.
/// In eBPF mode, for connections through the proxy and passed through: the kernel refuses
/// the app's `connect()` while the circuit is open.
#[test]
fn a_dead_upstreams_circuit_is_refused_at_connect_in_ebpf_mode() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    dead_upstream_circuit(Path::Proxied, ports::take());
    dead_upstream_circuit(Path::Passthrough, ports::take());
}

/// The same in iptables mode, where the proxy refuses (a reset right after accept).
#[test]
fn a_dead_upstreams_circuit_is_refused_by_the_proxy_in_iptables_mode() {
    if !privileged() || !sidecar_tests::require("iptables") {
        return;
    }
    let _serial = serial();
    dead_upstream_circuit(Path::Iptables, ports::take());
}

fn dead_upstream_circuit(path: Path, proxy_port: u16) {
    const THRESHOLD: usize = 3;
    const FAST: usize = 5;
    // Long enough for the five fast probes and the other destination's to run while the
    // circuit stays open, even in an emulated guest where each probe's exec takes a while
    // (at 500 ms a 6.1 guest once saw the circuit go half-open between probes and re-open).
    const OPEN: Duration = Duration::from_secs(3);
    let [dead_port, admin_port] = ports::take_each();
    let (dead, admin) = (local(dead_port), local(admin_port));
    let other = EchoServer::start_v4();
    let scratch = Scratch::new("res-circuit");
    let go: Vec<_> = (1..=3)
        .map(|i| scratch.dir.join(format!("go{i}")))
        .collect();
    let mut script = wait_for_file(&go[0]);
    for _ in 0..THRESHOLD {
        script += &format!("; {}", probe(dead));
    }
    script += &format!("; echo FAILED; {}", wait_for_file(&go[1]));
    for _ in 0..FAST {
        script += &format!("; {}", probe(dead));
    }
    script += &format!("; {}; echo OPENED", probe(other.addr()));
    script += &format!(
        "; {}; {}; {}; echo CLOSED; exec cat >/dev/null",
        wait_for_file(&go[2]),
        probe(dead),
        probe(dead)
    );
    let mut run = SidecarRun::builder(proxy_port)
        .arg(format!("--admin-addr={admin}"))
        .arg("--connect-retries=0")
        .arg(format!("--circuit-failures={THRESHOLD}"))
        .arg(format!("--circuit-open-ms={}", OPEN.as_millis()));
    run = match path {
        Path::Proxied => run,
        Path::Passthrough => run.passthrough(),
        Path::Iptables => run.arg("--mode=iptables"),
    };
    let mut run = run.command(["sh", "-c", &script]).start();
    fs::write(&go[0], b"").unwrap();
    let lines = wait_line(&run, "FAILED");
    // Pass-through failures reach the circuit when the kernel reports them.
    assert!(
        host::wait_until(STEP_TIMEOUT, || metric(admin, "sidecar_circuits_open")
            == 1.0),
        "{path:?}: the circuit did not open after {THRESHOLD} failures: {lines:#?}"
    );
    fs::write(&go[1], b"").unwrap();
    let lines = wait_line(&run, "OPENED");
    let seen = probes(&lines);
    assert_eq!(seen.len(), THRESHOLD + FAST + 1, "{lines:#?}");
    for p in &seen[..THRESHOLD + FAST] {
        assert!(
            p.error.is_some(),
            "{path:?}: the dead upstream answered: {p:?}"
        );
    }
    // Refused at once, not after dialling: the counters below say who refused. How fast is
    // the bench's question; this bound only catches a probe that waited for a connect
    // timeout, with room for an emulated guest.
    let fast_probes = &seen[THRESHOLD..THRESHOLD + FAST];
    let slow: Vec<_> = fast_probes
        .iter()
        .filter(|p| p.elapsed_ms >= 1000)
        .collect();
    assert!(
        slow.is_empty(),
        "{path:?}: with the circuit open, connections must fail at once: {slow:?}"
    );
    assert!(
        seen[THRESHOLD + FAST].error.is_none(),
        "{path:?}: another destination is unaffected: {:?}",
        seen[THRESHOLD + FAST]
    );
    assert_eq!(
        series(admin, "sidecar_circuit_transitions_total", "to=\"open\""),
        1.0
    );
    let (in_kernel, in_proxy) = (
        metric(admin, "sidecar_ebpf_connect_circuit_open_total"),
        metric(admin, "sidecar_circuit_fast_failed_total"),
    );
    if path == Path::Iptables {
        assert_eq!((in_kernel, in_proxy), (0.0, FAST as f64), "{path:?}");
    } else {
        // Refused by connect() itself, before any proxy or SYN.
        assert_eq!((in_kernel, in_proxy), (FAST as f64, 0.0), "{path:?}");
        for p in fast_probes {
            assert!(!p.connected, "{path:?}: connect() must fail: {p:?}");
        }
    }

    // The upstream comes back; after the open period the trial connects and closes it.
    let _back = EchoServer::bind(dead).expect("binding the upstream again");
    thread::sleep(OPEN + Duration::from_millis(100));
    fs::write(&go[2], b"").unwrap();
    let lines = wait_line(&run, "CLOSED");
    let seen = probes(&lines);
    for p in &seen[THRESHOLD + FAST + 1..] {
        assert!(
            p.error.is_none(),
            "{path:?}: after the trial, traffic flows: {p:?}"
        );
    }
    assert!(
        host::wait_until(STEP_TIMEOUT, || metric(admin, "sidecar_circuits_open")
            == 0.0),
        "{path:?}: the circuit did not close"
    );
    assert_eq!(
        series(admin, "sidecar_circuit_transitions_total", "to=\"closed\""),
        1.0
    );
    let done = run.finish(STEP_TIMEOUT);
    done.assert_exit_code(0);
    let outcomes: Vec<&str> = done
        .report()
        .connections
        .iter()
        .filter(|c| c.original_dst == Some(dead))
        .map(|c| c.outcome.as_str())
        .collect();
    // Connects the kernel refused never became connections: no record, only the counter.
    let refused_by_proxy = if path == Path::Iptables { FAST } else { 0 };
    let expected: Vec<&str> = std::iter::repeat_n("upstream_connect_failed", THRESHOLD)
        .chain(std::iter::repeat_n("circuit_open", refused_by_proxy))
        .chain(["ok", "ok"])
        .collect();
    assert_eq!(outcomes, expected, "{path:?}");
    assert_no_leftovers(done.pid);
}

/// The connect-fail probe of `addr`, as a shell command.
fn probe(addr: SocketAddr) -> String {
    format!("{CLIENT} connect-fail {}", arg("--addr", addr))
}

/// Per-destination cap at [`CAP`].
const CAP: usize = 3;

/// A workload for the cap tests, its servers and its go-files: on `go[0]` it holds [`CAP`]
/// connections to `busy`; on `go[1]` it tries one more to `busy` and one to `other`
/// (`PROBED`); once the test releases the held ones, `RELEASED`; on `go[2]`, `after(busy)`.
/// Keep every field bound for the test's length: the servers and the directory go on drop.
struct CapScene {
    admin: SocketAddr,
    busy: EchoServer,
    _other: EchoServer,
    go: Vec<std::path::PathBuf>,
    script: String,
    _scratch: Scratch,
}

fn cap_scene(name: &str, after: impl Fn(SocketAddr) -> String) -> CapScene {
    let admin_port = ports::take();
    let (busy, other) = (EchoServer::start_v4(), EchoServer::start_v4());
    let scratch = Scratch::new(name);
    let go: Vec<_> = (1..=3)
        .map(|i| scratch.dir.join(format!("go{i}")))
        .collect();
    let script = format!(
        "echo STARTED; {}; exec 3<&0; {CLIENT} hold {} {} <&3 & {}; {}; {}; echo PROBED; \
         wait; echo RELEASED; {}{}",
        wait_for_file(&go[0]),
        arg("--addr", busy.addr()),
        arg("--count", CAP),
        wait_for_file(&go[1]),
        probe(busy.addr()),
        probe(other.addr()),
        wait_for_file(&go[2]),
        after(busy.addr()),
    );
    CapScene {
        admin: local(admin_port),
        busy,
        _other: other,
        go,
        script,
        _scratch: scratch,
    }
}

/// Past `--max-connections-per-destination`, a new connection to that destination fails at
/// once as `overloaded` while another destination works; afterwards the sidecar holds no
/// more descriptors or map entries than before.
#[test]
fn the_per_destination_cap_refuses_as_overloaded_and_leaks_nothing() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let CapScene {
        admin,
        busy,
        go,
        script,
        _other,
        _scratch,
    } = cap_scene("res-cap", |_| String::new());
    let mut run = SidecarRun::builder(ports::take())
        .arg(format!("--admin-addr={admin}"))
        .arg(format!("--max-connections-per-destination={CAP}"))
        .command(["sh", "-c", &script])
        .start();
    let pid = run.pid();
    wait_line(&run, "STARTED");
    let (baseline, _) = leaks::settle(pid, None, STEP_TIMEOUT, Duration::from_millis(200));
    fs::write(&go[0], b"").unwrap();
    let held = run.wait_ready(STEP_TIMEOUT);
    assert_eq!(held.len(), CAP);
    fs::write(&go[1], b"").unwrap();
    let lines = wait_line(&run, "PROBED");
    let seen = probes(&lines);
    assert_eq!(seen.len(), 2, "{lines:#?}");
    let (over, fine) = (&seen[0], &seen[1]);
    assert!(
        over.error.is_some(),
        "a connection past the cap worked: {over:?}"
    );
    assert!(over.elapsed_ms < 1000, "refused slowly: {over:?}");
    assert!(
        fine.error.is_none(),
        "another destination must work: {fine:?}"
    );
    assert_eq!(
        series(
            admin,
            "sidecar_connections_refused_total",
            "direction=\"outbound\",reason=\"max_connections_per_destination\""
        ),
        1.0
    );
    run.release();
    wait_line(&run, "RELEASED");
    let (after, ok) = leaks::settle(
        pid,
        Some(baseline),
        STEP_TIMEOUT,
        Duration::from_millis(200),
    );
    assert!(
        ok,
        "the sidecar holds more than before: {baseline:?} → {after:?}"
    );
    fs::write(&go[2], b"").unwrap();
    let done = run.finish(STEP_TIMEOUT);
    done.assert_exit_code(0);
    let overloaded: Vec<_> = done
        .report()
        .connections
        .iter()
        .filter(|c| c.outcome == "overloaded")
        .collect();
    assert_eq!(overloaded.len(), 1, "{:#?}", done.report().connections);
    assert_eq!(overloaded[0].original_dst, Some(busy.addr()));
    assert_no_leftovers(pid);
}

/// The policy file's `[[destination]]` table overrides the command line for the destinations
/// it names, and reloads at runtime: a cap of 1 refuses the second connection, a reload to 3
/// admits it; an invalid table is refused with its line while the one in force stays.
#[test]
fn a_policy_file_override_changes_a_destinations_cap_at_runtime() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let admin_port = ports::take();
    let admin = local(admin_port);
    let server = EchoServer::start_v4();
    let scratch = Scratch::new("res-policy");
    let policy = scratch.dir.join("policy.toml");
    let table = |cap: &str| {
        format!(
            "[[destination]]\nname = \"echo\"\ndestinations = [\"127.0.0.1/32\"]\nports = [{}]\n\
             {cap}\n",
            server.addr().port()
        )
    };
    fs::write(&policy, table("max_connections = 1")).unwrap();
    let go: Vec<_> = (1..=4)
        .map(|i| scratch.dir.join(format!("go{i}")))
        .collect();
    let probe = format!("{CLIENT} connect-fail {}", arg("--addr", server.addr()));
    let script = format!(
        "echo STARTED; {}; exec 3<&0; {CLIENT} hold {} {} <&3 & \
         {}; {probe}; echo P1; {}; {probe}; echo P2; {}; {probe}; echo P3; exec cat >/dev/null",
        wait_for_file(&go[0]),
        arg("--addr", server.addr()),
        arg("--count", 1),
        wait_for_file(&go[1]),
        wait_for_file(&go[2]),
        wait_for_file(&go[3]),
    );
    let mut run = SidecarRun::builder(ports::take())
        .arg(format!("--admin-addr={admin}"))
        .arg(format!("--policy={}", policy.display()))
        .command(["sh", "-c", &script])
        .start();
    wait_line(&run, "STARTED");
    let status = || -> Value {
        let (_, body) = http_get(admin, "/status").expect("GET /status");
        serde_json::from_str(&body).unwrap()
    };
    let shown = |s: &Value| s["policy"]["destinations"][0]["max_connections"].clone();
    assert_eq!(shown(&status()), 1, "{}", status());
    fs::write(&go[0], b"").unwrap();
    assert_eq!(run.wait_ready(STEP_TIMEOUT).len(), 1);
    fs::write(&go[1], b"").unwrap();
    let first = probes(&wait_line(&run, "P1"));
    assert!(
        first[0].error.is_some(),
        "cap 1: the second must fail: {first:?}"
    );

    // Reload with a cap of 3: the same connection now goes.
    fs::write(&policy, table("max_connections = 3")).unwrap();
    assert!(
        host::wait_until(STEP_TIMEOUT, || shown(&status()) == 3),
        "the reload did not show: {}",
        status()
    );
    let (_, config) = http_get(admin, "/config").expect("GET /config");
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["policy"]["destinations"][0]["name"], "echo",
        "{config}"
    );
    fs::write(&go[2], b"").unwrap();
    let second = probes(&wait_line(&run, "P2"));
    assert!(second[1].error.is_none(), "cap 3: it must work: {second:?}");

    // An invalid table (line 5) is refused; the cap of 3 stays in force.
    fs::write(&policy, table("circuit_open_ms = 0")).unwrap();
    assert!(
        host::wait_until(STEP_TIMEOUT, || status()["policy"]["reload_errors"] == 1),
        "the invalid file was not refused: {}",
        status()
    );
    assert_eq!(shown(&status()), 3);
    let stderr = run.stderr_text();
    assert!(
        stderr.contains("line 5") && stderr.contains("circuit_open_ms = 0"),
        "the refusal names the line and the problem:\n{stderr}"
    );
    fs::write(&go[3], b"").unwrap();
    let third = probes(&wait_line(&run, "P3"));
    assert!(third[2].error.is_none(), "the old cap stays: {third:?}");
    let done = run.finish(STEP_TIMEOUT);
    done.assert_exit_code(0);
    let overloaded = done
        .report()
        .connections
        .iter()
        .filter(|c| c.outcome == "overloaded")
        .count();
    assert_eq!(overloaded, 1);
    assert_no_leftovers(done.pid);
}

/// Passed-through connections are the app's own sockets, which the proxy never sees: with
/// `--max-connections-per-destination` set, the kernel counts them per destination and
/// refuses the app's `connect()` past the cap (EPERM) while another destination works. The
/// count follows the connections: when they close it goes (no map entry left), and the
/// destination takes connections again.
#[test]
fn the_kernel_holds_the_cap_on_passed_through_connections() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let CapScene {
        admin,
        busy,
        go,
        script,
        _other,
        _scratch,
    } = cap_scene("res-kcap", |busy| {
        format!("; {}; echo AGAIN; exec cat >/dev/null", probe(busy))
    });
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .arg(format!("--admin-addr={admin}"))
        .arg(format!("--max-connections-per-destination={CAP}"))
        .command(["sh", "-c", &script])
        .start();
    let pid = run.pid();
    wait_line(&run, "STARTED");
    let (_, config) = http_get(admin, "/config").expect("GET /config");
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["passthrough_max_connections_per_destination"], CAP,
        "{config}"
    );
    fs::write(&go[0], b"").unwrap();
    assert_eq!(run.wait_ready(STEP_TIMEOUT).len(), CAP);
    let counts = bpf::direct_counts(pid).expect("reading DIRECT_COUNTS");
    assert_eq!(counts, vec![(busy.addr(), CAP as u64)]);
    fs::write(&go[1], b"").unwrap();
    let lines = wait_line(&run, "PROBED");
    let seen = probes(&lines);
    assert_eq!(seen.len(), 2, "{lines:#?}");
    let (over, fine) = (&seen[0], &seen[1]);
    assert!(
        !over.connected && over.error.is_some(),
        "past the cap, connect() itself must fail: {over:?}"
    );
    // Refused by connect() itself (not connected): generous bound for emulated guests.
    assert!(over.elapsed_ms < 1000, "refused slowly: {over:?}");
    assert!(
        fine.error.is_none(),
        "another destination must work: {fine:?}"
    );
    assert_eq!(metric(admin, "sidecar_ebpf_connect_overloaded_total"), 1.0);

    run.release();
    wait_line(&run, "RELEASED");
    let mut left = Vec::new();
    assert!(
        host::wait_until(STEP_TIMEOUT, || {
            left = bpf::direct_counts(pid).expect("reading DIRECT_COUNTS");
            left.is_empty()
        }),
        "counts left after every connection closed: {left:?}"
    );
    fs::write(&go[2], b"").unwrap();
    let again = probes(&wait_line(&run, "AGAIN"));
    assert!(
        again[2].error.is_none(),
        "below the cap again, it must work: {again:?}"
    );
    let done = run.finish(STEP_TIMEOUT);
    done.assert_exit_code(0);
    let to_busy: Vec<(&str, &str)> = done
        .report()
        .connections
        .iter()
        .filter(|c| c.original_dst == Some(busy.addr()))
        .map(|c| (c.path.as_str(), c.outcome.as_str()))
        .collect();
    // The refused connect never became a connection: the counter has it, no record.
    assert_eq!(
        to_busy,
        vec![("passthrough", "ok"); CAP + 1],
        "{:#?}",
        done.report().connections
    );
    let summary = done.stderr_text();
    assert!(
        summary.contains("the kernel refused 1 connect(s) (EPERM): over the per-destination cap 1"),
        "the exit summary names the refusal:\n{summary}"
    );
    assert_no_leftovers(pid);
}

/// Retries need the proxy: a `[[destination]]` table asking for them sends its destinations
/// through the proxy while others pass through, and a reload that turns them off lets them
/// pass through again.
#[test]
fn a_destination_table_with_retries_is_proxied_while_others_pass_through() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let admin_port = ports::take();
    let admin = local(admin_port);
    let (retried, plain) = (EchoServer::start_v4(), EchoServer::start_v4());
    let scratch = Scratch::new("res-table-path");
    let policy = scratch.dir.join("policy.toml");
    let table = |retries: u32| {
        format!(
            "[[destination]]\nname = \"retried\"\ndestinations = [\"127.0.0.1/32\"]\n\
             ports = [{}]\nconnect_retries = {retries}\n",
            retried.addr().port()
        )
    };
    fs::write(&policy, table(2)).unwrap();
    let go = scratch.dir.join("go");
    let script = format!(
        "{}; {}; echo FIRST; {}; {}; echo SECOND; exec cat >/dev/null",
        probe(retried.addr()),
        probe(plain.addr()),
        wait_for_file(&go),
        probe(retried.addr()),
    );
    let mut run = SidecarRun::builder(ports::take())
        .passthrough()
        .arg(format!("--admin-addr={admin}"))
        .arg(format!("--policy={}", policy.display()))
        .command(["sh", "-c", &script])
        .start();
    let first = probes(&wait_line(&run, "FIRST"));
    assert!(first.iter().all(|p| p.error.is_none()), "{first:?}");
    fs::write(&policy, table(0)).unwrap();
    let status = || -> Value {
        let (_, body) = http_get(admin, "/status").expect("GET /status");
        serde_json::from_str(&body).unwrap()
    };
    assert!(
        host::wait_until(
            STEP_TIMEOUT,
            || status()["policy"]["destinations"][0]["connect_retries"] == 0
        ),
        "the reload did not show: {}",
        status()
    );
    fs::write(&go, b"").unwrap();
    let second = probes(&wait_line(&run, "SECOND"));
    assert!(second[2].error.is_none(), "{second:?}");
    let done = run.finish(STEP_TIMEOUT);
    done.assert_exit_code(0);
    let paths = |addr: SocketAddr| -> Vec<String> {
        done.report()
            .connections
            .iter()
            .filter(|c| c.original_dst == Some(addr))
            .map(|c| c.path.clone())
            .collect()
    };
    assert_eq!(paths(retried.addr()), ["proxy", "passthrough"]);
    assert_eq!(paths(plain.addr()), ["passthrough"]);
    assert_no_leftovers(done.pid);
}
