//! The HTTP cross-check (pods scenario, full runs): Debian's nginx in the server pod serving a
//! small static response on the pod's address, and `wrk` in the client pod, direct, through
//! `ebpf --proxy-all`, the `ebpf + mTLS` pair and the `ztunnel pair`, started as the sockperf
//! cross-check starts them. Two measures per mode: keep-alive requests/s (16 connections) and
//! new connections/s (`Connection: close`, one request per connection), beside our own load
//! client's keep-alive exchanges/s and conn/s for the same modes.
//!
//! A proxied run counts only if the proxies' records show they carried wrk's traffic: at
//! least one connection per request (with `Connection: close`) or per wrk connection
//! (keep-alive) to nginx, with bytes both ways, and at least the response bodies' bytes back
//! from it; for the pairs in both sidecars' reports, or in the client ztunnel's access log.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{
    Mode, Side, mesh,
    netns::Netns,
    sockperf::{Carried, Place, all_on_path, carried_to},
    terminate, wait_bounded,
};
use crate::setup;

/// wrk's connections in both measures, and how long each runs.
const CONNECTIONS: usize = 16;
const SECS: u32 = 5;
/// The response body: 64 bytes, the size of our client's small exchanges.
const BODY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";

/// The two measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    KeepAlive,
    Close,
}

impl Measure {
    fn key(self) -> &'static str {
        match self {
            Measure::KeepAlive => "keepalive",
            Measure::Close => "close",
        }
    }
}

/// What wrk printed for one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkRun {
    pub requests: u64,
    pub per_sec: f64,
    /// Socket errors (connect, read, write, timeout), summed.
    pub errors: u64,
}

/// One mode's two runs.
#[derive(Debug, Clone)]
pub struct WrkFigures {
    pub mode: Mode,
    pub keep_alive: WrkRun,
    /// Requests/s with `Connection: close`: new connections per second.
    pub close: WrkRun,
}

/// Fails in one line if wrk or nginx is not installed.
pub fn check_installed() -> Result<()> {
    for (command, package) in [("wrk", "wrk"), ("nginx", "nginx-light")] {
        if setup::which(command).is_none() {
            bail!(
                "{command} is missing (the full bench's HTTP cross-check needs it): run \
                 `cargo xtask setup` (or `apt-get install {package}`)"
            );
        }
    }
    Ok(())
}

/// The modes cross-checked: no proxy, kernel pass-through, our plain proxied hop, our HBONE
/// pair and ztunnel's.
pub const MODES: [Mode; 5] = [
    Mode::Direct,
    Mode::Ebpf,
    Mode::EbpfProxyAll,
    Mode::EbpfMtls,
    Mode::Ztunnel,
];

/// nginx on `place.server` in the server pod, then wrk's two measures in each of `modes`.
pub fn crosscheck(place: &Place, modes: &[Mode], raw: &Path) -> Result<Vec<WrkFigures>> {
    let nginx = Nginx::start(place.server_ns, place.server)?;
    let mut figures = Vec::new();
    for &mode in modes {
        let run = |measure| run_one(place, mode, measure, raw);
        figures.push(WrkFigures {
            mode,
            keep_alive: run(Measure::KeepAlive)?,
            close: run(Measure::Close)?,
        });
    }
    nginx.stop()?;
    Ok(figures)
}

/// One wrk run in `mode`, its proxies started and stopped around it, their records checked.
fn run_one(place: &Place, mode: Mode, measure: Measure, raw: &Path) -> Result<WrkRun> {
    let what = format!("wrk, {}, {}", mode.label(), measure.key());
    let server = place.server;
    let stem = raw.join(format!(
        "wrk-{}-{}-{}",
        place.name,
        mode.file_key(),
        measure.key()
    ));
    let report = stem.with_extension("sidecar.json");
    let (peer, pair) = place.start_server_side(mode, &stem)?;
    let mut cmd = place.client_command(mode, "wrk", &report);
    cmd.args(["-t1", &format!("-c{CONNECTIONS}"), &format!("-d{SECS}s")]);
    if measure == Measure::Close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = stem.with_extension("out");
    cmd.arg(format!("http://{server}/"))
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out)?)
        .stderr(fs::File::create(stem.with_extension("err"))?);
    place.client.enter(&mut cmd)?;
    Side::Client.pin(&mut cmd);
    let status = wait_bounded(
        &mut cmd.spawn().context("starting wrk")?,
        Duration::from_secs(u64::from(SECS) + 30),
    )
    .with_context(|| what.clone());
    let peer_report = peer.map(|p| p.stop()).transpose()?;
    let pair_carried = pair.map(|p| p.stop_and_count_carried(server)).transpose()?;
    let status = status?;
    let text = fs::read_to_string(&out).unwrap_or_default();
    if !status.success() {
        bail!("{what} failed ({status}): {}", text.trim());
    }
    let run = parse(&text).with_context(|| format!("{what}: {}", out.display()))?;
    // Every request of a closing run is a connection of its own; a keep-alive run opens
    // CONNECTIONS. Each completed request brought at least the body back.
    let connections = match measure {
        Measure::Close => run.requests as usize,
        Measure::KeepAlive => CONNECTIONS,
    };
    let want = Carried {
        connections,
        bytes_from_server: run.requests * BODY.len() as u64,
    };
    if mode.sidecar_args().is_some() {
        let tunnel = mode.mtls().then_some(("dst_identity", mesh::SERVER_ID));
        let got = carried_to(&report, "outbound", server, tunnel)?;
        enough(got, want, &report).with_context(|| format!("{what}: the client pod's sidecar"))?;
        all_on_path(&report, "outbound", server, mode.path())
            .with_context(|| format!("{what}: the client pod's sidecar"))?;
    }
    if let Some(report) = peer_report {
        let tunnel = Some(("src_identity", mesh::CLIENT_ID));
        let got = carried_to(&report, "inbound", server, tunnel)?;
        enough(got, want, &report).with_context(|| format!("{what}: the server pod's sidecar"))?;
    }
    if let Some((got, log)) = pair_carried {
        enough(got, want, &log).with_context(|| format!("{what}: the client pod's ztunnel"))?;
    }
    Ok(run)
}

/// A proxy's records must show at least `want`: else wrk's traffic did not (all) go through.
fn enough(got: Carried, want: Carried, records: &Path) -> Result<()> {
    if got.connections < want.connections || got.bytes_from_server < want.bytes_from_server {
        bail!(
            "its records show {} connection(s) to nginx carrying {} bytes back, where wrk's \
             run needs at least {} and {}: the traffic was not intercepted ({})",
            got.connections,
            got.bytes_from_server,
            want.connections,
            want.bytes_from_server,
            records.display()
        );
    }
    Ok(())
}

/// Reads `N requests in 5.00s, …`, `Requests/sec: …` and `Socket errors: connect a, read b,
/// write c, timeout d`; fails on `Non-2xx or 3xx responses` or no request.
fn parse(text: &str) -> Result<WrkRun> {
    let requests = text
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(' ')?;
            rest.starts_with("requests in ").then(|| n.parse().ok())?
        })
        .context("no `requests in` line in wrk's output")?;
    let per_sec = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok())
        .context("no `Requests/sec:` line in wrk's output")?;
    let errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map_or(0, |rest| {
            rest.split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        });
    if let Some(l) = text.lines().find(|l| l.contains("Non-2xx or 3xx")) {
        bail!("nginx answered with errors: {}", l.trim());
    }
    if requests == 0 {
        bail!("wrk completed no request");
    }
    Ok(WrkRun {
        requests,
        per_sec,
        errors,
    })
}

/// nginx with a configuration of its own in a temporary directory (no system config, pid
/// file and error log there, `daemon off`, one worker), pinned to the server side; stopped
/// and its directory removed on drop.
struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
}

impl Nginx {
    fn start(ns: &Netns, listen: SocketAddr) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("sidecar-bench-nginx-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut nginx = Self { child: None, dir };
        let (conf, log) = (nginx.dir.join("nginx.conf"), nginx.dir.join("error.log"));
        fs::write(&conf, config_text(&nginx.dir, listen))?;
        let mut cmd = Command::new("nginx");
        // -e: the error log before the configuration is read (else the system's path).
        cmd.arg("-p")
            .arg(&nginx.dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(nginx.dir.join("stderr.log"))?);
        ns.enter(&mut cmd)?;
        Side::Server.pin(&mut cmd);
        nginx.child = Some(cmd.spawn().context("starting nginx")?);
        let ready = ns.poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok()
        })?;
        if let Some(child) = nginx.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "nginx exited ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        if !ready {
            bail!("nginx did not accept on {listen} within 10 s");
        }
        Ok(nginx)
    }

    /// SIGTERM (nginx's fast shutdown: the master stops its worker, then exits), bounded.
    fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut child) => terminate(&mut child, Duration::from_secs(10)),
            None => Ok(()),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.terminate();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Every path nginx would write in `dir`. No access log: a line per request is work the
/// server would do in every mode alike, and the proxies' records are the check.
fn config_text(dir: &Path, listen: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n    access_log off;\n\
         \x20   client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   server {{\n        listen {listen};\n\
         \x20       location / {{ default_type text/plain; return 200 \"{}\\n\"; }}\n    }}\n}}\n",
        BODY.trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 5s test @ http://10.252.0.2:20140/\n  1 threads and 16 connections\n\
                    \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                    \x20   Latency     1.10ms  300.00us   5.00ms   90.00%\n\
                    \x20 52034 requests in 5.00s, 15.63MB read\n\
                    \x20 Socket errors: connect 0, read 3, write 0, timeout 1\n\
                    Requests/sec:  10406.80\nTransfer/sec:      3.13MB\n";
        let run = parse(text).unwrap();
        assert_eq!(run.requests, 52034);
        assert_eq!(run.per_sec, 10406.8);
        assert_eq!(run.errors, 4);
        assert!(parse("nothing").is_err());
        let bad = format!("{text}  Non-2xx or 3xx responses: 12\n");
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn a_run_counts_only_if_the_proxy_carried_it() {
        let want = Carried {
            connections: 10,
            bytes_from_server: 640,
        };
        let p = Path::new("r.json");
        assert!(enough(want, want, p).is_ok());
        let fewer = Carried {
            connections: 9,
            ..want
        };
        assert!(enough(fewer, want, p).is_err());
        assert!(enough(Carried::default(), want, p).is_err());
        let short = Carried {
            bytes_from_server: 639,
            ..want
        };
        assert!(enough(short, want, p).is_err());
    }

    #[test]
    fn nginx_writes_only_in_its_directory() {
        let text = config_text(Path::new("/tmp/x"), "10.252.0.2:20140".parse().unwrap());
        assert!(text.contains("daemon off;") && text.contains("worker_processes 1;"));
        assert!(text.contains("pid /tmp/x/nginx.pid;"));
        assert!(text.contains("listen 10.252.0.2:20140;"));
        assert!(!text.contains("include"));
        assert!(text.contains(&format!("return 200 \"{}\\n\"", BODY.trim_end())));
    }
}
