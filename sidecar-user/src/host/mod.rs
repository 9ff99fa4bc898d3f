//! The host's kernel interfaces the sidecar depends on: cgroup v2, bpffs, privileges, and
//! the socket table (`sock_diag`).
//! Paths are always discovered from `/proc/mounts`, never assumed.

pub mod bpffs;
pub mod cgroup;
pub mod mounts;
pub mod privileges;
pub mod sock_diag;
