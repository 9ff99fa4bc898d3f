//! The mTLS modes: two sidecars, one per pod. The client pod's sidecar tunnels every
//! connection to the server pod (`--mesh-cidrs <server IP>/32`); the server pod's sidecar,
//! started for each run in the same interception mode, verifies it and hands the bytes to the
//! pod's workload on the pod's own address: the same echo server the direct and
//! single-sidecar modes reach (a tunnel delivers only to the address it arrived on, never to
//! the pod's loopback). Its own command only keeps it running.
//! Certificates are minted with `sidecar cert` into a temporary directory, removed on drop.

use std::{
    fs,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::{Mode, Server, idle, netns::Netns};
use crate::output;

const TRUST_DOMAIN: &str = "bench.local";
pub const CLIENT_ID: &str = "spiffe://bench.local/ns/bench/sa/client";
pub const SERVER_ID: &str = "spiffe://bench.local/ns/bench/sa/server";
/// The tunnel port (`--inbound-port`, on both sidecars) and the server pod's own proxy port.
const TUNNEL_PORT: u16 = 20108;
const SERVER_PROXY_PORT: u16 = 20101;

pub struct Mesh<'a> {
    certs: Certs,
    sidecar: &'a Path,
    server_ns: &'a Netns,
    /// The echo server's address as the client dials it (the pod address).
    server: SocketAddr,
    /// Options given to both sidecars of the pair (the window sweep's settings).
    both: Vec<String>,
}

impl<'a> Mesh<'a> {
    pub fn new(sidecar: &'a Path, server_ns: &'a Netns, server: SocketAddr) -> Result<Self> {
        Ok(Self {
            certs: Certs::mint(sidecar)?,
            sidecar,
            server_ns,
            server,
            both: Vec::new(),
        })
    }

    /// The same mesh (certificates and all) with `options` added to both sidecars.
    pub fn with_options(
        sidecar: &'a Path,
        server_ns: &'a Netns,
        server: SocketAddr,
        options: &[String],
    ) -> Result<Self> {
        Ok(Self {
            both: options.to_vec(),
            ..Self::new(sidecar, server_ns, server)?
        })
    }

    /// The client pod's `sidecar run` options, besides the interception mode.
    pub fn client_args(&self) -> Vec<String> {
        vec![
            "--tls-dir".into(),
            self.certs.dir.join("client").display().to_string(),
            "--no-inbound".into(),
            "--mesh-cidrs".into(),
            format!("{}/32", self.server.ip()),
            "--inbound-port".into(),
            TUNNEL_PORT.to_string(),
        ]
        .into_iter()
        .chain(self.both.iter().cloned())
        .collect()
    }

    /// Starts the server pod's sidecar, in `mode`'s interception mode, with an echo server
    /// on 127.0.0.1 (same ports) as its command. Its log and report go next to `stem`.
    pub fn start_server(&self, mode: Mode, stem: &Path) -> Result<PeerSidecar> {
        self.start_server_with(mode, stem, &[], None)
    }

    /// [`Self::start_server`] with `extra` options, and its descriptor limits (soft and
    /// hard) set to `nofile` if given.
    pub fn start_server_with(
        &self,
        mode: Mode,
        stem: &Path,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Result<PeerSidecar> {
        let report = stem.with_extension("server.json");
        let log = stem.with_extension("server.log");
        let mut cmd = Command::new(self.sidecar);
        cmd.arg("run")
            .args(mode.sidecar_args().context("an mTLS mode has a sidecar")?)
            .args(["--proxy-port", &SERVER_PROXY_PORT.to_string()])
            .arg("--tls-dir")
            .arg(self.certs.dir.join("server"))
            .args(["--inbound-port", &TUNNEL_PORT.to_string()])
            .args(["--drain-timeout-secs", "2"])
            .args(extra)
            .args(&self.both)
            .arg("--report")
            .arg(&report)
            // The workload is the pod's echo server, already running; `ready` tells
            // Server::start the sidecar is up (it starts its command once attached).
            .args(["--", "sh", "-c", "echo ready; exec sleep 3600"])
            .stderr(fs::File::create(&log)?);
        if let Some(limit) = nofile {
            // SAFETY: `set_nofile` only calls setrlimit(2), async-signal-safe.
            unsafe {
                cmd.pre_exec(move || idle::set_nofile(limit));
            }
        }
        let server = Server::start(cmd, self.server_ns).with_context(|| {
            format!(
                "the server pod's sidecar did not start (log: {})",
                log.display()
            )
        })?;
        Ok(PeerSidecar { server, report })
    }
}

/// The server pod's sidecar for one run.
pub struct PeerSidecar {
    server: Server,
    report: PathBuf,
}

impl PeerSidecar {
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Stops it (SIGTERM: it stops the echo server, detaches, writes its report) and returns
    /// the report's path.
    pub fn stop(mut self) -> Result<PathBuf> {
        self.server.stop()?;
        Ok(self.report)
    }
}

/// A development CA and one workload certificate per pod, in a private temporary directory.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn mint(sidecar: &Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("sidecar-bench-certs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let certs = Self { dir };
        fs::set_permissions(&certs.dir, fs::Permissions::from_mode(0o700))?;
        let ca = certs.dir.join("ca");
        output(
            Command::new(sidecar)
                .args(["cert", "ca", "--trust-domain", TRUST_DOMAIN, "--dir"])
                .arg(&ca),
        )?;
        for (pod, id) in [("client", CLIENT_ID), ("server", SERVER_ID)] {
            output(
                Command::new(sidecar)
                    .args(["cert", "issue", "--spiffe-id", id, "--ca-dir"])
                    .arg(&ca)
                    .arg("--out")
                    .arg(certs.dir.join(pod)),
            )?;
        }
        Ok(certs)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
