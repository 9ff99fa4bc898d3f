//! Which destinations get mTLS. Destinations in the mesh CIDRs have sidecars: their traffic
//! always goes through a tunnel, and fails if the tunnel cannot be built. In permissive mode,
//! other destinations are tried with mTLS first and fall back to plaintext when their host has
//! no sidecar; the answer is cached per destination address for a while, so only the first
//! connection pays for the probe.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    cidr::Cidr,
    telemetry::labels::Protection,
    tls::{TlsFiles, TlsState, layout::LayoutError},
    tunnel,
};

/// How long a permissive-mode verdict is remembered.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Bound on remembered destinations; the cache is cleared when it fills.
const CACHE_CAP: usize = 10_000;

/// A sidecar's mesh settings (`--tls-dir` and the flags beside it), as `sidecar run` and
/// `sidecar proxy` take them.
#[derive(Debug, Clone)]
pub struct MtlsOptions {
    pub files: TlsFiles,
    /// Where this sidecar accepts tunnels from peer sidecars (all addresses by default);
    /// `None` for a client-only sidecar.
    pub inbound: Option<SocketAddr>,
    /// The tunnel port of peer sidecars (the same port mesh-wide).
    pub tunnel_port: u16,
    /// Destinations known to have sidecars: mTLS required.
    pub mesh_cidrs: Vec<Cidr>,
    /// Other destinations: try mTLS, fall back to plaintext.
    pub permissive: bool,
    /// HBONE connections: streams per pooled connection, idle close.
    pub tunnel: tunnel::Settings,
    /// How long a peer has, after the TLS handshake, to start HTTP/2.
    pub preface_timeout: Duration,
}

/// The mesh flags, one help text each, shared by `sidecar run` and `sidecar proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct MeshArgs {
    /// Turn on mTLS with the credentials in DIR: cert.pem (workload certificate with a SPIFFE
    /// ID, then intermediates), key.pem, bundle.pem (trust bundle); or a cert-manager Secret's
    /// tls.crt, tls.key, ca.crt; or the SPIFFE helper's svid.pem, svid_key.pem,
    /// svid_bundle.pem. Rotated by replacing files (kubelet's Secret updates included).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// With --tls-dir: port of the tunnel listener, here and on every peer sidecar.
    #[arg(long, default_value_t = crate::defaults::INBOUND_PORT)]
    pub inbound_port: u16,
    /// With --tls-dir: accept no tunnels (a client-only sidecar).
    #[arg(long)]
    pub no_inbound: bool,
    /// With --tls-dir: address the tunnel listener binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub inbound_addr: IpAddr,
    /// With --tls-dir: destinations that have sidecars; their traffic must be mTLS.
    #[arg(long, value_delimiter = ',')]
    pub mesh_cidrs: Vec<Cidr>,
    /// With --tls-dir: try mTLS to every other destination too, and fall back to plaintext
    /// where no sidecar answers (the verdict is cached per address for a minute).
    #[arg(long)]
    pub permissive: bool,
    /// With --tls-dir: how long a peer has, after the TLS handshake, to start HTTP/2 (its
    /// connection preface and settings), in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub hbone_preface_timeout_ms: u64,
    /// With --tls-dir: streams (application connections) one pooled tunnel connection to a
    /// peer carries at once; another connection is dialled when all are full.
    #[arg(long, default_value_t = 100)]
    pub pool_max_streams: u32,
    /// With --tls-dir: close a pooled tunnel connection after this many seconds without a
    /// stream.
    #[arg(long, default_value_t = 60)]
    pub pool_idle_timeout_secs: u64,
    /// With --tls-dir: HTTP/2 flow-control window of one tunnelled stream, in KiB: how much
    /// a peer may send us on one stream before we have handed it on.
    #[arg(long, default_value_t = tunnel::STREAM_WINDOW / 1024)]
    pub hbone_stream_window_kib: u32,
    /// With --tls-dir: HTTP/2 flow-control window of a whole tunnel connection (all its
    /// streams together), in KiB.
    #[arg(long, default_value_t = tunnel::CONNECTION_WINDOW / 1024)]
    pub hbone_connection_window_kib: u32,
}

impl MeshArgs {
    /// `None` without `--tls-dir`; fails when the directory holds none of the certificate
    /// layouts we read.
    pub fn options(self) -> Result<Option<MtlsOptions>, MeshError> {
        let Some(dir) = self.tls_dir else {
            return Ok(None);
        };
        if self.pool_max_streams == 0 {
            return Err(MeshError::ZeroStreams);
        }
        if self.pool_idle_timeout_secs == 0 {
            return Err(MeshError::ZeroIdle);
        }
        let window = |kib: u32, flag: &'static str| {
            // HTTP/2 bounds a window to 2^31-1 bytes; below its 64 KiB default nothing flows
            // well.
            if !(64..=MAX_WINDOW_KIB).contains(&kib) {
                return Err(MeshError::Window(flag, kib));
            }
            Ok(kib * 1024)
        };
        let stream_window = window(self.hbone_stream_window_kib, "--hbone-stream-window-kib")?;
        let connection_window = window(
            self.hbone_connection_window_kib,
            "--hbone-connection-window-kib",
        )?;
        if connection_window < stream_window {
            return Err(MeshError::ConnectionWindowSmaller);
        }
        Ok(Some(MtlsOptions {
            files: TlsFiles::discover(&dir)?,
            inbound: (!self.no_inbound)
                .then(|| SocketAddr::new(self.inbound_addr, self.inbound_port)),
            tunnel_port: self.inbound_port,
            mesh_cidrs: self.mesh_cidrs,
            permissive: self.permissive,
            tunnel: tunnel::Settings {
                stream_window,
                connection_window,
                ..tunnel::Settings::new(
                    self.pool_max_streams,
                    Duration::from_secs(self.pool_idle_timeout_secs),
                )
            },
            preface_timeout: Duration::from_millis(self.hbone_preface_timeout_ms),
        }))
    }
}

impl MtlsOptions {
    /// What these settings require of peers: plain (no `--tls-dir`), mTLS, or permissive
    /// (`--permissive`: destinations outside the mesh CIDRs try a tunnel and fall back to
    /// plaintext).
    pub fn protection(mtls: Option<&Self>) -> Protection {
        match mtls {
            None => Protection::Plain,
            Some(m) if m.permissive => Protection::Permissive,
            Some(_) => Protection::Mtls,
        }
    }

    /// The settings as `/config` shows them (file paths, not contents).
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "certificate": self.files.cert.display().to_string(),
            "bundle": self.files.bundle.display().to_string(),
            "inbound": self.inbound.map(|a| a.to_string()),
            "tunnel_port": self.tunnel_port,
            "mesh_cidrs": self.mesh_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "permissive": self.permissive,
            "pool_max_streams": self.tunnel.max_streams_per_connection,
            "pool_idle_timeout_secs": self.tunnel.idle_timeout.as_secs(),
            "hbone_preface_timeout_ms": self.preface_timeout.as_millis() as u64,
            "hbone_stream_window_kib": self.tunnel.stream_window / 1024,
            "hbone_connection_window_kib": self.tunnel.connection_window / 1024,
        })
    }
}

/// Mesh flags that cannot make a mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("--pool-max-streams must be at least 1")]
    ZeroStreams,
    #[error("--pool-idle-timeout-secs must be at least 1")]
    ZeroIdle,
    #[error("{0} {1}: a flow-control window must be 64 to {MAX_WINDOW_KIB} KiB")]
    Window(&'static str, u32),
    #[error(
        "--hbone-connection-window-kib is smaller than --hbone-stream-window-kib: one stream \
         could never use its whole window; raise the connection window"
    )]
    ConnectionWindowSmaller,
}

/// The largest HTTP/2 flow-control window (2^31-1 bytes), in whole KiB.
const MAX_WINDOW_KIB: u32 = (i32::MAX as u32) / 1024;

pub struct Mesh {
    pub tls: Arc<TlsState>,
    /// Pooled HBONE connections to peers, shared by every outbound tunnelled connection.
    pub pool: Arc<tunnel::pool::Pool>,
    pub tunnel: tunnel::Settings,
    pub cidrs: Vec<Cidr>,
    /// The inbound (tunnel) port of every sidecar in the mesh.
    pub tunnel_port: u16,
    pub permissive: bool,
    /// TLS (and HTTP/2) handshake deadline, both directions.
    pub handshake_timeout: Duration,
    /// How long a peer has, after the TLS handshake, to start HTTP/2.
    pub preface_timeout: Duration,
    /// The sidecar's own local ports (proxy, tunnel, admin): a tunnel asking for one of
    /// them is refused, so a peer can never reach the sidecar itself through it.
    pub own_ports: Vec<u16>,
    cache: VerdictCache,
}

/// Permissive-mode verdicts (does this address have a sidecar?), remembered for a while.
pub struct VerdictCache {
    ttl: Duration,
    entries: Mutex<HashMap<IpAddr, (bool, Instant)>>,
}

impl VerdictCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, ip: IpAddr) -> Option<bool> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&ip)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(v, _)| *v)
    }

    pub fn put(&self, ip: IpAddr, has_sidecar: bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_CAP {
            entries.clear();
        }
        entries.insert(ip, (has_sidecar, Instant::now()));
    }
}

/// What to do with one outbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// mTLS required.
    Tunnel,
    /// Try mTLS, fall back to plaintext.
    TryTunnel,
    Plain,
}

impl Mesh {
    pub fn new(
        tls: Arc<TlsState>,
        options: &MtlsOptions,
        handshake_timeout: Duration,
        events: Arc<dyn tunnel::pool::PoolEvents>,
    ) -> Self {
        Self {
            pool: Arc::new(tunnel::pool::Pool::new(tls.clone(), options.tunnel, events)),
            tunnel: options.tunnel,
            tls,
            cidrs: options.mesh_cidrs.clone(),
            tunnel_port: options.tunnel_port,
            permissive: options.permissive,
            handshake_timeout,
            preface_timeout: options.preface_timeout,
            own_ports: Vec::new(),
            cache: VerdictCache::new(CACHE_TTL),
        }
    }

    /// The sidecar's own ports, which inbound tunnels may not ask for.
    pub fn with_own_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.own_ports = ports.into_iter().collect();
        self
    }

    pub fn route(&self, dst: SocketAddr) -> Route {
        if self.cidrs.iter().any(|c| c.contains(dst.ip())) {
            return Route::Tunnel;
        }
        if !self.permissive {
            return Route::Plain;
        }
        match self.cache.get(dst.ip()) {
            Some(true) => Route::Tunnel,
            Some(false) => Route::Plain,
            None => Route::TryTunnel,
        }
    }

    /// Records whether a permissive-mode probe of `ip` found a sidecar.
    pub fn remember(&self, ip: IpAddr, has_sidecar: bool) {
        self.cache.put(ip, has_sidecar);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_expire_and_the_cache_stays_bounded() {
        let cache = VerdictCache::new(Duration::from_millis(50));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(cache.get(ip), None);
        cache.put(ip, false);
        assert_eq!(cache.get(ip), Some(false));
        cache.put(ip, true);
        assert_eq!(cache.get(ip), Some(true));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(ip), None, "an expired verdict is probed again");
        for i in 0..(CACHE_CAP as u32 + 10) {
            cache.put(IpAddr::V4(i.into()), true);
        }
        assert!(cache.entries.lock().unwrap().len() <= CACHE_CAP);
    }

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        mesh: MeshArgs,
    }

    fn options(extra: &[&str]) -> Result<Option<MtlsOptions>, MeshError> {
        let args = ["sidecar", "--tls-dir", "/nonexistent"].iter().chain(extra);
        <Flags as clap::Parser>::try_parse_from(args)
            .expect("flags parse")
            .mesh
            .options()
    }

    #[test]
    fn flow_control_windows_are_checked_before_anything_is_read() {
        let err = |extra: &[&str]| options(extra).err().map(|e| e.to_string());
        let too_small = err(&["--hbone-stream-window-kib", "63"]).unwrap();
        assert!(
            too_small.contains("--hbone-stream-window-kib 63"),
            "{too_small}"
        );
        let too_big = err(&["--hbone-connection-window-kib", "2097152"]).unwrap();
        assert!(too_big.contains("2097151 KiB"), "{too_big}");
        let crossed = err(&[
            "--hbone-stream-window-kib",
            "8192",
            "--hbone-connection-window-kib",
            "4096",
        ])
        .unwrap();
        assert!(crossed.contains("raise the connection window"), "{crossed}");
        // Valid windows get as far as reading the (missing) certificates.
        let layout = err(&["--hbone-stream-window-kib", "1024"]).unwrap();
        assert!(!layout.contains("window"), "{layout}");
    }
}
