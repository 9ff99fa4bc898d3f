//! The bench's network namespaces (`scbm-*`): one for the same-host loopback case, two
//! "pods" joined by a veth pair for the cross-pod case. Addresses exist only inside them and
//! there is no route out. Each [`Netns`] is deleted on drop (which also destroys its end of
//! the veth), so a failing bench tears down too.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{output, run};

/// A network namespace this bench created; `ip netns del` on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates it with loopback up. A leftover of the same name (a killed bench of ours:
    /// the `scbm-` prefix is the bench's) is deleted first.
    pub fn create(name: &str) -> Result<Self> {
        assert!(name.starts_with("scbm-"), "bench namespaces are scbm-*");
        let listed = output(Command::new("ip").args(["netns", "list"]))?;
        if listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
        {
            run(Command::new("ip").args(["netns", "del", name]))?;
        }
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Many short connections per second: allow reusing TIME_WAIT ports for new connects.
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}")))
    }

    /// Makes `cmd` start inside this namespace. Only the network namespace changes (unlike
    /// `ip netns exec`, which also remounts /sys and would hide the cgroup2 mount).
    /// Calls `check` every `every` from a thread of ours that joined the namespace, until it
    /// returns true (then true) or `limit` passes (then false): how the bench waits for a
    /// server inside the namespace to answer.
    pub fn poll_until(
        &self,
        limit: Duration,
        every: Duration,
        check: impl Fn() -> bool + Sync,
    ) -> Result<bool> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        let joined = thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only (network namespaces are per thread).
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let deadline = Instant::now() + limit;
                while Instant::now() < deadline {
                    if check() {
                        return Ok(true);
                    }
                    thread::sleep(every);
                }
                Ok(false)
            })
            .join()
        });
        match joined {
            Ok(result) => result.with_context(|| format!("joining netns {}", self.name)),
            Err(_) => anyhow::bail!("the check inside netns {} panicked", self.name),
        }
    }

    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        // SAFETY: setns(2) is async-signal-safe; the fd stays open (moved into the closure)
        // until the child execs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair, `client` 10.252.0.1/30 and `server` 10.252.0.2/30:
/// a connected /30 route only, nothing to the outside.
pub struct Pods {
    pub client: Netns,
    pub server: Netns,
}

pub const POD_CLIENT_IP: &str = "10.252.0.1";
pub const POD_SERVER_IP: &str = "10.252.0.2";

impl Pods {
    pub fn create() -> Result<Self> {
        let client = Netns::create("scbm-cli")?;
        let server = Netns::create("scbm-srv")?;
        client.ip(&[
            "link", "add", "scbm-c", "type", "veth", "peer", "name", "scbm-s", "netns", "scbm-srv",
        ])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{POD_CLIENT_IP}/30"),
            "dev",
            "scbm-c",
        ])?;
        server.ip(&[
            "addr",
            "add",
            &format!("{POD_SERVER_IP}/30"),
            "dev",
            "scbm-s",
        ])?;
        client.ip(&["link", "set", "scbm-c", "up"])?;
        server.ip(&["link", "set", "scbm-s", "up"])?;
        Ok(Self { client, server })
    }
}
