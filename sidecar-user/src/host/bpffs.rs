//! The BPF filesystem, where a run pins its maps and links so a crashed run's state can be
//! found and removed (`sidecar cleanup`) and a restarted process could adopt it.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::mounts;

#[derive(Debug, Error)]
pub enum BpffsError {
    #[error(
        "bpffs is not mounted at {path} and mounting it failed ({source}): mount it with \
         `mount -t bpf bpffs {path}`, or pass --bpffs with a bpffs mount point"
    )]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot create pin directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
}

/// A bpffs mount point we rely on. If we had to mount it ourselves, dropping it unmounts it
/// again — but only when nothing is pinned there any more, so nobody else's pins are lost.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
    mounted_by_us: bool,
}

impl Bpffs {
    /// Uses the bpffs at `path`, mounting one there if needed.
    pub fn ensure(path: &Path) -> Result<Self, BpffsError> {
        if mounts::is_mounted(path, "bpf") {
            return Ok(Self {
                path: path.into(),
                mounted_by_us: false,
            });
        }
        mount(path).map_err(|source| BpffsError::Mount {
            path: path.into(),
            source,
        })?;
        tracing::info!(path = %path.display(), "mounted bpffs");
        Ok(Self {
            path: path.into(),
            mounted_by_us: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mounted_by_us(&self) -> bool {
        self.mounted_by_us
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if self.mounted_by_us {
            unmount_if_empty(&self.path);
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
pub fn unmount_if_empty(path: &Path) -> bool {
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
