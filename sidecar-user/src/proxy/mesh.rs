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
}
