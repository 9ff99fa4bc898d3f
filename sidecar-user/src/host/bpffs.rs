//! The BPF filesystem, where a run pins its maps and links so a crashed run's state can be
//! found and removed (`sidecar cleanup`) and a restarted process could adopt it.
//!
//! Several runs (and `sidecar probe`, and the agent) share one bpffs mount. Whoever finds none
//! mounts it, and the last user to leave unmounts it when nothing is pinned there, so a host
//! that had no bpffs is left without one. Two `flock`s under [`LOCK_DIR`] make that safe
//! between processes:
//! - `bpffs-mount.lock`, exclusive and held for a moment, serializes every decision to mount or
//!   unmount;
//! - `bpffs-users.lock`, shared, is held by every live user ([`Bpffs`]) from before it looks
//!   at the mount until it exits. A process that dies releases it with its descriptors.
//!
//! An unmount happens only under the mount lock, and only when the users lock can be taken
//! exclusively, i.e. when no live process uses or is about to use the mount. Whether the
//! sidecar mounted it at all is remembered in a marker file, so a mount made by a run that was
//! later killed is still unmounted by the last run, and a bpffs the host mounted is never
//! touched.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::mounts;

/// Where the lock and marker files live (tmpfs: they never outlive a boot, like the mount).
pub const LOCK_DIR: &str = crate::defaults::RUN_STATE_DIR;

#[derive(Debug, Error)]
pub enum BpffsError {
    #[error(
        "bpffs is not mounted at {path} and mounting it failed ({source}): mount it with \
         `mount -t bpf bpffs {path}`, or pass --bpffs with a bpffs mount point"
    )]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot create pin directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot lock {path} (coordinates the bpffs mount between runs): {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// A bpffs mount point in use. Dropping it unmounts the bpffs if the sidecar mounted it, no
/// other process uses it and nothing is pinned there any more.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
    mounted_by_us: bool,
    /// Shared lock on `bpffs-users.lock` for as long as this value lives.
    users: Option<File>,
}

impl Bpffs {
    /// Uses the bpffs at `path`, mounting one there if needed.
    pub fn ensure(path: &Path) -> Result<Self, BpffsError> {
        let _mount_lock = lock(MOUNT_LOCK, libc::LOCK_EX)?;
        // Taken while holding the mount lock: no unmount decision can be under way.
        let users = lock(USERS_LOCK, libc::LOCK_SH)?;
        if mounts::is_mounted(path, "bpf") {
            return Ok(Self {
                path: path.into(),
                mounted_by_us: false,
                users: Some(users),
            });
        }
        mount(path).map_err(|source| BpffsError::Mount {
            path: path.into(),
            source,
        })?;
        // Without the marker the mount would outlive every run (never unmounted): worth a
        // warning, not a failure.
        if let Err(e) = std::fs::write(marker(path), path.as_os_str().as_bytes()) {
            tracing::warn!(path = %path.display(), "cannot record that we mounted bpffs: {e}");
        }
        tracing::info!(path = %path.display(), "mounted bpffs");
        Ok(Self {
            path: path.into(),
            mounted_by_us: true,
            users: Some(users),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this process mounted the bpffs (for the state file; unmounting does not
    /// depend on it).
    pub fn mounted_by_us(&self) -> bool {
        self.mounted_by_us
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let Ok(_mount_lock) = lock(MOUNT_LOCK, libc::LOCK_EX) else {
            return;
        };
        // Leave first, then see whether anyone else still uses it.
        drop(self.users.take());
        unmount_if_unused_locked(&self.path);
    }
}

/// What `sidecar cleanup` does about the mount: unmounts a bpffs the sidecar mounted when no
/// live process uses it and nothing is pinned there. Returns whether it did.
pub fn unmount_if_unused(path: &Path) -> bool {
    // flock is per open file: this process must not hold the mount lock already.
    let Ok(_mount_lock) = lock(MOUNT_LOCK, libc::LOCK_EX) else {
        return false;
    };
    unmount_if_unused_locked(path)
}

/// [`unmount_if_unused`] for a caller that holds the mount lock.
fn unmount_if_unused_locked(path: &Path) -> bool {
    // Exclusive and non-blocking: fails while any user holds its shared lock.
    if lock(USERS_LOCK, libc::LOCK_EX | libc::LOCK_NB).is_err() {
        return false;
    }
    let marker = marker(path);
    if !marker.exists() {
        return false;
    }
    if !mounts::is_mounted(path, "bpf") {
        // Unmounted by someone else: the marker no longer means anything.
        let _ = std::fs::remove_file(&marker);
        return false;
    }
    let done = unmount_if_empty(path);
    if done {
        let _ = std::fs::remove_file(&marker);
    }
    done
}

const MOUNT_LOCK: &str = "bpffs-mount.lock";
const USERS_LOCK: &str = "bpffs-users.lock";

/// The marker saying the sidecar mounted the bpffs at `path` (one per mount point).
fn marker(path: &Path) -> PathBuf {
    let name: String = path
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Path::new(LOCK_DIR).join(format!("bpffs-mounted-by-sidecar{name}"))
}

/// Opens (creating) `LOCK_DIR/name` and `flock`s it with `op`; the lock goes with the file.
fn lock(name: &str, op: libc::c_int) -> Result<File, BpffsError> {
    let path = Path::new(LOCK_DIR).join(name);
    let err = |source| BpffsError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(LOCK_DIR).map_err(err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    loop {
        // SAFETY: flock on a descriptor owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(err(e));
        }
    }
}

fn mount(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Entries the kernel itself creates in every bpffs (the `bpf_preload` iterators); they do
/// not mean anyone uses the mount.
const KERNEL_ENTRIES: [&str; 2] = ["maps.debug", "progs.debug"];

/// Unmounts a bpffs that holds nothing but the kernel's own entries. Returns whether it did.
fn unmount_if_empty(path: &Path) -> bool {
    let empty = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .all(|e| KERNEL_ENTRIES.iter().any(|k| e.file_name() == *k))
        })
        .unwrap_or(false);
    if !empty || !mounts::is_mounted(path, "bpf") {
        return false;
    }
    let Ok(target) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated path.
    let ok = unsafe { libc::umount2(target.as_ptr(), 0) } == 0;
    if ok {
        tracing::info!(path = %path.display(), "unmounted the bpffs we had mounted");
    }
    ok
}
