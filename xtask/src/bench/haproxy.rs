//! HAProxy as the bench's external peer: a plain userspace L4 proxy (Debian's package, TCP
//! mode, a fixed backend), run in the client's namespace where the sidecar would run, so its
//! hop is measured with the same client, server and CPU placement as ours.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{HAPROXY_PORT, Side, netns::Netns, terminate};

/// A running `haproxy -db` with two frontends on the client's loopback: the echo server's
/// and the sink's (the next port), each to its fixed backend. Stopped on drop.
pub struct Haproxy {
    child: Option<Child>,
    front: SocketAddr,
}

impl Haproxy {
    pub fn start(ns: &Netns, server: SocketAddr, stem: &Path) -> Result<Self> {
        let config = stem.with_extension("haproxy.cfg");
        let log = stem.with_extension("haproxy.log");
        let front = SocketAddr::from(([127, 0, 0, 1], HAPROXY_PORT));
        let mut sink = server;
        sink.set_port(server.port() + 1);
        fs::write(&config, config_text(front, server, sink))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        ns.enter(&mut cmd)?;
        Side::Client.pin(&mut cmd);
        let child = cmd
            .spawn()
            .context("starting haproxy (apt-get install haproxy, or `cargo xtask setup`)")?;
        let mut haproxy = Self {
            child: Some(child),
            front,
        };
        haproxy.wait_ready(ns, &log)?;
        Ok(haproxy)
    }

    /// Where the client connects instead of the server.
    pub fn front(&self) -> SocketAddr {
        self.front
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM (HAProxy's hard stop), bounded.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut child) => terminate(&mut child, Duration::from_secs(10)),
            None => Ok(()),
        }
    }

    /// Until both frontends accept, from inside the namespace.
    fn wait_ready(&mut self, ns: &Netns, log: &Path) -> Result<()> {
        let mut sink = self.front;
        sink.set_port(self.front.port() + 1);
        let fronts = [self.front, sink];
        let ready = ns.poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            fronts
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
        })?;
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "haproxy exited ({status}): {}",
                fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        if !ready {
            bail!(
                "haproxy did not accept on {fronts:?} within 10 s (log: {})",
                log.display()
            );
        }
        Ok(())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// TCP mode, no health checks, timeouts long enough for the bench's idle gaps.
fn config_text(front: SocketAddr, echo: SocketAddr, sink: SocketAddr) -> String {
    let mut sink_front = front;
    sink_front.set_port(front.port() + 1);
    format!(
        "global\n    maxconn 8192\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 120s\n    \
         timeout server 120s\n\n\
         frontend echo\n    bind {front}\n    default_backend echo\n\n\
         backend echo\n    server echo {echo}\n\n\
         frontend sink\n    bind {sink_front}\n    default_backend sink\n\n\
         backend sink\n    server sink {sink}\n"
    )
}
