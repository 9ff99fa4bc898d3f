//! A state file per run under `/run/sidecar`, naming every kernel object the run created, so
//! `sidecar cleanup` can remove what a crashed run left behind.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const STATE_DIR: &str = crate::defaults::RUN_STATE_DIR;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// The `sidecar run` process.
    pub pid: u32,
    /// The run's cgroup (with `app` and `proxy` children).
    pub run_cgroup: PathBuf,
    /// Where the sidecar process was before it moved into the proxy cgroup.
    pub original_cgroup: PathBuf,
    /// The run's pin directory on bpffs.
    pub pin_dir: PathBuf,
    /// The bpffs mount point, and whether the run mounted it (for the record: the mount is
    /// shared, see `host::bpffs`, and unmounted by whoever uses it last).
    pub bpffs: PathBuf,
    #[serde(default)]
    pub bpffs_mounted_by_us: bool,
    /// iptables mode: the chains and jumps to remove (absent for eBPF runs).
    #[serde(default)]
    pub iptables: Option<crate::redirect::iptables::Rules>,
}

/// The state file of a live run; removed on drop (after everything it names is gone).
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn write(state: &RunState) -> io::Result<Self> {
        fs::create_dir_all(STATE_DIR)?;
        let path = path_for(state.pid);
        let json = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        // Write then rename, so cleanup never reads half a file.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, json)?;
        fs::rename(&tmp, &path)?;
        Ok(Self { path })
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

pub fn path_for(pid: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("run-{pid}.json"))
}

/// Every state file present, with its parsed content (unparsable files are reported).
pub fn list() -> Vec<(PathBuf, Result<RunState, String>)> {
    let Ok(entries) = fs::read_dir(STATE_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let parsed = fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            (p, parsed)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
