//! `cargo xtask bench --windows`: the eBPF + mTLS pair in the pods with several HBONE
//! flow-control windows (both sidecars), direct in every round beside them, to choose the
//! default. Each round runs every setting once, in an order rotated per round, so a noisy
//! moment does not fall on one setting; the table gives medians over the rounds.

use std::{fmt::Write as _, fs, net::SocketAddr, path::Path};

use anyhow::{Context, Result};

use super::{
    Bins, Client, Mode, Params, Progress, SERVER_PORT, Server,
    load::ClientResult,
    mesh::Mesh,
    netns::{POD_SERVER_IP, Pods},
    plain_server, run_client,
};
use crate::step;

/// (stream window, connection window) in KiB, both sidecars. 1 MiB / 4 MiB is our default,
/// 4 MiB / 16 MiB ztunnel's, 64 KiB HTTP/2's own.
const SETTINGS: [(u32, u32); 6] = [
    (64, 64),
    (256, 1024),
    (1024, 4096),
    (4096, 4096),
    (4096, 16384),
    (16384, 65536),
];

const ROUNDS: usize = 5;

/// One setting's runs (or direct's, with no setting).
struct Column {
    setting: Option<(u32, u32)>,
    runs: Vec<ClientResult>,
}

pub fn sweep(bins: &Bins, raw: &Path, out: &Path) -> Result<()> {
    let params = Params {
        rounds: ROUNDS,
        exchanges: 1_000,
        connections: 100,
        bulk_secs: 1.0,
        order_seed: 0,
        bpf_cost: false,
    };
    let pods = Pods::create()?;
    let server = SocketAddr::new(POD_SERVER_IP.parse()?, SERVER_PORT);
    let _server = Server::start(plain_server(&bins.load, server), &pods.server)?;
    let meshes: Vec<Mesh> = SETTINGS
        .iter()
        .map(|(stream, conn)| {
            Mesh::with_options(
                &bins.sidecar,
                &pods.server,
                server,
                &[
                    format!("--hbone-stream-window-kib={stream}"),
                    format!("--hbone-connection-window-kib={conn}"),
                ],
            )
        })
        .collect::<Result<_>>()?;
    let mut columns: Vec<Column> = std::iter::once(None)
        .chain(SETTINGS.iter().copied().map(Some))
        .map(|setting| Column {
            setting,
            runs: Vec::new(),
        })
        .collect();
    let mut progress = Progress::new(ROUNDS * columns.len());
    for round in 0..ROUNDS {
        let count = columns.len();
        for i in (0..count).map(|i| (i + round) % count) {
            let column = &mut columns[i];
            let (mode, mesh, name) = match column.setting {
                None => (Mode::Direct, None, "direct".to_owned()),
                Some((s, c)) => (
                    Mode::EbpfMtls,
                    Some(&meshes[i - 1]),
                    format!("windows-{s}-{c}"),
                ),
            };
            progress.say(&format!("windows, round {}/{ROUNDS}, {name}", round + 1));
            let client = Client {
                ns: &pods.client,
                server,
                mesh,
                ztunnel: None,
            };
            let result = run_client(
                bins,
                &client,
                mode,
                &params,
                &raw.join(format!("{name}-{round}")),
            )
            .with_context(|| format!("{name}, round {}", round + 1))?;
            column.runs.push(result);
            progress.tick();
        }
    }
    progress.done();
    let table = markdown(&columns);
    fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    println!("{table}");
    step(&format!("wrote {}", out.display()));
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median over the rounds of bulk Gbit/s with `streams` index, and of each round's 64 B p50.
fn figures(runs: &[ClientResult]) -> ([f64; 2], f64) {
    let gbits = |i: usize| {
        median(
            runs.iter()
                .map(|r| r.bulk_bytes[i] as f64 * 8.0 / r.bulk_secs[i] / 1e9)
                .collect(),
        )
    };
    let p50_us = median(
        runs.iter()
            .map(|r| {
                let mut ns = r.rr_ns[0].clone();
                ns.sort_unstable();
                f64::from(ns[ns.len() / 2]) / 1000.0
            })
            .collect(),
    );
    ([gbits(0), gbits(1)], p50_us)
}

fn markdown(columns: &[Column]) -> String {
    let (direct_bulk, direct_p50) = figures(&columns[0].runs);
    let mut md = format!(
        "HBONE flow-control windows, eBPF + mTLS pair in the pods ({ROUNDS} interleaved rounds, \
         medians; bulk 1 s per stream count; both sidecars set alike)\n\n\
         | stream / connection window | bulk 1 stream Gbit/s (× direct) | bulk 16 streams Gbit/s (× direct) | 64 B p50 µs (× direct) | client sidecar peak RSS MiB |\n\
         |---|---:|---:|---:|---:|\n\
         | direct | {:.2} | {:.2} | {direct_p50:.1} | – |\n",
        direct_bulk[0], direct_bulk[1]
    );
    for c in &columns[1..] {
        let ((s, conn), (bulk, p50)) = (c.setting.unwrap_or_default(), figures(&c.runs));
        let rss = median(
            c.runs
                .iter()
                .filter_map(|r| r.sidecar.as_ref())
                .map(|s| s.peak_rss_kib as f64 / 1024.0)
                .collect(),
        );
        let _ = writeln!(
            md,
            "| {s} KiB / {conn} KiB | {:.2} ({:.2}) | {:.2} ({:.2}) | {p50:.1} ({:.2}) | {rss:.1} |",
            bulk[0],
            bulk[0] / direct_bulk[0],
            bulk[1],
            bulk[1] / direct_bulk[1],
            p50 / direct_p50
        );
    }
    md
}
