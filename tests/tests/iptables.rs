//! `sidecar run --mode iptables` against the real kernel (root): redirection (the echo server
//! sees the proxy as its peer), port and CIDR exclusions, no proxy loop, and cleanup that
//! leaves `iptables-save`/`ip6tables-save` as they were, on exit and after SIGKILL +
//! `sidecar cleanup`.
//!
//! Traffic stays on 127.0.0.0/8 and ::1; proxy ports come from `sidecar_tests::ports`. The
//! tests share the nat table (and compare whole `iptables-save` dumps), so they run one at a
//! time under a lock.
//!
//! Its helpers are local to this file (the iptables dumps and their comparison); moving them
//! to the shared harness in `tests/src/` is open work.

use sidecar_tests::ports;
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Takes the privileged tests' lock ([`sidecar_tests::serial`]: one test at a time on the
/// host, as they all touch the nat table and compare whole dumps of it), or returns None
/// (skip) when the test cannot run here. With `CI` set it panics instead: privileged tests
/// must not silently skip in CI.
fn setup() -> Option<sidecar_tests::Serial> {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("needs root")
    } else if !in_path("iptables") {
        Some("needs the iptables package (apt-get install iptables)")
    } else if !sidecar().is_file() {
        Some("needs target/<profile>/sidecar: run `cargo build` first (cargo xtask test does)")
    } else {
        None
    };
    if let Some(why) = why {
        if std::env::var_os("CI").is_some() {
            panic!("iptables test cannot run: {why}");
        }
        eprintln!("skipped: iptables test {why}");
        return None;
    }
    Some(sidecar_tests::serial())
}

fn in_path(bin: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(bin).is_file())
}

/// `target/<profile>/`, from this test binary's own path (`target/<profile>/deps/…`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .into()
}

fn sidecar() -> PathBuf {
    target_dir().join("sidecar")
}

fn testclient() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sidecar-testclient"))
}

/// An echo server on a loopback address that records the peer address of every connection.
struct EchoServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    fn start(ip: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("binding the echo server");
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        // The thread lives as long as the test process; each connection is bounded by
        // read timeouts.
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if let Ok(p) = conn.peer_addr() {
                    seen.lock().unwrap().push(p);
                }
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr, peers }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// `iptables-save` and `ip6tables-save` without what changes by itself (comment lines with
/// dates, packet counters).
fn nat_snapshot() -> String {
    let mut out = String::new();
    for bin in ["iptables-save", "ip6tables-save"] {
        let o = Command::new(bin).output().expect("running iptables-save");
        assert!(o.status.success(), "{bin} failed");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = match (line.starts_with(':'), line.rfind(" [")) {
                (true, Some(i)) => format!("{} [counters]", &line[..i]),
                _ => line.to_string(),
            };
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// iptables-nft creates the nat table (with its empty built-in chains) on first use, and it
/// stays; make sure it exists before taking a "before" snapshot, so the comparison is about
/// our rules only.
fn nat_table_in_use() {
    for bin in ["iptables", "ip6tables"] {
        let ok = Command::new(bin)
            .args(["-w", "5", "-t", "nat", "-S", "OUTPUT"])
            .stdout(Stdio::null())
            .status()
            .expect("running iptables")
            .success();
        assert!(ok, "{bin} -t nat -S OUTPUT failed");
    }
}

struct Run {
    output: Output,
    report: serde_json::Value,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn connections(&self) -> Vec<serde_json::Value> {
        self.report["connections"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `local=` addresses the client printed.
    fn client_locals(&self) -> Vec<SocketAddr> {
        self.stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("local="))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

/// `sidecar run --mode iptables --proxy-port PORT EXTRA -- sidecar-testclient exchange
/// TARGETS`, bounded.
fn run_client(port: u16, extra: &[&str], targets: &[SocketAddr]) -> Run {
    run_client_mode("iptables", &[], port, extra, targets)
}

/// [`run_client`] with another `--mode` and extra environment.
fn run_client_mode(
    mode: &str,
    env: &[(&str, &str)],
    port: u16,
    extra: &[&str],
    targets: &[SocketAddr],
) -> Run {
    let report = std::env::temp_dir().join(format!("sci-ipt-report-{port}.json"));
    let _ = std::fs::remove_file(&report);
    let mut cmd = Command::new(sidecar());
    // Both modes proxy every connection (the baseline has no pass-through).
    cmd.args([
        "run",
        "--proxy-all",
        "--mode",
        mode,
        "--proxy-port",
        &port.to_string(),
    ])
    .envs(env.iter().copied())
    .args(extra)
    .arg("--report")
    .arg(&report)
    .arg("--")
    .arg(testclient())
    .arg("exchange")
    .args(targets.iter().map(|t| t.to_string()));
    let output = output_within(&mut cmd, Duration::from_secs(30));
    let report = std::fs::read(&report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    Run { output, report }
}

/// Runs a command to completion, killing it if it takes longer than `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("waiting").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting output")
}

fn assert_success(run: &Run) {
    assert!(
        run.output.status.success(),
        "sidecar run failed ({}):\nstdout: {}\nstderr: {}",
        run.output.status,
        run.stdout(),
        String::from_utf8_lossy(&run.output.stderr)
    );
}

fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn redirects_to_the_proxy_and_the_server_sees_the_proxy() {
    let Some(_lock) = setup() else { return };
    let mut servers = vec![EchoServer::start("127.0.0.1")];
    if ipv6_loopback() {
        servers.push(EchoServer::start("::1"));
    }
    let targets: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let run = run_client(ports::take(), &[], &targets);
    assert_success(&run);

    let conns = run.connections();
    assert_eq!(conns.len(), targets.len(), "report: {}", run.report);
    let client_locals = run.client_locals();
    for (server, conn) in servers.iter().zip(&conns) {
        assert_eq!(conn["outcome"], "ok", "{conn}");
        assert_eq!(conn["original_dst"], server.addr.to_string(), "{conn}");
        assert_eq!(
            conn["app_leg_spliced"], false,
            "no fast path in iptables mode"
        );
        // The server's peer is the proxy's upstream socket, not the app's.
        let upstream: SocketAddr = conn["upstream_local"].as_str().unwrap().parse().unwrap();
        assert_eq!(server.peers(), vec![upstream]);
        assert!(
            !client_locals.contains(&upstream),
            "the app reached the server directly"
        );
    }
}

#[test]
fn excluded_port_bypasses_the_proxy() {
    let Some(_lock) = setup() else { return };
    let excluded = EchoServer::start("127.0.0.1");
    let intercepted = EchoServer::start("127.0.0.1");
    let port = excluded.addr.port().to_string();
    let run = run_client(
        ports::take(),
        &["--exclude-ports", &port],
        &[excluded.addr, intercepted.addr],
    );
    assert_success(&run);
    let locals = run.client_locals();
    // Excluded: the server sees the app itself. The other still goes through the proxy.
    assert_eq!(excluded.peers(), vec![locals[0]]);
    let conns = run.connections();
    assert_eq!(conns.len(), 1, "report: {}", run.report);
    assert_eq!(conns[0]["original_dst"], intercepted.addr.to_string());
    assert_ne!(intercepted.peers(), vec![locals[1]]);
}

#[test]
fn excluded_cidr_bypasses_the_proxy() {
    let Some(_lock) = setup() else { return };
    let excluded = EchoServer::start("127.0.0.2");
    let intercepted = EchoServer::start("127.0.0.1");
    let run = run_client(
        ports::take(),
        &["--exclude-cidrs", "127.0.0.2/32,fd00::/8"],
        &[excluded.addr, intercepted.addr],
    );
    assert_success(&run);
    let locals = run.client_locals();
    assert_eq!(excluded.peers(), vec![locals[0]]);
    let conns = run.connections();
    assert_eq!(conns.len(), 1, "report: {}", run.report);
    assert_eq!(conns[0]["original_dst"], intercepted.addr.to_string());
}

/// The app connecting to the proxy port itself is not redirected (RETURN), and the proxy
/// must not forward it to itself: conntrack reports the listener as the "original"
/// destination, which is refused, once.
#[test]
fn no_loop_when_the_app_connects_to_the_proxy_port() {
    let Some(_lock) = setup() else { return };
    let port = 16104u16;
    let started = Instant::now();
    let run = run_client(port, &[], &[SocketAddr::from(([127, 0, 0, 1], port))]);
    assert!(!run.output.status.success(), "the echo cannot succeed");
    assert!(started.elapsed() < Duration::from_secs(10));
    let conns = run.connections();
    assert_eq!(
        conns.len(),
        1,
        "exactly one connection, no loop: {}",
        run.report
    );
    assert_eq!(
        conns[0]["outcome"], "no_original_destination",
        "{}",
        conns[0]
    );
}

#[test]
fn exit_leaves_iptables_save_as_it_was() {
    let Some(_lock) = setup() else { return };
    nat_table_in_use();
    let before = nat_snapshot();
    let proxy_port = ports::take().to_string();
    // During the run the chain and the jump are there (the app lists them itself)...
    let out = output_within(
        Command::new(sidecar()).args([
            "run",
            "--mode",
            "iptables",
            "--proxy-port",
            &proxy_port,
            "--exclude-ports",
            "9",
            "--",
            "iptables-save",
            "-t",
            "nat",
        ]),
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    let during = String::from_utf8_lossy(&out.stdout);
    let chain = during
        .lines()
        .find_map(|l| l.strip_prefix(":SIDECAR-"))
        .and_then(|l| l.split_whitespace().next())
        .map(|pid| format!("SIDECAR-{pid}"))
        .expect("a SIDECAR-<pid> chain during the run");
    for rule in [
        format!("-j {chain}"),
        format!("-A {chain} -o lo -p tcp -m tcp --dport {proxy_port} -j RETURN"),
        format!("-A {chain} -p tcp -m tcp --dport 9 -j RETURN"),
        format!("-A {chain} -p tcp -j REDIRECT --to-ports {proxy_port}"),
    ] {
        assert!(during.contains(&rule), "missing {rule:?} in:\n{during}");
    }
    // ...and afterwards everything is exactly as before.
    assert_eq!(nat_snapshot(), before);
}

#[test]
fn sigkill_then_cleanup_leaves_iptables_save_as_it_was() {
    let Some(_lock) = setup() else { return };
    nat_table_in_use();
    let before = nat_snapshot();
    let server = EchoServer::start("127.0.0.1");
    let proxy_port = ports::take().to_string();
    let mut sidecar_run = Command::new(sidecar())
        .args([
            "run",
            "--mode",
            "iptables",
            "--proxy-port",
            &proxy_port,
            "--",
        ])
        .args(["sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning sidecar run");
    let pid = sidecar_run.id();
    let chain = format!("SIDECAR-{pid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nat_snapshot().contains(&format!("-j {chain}")) {
        assert!(Instant::now() < deadline, "the run never installed {chain}");
        thread::sleep(Duration::from_millis(50));
    }
    let app_cgroup_procs = cgroup_root().join(format!("sidecar/run-{pid}/app/cgroup.procs"));
    let sleeper: Option<i32> = std::fs::read_to_string(&app_cgroup_procs)
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse().ok());

    sidecar_run.kill().unwrap();
    sidecar_run.wait().unwrap();
    // The rules outlive the process (so the workload cannot bypass the mesh) but catch only
    // the run's cgroup: this test process still reaches the server directly.
    assert!(nat_snapshot().contains(&format!("-j {chain}")));
    let mut direct = TcpStream::connect_timeout(&server.addr, Duration::from_secs(5)).unwrap();
    let local = direct.local_addr().unwrap();
    direct.write_all(b"x").unwrap();
    drop(direct);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.peers().contains(&local) {
        assert!(Instant::now() < deadline, "the server never saw {local}");
        thread::sleep(Duration::from_millis(10));
    }

    let out = output_within(
        Command::new(sidecar()).arg("cleanup"),
        Duration::from_secs(30),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    if let Some(p) = sleeper {
        // SAFETY: kill(2); the sleeper is our run's command, moved out by cleanup.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    assert!(
        said.contains(&format!("removed iptables chain {chain}")),
        "cleanup said: {said}"
    );
    assert_eq!(nat_snapshot(), before);
    assert!(!cgroup_root().join(format!("sidecar/run-{pid}")).exists());
}

/// A leftover chain of a dead run is flushed and replaced when the pid comes round again;
/// simulated here by creating `SIDECAR-<pid>` for the pid `sidecar run` will get, which we
/// cannot know in advance, so instead: a chain with stale rules and a stale jump is created
/// for a dead pid, and `sidecar cleanup` removes exactly it.
#[test]
fn cleanup_removes_an_orphan_chain_without_state_file() {
    let Some(_lock) = setup() else { return };
    nat_table_in_use();
    let before = nat_snapshot();
    // A pid that is not alive: a finished child's.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let chain = format!("SIDECAR-{dead}");
    let cg = cgroup_root().join(format!("sci-orphan-{dead}"));
    std::fs::create_dir(&cg).unwrap();
    let nat = |args: &[&str]| {
        let ok = Command::new("iptables")
            .args(["-w", "5", "-t", "nat"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "iptables {args:?}");
    };
    let rel = format!("sci-orphan-{dead}");
    nat(&["-N", &chain]);
    nat(&[
        "-A",
        &chain,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        "16107",
    ]);
    nat(&[
        "-I", "OUTPUT", "1", "-p", "tcp", "-m", "cgroup", "--path", &rel, "-j", &chain,
    ]);
    let out = output_within(
        Command::new(sidecar()).arg("cleanup"),
        Duration::from_secs(30),
    );
    let _ = std::fs::remove_dir(&cg);
    let after = nat_snapshot();
    if after != before {
        // Do not leave it behind for the next test.
        let _ = Command::new("iptables")
            .args([
                "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-m", "cgroup", "--path", &rel,
            ])
            .args(["-j", &chain])
            .status();
        let _ = Command::new("iptables")
            .args(["-t", "nat", "-F", &chain])
            .status();
        let _ = Command::new("iptables")
            .args(["-t", "nat", "-X", &chain])
            .status();
    }
    assert_eq!(
        after,
        before,
        "cleanup said: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `--mode auto` where the eBPF probe fails: one warning line says why and names iptables
/// mode, and the run intercepts with iptables. Every kernel of the VM matrix has the eBPF
/// hooks, so the failure is forced with the test-only `SIDECAR_TEST_FAIL_EBPF_PROBE`; the
/// probe, the decision, the warning and the iptables run are the real ones.
#[test]
fn auto_mode_falls_back_to_iptables_when_the_ebpf_probe_fails() {
    let Some(_lock) = setup() else { return };
    let before = nat_snapshot();
    let server = EchoServer::start("127.0.0.1");
    let run = run_client_mode(
        "auto",
        &[("SIDECAR_TEST_FAIL_EBPF_PROBE", "1")],
        ports::take(),
        &[],
        &[server.addr],
    );
    assert_success(&run);
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("--mode auto"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning line: {stderr}");
    assert!(
        warnings[0].contains("eBPF programs")
            && warnings[0].contains("SIDECAR_TEST_FAIL_EBPF_PROBE")
            && warnings[0].contains("using iptables mode"),
        "{}",
        warnings[0]
    );
    assert_eq!(run.report["mode"], "iptables", "report: {}", run.report);
    let conns = run.connections();
    assert_eq!(conns.len(), 1, "report: {}", run.report);
    assert_eq!(conns[0]["outcome"], "ok", "{}", conns[0]);
    assert_eq!(conns[0]["original_dst"], server.addr.to_string());
    let upstream: SocketAddr = conns[0]["upstream_local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(server.peers(), vec![upstream], "the server sees the proxy");
    // Whether the (empty) nat tables exist afterwards depends on what ran before (iptables-nft
    // creates them on first use), so the check is on our chains.
    let ours = |dump: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.contains("SIDECAR-"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        ours(&nat_snapshot()),
        ours(&before),
        "the run's iptables rules are gone"
    );
}

/// `--mode auto` where the probe passes: eBPF mode, and no warning.
#[test]
fn auto_mode_uses_ebpf_when_the_probe_passes() {
    let Some(_lock) = setup() else { return };
    let server = EchoServer::start("127.0.0.1");
    let run = run_client_mode("auto", &[], ports::take(), &[], &[server.addr]);
    assert_success(&run);
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    assert!(!stderr.contains("--mode auto"), "no fallback: {stderr}");
    assert_eq!(run.report["mode"], "ebpf", "report: {}", run.report);
    let conns = run.connections();
    assert_eq!(conns.len(), 1, "report: {}", run.report);
    assert_eq!(conns[0]["outcome"], "ok", "{}", conns[0]);
    assert_eq!(conns[0]["original_dst"], server.addr.to_string());
}

/// `sidecar probe` with the eBPF check failing names iptables mode as the fallback.
#[test]
fn probe_names_iptables_mode_when_ebpf_fails() {
    let Some(_lock) = setup() else { return };
    let out = output_within(
        Command::new(sidecar())
            .arg("probe")
            .env("SIDECAR_TEST_FAIL_EBPF_PROBE", "1"),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL eBPF programs")
            && stdout.contains("--mode iptables")
            && stdout.contains("--mode auto"),
        "{stdout}"
    );
}

#[test]
fn bad_mode_is_one_clear_error() {
    let Some(_lock) = setup() else { return };
    let out = output_within(
        Command::new(sidecar()).args(["run", "--mode", "nftables", "--", "true"]),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nftables") && err.contains("iptables"),
        "{err}"
    );

    let out = output_within(
        Command::new(sidecar()).args(["run", "--mode", "iptables", "--sockmap", "--", "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: --sockmap") && err.lines().count() == 1,
        "{err}"
    );
}

/// The cgroup v2 mount, from /proc/mounts.
fn cgroup_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let fields: BTreeMap<&str, &str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _dev = f.next()?;
            let dir = f.next()?;
            let fstype = f.next()?;
            Some((fstype, dir))
        })
        .filter(|(t, _)| *t == "cgroup2")
        .collect();
    PathBuf::from(fields.get("cgroup2").expect("a cgroup2 mount"))
}
