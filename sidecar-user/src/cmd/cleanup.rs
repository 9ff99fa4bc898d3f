//! `sidecar cleanup`: remove what crashed runs left behind — pinned links (which keeps their
//! programs attached), pinned maps, cgroups, state files, a bpffs mount we made. Safe to run
//! any time: a run that is still alive is left alone. Running it twice does nothing the
//! second time.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Result;
use tracing::warn;

use crate::{
    cmd::state::{self, RunState},
    host::{bpffs, cgroup, privileges},
    redirect::iptables,
};

/// What one cleanup did, line by line, for the user.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub actions: Vec<String>,
    /// Live runs, left alone on purpose.
    pub live: Vec<String>,
    /// What could not be removed (the exit code is non-zero when this is not empty).
    pub skipped: Vec<String>,
}

pub fn cleanup(bpffs_path: &Path) -> Result<Cleaned> {
    privileges::require("sidecar cleanup")?;
    let cg_root = cgroup::root()?;
    let mut done = Cleaned::default();
    // Every bpffs a run used: one the sidecar mounted is unmounted once nobody uses it.
    let mut bpffs_paths = std::collections::BTreeSet::from([bpffs_path.to_path_buf()]);

    for (file, parsed) in state::list() {
        let state = match parsed {
            Ok(s) => s,
            Err(e) => {
                done.skipped.push(format!(
                    "{}: unreadable ({e}); remove it by hand",
                    file.display()
                ));
                continue;
            }
        };
        bpffs_paths.insert(state.bpffs.clone());
        if run_is_alive(&state, &cg_root) {
            done.live
                .push(format!("run {} is still running: left alone", state.pid));
            continue;
        }
        clean_run(&state, &cg_root, &mut done);
        if fs::remove_file(&file).is_ok() {
            done.actions
                .push(format!("removed state file {}", file.display()));
        }
    }

    // Leftovers without a state file (e.g. a crash before it was written).
    remove_orphan_chains(&mut done);
    for dir in run_dirs(&bpffs_path.join("sidecar")) {
        if !pid_of(&dir).is_some_and(pid_alive) {
            remove_pins(&dir, &mut done);
        }
    }
    for dir in run_dirs(&cg_root.join("sidecar")) {
        if !pid_of(&dir).is_some_and(pid_alive) {
            remove_cgroup(&dir, &cg_root, &cg_root, &mut done);
        }
    }
    for parent in [bpffs_path.join("sidecar"), cg_root.join("sidecar")] {
        if fs::remove_dir(&parent).is_ok() {
            done.actions.push(format!("removed {}", parent.display()));
        }
    }
    for path in bpffs_paths {
        if bpffs::unmount_if_unused(&path) {
            done.actions
                .push(format!("unmounted bpffs at {}", path.display()));
        }
    }
    Ok(done)
}

/// A run found dead by [`clean_dead_runs`].
#[derive(Debug, Default)]
pub struct DeadRun {
    /// What was removed (nothing if `workload` is not empty).
    pub cleaned: Cleaned,
    /// Processes of the run's command still in its cgroup: the run is left as it is.
    pub workload: Vec<u32>,
}

/// What `sidecar run` does before it creates anything: remove the state of runs that were
/// killed (SIGKILL, crash, OOM) — links, pins, cgroups, state file — without waiting for
/// someone to run `sidecar cleanup`.
///
/// Stricter than [`cleanup`] about what counts as dead, because it runs unasked while other
/// runs may be starting: the pid must be gone AND the run's `proxy` cgroup empty (the sidecar
/// is the only process there, so a live run in another pid namespace is never taken for
/// dead). And a dead run whose command still runs is **left alone**: its links keep that
/// workload fail-closed (outbound connects refused, strict inbound still dropping) until an
/// operator decides with `sidecar cleanup`; another run starting must not silently turn it
/// into an unmeshed process. Unreadable state files are left to `sidecar cleanup`.
///
/// Limit: a run starting in ANOTHER pid namespace is recognised as alive only once it sits in
/// its proxy cgroup (a few milliseconds after it writes its state file); standalone runs share
/// one pid namespace, where the pid check covers that window.
pub fn clean_dead_runs(bpffs_path: &Path, cg_root: &Path) -> Vec<(u32, DeadRun)> {
    // None: not dead. Some(pids): dead, with these processes of its command still inside.
    let dead = |pid: u32, run_cgroup: &Path| {
        (!pid_alive(pid) && procs_under(&run_cgroup.join("proxy"), 0).is_empty())
            .then(|| procs_under(run_cgroup, 0))
    };
    let mut runs: std::collections::BTreeMap<u32, DeadRun> = Default::default();
    for (file, parsed) in state::list() {
        let Ok(state) = parsed else { continue };
        let Some(workload) = dead(state.pid, &state.run_cgroup) else {
            continue;
        };
        let run = runs.entry(state.pid).or_default();
        if !workload.is_empty() {
            run.workload = workload;
            continue;
        }
        clean_run(&state, cg_root, &mut run.cleaned);
        if fs::remove_file(&file).is_ok() {
            run.cleaned
                .actions
                .push(format!("removed state file {}", file.display()));
        }
    }
    // Pins and cgroups of dead runs that had no state file (killed before writing it).
    for dir in run_dirs(&bpffs_path.join("sidecar")) {
        let Some(pid) = pid_of(&dir) else { continue };
        match dead(pid, &cg_root.join(format!("sidecar/run-{pid}"))) {
            Some(w) if w.is_empty() => remove_pins(&dir, &mut runs.entry(pid).or_default().cleaned),
            Some(w) => runs.entry(pid).or_default().workload = w,
            None => {}
        }
    }
    for dir in run_dirs(&cg_root.join("sidecar")) {
        let Some(pid) = pid_of(&dir) else { continue };
        match dead(pid, &dir) {
            Some(w) if w.is_empty() => remove_cgroup(
                &dir,
                cg_root,
                cg_root,
                &mut runs.entry(pid).or_default().cleaned,
            ),
            Some(w) => runs.entry(pid).or_default().workload = w,
            None => {}
        }
    }
    runs.into_iter()
        .filter(|(_, r)| {
            !r.workload.is_empty() || !r.cleaned.actions.is_empty() || !r.cleaned.skipped.is_empty()
        })
        .collect()
}

/// [`clean_dead_runs`], each run reported in one warning (the default log level shows it).
pub fn clean_dead_runs_logged(bpffs_path: &Path, cg_root: &Path) {
    for (pid, dead) in clean_dead_runs(bpffs_path, cg_root) {
        if !dead.workload.is_empty() {
            warn!(
                pid,
                workload = ?dead.workload,
                "found a run that was killed while its command still runs: left as it is \
                 (fail-closed: its connects are refused); `sidecar cleanup` releases it"
            );
            continue;
        }
        let (unpinned, other): (Vec<&String>, Vec<&String>) = dead
            .cleaned
            .actions
            .iter()
            .partition(|a| a.starts_with("unpinned "));
        let other: Vec<&str> = other.iter().map(|s| s.as_str()).collect();
        warn!(
            pid,
            "cleaned up after a run that was killed: unpinned {} link(s) and map(s); {}",
            unpinned.len(),
            other.join("; ")
        );
        for problem in dead.cleaned.skipped {
            warn!(pid, "could not clean up after a killed run: {problem}");
        }
    }
}

/// Processes in `dir` and its descendant cgroups (bounded depth; a missing dir has none).
fn procs_under(dir: &Path, depth: u32) -> Vec<u32> {
    let mut pids = cgroup::pids(dir).unwrap_or_default();
    if depth < 8
        && let Ok(entries) = fs::read_dir(dir)
    {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(procs_under(&e.path(), depth + 1));
            }
        }
    }
    pids
}

fn clean_run(state: &RunState, cg_root: &Path, done: &mut Cleaned) {
    if let Some(rules) = &state.iptables {
        remove_chains(rules, done);
    }
    remove_pins(&state.pin_dir, done);
    let _ = fs::remove_dir(state.pin_dir.parent().unwrap_or(&state.pin_dir));
    remove_cgroup(&state.run_cgroup, &state.original_cgroup, cg_root, done);
    // The bpffs mount is not the dead run's alone: the caller (a starting run) may be about
    // to pin there. Only `sidecar cleanup` unmounts, and only when no live process uses it.
}

/// iptables mode: the jump in nat OUTPUT, then the chain, in each family.
fn remove_chains(rules: &iptables::Rules, done: &mut Cleaned) {
    let failures = iptables::remove(rules);
    if failures.is_empty() {
        done.actions.push(format!(
            "removed iptables chain {} and its jump ({}, {})",
            rules.chain,
            rules.tool.backend.as_str(),
            rules
                .families
                .iter()
                .map(|f| match f {
                    iptables::Family::V4 => "IPv4",
                    iptables::Family::V6 => "IPv6",
                })
                .collect::<Vec<_>>()
                .join("+")
        ));
    }
    done.skipped.extend(failures);
}

/// `SIDECAR-<pid>` chains of dead pids with no state file. Only when iptables is installed;
/// only the nat table, only our chains and the jumps to them.
fn remove_orphan_chains(done: &mut Cleaned) {
    let Ok(tool) = iptables::detect() else {
        return;
    };
    for family in [iptables::Family::V4, iptables::Family::V6] {
        for (chain, pid) in iptables::our_chains(&tool, family) {
            if pid_alive(pid) {
                continue;
            }
            let rules = iptables::Rules {
                tool: tool.clone(),
                chain,
                cgroup_path: String::new(),
                families: vec![family],
            };
            remove_chains(&rules, done);
        }
    }
}

/// A run is alive while its process exists and still sits in the run's proxy cgroup (so a
/// reused pid is not mistaken for it).
fn run_is_alive(state: &RunState, cg_root: &Path) -> bool {
    pid_alive(state.pid)
        && cgroup::of_process(cg_root, &state.pid.to_string())
            .is_ok_and(|cg| cg.starts_with(&state.run_cgroup))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `run-<pid>` directories below `parent`.
fn run_dirs(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| pid_of(p).is_some())
        .collect()
}

fn pid_of(dir: &Path) -> Option<u32> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("run-")?
        .parse()
        .ok()
}

/// Removing a pinned link detaches its program; removing a pinned map frees it once unused.
fn remove_pins(dir: &Path, done: &mut Cleaned) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => done.actions.push(format!("unpinned {}", path.display())),
            Err(e) => done
                .skipped
                .push(format!("cannot unpin {}: {e}", path.display())),
        }
    }
    if fs::remove_dir(dir).is_ok() {
        done.actions.push(format!("removed {}", dir.display()));
    }
}

/// Moves any process still inside (the crashed run's command keeps running, no longer
/// intercepted) to `evict_to`, or the root if that is gone, then removes the cgroups.
fn remove_cgroup(path: &Path, evict_to: &Path, cg_root: &Path, done: &mut Cleaned) {
    if !path.exists() {
        return;
    }
    let target = if evict_to.exists() { evict_to } else { cg_root };
    let mut dirs = vec![path.to_path_buf()];
    if let Ok(entries) = fs::read_dir(path) {
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for dir in &dirs {
        for pid in cgroup::pids(dir).unwrap_or_default() {
            match cgroup::move_process(target, pid) {
                Ok(()) => done.actions.push(format!(
                    "moved pid {pid} out of {} to {}",
                    dir.display(),
                    target.display()
                )),
                Err(e) => done.skipped.push(e.to_string()),
            }
        }
    }
    match cgroup::remove_tree(path) {
        Ok(()) => done
            .actions
            .push(format!("removed cgroup {}", path.display())),
        Err(e) => done.skipped.push(e.to_string()),
    }
}

/// `sidecar cleanup`'s flags.
#[derive(clap::Args)]
pub struct CleanupArgs {
    /// bpffs mount point the runs used.
    #[arg(long, default_value = crate::defaults::BPFFS)]
    pub bpffs: std::path::PathBuf,
}

impl CleanupArgs {
    /// Prints what was removed, what is still alive and what could not be cleaned up; exit
    /// status 1 if anything could not.
    pub fn run(self) -> anyhow::Result<i32> {
        let done = cleanup(&self.bpffs)?;
        for a in &done.actions {
            println!("{a}");
        }
        for l in &done.live {
            println!("{l}");
        }
        for s in &done.skipped {
            println!("could not clean up: {s}");
        }
        if done.actions.is_empty() && done.skipped.is_empty() {
            println!("nothing to clean up");
        }
        Ok(if done.skipped.is_empty() { 0 } else { 1 })
    }
}
