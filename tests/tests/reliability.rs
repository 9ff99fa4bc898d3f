//! Reliability under load and faults of the upstream, the proxy killed mid-stream, and the
//! security edges of the proxy (tunnels to its own ports, admin on loopback only). (The
//! metadata address is in policy.rs, with the other refusals at `connect()`.)
//!
//! Every test starts with `privileged()` (skips locally, fails in CI, when it cannot run) and
//! holds `serial()`. Traffic stays on 127.0.0.0/8 or inside network namespaces the test
//! created (prefix `scr-`, addresses 10.205.x.x, no route out). Ports come
//! from `sidecar_tests::ports` (ports inside the namespaces are fixed).
//! Every loop is bounded in count and time, every wait has a timeout.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use sidecar_tests::{
    EchoServer, SidecarRun, admin, assert_no_leftovers, host,
    leaks::{self, Held, status_kib},
    ports, privileged,
    protocol::{ConnectFailLine, EchoLine},
    scratch::Scratch,
    script::{arg, wait_for_file},
    serial,
};

/// The workload binary, built by cargo for this test target.
const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");

// ---------------------------------------------------------------------------------------
// Load

/// Raises this process's fd limit towards `want` (children — the sidecar and its app —
/// inherit it) and returns the soft limit now in force. Root with CAP_SYS_RESOURCE may raise
/// the hard limit up to `fs.nr_open`; without it (a container), the soft limit goes up to
/// the hard one.
fn raise_fd_limit(want: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid rlimit for the duration of the calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        let raised = libc::rlimit {
            rlim_cur: want.max(rl.rlim_cur),
            rlim_max: want.max(rl.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            rl.rlim_cur = rl.rlim_max;
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &rl),
                0,
                "setrlimit(NOFILE): {}",
                std::io::Error::last_os_error()
            );
        }
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
    }
    rl.rlim_cur
}

/// Waits (bounded) for a line equal to `marker` on the run's stdout.
fn wait_line(run: &SidecarRun, marker: &str, timeout: Duration) -> Vec<String> {
    let found = host::wait_until(timeout, || {
        run.stdout_lines().iter().any(|l| l.starts_with(marker))
    });
    let lines = run.stdout_lines();
    assert!(
        found,
        "no {marker:?} line within {timeout:?}; last lines: {:#?}\nstderr:\n{}",
        &lines[lines.len().saturating_sub(5)..],
        run.stderr_text()
    );
    lines
}

/// How many connections the load tests open at once: [`LOAD_CONNECTIONS`], or what the fd
/// limit allows. Per connection the sidecar holds 2 fds (app leg, upstream leg), the client
/// and the echo server (this process) 1 each, so the sidecar's limit binds. Where the hard
/// limit cannot be raised (no CAP_SYS_RESOURCE), the count is what that limit allows.
fn load_connections() -> usize {
    let limit = raise_fd_limit(2 * LOAD_CONNECTIONS as u64 + FD_HEADROOM);
    let connections = LOAD_CONNECTIONS.min((limit.saturating_sub(FD_HEADROOM) / 2) as usize);
    assert!(
        connections >= LOAD_CONNECTIONS / 2,
        "RLIMIT_NOFILE ({limit}) is too low for a meaningful load test"
    );
    eprintln!("RLIMIT_NOFILE {limit}: {connections} concurrent connections");
    connections
}

/// Connections open at once in the load test, and their payload size.
const LOAD_CONNECTIONS: usize = 10_000;
const LOAD_SIZE: usize = 4096;
/// Rounds of the load: memory that keeps growing round after round is a leak.
const LOAD_ROUNDS: usize = 5;
/// File descriptors the sidecar needs besides its connections (maps, listeners, runtime).
const FD_HEADROOM: u64 = 512;
/// The warm-up before the baseline: the runtime's threads, pools and the maps' first
/// entries exist before anything is measured.
const WARMUP_CONNECTIONS: usize = 200;
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Heap growth per connection, once warm, that counts as a leak: less than any record, task
/// or buffer a connection could leave behind.
const LEAK_BYTES: u64 = 64;

/// 10,000 connections open at the same time through one sidecar, each echoing 4 KiB byte
/// for byte; then, with all closed, the sidecar holds no more fds and map entries than before
/// the load, and a second identical round does not grow its memory (a leak would).
#[test]
fn ten_thousand_concurrent_connections_echo_exactly_and_leak_nothing() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let connections = load_connections();
    let server = EchoServer::start_v4();
    // Removed on drop, also when the test fails.
    let scratch = Scratch::new("scr-load");
    let dir = &scratch.dir;
    let go: Vec<_> = (1..=LOAD_ROUNDS)
        .map(|r| dir.join(format!("go{r}")))
        .collect();
    for f in &go {
        let _ = fs::remove_file(f);
    }
    let echo = |count: usize, size: usize| {
        format!(
            "{CLIENT} echo {} {} {} {}",
            arg("--addr", server.addr()),
            arg("--size", size),
            arg("--count", count),
            arg("--concurrency", count)
        )
    };
    let mut script = format!("{}; echo \"WARM $?\"", echo(WARMUP_CONNECTIONS, LOAD_SIZE));
    for (round, file) in go.iter().enumerate() {
        script += &format!(
            "; {}; {}; echo \"LOAD{} $?\"",
            wait_for_file(file),
            echo(connections, LOAD_SIZE),
            round + 1
        );
    }
    script += "; exec cat >/dev/null";
    let admin_port = ports::take();
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port));
    let mut run = SidecarRun::builder(ports::take())
        .arg(format!("--admin-addr={admin}"))
        .command(["sh", "-c", &script])
        .start();
    let pid = run.pid();

    let lines = wait_line(&run, "WARM", LOAD_TIMEOUT);
    assert!(
        lines.iter().any(|l| l == "WARM 0"),
        "warm-up failed: {lines:?}"
    );
    // Idle after the warm-up: the state to come back to.
    let baseline = settle(pid, None);
    let heap_base = heap_in_use(admin);
    eprintln!(
        "baseline: {baseline:?}, heap {heap_base} B, RSS {} KiB",
        status_kib(pid, "VmRSS")
    );

    let mut heap_after = Vec::new();
    for (round, file) in (1..).zip(&go) {
        let started = Instant::now();
        fs::write(file, b"").unwrap();
        let marker = format!("LOAD{round}");
        let lines = wait_line(&run, &marker, LOAD_TIMEOUT);
        let took = started.elapsed();
        let echoed: Vec<EchoLine> = sidecar_tests::protocol::parse_lines(&lines);
        let failed: Vec<&EchoLine> = echoed.iter().filter(|l| !l.ok).collect();
        if !failed.is_empty() {
            let summary = format!(
                "round {round}: {} of {} connections failed, e.g. {:#?}",
                failed.len(),
                echoed.len(),
                &failed[..failed.len().min(5)]
            );
            // The script waits for the next round: SIGTERM ends it, and the run writes its
            // report on the way out.
            run.signal(libc::SIGTERM);
            let done = run.finish(LOAD_TIMEOUT);
            let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
            for c in done
                .report()
                .connections
                .iter()
                .filter(|c| c.outcome != "ok")
            {
                *outcomes
                    .entry(format!(
                        "{}: {}",
                        c.outcome,
                        c.error.as_deref().unwrap_or("-")
                    ))
                    .or_default() += 1;
            }
            panic!("{summary}\nthe sidecar's outcomes of failed connections: {outcomes:#?}");
        }
        let expected = WARMUP_CONNECTIONS + round * connections;
        assert_eq!(echoed.len(), expected, "round {round}: echo results");
        assert!(
            lines.iter().any(|l| *l == format!("{marker} 0")),
            "round {round}: the client failed"
        );
        let held = settle(pid, Some(baseline));
        let heap = heap_in_use(admin);
        eprintln!(
            "round {round}: {connections} connections in {took:?}; after: {held:?}, heap \
             {heap} B, RSS {} KiB, peak RSS {} KiB",
            status_kib(pid, "VmRSS"),
            status_kib(pid, "VmHWM")
        );
        heap_after.push(heap);
    }
    // A leak grows the heap by the same amount every round. What the sidecar allocates and
    // keeps on purpose stops growing after the first round (runtime slabs, the copy-buffer
    // pool, the metrics' label sets) or was reserved at start (the report's journal), so
    // from the second round on the heap must stay flat: less than LEAK_BYTES per connection.
    // (RSS cannot tell: glibc keeps freed memory for reuse and returns some of it when it
    // chooses, so the RSS after identical rounds wanders by tens of MiB.)
    let later = heap_after[LOAD_ROUNDS - 1].saturating_sub(heap_after[0]);
    let per_connection = later / ((LOAD_ROUNDS - 1) * connections) as u64;
    assert!(
        per_connection < LEAK_BYTES,
        "the heap keeps growing round after round (a leak): {per_connection} B per \
         connection; baseline {heap_base} B, after each round {heap_after:?} B"
    );
    // What the rounds freed goes back to the kernel within seconds (the sidecar trims the
    // allocator's free pages when resident memory exceeds the heap in use by 32 MiB), so a
    // burst does not leave a pod at its memory limit.
    let heap = heap_after[LOAD_ROUNDS - 1] / 1024;
    let deadline = Instant::now() + TRIM_TIMEOUT;
    let mut rss = status_kib(pid, "VmRSS");
    while rss > heap + TRIM_SLACK_KIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        rss = status_kib(pid, "VmRSS");
    }
    assert!(
        rss <= heap + TRIM_SLACK_KIB,
        "RSS {rss} KiB still above the heap in use ({heap} KiB) + {TRIM_SLACK_KIB} KiB \
         {TRIM_TIMEOUT:?} after the load: freed memory is not given back"
    );
    let done = run.finish(LOAD_TIMEOUT);
    done.assert_exit_code(0);
    assert_no_leftovers(pid);
}

/// How long the sidecar may keep freed memory resident after a burst (it looks every 5 s).
const TRIM_TIMEOUT: Duration = Duration::from_secs(15);
/// Resident memory above the heap in use that may stay after the trim.
const TRIM_SLACK_KIB: u64 = 48 * 1024;

/// The sidecar's `sidecar_heap_in_use_bytes`, from its `/metrics`.
fn heap_in_use(admin: SocketAddr) -> u64 {
    let (status, body) = admin::http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    admin::metric_value(&body, "sidecar_heap_in_use_bytes")
        .unwrap_or_else(|| panic!("no sidecar_heap_in_use_bytes in /metrics:\n{body}")) as u64
}

/// Most RSS that 10,000 idle proxied connections may add to the sidecar (scaled down where
/// the fd limit allows fewer connections).
const IDLE_RSS_LIMIT_KIB: u64 = 64 * 1024;

/// 10,000 connections held open through one sidecar, idle after one 64-byte ping-pong each,
/// add at most 64 MiB to its RSS: copy buffers are on loan only while bytes move, so an idle
/// connection holds its sockets, its task and its record, not 2 × 16 KiB of buffers. (With a
/// buffer per direction for the connection's life, 9,744 of them added 218,604 KiB.)
#[test]
fn ten_thousand_idle_connections_add_little_memory() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let connections = load_connections();
    let server = EchoServer::start_v4();
    let scratch = Scratch::new("scr-idle");
    let go = scratch.dir.join("go");
    let script = format!(
        "{CLIENT} echo {} --size=4096 {} {}; echo \"WARM $?\"; {}; exec {CLIENT} hold {} {}",
        arg("--addr", server.addr()),
        arg("--count", WARMUP_CONNECTIONS),
        arg("--concurrency", WARMUP_CONNECTIONS),
        wait_for_file(&go),
        arg("--addr", server.addr()),
        arg("--count", connections),
    );
    let mut run = SidecarRun::builder(ports::take())
        .arg("--admin-addr=off")
        .command(["sh", "-c", &script])
        .start();
    let pid = run.pid();
    let lines = wait_line(&run, "WARM", LOAD_TIMEOUT);
    assert!(
        lines.iter().any(|l| l == "WARM 0"),
        "warm-up failed: {lines:?}"
    );
    settle(pid, None);
    let before = status_kib(pid, "VmRSS");
    fs::write(&go, b"").unwrap();
    let held = run.wait_ready(LOAD_TIMEOUT);
    // The warm-up's echo lines parse as hold lines too.
    assert_eq!(
        held.len(),
        WARMUP_CONNECTIONS + connections,
        "connections held open"
    );
    // Let the last copies park and their buffers go back to the pool.
    std::thread::sleep(Duration::from_millis(500));
    let after = status_kib(pid, "VmRSS");
    let added = after.saturating_sub(before);
    let allowed = IDLE_RSS_LIMIT_KIB * connections as u64 / LOAD_CONNECTIONS as u64;
    eprintln!(
        "{connections} idle connections: RSS {before} KiB before, {after} KiB with them open: \
         {added} KiB added ({} B per connection; allowed {allowed} KiB)",
        added * 1024 / connections as u64
    );
    assert!(
        added <= allowed,
        "{connections} idle connections added {added} KiB of RSS, more than {allowed} KiB"
    );
    run.release();
    let done = run.finish(LOAD_TIMEOUT);
    done.assert_exit_code(0);
    assert_no_leftovers(pid);
}

/// Waits (bounded) until the sidecar's fds and map entries stop changing — and, with a
/// `baseline`, until they are back at most at it — and returns them.
fn settle(pid: u32, baseline: Option<Held>) -> Held {
    let (last, ok) = leaks::settle(pid, baseline, SETTLE_TIMEOUT, Duration::from_millis(200));
    if let Some(b) = baseline {
        assert!(
            ok,
            "the sidecar still holds more than before the load after {SETTLE_TIMEOUT:?}: \
             before {b:?}, now {last:?}"
        );
    }
    last
}

// ---------------------------------------------------------------------------------------
// Faults of the upstream

/// An upstream that misbehaves on purpose: accepts one connection, echoes `echo_first`
/// bytes, then resets it (`reset`) or stalls holding it open. Bounded: it gives up after
/// `FAULTY_LIFETIME` and its thread ends.
struct FaultyUpstream {
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

const FAULTY_LIFETIME: Duration = Duration::from_secs(30);

impl FaultyUpstream {
    fn start(echo_first: usize, reset: bool) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + FAULTY_LIFETIME;
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let mut echoed = 0;
            let mut buf = [0u8; 4096];
            while echoed < echo_first && Instant::now() < deadline {
                match (&stream).read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let n = n.min(echo_first - echoed);
                        if (&stream).write_all(&buf[..n]).is_err() {
                            return;
                        }
                        echoed += n;
                    }
                    Err(_) => {}
                }
            }
            if reset {
                // SO_LINGER 0: close() sends RST instead of FIN.
                sidecar_tests::blocking::reset_on_close(&stream);
                drop(stream);
            } else {
                // Stall: read and discard, never answer, until the peer closes or time is up.
                while Instant::now() < deadline {
                    if let Ok(0) = (&stream).read(&mut buf) {
                        return;
                    }
                }
            }
        });
        Self {
            addr,
            thread: Some(thread),
        }
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long an upstream fault may take to reach the client. The client's own I/O timeout
/// is 20 s, so a proxy that hid the fault would blow this bound.
const PROMPT: Duration = Duration::from_secs(5);

/// The upstream resets a connection after echoing part of the stream: every byte it sent
/// before reaches the client, whose next read then fails at once with a reset (propagated,
/// never turned into a clean EOF, never a hang); the connection's outcome is `io_error`.
#[test]
fn upstream_reset_mid_stream_fails_the_client_promptly() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let size = 64;
    let rounds_before_reset = 10;
    let upstream = FaultyUpstream::start(size * rounds_before_reset, true);
    let started = Instant::now();
    let mut run = SidecarRun::builder(ports::take())
        .arg("--admin-addr=off")
        .command([
            CLIENT.to_string(),
            "pingpong".into(),
            arg("--addr", upstream.addr),
            arg("--size", size),
            arg("--rounds", 1000),
        ])
        .start();
    let done = run.finish(Duration::from_secs(60));
    let took = started.elapsed();
    let lines: Vec<EchoLine> = done.parse_stdout();
    let [line] = lines.as_slice() else {
        panic!(
            "expected one pingpong result: {lines:?}\n{}",
            done.stderr_text()
        );
    };
    assert!(
        !line.ok,
        "the reset connection looked fine to the client: {line:?}"
    );
    assert_eq!(
        line.received,
        (size * rounds_before_reset) as u64,
        "every byte the upstream sent before the reset reaches the client: {line:?}"
    );
    // A reset, not EOF: a clean EOF would make a truncated stream look complete.
    let error = line.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("reset"),
        "the client should see the upstream's reset, saw: {line:?}"
    );
    assert!(
        took < PROMPT + Duration::from_secs(5),
        "the failure took {took:?}"
    );
    let conn = done.report().single_connection_to(upstream.addr);
    assert_eq!(conn.outcome, "io_error", "{conn:#?}");
    assert_no_leftovers(done.pid);
}

/// The upstream accepts and then never answers: the idle timeout closes the connection, the
/// client sees EOF within about that timeout, and the outcome is `idle_timeout`.
#[test]
fn stalled_upstream_is_closed_by_the_idle_timeout() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let idle = Duration::from_secs(2);
    let upstream = FaultyUpstream::start(0, false);
    let mut run = SidecarRun::builder(ports::take())
        .arg("--admin-addr=off")
        .arg(arg("--idle-timeout-secs", idle.as_secs()))
        .command([
            CLIENT.to_string(),
            "connect-fail".into(),
            arg("--addr", upstream.addr),
        ])
        .start();
    let done = run.finish(Duration::from_secs(60));
    done.assert_exit_code(0);
    let lines: Vec<ConnectFailLine> = done.parse_stdout();
    let [line] = lines.as_slice() else {
        panic!(
            "expected one connect-fail result: {lines:?}\n{}",
            done.stderr_text()
        );
    };
    assert!(line.connected, "{line:?}");
    let error = line
        .error
        .as_deref()
        .unwrap_or_else(|| panic!("a byte came back: {line:?}"));
    assert!(
        error == "read: EOF" || error.contains("reset"),
        "the client should see the proxy close the stalled connection, saw: {line:?}"
    );
    let elapsed = Duration::from_millis(line.elapsed_ms);
    assert!(
        elapsed >= idle.mul_f64(0.9) && elapsed < idle + Duration::from_secs(2),
        "closed after {elapsed:?}, the idle timeout is {idle:?}: {line:?}"
    );
    let conn = done.report().single_connection_to(upstream.addr);
    assert_eq!(conn.outcome, "idle_timeout", "{conn:#?}");
    assert_no_leftovers(done.pid);
}

// ---------------------------------------------------------------------------------------
// The proxy killed mid-stream

/// SIGKILL of the sidecar while the app streams through it. What the app sees:
/// - its open connection ends at once (the kernel closes the proxy's sockets: EOF/reset);
/// - new connects from the app cgroup fail fast (refused): the connect hooks stay attached
///   through their pins and keep rewriting to the dead proxy port — fail-closed, nothing
///   bypasses the proxy;
/// - `sidecar cleanup` removes pins, links and cgroups, after which the same process
///   (moved out of the removed cgroup) reaches the destination directly again.
#[test]
fn sigkill_mid_stream_fails_closed_until_cleanup() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    let scratch = Scratch::new("scr-kill");
    let dir = &scratch.dir;
    let (go1, go2) = (dir.join("go1"), dir.join("go2"));
    let (out0, out1, out2) = (dir.join("out0"), dir.join("out1"), dir.join("out2"));
    for f in [&go1, &go2, &out0, &out1, &out2] {
        let _ = fs::remove_file(f);
    }
    // Stream (bounded to 20 s) in the background, then after the kill a new connect, then
    // after cleanup another one. Results go to files: the sidecar's pipes die with it.
    let script = format!(
        "{CLIENT} pingpong {addr} --size=1024 --count=1 --seconds=20 > {o0} 2>&1 & \
         {w1}; {CLIENT} connect-fail {addr} > {o1} 2>&1; {w2}; \
         {CLIENT} connect-fail {addr} > {o2} 2>&1; wait",
        addr = arg("--addr", server.addr()),
        o0 = out0.display(),
        o1 = out1.display(),
        o2 = out2.display(),
        w1 = wait_for_file(&go1),
        w2 = wait_for_file(&go2),
    );
    let mut run = SidecarRun::builder(ports::take())
        .arg("--admin-addr=off")
        .command(["sh", "-c", &script])
        .start();
    let pid = run.pid();
    server.wait_for_peers(1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let app = run.app_pids();
    assert!(!app.is_empty(), "the app runs in the app cgroup");

    let killed_at = Instant::now();
    run.signal(libc::SIGKILL);
    run.wait_exit(Duration::from_secs(10))
        .expect("a SIGKILLed sidecar exits");
    // The stream ends promptly with an error.
    let read = |f: &Path| fs::read_to_string(f).unwrap_or_default();
    assert!(
        host::wait_until(PROMPT, || read(&out0).contains('{')),
        "the app's stream did not end within {PROMPT:?} of the kill: {:?}",
        read(&out0)
    );
    let stream_end = killed_at.elapsed();
    let streamed: Vec<EchoLine> = sidecar_tests::protocol::parse_lines(
        &read(&out0).lines().map(String::from).collect::<Vec<_>>(),
    );
    assert!(
        streamed.len() == 1 && !streamed[0].ok && streamed[0].received > 0,
        "the stream should have carried data and then failed: {streamed:?}"
    );
    // Fail-closed: a new connect from the app cgroup is refused at once.
    fs::write(&go1, b"").unwrap();
    let fail = wait_connect_fail(&out1);
    assert!(
        fail.error
            .as_deref()
            .is_some_and(|e| e.starts_with("connect:")),
        "with the proxy dead, connects from the app cgroup should be refused: {fail:?}"
    );
    assert!(fail.elapsed_ms < 1000, "refusal took too long: {fail:?}");
    assert!(
        server.peers().len() == 1,
        "nothing reached the destination past the dead proxy: {:?}",
        server.peers()
    );

    // Cleanup restores the host: the app, moved out of the removed cgroup, connects directly.
    sidecar_tests::run::cleanup();
    let files = sidecar_tests::leftover_files(pid);
    assert!(files.is_empty(), "`sidecar cleanup` left: {files:?}");
    fs::write(&go2, b"").unwrap();
    let after = wait_connect_fail(&out2);
    assert_eq!(
        after.error, None,
        "after cleanup the app should reach the destination: {after:?}"
    );
    let peers = server.wait_for_peers(2, Duration::from_secs(5));
    eprintln!(
        "stream ended {stream_end:?} after SIGKILL: {:?}; new connect: {fail:?}; after \
         cleanup: {after:?} (peer {})",
        streamed[0].error, peers[1]
    );
    for p in &app {
        host::kill_if_still(*p, "sidecar-testclient");
    }
    assert_no_leftovers(pid);
}

/// Fail closed means refused: after SIGKILL the connect hooks stay attached and keep
/// steering the app's connects to the proxy port, and an unprivileged user (nobody) who binds
/// that port must receive nothing: the hooks redirect only to a listener carrying the proxy's
/// mark (SO_MARK, which nobody cannot set), so the app's connect fails with EPERM, counted.
#[test]
fn a_killed_sidecar_s_port_bound_by_another_user_receives_nothing() {
    if !privileged() || !sidecar_tests::require("setpriv") {
        return;
    }
    let _serial = serial();
    let server = EchoServer::start_v4();
    let scratch = Scratch::new("scr-kill-bind");
    let (go, out) = (scratch.path("go"), scratch.path("out"));
    let script = format!(
        "{w}; {CLIENT} connect-fail {addr} > {o} 2>&1",
        w = wait_for_file(&go),
        addr = arg("--addr", server.addr()),
        o = out.display(),
    );
    let proxy_port = ports::take();
    let mut run = SidecarRun::builder(proxy_port)
        .arg("--admin-addr=off")
        .command(["sh", "-c", &script])
        .start();
    let pid = run.pid();
    host::wait_until(Duration::from_secs(20), || !run.app_pids().is_empty());
    let app = run.app_pids();
    assert!(!app.is_empty(), "the app runs in the app cgroup");
    run.signal(libc::SIGKILL);
    run.wait_exit(Duration::from_secs(10))
        .expect("a SIGKILLed sidecar exits");

    // nobody takes the proxy's port (an echo server that prints a line per connection).
    let public = host::PublicCopy::of(Path::new(CLIENT));
    let mut impostor = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(public.path())
        .args(["serve", &format!("--addr=127.0.0.1:{proxy_port}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the impostor as nobody");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        impostor.stdout.take().expect("piped stdout"),
    ));
    assert!(
        lines
            .next()
            .is_some_and(|l| l.is_ok_and(|l| l.trim() == "READY")),
        "nobody could not bind the proxy port {proxy_port}"
    );

    fs::write(&go, b"").unwrap();
    let fail = wait_connect_fail(&out);
    let _ = impostor.kill();
    let _ = impostor.wait();
    let accepted: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        fail.error
            .as_deref()
            .is_some_and(|e| e.starts_with("connect: Operation not permitted")),
        "the app's connect should be refused at connect(): {fail:?}"
    );
    assert!(accepted.is_empty(), "the impostor received {accepted:?}");
    assert!(server.peers().is_empty(), "{:?}", server.peers());
    let counters = sidecar_tests::bpf::live_counters(pid).expect("the run counters, from its pins");
    assert_eq!(
        counters.get(sidecar_common::Counter::ConnectProxyNotListening),
        1,
        "{counters:?}"
    );

    sidecar_tests::run::cleanup();
    for p in &app {
        host::kill_if_still(*p, "sh");
    }
    assert_no_leftovers(pid);
}

/// Waits for the `connect-fail` line a script wrote to `file`.
fn wait_connect_fail(file: &Path) -> ConnectFailLine {
    let mut line = None;
    host::wait_until(Duration::from_secs(15), || {
        line = fs::read_to_string(file)
            .ok()
            .and_then(|s| s.lines().find_map(|l| serde_json::from_str(l).ok()));
        line.is_some()
    });
    line.unwrap_or_else(|| {
        panic!(
            "no connect-fail result in {}: {:?}",
            file.display(),
            fs::read_to_string(file)
        )
    })
}

// ---------------------------------------------------------------------------------------
// Security edges

/// A mesh peer can never reach the sidecar itself through an inbound tunnel: a tunnel whose
/// CONNECT names the sidecar's admin (or proxy, or tunnel) port is refused and counted
/// (`own_port`), while the app's port in the same pod works. The admin port binds loopback
/// by default, so it is not reachable from the other pod in plaintext either. Two network
/// namespaces joined by a veth, with no route out.
#[test]
fn tunnels_cannot_reach_the_sidecars_own_ports_and_admin_is_loopback_only() {
    if !privileged() || host::which("nsenter").is_none() && !sidecar_tests::skip("no nsenter") {
        return;
    }
    let _serial = serial();
    const APP_PORT: u16 = 8080;
    const ADMIN_PORT: u16 = 21121;
    let certs = sidecar_tests::scratch::Scratch::new("scr-own-ports");
    certs.ca("ca", "example.org");
    let client_tls = certs.issue("ca", "spiffe://example.org/ns/a/sa/client", "client", &[]);
    let server_tls = certs.issue("ca", "spiffe://example.org/ns/b/sa/server", "server", &[]);
    let pods = sidecar_tests::netns::PodPair::create_in("scr", 205, 1);

    // Pod B: a sidecar with its admin endpoint on the default interface (loopback) and a
    // fixed port, serving an echo app on all addresses.
    let mut server = SidecarRun::builder(ports::take())
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(&server_tls)
        .arg(format!("--admin-addr=127.0.0.1:{ADMIN_PORT}"))
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(Duration::from_secs(20));

    // Pod A, no sidecar: B's admin port is not reachable in plaintext (loopback only).
    let direct = pods.a.run(&[
        CLIENT,
        "connect-fail",
        &arg("--addr", SocketAddr::new(pods.b.addr, ADMIN_PORT)),
    ]);
    let direct: ConnectFailLine = serde_json::from_slice(direct.stdout.trim_ascii())
        .unwrap_or_else(|e| panic!("connect-fail output: {e}: {direct:?}"));
    assert!(
        direct
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("connect:")),
        "B's admin port answered from pod A: {direct:?}"
    );

    // Pod A, meshed: the app port works, the admin port is refused by B's inbound side.
    let script = format!(
        "{CLIENT} connect-fail {}; {CLIENT} connect-fail {}",
        arg("--addr", SocketAddr::new(pods.b.addr, APP_PORT)),
        arg("--addr", SocketAddr::new(pods.b.addr, ADMIN_PORT)),
    );
    let mut client = SidecarRun::builder(ports::take())
        .meshed_client_of(&pods, &client_tls)
        .arg("--admin-addr=off")
        .command(["sh", "-c", &script])
        .start();
    let client = client.finish(Duration::from_secs(60));
    client.assert_exit_code(0);
    let results: Vec<ConnectFailLine> = client.parse_stdout();
    let [app, admin] = results.as_slice() else {
        panic!(
            "expected two connect-fail results: {results:?}\n{}",
            client.stderr_text()
        );
    };
    assert_eq!(app.error, None, "the app port through the tunnel: {app:?}");
    assert!(
        admin.error.is_some(),
        "B's admin port was reached through the tunnel: {admin:?}"
    );
    server.release();
    let server = server.finish(Duration::from_secs(60));
    let refused = server.report().inbound_rejections.get("own_port").copied();
    assert_eq!(
        refused,
        Some(1),
        "B should count one tunnel refused for its own port: {:?}\n{}",
        server.report().inbound_rejections,
        server.stderr_text()
    );
    assert!(
        server
            .report()
            .connections
            .iter()
            .all(|c| c.original_dst.map(|d| d.port()) != Some(ADMIN_PORT) || c.outcome == "refused"),
        "{:#?}",
        server.report().connections
    );
}
