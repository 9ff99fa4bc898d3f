//! Driving `sidecar run`: a guard around the child process that captures its output, lets
//! the test release a `hold` client (by closing stdin), and — whatever happens in the test —
//! kills the run and runs `sidecar cleanup` when dropped, so a failure leaves nothing behind.

use std::{
    ffi::{OsStr, OsString},
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    host::{self, wait_child},
    netns::PodPair,
    protocol::{self, HoldLine, READY},
    report::Report,
    sidecar_bin,
};

/// How long Drop waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
/// How long the output readers may take to see EOF once the sidecar has exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Deadline for `sidecar cleanup`.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Command lines containing this are ours to kill (see [`host::kill_if_still`]).
const CLIENT_NAME: &str = "sidecar-testclient";

/// Lines of a child's output streams, in arrival order, filled by one reader thread per
/// stream; closed once every stream reached EOF.
#[derive(Default)]
pub(crate) struct Captured {
    /// The lines so far, and how many streams are still open.
    state: Mutex<(Vec<String>, usize)>,
    changed: Condvar,
}

impl Captured {
    /// Reads `pipe` line by line until EOF. The lines `echo` accepts are also echoed
    /// (labelled) to the test's stderr: the harness shows them only when the test fails.
    pub(crate) fn spawn_reader(
        self: &Arc<Self>,
        pipe: impl Read + Send + 'static,
        label: String,
        echo: fn(&str) -> bool,
    ) {
        self.lock().1 += 1;
        let this = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if echo(&line) {
                    eprintln!("[{label}] {line}");
                }
                this.lock().0.push(line);
                this.changed.notify_all();
            }
            this.lock().1 -= 1;
            this.changed.notify_all();
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<String>, usize)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.lock().0.clone()
    }

    /// Every stream reached EOF (the process exited).
    pub(crate) fn closed(&self) -> bool {
        self.lock().1 == 0
    }

    /// Waits until `done(lines, closed)` holds or `timeout` passes; returns whether it held.
    pub(crate) fn wait(&self, timeout: Duration, done: impl Fn(&[String], bool) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if done(&state.0, state.1 == 0) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Options of one `sidecar run`, built fluently by the tests.
#[must_use]
pub struct RunBuilder {
    proxy_port: u16,
    wrapper: Vec<OsString>,
    args: Vec<OsString>,
    command: Vec<OsString>,
    report: bool,
    binary: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    passthrough: bool,
}

impl RunBuilder {
    /// Leave kernel pass-through on (the product's default). Without this the run gets
    /// `--proxy-all`: most suites test the proxied path, which pass-through would skip for
    /// their plaintext connections; `tests/tests/passthrough.rs` tests pass-through itself.
    pub fn passthrough(mut self) -> Self {
        self.passthrough = true;
        self
    }

    /// An environment variable for the sidecar (e.g. `SIDECAR_LOG`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().into(), value.as_ref().into()));
        self
    }

    /// Run this `sidecar` binary instead of the workspace's (e.g. a copy other users can
    /// execute).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// An extra `sidecar run` option (before `--`).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().into());
        self
    }

    /// The client pod's mTLS sidecar of a [`PodPair`]: runs in pod A with `--tls-dir
    /// <tls_dir> --no-inbound` and tunnels whatever goes to pod B (`--mesh-cidrs <B>/32`).
    pub fn meshed_client_of(self, pods: &PodPair, tls_dir: impl AsRef<OsStr>) -> Self {
        self.wrapped_in(pods.a.enter())
            .arg("--tls-dir")
            .arg(tls_dir)
            .arg("--no-inbound")
            .arg("--mesh-cidrs")
            .arg(format!("{}/32", pods.b.addr))
    }

    /// Do not pass `--report` (bad-input tests: only the error path is under test).
    pub fn no_report(mut self) -> Self {
        self.report = false;
        self
    }

    /// Start the sidecar through another program (`setpriv … sidecar run …`), which must
    /// exec it so the child's pid stays the sidecar's pid.
    pub fn wrapped_in<S: AsRef<OsStr>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.wrapper = argv.into_iter().map(|a| a.as_ref().into()).collect();
        self
    }

    /// The command to run inside the sidecar (after `--`).
    pub fn command<S: AsRef<OsStr>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.command = argv.into_iter().map(|a| a.as_ref().into()).collect();
        self
    }

    pub fn start(self) -> SidecarRun {
        assert!(!self.command.is_empty(), "a sidecar run needs a command");
        let report_path = self.report.then(fresh_report_path);
        let binary = self.binary.clone().unwrap_or_else(sidecar_bin);
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("run")
            .arg("--proxy-port")
            .arg(self.proxy_port.to_string())
            .args(&self.args);
        if !self.passthrough {
            cmd.arg("--proxy-all");
        }
        if let Some(path) = &report_path {
            cmd.arg("--report").arg(path);
        }
        cmd.arg("--").args(&self.command);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = child.id();
        eprintln!("started sidecar pid {pid}: {cmd:?}");
        let (stdout, stderr) = (Arc::new(Captured::default()), Arc::new(Captured::default()));
        stdout.spawn_reader(
            child.stdout.take().expect("piped"),
            format!("sidecar {pid} stdout"),
            |_| true,
        );
        stderr.spawn_reader(
            child.stderr.take().expect("piped"),
            format!("sidecar {pid} stderr"),
            |_| true,
        );
        SidecarRun {
            stdin: child.stdin.take(),
            child,
            pid,
            stdout,
            stderr,
            report_path,
            status: None,
            client_pids: Vec::new(),
        }
    }
}

/// A unique report path in the temp dir (one per run of this test process).
fn fresh_report_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("sidecar-tests-{}-{n}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// A running (or finished) `sidecar run`.
pub struct SidecarRun {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    report_path: Option<PathBuf>,
    status: Option<ExitStatus>,
    /// Testclient pids seen in the app cgroup: killed on drop if still around.
    client_pids: Vec<u32>,
}

/// What a run left when it exited.
#[derive(Debug)]
pub struct Finished {
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub report: Option<Report>,
}

impl SidecarRun {
    /// `sidecar run --proxy-port <proxy_port> [--report <tmp>] … -- <command>`.
    pub fn builder(proxy_port: u16) -> RunBuilder {
        RunBuilder {
            proxy_port,
            wrapper: Vec::new(),
            args: Vec::new(),
            command: Vec::new(),
            report: true,
            binary: None,
            env: Vec::new(),
            passthrough: false,
        }
    }

    /// The sidecar's pid: names its cgroups, pins and state file.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lines()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lines().join("\n")
    }

    /// Waits for a `hold` client's `READY` and returns its connections. Panics (with the
    /// sidecar's stderr) if the output ends or `timeout` passes first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Vec<HoldLine> {
        let ready = self.stdout.wait(timeout, |lines, closed| {
            closed || lines.iter().any(|l| l.trim() == READY)
        });
        let lines = self.stdout.lines();
        if !ready || !lines.iter().any(|l| l.trim() == READY) {
            let status = self.child.try_wait().ok().flatten();
            panic!(
                "the hold client did not print {READY} within {timeout:?} (sidecar status \
                 {status:?})\nstdout: {lines:#?}\nstderr:\n{}",
                self.stderr_text()
            );
        }
        self.note_client_pids();
        protocol::parse_lines(&lines)
    }

    /// Pids in the run's app cgroup right now (the command and its children).
    pub fn app_pids(&mut self) -> Vec<u32> {
        self.note_client_pids();
        host::cgroup_procs(&host::app_cgroup(self.pid))
    }

    fn note_client_pids(&mut self) {
        for pid in host::cgroup_procs(&host::app_cgroup(self.pid)) {
            if !self.client_pids.contains(&pid) {
                self.client_pids.push(pid);
            }
        }
    }

    /// Closes the command's stdin: a `hold` client then closes its sockets and exits.
    pub fn release(&mut self) {
        self.stdin = None;
    }

    /// Signals the sidecar process itself (not the command). No-op once it was reaped, so a
    /// recycled pid is never signalled.
    pub fn signal(&mut self, sig: i32) {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            host::signal(self.pid, sig);
        }
    }

    /// Waits (bounded) for the sidecar to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Releases the command, waits for the sidecar to exit and collects output and report.
    /// Panics (with stderr) if it does not exit within `timeout`.
    pub fn finish(&mut self, timeout: Duration) -> Finished {
        self.release();
        let Some(status) = self.wait_exit(timeout) else {
            panic!(
                "sidecar {} did not exit within {timeout:?}\nstdout: {:#?}\nstderr:\n{}",
                self.pid,
                self.stdout.lines(),
                self.stderr_text()
            );
        };
        // Output ends when the sidecar AND everything it started have closed the pipes; a
        // leftover process holding them must not hang the test, hence the bound.
        self.stdout.wait(OUTPUT_DRAIN, |_, closed| closed);
        self.stderr.wait(OUTPUT_DRAIN, |_, closed| closed);
        let report = self.report_path.as_ref().filter(|p| p.exists()).map(|p| {
            let report = Report::read(p).unwrap_or_else(|e| panic!("{e:#}"));
            let _ = std::fs::remove_file(p);
            report
        });
        Finished {
            pid: self.pid,
            status,
            stdout: self.stdout.lines(),
            stderr: self.stderr.lines(),
            report,
        }
    }

    /// Whether anything of this run is still on the host.
    fn leaves_traces(&self) -> bool {
        host::pin_dir(self.pid).exists()
            || host::run_cgroup(self.pid).exists()
            || host::state_file(self.pid).exists()
    }
}

impl Drop for SidecarRun {
    /// Never panics (it may run while a failed test unwinds): problems are printed.
    fn drop(&mut self) {
        self.note_client_pids();
        self.stdin = None;
        if self.wait_exit(Duration::ZERO).is_none() {
            eprintln!("stopping sidecar {} (SIGTERM)", self.pid);
            host::signal(self.pid, libc::SIGTERM);
            if self.wait_exit(TERM_GRACE).is_none() {
                eprintln!("sidecar {} ignored SIGTERM: SIGKILL", self.pid);
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
            }
        }
        if self.leaves_traces() {
            eprintln!(
                "sidecar {} left state behind: running `sidecar cleanup`",
                self.pid
            );
            match cleanup_output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "`sidecar cleanup` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("`sidecar cleanup` could not run: {e}"),
            }
        }
        for pid in &self.client_pids {
            host::kill_if_still(*pid, CLIENT_NAME);
        }
        if let Some(path) = &self.report_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs `sidecar cleanup` (bounded), which must succeed: what it could not remove is on its
/// stdout (`could not clean up: …`), errors on its stderr, and both are in the panic.
pub fn cleanup() {
    let out = cleanup_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "`sidecar cleanup` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `sidecar cleanup` (bounded); returns its output.
pub fn cleanup_output() -> Result<std::process::Output, String> {
    // output_with_timeout panics on a hang; Drop must not, so catch it there.
    std::panic::catch_unwind(|| {
        host::output_with_timeout(Command::new(sidecar_bin()).arg("cleanup"), CLEANUP_TIMEOUT)
    })
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
    })
}

impl Finished {
    /// The sidecar's exit code (`None` if it was itself killed by a signal).
    pub fn exit_code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The report; panics (with stderr) if the sidecar did not write one.
    pub fn report(&self) -> &Report {
        self.report.as_ref().unwrap_or_else(|| {
            panic!(
                "sidecar {} wrote no report ({})\nstderr:\n{}",
                self.pid,
                self.status,
                self.stderr_text()
            )
        })
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.join("\n")
    }

    /// Stderr lines starting with `error:` (the contract's one-line error).
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .iter()
            .map(|l| l.as_str())
            .filter(|l| l.starts_with("error:"))
            .collect()
    }

    /// Stdout lines parsed as `T` (other lines skipped).
    pub fn parse_stdout<T: serde::de::DeserializeOwned>(&self) -> Vec<T> {
        protocol::parse_lines(&self.stdout)
    }

    /// Asserts the sidecar exited with `code`, showing stderr otherwise.
    pub fn assert_exit_code(&self, code: i32) {
        assert_eq!(
            self.exit_code(),
            Some(code),
            "sidecar {} exited with {}, expected code {code}\nstdout: {:#?}\nstderr:\n{}",
            self.pid,
            self.status,
            self.stdout,
            self.stderr_text()
        );
    }
}
