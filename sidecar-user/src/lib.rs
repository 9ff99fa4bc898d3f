//! The user half of the sidecar: the loader that attaches the kernel half, the transparent
//! proxy, and the commands built from them.
//!
//! Reading order follows a connection: a command in [`cmd`] (e.g. `sidecar run`) sets up a
//! workload, [`redirect`] steers its connections to the [`proxy`] (or lets them pass through
//! in the kernel), which recovers each original destination, applies the [`policy`], builds a
//! [`tunnel`] where the destination is meshed, copies bytes and records the outcome in
//! [`telemetry`].

pub mod admin;
pub mod cidr;
pub mod cmd;
pub mod defaults;
pub mod host;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod registration;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
