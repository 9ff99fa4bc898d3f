//! The host's kernel interfaces the sidecar depends on: cgroup v2, bpffs, privileges, the
//! socket table (`sock_diag`), and descriptors passed on a Unix socket (`fd_passing`).
//! Paths are always discovered from `/proc/mounts`, never assumed.

pub mod bpffs;
pub mod cgroup;
pub mod fd_passing;
pub mod mounts;
pub mod privileges;
pub mod sock_diag;
