//! What the kernel half costs per pass-through connection, from the kernel's own accounting:
//! with `kernel.bpf_stats_enabled` on, every program's fdinfo counts its runs and the
//! nanoseconds they took (`run_cnt`, `run_time_ns`). The client reads them from its parent
//! sidecar's program descriptors around its connect-exchange-close loop, so the figure is the
//! connect hook's and sockops' time for exactly those connections (any other socket in the
//! workload's cgroup would add to it; the client's loop is the only traffic there).
//!
//! Unlike the rounds' ratios this does not depend on the host's noise: it is CPU time spent
//! in the programs, not a rate, so it says where a pass-through connection's added cost goes.

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// `kernel.bpf_stats_enabled`: off by default because it adds two clock reads to every
/// program run on the host.
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `BPF_PROG_TYPE_SOCK_OPS` and `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` (the connect hooks).
pub const SOCK_OPS: u32 = 13;
pub const CONNECT_HOOK: u32 = 18;

/// Runs and time of one program type over an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgRuns {
    pub prog_type: u32,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// Turns the kernel's program statistics on for as long as it lives, and puts back what
/// was there before (the host's setting is not ours to leave changed).
pub struct StatsOn {
    before: String,
}

impl StatsOn {
    pub fn new() -> Result<Self> {
        let before = fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?
            .trim()
            .to_string();
        fs::write(STATS_SYSCTL, "1").with_context(|| format!("turning on {STATS_SYSCTL}"))?;
        Ok(Self { before })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        if let Err(e) = fs::write(STATS_SYSCTL, &self.before) {
            eprintln!(
                "xtask: could not put {STATS_SYSCTL} back to {}: {e}",
                self.before
            );
        }
    }
}

/// Every eBPF program `pid` holds a descriptor of, summed by program type (each program
/// once, however many descriptors name it).
pub fn read(pid: u32) -> Result<Vec<ProgRuns>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut by_id: BTreeMap<u64, ProgRuns> = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        if let Some((id, runs)) = parse_fdinfo(&text) {
            by_id.insert(id, runs);
        }
    }
    let mut by_type: BTreeMap<u32, ProgRuns> = BTreeMap::new();
    for runs in by_id.into_values() {
        let sum = by_type.entry(runs.prog_type).or_insert(ProgRuns {
            prog_type: runs.prog_type,
            ..ProgRuns::default()
        });
        sum.run_cnt += runs.run_cnt;
        sum.run_time_ns += runs.run_time_ns;
    }
    Ok(by_type.into_values().collect())
}

/// A program descriptor's fdinfo: its id and counts; `None` for any other descriptor.
fn parse_fdinfo(text: &str) -> Option<(u64, ProgRuns)> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().parse().ok())?
        })
    };
    let runs = ProgRuns {
        prog_type: u32::try_from(field("prog_type")?).ok()?,
        run_cnt: field("run_cnt")?,
        run_time_ns: field("run_time_ns")?,
    };
    Some((field("prog_id")?, runs))
}

/// What changed between two readings, by program type.
pub fn delta(before: &[ProgRuns], after: &[ProgRuns]) -> Vec<ProgRuns> {
    after
        .iter()
        .map(|a| {
            let b = before
                .iter()
                .find(|b| b.prog_type == a.prog_type)
                .copied()
                .unwrap_or_default();
            ProgRuns {
                prog_type: a.prog_type,
                run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
            }
        })
        .filter(|d| d.run_cnt > 0)
        .collect()
}

/// The pass-through run's figures per connection.
#[derive(Debug, Clone)]
pub struct KernelCost {
    pub connections: usize,
    pub runs: Vec<ProgRuns>,
}

impl KernelCost {
    /// From a client run made with `--bpf-cost`: fails if the run has no figures, or if the
    /// connect hook did not run once per connection (then they were not the client's).
    pub fn from_run(connections: usize, runs: Option<Vec<ProgRuns>>, out: &Path) -> Result<Self> {
        let Some(runs) = runs else {
            bail!("the client wrote no program figures ({})", out.display());
        };
        let hook = runs.iter().find(|r| r.prog_type == CONNECT_HOOK);
        if hook.is_none_or(|h| h.run_cnt < connections as u64) {
            bail!(
                "the connect hook ran {} times for {connections} connections: the figures are \
                 not the client's ({})",
                hook.map_or(0, |h| h.run_cnt),
                out.display()
            );
        }
        Ok(Self { connections, runs })
    }

    /// Microseconds of program time per connection, and runs per connection, of one type.
    pub fn per_connection(&self, prog_type: u32) -> Option<(f64, f64)> {
        let r = self.runs.iter().find(|r| r.prog_type == prog_type)?;
        let n = self.connections as f64;
        Some((r.run_time_ns as f64 / 1e3 / n, r.run_cnt as f64 / n))
    }
}

pub fn type_name(prog_type: u32) -> &'static str {
    match prog_type {
        CONNECT_HOOK => "connect hook (cgroup connect4/connect6)",
        SOCK_OPS => "sockops (SYN, handshake, each state change to the close)",
        16 => "sk_msg",
        // BPF_PROG_TYPE_CGROUP_SOCK: the only one the sidecar has is the release hook.
        9 => "release hook (cgroup sock_release: a pending pass-through place given back)",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_program_s_fdinfo_and_nothing_else() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2071\nprog_type:\t13\n\
                    prog_jited:\t1\nprog_tag:\t0123456789abcdef\nmemlock:\t4096\nprog_id:\t42\n\
                    run_time_ns:\t100454772\nrun_cnt:\t260247\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_fdinfo(prog),
            Some((
                42,
                ProgRuns {
                    prog_type: 13,
                    run_cnt: 260_247,
                    run_time_ns: 100_454_772
                }
            ))
        );
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nkey_size:\t8\nmap_id:\t7\n";
        assert_eq!(parse_fdinfo(map), None);
        let socket = "pos:\t0\nflags:\t02\nmnt_id:\t9\nino:\t1\n";
        assert_eq!(parse_fdinfo(socket), None);
    }

    #[test]
    fn the_delta_is_per_type_and_drops_programs_that_did_not_run() {
        let before = [
            ProgRuns {
                prog_type: 13,
                run_cnt: 10,
                run_time_ns: 1_000,
            },
            ProgRuns {
                prog_type: 16,
                run_cnt: 5,
                run_time_ns: 50,
            },
        ];
        let after = [
            ProgRuns {
                prog_type: 13,
                run_cnt: 140,
                run_time_ns: 51_000,
            },
            ProgRuns {
                prog_type: 16,
                run_cnt: 5,
                run_time_ns: 50,
            },
            ProgRuns {
                prog_type: 18,
                run_cnt: 10,
                run_time_ns: 17_000,
            },
        ];
        let d = delta(&before, &after);
        assert_eq!(
            d,
            vec![
                ProgRuns {
                    prog_type: 13,
                    run_cnt: 130,
                    run_time_ns: 50_000
                },
                ProgRuns {
                    prog_type: 18,
                    run_cnt: 10,
                    run_time_ns: 17_000
                },
            ]
        );
        let cost = KernelCost::from_run(10, Some(d), Path::new("x")).unwrap();
        assert_eq!(cost.per_connection(SOCK_OPS), Some((5.0, 13.0)));
        assert_eq!(cost.per_connection(CONNECT_HOOK), Some((1.7, 1.0)));
        assert!(KernelCost::from_run(11, Some(cost.runs.clone()), Path::new("x")).is_err());
        assert!(KernelCost::from_run(10, None, Path::new("x")).is_err());
    }
}
