//! Kubernetes mode on a simulated node: `sidecar agent` and unprivileged `sidecar proxy`
//! processes against the real kernel, without Kubernetes.
//!
//! The node is laid out like kubelet's cgroupfs driver, under a test-owned cgroup:
//!
//! ```text
//! <cgroup2>/sck8s-<testpid>/kubepods/burstable/pod<uid>/{proxy,app}   (--cgroup-root = …/kubepods)
//! netns sck8s-a (10.253.0.1/30) ── veth ── netns sck8s-b (10.253.0.2/30), no route out
//! /sys/fs/bpf/sck8s-<testpid>/                                       (--pin-dir)
//! ```
//!
//! Processes enter a pod's container cgroup (their pid written to `cgroup.procs` before
//! exec) and its network namespace (`nsenter --net`); the proxies then drop to `nobody` with
//! no capabilities at all (`setpriv`), so everything they do is what an unprivileged sidecar
//! container can do. Every cgroup, netns, pin and process is removed on drop, also when a
//! test fails. Ports: 22100–22199.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::Write,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use serde_json::Value;
use sidecar_common::{WorkloadConfig, role};
use sidecar_tests::{
    host::{self, output_with_timeout, wait_child, wait_until},
    protocol::{ConnectFailLine, EchoLine, parse_lines},
    scratch::Scratch,
    serial, sidecar_bin, skip,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const TD: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
const NS_A: &str = "sck8s-a";
const NS_B: &str = "sck8s-b";
const ADDR_A: &str = "10.253.0.1";
const ADDR_B: &str = "10.253.0.2";
const PROXY_PORT: u16 = 22101;
const ADMIN_PORT: u16 = 22102;
const TUNNEL_PORT: u16 = 22108;
const APP_PORT: u16 = 22120;
/// A service of pod B bound to 127.0.0.1 only (never reachable through a tunnel).
const LOCAL_ONLY_PORT: u16 = 22123;
const STEP: Duration = Duration::from_secs(15);
/// Until a starting agent answers on its socket. An agent that finds pins it cannot tie to
/// its state (a lost state directory) upgrades them in place, verifying every program again:
/// 13 s of that in a one-vCPU TCG guest of the kernel matrix (6.18), on top of the start.
const AGENT_START: Duration = Duration::from_secs(60);

fn ready() -> bool {
    if !sidecar_tests::privileged() {
        return false;
    }
    for tool in ["nsenter", "setpriv", "curl", "ip"] {
        if host::which(tool).is_none() {
            return skip(&format!("{tool} is not installed (.ci/run installs it)"));
        }
    }
    true
}

/// The start of a test: the tools ([`ready`]), this suite's lock, then a fresh node called
/// `name` (dropped before the lock is released). `None`: the test is skipped.
fn setup(name: &str) -> Option<(sidecar_tests::Serial, Node)> {
    if !ready() {
        return None;
    }
    let serial = serial();
    Some((serial, Node::new(name)))
}

// ---------------------------------------------------------------------------------------
// Processes

/// A process in a pod (or the agent), its output in files; killed on drop.
struct Proc {
    name: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: i32) {
        host::signal(self.pid(), sig);
    }

    /// Closes stdin (ends `serve` and `hold`).
    fn release(&mut self) {
        drop(self.child.stdin.take());
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match wait_child(&mut self.child, timeout) {
            Some(s) => s,
            None => panic!(
                "{} did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.name,
                self.stdout(),
                self.stderr()
            ),
        }
    }

    /// Waits for a clean exit and returns stdout.
    fn success(&mut self, timeout: Duration) -> String {
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "{} failed ({status})\nstdout:\n{}\nstderr:\n{}",
            self.name,
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }

    fn wait_for_stdout(&self, needle: &str, timeout: Duration) {
        assert!(
            wait_until(timeout, || self.stdout().contains(needle)),
            "{} never printed {needle:?}\nstdout:\n{}\nstderr:\n{}",
            self.name,
            self.stdout(),
            self.stderr()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `argv` with its pid in `cgroup` (if any) before exec, inside netns `ns` (if any).
fn spawn(
    scratch: &Scratch,
    name: &str,
    cgroup: Option<&Path>,
    ns: Option<&str>,
    argv: &[String],
    env: &[(&str, &str)],
) -> Proc {
    let mut full: Vec<String> = Vec::new();
    if let Some(ns) = ns {
        full.extend(["nsenter".into(), format!("--net=/run/netns/{ns}")]);
    }
    full.extend(argv.iter().cloned());
    let out = scratch.path(&format!("{name}.out"));
    let err = scratch.path(&format!("{name}.err"));
    let mut cmd = Command::new(&full[0]);
    cmd.args(&full[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&out).expect("stdout file"))
        .stderr(fs::File::create(&err).expect("stderr file"));
    if let Some(cg) = cgroup {
        let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        // SAFETY: only async-signal-safe calls on memory prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                if n == 1 { Ok(()) } else { Err(e) }
            });
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {full:?}: {e}"));
    Proc {
        name: name.into(),
        child,
        out,
        err,
    }
}

/// The JSON lines (`sidecar_tests::protocol`) of a finished app's stdout.
fn stdout_lines<T: serde::de::DeserializeOwned>(out: &str) -> Vec<T> {
    parse_lines(&out.lines().map(String::from).collect::<Vec<_>>())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// The simulated node

struct Pod {
    uid: String,
    ns: &'static str,
    addr: &'static str,
    cgroup: PathBuf,
}

impl Pod {
    fn container(&self, name: &str) -> PathBuf {
        let p = self.cgroup.join(name);
        fs::create_dir_all(&p).expect("container cgroup");
        p
    }
}

/// Two network namespaces joined by a veth pair, deleted on drop.
struct Net;

impl Net {
    fn create() -> Self {
        for ns in [NS_A, NS_B] {
            if Path::new(&format!("/run/netns/{ns}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        let net = Net;
        let ip = |args: &[&str]| {
            let out = output_with_timeout(Command::new("ip").args(args), STEP);
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", NS_A]);
        ip(&["netns", "add", NS_B]);
        ip(&[
            "-n", NS_A, "link", "add", "sck8sA", "type", "veth", "peer", "name", "sck8sB", "netns",
            NS_B,
        ]);
        for (ns, dev, addr) in [(NS_A, "sck8sA", ADDR_A), (NS_B, "sck8sB", ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [NS_A, NS_B] {
            if Path::new(&format!("/run/netns/{ns}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
}

struct Node {
    scratch: Scratch,
    /// `<cgroup2>/sck8s-<pid>`: everything of this node's cgroups.
    base: PathBuf,
    /// The pods' root (`--cgroup-root`).
    root: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    _net: Net,
}

impl Node {
    fn new(name: &str) -> Self {
        let cg2 = sidecar_tests::cgroup2_root().expect("cgroup2");
        let base = cg2.join(format!("sck8s-{}", std::process::id()));
        let scratch = Scratch::new(&format!("k8s-{name}"));
        // Sidecars run as nobody: they must reach the socket, certificates and log files.
        fs::set_permissions(&scratch.dir, fs::Permissions::from_mode(0o755)).unwrap();
        let node = Node {
            socket: scratch.path("run/agent.sock"),
            state_dir: scratch.path("state"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/sck8s-{}", std::process::id())),
            root: base.join("kubepods"),
            base,
            scratch,
            _net: Net::create(),
        };
        node.teardown_kernel_state();
        fs::create_dir_all(node.root.join("burstable")).expect("kubepods cgroups");
        node
    }

    fn pod(&self, tag: &str, ns: &'static str, addr: &'static str) -> Pod {
        let uid = format!("{tag}0c0ffee-5ca1-4e00-8000-{:012x}", std::process::id());
        let cgroup = self.root.join(format!("burstable/pod{uid}"));
        fs::create_dir_all(&cgroup).expect("pod cgroup");
        Pod {
            uid,
            ns,
            addr,
            cgroup,
        }
    }

    fn agent_args(&self) -> Vec<String> {
        vec![
            "--cgroup-root".into(),
            self.root.display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
        ]
    }

    /// Starts the agent and waits until its socket answers.
    fn start_agent(&self, name: &str) -> Proc {
        self.start_agent_in(name, None, &[], &[])
    }

    /// The agent in `cgroup`, behind `wrapper` (e.g. `unshare --cgroup`), with `extra`
    /// arguments after [`Node::agent_args`].
    fn start_agent_in(
        &self,
        name: &str,
        cgroup: Option<&Path>,
        wrapper: &[&str],
        extra: &[String],
    ) -> Proc {
        let mut argv = strings(wrapper);
        argv.extend([sidecar_bin().display().to_string(), "agent".into()]);
        argv.extend(self.agent_args());
        argv.extend(extra.iter().cloned());
        let agent = spawn(
            &self.scratch,
            name,
            cgroup,
            None,
            &argv,
            &[("SIDECAR_LOG", "info")],
        );
        assert!(
            wait_until(AGENT_START, || self.try_status().is_some()),
            "the agent never answered on {}\n{}",
            self.socket.display(),
            agent.stderr()
        );
        agent
    }

    fn try_status(&self) -> Option<Value> {
        let out = output_with_timeout(
            Command::new(sidecar_bin())
                .args(["agent", "--status", "--json", "--socket"])
                .arg(&self.socket),
            STEP,
        );
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn status(&self) -> Value {
        self.try_status().expect("agent status")
    }

    fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("counter {name}"))
    }

    /// The pinned `WORKLOADS` map: cgroup id → configuration.
    fn workloads(&self) -> BTreeMap<u64, WorkloadConfig> {
        let data = MapData::from_pin(self.pin_dir.join("WORKLOADS")).expect("pinned WORKLOADS");
        let map: BpfHashMap<MapData, u64, WorkloadConfig> = aya::maps::Map::HashMap(data)
            .try_into()
            .expect("WORKLOADS is a hash map");
        map.iter().map(|r| r.expect("WORKLOADS entry")).collect()
    }

    /// `DIRECT_CAPS`: pods' caps on pass-through connections per destination, by scope.
    fn direct_caps(&self) -> BTreeMap<u32, u32> {
        let data = MapData::from_pin(self.pin_dir.join("DIRECT_CAPS")).expect("pinned DIRECT_CAPS");
        let map: BpfHashMap<MapData, u32, u32> = aya::maps::Map::HashMap(data)
            .try_into()
            .expect("DIRECT_CAPS is a hash map");
        map.iter().map(|r| r.expect("DIRECT_CAPS entry")).collect()
    }

    /// mTLS credentials for `id`, readable by the unprivileged sidecar.
    fn certs(&self, id: &str, dir: &str) -> String {
        if !self.scratch.path("ca/ca.pem").exists() {
            self.scratch.ca("ca", TD);
        }
        let out = self.scratch.issue("ca", id, dir, &[]);
        for f in fs::read_dir(&out).unwrap().flatten() {
            fs::set_permissions(f.path(), fs::Permissions::from_mode(0o644)).unwrap();
        }
        out
    }

    /// An access log file the unprivileged sidecar may append to.
    fn log_file(&self, name: &str) -> PathBuf {
        let path = self.scratch.path(name);
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        path
    }

    /// The sidecar binary as `nobody` can execute it: in place if every directory above it
    /// lets others through (a checkout under `/root` does not), else a copy in the scratch
    /// directory.
    fn unprivileged_bin(&self) -> PathBuf {
        let bin = sidecar_bin();
        let reachable = bin.ancestors().all(|p| {
            p.as_os_str().is_empty()
                || fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
        });
        if reachable {
            return bin;
        }
        let copy = self.scratch.path("bin/sidecar");
        if !copy.exists() {
            fs::create_dir_all(copy.parent().unwrap()).unwrap();
            fs::copy(&bin, &copy).expect("copying the sidecar binary for nobody");
            fs::set_permissions(copy.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }

    /// `sidecar proxy` in the pod's `proxy` container, as nobody with no capabilities.
    fn start_proxy(&self, pod: &Pod, name: &str, sa: &str, extra: &[String]) -> Proc {
        self.start_proxy_in(pod, "proxy", name, sa, extra)
    }

    /// [`Node::start_proxy`] in container cgroup `container` of the pod (a restarted
    /// container gets a new cgroup, as with a real runtime). With `--proxy-all`: these tests
    /// are about the proxied path; kernel pass-through has its own
    /// ([`Node::start_proxy_passthrough`]).
    fn start_proxy_in(
        &self,
        pod: &Pod,
        container: &str,
        name: &str,
        sa: &str,
        extra: &[String],
    ) -> Proc {
        let mut extra = extra.to_vec();
        extra.push("--proxy-all".into());
        self.spawn_proxy(pod, container, name, sa, &extra)
    }

    /// `sidecar proxy` with kernel pass-through left on (the default).
    fn start_proxy_passthrough(&self, pod: &Pod, name: &str, extra: &[String]) -> Proc {
        self.spawn_proxy(pod, "proxy", name, "default", extra)
    }

    fn spawn_proxy(
        &self,
        pod: &Pod,
        container: &str,
        name: &str,
        sa: &str,
        extra: &[String],
    ) -> Proc {
        let mut argv = strings(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]);
        argv.push(self.unprivileged_bin().display().to_string());
        argv.extend(strings(&["proxy", "--agent-socket"]));
        argv.push(self.socket.display().to_string());
        argv.extend([
            format!("--proxy-port={PROXY_PORT}"),
            format!("--admin-addr=127.0.0.1:{ADMIN_PORT}"),
            format!("--inbound-port={TUNNEL_PORT}"),
        ]);
        argv.extend(extra.iter().cloned());
        spawn(
            &self.scratch,
            name,
            Some(&pod.container(container)),
            Some(pod.ns),
            &argv,
            &[
                ("SIDECAR_LOG", "info"),
                ("POD_UID", &pod.uid),
                ("POD_NAMESPACE", "demo"),
                ("POD_SERVICE_ACCOUNT", sa),
            ],
        )
    }

    /// `sidecar proxy` (as root, no admin endpoint) started in `cgroup`, inside netns `ns`
    /// if given, claiming to be pod `uid`'s sidecar: a registration the agent must judge
    /// by where the caller really is.
    fn claim(
        &self,
        name: &str,
        cgroup: &Path,
        ns: Option<&str>,
        proxy_port: u16,
        uid: &str,
    ) -> Proc {
        spawn(
            &self.scratch,
            name,
            Some(cgroup),
            ns,
            &[
                sidecar_bin().display().to_string(),
                "proxy".into(),
                format!("--agent-socket={}", self.socket.display()),
                format!("--proxy-port={proxy_port}"),
                "--admin-addr=off".into(),
                "--proxy-all".into(),
            ],
            &[("POD_UID", uid)],
        )
    }

    /// `/readyz` of the sidecar in `pod` (HTTP status, 0 if nothing answers).
    fn readyz(&self, pod: &Pod) -> u16 {
        self.admin(pod, "/readyz").0
    }

    fn admin(&self, pod: &Pod, path: &str) -> (u16, String) {
        let out = output_with_timeout(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", pod.ns))
                .args([
                    "curl",
                    "-s",
                    "-m",
                    "2",
                    "-w",
                    "\n%{http_code}",
                    &format!("http://127.0.0.1:{ADMIN_PORT}{path}"),
                ]),
            STEP,
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn wait_ready(&self, pod: &Pod, proxy: &Proc) {
        assert!(
            wait_until(STEP, || self.readyz(pod) == 200),
            "{} never became ready\n{}",
            proxy.name,
            proxy.stderr()
        );
    }

    /// The test client in the pod's `app` container.
    fn app(&self, pod: &Pod, name: &str, args: &[String]) -> Proc {
        let mut argv = vec![CLIENT.to_string()];
        argv.extend(args.iter().cloned());
        spawn(
            &self.scratch,
            name,
            Some(&pod.container("app")),
            Some(pod.ns),
            &argv,
            &[],
        )
    }

    /// Pod B's echo server on APP_PORT; returns once it listens.
    fn server(&self, pod: &Pod) -> Proc {
        let server = self.app(
            pod,
            "server",
            &["serve".into(), format!("--addr=0.0.0.0:{APP_PORT}")],
        );
        server.wait_for_stdout("READY", STEP);
        server
    }

    /// Kills every process in this node's cgroups and waits until they are empty.
    fn kill_all(&self, cgroup: &Path) {
        let mut dirs = Vec::new();
        collect_dirs(cgroup, &mut dirs);
        wait_until(Duration::from_secs(5), || {
            let mut any = false;
            for d in &dirs {
                for pid in host::cgroup_procs(d) {
                    any = true;
                    host::signal(pid, libc::SIGKILL);
                }
            }
            !any
        });
    }

    /// Removes whatever an earlier (crashed) run of this test process id left, and what this
    /// one created: processes, pins, cgroups.
    fn teardown_kernel_state(&self) {
        if self.base.exists() {
            self.kill_all(&self.base);
        }
        if let Ok(entries) = fs::read_dir(&self.pin_dir) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
            let _ = fs::remove_dir(&self.pin_dir);
        }
        let mut dirs = Vec::new();
        collect_dirs(&self.base, &mut dirs);
        for d in dirs.iter().rev() {
            let _ = sidecar_tests_rmdir(d);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown_kernel_state();
    }
}

/// Directories of a cgroup tree, parents before children.
fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    if !path.is_dir() {
        return;
    }
    out.push(path.into());
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// rmdir with a short retry (a cgroup stays busy for a moment after its last process).
fn sidecar_tests_rmdir(path: &Path) -> bool {
    wait_until(Duration::from_secs(2), || {
        fs::remove_dir(path).is_ok() || !path.exists()
    })
}

fn access_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn pod_status<'a>(status: &'a Value, uid: &str) -> Option<&'a Value> {
    status["pods"]
        .as_array()?
        .iter()
        .find(|p| p["pod_uid"] == uid)
}

/// Two pods with mTLS sidecars: A (client, meshing B) and B (server). Returns them running
/// and ready.
struct TwoPods {
    a: Pod,
    b: Pod,
    log_a: PathBuf,
    log_b: PathBuf,
}

fn two_pods(node: &Node) -> (TwoPods, Proc, Proc) {
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let tls_a = node.certs(CLIENT_ID, "tls-a");
    let tls_b = node.certs(SERVER_ID, "tls-b");
    let (log_a, log_b) = (node.log_file("access-a.log"), node.log_file("access-b.log"));
    let proxy_b = node.start_proxy(
        &b,
        "proxy-b",
        "server",
        &[
            format!("--tls-dir={tls_b}"),
            format!("--access-log={}", log_b.display()),
        ],
    );
    let proxy_a = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[
            format!("--tls-dir={tls_a}"),
            "--no-inbound".into(),
            format!("--mesh-cidrs={}/32", b.addr),
            format!("--access-log={}", log_a.display()),
        ],
    );
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    (TwoPods { a, b, log_a, log_b }, proxy_a, proxy_b)
}

/// Whether both pods' proxies have registered at least twice (again, with a new agent).
fn both_registered_again(node: &Node, pods: &TwoPods) -> bool {
    let s = node.status();
    [&pods.a, &pods.b]
        .iter()
        .all(|p| pod_status(&s, &p.uid).is_some_and(|r| r["registrations"].as_u64() >= Some(2)))
}

/// A `pingpong` stream of `secs` seconds from `pod` to the server in pod B.
fn pingpong_stream(node: &Node, pod: &Pod, secs: u64) -> Proc {
    node.app(
        pod,
        "stream",
        &strings(&[
            "pingpong",
            &format!("--addr={ADDR_B}:{APP_PORT}"),
            "--size=4096",
            "--count=1",
            &format!("--seconds={secs}"),
        ]),
    )
}

/// Whether every connection in access log `path` was mTLS and closed `ok`.
fn all_mtls_ok(path: &Path) -> bool {
    access_lines(path)
        .iter()
        .all(|l| l["mode"] == "mtls" && l["close_reason"] == "ok")
}

fn echo_args(size: usize, count: usize) -> Vec<String> {
    vec![
        "echo".into(),
        format!("--addr={ADDR_B}:{APP_PORT}"),
        format!("--size={size}"),
        format!("--count={count}"),
    ]
}

// ---------------------------------------------------------------------------------------
// Tests

/// (a) Two pods register; an app in A reaches a server in B, intercepted and mTLS'd, with
/// the original destination served to the unprivileged proxy by the getsockopt program.
#[test]
fn two_pods_register_and_talk_over_mtls_through_unprivileged_proxies() {
    let Some((_serial, node)) = setup("mtls") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let (pods, proxy_a, proxy_b) = two_pods(&node);
    let mut server = node.server(&pods.b);

    // The proxies really run unprivileged: uid nobody, no capability at all.
    for p in [&proxy_a, &proxy_b] {
        let status = fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.contains("65534")),
            "{status}"
        );
        assert!(
            status.lines().any(|l| l == "CapEff:\t0000000000000000"),
            "{status}"
        );
    }

    let status = node.status();
    for pod in [&pods.a, &pods.b] {
        let reg = pod_status(&status, &pod.uid)
            .unwrap_or_else(|| panic!("{pod_uid} not registered: {status:#}", pod_uid = pod.uid));
        assert_eq!(reg["proxy_port"], PROXY_PORT);
        assert_eq!(reg["pod_cgroup"], pod.cgroup.display().to_string());
    }
    let workloads = node.workloads();
    let id = |p: &Path| host_cgroup_id(p);
    assert_eq!(workloads[&id(&pods.a.cgroup)].role, role::WORKLOAD);
    assert_eq!(
        workloads[&id(&pods.a.cgroup.join("proxy"))].role,
        role::PROXY
    );
    assert_eq!(workloads.len(), 4, "{workloads:?}");

    let sockopt_before = node.counter("orig_dst_sockopt");
    let mut client = node.app(&pods.a, "client", &echo_args(100_000, 3));
    let out = client.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.sent == 100_000 && l.received == 100_000),
        "{lines:?}"
    );
    assert!(
        node.counter("orig_dst_sockopt") >= sockopt_before + 3,
        "the getsockopt program did not serve the proxy"
    );

    // Pod A's sidecar tunnelled each connection to B's, both identities verified.
    assert!(wait_until(STEP, || access_lines(&pods.log_a).len() == 3
        && access_lines(&pods.log_b).len() == 3));
    for l in access_lines(&pods.log_a) {
        assert_eq!(l["direction"], "outbound", "{l}");
        assert_eq!(l["mode"], "mtls", "{l}");
        assert_eq!(l["original_dst"], format!("{ADDR_B}:{APP_PORT}"), "{l}");
        assert_eq!(l["dst_identity"], SERVER_ID, "{l}");
        assert_eq!(l["close_reason"], "ok", "{l}");
    }
    for l in access_lines(&pods.log_b) {
        assert_eq!(l["direction"], "inbound", "{l}");
        assert_eq!(l["mode"], "mtls", "{l}");
        assert_eq!(l["src_identity"], CLIENT_ID, "{l}");
    }
    // `sidecar status` against the pod sidecar's admin endpoint.
    let out = output_with_timeout(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", pods.a.ns))
            .arg(sidecar_bin())
            .args(["status", "--admin", &format!("127.0.0.1:{ADMIN_PORT}")]),
        STEP,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("interception   on (agent"), "{text}");
    assert!(
        text.contains("intercepted    yes: 3 connection(s)"),
        "{text}"
    );
    assert!(text.contains("ready          yes"), "{text}");

    // The server's peer is its own sidecar, on the pod's own address (where tunnels are
    // delivered).
    server.release();
    let served = server.success(STEP);
    let peers: Vec<Value> = served
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(peers.len(), 3, "{served}");
    for p in &peers {
        let text = p.to_string();
        assert!(
            text.contains(&format!("\"{ADDR_B}:")),
            "server peer not its sidecar's socket on the pod address: {text}"
        );
    }
    for l in access_lines(&pods.log_b) {
        assert_eq!(l["original_dst"], format!("{ADDR_B}:{APP_PORT}"), "{l}");
    }

    // A service of pod B bound to 127.0.0.1 only is out of reach of every tunnel.
    let local_only = node.app(
        &pods.b,
        "local-only",
        &[
            "serve".into(),
            format!("--addr=127.0.0.1:{LOCAL_ONLY_PORT}"),
        ],
    );
    local_only.wait_for_stdout("READY", STEP);
    let mut probe = node.app(
        &pods.a,
        "probe",
        &strings(&["echo", &format!("--addr={ADDR_B}:{LOCAL_ONLY_PORT}")]),
    );
    let status = probe.wait(STEP);
    assert!(
        !status.success(),
        "a 127.0.0.1-only service of pod B answered through the tunnel: {}",
        probe.stdout()
    );
    assert!(
        !local_only.stdout().contains("peer"),
        "{}",
        local_only.stdout()
    );
}

/// IPv6: a connect to [::1] in the pod is redirected to the proxy's [::1] listener, and the
/// getsockopt program answers `IP6T_SO_ORIGINAL_DST` with a `sockaddr_in6`.
#[test]
fn ipv6_original_destination_is_served_by_getsockopt() {
    let Some((_serial, node)) = setup("ipv6") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let log = node.log_file("access-a.log");
    let proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[format!("--access-log={}", log.display())],
    );
    node.wait_ready(&a, &proxy);
    assert_eq!(
        pod_status(&node.status(), &a.uid).unwrap()["ipv6"],
        true,
        "no [::1] listener"
    );
    let mut server = node.app(
        &a,
        "server6",
        &["serve".into(), "--addr=[::1]:22121".into()],
    );
    server.wait_for_stdout("READY", STEP);
    let served_before = node.counter("orig_dst_sockopt");

    let mut client = node.app(
        &a,
        "client6",
        &strings(&["echo", "--addr=[::1]:22121", "--size=5000", "--count=2"]),
    );
    let out = client.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(
        lines.len() == 2 && lines.iter().all(|l| l.ok && l.received == 5000),
        "{out}"
    );
    assert_eq!(node.counter("orig_dst_sockopt"), served_before + 2);
    assert!(wait_until(STEP, || access_lines(&log).len() == 2));
    for l in access_lines(&log) {
        assert_eq!(l["original_dst"], "[::1]:22121", "{l}");
        assert_eq!(l["proxy"], format!("[::1]:{PROXY_PORT}"), "{l}");
        assert_eq!(l["close_reason"], "ok", "{l}");
    }
    server.release();
    server.success(STEP);
}

/// `--exclude-cidrs`: connects to an excluded destination bypass the proxy (counted); the
/// pod's entries in the kernel trie stay while the pod does (a stopped sidecar keeps its
/// registration) and go with the pod.
#[test]
fn excluded_cidrs_bypass_the_proxy_and_go_with_the_registration() {
    let Some((_serial, node)) = setup("cidrs") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let log = node.log_file("access-a.log");
    let mut proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[
            format!("--exclude-cidrs={ADDR_B}/32,fd00:5ca1::/64"),
            format!("--access-log={}", log.display()),
        ],
    );
    node.wait_ready(&a, &proxy);
    let reg = pod_status(&node.status(), &a.uid).cloned().unwrap();
    assert_eq!(
        reg["exclude_cidrs"],
        serde_json::json!([format!("{ADDR_B}/32"), "fd00:5ca1::/64"])
    );
    assert_eq!(excluded_cidrs(&node), 2);
    let _server = node.server(&b);

    let excluded = node.counter("connect_excluded_cidr");
    let redirected = node.counter("connect_redirected");
    let mut client = node.app(&a, "client", &echo_args(64, 2));
    client.success(STEP);
    assert_eq!(node.counter("connect_excluded_cidr"), excluded + 2);
    assert_eq!(node.counter("connect_redirected"), redirected);
    assert!(
        access_lines(&log).is_empty(),
        "excluded connections reached the proxy"
    );

    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
    assert_eq!(excluded_cidrs(&node), 2, "a stopped sidecar dropped them");
    node.kill_all(&a.cgroup);
    for d in [
        a.cgroup.join("proxy"),
        a.cgroup.join("app"),
        a.cgroup.clone(),
    ] {
        assert!(sidecar_tests_rmdir(&d), "cannot remove {}", d.display());
    }
    assert!(
        wait_until(Duration::from_secs(5), || excluded_cidrs(&node) == 0),
        "the gone pod's exclusions stayed in the kernel"
    );
}

/// `sidecar proxy --policy`: the proxy enforces the policy itself (the kernel half needs the
/// agent's maps), refuses a denied destination with the verdict in the access log, and picks
/// up an edited file without a restart.
#[test]
fn proxy_enforces_its_policy_file_and_reloads_it() {
    let Some((_serial, node)) = setup("policy") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let policy = node.scratch.path("policy.toml");
    let write_policy = |action: &str| {
        let text = format!(
            "[[rule]]\nname = \"pod-b-app\"\naction = \"{action}\"\ndirection = \"outbound\"\n\
             destinations = [\"{ADDR_B}/32\"]\nports = [{APP_PORT}]\n"
        );
        // Written aside and renamed in, as kubelet swaps a ConfigMap volume.
        let tmp = policy.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &policy).unwrap();
    };
    write_policy("deny");
    let log = node.log_file("access-a.log");
    let mut proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &[
            format!("--policy={}", policy.display()),
            format!("--access-log={}", log.display()),
        ],
    );
    node.wait_ready(&a, &proxy);
    let _server = node.server(&b);

    let mut denied = node.app(&a, "client-denied", &echo_args(64, 1));
    assert!(
        !denied.wait(STEP).success(),
        "a denied destination was reached: {}",
        denied.stdout()
    );
    assert!(wait_until(STEP, || access_lines(&log).len() == 1));
    let line = &access_lines(&log)[0];
    assert_eq!(line["policy_decision"], "deny", "{line}");
    assert_eq!(line["policy_rule"], "pod-b-app", "{line}");

    write_policy("allow");
    assert!(
        wait_until(STEP, || proxy.stderr().contains("policy reloaded")),
        "{}",
        proxy.stderr()
    );
    let mut allowed = node.app(&a, "client-allowed", &echo_args(64, 2));
    allowed.success(STEP);
    assert!(wait_until(STEP, || access_lines(&log).len() == 3));
    assert!(
        access_lines(&log)[1..]
            .iter()
            .all(|l| l["policy_decision"] == "allow"),
        "{:?}",
        access_lines(&log)
    );

    // An invalid file is refused before anything is bound or registered.
    fs::write(&policy, "[[rule]]\naction = \"maybe\"\n").unwrap();
    let mut bad = node.start_proxy(
        &b,
        "proxy-bad",
        "server",
        &[format!("--policy={}", policy.display())],
    );
    assert!(!bad.wait(STEP).success());
    assert!(bad.stderr().contains("policy.toml"), "{}", bad.stderr());
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
}

/// A registered pod cannot reach the cloud metadata address: the agent marks the pod so its
/// connect hook refuses it (EPERM, counted) unless its sidecar says `--allow-metadata`. The
/// pods' namespaces have no route out, so nothing could leave even if the check failed.
#[test]
fn pod_connects_to_the_metadata_address_are_refused_in_the_kernel() {
    let Some((_serial, node)) = setup("metadata") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let before = node.counter("connect_metadata_denied");
    let mut client = node.app(
        &a,
        "client-metadata",
        &[
            "echo".into(),
            "--addr=169.254.169.254:80".into(),
            "--count=1".into(),
        ],
    );
    assert!(!client.wait(STEP).success());
    assert!(
        client.stderr().contains("Operation not permitted")
            || client.stdout().contains("Operation not permitted"),
        "expected EPERM from the connect hook: {} {}",
        client.stdout(),
        client.stderr()
    );
    assert_eq!(node.counter("connect_metadata_denied"), before + 1);
}

/// Entries in the pinned `EXCLUDED_CIDRS` trie.
fn excluded_cidrs(node: &Node) -> usize {
    let data = MapData::from_pin(node.pin_dir.join("EXCLUDED_CIDRS")).expect("pinned trie");
    let trie: aya::maps::LpmTrie<MapData, sidecar_common::ScopedAddr, u8> =
        aya::maps::Map::LpmTrie(data)
            .try_into()
            .expect("an LPM trie");
    trie.keys().filter_map(Result::ok).count()
}

fn host_cgroup_id(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("cgroup").ino()
}

/// (b) The agent is stopped and restarted while a connection streams and new connections
/// are made continuously: the stream continues byte-exact, every connection goes through the
/// proxy, none passes through un-intercepted.
#[test]
fn agent_restart_mid_stream_loses_no_connection_and_no_interception() {
    let Some((_serial, node)) = setup("restart") else {
        return;
    };
    let mut agent = node.start_agent("agent-1");
    let (pods, _proxy_a, _proxy_b) = two_pods(&node);
    let _server = node.server(&pods.b);
    let before = node.status()["counters"].clone();

    let mut stream = pingpong_stream(&node, &pods.a, 4);
    const CONNECTS: usize = 600;
    let mut connects = node.app(&pods.a, "connects", &echo_args(64, CONNECTS));
    std::thread::sleep(Duration::from_millis(500));

    let stopping = Instant::now();
    let window_start = std::time::SystemTime::now();
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(STEP).success(), "{}", agent.stderr());
    let stopped = stopping.elapsed();
    let down = Instant::now();
    let agent2 = node.start_agent("agent-2");
    let gap = down.elapsed();
    let window_end = std::time::SystemTime::now();
    assert!(agent2_log_adopted(&agent2), "{}", agent2.stderr());
    // Both proxies registered again with the new agent.
    assert!(wait_until(STEP, || both_registered_again(&node, &pods)));
    let reregistered = down.elapsed();
    // The client was still making connects when the new agent took over: they were
    // continuous across the restart.
    assert!(
        connects.child.try_wait().unwrap().is_none(),
        "the connect loop ended before the restart was over: make it longer"
    );

    // Bounded by its count; the generous deadline is for slow guests (qemu TCG, one vCPU,
    // where each mTLS connect takes tens of milliseconds).
    let out = connects.success(Duration::from_secs(180));
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert_eq!(lines.len(), CONNECTS);
    assert!(
        lines.iter().all(|l| l.ok),
        "a connection failed during the restart: {:?}",
        lines.iter().find(|l| !l.ok)
    );
    let out = stream.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(
        lines.len() == 1 && lines[0].ok && lines[0].sent == lines[0].received && lines[0].sent > 0,
        "{out}"
    );

    // Every connect of the app went through pod A's proxy (over mTLS), none around it.
    let after = node.status()["counters"].clone();
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(
        delta("connect_not_meshed"),
        0,
        "connects passed through un-intercepted"
    );
    assert_eq!(delta("connect_redirected"), CONNECTS as u64 + 1);
    assert!(wait_until(STEP, || access_lines(&pods.log_a).len() == CONNECTS + 1));
    assert!(all_mtls_ok(&pods.log_a));
    // Connects the app made while no agent (or only the starting one) ran: all intercepted.
    let in_window = access_lines(&pods.log_a)
        .iter()
        .filter_map(|l| l["start"].as_str().and_then(unix_time))
        .filter(|t| (secs(window_start)..=secs(window_end)).contains(t))
        .count();
    assert!(
        in_window > 0,
        "no connect fell into the restart window: make the loop denser"
    );
    eprintln!(
        "agent restart: stop took {stopped:?}, agent down→socket answering {gap:?}, both proxies re-registered after {reregistered:?}; {in_window} of {CONNECTS} connects made between SIGTERM and the new agent answering, all intercepted; 1 stream byte-exact"
    );
}

/// The agent restarts without its state directory (not on the host): the adopted pins keep
/// intercepting while the sidecars re-register, so no connect passes through un-intercepted.
#[test]
fn agent_restart_with_lost_state_keeps_interception_while_sidecars_reregister() {
    let Some((_serial, node)) = setup("loststate") else {
        return;
    };
    let mut agent = node.start_agent("agent-1");
    let (pods, _proxy_a, _proxy_b) = two_pods(&node);
    let _server = node.server(&pods.b);
    let before = node.status()["counters"].clone();
    const CONNECTS: usize = 400;
    let mut connects = node.app(&pods.a, "connects", &echo_args(64, CONNECTS));
    std::thread::sleep(Duration::from_millis(300));

    agent.signal(libc::SIGTERM);
    assert!(agent.wait(STEP).success());
    fs::remove_dir_all(&node.state_dir).unwrap();
    let agent2 = node.start_agent("agent-2");
    assert!(
        wait_until(STEP, || agent2.stderr().contains("has no registrations")),
        "{}",
        agent2.stderr()
    );
    assert!(wait_until(STEP, || {
        let s = node.status();
        [&pods.a, &pods.b]
            .iter()
            .all(|p| pod_status(&s, &p.uid).is_some())
    }));
    // Bounded by its count; the deadline is for one-vCPU TCG guests (311 of the 400 in 60 s
    // on a loaded host).
    let out = connects.success(Duration::from_secs(150));
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(
        lines.len() == CONNECTS && lines.iter().all(|l| l.ok),
        "{out}"
    );
    let after = node.status()["counters"].clone();
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(
        delta("connect_not_meshed"),
        0,
        "connects passed through un-intercepted"
    );
    assert_eq!(delta("connect_redirected"), CONNECTS as u64);
    // Re-registered pods got scopes the kept entries did not use.
    let scopes: Vec<u64> = node.status()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["scope"].as_u64().unwrap())
        .collect();
    assert!(scopes.iter().all(|s| *s > 2), "{scopes:?}");
}

fn secs(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Seconds since the epoch of an access-log timestamp (`2026-11-25T13:44:01.915922Z`).
fn unix_time(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
}

fn agent2_log_adopted(agent: &Proc) -> bool {
    wait_until(STEP, || {
        agent.stderr().contains("adopting the pinned programs")
    })
}

/// Upgrade: an agent whose binary carries other programs than the pinned ones swaps them into
/// the pinned links (BPF_LINK_UPDATE) and keeps the maps: registrations, counters and a
/// streaming connection survive, new connects are intercepted by the new programs.
#[test]
fn agent_upgrade_replaces_the_programs_in_place_and_keeps_the_maps() {
    let Some((_serial, node)) = setup("upgrade") else {
        return;
    };
    let mut agent = node.start_agent("agent-1");
    let (pods, _proxy_a, _proxy_b) = two_pods(&node);
    let _server = node.server(&pods.b);
    let mut stream = pingpong_stream(&node, &pods.a, 3);
    std::thread::sleep(Duration::from_millis(300));
    let old_programs = attached_programs(&node.root);
    let workloads = node.workloads();
    let before = node.status()["counters"].clone();

    agent.signal(libc::SIGTERM);
    assert!(agent.wait(STEP).success());
    // What a different build looks like to the agent: another object fingerprint.
    let record = node.state_dir.join("agent.json");
    let mut json: Value = serde_json::from_str(&fs::read_to_string(&record).unwrap()).unwrap();
    json["object"] = "0000000000000000".into();
    fs::write(&record, json.to_string()).unwrap();
    let agent2 = node.start_agent("agent-2");
    assert!(
        wait_until(STEP, || agent2.stderr().contains("upgraded in place")),
        "{}",
        agent2.stderr()
    );

    let new_programs = attached_programs(&node.root);
    assert_eq!(new_programs.len(), 4, "{new_programs:?}");
    for (t, id) in &new_programs {
        assert!(
            !old_programs.contains(&(*t, *id)),
            "attach type {t} still runs program {id}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            let live: Vec<u32> = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .map(|p| p.id())
                .collect();
            old_programs.iter().all(|(_, id)| !live.contains(id))
        }),
        "old programs still loaded after the upgrade"
    );
    assert_eq!(
        node.workloads(),
        workloads,
        "WORKLOADS changed across the upgrade"
    );
    let after = node.status()["counters"].clone();
    assert!(
        after["connect_redirected"].as_u64() >= before["connect_redirected"].as_u64(),
        "counters were reset"
    );

    let not_meshed = node.counter("connect_not_meshed");
    let mut client = node.app(&pods.a, "client", &echo_args(10_000, 3));
    client.success(STEP);
    let out = stream.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert!(
        lines.len() == 1 && lines[0].ok && lines[0].sent == lines[0].received,
        "{out}"
    );
    assert_eq!(node.counter("connect_not_meshed"), not_meshed);
    assert!(wait_until(STEP, || access_lines(&pods.log_a).len() == 4));
    assert!(all_mtls_ok(&pods.log_a));
}

/// Readiness gating: a sidecar started before the agent serves, keeps trying to register, and
/// answers /readyz 503 (its pod is not intercepted, the app's connects pass through, counted)
/// until the agent comes up; then it registers by itself and turns ready.
#[test]
fn proxy_is_not_ready_until_registered_and_registers_when_the_agent_comes() {
    let Some((_serial, node)) = setup("readiness") else {
        return;
    };
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    assert!(
        wait_until(STEP, || node.readyz(&a) == 503),
        "{}",
        proxy.stderr()
    );
    let (code, body) = node.admin(&a, "/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("not attached"), "{body}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(node.readyz(&a), 503);
    // The exec-probe form says the same with its exit code.
    let probe = |pod: &Pod| {
        output_with_timeout(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", pod.ns))
                .arg(sidecar_bin())
                .args(["status", "--require-ready", "--admin"])
                .arg(format!("127.0.0.1:{ADMIN_PORT}")),
            STEP,
        )
    };
    let out = probe(&a);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not ready"));

    let _agent = node.start_agent("agent");
    let up = Instant::now();
    node.wait_ready(&a, &proxy);
    eprintln!(
        "agent up → sidecar registered and ready after {:?}",
        up.elapsed()
    );
    assert!(pod_status(&node.status(), &a.uid).is_some());
    assert!(probe(&a).status.success());
}

/// (c) A registration from a process not in the claimed pod is refused and counted: a
/// proxy claiming another pod's UID, a process outside kubepods, one in a pod cgroup itself.
#[test]
fn registrations_not_from_the_claimed_pod_are_refused_and_counted() {
    let Some((_serial, node)) = setup("refuse") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);

    // A sidecar in pod A claiming pod B: refused, and it exits with a one-line error.
    let mut impostor = node.claim(
        "impostor",
        &a.container("proxy"),
        Some(a.ns),
        PROXY_PORT,
        &b.uid,
    );
    let status = impostor.wait(STEP);
    assert_eq!(status.code(), Some(1), "{}", impostor.stderr());
    let err = impostor.stderr();
    assert!(
        err.contains("error: the agent refused to register pod")
            && err.contains("is not in that pod's cgroup"),
        "{err}"
    );
    assert!(
        !err.contains(&a.uid),
        "the refusal named the pod the caller is in: {err}"
    );

    // This test process is outside kubepods.
    let reply = raw_register(&node.socket, &a.uid);
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["reason"], "outside_pods", "{reply}");

    // A process in the pod cgroup itself, not in a container.
    let mut in_pod = node.claim("in-pod", &a.cgroup, None, 22131, &a.uid);
    assert_eq!(in_pod.wait(STEP).code(), Some(1), "{}", in_pod.stderr());
    assert!(
        in_pod.stderr().contains("not in one of its containers"),
        "{}",
        in_pod.stderr()
    );

    let status = node.status();
    assert_eq!(status["refusals"]["uid_mismatch"], 1, "{status:#}");
    assert_eq!(status["refusals"]["outside_pods"], 1, "{status:#}");
    assert_eq!(status["refusals"]["not_in_container"], 1, "{status:#}");
    assert_eq!(
        status["pods"].as_array().map(Vec::len),
        Some(0),
        "{status:#}"
    );
    assert!(
        node.workloads().is_empty(),
        "refused callers got WORKLOADS entries"
    );
    // The same, as the table `sidecar agent --status` prints.
    let out = output_with_timeout(
        Command::new(sidecar_bin())
            .args(["agent", "--status", "--socket"])
            .arg(&node.socket),
        STEP,
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("refusals       not_in_container 1, outside_pods 1, uid_mismatch 1"),
        "{table}"
    );
    assert!(table.contains("pods           0 registered"), "{table}");
    assert!(table.contains("connect_not_meshed"), "{table}");
}

/// Another container of a registered pod cannot take over the pod's registration (and so
/// make itself the exempt PROXY) while the registered sidecar runs.
#[test]
fn another_container_cannot_take_over_a_registered_pod() {
    let Some((_serial, node)) = setup("takeover") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let before = node.workloads();

    let mut app = node.claim("app-claims", &a.container("app"), Some(a.ns), 22132, &a.uid);
    assert_eq!(app.wait(STEP).code(), Some(1), "{}", app.stderr());
    assert!(
        app.stderr().contains("may not take over"),
        "{}",
        app.stderr()
    );
    assert_eq!(node.status()["refusals"]["proxy_taken"], 1);
    assert_eq!(
        node.workloads(),
        before,
        "the refused container changed WORKLOADS"
    );
}

/// An agent in a cgroup namespace of its own (a container's) still identifies callers: their
/// `/proc/<pid>/cgroup` reads relative to its namespace (`/../kubepods/…`) and is resolved
/// from the namespace's root.
#[test]
fn agent_in_its_own_cgroup_namespace_identifies_callers() {
    if !ready() {
        return;
    }
    if host::which("unshare").is_none() {
        skip("unshare is not installed (util-linux)");
        return;
    }
    let _serial = serial();
    let node = Node::new("cgroupns");
    let agent_cg = node.base.join("agent");
    fs::create_dir_all(&agent_cg).unwrap();
    let agent = node.start_agent_in("agent", Some(&agent_cg), &["unshare", "--cgroup"], &[]);
    let err = agent.stderr();
    assert!(
        err.contains("in a cgroup namespace of our own")
            || err.contains("joined PID 1's cgroup namespace"),
        "{err}"
    );
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let reg = pod_status(&node.status(), &a.uid)
        .cloned()
        .expect("registered");
    assert_eq!(reg["pod_cgroup"], a.cgroup.display().to_string());
    assert_eq!(
        reg["proxy_cgroup"],
        a.cgroup.join("proxy").display().to_string()
    );
    assert!(node.workloads().contains_key(&host_cgroup_id(&a.cgroup)));

    // And a claim for another pod is still seen through.
    let mut impostor = node.claim(
        "impostor",
        &b.container("proxy"),
        Some(b.ns),
        PROXY_PORT,
        &a.uid,
    );
    assert_eq!(impostor.wait(STEP).code(), Some(1), "{}", impostor.stderr());
    assert_eq!(node.status()["refusals"]["uid_mismatch"], 1);
}

/// The agent is SIGKILLed (no cleanup at all): interception continues on the pinned
/// programs, and the next agent replaces the stale socket file, adopts the pins and the
/// proxies re-register.
#[test]
fn agent_sigkill_keeps_interception_and_the_next_agent_takes_over() {
    let Some((_serial, node)) = setup("sigkill") else {
        return;
    };
    let agent = node.start_agent("agent-1");
    let (pods, _proxy_a, _proxy_b) = two_pods(&node);
    let _server = node.server(&pods.b);
    drop(agent); // SIGKILL
    assert!(
        node.socket.exists(),
        "a killed agent cannot remove its socket"
    );

    // No agent: the pods are still intercepted (and tunnelled).
    let mut client = node.app(&pods.a, "client-1", &echo_args(1000, 2));
    client.success(STEP);
    assert!(wait_until(STEP, || access_lines(&pods.log_a).len() == 2));

    let agent2 = node.start_agent("agent-2");
    assert!(agent2_log_adopted(&agent2), "{}", agent2.stderr());
    assert!(wait_until(STEP, || both_registered_again(&node, &pods)));
    let mut client = node.app(&pods.a, "client-2", &echo_args(1000, 2));
    client.success(STEP);
    assert!(wait_until(STEP, || access_lines(&pods.log_a).len() == 4));
    assert!(
        access_lines(&pods.log_a)
            .iter()
            .all(|l| l["mode"] == "mtls")
    );
}

/// Garbage on the registration socket is refused line by line (an oversized line closes the
/// connection) and counted; the agent keeps serving.
#[test]
fn malformed_requests_are_refused_and_the_agent_keeps_serving() {
    use std::io::{BufRead, BufReader, Read};
    let Some((_serial, node)) = setup("garbage") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let mut s = std::os::unix::net::UnixStream::connect(&node.socket).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for line in [
        "not json",
        r#"{"op":"sudo"}"#,
        r#"{"op":"register"}"#,
        r#"{"op":"register","pod_uid":"x","proxy_port":70000}"#,
        r#"{"op":"deregister"}"#,
    ] {
        writeln!(s, "{line}").unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        let reply: Value = serde_json::from_str(&reply).expect("a JSON answer");
        assert_eq!(reply["ok"], false, "{line}: {reply}");
    }
    // 8 KiB without a newline: refused, and the connection closed.
    s.write_all(&vec![b'x'; 8192]).unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"reason\":\"bad_request\""), "{rest}");
    let status = node.status();
    assert_eq!(status["refusals"]["bad_request"], 5, "{status:#}");
    assert_eq!(status["refusals"]["not_registered"], 1, "{status:#}");
}

/// The agent's admin endpoint: /healthz, and /metrics in valid Prometheus text with the
/// registered pods, refusals by reason (every reason from zero), the node-wide eBPF
/// counters moved by real traffic, and the agent's own CPU, memory and descriptors.
#[test]
fn agent_admin_endpoint_serves_health_and_metrics() {
    let Some((_serial, node)) = setup("agentadmin") else {
        return;
    };
    let _agent = node.start_agent_in("agent", None, &[], &["--admin-addr=127.0.0.1:22190".into()]);
    let get = |path: &str| {
        let out = output_with_timeout(
            Command::new("curl").args(["-s", "-m", "2", &format!("http://127.0.0.1:22190{path}")]),
            STEP,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(get("/healthz"), "ok\n");

    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let _ = raw_register(&node.socket, &a.uid); // from outside the pods: refused
    let mut client = node.app(
        &a,
        "client",
        &strings(&["connect-fail", "--addr=10.253.0.2:22120"]),
    );
    client.success(STEP);

    let text = get("/metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{text}"));
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} {label:?} missing:\n{text}"))
    };
    assert_eq!(value("sidecar_agent_registered_pods", None), 1.0);
    assert_eq!(
        value(
            "sidecar_agent_registration_refusals_total",
            Some(("reason", "outside_pods"))
        ),
        1.0
    );
    assert_eq!(
        value(
            "sidecar_agent_registration_refusals_total",
            Some(("reason", "uid_mismatch"))
        ),
        0.0
    );
    assert!(
        value("sidecar_ebpf_connect_redirected_total", None) >= 1.0,
        "{text}"
    );
    // The agent's own cost, under the standard names.
    assert!(value("process_resident_memory_bytes", None) > 0.0, "{text}");
    assert!(value("process_cpu_seconds_total", None) > 0.0, "{text}");
    assert!(value("process_open_fds", None) > 0.0, "{text}");
    // Counts only over HTTP: which pods are registered is for root, over the socket.
    let status: Value = serde_json::from_str(&get("/status")).expect("/status is JSON");
    assert_eq!(status["registered_pods"], 1, "{status:#}");
    assert_eq!(status["refusals"]["outside_pods"], 1, "{status:#}");
    assert!(
        !status.to_string().contains(&a.uid) && status.get("pods").is_none(),
        "/status over HTTP lists the pods: {status:#}"
    );
}

/// One register request from this process, straight on the socket.
fn raw_register(socket: &Path, uid: &str) -> Value {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("agent socket");
    s.set_read_timeout(Some(STEP)).unwrap();
    writeln!(
        s,
        r#"{{"op":"register","pod_uid":"{uid}","proxy_port":{PROXY_PORT}}}"#
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).expect("a JSON reply")
}

/// (d) Removing a pod (processes killed, cgroup removed) removes its WORKLOADS entries (and its
/// cap on pass-through connections) within a bounded time, without any deregistration.
#[test]
fn removing_a_pod_removes_its_interception() {
    let Some((_serial, node)) = setup("podgone") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(
        &a,
        "proxy-a",
        "client",
        &strings(&["--max-connections-per-destination=7"]),
    );
    node.wait_ready(&a, &proxy);
    let ids = [
        host_cgroup_id(&a.cgroup),
        host_cgroup_id(&a.cgroup.join("proxy")),
    ];
    let workloads = node.workloads();
    assert!(
        ids.iter().all(|id| workloads.contains_key(id)),
        "{workloads:?}"
    );
    let scope = workloads[&ids[0]].scope;
    assert_eq!(node.direct_caps(), BTreeMap::from([(scope, 7)]));

    // The pod goes: SIGKILL (no deregistration), then kubelet removes its cgroups.
    drop(proxy);
    node.kill_all(&a.cgroup);
    let removed = Instant::now();
    for d in [
        a.cgroup.join("proxy"),
        a.cgroup.join("app"),
        a.cgroup.clone(),
    ] {
        assert!(sidecar_tests_rmdir(&d), "cannot remove {}", d.display());
    }
    assert!(
        wait_until(Duration::from_secs(5), || node.workloads().is_empty()),
        "WORKLOADS still has the removed pod: {:?}",
        node.workloads()
    );
    let took = removed.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(node.status()["pods"].as_array().map(Vec::len), Some(0));
    assert!(node.direct_caps().is_empty(), "{:?}", node.direct_caps());
    eprintln!("pod removed → WORKLOADS entries gone after {took:?}");
}

/// (e) SIGTERM to `sidecar proxy` with open connections: they finish within the deadline,
/// new connects are refused promptly and cleanly, and the proxy exits 0 with its pod still
/// intercepted: the app's connects keep being refused, never passed through.
#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let Some((_serial, node)) = setup("drain") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let (pods, mut proxy_a, _proxy_b) = two_pods(&node);
    let _server = node.server(&pods.b);
    let _ = fs::remove_file(&pods.log_a); // drain test reads the stderr summary instead

    let mut held = node.app(
        &pods.a,
        "hold",
        &strings(&["hold", &format!("--addr={ADDR_B}:{APP_PORT}"), "--count=2"]),
    );
    held.wait_for_stdout("READY", STEP);

    let term = Instant::now();
    proxy_a.signal(libc::SIGTERM);
    assert!(
        wait_until(STEP, || node.readyz(&pods.a) == 503),
        "/readyz stayed ready while draining"
    );
    // A new connect now: refused at once (the listener is closed), not hung.
    let mut probe = node.app(
        &pods.a,
        "refused",
        &strings(&["connect-fail", &format!("--addr={ADDR_B}:{APP_PORT}")]),
    );
    let out = probe.success(STEP);
    let line: ConnectFailLine = stdout_lines(&out).pop().expect("connect-fail line");
    assert!(!line.connected, "{line:?}");
    assert!(
        line.error.as_deref().is_some_and(|e| e.contains("refused")),
        "{line:?}"
    );
    assert!(line.elapsed_ms < 500, "{line:?}");

    // The held connections finish (the app closes them) well within the 5 s deadline.
    std::thread::sleep(Duration::from_millis(300));
    held.release();
    held.success(STEP);
    let status = proxy_a.wait(STEP);
    let drained = term.elapsed();
    assert!(status.success(), "{}", proxy_a.stderr());
    assert!(drained < Duration::from_secs(4), "drain took {drained:?}");
    let err = proxy_a.stderr();
    assert!(err.contains("registration left in place"), "{err}");
    assert!(err.contains("cut=0"), "connections were cut: {err}");
    assert!(
        !err.contains("were still open after the drain deadline"),
        "{err}"
    );

    // Still registered after the exit: pod A's connects are refused, none passes through.
    assert!(pod_status(&node.status(), &pods.a.uid).is_some());
    let not_meshed = node.counter("connect_not_meshed");
    let mut after = node.app(
        &pods.a,
        "after-exit",
        &strings(&["connect-fail", &format!("--addr={ADDR_B}:{APP_PORT}")]),
    );
    let line: ConnectFailLine = stdout_lines(&after.success(STEP))
        .pop()
        .expect("connect-fail line");
    assert!(
        !line.connected && line.error.as_deref().is_some_and(|e| e.contains("refused")),
        "{line:?}"
    );
    assert_eq!(node.counter("connect_not_meshed"), not_meshed);
    eprintln!(
        "drain: SIGTERM → refused connect in {} ms; exit 0 after {drained:?} (held connections closed at +300 ms)",
        line.elapsed_ms
    );
}

/// The drain deadline: a connection still open when `--drain-timeout-secs` expires is cut,
/// and the sidecar exits 0 right after the deadline (not before, not much later).
#[test]
fn drain_deadline_cuts_connections_that_stay_open() {
    let Some((_serial, node)) = setup("deadline") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let mut proxy = node.start_proxy(&a, "proxy-a", "client", &["--drain-timeout-secs=1".into()]);
    node.wait_ready(&a, &proxy);
    let _server = node.server(&b);
    let mut held = node.app(
        &a,
        "hold",
        &strings(&["hold", &format!("--addr={ADDR_B}:{APP_PORT}"), "--count=1"]),
    );
    held.wait_for_stdout("READY", STEP);

    let term = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait(STEP);
    let took = term.elapsed();
    assert!(status.success(), "{}", proxy.stderr());
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "exit {took:?} after SIGTERM with a 1 s deadline"
    );
    let err = proxy.stderr();
    assert!(
        err.contains("1 connection(s) were still open after the drain deadline"),
        "{err}"
    );
    assert!(err.contains("registration left in place"), "{err}");
    held.release();
    eprintln!("drain deadline 1 s: sidecar exited 0 after {took:?}, 1 connection cut");
}

/// kubelet restarts the sidecar container alone (liveness failure, OOM kill, image update)
/// while the app connects in a loop: no connect reaches the server without the proxy. While
/// no proxy runs the connects are refused; the restarted sidecar, in a new container cgroup,
/// takes the registration back (the old container's entry goes), and a second live claimant
/// is still refused.
#[test]
fn restarting_the_pod_sidecar_keeps_its_pod_intercepted() {
    let Some((_serial, node)) = setup("restart") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let mut proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    let _server = node.server(&b);
    let old_proxy_id = host_cgroup_id(&a.cgroup.join("proxy"));
    let not_meshed = node.counter("connect_not_meshed");

    // The app: batches of sequential echo connections until told to stop (bounded), while
    // kubelet restarts the sidecar: SIGTERM, the container exits, restart backoff, a new
    // container.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (lines, _restarted) = std::thread::scope(|s| {
        let looper = s.spawn(|| {
            let mut lines: Vec<EchoLine> = Vec::new();
            let until = Instant::now() + Duration::from_secs(60);
            let mut batch = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                let mut p = node.app(&a, &format!("loop-{batch}"), &echo_args(64, 50));
                p.wait(STEP);
                lines.extend(stdout_lines::<EchoLine>(&p.stdout()));
                batch += 1;
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(500));
        proxy.signal(libc::SIGTERM);
        assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
        std::thread::sleep(Duration::from_millis(700));
        let restarted = node.start_proxy_in(&a, "proxy-1", "proxy-a-restarted", "client", &[]);
        node.wait_ready(&a, &restarted);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (looper.join().expect("the app loop panicked"), restarted)
    });

    let proxied = format!("127.0.0.1:{PROXY_PORT}").parse().unwrap();
    let direct: Vec<&EchoLine> = lines
        .iter()
        .filter(|l| l.peer.is_some_and(|p| p != proxied))
        .collect();
    assert!(
        direct.is_empty(),
        "{} of {} connects reached the server without the proxy: {:?}",
        direct.len(),
        lines.len(),
        direct.first()
    );
    let refused = lines
        .iter()
        .filter(|l| !l.ok && l.error.as_deref().is_some_and(|e| e.contains("refused")))
        .count();
    let ok = lines.iter().filter(|l| l.ok).count();
    let other: Vec<&EchoLine> = lines
        .iter()
        .filter(|l| !l.ok && !l.error.as_deref().is_some_and(|e| e.contains("refused")))
        .collect();
    // Proxied before the SIGTERM, refused while no proxy ran, proxied again after.
    let first_refused = lines.iter().position(|l| !l.ok);
    let last_refused = lines.iter().rposition(|l| !l.ok);
    assert!(
        refused > 0
            && first_refused.is_some_and(|i| i > 0)
            && last_refused.is_some_and(|i| lines[i + 1..].iter().any(|l| l.ok)),
        "{ok} ok, {refused} refused, in order: first refused {first_refused:?}, last {last_refused:?}"
    );
    // A connection the old proxy had accepted may be cut by its exit; nothing else fails.
    assert!(other.len() <= 1, "{other:?}");
    assert_eq!(node.counter("connect_not_meshed"), not_meshed);

    // The restarted sidecar owns the registration; the old container's entry is gone.
    let reg = pod_status(&node.status(), &a.uid)
        .cloned()
        .expect("registered");
    assert_eq!(reg["registrations"], 2, "{reg}");
    assert!(
        reg["proxy_cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("/proxy-1")),
        "{reg}"
    );
    let workloads = node.workloads();
    assert!(!workloads.contains_key(&old_proxy_id), "{workloads:?}");
    assert_eq!(
        workloads
            .get(&host_cgroup_id(&a.cgroup.join("proxy-1")))
            .map(|c| c.role),
        Some(role::PROXY)
    );
    assert_eq!(
        workloads.get(&host_cgroup_id(&a.cgroup)).map(|c| c.role),
        Some(role::WORKLOAD)
    );
    // A second live claimant (from the old, now empty, container) is refused.
    let mut second = node.claim("second", &a.container("proxy"), Some(a.ns), 22133, &a.uid);
    assert_eq!(second.wait(STEP).code(), Some(1), "{}", second.stderr());
    assert!(
        second.stderr().contains("may not take over"),
        "{}",
        second.stderr()
    );
    eprintln!(
        "sidecar restart: {} connects, {ok} proxied, {refused} refused while no proxy ran, 0 direct",
        lines.len()
    );
}

/// The pod sidecar reports the fast path as it is: `/status` says sockmap on or off as the
/// agent's programs run, and each connection's record says whether its app leg was spliced
/// (the proxy asks its socket; it cannot read the maps).
#[test]
fn pod_sidecar_reports_the_fast_path_as_it_is() {
    if !ready() {
        return;
    }
    let _serial = serial();
    for sockmap in [true, false] {
        let node = Node::new(if sockmap {
            "fastpath-on"
        } else {
            "fastpath-off"
        });
        let flags = if sockmap {
            vec!["--sockmap".to_string()]
        } else {
            vec![]
        };
        let _agent = node.start_agent_in("agent", None, &[], &flags);
        let a = node.pod("a", NS_A, ADDR_A);
        let b = node.pod("b", NS_B, ADDR_B);
        let log = node.log_file("access-a.log");
        let proxy = node.start_proxy(
            &a,
            "proxy-a",
            "client",
            &[format!("--access-log={}", log.display())],
        );
        node.wait_ready(&a, &proxy);
        let _server = node.server(&b);
        node.app(&a, "client", &echo_args(64, 1)).success(STEP);
        assert!(wait_until(STEP, || access_lines(&log).len() == 1));
        let line = &access_lines(&log)[0];
        assert_eq!(line["fast_path_app"], sockmap, "sockmap {sockmap}: {line}");
        // The upstream is another pod, across the veth: never spliced.
        assert_eq!(line["fast_path_upstream"], false, "{line}");
        let (code, body) = node.admin(&a, "/status");
        assert_eq!(code, 200, "{body}");
        let status: Value = serde_json::from_str(&body).expect("/status JSON");
        assert_eq!(status["interception"]["sockmap"], sockmap, "{status:#}");
        assert_eq!(
            status["connections"]["fast_path_app_legs"],
            u64::from(sockmap),
            "{status:#}"
        );
    }
}

/// (f) The agent's socket file is deleted: the agent binds it again and the proxy
/// re-registers through it.
#[test]
fn deleted_agent_socket_is_recreated_and_proxies_reregister() {
    let Some((_serial, node)) = setup("socket") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    assert_eq!(
        pod_status(&node.status(), &a.uid).unwrap()["registrations"],
        1
    );

    fs::remove_file(&node.socket).unwrap();
    let deleted = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || node.socket.exists()),
        "socket never recreated"
    );
    let recreated = deleted.elapsed();
    assert!(
        wait_until(Duration::from_secs(5), || pod_status(
            &node.status(),
            &a.uid
        )
        .is_some_and(|r| r["registrations"] == 2)),
        "the proxy did not re-register: {}",
        proxy.stderr()
    );
    let reregistered = deleted.elapsed();
    assert_eq!(node.readyz(&a), 200);
    eprintln!(
        "socket deleted → recreated after {recreated:?}, proxy re-registered after {reregistered:?}"
    );
}

/// (g) `sidecar agent --uninstall` leaves no pin, link, cgroup attachment, map or file; the
/// agent's SIGTERM before it left the programs attached.
#[test]
fn uninstall_leaves_nothing() {
    let Some((_serial, node)) = setup("uninstall") else {
        return;
    };
    let mut agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy = node.start_proxy(&a, "proxy-a", "client", &[]);
    node.wait_ready(&a, &proxy);
    drop(proxy);
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(STEP).success());

    // Stopped, the agent left everything attached (that is the point).
    let attached = attached_programs(&node.root);
    assert_eq!(
        attached.len(),
        4,
        "connect4, connect6, sockops, getsockopt: {attached:?}"
    );
    let map_ids: Vec<u32> = fs::read_dir(&node.pin_dir)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with("link-"))
        .map(|e| MapData::from_pin(e.path()).unwrap().info().unwrap().id())
        .collect();
    assert!(!map_ids.is_empty());

    // Uninstall refuses while an agent runs.
    let mut agent2 = node.start_agent("agent-2");
    let mut args = vec!["agent".to_string(), "--uninstall".into()];
    args.extend(node.agent_args());
    let out = output_with_timeout(Command::new(sidecar_bin()).args(&args), STEP);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running: stop it first"));
    agent2.signal(libc::SIGTERM);
    assert!(agent2.wait(STEP).success());

    let out = output_with_timeout(Command::new(sidecar_bin()).args(&args), STEP);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!node.pin_dir.exists(), "pin directory left");
    assert!(!node.state_dir.exists(), "state directory left");
    assert!(!node.socket.exists(), "socket left");
    assert!(
        !node.socket.parent().unwrap().exists(),
        "socket directory left"
    );
    assert!(
        attached_programs(&node.root).is_empty(),
        "programs still attached to {}",
        node.root.display()
    );
    // The maps (and with SOCKETS, the sk_msg program) are freed.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let live: Vec<u32> = aya::maps::loaded_maps()
                .filter_map(Result::ok)
                .map(|m| m.id())
                .collect();
            map_ids.iter().all(|id| !live.contains(id))
        }),
        "maps of the agent still loaded"
    );
    // A second uninstall has nothing to do.
    let out = output_with_timeout(Command::new(sidecar_bin()).args(&args), STEP);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to uninstall"));
}

/// Program ids attached to a cgroup, for the four attach types the agent uses.
/// Asserts that a command failed with exit code 1 and exactly one `error:` line; returns
/// its stderr.
fn assert_one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    err
}

fn attached_programs(cgroup: &Path) -> Vec<(u32, u32)> {
    use std::os::fd::AsRawFd;
    // connect4, connect6, sock_ops, getsockopt (enum bpf_attach_type).
    const TYPES: [u32; 4] = [10, 11, 3, 21];
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = fs::File::open(cgroup).expect("cgroup");
    let mut found = Vec::new();
    for t in TYPES {
        let mut ids = [0u32; 64];
        let mut attr = [0u64; 8];
        attr[0] = u64::from(dir.as_raw_fd() as u32) | (u64::from(t) << 32);
        attr[2] = ids.as_mut_ptr() as u64;
        attr[3] = ids.len() as u64;
        // SAFETY: attr is larger than the query's fields; ids has room for prog_cnt ids.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), 64u32) };
        assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
        let count = (attr[3] & 0xffff_ffff) as usize;
        found.extend(ids[..count].iter().map(|id| (t, *id)));
    }
    found
}

/// Bad input: no pods' cgroup root → one line naming --cgroup-root, nothing created.
#[test]
fn agent_without_a_pods_cgroup_root_fails_cleanly() {
    if !ready() {
        return;
    }
    let _serial = serial();
    let scratch = Scratch::new("k8s-badroot");
    let pin_dir = format!("/sys/fs/bpf/sck8s-bad-{}", std::process::id());
    let out = output_with_timeout(
        Command::new(sidecar_bin()).args([
            "agent",
            "--cgroup-root",
            "/sys/fs/cgroup/unified/sck8s-does-not-exist",
            "--socket",
            &scratch.arg("agent.sock"),
            "--state-dir",
            &scratch.arg("state"),
            "--pin-dir",
            &pin_dir,
        ]),
        STEP,
    );
    let err = assert_one_line_error(&out);
    assert!(
        err.contains("--cgroup-root") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!Path::new(&pin_dir).exists());
    assert!(!scratch.path("state").exists() && !scratch.path("agent.sock").exists());
}

/// Bad input: restarting the agent with another --cgroup-root while its pins are attached at
/// the first one is refused in one line, and the pins stay as they were.
#[test]
fn agent_refuses_to_adopt_pins_attached_at_another_root() {
    let Some((_serial, node)) = setup("otherroot") else {
        return;
    };
    let mut agent = node.start_agent("agent-1");
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(STEP).success());
    let other = node.base.join("kubepods2");
    fs::create_dir_all(&other).unwrap();
    let mut args = vec!["agent".to_string()];
    args.extend(node.agent_args());
    let i = args.iter().position(|a| a == "--cgroup-root").unwrap();
    args[i + 1] = other.display().to_string();
    let out = output_with_timeout(Command::new(sidecar_bin()).args(&args), STEP);
    let err = assert_one_line_error(&out);
    assert!(
        err.contains("are attached at") && err.contains("--uninstall"),
        "{err}"
    );
    assert_eq!(
        attached_programs(&node.root).len(),
        4,
        "the pins were touched"
    );
    assert!(attached_programs(&other).is_empty());
}

/// A sidecar whose certificate names another service account refuses to start.
#[test]
fn proxy_refuses_a_certificate_of_another_service_account() {
    let Some((_serial, node)) = setup("identity") else {
        return;
    };
    let a = node.pod("a", NS_A, ADDR_A);
    let tls = node.certs(SERVER_ID, "tls-other");
    let mut proxy = node.start_proxy(&a, "proxy-a", "client", &[format!("--tls-dir={tls}")]);
    assert_eq!(proxy.wait(STEP).code(), Some(1));
    let err = proxy.stderr();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains(SERVER_ID) && errors[0].contains(CLIENT_ID),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// The registration socket under abuse. Ports: 32000–32099 (only ever registered, or bound
// on the host's loopback by `claim`).

/// `sidecar-testclient agent-ask` in `cgroup`: talks to the agent as a process of that pod.
fn agent_ask(node: &Node, name: &str, cgroup: &Path, args: &[String]) -> Proc {
    let mut argv = strings(&[CLIENT, "agent-ask", "--socket"]);
    argv.push(node.socket.display().to_string());
    argv.extend(args.iter().cloned());
    spawn(&node.scratch, name, Some(cgroup), None, &argv, &[])
}

/// A register request line for pod `uid` with `cidrs` exclusion CIDRs.
fn register_line(uid: &str, proxy_port: u16, cidrs: usize) -> String {
    let cidrs: Vec<String> = (0..cidrs)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        .collect();
    serde_json::json!({
        "op": "register",
        "pod_uid": uid,
        "proxy_port": proxy_port,
        "exclude_cidrs": cidrs,
    })
    .to_string()
}

/// The `answer`s an `agent-ask` printed, parsed.
fn answers(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| serde_json::from_str(l["answer"].as_str()?).ok())
        .collect()
}

/// A caller that starts a request and never finishes it is disconnected after the request
/// timeout, one pod cannot hold more than its share of connections, and meanwhile another
/// pod registers at once.
#[test]
fn silent_callers_are_disconnected_and_capped_per_pod_while_others_register() {
    let Some((_serial, node)) = setup("silent") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);

    // Pod A: 9 connections, each with half a request line.
    let mut stall = agent_ask(
        &node,
        "stall",
        &a.container("app"),
        &strings(&["--connections=9", r#"--partial={"op":"regis"#]),
    );
    // Pod B registers while A's connections hang.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut reg = agent_ask(
        &node,
        "register-b",
        &b.container("proxy"),
        &[format!("--line={}", register_line(&b.uid, 32001, 0))],
    );
    let out = reg.success(STEP);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answers(&out)[0]["ok"], true, "{out}");

    let out = stall.success(Duration::from_secs(30));
    let lines: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 9, "{out}");
    assert!(
        lines.iter().all(|l| l["closed"] == true),
        "a connection stayed open: {out}"
    );
    let reasons: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l["answer"].as_str().unwrap_or_default())
                .map(|a| a["reason"].clone())
                .unwrap_or(Value::Null)
        })
        .collect();
    // The 9th was refused at once (retry later), the 8 others timed out.
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "too_many_connections")
            .count(),
        1,
        "{out}"
    );
    assert_eq!(
        reasons.iter().filter(|r| *r == "timeout").count(),
        8,
        "{out}"
    );
    let slowest = lines
        .iter()
        .filter_map(|l| l["closed_after_secs"].as_f64())
        .fold(0.0, f64::max);
    assert!((4.0..12.0).contains(&slowest), "{out}");

    let status = node.status();
    assert_eq!(status["refusals"]["timeout"], 8, "{status:#}");
    assert_eq!(status["refusals"]["too_many_connections"], 1, "{status:#}");
    assert!(pod_status(&status, &b.uid).is_some(), "{status:#}");
}

/// Every pod the node can register gets its full exclusion quota: 17 pods with 64 CIDRs
/// each (more than the 1,024 one shared trie used to hold) all register; a pod asking more
/// than its quota is refused with the reason, for good (not retried), and the others keep
/// theirs.
#[test]
fn cidr_quotas_are_per_pod_and_cannot_starve_other_pods() {
    let Some((_serial, node)) = setup("quota") else {
        return;
    };
    let _agent = node.start_agent("agent");
    for i in 0..17u16 {
        let pod = node.pod(&format!("{:x}", i + 1), NS_A, ADDR_A);
        let mut reg = agent_ask(
            &node,
            &format!("register-{i}"),
            &pod.container("proxy"),
            &[format!("--line={}", register_line(&pod.uid, 32002, 64))],
        );
        let out = reg.success(STEP);
        assert_eq!(answers(&out)[0]["ok"], true, "pod {i}: {out}");
    }
    assert_eq!(excluded_cidrs(&node), 17 * 64);

    let greedy = node.pod("ee", NS_A, ADDR_A);
    let mut reg = agent_ask(
        &node,
        "greedy",
        &greedy.container("proxy"),
        &[format!("--line={}", register_line(&greedy.uid, 32003, 65))],
    );
    let out = reg.success(STEP);
    let answer = &answers(&out)[0];
    assert_eq!(answer["ok"], false, "{out}");
    assert_eq!(answer["reason"], "over_quota", "{out}");
    assert!(answer.get("retry").is_none(), "{out}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 64 CIDRs per pod")),
        "{out}"
    );
    assert_eq!(
        excluded_cidrs(&node),
        17 * 64,
        "the refused pod left entries"
    );
    let status = node.status();
    assert_eq!(status["pods"].as_array().map(Vec::len), Some(17));
    assert_eq!(status["refusals"]["over_quota"], 1, "{status:#}");
}

/// A refusal that is the node's condition, not the pod's (here: the pod's connection cap is
/// held by another process of the pod), is retried by the sidecar, which says why and stays
/// up; it registers as soon as the condition clears.
#[test]
fn sidecar_retries_a_refusal_marked_retry_instead_of_exiting() {
    let Some((_serial, node)) = setup("retry") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let proxy_cg = a.container("proxy");
    // 8 registered (hence idle-allowed) connections: pod A's whole share.
    let mut holder = agent_ask(
        &node,
        "holder",
        &proxy_cg,
        &[
            "--connections=8".into(),
            format!("--line={}", register_line(&a.uid, 32010, 0)),
            "--hold".into(),
        ],
    );
    holder.wait_for_stdout("READY", STEP);

    let mut proxy = node.claim("proxy-a", &proxy_cg, None, 32010, &a.uid);
    assert!(
        wait_until(STEP, || proxy
            .stderr()
            .contains("the agent cannot register this pod now")),
        "{}",
        proxy.stderr()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the sidecar exited on a retryable refusal:\n{}",
        proxy.stderr()
    );
    assert!(
        proxy.stderr().contains("too_many_connections")
            || proxy.stderr().contains("registration connections open"),
        "{}",
        proxy.stderr()
    );

    holder.release();
    holder.success(STEP);
    assert!(
        wait_until(STEP, || pod_status(&node.status(), &a.uid)
            .is_some_and(|p| p["registrations"].as_u64() > Some(8))),
        "the sidecar never registered:\n{}",
        proxy.stderr()
    );
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait(STEP).success(), "{}", proxy.stderr());
}

/// Starts `argv` with pid `pid` in `cgroup` (clone3 with `set_tid` and `CLONE_INTO_CGROUP`):
/// a process of another pod that now holds a pid someone else connected with.
fn spawn_with_pid(pid: u32, cgroup: &Path, argv: &[&str]) -> u32 {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let dir = fs::File::open(cgroup).expect("cgroup directory");
    let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let tid = [libc::pid_t::try_from(pid).unwrap()];
    let clone = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        cgroup: std::os::fd::AsRawFd::as_raw_fd(&dir) as u64,
        ..CloneArgs::default()
    };
    // SAFETY: the child only calls execv (on memory prepared before) and _exit.
    let rc = unsafe {
        let rc = libc::syscall(
            libc::SYS_clone3,
            &raw const clone,
            std::mem::size_of::<CloneArgs>(),
        );
        if rc == 0 {
            libc::execv(ptrs[0], ptrs.as_ptr());
            libc::_exit(127);
        }
        rc
    };
    assert!(
        rc > 0,
        "clone3 with pid {pid}: {}",
        std::io::Error::last_os_error()
    );
    rc as u32
}

/// A connection passed on by the process that opened it is judged by that process, not by
/// whoever holds its pid later: once it exited and its pid went to a process in pod B,
/// requests on the connection are refused as coming from a process that is gone, and no
/// answer names pod B.
#[test]
fn requests_after_the_caller_exited_are_refused_even_when_its_pid_is_reused() {
    let Some((_serial, node)) = setup("pidreuse") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);

    // A process of pod A connects (one request, so the agent has accepted and pinned it),
    // hands the connection to its child and exits.
    let mut opener = agent_ask(
        &node,
        "opener",
        &a.container("app"),
        &strings(&[r#"--line={"op":"deregister"}"#, "--orphan"]),
    );
    let pid = opener.pid();
    opener.wait_for_stdout("HANDED", STEP);
    assert!(opener.wait(STEP).success(), "{}", opener.stderr());

    // Its pid now belongs to a process in pod B's sidecar container.
    let reused = spawn_with_pid(pid, &b.container("proxy"), &["/bin/sleep", "60"]);
    assert_eq!(reused, pid);
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&b.uid), "{cgroup}");

    let stdin = opener.child.stdin.as_mut().unwrap();
    writeln!(stdin, "{}", register_line(&b.uid, 32020, 0)).unwrap();
    writeln!(stdin, "{}", register_line(&a.uid, 32020, 0)).unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_until(STEP, || answers(&opener.stdout()).len() == 3),
        "{}",
        opener.stdout()
    );
    let out = opener.stdout();
    let got = answers(&out);
    for answer in &got[1..] {
        assert_eq!(answer["ok"], false, "{out}");
        assert_eq!(answer["reason"], "process_gone", "{out}");
    }
    assert!(
        got.iter().all(|g| !g["error"].to_string().contains(&b.uid)),
        "a refusal named the pod that holds the pid now: {out}"
    );
    let status = node.status();
    assert_eq!(
        status["pods"].as_array().map(Vec::len),
        Some(0),
        "{status:#}"
    );
    assert!(node.workloads().is_empty(), "{:?}", node.workloads());
    host::signal(reused, libc::SIGKILL);
    // SAFETY: our own child.
    unsafe { libc::waitpid(reused as libc::pid_t, std::ptr::null_mut(), 0) };
}

/// Kernel pass-through for pods: a plaintext connection from a pod without a policy goes
/// straight to its destination (the server sees the app's own socket), the agent records it,
/// and the pod's own sidecar (unprivileged) gets the record: its `/metrics` count it with the
/// bytes; the other pod's sidecar sees none of it.
#[test]
fn pods_pass_plaintext_through_and_see_only_their_own_records() {
    let Some((_serial, node)) = setup("passthrough") else {
        return;
    };
    let _agent = node.start_agent("agent");
    let a = node.pod("a", NS_A, ADDR_A);
    let b = node.pod("b", NS_B, ADDR_B);
    let log_a = node.log_file("access-a.log");
    let proxy_a = node.start_proxy_passthrough(
        &a,
        "proxy-a",
        &[format!("--access-log={}", log_a.display())],
    );
    let proxy_b = node.start_proxy_passthrough(&b, "proxy-b", &[]);
    node.wait_ready(&a, &proxy_a);
    node.wait_ready(&b, &proxy_b);
    let status = node.status();
    for pod in [&a, &b] {
        let reg = pod_status(&status, &pod.uid).expect("registered");
        assert_eq!(reg["passthrough"], true, "{reg}");
    }
    let flags = node.workloads()[&host_cgroup_id(&a.cgroup)].flags;
    assert_ne!(
        flags & sidecar_common::flags::PASSTHROUGH,
        0,
        "flags {flags:#x}"
    );

    let server = node.server(&b);
    let mut client = node.app(&a, "client", &echo_args(3000, 2));
    let out = client.success(STEP);
    let lines: Vec<EchoLine> = stdout_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");
    // Direct: the server's peers are the app's own sockets, not the proxy's.
    let mut apps: Vec<String> = lines
        .iter()
        .map(|l| l.local.expect("local").to_string())
        .collect();
    let mut peers: Vec<String> = server
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["peer"].as_str().map(String::from))
        .collect();
    apps.sort();
    peers.sort();
    assert_eq!(peers, apps, "the server saw the apps themselves");

    // Pod A's sidecar records both, from the agent's stream, with the bytes.
    let closed =
        r#"sidecar_connections_closed_total{direction="outbound",path="passthrough",reason="ok"}"#;
    assert!(
        wait_until(STEP, || node
            .admin(&a, "/metrics")
            .1
            .contains(&format!("{closed} 2"))),
        "pod A's sidecar never counted its 2 pass-through connections:\n{}\n{}",
        node.admin(&a, "/metrics").1,
        proxy_a.stderr()
    );
    let metrics_a = node.admin(&a, "/metrics").1;
    for series in [
        r#"sidecar_sent_bytes_total{direction="outbound",path="passthrough"} 6000"#,
        r#"sidecar_received_bytes_total{direction="outbound",path="passthrough"} 6000"#,
    ] {
        assert!(metrics_a.contains(series), "{series}:\n{metrics_a}");
    }
    assert!(wait_until(STEP, || access_lines(&log_a).len() == 2));
    for l in access_lines(&log_a) {
        assert_eq!(l["path"], "passthrough", "{l}");
        assert_eq!(l["bytes_sent"], 3000, "{l}");
        assert_eq!(l["original_dst"], format!("{ADDR_B}:{APP_PORT}"), "{l}");
    }
    // Pod B's sidecar saw none of pod A's records.
    let metrics_b = node.admin(&b, "/metrics").1;
    assert!(
        metrics_b.contains(&format!("{closed} 0")),
        "pod B's sidecar got pod A's records:\n{metrics_b}"
    );
    let delivered = node.status()["passthrough_records"]["delivered"].as_u64();
    assert!(delivered >= Some(2), "{:#}", node.status());
}
