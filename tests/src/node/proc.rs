//! Processes of the simulated node: started in a pod's container cgroup and network
//! namespace, their output kept in files (read while they run), killed on drop so a failing
//! test leaves none behind.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use crate::{
    host::{self, wait_child, wait_until},
    scratch::Scratch,
};

/// A process in a pod (or the agent), its output in files; killed on drop.
pub struct Proc {
    /// What the test calls it: the names of its output files and of failure messages.
    pub name: String,
    /// Public so a test can poll it (`try_wait`) or write to its stdin.
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    /// Everything it printed on stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        host::signal(self.pid(), sig);
    }

    /// Closes stdin (ends `serve` and `hold`).
    pub fn release(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits for the exit; panics with both outputs if it does not come within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match wait_child(&mut self.child, timeout) {
            Some(s) => s,
            None => panic!(
                "{} did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.name,
                self.stdout(),
                self.stderr()
            ),
        }
    }

    /// Waits for a clean exit and returns stdout.
    pub fn success(&mut self, timeout: Duration) -> String {
        let status = self.wait(timeout);
        assert!(
            status.success(),
            "{} failed ({status})\nstdout:\n{}\nstderr:\n{}",
            self.name,
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }

    /// Waits until stdout contains `needle` (e.g. a server's `READY`); panics if it never does.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) {
        assert!(
            wait_until(timeout, || self.stdout().contains(needle)),
            "{} never printed {needle:?}\nstdout:\n{}\nstderr:\n{}",
            self.name,
            self.stdout(),
            self.stderr()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `argv` with its pid in `cgroup` (if any) before exec, inside netns `ns` (if any),
/// its output in `<name>.out` and `<name>.err` of `scratch`.
///
/// The pid is written to `cgroup.procs` between fork and exec, so the process never runs a
/// single instruction of `argv` outside the pod: what the agent sees is what a container
/// runtime would have set up.
pub fn spawn(
    scratch: &Scratch,
    name: &str,
    cgroup: Option<&Path>,
    ns: Option<&str>,
    argv: &[String],
    env: &[(&str, &str)],
) -> Proc {
    let mut full: Vec<String> = Vec::new();
    if let Some(ns) = ns {
        full.extend(["nsenter".into(), format!("--net=/run/netns/{ns}")]);
    }
    full.extend(argv.iter().cloned());
    let out = scratch.path(&format!("{name}.out"));
    let err = scratch.path(&format!("{name}.err"));
    let mut cmd = Command::new(&full[0]);
    cmd.args(&full[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&out).expect("stdout file"))
        .stderr(fs::File::create(&err).expect("stderr file"));
    if let Some(cg) = cgroup {
        let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        // SAFETY: only async-signal-safe calls on memory prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                if n == 1 { Ok(()) } else { Err(e) }
            });
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {full:?}: {e}"));
    Proc {
        name: name.into(),
        child,
        out,
        err,
    }
}
