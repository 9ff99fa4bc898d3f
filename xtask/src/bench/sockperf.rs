//! The external cross-check: Debian's `sockperf` (TCP ping-pong, 64 B, full round trip) in
//! the loopback namespace, in every single-sidecar mode (direct, under the sidecar in each
//! of its modes, through HAProxy), and in the pods scenario (full runs) in every mode too,
//! the mTLS pairs included, so our own load generator's request/response figures can be compared with a tool we did not write. A proxied run
//! counts only if the proxies' records (sidecar `--report`s, ztunnel access logs) show they
//! carried sockperf's exchanges, as the bench's own runs are checked.
//!
//! sockperf waits for replies with a polling loop, our client with blocking reads, so
//! sockperf's absolute figures are expected to be a little lower; the ratios between modes
//! are what should agree.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{
    Mode, PROXY_PORT, Side,
    haproxy::Haproxy,
    mesh::{self, Mesh, PeerSidecar},
    netns::Netns,
    ztunnel::{RunningPair, ZtunnelPair},
};
use crate::build_ebpf;

/// sockperf's figures for one mode, in microseconds (round trip).
#[derive(Debug, Clone)]
pub struct SockperfFigures {
    pub mode: Mode,
    pub p50_us: f64,
    pub p99_us: f64,
    pub observations: u64,
}

/// Where a cross-check runs: the client's namespace, the server's and its address, and
/// what the two-proxy modes need.
pub struct Place<'a> {
    /// The scenario's name (file names, the report).
    pub name: &'static str,
    pub client: &'a Netns,
    pub server_ns: &'a Netns,
    pub server: std::net::SocketAddr,
    pub mesh: Option<&'a Mesh<'a>>,
    pub ztunnel: Option<&'a ZtunnelPair<'a>>,
}

impl<'a> Place<'a> {
    /// The server pod's proxies `mode` needs for one run, started: the peer sidecar for an
    /// mTLS mode, the ztunnel pair for `ztunnel pair`. Their logs go next to `stem`.
    pub fn start_server_side(
        &self,
        mode: Mode,
        stem: &Path,
    ) -> Result<(Option<PeerSidecar>, Option<RunningPair<'a>>)> {
        let peer = match (mode.mtls(), self.mesh) {
            (false, _) => None,
            (true, Some(m)) => Some(m.start_server(mode, stem)?),
            (true, None) => bail!("{} needs a server pod", mode.label()),
        };
        let pair = match (mode == Mode::Ztunnel, self.ztunnel) {
            (false, _) => None,
            (true, Some(z)) => Some(z.start(stem)?),
            (true, None) => bail!("{} needs a server pod", mode.label()),
        };
        Ok((peer, pair))
    }

    /// `program` as `mode`'s client: bare, or under `sidecar run` with the mode's options
    /// (and, with mTLS, the client pod's mesh options), its report written to `report`.
    pub fn client_command(&self, mode: Mode, program: &str, report: &Path) -> Command {
        let Some(args) = mode.sidecar_args() else {
            return Command::new(program);
        };
        let mut c = Command::new(build_ebpf::workspace_root().join("target/release/sidecar"));
        c.arg("run")
            .args(args)
            .args(
                self.mesh
                    .filter(|_| mode.mtls())
                    .map(Mesh::client_args)
                    .unwrap_or_default(),
            )
            .args(["--proxy-port", &PROXY_PORT.to_string(), "--report"])
            .arg(report)
            .args(["--", program]);
        c
    }
}

/// sockperf in each of `modes`, `secs` seconds each.
pub fn crosscheck(
    place: &Place,
    modes: &[Mode],
    secs: u32,
    raw: &Path,
) -> Result<Vec<SockperfFigures>> {
    let (ns, server_addr) = (place.client, place.server);
    let mut server_cmd = Command::new("sockperf");
    server_cmd
        .args([
            "server",
            "--tcp",
            "-i",
            &server_addr.ip().to_string(),
            "-p",
            &server_addr.port().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    place.server_ns.enter(&mut server_cmd)?;
    Side::Server.pin(&mut server_cmd);
    let server = server_cmd
        .spawn()
        .context("starting `sockperf server` (apt-get install sockperf)")?;
    let _server = KillOnDrop(server);
    thread::sleep(Duration::from_millis(300));

    let mut figures = Vec::new();
    for &mode in modes {
        let stem = raw.join(format!("sockperf-{}-{}", place.name, mode.file_key()));
        let report = stem.with_extension("sidecar.json");
        let (peer, pair) = place.start_server_side(mode, &stem)?;
        let haproxy = (mode == Mode::Haproxy)
            .then(|| Haproxy::start(ns, server_addr, &stem))
            .transpose()?;
        let target = haproxy.as_ref().map_or(server_addr, Haproxy::front);
        let mut cmd = place.client_command(mode, "sockperf", &report);
        cmd.args([
            "ping-pong",
            "--tcp",
            "-i",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args(["-m", "64", "-t", &secs.to_string(), "--full-rtt"])
        .stdin(Stdio::null());
        ns.enter(&mut cmd)?;
        Side::Client.pin(&mut cmd);
        let out = cmd.output().context("running sockperf ping-pong")?;
        if let Some(h) = haproxy {
            h.stop()?;
        }
        let peer_report = peer.map(|p| p.stop()).transpose()?;
        let pair_checked = pair.map(|p| p.stop_and_check_carried(server_addr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "sockperf ping-pong ({}) failed: {}",
                mode.label(),
                last_line(&text)
            );
        }
        if mode.sidecar_args().is_some() {
            let tunnel = mode.mtls().then_some(("dst_identity", mesh::SERVER_ID));
            carried(&report, "outbound", mode.path(), server_addr, tunnel)
                .with_context(|| format!("sockperf under the sidecar ({})", mode.label()))?;
        }
        if let Some(report) = peer_report {
            carried(
                &report,
                "inbound",
                "proxy",
                server_addr,
                Some(("src_identity", mesh::CLIENT_ID)),
            )
            .with_context(|| {
                format!(
                    "sockperf through the server pod's sidecar ({})",
                    mode.label()
                )
            })?;
        }
        if let Some(checked) = pair_checked {
            checked.context("sockperf through the ztunnel pair")?;
        }
        figures.push(parse(mode, &text)?);
    }
    Ok(figures)
}

/// The sidecar's report lists sockperf's connection(s) to `server` in `direction`, with
/// bytes carried each way, and with a `tunnel` (identity field, SPIFFE ID) over mTLS with
/// that peer; every one of them on `path`, so a pass-through run is one that passed through
/// (and a proxied one was proxied). (sockperf's client resets its connection when it is
/// done, so the sidecar records the end as `io_error`; what matters here is that the
/// exchanges went through it.)
fn carried(
    report: &Path,
    direction: &str,
    path: &str,
    server: std::net::SocketAddr,
    tunnel: Option<(&str, &str)>,
) -> Result<()> {
    if carried_to(report, direction, server, tunnel)?.connections == 0 {
        bail!(
            "the sidecar's report does not show sockperf's exchanges with {server} ({})",
            report.display()
        );
    }
    all_on_path(report, direction, server, path)
        .with_context(|| "sockperf's connection".to_string())
}

/// Every connection of `direction` to `server` in a sidecar's `--report` took `path`
/// (`passthrough` or `proxy`): a pass-through run that passed through, a proxied one that
/// was proxied.
pub fn all_on_path(
    report: &Path,
    direction: &str,
    server: std::net::SocketAddr,
    path: &str,
) -> Result<()> {
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(report).with_context(|| format!("reading {}", report.display()))?,
    )?;
    let off_path = json["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["direction"] == direction && c["original_dst"] == server.to_string())
        .find(|c| c["path"] != path);
    if let Some(c) = off_path {
        bail!(
            "a connection to {server} took path {} where this mode's is {path} ({})",
            c["path"],
            report.display()
        );
    }
    Ok(())
}

/// What a proxy's records show it carried to one server: connections with bytes both ways,
/// and the bytes the server sent over them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub connections: usize,
    pub bytes_from_server: u64,
}

/// The connections of `direction` to `server` in a sidecar's `--report` that carried bytes
/// both ways (with a `tunnel`, only those over mTLS with that peer), however they ended.
pub fn carried_to(
    report: &Path,
    direction: &str,
    server: std::net::SocketAddr,
    tunnel: Option<(&str, &str)>,
) -> Result<Carried> {
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(report).with_context(|| format!("reading {}", report.display()))?,
    )?;
    let mut carried = Carried::default();
    for c in json["connections"].as_array().into_iter().flatten() {
        let from_client = c["bytes_from_client"].as_u64().unwrap_or(0);
        let from_server = c["bytes_from_upstream"].as_u64().unwrap_or(0);
        if c["direction"] == direction
            && c["original_dst"] == server.to_string()
            && tunnel.is_none_or(|(field, id)| c["mode"] == "mtls" && c[field] == id)
            && from_client > 0
            && from_server > 0
        {
            carried.connections += 1;
            carried.bytes_from_server += from_server;
        }
    }
    Ok(carried)
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

/// Reads `---> percentile 50.000 = 12.538` lines and the observation count.
fn parse(mode: Mode, text: &str) -> Result<SockperfFigures> {
    let percentile = |p: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            let rest = l.split("---> percentile ").nth(1)?;
            let (name, value) = rest.split_once('=')?;
            (name.trim() == p).then(|| value.trim().parse().ok())?
        })
    };
    let observations = text
        .lines()
        .find_map(|l| {
            let rest = l.split("Total ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
    match (percentile("50.000"), percentile("99.000")) {
        (Some(p50_us), Some(p99_us)) if observations > 0 => Ok(SockperfFigures {
            mode,
            p50_us,
            p99_us,
            observations,
        }),
        _ => bail!("no percentiles in sockperf's output: {}", last_line(text)),
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_output() {
        let text = "sockperf: \u{1b}[2;35mTotal 42981 observations\u{1b}[0m; each\n\
                    sockperf: ---> percentile 99.000 =   16.284\n\
                    sockperf: ---> percentile 50.000 =   12.538\n";
        let f = parse(Mode::Direct, text).unwrap();
        assert_eq!(f.observations, 42981);
        assert_eq!(f.p50_us, 12.538);
        assert_eq!(f.p99_us, 16.284);
        assert!(parse(Mode::Direct, "nothing").is_err());
    }
}
