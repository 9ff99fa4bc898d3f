//! What starting a sidecar costs: time from exec of `sidecar run` to its `/readyz` answering
//! 200 (interception attached, listeners up), and its resident memory at that moment, before
//! any connection. Measured in the loopback scenario's namespace, the same CPU placement as
//! the client side, a few times per run; the report gives the median and the worst.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Side, load, netns::Netns, wait_bounded};

/// One start: exec → ready, and VmRSS when ready.
#[derive(Debug, Clone, Copy)]
pub struct Startup {
    pub ready_ms: f64,
    pub idle_rss_mib: f64,
}

/// The sidecar's admin address for these starts (inside the namespace; in the bench's range).
const ADMIN: ([u8; 4], u16) = ([127, 0, 0, 1], 20140);
const PROXY_PORT: u16 = 20141;

/// Starts `sidecar run -- sleep` `times` times, one after another, each stopped with SIGTERM
/// once measured.
pub fn measure(sidecar: &Path, ns: &Netns, times: usize, raw: &Path) -> Result<Vec<Startup>> {
    (0..times)
        .map(|i| once(sidecar, ns, &raw.join(format!("startup-{i}.log"))))
        .collect()
}

fn once(sidecar: &Path, ns: &Netns, log: &Path) -> Result<Startup> {
    let admin = SocketAddr::from(ADMIN);
    let mut cmd = Command::new(sidecar);
    cmd.args(["run", "--proxy-port", &PROXY_PORT.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?);
    ns.enter(&mut cmd)?;
    Side::Client.pin(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting sidecar run")?;
    let ready = ns.poll_until(Duration::from_secs(10), Duration::from_millis(1), || {
        readyz(admin).is_ok_and(|ok| ok)
    });
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss = load::status_kib(child.id(), "VmRSS");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_bounded(&mut child, Duration::from_secs(15))?;
    if !ready? {
        bail!(
            "sidecar run was not ready within 10 s (log: {})",
            log.display()
        );
    }
    // The sidecar passes SIGTERM to its command and exits as the command did: 128 + 15 when
    // the command died of it. (A sidecar killed by the signal itself would be a bug: its
    // handlers are registered before it can be ready.)
    if !(status.success() || status.code() == Some(128 + libc::SIGTERM)) {
        bail!("sidecar run exited with {status} (log: {})", log.display());
    }
    Ok(Startup {
        ready_ms,
        idle_rss_mib: rss? as f64 / 1024.0,
    })
}

fn readyz(admin: SocketAddr) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(100))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(&head[9..12] == b"200")
}
