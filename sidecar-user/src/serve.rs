//! What `sidecar run` and `sidecar proxy` share once interception is someone's business: bind
//! the proxy's listeners, build the mTLS mesh, and start the accept loops. `run` adds cgroups,
//! eBPF and a command around it; `proxy` adds the registration with the node agent.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    proxy::{Proxy, mesh::Mesh, record::Direction},
    run::MtlsOptions,
    telemetry::Telemetry,
    tls::{self, TlsState},
};

/// How often certificate files are checked for rotation.
const ROTATION_POLL: Duration = Duration::from_secs(1);

/// The proxy's sockets, bound before anything is attached or registered so a busy port is a
/// clean error and a redirected connect never finds nobody listening.
pub struct Listeners {
    pub outbound_v4: StdListener,
    /// `[::1]`, when the host has IPv6 loopback.
    pub outbound_v6: Option<StdListener>,
    /// The mTLS tunnel listener (`None`: plain mode or `--no-inbound`).
    pub inbound: Option<StdListener>,
}

impl Listeners {
    pub fn bind(proxy_port: u16, inbound: Option<SocketAddr>) -> Result<Self> {
        let (outbound_v4, outbound_v6) = bind_outbound(proxy_port)?;
        let inbound = match inbound {
            Some(addr) => Some(StdListener::bind(addr).map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen for tunnels on {addr}: {e}: pick another with --inbound-port, \
                     or --no-inbound for a client-only sidecar"
                )
            })?),
            None => None,
        };
        Ok(Self {
            outbound_v4,
            outbound_v6,
            inbound,
        })
    }
}

/// The mesh of an mTLS sidecar: credentials (rotated in the background), meshed CIDRs, and
/// the sidecar's own ports, which tunnels may not ask for (see `Mesh::own_ports`).
pub fn mesh(
    m: &MtlsOptions,
    tls: Arc<TlsState>,
    telemetry: &Arc<Telemetry>,
    connect_timeout: Duration,
    own_ports: impl IntoIterator<Item = u16>,
) -> Mesh {
    info!(identity = %tls.current().identity, inbound = ?m.inbound, "mTLS on");
    telemetry.certificates(tls.current().not_after);
    let watched = telemetry.clone();
    let on_change = move |change: tls::reload::Rotation<'_>| match change {
        tls::reload::Rotation::Loaded(c) => watched.certificates(c.not_after),
        tls::reload::Rotation::Refused(_) => watched.certificates_refused(),
    };
    let _watcher = tls::reload::spawn_watcher(tls.clone(), ROTATION_POLL, on_change);
    Mesh::new(
        tls,
        m.mesh_cidrs.clone(),
        m.tunnel_port,
        m.permissive,
        connect_timeout,
        m.preamble_timeout,
    )
    .with_own_ports(own_ports)
}

/// Starts the accept loops on the current runtime and marks the listeners serving.
pub fn start(proxy: &Arc<Proxy>, listeners: Listeners, telemetry: &Telemetry) -> Result<()> {
    let Listeners {
        outbound_v4,
        outbound_v6,
        inbound,
    } = listeners;
    for listener in [Some(outbound_v4), outbound_v6].into_iter().flatten() {
        let listener = TcpListener::from_std(listener).context("registering the proxy listener")?;
        tokio::spawn(proxy.clone().serve(listener, Direction::Outbound));
    }
    if let Some(listener) = inbound {
        listener.set_nonblocking(true)?;
        let listener =
            TcpListener::from_std(listener).context("registering the inbound listener")?;
        tokio::spawn(proxy.clone().serve(listener, Direction::Inbound));
    }
    telemetry.listeners_serving();
    Ok(())
}

/// Binds the proxy's outbound listeners. IPv6 is optional: without `::1`, IPv6 connects are
/// simply not intercepted.
fn bind_outbound(port: u16) -> Result<(StdListener, Option<StdListener>)> {
    let in_use = |addr: SocketAddr, e: io::Error| {
        if e.kind() == io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "proxy port {port} is already in use on {addr}: pick another with --proxy-port"
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    };
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listen_v4 = StdListener::bind(v4).map_err(|e| in_use(v4, e))?;
    listen_v4.set_nonblocking(true)?;
    widen_accept_queue(&listen_v4)?;
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let listen_v6 = match StdListener::bind(v6) {
        Ok(l) => {
            l.set_nonblocking(true)?;
            widen_accept_queue(&l)?;
            Some(l)
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(in_use(v6, e)),
        Err(e) => {
            warn!("no IPv6 listener on {v6} ({e}): IPv6 connects will not be intercepted");
            None
        }
    };
    Ok((listen_v4, listen_v6))
}

/// std listens with a backlog of 128: thousands of intercepted connects arriving at once
/// overflow it, and the overflowed clients see resets before the proxy ever accepts them.
/// `listen()` again on a listening socket only changes its backlog; the kernel caps it at
/// `net.core.somaxconn`.
fn widen_accept_queue(listener: &StdListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: listen() on a socket we own; no memory is passed.
    if unsafe { libc::listen(listener.as_raw_fd(), libc::c_int::MAX) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
