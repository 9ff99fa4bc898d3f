//! The commands: each builds its options from its command line and wires the concerns
//! (`redirect`, `proxy`, `tls`, `tunnel`, `policy`, `telemetry`, `admin`) together. Nothing
//! outside this folder imports a command.
//!
//! - [`run`]: `sidecar run -- CMD` (standalone: a cgroup, interception, the proxy, the
//!   command), with its [`state`] file for crash recovery, [`cleanup`] of dead runs and the
//!   exit [`report`];
//! - [`agent`] and [`pod_proxy`]: `sidecar agent` (the privileged node half on Kubernetes) and
//!   `sidecar proxy` (the unprivileged pod sidecar);
//! - [`serve`]: the serving machinery `run` and `proxy` share (runtime, listeners, mTLS,
//!   admin, drain);
//! - [`probe`]: `sidecar probe`, what this kernel and host support;
//! - [`cert`], [`policy`], [`status`]: `sidecar cert`, `sidecar policy check`, `sidecar
//!   status` and `sidecar conns`.
//!
//! Each command owns its flags (`run/cli.rs`, `agent/cli.rs`, `pod_proxy/cli.rs`, or beside
//! its code), built from the shared flag groups (`proxy::ProxySettingsArgs`,
//! `proxy::mesh::MeshArgs`, `admin::flags::ObserveArgs`) with one help text per flag.

pub mod agent;
pub mod cert;
pub mod cleanup;
pub mod pod_proxy;
pub mod policy;
pub mod probe;
pub mod report;
pub mod run;
pub mod serve;
pub mod state;
pub mod status;
