//! The external cross-check: Debian's `sockperf` (TCP ping-pong, 64 B, full round trip) in
//! the loopback namespace, in every single-sidecar mode (direct, under the sidecar in each
//! of its modes, through HAProxy), so our own load generator's request/response figures can
//! be compared with a tool we did not write. A sidecar run counts only if its `--report`
//! shows it carried sockperf's connections, as the bench's own runs are checked.
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

use super::{Mode, PROXY_PORT, Side, haproxy::Haproxy, netns::Netns};
use crate::build_ebpf;

/// sockperf's figures for one mode, in microseconds (round trip).
#[derive(Debug, Clone)]
pub struct SockperfFigures {
    pub mode: Mode,
    pub p50_us: f64,
    pub p99_us: f64,
    pub observations: u64,
}

pub fn crosscheck(ns: &Netns, port: u16, secs: u32, raw: &Path) -> Result<Vec<SockperfFigures>> {
    let mut server_cmd = Command::new("sockperf");
    server_cmd
        .args([
            "server",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ns.enter(&mut server_cmd)?;
    Side::Server.pin(&mut server_cmd);
    let server = server_cmd
        .spawn()
        .context("starting `sockperf server` (apt-get install sockperf)")?;
    let _server = KillOnDrop(server);
    thread::sleep(Duration::from_millis(300));

    let sidecar = build_ebpf::workspace_root().join("target/release/sidecar");
    let mut figures = Vec::new();
    let server_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for mode in Mode::SINGLE {
        let stem = raw.join(format!("sockperf-{}", mode.file_key()));
        let report = stem.with_extension("sidecar.json");
        let haproxy = (mode == Mode::Haproxy)
            .then(|| Haproxy::start(ns, server_addr, &stem))
            .transpose()?;
        let target = haproxy.as_ref().map_or(server_addr, Haproxy::front);
        let mut cmd = match mode.sidecar_args() {
            None => Command::new("sockperf"),
            Some(args) => {
                let mut c = Command::new(&sidecar);
                c.arg("run")
                    .args(args)
                    .args(["--proxy-port", &PROXY_PORT.to_string(), "--report"])
                    .arg(&report)
                    .args(["--", "sockperf"]);
                c
            }
        };
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
            carried(&report, server_addr)
                .with_context(|| format!("sockperf under the sidecar ({})", mode.label()))?;
        }
        figures.push(parse(mode, &text)?);
    }
    Ok(figures)
}

/// The sidecar's report lists sockperf's connection(s) to `server`, with bytes carried each
/// way. (sockperf's client resets its connection when it is done, so the sidecar records the
/// end as `io_error`; what matters here is that the exchanges went through it.)
fn carried(report: &Path, server: std::net::SocketAddr) -> Result<()> {
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(report).with_context(|| format!("reading {}", report.display()))?,
    )?;
    let to_server: Vec<_> = json["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["direction"] == "outbound" && c["original_dst"] == server.to_string())
        .collect();
    let both_ways = |c: &&serde_json::Value| {
        c["bytes_from_client"].as_u64() > Some(0) && c["bytes_from_upstream"].as_u64() > Some(0)
    };
    if !to_server.iter().any(both_ways) {
        bail!(
            "the sidecar's report does not show sockperf's exchanges with {server}: \
             {to_server:?} ({})",
            report.display()
        );
    }
    Ok(())
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
