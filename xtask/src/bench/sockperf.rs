//! The external cross-check: Debian's `sockperf` (TCP ping-pong, 64 B, full round trip) in
//! the loopback namespace, direct and under the sidecar in each mode, so our own load
//! generator's request/response figures can be compared with a tool we did not write.
//!
//! sockperf waits for replies with a polling loop, our client with blocking reads, so
//! sockperf's absolute figures are expected to be a little lower; the ratios between modes
//! are what should agree.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{Mode, PROXY_PORT, netns::Netns};
use crate::build_ebpf;

/// sockperf's figures for one mode, in microseconds (round trip).
#[derive(Debug, Clone)]
pub struct SockperfFigures {
    pub mode: Mode,
    pub p50_us: f64,
    pub p99_us: f64,
    pub observations: u64,
}

pub fn crosscheck(ns: &Netns, port: u16, secs: u32) -> Result<Vec<SockperfFigures>> {
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
    let server = server_cmd
        .spawn()
        .context("starting `sockperf server` (apt-get install sockperf)")?;
    let _server = KillOnDrop(server);
    thread::sleep(Duration::from_millis(300));

    let sidecar = build_ebpf::workspace_root().join("target/release/sidecar");
    let mut figures = Vec::new();
    for mode in [Mode::Direct, Mode::Iptables, Mode::Ebpf] {
        let mut cmd = match mode.sidecar_args() {
            None => Command::new("sockperf"),
            Some(args) => {
                let mut c = Command::new(&sidecar);
                c.arg("run").args(args).args([
                    "--proxy-port",
                    &PROXY_PORT.to_string(),
                    "--",
                    "sockperf",
                ]);
                c
            }
        };
        cmd.args([
            "ping-pong",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-m", "64", "-t", &secs.to_string(), "--full-rtt"])
        .stdin(Stdio::null());
        ns.enter(&mut cmd)?;
        let out = cmd.output().context("running sockperf ping-pong")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "sockperf ping-pong ({}) failed: {}",
                mode.label(),
                last_line(&text)
            );
        }
        figures.push(parse(mode, &text)?);
    }
    Ok(figures)
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
