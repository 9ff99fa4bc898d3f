//! A simulated Kubernetes node: `sidecar agent` and unprivileged `sidecar proxy` processes
//! against the real kernel, without Kubernetes. The `kubernetes_*` tests share it, so each of
//! their files holds only the tests of one feature.
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
//! exec, [`spawn`]) and its network namespace (`nsenter --net`); the proxies then drop to
//! `nobody` with no capabilities at all (`setpriv`), so everything they do is what an
//! unprivileged sidecar container can do. Every cgroup, netns, pin and process is removed on
//! drop, also when a test fails.
//!
//! The node's ports come from [`crate::ports`] when it is built ([`Node::proxy_port`] and the
//! others). Each pod has its own network namespace, so every sidecar of the node uses the same
//! ports, as every pod of a Deployment would.
//!
//! Files: [`proc`] (processes in a pod), [`net`] (the pods' namespaces and veth),
//! [`kernel`] (pinned maps, cgroup ids and teardown), [`two_pods`](mod@two_pods) (the
//! two-pod mTLS setting).

pub mod kernel;
pub mod net;
pub mod proc;
pub mod shipped;
pub mod two_pods;

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

pub use kernel::{collect_dirs, excluded_cidrs, host_cgroup_id, policy_entries, rmdir_retrying};
pub use net::{ADDR_A, ADDR_B, NS_A, NS_B, Net};
pub use proc::{Proc, spawn};
pub use two_pods::{TwoPods, two_pods};

use crate::{
    host::{self, output_with_timeout, wait_until},
    protocol::parse_lines,
    scratch::Scratch,
    serial, sidecar_bin, skip, testclient_bin,
};

/// The trust domain of the node's certificates.
pub const TD: &str = "cluster.local";
/// The identity of pod A's sidecar (service account `client`) in [`TwoPods`].
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// The identity of pod B's sidecar (service account `server`).
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
/// How long one step of a test may take (a process to exit, a sidecar to turn ready).
pub const STEP: Duration = Duration::from_secs(15);
/// Until a starting agent answers on its socket. An agent that finds pins it cannot tie to
/// its state (a lost state directory) upgrades them in place, verifying every program again:
/// 13 s of that in a one-vCPU TCG guest of the kernel matrix (6.18), on top of the start.
pub const AGENT_START: Duration = Duration::from_secs(60);

/// Whether the node can be simulated here: [`crate::privileged`] and the tools it uses. When
/// not, [`skip`] has said why (and panicked in CI).
pub fn ready() -> bool {
    if !crate::privileged() {
        return false;
    }
    for tool in ["nsenter", "setpriv", "curl", "ip"] {
        if host::which(tool).is_none() {
            return skip(&format!("{tool} is not installed (.ci/run installs it)"));
        }
    }
    true
}

/// The start of a test: the tools ([`ready`]), the privileged tests' lock, then a fresh node
/// called `name` (dropped before the lock is released). `None`: the test is skipped.
pub fn setup(name: &str) -> Option<(crate::Serial, Node)> {
    if !ready() {
        return None;
    }
    let serial = serial();
    Some((serial, Node::new(name)))
}

/// The JSON lines ([`crate::protocol`]) of a finished app's stdout.
pub fn stdout_lines<T: serde::de::DeserializeOwned>(out: &str) -> Vec<T> {
    parse_lines(&out.lines().map(String::from).collect::<Vec<_>>())
}

/// `&str`s as the owned argv pieces [`spawn`] takes.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The records of a sidecar's JSON access log so far.
pub fn access_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Pod `uid`'s entry in the agent's `--status --json` document, if it is registered.
pub fn pod_status<'a>(status: &'a Value, uid: &str) -> Option<&'a Value> {
    status["pods"]
        .as_array()?
        .iter()
        .find(|p| p["pod_uid"] == uid)
}

/// One register request for pod `uid` from this test process (outside every pod), straight
/// on the node's agent socket; the agent's reply.
pub fn raw_register(node: &Node, uid: &str) -> Value {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(&node.socket).expect("agent socket");
    s.set_read_timeout(Some(STEP)).unwrap();
    writeln!(
        s,
        r#"{{"op":"register","pod_uid":"{uid}","proxy_port":{}}}"#,
        node.proxy_port
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).expect("a JSON reply")
}

/// A pod of the node: its cgroup under `kubepods/burstable` and the network namespace its
/// processes enter.
pub struct Pod {
    pub uid: String,
    pub ns: &'static str,
    pub addr: &'static str,
    pub cgroup: PathBuf,
}

impl Pod {
    /// The container cgroup `name` of the pod, created if missing (as a runtime does before
    /// it starts the container).
    pub fn container(&self, name: &str) -> PathBuf {
        let p = self.cgroup.join(name);
        fs::create_dir_all(&p).expect("container cgroup");
        p
    }
}

/// The simulated node: its cgroups, pins, agent socket and state, the pods' network, and the
/// ports every sidecar of the node uses. Everything is removed on drop.
pub struct Node {
    /// Where the processes' output, certificates and logs go (readable by `nobody`).
    pub scratch: Scratch,
    /// `<cgroup2>/sck8s-<pid>`: everything of this node's cgroups.
    pub base: PathBuf,
    /// The pods' root (`--cgroup-root`).
    pub root: PathBuf,
    pub pin_dir: PathBuf,
    /// The agent's registration socket.
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Every pod sidecar's `--proxy-port`, in its pod's namespace.
    pub proxy_port: u16,
    /// Every pod sidecar's admin server, on 127.0.0.1 of its pod's namespace.
    pub admin_port: u16,
    /// Every pod sidecar's `--inbound-port` (where peers' mTLS tunnels arrive).
    pub tunnel_port: u16,
    /// The app port of [`Node::server`] in pod B.
    pub app_port: u16,
    _net: Net,
}

impl Node {
    /// A fresh node for test `name`: what an earlier crashed run of this process id left is
    /// removed first.
    pub fn new(name: &str) -> Self {
        let cg2 = crate::cgroup2_root().expect("cgroup2");
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
            proxy_port: crate::ports::take(),
            admin_port: crate::ports::take(),
            tunnel_port: crate::ports::take(),
            app_port: crate::ports::take(),
            _net: Net::create(),
        };
        node.teardown_kernel_state();
        fs::create_dir_all(node.root.join("burstable")).expect("kubepods cgroups");
        node
    }

    /// A new pod (its UID starting with `tag`) in network namespace `ns` with address `addr`.
    pub fn pod(&self, tag: &str, ns: &'static str, addr: &'static str) -> Pod {
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

    /// The arguments that make `sidecar agent` this node's agent.
    pub fn agent_args(&self) -> Vec<String> {
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
    pub fn start_agent(&self, name: &str) -> Proc {
        self.start_agent_in(name, None, &[], &[])
    }

    /// The agent in `cgroup`, behind `wrapper` (e.g. `unshare --cgroup`), with `extra`
    /// arguments after [`Node::agent_args`].
    pub fn start_agent_in(
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

    /// `sidecar agent --status --json`, if an agent answers.
    pub fn try_status(&self) -> Option<Value> {
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

    /// [`Node::try_status`], which must answer.
    pub fn status(&self) -> Value {
        self.try_status().expect("agent status")
    }

    /// One of the agent's node-wide eBPF counters.
    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("counter {name}"))
    }

    /// mTLS credentials for `id`, readable by the unprivileged sidecar.
    pub fn certs(&self, id: &str, dir: &str) -> String {
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
    pub fn log_file(&self, name: &str) -> PathBuf {
        let path = self.scratch.path(name);
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        path
    }

    /// The sidecar binary as `nobody` can execute it (see [`Node::for_nobody`]).
    pub fn unprivileged_bin(&self) -> PathBuf {
        self.for_nobody(sidecar_bin())
    }

    /// `bin` as any user can execute it: in place if every directory above it lets others
    /// through (a checkout under `/root` does not), else a copy in the scratch directory.
    pub fn for_nobody(&self, bin: PathBuf) -> PathBuf {
        let reachable = bin.ancestors().all(|p| {
            p.as_os_str().is_empty()
                || fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
        });
        if reachable {
            return bin;
        }
        let name = bin.file_name().expect("a binary's file name");
        let copy = self.scratch.path("bin").join(name);
        if !copy.exists() {
            fs::create_dir_all(copy.parent().unwrap()).unwrap();
            fs::copy(&bin, &copy).expect("copying a binary for nobody");
            fs::set_permissions(copy.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
            fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }

    /// `sidecar proxy` in the pod's `proxy` container, as nobody with no capabilities.
    pub fn start_proxy(&self, pod: &Pod, name: &str, sa: &str, extra: &[String]) -> Proc {
        self.start_proxy_in(pod, "proxy", name, sa, extra)
    }

    /// [`Node::start_proxy`] in container cgroup `container` of the pod (a restarted
    /// container gets a new cgroup, as with a real runtime). With `--proxy-all`: these tests
    /// are about the proxied path; kernel pass-through has its own
    /// ([`Node::start_proxy_passthrough`]).
    pub fn start_proxy_in(
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
    pub fn start_proxy_passthrough(&self, pod: &Pod, name: &str, extra: &[String]) -> Proc {
        self.spawn_proxy(pod, "proxy", name, "default", extra)
    }

    /// [`Node::start_proxy_passthrough`] in container cgroup `container` of the pod (a
    /// restarted sidecar).
    pub fn start_proxy_passthrough_in(
        &self,
        pod: &Pod,
        container: &str,
        name: &str,
        extra: &[String],
    ) -> Proc {
        self.spawn_proxy(pod, container, name, "default", extra)
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
            format!("--proxy-port={}", self.proxy_port),
            format!("--admin-addr=127.0.0.1:{}", self.admin_port),
            format!("--inbound-port={}", self.tunnel_port),
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
    pub fn claim(
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
    pub fn readyz(&self, pod: &Pod) -> u16 {
        self.admin(pod, "/readyz").0
    }

    /// GET `path` from the admin server of the sidecar in `pod`: HTTP status (0 if nothing
    /// answers) and body.
    pub fn admin(&self, pod: &Pod, path: &str) -> (u16, String) {
        self.admin_on(pod, self.admin_port, path)
    }

    /// GET `path` from port `port` of 127.0.0.1 in `pod`'s network namespace: HTTP status (0
    /// if nothing answers) and body.
    pub fn admin_on(&self, pod: &Pod, port: u16, path: &str) -> (u16, String) {
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
                    &format!("http://127.0.0.1:{port}{path}"),
                ]),
            STEP,
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Waits until the sidecar `proxy` of `pod` answers `/readyz` with 200.
    pub fn wait_ready(&self, pod: &Pod, proxy: &Proc) {
        assert!(
            wait_until(STEP, || self.readyz(pod) == 200),
            "{} never became ready\n{}",
            proxy.name,
            proxy.stderr()
        );
    }

    /// The test client (`sidecar-testclient`) in the pod's `app` container.
    pub fn app(&self, pod: &Pod, name: &str, args: &[String]) -> Proc {
        let mut argv = vec![testclient_bin().display().to_string()];
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

    /// An echo server on [`Node::app_port`] in `pod` (pod B in the tests); returns once it
    /// listens.
    pub fn server(&self, pod: &Pod) -> Proc {
        let server = self.app(
            pod,
            "server",
            &["serve".into(), format!("--addr=0.0.0.0:{}", self.app_port)],
        );
        server.wait_for_stdout("READY", STEP);
        server
    }

    /// Kills every process in `cgroup` and the cgroups below it, and waits until they are
    /// empty.
    pub fn kill_all(&self, cgroup: &Path) {
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
            let _ = rmdir_retrying(d);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown_kernel_state();
    }
}
