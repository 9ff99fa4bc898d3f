//! The node's network: two namespaces, one per pod, joined by a veth pair and with no route
//! out, so nothing a test sends can leave the host even if interception failed.

use std::{path::Path, process::Command};

use super::STEP;
use crate::host::output_with_timeout;

/// Pod A's network namespace (`/run/netns/sck8s-a`).
pub const NS_A: &str = "sck8s-a";
/// Pod B's network namespace.
pub const NS_B: &str = "sck8s-b";
/// Pod A's address, on its end of the veth (a /30 with B).
pub const ADDR_A: &str = "10.253.0.1";
/// Pod B's address.
pub const ADDR_B: &str = "10.253.0.2";

/// Two network namespaces joined by a veth pair, deleted on drop.
pub struct Net;

impl Net {
    /// Creates [`NS_A`] and [`NS_B`] (deleting what a crashed earlier run left under those
    /// names), the veth between them and their addresses, all links up.
    pub fn create() -> Self {
        delete_namespaces();
        let net = Net;
        let ip = |args: &[&str]| {
            let out = output_with_timeout(Command::new("ip").args(args), STEP);
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", NS_A]);
        ip(&["netns", "add", NS_B]);
        ip(&[
            "-n", NS_A, "link", "add", "sck8sA", "type", "veth", "peer", "name", "sck8sB", "netns",
            NS_B,
        ]);
        for (ns, dev, addr) in [(NS_A, "sck8sA", ADDR_A), (NS_B, "sck8sB", ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        delete_namespaces();
    }
}

fn delete_namespaces() {
    for ns in [NS_A, NS_B] {
        if Path::new(&format!("/run/netns/{ns}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
