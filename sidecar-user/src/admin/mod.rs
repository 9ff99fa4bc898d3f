//! The admin server: `/metrics`, `/healthz`, `/readyz`, `/connections`, `/config`, `/status`
//! on its own address (127.0.0.1:15000 by default: localhost only).
//!
//! It runs on its own thread with its own single-threaded tokio runtime, so a scrape — even
//! a slow or abusive one — competes with the data path only for a CPU, never for the proxy
//! runtime's workers or its task queue. Concurrent admin requests are capped, in total and per
//! peer address; excess ones are answered 503 at once.
//!
//! Kubelet's probes get a listener of their own (`--probe-addr`, like Istio's status port):
//! `/healthz` and `/readyz` only, with their own slots and a short head timeout, so clients
//! that hold the admin endpoint's slots (it is reachable from the pod network, for
//! Prometheus) cannot get the pod restarted or taken out of its Service.

pub mod config;
pub mod flags;
pub mod http;
pub mod status;

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener},
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use thiserror::Error;
use tokio::sync::oneshot;

use self::http::{Request, Response};
use crate::telemetry::Telemetry;

/// Default admin address: localhost only.
pub const DEFAULT_ADDR: &str = crate::defaults::ADMIN_ADDR;
/// Requests served at the same time (each holds at most an 8 KiB head); beyond that a
/// connection is answered 503 at once rather than queued, so silent clients cannot make
/// later scrapes wait for their head timeout. One address may hold a quarter of the slots.
const ADMIN_LIMITS: http::Limits = http::Limits {
    total: 64,
    per_peer: 16,
    head_timeout: http::HEAD_TIMEOUT,
    answer_timeout: http::ANSWER_TIMEOUT,
};
/// The probe listener: kubelet sends its request as soon as it connects and probes a pod a
/// few times at once at most, so a peer gets 8 slots and 2 s to send its head.
const PROBE_LIMITS: http::Limits = http::Limits {
    total: 128,
    per_peer: 8,
    head_timeout: Duration::from_secs(2),
    answer_timeout: http::ANSWER_TIMEOUT,
};
/// Rows `/connections` returns at most.
pub const MAX_CONNECTION_ROWS: usize = 10_000;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error(
        "admin address {addr} is already in use: pick another with --admin-addr, or turn the \
         admin server off with --admin-addr off"
    )]
    InUse { addr: SocketAddr },
    #[error(
        "probe address {addr} is already in use: pick another with --probe-addr, or turn the \
         probe listener off with --probe-addr off"
    )]
    ProbeInUse { addr: SocketAddr },
    #[error("cannot serve the admin endpoints on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the admin thread: {0}")]
    Thread(io::Error),
}

/// What the endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub telemetry: Arc<Telemetry>,
    /// The effective configuration, already redacted.
    pub config: serde_json::Value,
}

/// The running server; dropping it stops the thread.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Which endpoints a server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoints {
    /// The admin server: all of them.
    All,
    /// The probe listener: `/healthz` and `/readyz`.
    Probes,
}

impl AdminServer {
    /// Binds now (so a busy port is reported before anything else starts) and serves on a
    /// dedicated thread.
    pub fn start(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        Self::spawn(addr, state, Endpoints::All)
    }

    /// The probe listener: `/healthz` and `/readyz` only, on a thread of its own.
    pub fn start_probes(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        Self::spawn(addr, state, Endpoints::Probes)
    }

    fn spawn(
        addr: SocketAddr,
        state: AdminState,
        endpoints: Endpoints,
    ) -> Result<Self, AdminError> {
        let listener = StdListener::bind(addr).map_err(|source| {
            match (source.kind() == io::ErrorKind::AddrInUse, endpoints) {
                (true, Endpoints::All) => AdminError::InUse { addr },
                (true, Endpoints::Probes) => AdminError::ProbeInUse { addr },
                (false, _) => AdminError::Bind { addr, source },
            }
        })?;
        let bound = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| AdminError::Bind { addr, source })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AdminError::Thread)?;
        let (stop, stopped) = oneshot::channel();
        let state = Arc::new(state);
        let name = match endpoints {
            Endpoints::All => "sidecar-admin",
            Endpoints::Probes => "sidecar-probes",
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || rt.block_on(serve(listener, state, endpoints, stopped)))
            .map_err(AdminError::Thread)?;
        Ok(Self {
            addr: bound,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: StdListener,
    state: Arc<AdminState>,
    endpoints: Endpoints,
    stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("admin server: {e}");
            return;
        }
    };
    let limits = match endpoints {
        Endpoints::All => ADMIN_LIMITS,
        Endpoints::Probes => PROBE_LIMITS,
    };
    tokio::select! {
        () = http::serve(listener, limits, move |req| route(&state, endpoints, req)) => {}
        _ = stop => {}
    }
}

/// Starts the admin server the way `sidecar run` asks: the default address is skipped with a
/// warning when busy (several runs on one host must not fail on it); a chosen one must work.
pub fn start_for_run(
    listen: config::AdminListen,
    state: AdminState,
) -> Result<Option<AdminServer>, AdminError> {
    let addr = match listen {
        config::AdminListen::Off => return Ok(None),
        config::AdminListen::Addr(a) => {
            if !a.ip().is_loopback() {
                tracing::warn!(
                    "admin endpoints on {a} are reachable from other hosts and have no \
                     authentication; /config and /connections describe this workload"
                );
            }
            return AdminServer::start(a, state).map(Some);
        }
        config::AdminListen::Default => DEFAULT_ADDR.parse().expect("static address"),
    };
    match AdminServer::start(addr, state) {
        Ok(s) => Ok(Some(s)),
        Err(AdminError::InUse { addr }) => {
            tracing::warn!(
                "admin address {addr} is busy (another sidecar?): running without admin \
                 endpoints; choose one with --admin-addr"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The configuration the sidecar started with, and what of it changes while it runs: the
/// policy in force (its rules, when it was loaded) and the credentials' identity and expiry.
fn live_config(state: &AdminState) -> serde_json::Value {
    let mut config = state.config.clone();
    let security = state.telemetry.security();
    let Some(map) = config.as_object_mut() else {
        return config;
    };
    if let Some(policy) = security.policy {
        map.insert("policy".into(), serde_json::json!(policy));
    }
    if let (Some(tls), Some(live)) = (
        map.get_mut("tls").and_then(|t| t.as_object_mut()),
        security.tls,
    ) {
        tls.insert("identity".into(), live.identity.into());
        tls.insert("not_after_unix".into(), live.not_after_unix.into());
    }
    config
}

/// Starts the probe listener where asked (`None`: none).
pub fn start_probes(
    addr: Option<SocketAddr>,
    state: AdminState,
) -> Result<Option<AdminServer>, AdminError> {
    addr.map(|a| AdminServer::start_probes(a, state))
        .transpose()
}

fn route(state: &AdminState, endpoints: Endpoints, req: &Request) -> Response {
    let t = &state.telemetry;
    let probe = matches!(req.path.as_str(), "/healthz" | "/readyz");
    if endpoints == Endpoints::Probes && !probe {
        return Response::text(404, "the probe listener serves /healthz and /readyz only\n");
    }
    match req.path.as_str() {
        "/metrics" => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            t.render_metrics(),
        ),
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => {
            let checks = t.ready_checks();
            let ready = checks.iter().all(|c| c.ok);
            Response::json(
                if ready { 200 } else { 503 },
                &serde_json::json!({ "ready": ready, "checks": checks }),
            )
        }
        "/connections" => {
            let mut rows = t.live_connections();
            let total = rows.len();
            rows.truncate(MAX_CONNECTION_ROWS);
            Response::json(
                200,
                &serde_json::json!({
                    "count": total,
                    "truncated": total > rows.len(),
                    "connections": rows,
                    "tunnels": t.tunnel_pool(),
                }),
            )
        }
        "/config" => Response::json(200, &live_config(state)),
        "/status" => Response::json(200, &status::Status::collect(t)),
        "/" => Response::text(
            200,
            "sidecar admin: /metrics /healthz /readyz /connections /config /status\n",
        ),
        _ => Response::text(404, "not found; try /\n"),
    }
}
