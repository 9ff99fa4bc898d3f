//! Helpers for the integration tests of the `sidecar` binary against the real kernel.
//!
//! The tests need root: they create cgroups, load eBPF programs and read pinned maps. They
//! check that themselves ([`privileged`]): without privileges they skip locally and FAIL in
//! CI, so a misconfigured CI job can never pass by skipping everything.
//!
//! Modules:
//! - [`run`]: start `sidecar run`, wait for the client, collect exit code, output and report,
//!   and clean up whatever happens;
//! - [`echo`]: the upstream server, which records who connected to it;
//! - [`blocking`]: blocking socket calls that retry (and count) spurious `EAGAIN`;
//! - [`sockets`]: which process owns a socket ([`socket_owner_pid`]);
//! - [`bpf`]: the run's pinned maps and the host's loaded programs;
//! - [`host`]: cgroups, pins, state file, processes;
//! - [`leaks`]: what a live sidecar holds (fds, memory, map entries), for leak checks;
//! - [`kubelet`]: Secret/ConfigMap volumes written the way kubelet writes them;
//! - [`report`]: the `--report` JSON;
//! - [`script`]: argv and shell pieces of a run's workload;
//! - [`protocol`]: what `sidecar-testclient` prints;
//! - [`ports`]: free TCP ports for a test, from one allocator;
//! - [`admin`]: requests to a sidecar's admin server;
//! - [`node`]: a simulated Kubernetes node (agent, pods, unprivileged sidecars) for the
//!   `kubernetes_*` tests;
//! - [`manifests`]: our rules for `deploy/` and the `Dockerfile`, and the schema validator;
//! - [`ztunnel`]: Istio's ztunnel in a pod's namespace, the reference HBONE peer.

pub mod admin;
pub mod blocking;
pub mod bpf;
pub mod echo;
pub mod host;
pub mod kubelet;
pub mod leaks;
pub mod manifests;
pub mod netns;
pub mod node;
pub mod ports;
pub mod protocol;
pub mod report;
pub mod run;
pub mod scratch;
pub mod script;
pub mod sockets;
pub mod ztunnel;

use std::{
    path::PathBuf,
    sync::{Mutex, MutexGuard, OnceLock, PoisonError},
    time::Duration,
};

pub use echo::EchoServer;
pub use host::cgroup2_root;
pub use report::{Connection, Counters, Report};
pub use run::{Finished, SidecarRun};
pub use sockets::socket_owner_pid;

/// Whether the privileged tests can run here: root, with the capabilities to load BPF
/// programs, a writable cgroup v2 hierarchy, and a usable `bpf()` syscall.
///
/// When they cannot: with `CI` set this panics (CI must fail, never skip); otherwise it
/// prints `skipping: <reason>` and returns false, and the test returns early.
pub fn privileged() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    match CHECK.get_or_init(check_privileges) {
        Ok(()) => {
            // Before any run starts: which of our programs were loaded by someone else.
            bpf::baseline_program_ids();
            true
        }
        Err(reason) => skip(reason),
    }
}

/// For a test that cannot run in this environment: panics in CI, else prints why and
/// returns false (so `if !skip(..) { return }` and `return skip(..)` both read well).
pub fn skip(reason: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set, so this test must not be skipped, but it cannot run: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

/// Whether `tool` is on `PATH`; if not, [`skip`] (which panics in CI) says so.
pub fn require(tool: &str) -> bool {
    host::which(tool).is_some() || skip(&format!("{tool} is not installed (.ci/run installs it)"))
}

fn check_privileges() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "not root: these tests load eBPF programs and create cgroups (run \
                    `sudo -E cargo xtask test`)"
                .into(),
        );
    }
    let caps = effective_capabilities();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN))) {
        return Err(format!(
            "root without CAP_SYS_ADMIN (or CAP_BPF+CAP_NET_ADMIN): effective capabilities \
             {caps:#x} (an unprivileged container?)"
        ));
    }
    let cg2 = cgroup2_root().ok_or("no cgroup v2 hierarchy is mounted (see /proc/mounts)")?;
    if !is_writable(&cg2) {
        return Err(format!(
            "the cgroup v2 hierarchy at {} is not writable",
            cg2.display()
        ));
    }
    match aya::programs::loaded_programs().next() {
        Some(Err(e)) => Err(format!("the bpf() syscall is not usable: {e}")),
        _ => Ok(()),
    }
}

/// `CapEff` from `/proc/self/status`.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// access(W_OK): catches read-only mounts, which root's DAC override does not bypass.
fn is_writable(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Serializes the privileged tests: they share the host's cgroup root, the root-attached
/// sockops program, the loaded-program baseline and loopback ports. Within one test binary a
/// mutex does it; across test binaries and checkouts on the same host (two worktrees testing
/// at once) an exclusive `flock` on [`SERIAL_LOCK`] does. A test that panicked while holding
/// it poisons the mutex; the next test still runs (its own guard cleans up after the failure).
pub fn serial() -> Serial {
    static SERIAL: Mutex<()> = Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(SERIAL_LOCK)
        .unwrap_or_else(|e| panic!("cannot open the test lock {SERIAL_LOCK}: {e}"));
    // SAFETY: flock on a descriptor we own; it is released when `file` is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {SERIAL_LOCK}: {}",
        std::io::Error::last_os_error()
    );
    Serial {
        _file: file,
        _guard: guard,
    }
}

/// The host-wide lock file of [`serial`] (on tmpfs: it never outlives a boot).
pub const SERIAL_LOCK: &str = "/run/sidecar-tests.lock";

/// Held by a privileged test for its whole body; see [`serial`].
pub struct Serial {
    _file: std::fs::File,
    _guard: MutexGuard<'static, ()>,
}

/// The `sidecar` binary: `$SIDECAR_BIN`, or `target/<profile>/sidecar` next to the
/// directory of this test executable (`target/<profile>/deps/`). Panics if it is missing:
/// `cargo test` does not build it together with the eBPF object, `cargo xtask test` does.
pub fn sidecar_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SIDECAR_BIN") {
        return path.into();
    }
    let bin = profile_dir().join("sidecar");
    if !bin.is_file() {
        panic!(
            "the sidecar binary is missing at {}: run `cargo xtask test`, which builds the eBPF \
             object and the sidecar before running the tests (or set SIDECAR_BIN)",
            bin.display()
        );
    }
    bin
}

/// The `sidecar` built against the test-only eBPF object whose `COOKIE_ORIG_DST` evicts
/// nothing (`sidecar-ebpf`'s `fillable-map-for-tests`), so a test can fill the map and make
/// the connect hook's insert fail. `cargo xtask test` builds it next to [`sidecar_bin`]'s.
pub fn sidecar_fillable_map_bin() -> PathBuf {
    let bin = profile_dir().join("sidecar-fillable-map");
    if !bin.is_file() {
        panic!(
            "the fillable-map sidecar is missing at {}: run `cargo xtask test`, which builds it \
             (with `cargo xtask build-ebpf --fillable-map-for-tests` and the sidecar-user \
             feature of the same name)",
            bin.display()
        );
    }
    bin
}

/// `sidecar-testclient`, from the directory [`sidecar_bin`] looks in: cargo builds this
/// package's binaries there before it runs an integration test (`env!("CARGO_BIN_EXE_…")`
/// only exists in the test's own crate, and names the same file).
pub fn testclient_bin() -> PathBuf {
    let bin = profile_dir().join("sidecar-testclient");
    assert!(
        bin.is_file(),
        "the test client is missing at {}: it is built with this package's integration tests",
        bin.display()
    );
    bin
}

/// `target/<profile>/`: the parent of this test executable's directory
/// (`target/<profile>/deps/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps/")
        .to_path_buf()
}

/// The files run `pid` owns that still exist: pin directory, cgroup, state file. The
/// sidecar removes them before it exits, so they are checked without waiting.
pub fn leftover_files(pid: u32) -> Vec<String> {
    [
        ("pin directory", host::pin_dir(pid)),
        ("cgroup", host::run_cgroup(pid)),
        ("state file", host::state_file(pid)),
    ]
    .into_iter()
    .filter(|(_, path)| path.exists())
    .map(|(what, path)| format!("{what} {}", path.display()))
    .collect()
}

/// Asserts that run `pid` left nothing behind: its [`leftover_files`], and any loaded
/// program of ours (names truncated to 15 bytes by the kernel).
///
/// Programs get a few seconds: the kernel frees a sockhash (which holds the sk_msg program)
/// from a workqueue after an RCU grace period, so the last program can outlive the process
/// briefly. Note that a socket still open in the sockhash keeps the sk_msg program alive
/// (its psock holds a reference), so every spliced socket must be closed before this.
pub fn assert_no_leftovers(pid: u32) {
    let mut left = leftover_files(pid);
    let mut programs = Vec::new();
    host::wait_until(Duration::from_secs(5), || {
        programs = bpf::leftover_programs(pid).unwrap_or_else(|e| panic!("{e:#}"));
        programs.is_empty()
    });
    for p in &programs {
        left.push(format!(
            "BPF program {} (id {}, maps {:?})",
            p.name, p.id, p.map_ids
        ));
    }
    assert!(
        left.is_empty(),
        "sidecar run {pid} left things behind:\n  {}",
        left.join("\n  ")
    );
}
