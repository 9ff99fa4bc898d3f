//! What `sidecar run` and `sidecar proxy` share once interception is someone's business: bring
//! up the runtime, telemetry and admin server, bind the proxy's listeners, build the mTLS mesh,
//! start the accept loops, and drain. `run` adds cgroups, eBPF and a command around it; `proxy`
//! adds the registration with the node agent.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{net::TcpListener, runtime::Runtime};
use tracing::{info, warn};

use crate::{
    admin::{self, AdminServer, AdminState, config::ObserveOptions},
    policy::Enforcer,
    proxy::{
        Proxy, ProxySettings,
        mesh::{Mesh, MtlsOptions},
    },
    redirect::Redirect,
    telemetry::{
        PolicyStatus, Security, SecuritySource, Telemetry, TelemetrySettings, TlsStatus,
        access_log::AccessLogTarget,
        labels::{Direction, Protection},
        process,
        record::Journal,
        unix_secs,
    },
    tls::{self, TlsState},
};

/// How often certificate files are checked for rotation.
const ROTATION_POLL: Duration = Duration::from_secs(1);

/// What both modes bring up before anything is attached or registered: the runtime the proxy
/// serves on, telemetry, and the admin server, so `/readyz` answers "not ready" until
/// interception and listeners really are in place.
///
/// Fields drop in declaration order: the admin server first, the runtime last.
pub struct Serving {
    /// `None`: `--admin-addr off`, or the default address was busy.
    pub admin: Option<AdminServer>,
    /// `None`: no `--probe-addr`.
    pub probes: Option<AdminServer>,
    pub telemetry: Arc<Telemetry>,
    /// Not entered: the caller enters it (`let _guard = serving.rt.enter();`) for as long as
    /// it spawns tasks.
    pub rt: Runtime,
}

impl Serving {
    /// Starts the runtime, telemetry and the admin server; `config` is what `/config` shows
    /// (already redacted). A busy chosen admin address is an error; a busy default one is not.
    /// `protection` is what `/status` shows until [`Serving::secured`].
    pub fn start(
        observe: &ObserveOptions,
        protection: Protection,
        config: serde_json::Value,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let telemetry = Telemetry::new(TelemetrySettings {
            access_log: observe.access_log != AccessLogTarget::Off,
            destination_labels: observe.destination_labels,
            protection,
        });
        let state = AdminState {
            telemetry: telemetry.clone(),
            config,
        };
        let admin = admin::start_for_run(observe.admin, state.clone())?;
        if let Some(a) = &admin {
            info!(addr = %a.addr(), "admin endpoints serving");
        }
        let probes = admin::start_probes(observe.probe, state)?;
        if let Some(p) = &probes {
            info!(addr = %p.addr(), "probe endpoints (/healthz, /readyz) serving");
        }
        Ok(Self {
            admin,
            probes,
            telemetry,
            rt,
        })
    }

    /// The mesh of an mTLS sidecar (`None` without `--tls-dir`). Tunnels may not ask for the
    /// sidecar's own ports: the proxy port, the tunnel port and the admin server's.
    pub fn mesh(
        &self,
        mtls: Option<&MtlsOptions>,
        tls: Option<Arc<TlsState>>,
        proxy_port: u16,
        connect_timeout: Duration,
    ) -> Option<Mesh> {
        let (m, tls) = mtls.zip(tls)?;
        let admin_port = self.admin.as_ref().map(|a| a.addr().port());
        let own = [proxy_port, m.tunnel_port].into_iter().chain(admin_port);
        Some(mesh(m, tls, &self.telemetry, connect_timeout, own))
    }

    /// From now on `/status` reports the mode, credentials and policy in force (read when
    /// asked: they rotate and reload).
    pub fn secured(
        &self,
        mtls: Option<&MtlsOptions>,
        tls: Option<Arc<TlsState>>,
        policy: Option<Arc<Enforcer>>,
    ) {
        self.telemetry.secured(Arc::new(InForce {
            mtls: mtls.cloned().zip(tls),
            policy,
        }));
    }

    /// Builds the proxy on this telemetry and starts its accept loops on `listeners` (marking
    /// them serving). Needs the runtime entered.
    pub fn serve(
        &self,
        settings: ProxySettings,
        redirect: Arc<dyn Redirect>,
        mesh: Option<Mesh>,
        journal: Arc<Journal>,
        policy: Option<Arc<Enforcer>>,
        listeners: Listeners,
    ) -> Result<Arc<Proxy>> {
        let proxy = Proxy::new(
            settings,
            redirect,
            mesh,
            journal,
            self.telemetry.clone(),
            policy,
        );
        start(&proxy, listeners, &self.telemetry)?;
        tokio::spawn(process::return_freed_memory());
        Ok(proxy)
    }

    /// Reports draining (`/readyz` 503), stops accepting and gives open connections until
    /// `deadline`; returns how many were still open and cut then.
    pub fn drain(&self, proxy: &Proxy, deadline: Duration) -> usize {
        self.telemetry.draining();
        let cut = self.rt.block_on(proxy.drain(deadline));
        if cut > 0 {
            warn!("{cut} connection(s) were still open after the drain deadline and were closed");
        }
        cut
    }
}

/// The security a sidecar was started with, as `/status` shows it.
struct InForce {
    mtls: Option<(MtlsOptions, Arc<TlsState>)>,
    policy: Option<Arc<Enforcer>>,
}

impl SecuritySource for InForce {
    fn security(&self) -> Security {
        let tls = self.mtls.as_ref().map(|(m, tls)| {
            let creds = tls.current();
            TlsStatus {
                identity: creds.identity.to_string(),
                certificate: tls.files().cert.display().to_string(),
                bundle: tls.files().bundle.display().to_string(),
                not_after_unix: unix_secs(creds.not_after),
                mesh_cidrs: m.mesh_cidrs.iter().map(ToString::to_string).collect(),
                inbound: m.inbound.map(|a| a.to_string()),
            }
        });
        Security {
            mode: MtlsOptions::protection(self.mtls.as_ref().map(|(m, _)| m)),
            tls,
            policy: self.policy.as_ref().map(|p| -> PolicyStatus { p.status() }),
        }
    }
}

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
    /// Marks the outbound listeners as the proxy's (see `flags::CHECK_LISTENER`).
    pub fn mark_outbound(&self, mark: u32) -> Result<()> {
        for l in std::iter::once(&self.outbound_v4).chain(&self.outbound_v6) {
            set_mark(l, mark).map_err(|e| {
                anyhow::anyhow!(
                    "cannot mark the proxy's listener (SO_MARK needs CAP_NET_ADMIN): {e}"
                )
            })?;
        }
        Ok(())
    }

    /// Like [`bind`](Self::bind), but a port still held by another process (the sidecar
    /// this one replaces: it gives its ports up as its drain starts) is tried again every
    /// 10 ms for up to `wait`, so the replacement listens the moment the old one stops.
    pub fn bind_waiting(
        proxy_port: u16,
        inbound: Option<SocketAddr>,
        wait: Duration,
    ) -> Result<Self> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Self::bind(proxy_port, inbound) {
                Err(e) if is_port_busy(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(PORT_WAIT_POLL);
                }
                bound => return bound,
            }
        }
    }

    /// Whether an IPv6 loopback listener can be had (what [`bind`](Self::bind) would find),
    /// for a run that binds its ports only later.
    pub fn ipv6_available() -> bool {
        StdListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
    }

    pub fn bind(proxy_port: u16, inbound: Option<SocketAddr>) -> Result<Self> {
        let (outbound_v4, outbound_v6) = bind_outbound(proxy_port)?;
        let inbound = match inbound {
            Some(addr) => Some(StdListener::bind(addr).map_err(|e| {
                let message = format!(
                    "cannot listen for tunnels on {addr}: {e}: pick another with --inbound-port, \
                     or --no-inbound for a client-only sidecar"
                );
                if e.kind() == io::ErrorKind::AddrInUse {
                    anyhow::Error::new(PortBusy(message))
                } else {
                    anyhow::anyhow!(message)
                }
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
fn mesh(
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
    let events = Arc::new(crate::telemetry::PoolTelemetry(telemetry.clone()));
    let mesh = Mesh::new(tls, m, connect_timeout, events).with_own_ports(own_ports);
    telemetry.pooling(mesh.pool.clone());
    mesh
}

/// Starts the accept loops on the current runtime and marks the listeners serving.
fn start(proxy: &Arc<Proxy>, listeners: Listeners, telemetry: &Telemetry) -> Result<()> {
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

/// A port of ours that another socket listens on (the message names it and the flag).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PortBusy(String);

/// Whether [`Listeners::bind`] failed because a port was taken (and may free up).
pub fn is_port_busy(e: &anyhow::Error) -> bool {
    e.is::<PortBusy>()
}

/// How often a busy port is tried again (`--port-wait-ms`).
const PORT_WAIT_POLL: Duration = Duration::from_millis(10);

/// Binds the proxy's outbound listeners. IPv6 is optional: without `::1`, native IPv6
/// connects are not intercepted (v4-mapped ones go to the IPv4 listener).
fn bind_outbound(port: u16) -> Result<(StdListener, Option<StdListener>)> {
    let in_use = |addr: SocketAddr, e: io::Error| {
        if e.kind() == io::ErrorKind::AddrInUse {
            anyhow::Error::new(PortBusy(format!(
                "proxy port {port} is already in use on {addr}: pick another with --proxy-port"
            )))
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
            warn!(
                "no IPv6 listener on {v6} ({e}): native IPv6 connects the proxy must see are \
                 refused (those that pass through still do; IPv4 through IPv6 sockets is \
                 intercepted as usual)"
            );
            None
        }
    };
    Ok((listen_v4, listen_v6))
}

/// std listens with a backlog of 128: thousands of intercepted connects arriving at once
/// overflow it, and the overflowed clients see resets before the proxy ever accepts them.
/// `listen()` again on a listening socket only changes its backlog; the kernel caps it at
/// `net.core.somaxconn`.
/// Sets SO_MARK on a listener (CAP_NET_ADMIN): the connect hooks redirect only to a
/// listener that carries the proxy's mark.
fn set_mark(listener: &StdListener, mark: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own, with a pointer to a u32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            std::ptr::from_ref(&mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn widen_accept_queue(listener: &StdListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: listen() on a socket we own; no memory is passed.
    if unsafe { libc::listen(listener.as_raw_fd(), libc::c_int::MAX) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
