//! The user half of the sidecar: the loader that attaches the kernel half, the transparent
//! proxy, and the commands built from them.
//!
//! Reading order follows a connection: [`run`] sets up a workload, [`redirect`] steers its
//! connections to the [`proxy`], which recovers each original destination, connects upstream,
//! copies bytes and records the outcome for the [`report`].

pub mod admin;
pub mod agent;
pub mod cidr;
pub mod cleanup;
pub mod defaults;
pub mod host;
pub mod pod_proxy;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod redirect;
pub mod report;
pub mod run;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
