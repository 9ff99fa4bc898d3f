//! Faults around a running `sidecar run` (issue 9, second slice): a killed run's state found
//! and removed by the next start, certificates deleted and restored, the policy file
//! corrupted and repaired, bpffs unmounted under a live run, and what each direction does
//! while the proxy is down (fail-open or fail-closed).
//!
//! Every test starts with `privileged()` (skips locally, fails in CI, when it cannot run) and
//! holds `serial()`. Traffic stays on 127.0.0.0/8 or inside network namespaces the test
//! created (prefix `scrl-`, addresses 10.206.x.x, no route out). Proxy and other ports
//! 24100–24199. Every loop is bounded in count and time, every wait has a timeout.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use sidecar_tests::{
    EchoServer, SidecarRun, assert_no_leftovers, host, leftover_files, privileged,
    protocol::{ConnectFailLine, EchoLine},
    scratch::Scratch,
    serial,
};

/// The workload binary, built by cargo for this test target.
const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");

/// `--name=value`, one argv element.
fn arg(name: &str, value: impl std::fmt::Display) -> String {
    format!("{name}={value}")
}

/// Shell that waits (bounded, 2 minutes) for `file` to exist.
fn wait_for_file(file: &Path) -> String {
    format!(
        "i=0; while [ ! -e {f} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done",
        f = file.display()
    )
}

/// Waits for the JSON line a script wrote to `file` and parses it.
fn wait_json<T: serde::de::DeserializeOwned>(file: &Path, timeout: Duration) -> T {
    let mut found = None;
    host::wait_until(timeout, || {
        found = fs::read_to_string(file)
            .ok()
            .and_then(|s| s.lines().find_map(|l| serde_json::from_str(l).ok()));
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no result in {} within {timeout:?}: {:?}",
            file.display(),
            fs::read_to_string(file)
        )
    })
}

/// Waits (bounded) until the run's stderr contains `needle`.
fn wait_stderr(run: &SidecarRun, needle: &str, timeout: Duration) -> bool {
    host::wait_until(timeout, || run.stderr_text().contains(needle))
}

// ---------------------------------------------------------------------------------------
// A killed run's state, found by the next start

/// `sidecar run` A is SIGKILLed: its links stay attached through their pins (its app is
/// fail-closed), its cgroups, pins and state file remain. Starting run B — no `sidecar
/// cleanup` — removes all of A's state with a log line naming A, and A's programs are
/// unloaded. A's app process, which was still in A's cgroup, is moved out (and keeps running).
#[test]
fn next_start_cleans_up_after_a_killed_run() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut a = SidecarRun::builder(24100)
        .arg("--admin-addr=off")
        .command(["sleep", "120"])
        .start();
    let a_pid = a.pid();
    assert!(
        host::wait_until(Duration::from_secs(20), || !a.app_pids().is_empty()),
        "run A's command did not start:\n{}",
        a.stderr_text()
    );
    let app = a.app_pids();
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(10))
        .expect("a SIGKILLed sidecar exits");
    let left = leftover_files(a_pid);
    assert_eq!(
        left.len(),
        3,
        "a killed run leaves its pins, cgroup and state file: {left:?}"
    );

    let mut b = SidecarRun::builder(24101)
        .arg("--admin-addr=off")
        .command(["true"])
        .start();
    let b_done = b.finish(Duration::from_secs(30));
    b_done.assert_exit_code(0);
    let log = b_done.stderr_text();
    let line = b_done
        .stderr
        .iter()
        .find(|l| l.contains("cleaned up after a run that was killed"))
        .unwrap_or_else(|| panic!("run B logged no clean-up of run A:\n{log}"));
    assert!(line.contains(&format!("pid={a_pid}")), "{line}");
    assert!(
        leftover_files(a_pid).is_empty(),
        "run B's start left run A's state: {:?}",
        leftover_files(a_pid)
    );
    // A's programs go with its pins (links unpinned → detached; maps unpinned → freed).
    assert_no_leftovers(a_pid);
    assert_no_leftovers(b_done.pid);
    for p in &app {
        let cg = host::cgroup_of(*p);
        assert!(
            cg.as_ref()
                .is_none_or(|c| !c.to_string_lossy().contains(&format!("run-{a_pid}"))),
            "A's app {p} is still in A's cgroup: {cg:?}"
        );
        host::kill_if_still(*p, "sleep");
    }
    drop(a);
}
