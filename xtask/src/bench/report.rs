//! From raw client results to `report.md` (tables with absolute figures and ratios to direct
//! and to iptables, the targets, the cross-check) and `report.svg` (latency percentiles per
//! mode). [`check`] parses the markdown back and fails if any mode lacks a number.

use std::{fmt::Write as _, process::Command};

use anyhow::{Result, bail};

use super::{
    Mode, Params, Placement, ScenarioResults,
    idle::{self, Idle, Meshed},
    kernel_cost::{self, KernelCost},
    load::{SIZES, STREAMS, SidecarStats},
    sockperf::SockperfFigures,
    startup::Startup,
    verdict::{self, Bound, Ratio},
    wrk::WrkFigures,
};

/// Percentiles reported, and their labels.
const PERCENTILES: [(f64, &str); 4] = [
    (0.50, "p50"),
    (0.90, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
];

/// One mode's figures in one scenario.
#[derive(Debug, Clone)]
pub struct Figures {
    pub mode: Mode,
    /// Per size in [`SIZES`]: latency percentiles in µs, and the number of exchanges.
    pub rr_us: Vec<[f64; 4]>,
    pub rr_n: Vec<usize>,
    /// Per size, per round (round `r` of every mode ran in the same round, side by side):
    /// that round's request/response samples, ns, sorted. The targets' bootstrap draws
    /// rounds.
    pub round_samples: Vec<Vec<Vec<u32>>>,
    /// Per size, keep-alive request rate: timed exchanges per second on the persistent
    /// connection (1 / mean round trip), all rounds pooled.
    pub rr_rate: Vec<f64>,
    pub conn_per_sec: f64,
    /// Per round: connect-exchange-close connections and the seconds they took.
    pub round_conn: Vec<(f64, f64)>,
    /// Per stream count in [`STREAMS`], Gbit/s.
    pub bulk_gbps: Vec<f64>,
    /// Per stream count, per round: Gbit moved and the seconds it took.
    pub round_bulk: Vec<Vec<(f64, f64)>>,
    /// The (client pod's) sidecar's cost; None when direct.
    pub sidecar: Option<Cost>,
    /// The server pod's proxy's cost (modes with a proxy in each pod).
    pub peer: Option<Cost>,
    /// Bulk writes refused with ENOMEM (and retried), summed over rounds.
    pub enomem_retries: u64,
    /// Blocking reads that returned EAGAIN early (and were retried), summed over rounds.
    pub eagain_retries: u64,
}

/// What a sidecar process cost, over all rounds.
#[derive(Debug, Clone)]
pub struct Cost {
    /// CPU µs per exchange (per size in [`SIZES`]) and per new connection.
    pub us_per_exchange: Vec<f64>,
    pub us_per_conn: f64,
    /// MiB: the largest over rounds.
    pub idle_rss: f64,
    pub peak_rss: f64,
}

impl Cost {
    /// From every round's stats; None unless every round has them.
    fn of(stats: &[Option<&SidecarStats>], rr_n: &[usize], crr_count: usize) -> Option<Self> {
        let stats: Vec<&SidecarStats> = stats.iter().copied().collect::<Option<_>>()?;
        let mib = |k: u64| k as f64 / 1024.0;
        Some(Self {
            us_per_exchange: (0..SIZES.len())
                .map(|i| {
                    let cpu: f64 = stats
                        .iter()
                        .map(|s| s.rr_cpu_secs.get(i).copied().unwrap_or(0.0))
                        .sum();
                    cpu * 1e6 / rr_n[i] as f64
                })
                .collect(),
            us_per_conn: stats.iter().map(|s| s.crr_cpu_secs).sum::<f64>() * 1e6 / crr_count as f64,
            idle_rss: stats
                .iter()
                .map(|s| mib(s.idle_rss_kib))
                .fold(0.0, f64::max),
            peak_rss: stats
                .iter()
                .map(|s| mib(s.peak_rss_kib))
                .fold(0.0, f64::max),
        })
    }
}

pub struct Scenario {
    /// The scenario and the placement, e.g. "pods, pinned".
    pub name: String,
    /// The scenario alone ("loopback", "pods").
    pub place: &'static str,
    pub placement: Placement,
    pub description: &'static str,
    pub modes: Vec<Figures>,
    /// Attempts that failed and were repeated.
    pub failures: Vec<String>,
}

impl Figures {
    /// p50 of each round on its own (64 B), in µs: shows the spread between runs.
    pub fn round_p50_us(&self) -> Vec<f64> {
        self.round_samples[0]
            .iter()
            .map(|r| {
                if r.is_empty() {
                    f64::NAN
                } else {
                    percentile(r, 0.5)
                }
            })
            .collect()
    }
}

impl Scenario {
    pub fn get(&self, mode: Mode) -> &Figures {
        self.modes
            .iter()
            .find(|f| f.mode == mode)
            .expect("every mode ran")
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx] as f64 / 1000.0
}

/// Merges the rounds of each mode. Fails if a mode has no data for some figure.
pub fn summarize(results: &[ScenarioResults]) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    for s in results {
        let mut modes = Vec::new();
        for (mode, runs) in &s.runs {
            let what = format!("{} / {}", s.name, mode.label());
            if runs.is_empty() {
                bail!("{what}: no runs");
            }
            let mut rr_us = Vec::new();
            let mut rr_n = Vec::new();
            for (i, size) in SIZES.iter().enumerate() {
                let mut all: Vec<u32> = runs
                    .iter()
                    .flat_map(|r| r.rr_ns.get(i).cloned().unwrap_or_default())
                    .collect();
                if all.is_empty() {
                    bail!("{what}: no request/response samples for {size} B");
                }
                all.sort_unstable();
                rr_us.push(PERCENTILES.map(|(p, _)| percentile(&all, p)));
                rr_n.push(all.len());
            }
            let round_samples = (0..SIZES.len())
                .map(|i| {
                    runs.iter()
                        .map(|r| {
                            let mut v = r.rr_ns.get(i).cloned().unwrap_or_default();
                            v.sort_unstable();
                            v
                        })
                        .collect()
                })
                .collect();
            // Exchanges per second on the persistent connection: 1 / mean round trip.
            let rate = |samples: &[u32]| {
                samples.len() as f64 * 1e9 / samples.iter().map(|&v| v as f64).sum::<f64>()
            };
            let rr_rate = (0..SIZES.len())
                .map(|i| {
                    let all: Vec<u32> = runs
                        .iter()
                        .flat_map(|r| r.rr_ns.get(i).cloned().unwrap_or_default())
                        .collect();
                    rate(&all)
                })
                .collect();
            let round_conn = runs
                .iter()
                .map(|r| (r.crr_count as f64, r.crr_secs))
                .collect();
            let round_bulk = (0..STREAMS.len())
                .map(|i| {
                    runs.iter()
                        .map(|r| {
                            let bytes = r.bulk_bytes.get(i).copied().unwrap_or(0);
                            let secs = r.bulk_secs.get(i).copied().unwrap_or(0.0);
                            (bytes as f64 * 8.0 / 1e9, secs)
                        })
                        .collect()
                })
                .collect();
            let crr_count: usize = runs.iter().map(|r| r.crr_count).sum();
            let crr_secs: f64 = runs.iter().map(|r| r.crr_secs).sum();
            let conn_per_sec = crr_count as f64 / crr_secs;
            let bulk_gbps: Vec<f64> = (0..STREAMS.len())
                .map(|i| {
                    let bytes: u64 = runs
                        .iter()
                        .map(|r| r.bulk_bytes.get(i).copied().unwrap_or(0))
                        .sum();
                    let secs: f64 = runs
                        .iter()
                        .map(|r| r.bulk_secs.get(i).copied().unwrap_or(0.0))
                        .sum();
                    bytes as f64 * 8.0 / secs / 1e9
                })
                .collect();
            if !(conn_per_sec.is_finite() && conn_per_sec > 0.0) {
                bail!("{what}: no connection rate");
            }
            if bulk_gbps.iter().any(|g| !(g.is_finite() && *g > 0.0)) {
                bail!("{what}: no bulk throughput");
            }
            let cost = |stats: Vec<Option<&SidecarStats>>| Cost::of(&stats, &rr_n, crr_count);
            let sidecar = cost(runs.iter().map(|r| r.sidecar.as_ref()).collect());
            let peer = cost(runs.iter().map(|r| r.peer_sidecar.as_ref()).collect());
            if *mode != Mode::Direct && sidecar.is_none() {
                bail!("{what}: the sidecar's CPU and memory were not measured");
            }
            if mode.pair() && peer.is_none() {
                bail!("{what}: the server pod's proxy's CPU and memory were not measured");
            }
            modes.push(Figures {
                mode: *mode,
                rr_us,
                rr_n,
                round_samples,
                rr_rate,
                conn_per_sec,
                round_conn,
                bulk_gbps,
                round_bulk,
                sidecar,
                peer,
                enomem_retries: runs.iter().map(|r| r.enomem_retries).sum(),
                eagain_retries: runs.iter().map(|r| r.eagain_retries).sum(),
            });
        }
        out.push(Scenario {
            name: format!("{}, {}", s.name, s.placement.label()),
            place: s.name,
            placement: s.placement,
            description: s.description,
            modes,
            failures: s.failures.clone(),
        });
    }
    Ok(out)
}

fn size_label(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Machine, kernel and date, for the report header.
pub fn machine() -> (String, String, String) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    (
        format!("{cpus} vCPU {model}, {mem_gib:.0} GiB RAM"),
        format!("Linux {}", cmd_out("uname", &["-r"])),
        cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
}

/// `/proc/loadavg`'s 1-minute figure: other work on the host adds noise to the figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

/// The external tools' results: sockperf per scenario, and wrk in the pods (full runs only).
pub struct CrossChecks<'a> {
    pub sockperf: &'a [(&'a str, Result<Vec<SockperfFigures>>)],
    pub wrk: Option<&'a Result<Vec<WrkFigures>>>,
    pub kernel: Option<&'a Result<KernelCost>>,
}

pub fn markdown(
    scenarios: &[Scenario],
    params: &Params,
    quick: bool,
    checks: &CrossChecks,
    startups: &[Startup],
    (idle, meshed): (&Idle, &Meshed),
    load_at_start: &str,
) -> String {
    let (crosschecks, http_check) = (checks.sockperf, checks.wrk);
    let (machine, kernel, date) = machine();
    let commit = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# sidecar bench{}\n",
        if quick {
            " (quick smoke run: not for conclusions)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "{date} · {kernel} · {machine} · commit {commit}\n\n\
         {} round(s) per placement, every mode once per round in an order drawn afresh for \
         each round (seed {}) ({}); per round and mode: {} timed \
         request/response exchanges per size on one persistent \
         connection (after 200 untimed), {} connect-exchange-close connections, {:.2} s of \
         bulk per stream count. Latency is the client's round trip, µs. The sidecar's CPU time \
         is utime+stime from /proc/PID/stat (10 ms ticks, summed over rounds); RSS from \
         /proc/PID/status (idle: VmRSS before the first connection; peak: VmHWM). \
         Load average (1 min) at start {load_at_start}, at end {}: other work on the host \
         shows up as noise, mostly in the tails.\n\n\
         Every scenario runs its rounds in two CPU placements, each with its own tables and \
         targets: *pinned*, the server side (echo server, and the server pod's sidecar) on \
         CPU {}, the client side (load generator, and the sidecar or HAProxy in front of it) \
         sharing CPU {}, as a pod with a one-CPU limit (`sched_setaffinity` before exec, \
         inherited by children and threads); *unpinned*, no affinity at all. `haproxy` is Debian's HAProxy in TCP mode \
         with a fixed backend, in the client's namespace where the sidecar would be: a plain \
         userspace L4 proxy to compare the proxied hop with; its CPU and RSS are measured \
         like the sidecar's.\n\n\
         The mTLS modes run two sidecars, both in the same interception mode: the client \
         pod's (`--tls-dir`, `--no-inbound`, `--mesh-cidrs <server pod>/32`) tunnels every \
         connection as an HBONE stream (HTTP/2 CONNECT over TLS 1.3, pooled connections) to \
         the server pod's, which verifies the client's SPIFFE ID \
         and connects to the pod's echo server on the pod's own address; certificates are minted for the \
         run with `sidecar cert`. Both sidecars' reports must list every connection as \
         `mtls` with the peer's SPIFFE ID, or the run fails. `ztunnel pair` is Istio's \
         ztunnel in each pod (dedicated mode, `FAKE_CA`, a `local.yaml` with both \
         workloads), the client pod's outbound TCP sent to its 15001 by an iptables \
         REDIRECT, HBONE to the server pod's on 15008; both ztunnels' access logs must list \
         every connection as complete, with both identities, the client side's to the \
         peer's 15008, or the run fails. The cost columns are the client \
         pod's proxy (sidecar, HAProxy or ztunnel); the server pod's follows in its own table. \
         Keep-alive exchanges/s is the request rate on the persistent connection: timed \
         64 B exchanges divided by the time they took (1 / mean round trip).\n",
        params.rounds,
        params.order_seed,
        Mode::ALL.map(Mode::label).join(", "),
        params.exchanges,
        params.connections,
        params.bulk_secs,
        load_average(),
        super::Side::Server.cpu(),
        super::Side::Client.cpu(),
    );
    for s in scenarios {
        let direct = s.get(Mode::Direct);
        let ipt = s.get(Mode::Iptables);
        let _ = writeln!(md, "## {}: {}\n", s.name, s.description);
        for (i, size) in SIZES.iter().enumerate() {
            let _ = writeln!(
                md,
                "### request/response latency, {} messages ({} exchanges per mode)\n",
                size_label(*size),
                direct.rr_n[i]
            );
            let _ = writeln!(
                md,
                "| mode | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 µs | p50 ×direct | p50 ×iptables | p99 ×direct | p99 ×iptables |"
            );
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for f in &s.modes {
                let p = f.rr_us[i];
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                    f.mode.label(),
                    p[0],
                    p[1],
                    p[2],
                    p[3],
                    p[0] - direct.rr_us[i][0],
                    ratio(p[0], direct.rr_us[i][0]),
                    ratio(p[0], ipt.rr_us[i][0]),
                    ratio(p[2], direct.rr_us[i][2]),
                    ratio(p[2], ipt.rr_us[i][2]),
                );
            }
            md.push('\n');
        }
        let rounds = s.modes[0].round_samples[0].len();
        let _ = writeln!(
            md,
            "### p50 of each round on its own, 64 B (µs)\n\n\
             Each round is a fresh `sidecar run`; where the scheduler puts the client, the \
             proxy's threads and the server on this host's CPUs differs from run to run, and \
             the p50 of a run can differ by 2× with it. The tables above merge all rounds.\n"
        );
        let _ = writeln!(
            md,
            "| mode |{}\n|---|{}",
            (1..=rounds)
                .map(|r| format!(" round {r} |"))
                .collect::<String>(),
            "---:|".repeat(rounds)
        );
        for f in &s.modes {
            let _ = writeln!(
                md,
                "| {} |{}",
                f.mode.label(),
                f.round_p50_us()
                    .iter()
                    .map(|v| format!(" {v:.1} |"))
                    .collect::<String>()
            );
        }
        md.push('\n');
        let _ = writeln!(md, "### connection rate, throughput and sidecar cost\n");
        let _ = writeln!(
            md,
            "| mode | keep-alive exchanges/s 64 B | conn/s | ×direct | ×iptables | bulk 1 stream Gbit/s | ×direct | ×iptables | bulk 16 streams Gbit/s | ×direct | ×iptables | CPU µs/exchange 64 B | CPU µs/exchange 4 KiB | CPU µs/conn | idle RSS MiB | peak RSS MiB | bulk writes failed ENOMEM |"
        );
        let _ = writeln!(
            md,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for f in &s.modes {
            let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
            let cost = |g: fn(&Cost) -> f64| opt(f.sidecar.as_ref().map(g));
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {} | {} | {:.2} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                f.mode.label(),
                f.rr_rate[0],
                f.conn_per_sec,
                ratio(f.conn_per_sec, direct.conn_per_sec),
                ratio(f.conn_per_sec, ipt.conn_per_sec),
                f.bulk_gbps[0],
                ratio(f.bulk_gbps[0], direct.bulk_gbps[0]),
                ratio(f.bulk_gbps[0], ipt.bulk_gbps[0]),
                f.bulk_gbps[1],
                ratio(f.bulk_gbps[1], direct.bulk_gbps[1]),
                ratio(f.bulk_gbps[1], ipt.bulk_gbps[1]),
                cost(|c| c.us_per_exchange[0]),
                cost(|c| c.us_per_exchange[1]),
                cost(|c| c.us_per_conn),
                cost(|c| c.idle_rss),
                cost(|c| c.peak_rss),
                f.enomem_retries,
            );
        }
        md.push('\n');
        peer_table(&mut md, s);
        if !s.failures.is_empty() {
            let _ = writeln!(
                md,
                "### failed attempts ({}), repeated\n\n\
                 These runs failed and were run again; the figures above are from the repeats. \
                 Their logs are in `target/bench/raw/`.\n",
                s.failures.len()
            );
            for f in &s.failures {
                let _ = writeln!(md, "- {}", f.replace('\n', " "));
            }
            md.push('\n');
        }
        if s.modes.iter().any(|f| f.enomem_retries > 0) {
            let _ = writeln!(
                md,
                "Bulk writes failed with ENOMEM: the sockmap fast path redirects the sender's \
                 bytes straight into the receiver's queue, with no backpressure; when the \
                 receiver (the proxy) falls behind, the sender's write() fails with ENOMEM \
                 instead of blocking. The bench waits 100 µs and retries; an application would \
                 see an error.\n"
            );
        }
    }
    for s in scenarios {
        let hit: Vec<String> = s
            .modes
            .iter()
            .filter(|f| f.eagain_retries > 0)
            .map(|f| format!("{} {} ({})", s.name, f.mode.label(), f.eagain_retries))
            .collect();
        if !hit.is_empty() {
            let _ = writeln!(
                md,
                "Blocking reads returned EAGAIN before their timeout (retried): {}. A spliced \
                 socket reads through the kernel's tcp_bpf_recvmsg, which gives up after one \
                 wake-up without data (docs/operations.md, Known limitations).\n",
                hit.join(", ")
            );
        }
    }
    md.push_str(&startup_section(startups));
    md.push_str(&idle_section(idle));
    md.push_str(&meshed_section(meshed));
    md.push_str(&targets(scenarios, startups, idle, meshed));
    md.push_str("\n## Cross-check with sockperf\n\n");
    let _ = writeln!(
        md,
        "`sockperf ping-pong --tcp -m 64 --full-rtt` against `sockperf server`, direct and \
         through the proxies, beside our client's 64 B figures from the same scenario's table \
         (pinned placement, where sockperf runs too): every mode of the scenario, in the pods \
         (full runs only) the mTLS pairs included. A sidecar run counts only if its report shows \
         sockperf's connections on the mode's path (`passthrough` for pass-through). sockperf \
         is another client and server (epoll-driven, its own message format) over the same \
         paths; it runs once per mode, after the rounds. The ratios to direct are compared: \
         they agree when they are within {:.0} % of each other or sockperf's lies inside our \
         ratio's bootstrap interval. When they do not, ours is the figure to trust, decided \
         before any run: it pools every round of its placement with an interval over them, \
         where sockperf's is one run of a few seconds, and our client waits for each reply \
         with a blocking read as an application does, where sockperf's busy-polling client \
         hides the wake-up a proxy adds to every reply.\n",
        (AGREEMENT - 1.0) * 100.0
    );
    if crosschecks.is_empty() {
        md.push_str("not run\n");
    }
    for (name, result) in crosschecks {
        let _ = writeln!(md, "### {name}\n");
        let figs = match result {
            Ok(figs) => figs,
            Err(e) => {
                let _ = writeln!(md, "not available: {e:#}\n");
                continue;
            }
        };
        let scenario = scenarios
            .iter()
            .find(|s| s.place == *name && s.placement == Placement::Pinned);
        let _ = writeln!(
            md,
            "| mode | sockperf exchanges | sockperf p50 µs | sockperf p99 µs | sockperf p50 ×direct | ours p50 µs | ours p50 ×direct [95 % interval] | agree |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
        let sp_direct = figs
            .iter()
            .find(|f| f.mode == Mode::Direct)
            .map(|f| f.p50_us);
        for f in figs {
            let ours = scenario.map(|s| s.get(f.mode).rr_us[0][0]);
            let ours_ratio = scenario.map(|s| latency(s.get(f.mode), s.get(Mode::Direct), 0, 0));
            let theirs = sp_direct.map(|d| f.p50_us / d);
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {} | {} | {} | {} |",
                f.mode.label(),
                f.observations,
                f.p50_us,
                f.p99_us,
                theirs.map_or("n/a".into(), |t| format!("{t:.2}×")),
                ours.map_or("n/a".into(), |o| format!("{o:.1}")),
                ours_ratio.map_or("n/a".into(), |r| r.to_string()),
                match (theirs, ours_ratio) {
                    (Some(t), Some(o)) => agreement(t, o).to_string(),
                    _ => "n/a".into(),
                }
            );
        }
        md.push('\n');
    }
    wrk_section(&mut md, scenarios, http_check);
    kernel_section(&mut md, scenarios, checks.kernel);
    md
}

/// Where a pass-through connection's added cost goes: the programs' own time per
/// connection, beside what one direct connection takes in the same placement.
fn kernel_section(md: &mut String, scenarios: &[Scenario], check: Option<&Result<KernelCost>>) {
    md.push_str(
        "
## Kernel cost of a pass-through connection (loopback, pinned)

",
    );
    let cost = match check {
        None => {
            md.push_str(
                "not run
",
            );
            return;
        }
        Some(Err(e)) => {
            let _ = writeln!(
                md,
                "not available: {e:#}
"
            );
            return;
        }
        Some(Ok(cost)) => cost,
    };
    let direct_us = scenarios
        .iter()
        .find(|s| s.place == "loopback" && s.placement == Placement::Pinned)
        .map(|s| 1e6 / s.get(Mode::Direct).conn_per_sec);
    let _ = writeln!(
        md,
        "One `sidecar run` (pass-through) whose client makes {} connect-exchange-close \
         connections, with `kernel.bpf_stats_enabled` on for that run only (set back after): \
         the kernel's own count of each program's runs and nanoseconds, read from the \
         sidecar's program descriptors before and after the loop. This is CPU time spent in \
         the programs, on the connecting thread, so it does not depend on the host's noise as \
         the ratios do (the statistics add two clock reads to each run). Beside it, the time \
         one direct connection takes in the rounds (loopback, pinned: 1 / conn/s).\n",
        cost.connections
    );
    md.push_str("| program | runs per connection | µs per connection | ns per run |\n|---|---:|---:|---:|\n");
    let mut total = 0.0;
    for r in &cost.runs {
        let Some((us, runs)) = cost.per_connection(r.prog_type) else {
            continue;
        };
        total += us;
        let _ = writeln!(
            md,
            "| {} | {runs:.1} | {us:.2} | {:.0} |",
            kernel_cost::type_name(r.prog_type),
            us * 1e3 / runs
        );
    }
    let share = direct_us.map_or("n/a".into(), |d| {
        format!(
            "{:.1} % of a direct connection's {d:.0} µs",
            total / d * 100.0
        )
    });
    let _ = writeln!(md, "| **all** | | **{total:.2}** | |\n\n{share}\n");
}

/// How far sockperf's ratio to direct may be from ours and still agree: 15 %, or inside our
/// ratio's bootstrap interval. Fixed before any run.
const AGREEMENT: f64 = 1.15;

/// Whether sockperf's p50 ratio to direct (`theirs`) agrees with ours; when it does not, the
/// row says which to trust (ours: see the section's text for why).
fn agreement(theirs: f64, ours: Ratio) -> &'static str {
    let close = (1.0 / AGREEMENT..=AGREEMENT).contains(&(theirs / ours.point));
    if close || (ours.low..=ours.high).contains(&theirs) {
        "yes"
    } else {
        "**no**: trust ours"
    }
}

/// wrk against nginx in the pods, beside our client's figures for the same modes.
fn wrk_section(md: &mut String, scenarios: &[Scenario], check: Option<&Result<Vec<WrkFigures>>>) {
    md.push_str("\n## Cross-check with wrk and nginx (pods)\n\n");
    let figs = match check {
        None => {
            md.push_str("not run (full runs only)\n");
            return;
        }
        Some(Err(e)) => {
            let _ = writeln!(md, "not available: {e:#}\n");
            return;
        }
        Some(Ok(figs)) => figs,
    };
    let _ = writeln!(
        md,
        "Debian's nginx (one worker, a 64 B static body) in the server pod on the pod's \
         address, `wrk -t1 -c16 -d5s` in the client pod: keep-alive requests/s, and with \
         `-H 'Connection: close'` one request per connection, so new connections/s. Same CPU \
         placement as the rounds; once per mode, after them. A proxied run counts only if \
         the proxies' records (both sidecars' reports, or the client ztunnel's access log) \
         list at least one connection to nginx per wrk connection (keep-alive) or per request \
         (close), with at least the bodies' bytes back, every one on the mode's path \
         (`passthrough` for `ebpf`). Beside them, our client's keep-alive \
         64 B exchanges/s (one connection, one request at a time: wrk keeps 16 in flight) and \
         conn/s from the pods table. Ratios: ×direct, ×`ebpf --proxy-all`.\n"
    );
    let scenario = scenarios
        .iter()
        .find(|s| s.place == "pods" && s.placement == Placement::Pinned);
    let find = |m: Mode| figs.iter().find(|f| f.mode == m);
    let rel = |v: f64, base: Option<f64>| base.map_or("n/a".into(), |b| ratio(v, b));
    let (direct, hop) = (find(Mode::Direct), find(Mode::EbpfProxyAll));
    let ours = |m: Mode| scenario.map(|s| (s.get(m).rr_rate[0], s.get(m).conn_per_sec));
    let (ours_direct, ours_hop) = (ours(Mode::Direct), ours(Mode::EbpfProxyAll));
    let _ = writeln!(
        md,
        "| mode | wrk keep-alive req/s | ×direct | ×proxy-all | wrk conn/s | ×direct | ×proxy-all | wrk socket errors | ours exch/s | ×direct | ×proxy-all | ours conn/s | ×direct | ×proxy-all |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for f in figs {
        let (ka, cl) = (f.keep_alive.per_sec, f.close.per_sec);
        let ours_cells = match ours(f.mode) {
            Some((exch, conn)) => format!(
                "{exch:.0} | {} | {} | {conn:.0} | {} | {}",
                rel(exch, ours_direct.map(|o| o.0)),
                rel(exch, ours_hop.map(|o| o.0)),
                rel(conn, ours_direct.map(|o| o.1)),
                rel(conn, ours_hop.map(|o| o.1)),
            ),
            None => "n/a | n/a | n/a | n/a | n/a | n/a".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {ka:.0} | {} | {} | {cl:.0} | {} | {} | {} | {ours_cells} |",
            f.mode.label(),
            rel(ka, direct.map(|d| d.keep_alive.per_sec)),
            rel(ka, hop.map(|d| d.keep_alive.per_sec)),
            rel(cl, direct.map(|d| d.close.per_sec)),
            rel(cl, hop.map(|d| d.close.per_sec)),
            f.keep_alive.errors + f.close.errors,
        );
    }
    md.push('\n');
}

/// The server pod's proxy in the modes with one in each pod, and both together.
fn peer_table(md: &mut String, s: &Scenario) {
    let rows: Vec<(&Figures, &Cost, &Cost)> = s
        .modes
        .iter()
        .filter_map(|f| Some((f, f.sidecar.as_ref()?, f.peer.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### the server pod's proxy (a proxy in each pod: sidecar or ztunnel)\n\n\
         | mode | CPU µs/exchange 64 B | CPU µs/exchange 4 KiB | CPU µs/conn | idle RSS MiB | peak RSS MiB | both proxies CPU µs/exchange 64 B | both proxies CPU µs/conn |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (f, ours, peer) in rows {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            f.mode.label(),
            peer.us_per_exchange[0],
            peer.us_per_exchange[1],
            peer.us_per_conn,
            peer.idle_rss,
            peer.peak_rss,
            ours.us_per_exchange[0] + peer.us_per_exchange[0],
            ours.us_per_conn + peer.us_per_conn,
        );
    }
    md.push('\n');
}

/// Median and worst of the sidecar's starts.
fn startup_summary(startups: &[Startup]) -> Option<[f64; 4]> {
    let pick = |f: fn(&Startup) -> f64| {
        let mut v: Vec<f64> = startups.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], *v.last().unwrap_or(&f64::NAN))
    };
    if startups.is_empty() {
        return None;
    }
    let (ready_p50, ready_max) = pick(|s| s.ready_ms);
    let (rss_p50, rss_max) = pick(|s| s.idle_rss_mib);
    Some([ready_p50, ready_max, rss_p50, rss_max])
}

fn startup_section(startups: &[Startup]) -> String {
    let Some([ready_p50, ready_max, rss_p50, rss_max]) = startup_summary(startups) else {
        return "## Sidecar startup\n\nnot measured\n\n".into();
    };
    format!(
        "## Sidecar startup\n\n`sidecar run -- sleep 30` in the loopback namespace, {} times: \
         from exec to `/readyz` answering 200 (programs attached, listeners up), and VmRSS at \
         that moment, before any connection.\n\n\
         | starts | ready p50 ms | ready max ms | idle RSS p50 MiB | idle RSS max MiB |\n\
         |---:|---:|---:|---:|---:|\n\
         | {} | {ready_p50:.1} | {ready_max:.1} | {rss_p50:.1} | {rss_max:.1} |\n\n",
        startups.len(),
        startups.len(),
    )
}

fn idle_section(idle: &Idle) -> String {
    let scaled = if idle.connections < idle::CONNECTIONS {
        format!(
            "Only {n} fitted under this host's hard RLIMIT_NOFILE (two descriptors per \
             connection in the sidecar and two in the command); the figure for {t} is scaled \
             from the cost per connection measured: {:.1} MiB.\n\n",
            idle.added_mib_at_target(),
            n = idle.connections,
            t = idle::CONNECTIONS,
        )
    } else {
        String::new()
    };
    format!(
        "## Idle proxied connections\n\n`sidecar run --proxy-all` in the loopback namespace, \
         its command opening {n} connections through it (one 64 B ping-pong each, served by the \
         command itself) and holding them idle. The sidecar's VmRSS after a warm-up of \
         connections opened and closed, and with the {n} open, each read once it stopped \
         moving.\n\n\
         | connections | RSS before MiB | RSS with them MiB | added MiB | added KiB per connection |\n\
         |---:|---:|---:|---:|---:|\n\
         | {n} | {:.1} | {:.1} | {:.1} | {:.2} |\n\n{scaled}",
        idle.before_kib as f64 / 1024.0,
        idle.with_kib as f64 / 1024.0,
        idle.added_mib(),
        idle.per_connection_kib(),
        n = idle.connections,
    )
}

/// The targets, each met or missed and by how much.
fn meshed_section(m: &Meshed) -> String {
    let n = m.client.connections;
    let scaled = if n < idle::CONNECTIONS {
        format!(
            "{n} were held (a quick run holds {}; a full one 10,000, or what fits under the \
             hard RLIMIT_NOFILE, one descriptor per connection in each process): the figures \
             for {} are scaled from the cost per connection measured.\n\n",
            idle::QUICK_MESHED,
            idle::CONNECTIONS
        )
    } else {
        String::new()
    };
    let mut md = format!(
        "## Idle meshed connections\n\nThe eBPF + mTLS pair in the pods scenario: the client \
         pod's sidecar (`--mode ebpf`, `--tls-dir`, `--mesh-cidrs`), its command opening {n} \
         connections to a hold server in the server pod (one 64 B ping-pong each) and holding \
         them idle; each is an HBONE stream of the pooled connection(s) to the server pod's \
         sidecar, which holds the leg to the hold server. VmRSS of both sidecars after a \
         warm-up ({} connections opened and closed, the pool dialled) and with the {n} \
         open; both reports must list every connection over mTLS.\n\n\
         | sidecar | connections | RSS before MiB | RSS with them MiB | added MiB | added KiB per connection | added MiB at {} |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        idle::WARMUP,
        idle::CONNECTIONS
    );
    for (who, i) in [("client pod's", &m.client), ("server pod's", &m.server)] {
        let _ = writeln!(
            md,
            "| {who} | {n} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} |",
            i.before_kib as f64 / 1024.0,
            i.with_kib as f64 / 1024.0,
            i.added_mib(),
            i.per_connection_kib(),
            i.added_mib_at_target(),
        );
    }
    md.push('\n');
    md + &scaled
}

/// Latency percentile `pct` (an index into [`PERCENTILES`]) of `a` over `b`, size `k`.
fn latency(a: &Figures, b: &Figures, k: usize, pct: usize) -> Ratio {
    verdict::percentile_ratio(&a.round_samples[k], &b.round_samples[k], PERCENTILES[pct].0)
}

/// Keep-alive exchanges/s of `a` over `b` (64 B): timed exchanges over their total time.
fn keepalive(a: &Figures, b: &Figures) -> Ratio {
    let per_round = |f: &Figures| -> Vec<(f64, f64)> {
        f.round_samples[0]
            .iter()
            .map(|r| {
                let secs = r.iter().map(|&v| f64::from(v)).sum::<f64>() / 1e9;
                (r.len() as f64, secs)
            })
            .collect()
    };
    verdict::rate_ratio(&per_round(a), &per_round(b))
}

/// The targets, each judged on pooled figures with a bootstrap interval over rounds (see
/// `verdict.rs`): met or missed only when the whole interval is on one side of the limit.
fn targets(scenarios: &[Scenario], startups: &[Startup], idle: &Idle, meshed: &Meshed) -> String {
    let mut md = String::from(
        "## Targets\n\nEvery target against another mode is judged on the pooled figures' \
         ratio with a 95 % bootstrap interval over rounds (both modes' rounds drawn together): \
         met when the whole interval is on the good side of the limit, missed when it is all \
         on the other side, inconclusive when it straddles it.\n\n\
         | target | scenario | measured: ratio [95 % interval] | verdict |\n|---|---|---|---|\n",
    );
    let verdict = |ok: bool, by: String| {
        if ok {
            format!("met ({by})")
        } else {
            format!("**missed** ({by})")
        }
    };
    let row = |md: &mut String,
               target: String,
               scenario: &str,
               r: Ratio,
               bound: Bound,
               limit: f64,
               pooled: String| {
        let sign = match bound {
            Bound::AtMost => "≤",
            Bound::AtLeast => "≥",
            Bound::Below => "<",
        };
        let _ = writeln!(
            md,
            "| {target} | {scenario} | {r} ({pooled}) | {} (limit {sign} {limit:.2}×) |",
            verdict::judge(r, bound, limit).label()
        );
    };
    for s in scenarios {
        let (df, ef) = (s.get(Mode::Direct), s.get(Mode::Ebpf));
        for (pct, name, limit) in [(0, "p50", 1.05), (2, "p99", 1.10)] {
            row(
                &mut md,
                format!("eBPF pass-through {name} ≤ {limit:.2}× direct (64 B)"),
                &s.name,
                latency(ef, df, 0, pct),
                Bound::AtMost,
                limit,
                format!("{:.1} µs vs {:.1} µs", ef.rr_us[0][pct], df.rr_us[0][pct]),
            );
        }
        // A new connection passing through costs the kernel's bookkeeping (connect hook,
        // sockops, the close record): connect, one exchange, close, against no sidecar.
        row(
            &mut md,
            "eBPF pass-through new connections/s ≥ 0.95× direct (connect, one 64 B exchange, close)".into(),
            &s.name,
            verdict::rate_ratio(&ef.round_conn, &df.round_conn),
            Bound::AtLeast,
            0.95,
            format!("{:.0} vs {:.0} conn/s", ef.conn_per_sec, df.conn_per_sec),
        );
        row(
            &mut md,
            "eBPF pass-through bulk 1 stream ≥ 0.9× direct".into(),
            &s.name,
            verdict::rate_ratio(&ef.round_bulk[0], &df.round_bulk[0]),
            Bound::AtLeast,
            0.9,
            format!("{:.2} vs {:.2} Gbit/s", ef.bulk_gbps[0], df.bulk_gbps[0]),
        );
        // The splice is opt-in: the default must be the faster of the two proxied hops.
        let (pf, sf) = (s.get(Mode::EbpfProxyAll), s.get(Mode::EbpfSockmap));
        for (k, size) in SIZES.iter().enumerate() {
            row(
                &mut md,
                format!(
                    "sockmap splice off by default: --proxy-all p50 ≤ --proxy-all --sockmap p50 ({})",
                    size_label(*size)
                ),
                &s.name,
                latency(pf, sf, k, 0),
                Bound::AtMost,
                1.0,
                format!("{:.1} µs vs {:.1} µs", pf.rr_us[k][0], sf.rr_us[k][0]),
            );
        }
        // The proxied hop against the two userspace baselines.
        let (i, h) = (s.get(Mode::Iptables), s.get(Mode::Haproxy));
        row(
            &mut md,
            "eBPF --proxy-all p50 ≤ iptables' p50 (64 B)".into(),
            &s.name,
            latency(pf, i, 0, 0),
            Bound::AtMost,
            1.0,
            format!("{:.1} µs vs {:.1} µs", pf.rr_us[0][0], i.rr_us[0][0]),
        );
        row(
            &mut md,
            "eBPF --proxy-all p99 ≤ HAProxy's p99 (64 B)".into(),
            &s.name,
            latency(pf, h, 0, 2),
            Bound::AtMost,
            1.0,
            format!("{:.1} µs vs {:.1} µs", pf.rr_us[0][2], h.rr_us[0][2]),
        );
        // The HBONE pair, where the scenario has one.
        let Some(m) = s.modes.iter().find(|f| f.mode == Mode::EbpfMtls) else {
            continue;
        };
        row(
            &mut md,
            "eBPF + mTLS new connections/s ≥ 0.8× plaintext eBPF --proxy-all".into(),
            &s.name,
            verdict::rate_ratio(&m.round_conn, &pf.round_conn),
            Bound::AtLeast,
            0.8,
            format!("{:.0} vs {:.0} conn/s", m.conn_per_sec, pf.conn_per_sec),
        );
        for (pct, name, limit) in [(0, "p50", 1.6), (2, "p99", 2.0)] {
            row(
                &mut md,
                format!("eBPF + mTLS pair {name} ≤ {limit:.1}× direct (64 B)"),
                &s.name,
                latency(m, df, 0, pct),
                Bound::AtMost,
                limit,
                format!("{:.1} µs vs {:.1} µs", m.rr_us[0][pct], df.rr_us[0][pct]),
            );
        }
        row(
            &mut md,
            "eBPF + mTLS keep-alive request rate ≥ 0.8× plaintext eBPF --proxy-all (64 B exchanges/s on one persistent connection = 1 / mean round trip)".into(),
            &s.name,
            keepalive(m, pf),
            Bound::AtLeast,
            0.8,
            format!("{:.0} vs {:.0} exchanges/s", m.rr_rate[0], pf.rr_rate[0]),
        );
        for (k, streams) in STREAMS.iter().enumerate() {
            row(
                &mut md,
                format!("eBPF + mTLS bulk ≥ 0.5× direct, {streams} stream(s)"),
                &s.name,
                verdict::rate_ratio(&m.round_bulk[k], &df.round_bulk[k]),
                Bound::AtLeast,
                0.5,
                format!("{:.2} vs {:.2} Gbit/s", m.bulk_gbps[k], df.bulk_gbps[k]),
            );
        }
        // Against the ztunnel pair: lower latency (strictly), at least its connection rate.
        let Some(z) = s.modes.iter().find(|f| f.mode == Mode::Ztunnel) else {
            continue;
        };
        for (pct, name) in [(0, "p50"), (2, "p99")] {
            row(
                &mut md,
                format!("eBPF + mTLS pair {name} < ztunnel pair's (64 B)"),
                &s.name,
                latency(m, z, 0, pct),
                Bound::Below,
                1.0,
                format!("{:.1} µs vs {:.1} µs", m.rr_us[0][pct], z.rr_us[0][pct]),
            );
        }
        row(
            &mut md,
            "eBPF + mTLS new connections/s ≥ ztunnel pair's".into(),
            &s.name,
            verdict::rate_ratio(&m.round_conn, &z.round_conn),
            Bound::AtLeast,
            1.0,
            format!("{:.0} vs {:.0} conn/s", m.conn_per_sec, z.conn_per_sec),
        );
    }
    let idle_rss = scenarios
        .iter()
        .filter_map(|s| s.get(Mode::EbpfProxyAll).sidecar.as_ref())
        .map(|c| c.idle_rss)
        .fold(0.0, f64::max);
    let _ = writeln!(
        md,
        "| sidecar idle RSS ≤ 20 MiB (eBPF --proxy-all, before the first connection of a round) | all | {idle_rss:.1} MiB | {} |",
        verdict(
            idle_rss <= 20.0,
            format!("{:+.1} MiB vs 20", idle_rss - 20.0)
        )
    );
    let added = idle.added_mib_at_target();
    let held = if idle.connections < idle::CONNECTIONS {
        format!(", scaled from {} held", idle.connections)
    } else {
        String::new()
    };
    let _ = writeln!(
        md,
        "| {} idle proxied connections add ≤ 64 MiB RSS | loopback | {added:.1} MiB ({:.2} KiB each{held}) | {} |",
        idle::CONNECTIONS,
        idle.per_connection_kib(),
        verdict(added <= 64.0, format!("{:+.1} MiB vs 64", added - 64.0))
    );
    for (who, i) in [("client", &meshed.client), ("server", &meshed.server)] {
        let added = i.added_mib_at_target();
        let held = if i.connections < idle::CONNECTIONS {
            format!(", scaled from {} held", i.connections)
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| {} idle meshed connections (one pooled peer) add ≤ 64 MiB RSS to the {who} pod's sidecar | pods | {added:.1} MiB ({:.2} KiB each{held}) | {} |",
            idle::CONNECTIONS,
            i.per_connection_kib(),
            verdict(added <= 64.0, format!("{:+.1} MiB vs 64", added - 64.0))
        );
    }
    if let Some([ready_p50, ready_max, rss_p50, _]) = startup_summary(startups) {
        let _ = writeln!(
            md,
            "| sidecar startup to ready ≤ 100 ms | loopback | p50 {ready_p50:.1} ms, max {ready_max:.1} ms | {} |",
            verdict(
                ready_p50 <= 100.0,
                format!("p50 {:+.1} ms vs 100", ready_p50 - 100.0)
            )
        );
        let _ = writeln!(
            md,
            "| idle RSS at ready ≤ 20 MiB | loopback | p50 {rss_p50:.1} MiB | {} |",
            verdict(rss_p50 <= 20.0, format!("{:+.1} MiB vs 20", rss_p50 - 20.0))
        );
    }
    md
}

/// The verdicts of `md`'s Targets table, one line each (`scenario | target | verdict`, the
/// verdict without its figures), so two runs compare with `diff`.
pub fn verdicts(md: &str) -> String {
    let Some(table) = md.split("## Targets").nth(1) else {
        return String::new();
    };
    let mut out = String::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')) {
        let Some(row) = line.strip_prefix('|') else {
            break;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        if cells.len() < 4 || cells[0] == "target" || cells[0].starts_with("---") {
            continue;
        }
        let verdict = cells[3].split(" (").next().unwrap_or("").trim_matches('*');
        let _ = writeln!(out, "{} | {} | {verdict}", cells[1], cells[0]);
    }
    out
}

/// One line for the terminal at the end.
pub fn headline(scenarios: &[Scenario]) -> String {
    let mut out = String::from("bench: 64 B p50 µs");
    for s in scenarios {
        let _ = write!(out, " | {}:", s.name);
        for f in &s.modes {
            let _ = write!(out, " {} {:.1}", f.mode.label(), f.rr_us[0][0]);
        }
    }
    out
}

/// Parses the report's tables back and fails unless every mode has a row with a number in
/// every cell (`n/a` allowed only for the sidecar's figures of the direct mode).
pub fn check(md: &str) -> Result<()> {
    let mut tables = 0;
    let mut rows_per_table = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in md.lines().chain(std::iter::once("")) {
        if let Some(cells) = line.strip_prefix('|').and_then(|l| l.strip_suffix('|')) {
            let cells: Vec<&str> = cells.split('|').map(str::trim).collect();
            if cells.iter().all(|c| c.starts_with("---") || c.is_empty()) {
                continue;
            }
            let rows = current.get_or_insert_with(Vec::new);
            let Some(mode) = Mode::ALL.iter().find(|m| m.label() == cells[0]) else {
                continue; // header or a non-mode table
            };
            for c in &cells[1..] {
                // A number, possibly with its interval after it ("1.02× [0.98, 1.07]"), or
                // the sockperf table's agreement.
                let number = c
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_end_matches('×')
                    .parse::<f64>()
                    .is_ok_and(f64::is_finite);
                let agreement = *c == "yes" || c.starts_with("**no**");
                if !(number || agreement || (*c == "n/a" && *mode == Mode::Direct)) {
                    bail!("{}: cell {c:?} is not a number in: {line}", mode.label());
                }
            }
            rows.push(mode.label().to_string());
        } else if let Some(rows) = current.take()
            && !rows.is_empty()
        {
            tables += 1;
            rows_per_table.push(rows);
        }
    }
    // Per scenario and placement: one latency table per size, the per-round table and the
    // cost table, with the single-sidecar modes (loopback) or all of them (pods); and the
    // server pod's sidecar in the mTLS modes.
    let placements = Placement::BOTH.len();
    let per_scenario = (SIZES.len() + 2) * placements;
    for (modes, wanted) in [
        (&Mode::SINGLE[..], per_scenario),
        (&Mode::ALL[..], per_scenario),
        (&Mode::PAIRS[..], placements),
    ] {
        let labels: Vec<&str> = modes.iter().map(|m| m.label()).collect();
        let found = rows_per_table.iter().filter(|r| **r == labels).count();
        if found < wanted {
            bail!(
                "expected {wanted} tables with a row for each of {labels:?}, found {found} \
                 ({tables} tables in all)"
            );
        }
    }
    Ok(())
}

/// A mode's line in the plot: its colour, and dashed for mTLS (the colour of the plain mode
/// with the same interception).
fn style(mode: Mode) -> (&'static str, &'static str) {
    match mode {
        Mode::Direct => ("#444444", "none"),
        Mode::Iptables => ("#d62728", "none"),
        Mode::Ebpf => ("#1f77b4", "none"),
        Mode::EbpfProxyAll => ("#17becf", "none"),
        Mode::EbpfSockmap => ("#2ca02c", "none"),
        Mode::Haproxy => ("#9467bd", "none"),
        Mode::IptablesMtls => ("#d62728", "6 3"),
        Mode::EbpfMtls => ("#1f77b4", "6 3"),
        Mode::Ztunnel => ("#ff7f0e", "2 2"),
    }
}

/// Latency percentiles per mode: one panel per scenario and size, log-scale y axis.
pub fn svg(scenarios: &[Scenario]) -> String {
    const PW: f64 = 380.0; // panel width
    const PH: f64 = 260.0;
    const ML: f64 = 60.0; // margins inside a panel
    const MR: f64 = 15.0;
    const MT: f64 = 30.0;
    const MB: f64 = 35.0;
    let panels: Vec<(&Scenario, usize)> = scenarios
        .iter()
        .flat_map(|s| (0..SIZES.len()).map(move |i| (s, i)))
        .collect();
    let cols = SIZES.len();
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (PW * cols as f64, PH * rows as f64 + 90.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (n, (s, i)) in panels.iter().enumerate() {
        let (x0, y0) = ((n % cols) as f64 * PW, (n / cols) as f64 * PH);
        let values: Vec<f64> = s.modes.iter().flat_map(|f| f.rr_us[*i]).collect();
        let lo = values.iter().cloned().fold(f64::MAX, f64::min).max(0.1);
        let hi = values.iter().cloned().fold(0.0, f64::max).max(lo * 1.01);
        let (llo, lhi) = (lo.log10().floor(), hi.log10().ceil());
        let (plot_w, plot_h) = (PW - ML - MR, PH - MT - MB);
        let x = |k: usize| x0 + ML + plot_w * (k as f64 + 0.5) / PERCENTILES.len() as f64;
        let y = |v: f64| y0 + MT + plot_h * (1.0 - (v.max(0.1).log10() - llo) / (lhi - llo));
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{} · {} round trip (µs, log)</text>",
            x0 + ML,
            y0 + 18.0,
            s.name,
            size_label(SIZES[*i])
        );
        // Grid: 1, 2, 5 per decade.
        let mut decade = llo;
        while decade < lhi + 0.001 {
            for m in [1.0, 2.0, 5.0] {
                let v = 10f64.powf(decade) * m;
                if v.log10() > lhi + 1e-9 {
                    continue;
                }
                let yy = y(v);
                let _ = writeln!(
                    svg,
                    "<line x1=\"{}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e0e0e0\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                    x0 + ML,
                    x0 + PW - MR,
                    x0 + ML - 5.0,
                    yy + 4.0,
                    v
                );
            }
            decade += 1.0;
        }
        for (k, (_, label)) in PERCENTILES.iter().enumerate() {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
                x(k),
                y0 + PH - MB + 16.0
            );
        }
        for f in &s.modes {
            let (color, dash) = style(f.mode);
            let coords: Vec<(f64, f64)> = f.rr_us[*i]
                .iter()
                .enumerate()
                .map(|(k, v)| (x(k), y(*v)))
                .collect();
            let points: Vec<String> = coords
                .iter()
                .map(|(px, py)| format!("{px:.1},{py:.1}"))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
                points.join(" ")
            );
            for (px, py) in &coords {
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"{color}\"/>"
                );
            }
        }
    }
    // Legend: the single-sidecar modes on the first line, the mTLS ones below.
    for (k, m) in Mode::ALL.iter().enumerate() {
        let (color, dash) = style(*m);
        let (lx, ly) = (
            20.0 + (k % 4) as f64 * 170.0,
            h - 58.0 + (k / 4) as f64 * 18.0,
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\" stroke-dasharray=\"{dash}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            lx + 25.0,
            lx + 30.0,
            ly + 4.0,
            m.label()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_one_line_per_target() {
        let md = "# x\n\n## Targets\n\ntext\n\n| target | scenario | measured | verdict |\n|---|---|---|---|\n\
                  | a ≤ 1× | pods, pinned | 1.0× [0.9, 1.1] | inconclusive (limit ≤ 1.00×) |\n\
                  | b | loopback, unpinned | 2× | **missed** (limit ≤ 1.00×) |\n\n## Next\n| x | y | z | w |\n";
        assert_eq!(
            verdicts(md),
            "pods, pinned | a ≤ 1× | inconclusive\nloopback, unpinned | b | missed\n"
        );
    }

    #[test]
    fn percentiles_of_sorted_samples() {
        let v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&[7000], 0.5), 7.0);
    }

    #[test]
    fn check_rejects_a_missing_number() {
        let row = |m: &str, v: &str| format!("| {m} | {v} | 1.00× |\n");
        let table = |modes: &[Mode], bad: Option<Mode>| {
            let mut t = String::from("| mode | x | y |\n|---|---:|---:|\n");
            for m in modes {
                t += &row(m.label(), if bad == Some(*m) { "NaN" } else { "1.5" });
            }
            t + "\n"
        };
        let scenario = |modes: &[Mode]| -> String { (0..8).map(|_| table(modes, None)).collect() };
        let pairs = table(&Mode::PAIRS, None).repeat(2);
        let good = scenario(&Mode::SINGLE) + &scenario(&Mode::ALL) + &pairs;
        assert!(check(&good).is_ok());
        for bad in [Mode::Ebpf, Mode::EbpfMtls] {
            let bad = good.clone() + &table(&Mode::ALL, Some(bad));
            assert!(check(&bad).is_err());
        }
        assert!(
            check(&(scenario(&Mode::SINGLE) + &scenario(&Mode::ALL))).is_err(),
            "no server-side table"
        );
        assert!(
            check(&(scenario(&Mode::SINGLE) + &scenario(&Mode::SINGLE) + &pairs)).is_err(),
            "no mTLS rows in the pods tables"
        );
        let one_placement =
            |modes: &[Mode]| -> String { (0..4).map(|_| table(modes, None)).collect() };
        assert!(
            check(&(one_placement(&Mode::SINGLE) + &one_placement(&Mode::ALL) + &pairs)).is_err(),
            "one placement only"
        );
    }
}
