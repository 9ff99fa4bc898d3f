//! cgroup v2: finding the hierarchy, creating the cgroups a run owns, moving processes, and
//! removing everything again. A [`Cgroup`] removes its directory when dropped.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use thiserror::Error;

use super::mounts;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted: mount one with `mount -t cgroup2 none /sys/fs/cgroup` \
         (or boot with systemd.unified_cgroup_hierarchy=1)"
    )]
    NoCgroup2,
    #[error(
        "cgroup {0} already exists: pick another --cgroup, or run `sidecar cleanup` if a crashed run left it"
    )]
    Exists(PathBuf),
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot move pid {pid} into cgroup {path}: {source}")]
    Move {
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot read cgroup {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on most hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn root() -> Result<PathBuf, CgroupError> {
    mounts::find("cgroup2").ok_or(CgroupError::NoCgroup2)
}

/// The cgroup id the kernel's BPF helpers report: the inode number of the directory.
pub fn id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })
}

/// The v2 cgroup of a process, as an absolute path under `root`.
pub fn of_process(root: &Path, pid: &str) -> Result<PathBuf, CgroupError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text =
        fs::read_to_string(&file).map_err(|source| CgroupError::Read { path: file, source })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    Ok(root.join(rel.trim_start_matches('/')))
}

/// Moves a process (all its threads) into the cgroup at `path`. `pid` 0 is the caller. A
/// process that exited after it was listed (ESRCH) is not an error: there is nothing left to
/// move (a clean-up emptying a cgroup races with its processes exiting).
pub fn move_process(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    match fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
    {
        Err(e) if pid != 0 && e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other.map_err(|source| CgroupError::Move {
            pid,
            path: path.into(),
            source,
        }),
    }
}

/// Pids currently in the cgroup (not its children).
pub fn pids(path: &Path) -> Result<Vec<u32>, CgroupError> {
    let procs = path.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(|source| CgroupError::Read {
        path: procs.clone(),
        source,
    })?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Signals every process of the cgroup; returns how many were signalled.
pub fn signal_all(path: &Path, signal: i32) -> usize {
    let pids = pids(path).unwrap_or_default();
    for pid in &pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(*pid as i32, signal) };
    }
    pids.len()
}

/// Asks the processes of a cgroup to stop (SIGTERM), waits up to `grace`, then SIGKILLs
/// what is left and waits until the cgroup is empty (bounded).
pub fn terminate_all(path: &Path, grace: Duration) -> usize {
    let asked = signal_all(path, libc::SIGTERM);
    if asked == 0 {
        return 0;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !pids(path).unwrap_or_default().is_empty() {
        thread::sleep(Duration::from_millis(20));
    }
    let killed_deadline = Instant::now() + Duration::from_secs(5);
    while signal_all(path, libc::SIGKILL) > 0 && Instant::now() < killed_deadline {
        thread::sleep(Duration::from_millis(20));
    }
    asked
}

/// Removes a cgroup directory, retrying briefly: a process that just exited can keep it
/// busy for a moment.
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: path.into(),
                    source,
                });
            }
        }
    }
}

/// A cgroup directory this process created; removed (with its children) on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the directory (and missing parents). Fails if it already exists, so two runs
    /// can never share one.
    pub fn create(path: PathBuf) -> Result<Self, CgroupError> {
        if path.exists() {
            return Err(CgroupError::Exists(path));
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| CgroupError::Create {
                path: parent.into(),
                source,
            })?;
        }
        fs::create_dir(&path).map_err(|source| CgroupError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> Result<u64, CgroupError> {
        id(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Only the run's own processes can be in here (the sidecar has moved out already).
        terminate_all(&self.path, Duration::from_secs(1));
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!("{e}");
        }
    }
}

/// Removes a cgroup and its descendants, deepest first. The kernel refuses (EBUSY) while a
/// process is still inside; callers empty the cgroups first.
pub fn remove_tree(path: &Path) -> Result<(), CgroupError> {
    if !path.exists() {
        return Ok(());
    }
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path())?;
            }
        }
    }
    remove(path)
}
