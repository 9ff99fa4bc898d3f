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

use crate::{cidr::Cidr, tls::TlsState};

/// How long a permissive-mode verdict is remembered.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Bound on remembered destinations; the cache is cleared when it fills.
const CACHE_CAP: usize = 10_000;

pub struct Mesh {
    pub tls: Arc<TlsState>,
    pub cidrs: Vec<Cidr>,
    /// The inbound (tunnel) port of every sidecar in the mesh.
    pub tunnel_port: u16,
    pub permissive: bool,
    /// TLS handshake deadline, both directions.
    pub handshake_timeout: Duration,
    /// How long the inbound side waits for the preamble after the handshake.
    pub preamble_timeout: Duration,
    cache: Mutex<HashMap<IpAddr, (bool, Instant)>>,
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
        cidrs: Vec<Cidr>,
        tunnel_port: u16,
        permissive: bool,
        handshake_timeout: Duration,
        preamble_timeout: Duration,
    ) -> Self {
        Self {
            tls,
            cidrs,
            tunnel_port,
            permissive,
            handshake_timeout,
            preamble_timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn route(&self, dst: SocketAddr) -> Route {
        if self.cidrs.iter().any(|c| c.contains(dst.ip())) {
            return Route::Tunnel;
        }
        if !self.permissive {
            return Route::Plain;
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&dst.ip()) {
            Some((true, at)) if at.elapsed() < CACHE_TTL => Route::Tunnel,
            Some((false, at)) if at.elapsed() < CACHE_TTL => Route::Plain,
            _ => Route::TryTunnel,
        }
    }

    /// Records whether a permissive-mode probe of `ip` found a sidecar.
    pub fn remember(&self, ip: IpAddr, has_sidecar: bool) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAP {
            cache.clear();
        }
        cache.insert(ip, (has_sidecar, Instant::now()));
    }
}
