//! The agent's request handling and registry, compiled from the sidecar's source files with
//! the kernel maps in memory (`memory_maps.rs` in place of the pinned maps), and what the
//! maps must hold (`expected.rs`, the fuzz target's own).
#![allow(dead_code)]

#[path = "../../../src/cmd/agent/callers.rs"]
pub mod callers;
pub mod expected;
#[path = "../../../src/cmd/agent/listener.rs"]
pub mod listener;
#[path = "../../../src/cmd/agent/memory_maps.rs"]
pub mod memory_maps;
#[path = "../../../src/cmd/agent/pod.rs"]
pub mod pod;
#[path = "../../../src/cmd/agent/pod_maps.rs"]
pub mod pod_maps;
#[path = "../../../src/cmd/agent/registry.rs"]
pub mod registry;
#[path = "../../../src/cmd/agent/requests.rs"]
pub mod requests;
