//! Istio's ztunnel as the reference HBONE peer of the interop tests
//! (`tests/tests/ztunnel_interop.rs`): one ztunnel in dedicated mode per pod of a
//! [`PodPair`](crate::netns::PodPair), serving that pod's workload like a sidecar, with no
//! cluster and no control plane. Facts this relies on (checked by hand against the binary in
//! `../shared/interop/ztunnel/`, source commit `62d82653`; details in `tests/ztunnel-notes.md`):
//!
//! - it knows only the workloads of its `local.yaml` ([`LocalConfig`]), read ONCE at start (no
//!   reload without a control plane), and checks a peer's certificate against exactly the
//!   identity `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>` listed there;
//! - `FAKE_CA=true` issues its own certificate from its test CA (`ca.pem`/`ca-key.pem` next to
//!   the binary); ours come from the same CA ([`issue`]);
//! - fixed ports inside its namespace: 15001 outbound, 15006 inbound plaintext, 15008 HBONE,
//!   15000 admin (loopback), 15020 metrics, 15021 readiness, 15053 DNS (loopback). The test's
//!   namespaces are private, so nothing collides with the host or another test;
//! - it logs to **stdout** (`<time>\t<level>\t<target>\t<message>\t<k=v …>`); a configuration
//!   error ends it at once with `Error: …` on stderr. Both are captured ([`Ztunnel::lines`]);
//! - one access line (`target` `access`) per connection when it ends ([`AccessLine`]):
//!   `info … connection complete` or, failed, `error … connection complete … error="…"`; a
//!   connection refused before the CONNECT is parsed is `warn … connection failed`;
//! - ready (`/healthz/ready` 200 on 15021) 10–25 ms after start; on SIGTERM it drains (its
//!   own deadline is 5 s) and exits with status 0, within ~50 ms in these tests.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    host::{self, wait_child},
    netns::Netns,
    run::Captured,
    scratch::Scratch,
    skip,
};

/// The trust domain of ztunnel's test CA (and of every identity here).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The Kubernetes namespace of every workload of the tests.
pub const NAMESPACE: &str = "default";
/// The packet mark ztunnel puts on its own sockets (`PACKET_MARK`), which the redirect rule
/// leaves alone.
pub const PACKET_MARK: u32 = 1337;
/// ztunnel's HBONE port.
pub const HBONE_PORT: u16 = 15008;
/// Where the redirect rule sends a pod's outbound TCP.
pub const OUTBOUND_PORT: u16 = 15001;
const READINESS_PORT: u16 = 15021;
const METRICS_PORT: u16 = 15020;

/// How long ztunnel may take to report ready (it takes ~10 ms).
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long Drop and [`Ztunnel::stop`] wait after SIGTERM before SIGKILL (ztunnel's own
/// drain deadline is 5 s).
const TERM_GRACE: Duration = Duration::from_secs(10);
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// `spiffe://cluster.local/ns/default/sa/<service_account>`.
pub fn identity(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// `../shared/interop/ztunnel/` next to the workspace: the binary, its test CA and its README.
/// `ZTUNNEL_DIR` overrides it.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ZTUNNEL_DIR") {
        return d.into();
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf();
    workspace.join("../shared/interop/ztunnel")
}

/// The ztunnel binary.
pub fn binary() -> PathBuf {
    dir().join("ztunnel")
}

/// The directory of ztunnel's test CA (`ca.pem`, `ca-key.pem`), for `sidecar cert issue`.
pub fn ca_dir() -> PathBuf {
    dir()
}

/// Whether the ztunnel binary and its CA are there; if not, [`skip`] says so (which panics
/// with `CI` set: an interop suite that silently skips proves nothing).
pub fn available() -> bool {
    let missing: Vec<String> = [
        binary(),
        ca_dir().join("ca.pem"),
        ca_dir().join("ca-key.pem"),
    ]
    .into_iter()
    .filter(|p| !p.is_file())
    .map(|p| p.display().to_string())
    .collect();
    missing.is_empty()
        || skip(&format!(
            "ztunnel is missing ({}): it is provided in ../shared/interop/ztunnel/ beside the \
             checkout (or set ZTUNNEL_DIR)",
            missing.join(", ")
        ))
}

/// Issues our sidecar's certificate for `service_account` from ztunnel's CA into directory
/// `out` of `scratch` (`cert.pem`, `key.pem`, `bundle.pem`: a `--tls-dir`); returns its path.
pub fn issue(scratch: &Scratch, service_account: &str, out: &str) -> String {
    let (ca, out) = (ca_dir().display().to_string(), scratch.arg(out));
    scratch.sidecar(&[
        "cert",
        "issue",
        "--ca-dir",
        &ca,
        "--spiffe-id",
        &identity(service_account),
        "--out",
        &out,
    ]);
    out
}

/// One workload ztunnel knows: `name` is also its service account.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    pub ip: IpAddr,
}

/// A `Deny` authorization policy of namespace `default` (ztunnel enforces policies on its
/// inbound side only: on HBONE streams to the workload it serves).
#[derive(Debug, Clone)]
pub struct DenyPolicy {
    pub name: String,
    /// Full SPIFFE IDs; empty: any peer.
    pub principals: Vec<String>,
    /// Destination ports (the `:authority`'s); empty: any port.
    pub ports: Vec<u16>,
}

/// ztunnel's `LOCAL_XDS_PATH` file: workloads (all `protocol: HBONE`) and policies.
#[derive(Debug, Clone, Default)]
pub struct LocalConfig {
    pub workloads: Vec<Workload>,
    pub denies: Vec<DenyPolicy>,
}

impl LocalConfig {
    /// The usual pair: `client` at pod A's address, `server` at pod B's.
    pub fn pods(pods: &crate::netns::PodPair) -> Self {
        Self::default()
            .workload("client", pods.a.addr)
            .workload("server", pods.b.addr)
    }

    pub fn workload(mut self, name: &str, ip: IpAddr) -> Self {
        self.workloads.push(Workload {
            name: name.into(),
            ip,
        });
        self
    }

    /// A deny of streams from `principals` (SPIFFE IDs; empty: anyone) to `ports`.
    pub fn deny(mut self, name: &str, principals: &[&str], ports: &[u16]) -> Self {
        self.denies.push(DenyPolicy {
            name: name.into(),
            principals: principals.iter().map(|p| p.to_string()).collect(),
            ports: ports.to_vec(),
        });
        self
    }

    /// The YAML ztunnel reads (`xds::LocalConfig`; every table is `deny_unknown_fields`).
    /// A policy is `rules: [[[match]]]` (rules OR, clauses AND, matches OR); principals are
    /// `StringMatch` enums, written with a YAML tag (`!Exact`) and without `spiffe://`.
    pub fn yaml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let mut y = String::from("workloads:\n");
        for w in &self.workloads {
            let uid = format!("cluster1//v1/Pod/{NAMESPACE}/{}", w.name);
            let _ = write!(
                y,
                "- uid: {}\n  name: {}\n  namespace: {NAMESPACE}\n  trustDomain: {TRUST_DOMAIN}\n  \
                 serviceAccount: {}\n  workloadIps: [{}]\n  protocol: HBONE\n  node: {}\n  \
                 network: \"\"\n  services: {{}}\n",
                q(&uid),
                q(&w.name),
                q(&w.name),
                q(&w.ip.to_string()),
                q(&w.name),
            );
        }
        if self.denies.is_empty() {
            y.push_str("policies: []\n");
        } else {
            y.push_str("policies:\n");
        }
        for d in &self.denies {
            let _ = write!(
                y,
                "- name: {}\n  namespace: {NAMESPACE}\n  scope: Namespace\n  action: Deny\n  \
                 dryRun: false\n  rules:\n  - - - ",
                q(&d.name)
            );
            let mut fields = Vec::new();
            if !d.principals.is_empty() {
                let list: Vec<String> = d
                    .principals
                    .iter()
                    .map(|p| format!("!Exact {}", q(p.strip_prefix("spiffe://").unwrap_or(p))))
                    .collect();
                fields.push(format!("principals: [{}]", list.join(", ")));
            }
            if !d.ports.is_empty() {
                let list: Vec<String> = d.ports.iter().map(u16::to_string).collect();
                fields.push(format!("destinationPorts: [{}]", list.join(", ")));
            }
            assert!(
                !fields.is_empty(),
                "an empty match never matches in ztunnel"
            );
            let _ = writeln!(y, "{}", fields.join("\n        "));
        }
        y.push_str("services: []\n");
        y
    }
}

/// Log lines start with their time: the multi-line config dump at start and a backtrace are
/// kept in the capture but not echoed.
fn is_log_line(line: &str) -> bool {
    line.starts_with(|c: char| c.is_ascii_digit()) || line.starts_with("Error")
}

/// One access-log line: `<time>\t<level>\taccess\t<message>\t<k=v k="v w" …>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    /// `info`, `warn` or `error`.
    pub level: String,
    /// `connection complete` or `connection failed`.
    pub message: String,
    /// `src.addr`, `src.identity`, `dst.addr`, `dst.hbone_addr`, `dst.identity`,
    /// `direction` (`inbound`/`outbound`), `bytes_sent`, `bytes_recv`, `duration`, `error`…
    /// Quotes removed.
    pub fields: BTreeMap<String, String>,
}

impl AccessLine {
    pub fn parse(line: &str) -> Option<Self> {
        let mut parts = line.splitn(5, '\t');
        let (_time, level, target) = (parts.next()?, parts.next()?, parts.next()?);
        if target != "access" {
            return None;
        }
        let message = parts.next()?.to_string();
        let fields = parse_fields(parts.next().unwrap_or(""));
        Some(Self {
            level: level.to_string(),
            message,
            fields,
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    pub fn direction(&self) -> Option<&str> {
        self.get("direction")
    }

    pub fn error(&self) -> Option<&str> {
        self.get("error")
    }

    pub fn ok(&self) -> bool {
        self.error().is_none() && self.message == "connection complete"
    }

    /// `bytes_sent`/`bytes_recv` as numbers (0 if absent).
    pub fn bytes(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// `k=v k="quoted \" value" …` → map, quotes and escapes removed.
fn parse_fields(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key, value);
    }
    out
}

/// Options of one ztunnel, built fluently.
#[must_use]
pub struct Builder<'a> {
    ns: &'a Netns,
    workload: String,
    config: LocalConfig,
    redirect: bool,
    env: Vec<(String, String)>,
}

impl Builder<'_> {
    /// The workloads and policies it knows (default: none, which it refuses to serve).
    pub fn config(mut self, config: &LocalConfig) -> Self {
        self.config = config.clone();
        self
    }

    /// Send the namespace's outbound TCP (except loopback and ztunnel's own, marked, sockets)
    /// to ztunnel's 15001 with an iptables REDIRECT rule, removed again on drop (and with the
    /// namespace anyway).
    pub fn redirect_outbound(mut self) -> Self {
        self.redirect = true;
        self
    }

    /// An extra environment variable (e.g. `RUST_LOG=debug`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Writes `ztunnel-<workload>.yaml` into `scratch`, starts ztunnel in the namespace and
    /// waits until it is ready. Panics (with its output) if it exits or is not ready in time.
    pub fn start(self, scratch: &Scratch) -> Ztunnel {
        let config = scratch.write(
            &format!("ztunnel-{}.yaml", self.workload),
            &self.config.yaml(),
        );
        let redirect = self.redirect.then(|| redirect_rule(self.ns));
        let enter = self.ns.enter();
        let mut cmd = Command::new(&enter[0]);
        cmd.args(&enter[1..])
            .arg(binary())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("FAKE_CA", "true")
            .env("LOCAL_XDS_PATH", &config)
            .env("XDS_ADDRESS", "")
            .env("PROXY_MODE", "dedicated")
            .env(
                "PROXY_WORKLOAD_INFO",
                format!("{NAMESPACE}/{0}/{0}", self.workload),
            )
            .env("ENABLE_ORIG_SRC", "false")
            .env("PACKET_MARK", PACKET_MARK.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        // nsenter (network namespace only) execs the program: this pid is ztunnel's.
        let pid = child.id();
        eprintln!(
            "started ztunnel pid {pid} in {} for {}",
            self.ns.name, self.workload
        );
        let out = Arc::new(Captured::default());
        let label = format!("ztunnel {} {}", self.ns.name, self.workload);
        out.spawn_reader(
            child.stdout.take().expect("piped"),
            label.clone(),
            is_log_line,
        );
        out.spawn_reader(child.stderr.take().expect("piped"), label, is_log_line);
        let mut zt = Ztunnel {
            child,
            pid,
            ns_path: self.ns.path(),
            ns_name: self.ns.name.clone(),
            out,
            redirect,
            status: None,
        };
        zt.wait_ready(READY_TIMEOUT);
        zt
    }
}

/// The iptables rule of [`Builder::redirect_outbound`], as `-A`/`-D` arguments follow it.
const REDIRECT_RULE: &[&str] = &[
    "OUTPUT",
    "-p",
    "tcp",
    "!",
    "-o",
    "lo",
    "-m",
    "mark",
    "!",
    "--mark",
    "0x539/0xfff",
    "-j",
    "REDIRECT",
    "--to-ports",
    "15001",
];

fn redirect_rule(ns: &Netns) -> Vec<String> {
    debug_assert_eq!(PACKET_MARK, 0x539);
    debug_assert_eq!(OUTBOUND_PORT.to_string(), REDIRECT_RULE[14]);
    let mut argv = vec!["iptables", "-w", "-t", "nat", "-A"];
    argv.extend(REDIRECT_RULE);
    let out = ns.run(&argv);
    assert!(
        out.status.success(),
        "iptables in {}: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    REDIRECT_RULE.iter().map(|s| s.to_string()).collect()
}

/// A ztunnel running in a pod's network namespace. Stopped (SIGTERM, then SIGKILL) on drop,
/// and its redirect rule removed, whatever the test did.
pub struct Ztunnel {
    child: Child,
    pid: u32,
    ns_path: PathBuf,
    ns_name: String,
    out: Arc<Captured>,
    redirect: Option<Vec<String>>,
    status: Option<ExitStatus>,
}

/// What a stopped ztunnel left.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    pub lines: Vec<String>,
}

impl Stopped {
    pub fn access(&self) -> Vec<AccessLine> {
        self.lines
            .iter()
            .filter_map(|l| AccessLine::parse(l))
            .collect()
    }
}

impl Ztunnel {
    /// A ztunnel in `ns` serving workload `workload` (namespace `default`, service account
    /// `workload`), which the config must list.
    pub fn builder<'a>(ns: &'a Netns, workload: &str) -> Builder<'a> {
        Builder {
            ns,
            workload: workload.into(),
            config: LocalConfig::default(),
            redirect: false,
            env: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Every line so far (stdout and stderr).
    pub fn lines(&self) -> Vec<String> {
        self.out.lines()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The access-log lines so far.
    pub fn access(&self) -> Vec<AccessLine> {
        self.lines()
            .iter()
            .filter_map(|l| AccessLine::parse(l))
            .collect()
    }

    /// Waits (bounded) until at least `count` access lines satisfy `pred`; returns them all
    /// (also when the wait timed out: the caller's assertion shows what there was).
    pub fn wait_access(
        &self,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&AccessLine) -> bool,
    ) -> Vec<AccessLine> {
        self.out.wait(timeout, |lines, closed| {
            closed
                || lines
                    .iter()
                    .filter_map(|l| AccessLine::parse(l))
                    .filter(|a| pred(a))
                    .count()
                    >= count
        });
        self.access().into_iter().filter(|a| pred(a)).collect()
    }

    /// GETs `path` on `port` at 127.0.0.1 in its namespace; `None` if nothing answered.
    fn get(&self, port: u16, path: &str) -> Option<String> {
        let ns = std::fs::File::open(&self.ns_path).ok()?;
        let path = path.to_string();
        thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an fd we own, for this thread only (it ends right after).
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let timeout = Duration::from_secs(2);
            let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
            s.set_read_timeout(Some(timeout)).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut raw = String::new();
            s.read_to_string(&mut raw).ok()?;
            Some(raw)
        })
        .join()
        .ok()
        .flatten()
    }

    /// Its Prometheus metrics (port 15020), e.g. `istio_tcp_connections_failed_total{…,
    /// response_flags="DENY",…}` for streams its policy refused.
    pub fn metrics(&self) -> String {
        self.get(METRICS_PORT, "/metrics")
            .unwrap_or_else(|| panic!("ztunnel {} metrics did not answer", self.pid))
    }

    /// The sum of `metric`'s series whose labels contain every one of `labels`
    /// (`key="value"` strings).
    pub fn metric_sum(&self, metric: &str, labels: &[&str]) -> u64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} "))
            })
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Polls `/healthz/ready` until it answers 200. Panics, with the output, if ztunnel exits
    /// (e.g. a local.yaml it refuses) or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let started = Instant::now();
        let ready = host::wait_until(timeout, || {
            self.out.closed()
                || self
                    .get(READINESS_PORT, "/healthz/ready")
                    .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        });
        if !ready || self.out.closed() {
            let status = self.child.try_wait().ok().flatten();
            panic!(
                "ztunnel {} in {} not ready after {:?} (status {status:?}):\n{}",
                self.pid,
                self.ns_name,
                started.elapsed(),
                self.text()
            );
        }
        eprintln!("ztunnel {} ready after {:?}", self.pid, started.elapsed());
    }

    /// SIGTERM, wait for the exit (SIGKILL after a grace period), and return the output.
    pub fn stop(mut self) -> Stopped {
        self.terminate();
        self.out.wait(Duration::from_secs(5), |_, closed| closed);
        Stopped {
            status: self.status.expect("terminate reaps the process"),
            lines: self.out.lines(),
        }
    }

    fn terminate(&mut self) {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        if self.status.is_none() {
            host::signal(self.pid, libc::SIGTERM);
            self.status = wait_child(&mut self.child, TERM_GRACE);
            if self.status.is_none() {
                eprintln!("ztunnel {} ignored SIGTERM: SIGKILL", self.pid);
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
            }
        }
        if let Some(rule) = self.redirect.take() {
            // Best effort: the rule also goes with the namespace.
            if self.ns_path.exists() {
                let removing = Command::new("nsenter")
                    .arg(format!("--net={}", self.ns_path.display()))
                    .args(["iptables", "-w", "-t", "nat", "-D"])
                    .args(&rule)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                if let Ok(mut child) = removing
                    && wait_child(&mut child, STEP_TIMEOUT).is_none()
                {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

impl Drop for Ztunnel {
    /// Never panics (it may run while a failed test unwinds).
    fn drop(&mut self) {
        self.terminate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_parse_with_quotes_and_errors() {
        let line = "2026-12-07T02:29:17.308495Z\terror\taccess\tconnection complete\t\
                    src.addr=10.254.0.1:52228 src.workload=\"client\" \
                    src.identity=\"spiffe://cluster.local/ns/default/sa/client\" \
                    dst.hbone_addr=10.254.0.2:8081 direction=\"outbound\" bytes_sent=0 \
                    bytes_recv=0 duration=\"0ms\" error=\"http status: 503 Service Unavailable\"";
        let a = AccessLine::parse(line).expect("an access line");
        assert_eq!(a.level, "error");
        assert_eq!(a.message, "connection complete");
        assert_eq!(a.direction(), Some("outbound"));
        assert_eq!(
            a.get("src.identity"),
            Some("spiffe://cluster.local/ns/default/sa/client")
        );
        assert_eq!(a.get("dst.hbone_addr"), Some("10.254.0.2:8081"));
        assert_eq!(a.error(), Some("http status: 503 Service Unavailable"));
        assert_eq!(a.bytes("bytes_sent"), 0);
        assert!(!a.ok());
        let other = "2026-12-07T02:29:09.353155Z\tinfo\thyper_util\tlistener established\t\
                     address=[::]:15021";
        assert_eq!(AccessLine::parse(other), None);
    }

    #[test]
    fn local_config_has_the_workloads_and_a_deny_with_tagged_principals() {
        let y = LocalConfig::default()
            .workload("client", "10.1.2.1".parse().unwrap())
            .workload("server", "10.1.2.2".parse().unwrap())
            .deny("no-client", &[&identity("client")], &[8080, 8081])
            .yaml();
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&y).expect("valid YAML");
        assert_eq!(doc["workloads"][1]["workloadIps"][0], "10.1.2.2");
        assert_eq!(doc["workloads"][0]["serviceAccount"], "client");
        let policy = &doc["policies"][0];
        assert_eq!(policy["action"], "Deny");
        let m = &policy["rules"][0][0][0];
        assert_eq!(m["destinationPorts"][1], 8081);
        assert!(
            y.contains("principals: [!Exact \"cluster.local/ns/default/sa/client\"]"),
            "{y}"
        );
    }
}
