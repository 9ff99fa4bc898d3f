//! The host state a run creates and must remove: cgroups, pins, the state file; plus small
//! process helpers. Paths are discovered (cgroup2 from `/proc/mounts`), never assumed.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// The bpffs the tests run the sidecar with (its default `--bpffs`).
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where a run keeps its state file.
pub const STATE_DIR: &str = "/run/sidecar";

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones (like the machine this was written on).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// `/proc/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok());
        match octal.and_then(|d| u8::from_str_radix(d, 8).ok()) {
            Some(v) if bytes[i] == b'\\' => {
                out.push(v);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cgroup2_root_or_panic() -> PathBuf {
    cgroup2_root().expect("no cgroup2 hierarchy in /proc/mounts")
}

/// `<cg2>/sidecar/run-<pid>`: the run's cgroup, parent of `app` and `proxy`.
pub fn run_cgroup(pid: u32) -> PathBuf {
    cgroup2_root_or_panic()
        .join("sidecar")
        .join(format!("run-{pid}"))
}

/// `<cg2>/sidecar/run-<pid>/app`: where the command runs.
pub fn app_cgroup(pid: u32) -> PathBuf {
    run_cgroup(pid).join("app")
}

/// `<cg2>/sidecar/run-<pid>/proxy`: where the sidecar process moves itself.
pub fn proxy_cgroup(pid: u32) -> PathBuf {
    run_cgroup(pid).join("proxy")
}

/// `/sys/fs/bpf/sidecar/run-<pid>`: the run's pins.
pub fn pin_dir(pid: u32) -> PathBuf {
    Path::new(BPFFS).join("sidecar").join(format!("run-{pid}"))
}

/// `/run/sidecar/run-<pid>.json`: exists while the run is alive.
pub fn state_file(pid: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("run-{pid}.json"))
}

/// Pids directly in a cgroup (empty if it does not exist).
pub fn cgroup_procs(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The v2 cgroup of a process as an absolute path under the cgroup2 mount.
pub fn cgroup_of(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(cgroup2_root()?.join(rel.trim().trim_start_matches('/')))
}

/// Whether a process exists and is not a zombie (a zombie holds no sockets or cgroup).
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S …`: comm may contain anything, so look after the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// The full command line of a process, NUL separators turned into spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim()
            .to_string(),
    )
}

/// Sends a signal; errors (already gone) are ignored on purpose.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// SIGKILLs `pid` if it still is a process whose command line contains `needle`, so a pid
/// recycled by an unrelated process is never hit.
pub fn kill_if_still(pid: u32, needle: &str) {
    if is_alive(pid) && cmdline(pid).is_some_and(|c| c.contains(needle)) {
        signal(pid, libc::SIGKILL);
    }
}

/// Polls `done` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion with a deadline (std has no `wait_timeout`): on timeout it
/// is SIGKILLed and this panics, so a hung `sidecar probe`/`cleanup` fails the test.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // Drain both pipes on threads: a child blocked on a full pipe would never exit.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = wait_child(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {timeout:?}");
    });
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `try_wait` in a bounded loop.
pub fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// The first executable called `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Moves the calling test thread (and every process it starts from now on) into a private
/// mount namespace where no bpffs is mounted at [`BPFFS`]: the host a fresh machine is,
/// whatever this machine has mounted. The host's own mounts are not touched (propagation is
/// made private first), and the namespace goes away with the thread.
///
/// Returns false (after [`crate::skip`], which fails in CI) when the namespace cannot be made.
pub fn private_mounts_without_bpffs() -> bool {
    // SAFETY: plain syscalls with valid NUL-terminated strings or nulls. unshare(CLONE_NEWNS)
    // applies to this thread only (it implies CLONE_FS), which is what the test wants.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return crate::skip(&format!(
                "unshare(CLONE_NEWNS): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return crate::skip(&format!(
                "making / private in the new mount namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        // Mounts can be stacked: take them all off (bounded).
        for _ in 0..8 {
            if !bpffs_mounted() {
                break;
            }
            libc::umount2(c"/sys/fs/bpf".as_ptr(), libc::MNT_DETACH);
        }
    }
    !bpffs_mounted() || crate::skip("bpffs is still mounted at /sys/fs/bpf after umount")
}

/// Whether a bpffs is mounted at [`BPFFS`] (in the calling thread's mount namespace).
pub fn bpffs_mounted() -> bool {
    // /proc/thread-self: the mount namespace is per thread after an unshare.
    fs::read_to_string("/proc/thread-self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let mut f = l.split_whitespace();
            let (_src, target, fstype) = (f.next(), f.next(), f.next());
            target == Some(BPFFS) && fstype == Some("bpf")
        })
}

/// A world-executable copy of a binary in a fresh 0755 directory under /tmp, removed on drop:
/// for running it as another user, when the checkout sits below a folder that user cannot
/// traverse.
pub struct PublicCopy {
    dir: std::path::PathBuf,
    file: std::path::PathBuf,
}

impl PublicCopy {
    pub fn of(binary: &std::path::Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let name = binary.file_name().expect("a binary's path names a file");
        let dir = std::env::temp_dir().join(format!(
            "sidecar-public-{}-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("creating the public copy's directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
        let file = dir.join(name);
        std::fs::copy(binary, &file).expect("copying the sidecar binary");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755");
        Self { dir, file }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.file
    }
}

impl Drop for PublicCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
