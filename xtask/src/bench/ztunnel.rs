//! The `ztunnel pair` mode: Istio's ztunnel in each pod, in its dedicated (sidecar-like)
//! mode, as the HBONE anchor our sidecar pair is measured against. The client pod's
//! outbound TCP is sent to its ztunnel's 15001 by an iptables REDIRECT rule; that ztunnel
//! opens HBONE (HTTP/2 CONNECT over mTLS) to the server pod's ztunnel on 15008, which
//! connects to the echo server on the pod's address.
//!
//! The facts this relies on are those of the integration tests' harness
//! (`tests/src/ztunnel.rs`, `tests/ztunnel-notes.md`), restated here because xtask cannot
//! depend on the tests crate: the environment (`FAKE_CA`, `LOCAL_XDS_PATH`,
//! `PROXY_MODE=dedicated`, `PROXY_WORKLOAD_INFO`, `PACKET_MARK`), the `local.yaml` listing
//! both workloads, the redirect rule that leaves ztunnel's own (marked) sockets alone,
//! readiness on 15021, logs on stdout with one `access` line per connection when it ends.
//!
//! A run counts only if both ztunnels' access logs list every connection the client made,
//! ended cleanly, over HBONE (the client side's `dst.addr` is the peer's 15008) with the
//! peer's SPIFFE ID: as the mTLS modes check both sidecars' reports.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{Side, netns::Netns, sockperf::Carried, wait_bounded};
use crate::run;

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "default";
/// ztunnel marks its own sockets with this (`PACKET_MARK`); the redirect rule skips them.
const PACKET_MARK: u32 = 0x539;
const OUTBOUND_PORT: u16 = 15001;
pub const HBONE_PORT: u16 = 15008;
const READINESS_PORT: u16 = 15021;
/// ztunnel is ready 10–25 ms after start; this bounds a broken one.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// ztunnel's own drain deadline is 5 s; SIGKILL after this.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// `spiffe://cluster.local/ns/default/sa/<service account>`.
pub fn identity(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// The ztunnel binary: `../shared/interop/ztunnel/ztunnel` beside the workspace, or in
/// `$ZTUNNEL_DIR`. Fails, naming the path, if it is not there.
pub fn binary(workspace: &Path) -> Result<PathBuf> {
    let dir = std::env::var_os("ZTUNNEL_DIR").map_or_else(
        || workspace.join("../shared/interop/ztunnel"),
        PathBuf::from,
    );
    let bin = dir.join("ztunnel");
    if !bin.is_file() {
        bail!(
            "the ztunnel binary is missing at {} (the `ztunnel pair` mode needs it; set \
             ZTUNNEL_DIR to the directory holding it)",
            bin.display()
        );
    }
    Ok(bin)
}

/// What the pair needs for every run: the binary, the pods and ztunnel's `local.yaml`.
pub struct ZtunnelPair<'a> {
    bin: PathBuf,
    config: PathBuf,
    client_ns: &'a Netns,
    server_ns: &'a Netns,
    server_ip: IpAddr,
}

impl<'a> ZtunnelPair<'a> {
    /// Writes `local.yaml` (workloads `client` and `server` at the pods' addresses, both
    /// HBONE) into `raw`.
    pub fn new(
        bin: PathBuf,
        (client_ns, client_ip): (&'a Netns, IpAddr),
        (server_ns, server_ip): (&'a Netns, IpAddr),
        raw: &Path,
    ) -> Result<Self> {
        let config = raw.join("ztunnel-local.yaml");
        fs::write(
            &config,
            local_yaml(&[("client", client_ip), ("server", server_ip)]),
        )?;
        Ok(Self {
            bin,
            config,
            client_ns,
            server_ns,
            server_ip,
        })
    }

    /// Starts the server pod's ztunnel, then the client pod's and its redirect rule; logs
    /// next to `stem`.
    pub fn start(&self, stem: &Path) -> Result<RunningPair<'a>> {
        let server = self.start_one(self.server_ns, "server", Side::Server, stem)?;
        let redirect = Redirect::add(self.client_ns)?;
        let client = self.start_one(self.client_ns, "client", Side::Client, stem)?;
        Ok(RunningPair {
            client,
            server,
            _redirect: redirect,
            server_ip: self.server_ip,
        })
    }

    fn start_one(&self, ns: &Netns, workload: &str, side: Side, stem: &Path) -> Result<Ztunnel> {
        let log = stem.with_extension(format!("ztunnel-{workload}.log"));
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("FAKE_CA", "true")
            .env("LOCAL_XDS_PATH", &self.config)
            .env("XDS_ADDRESS", "")
            .env("PROXY_MODE", "dedicated")
            .env(
                "PROXY_WORKLOAD_INFO",
                format!("{NAMESPACE}/{workload}/{workload}"),
            )
            .env("ENABLE_ORIG_SRC", "false")
            .env("PACKET_MARK", PACKET_MARK.to_string())
            .stdin(Stdio::null())
            .stderr(out.try_clone()?)
            .stdout(out);
        ns.enter(&mut cmd)?;
        side.pin(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let mut zt = Ztunnel { child, log };
        let ready = ns.poll_until(READY_TIMEOUT, Duration::from_millis(5), ready)?;
        if !ready || zt.child.try_wait()?.is_some() {
            let _ = zt.stop();
            bail!(
                "ztunnel for {workload} in {} did not become ready (log: {})",
                ns.name(),
                zt.log.display()
            );
        }
        Ok(zt)
    }
}

/// Whether `/healthz/ready` on 15021 answers 200 (called from inside the namespace).
fn ready() -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], READINESS_PORT));
    let timeout = Duration::from_millis(500);
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut answer = String::new();
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// ztunnel's `LOCAL_XDS_PATH` file: each workload's service account is its name.
fn local_yaml(workloads: &[(&str, IpAddr)]) -> String {
    let mut y = String::from("workloads:\n");
    for (name, ip) in workloads {
        y += &format!(
            "- uid: \"cluster1//v1/Pod/{NAMESPACE}/{name}\"\n  name: \"{name}\"\n  \
             namespace: {NAMESPACE}\n  trustDomain: {TRUST_DOMAIN}\n  serviceAccount: \"{name}\"\n  \
             workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: \"{name}\"\n  network: \"\"\n  \
             services: {{}}\n"
        );
    }
    y + "policies: []\nservices: []\n"
}

/// One ztunnel process; stopped on drop.
struct Ztunnel {
    child: Child,
    log: PathBuf,
}

impl Ztunnel {
    /// SIGTERM, and the wait for its exit (SIGKILL past [`STOP_LIMIT`]).
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            wait_bounded(&mut self.child, STOP_LIMIT)?;
        }
        Ok(())
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The client pod's REDIRECT of outbound TCP (not loopback, not ztunnel's marked sockets)
/// to 15001; deleted on drop, so the other modes run without it.
struct Redirect<'a> {
    ns: &'a Netns,
}

const REDIRECT_RULE: [&str; 15] = [
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

impl<'a> Redirect<'a> {
    fn add(ns: &'a Netns) -> Result<Self> {
        debug_assert_eq!(format!("{PACKET_MARK:#x}/0xfff"), REDIRECT_RULE[10]);
        debug_assert_eq!(OUTBOUND_PORT.to_string(), REDIRECT_RULE[14]);
        Self::iptables(ns, "-A")?;
        Ok(Self { ns })
    }

    fn iptables(ns: &Netns, op: &str) -> Result<()> {
        let mut cmd = Command::new("iptables");
        cmd.args(["-w", "-t", "nat", op]).args(REDIRECT_RULE);
        ns.enter(&mut cmd)?;
        run(&mut cmd).with_context(|| format!("iptables {op} in {}", ns.name()))
    }
}

impl Drop for Redirect<'_> {
    fn drop(&mut self) {
        let _ = Self::iptables(self.ns, "-D");
    }
}

/// Both ztunnels of one run, and the redirect rule.
pub struct RunningPair<'a> {
    client: Ztunnel,
    server: Ztunnel,
    _redirect: Redirect<'a>,
    server_ip: IpAddr,
}

impl RunningPair<'_> {
    pub fn client_pid(&self) -> u32 {
        self.client.child.id()
    }

    pub fn server_pid(&self) -> u32 {
        self.server.child.id()
    }

    /// Stops both (client first) and checks that their access logs show `expected`
    /// connections carried over HBONE between the two identities, all ended cleanly.
    pub fn stop_and_check(mut self, expected: usize) -> Result<()> {
        self.client.stop()?;
        self.server.stop()?;
        let hbone_peer = SocketAddr::new(self.server_ip, HBONE_PORT).to_string();
        check_access(
            &self.client.log,
            "outbound",
            expected,
            &[
                ("dst.identity", &identity("server")),
                ("src.identity", &identity("client")),
                ("dst.addr", &hbone_peer),
            ],
        )?;
        check_access(
            &self.server.log,
            "inbound",
            expected,
            &[
                ("src.identity", &identity("client")),
                ("dst.identity", &identity("server")),
            ],
        )
    }
}

impl RunningPair<'_> {
    /// Stops both and checks that the client side's access log shows a connection to
    /// `server` over HBONE with the peer's identity and bytes both ways, however it ended
    /// (sockperf resets its connection when it is done).
    pub fn stop_and_check_carried(self, server: SocketAddr) -> Result<()> {
        let (carried, log) = self.stop_and_count_carried(server)?;
        if carried.connections == 0 {
            bail!(
                "ztunnel's access log shows no exchange with {server} over HBONE ({})",
                log.display()
            );
        }
        Ok(())
    }

    /// Stops both and counts, in the client side's access log, the connections to `server`
    /// over HBONE with the peer's identity and bytes both ways (however they ended), and the
    /// bytes received over them; with the log's path.
    pub fn stop_and_count_carried(mut self, server: SocketAddr) -> Result<(Carried, PathBuf)> {
        self.client.stop()?;
        self.server.stop()?;
        let hbone_peer = SocketAddr::new(self.server_ip, HBONE_PORT).to_string();
        let text = fs::read_to_string(&self.client.log)
            .with_context(|| format!("reading {}", self.client.log.display()))?;
        let mut carried = Carried::default();
        for (_, _, f) in text.lines().filter_map(access_line) {
            let get = |k: &str| f.get(k).map(String::as_str);
            let bytes = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if get("direction") == Some("outbound")
                && get("dst.addr") == Some(hbone_peer.as_str())
                && get("dst.hbone_addr") == Some(server.to_string().as_str())
                && get("dst.identity") == Some(identity("server").as_str())
                && bytes("bytes_sent") > 0
                && bytes("bytes_recv") > 0
            {
                carried.connections += 1;
                carried.bytes_from_server += bytes("bytes_recv");
            }
        }
        Ok((carried, self.client.log.clone()))
    }
}

/// The access lines of `direction` in a ztunnel log must number `expected`, each `info …
/// connection complete` with no error and with every field of `want`.
fn check_access(log: &Path, direction: &str, expected: usize, want: &[(&str, &str)]) -> Result<()> {
    let text = fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let lines: Vec<(&str, &str, BTreeMap<String, String>)> = text
        .lines()
        .filter_map(access_line)
        .filter(|(_, _, f)| f.get("direction").map(String::as_str) == Some(direction))
        .collect();
    let ok = lines
        .iter()
        .filter(|(level, message, f)| {
            *level == "info"
                && *message == "connection complete"
                && !f.contains_key("error")
                && want
                    .iter()
                    .all(|(k, v)| f.get(*k).map(String::as_str) == Some(*v))
        })
        .count();
    if lines.len() != expected || ok != expected {
        bail!(
            "ztunnel logged {} {direction} connection(s), {ok} complete over HBONE with {want:?}, \
             where the client made {expected}: the pair did not carry them as it should ({})",
            lines.len(),
            log.display()
        );
    }
    Ok(())
}

/// `<time>\t<level>\taccess\t<message>\t<k=v k="quoted v" …>` → (level, message, fields).
fn access_line(line: &str) -> Option<(&str, &str, BTreeMap<String, String>)> {
    let mut parts = line.splitn(5, '\t');
    let (_time, level, target, message) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if target != "access" {
        return None;
    }
    let mut fields = BTreeMap::new();
    let mut rest = parts.next().unwrap_or("").trim_start();
    while let Some((key, after)) = rest.split_once('=') {
        let (value, next) = match after.strip_prefix('"') {
            // ztunnel escapes quotes inside values as \"; none of the fields checked has one.
            Some(quoted) => quoted.split_once('"').unwrap_or((quoted, "")),
            None => after.split_once(' ').unwrap_or((after, "")),
        };
        fields.insert(key.to_string(), value.to_string());
        rest = next.trim_start();
    }
    Some((level, message, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_parse_and_only_clean_hbone_ones_count() {
        let line = |level: &str, extra: &str| {
            format!(
                "2026-12-07T02:29:17.308495Z\t{level}\taccess\tconnection complete\t\
                 src.addr=10.252.0.1:52228 src.identity=\"{}\" dst.addr=10.252.0.2:15008 \
                 dst.hbone_addr=10.252.0.2:20110 dst.identity=\"{}\" direction=\"outbound\" \
                 bytes_sent=64 bytes_recv=64 duration=\"0ms\"{extra}\n",
                identity("client"),
                identity("server")
            )
        };
        let (_, _, f) = access_line(line("info", "").trim_end()).expect("an access line");
        assert_eq!(f["dst.addr"], "10.252.0.2:15008");
        assert_eq!(f["direction"], "outbound");
        assert_eq!(f["src.identity"], identity("client"));
        assert!(access_line("2026-12-07T02:29:09Z\tinfo\thyper_util\tlistening").is_none());

        let path = std::env::temp_dir().join(format!("bench-ztunnel-{}.log", std::process::id()));
        let check = |text: String| {
            fs::write(&path, text).unwrap();
            let want = [("dst.addr", "10.252.0.2:15008")];
            check_access(&path, "outbound", 2, &want)
        };
        let good = line("info", "");
        assert!(check(good.clone() + "config dump\n" + &good).is_ok());
        assert!(check(good.clone()).is_err(), "one missing");
        let failed = line("error", " error=\"http status: 503 Service Unavailable\"");
        assert!(check(good.clone() + &failed).is_err(), "one failed");
        let plain = good.replace("10.252.0.2:15008", "10.252.0.2:20110");
        assert!(check(good.clone() + &plain).is_err(), "one not over HBONE");
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn local_yaml_lists_both_workloads_over_hbone() {
        let y = local_yaml(&[
            ("client", "10.252.0.1".parse().unwrap()),
            ("server", "10.252.0.2".parse().unwrap()),
        ]);
        assert_eq!(y.matches("protocol: HBONE").count(), 2);
        assert!(y.contains("workloadIps: [\"10.252.0.2\"]"), "{y}");
        assert!(y.ends_with("policies: []\nservices: []\n"));
    }
}
