//! The registration socket: accept, identify the caller by SO_PEERCRED, answer requests
//! (see [`protocol`](super::protocol)). The socket file is watched: if it is deleted or
//! replaced, the agent binds a new one and closes the connections of the old one, so every
//! sidecar re-registers through the path that exists.

use std::{
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Agent, pod,
    protocol::{MAX_LINE, Reply, Request},
    registry,
};

/// Connections served at once; more are closed at once (a node has far fewer pods).
const MAX_CONNECTIONS: usize = 4096;

/// The bound socket: its path, the identity of the file we created, and the token that
/// ends its accept loop and connections.
pub struct Bound {
    path: PathBuf,
    ino: (u64, u64),
    generation: CancellationToken,
}

impl Bound {
    /// Whether the socket file is still the one we bound.
    pub fn intact(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.ino)
            .unwrap_or(false)
    }

    /// Stops this generation and removes the file if it is still ours.
    pub fn close(self) {
        self.generation.cancel();
        if self.intact() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the socket (creating its directory, replacing a stale socket file), world-writable
/// so unprivileged sidecars can connect; identity comes from SO_PEERCRED, not file modes.
pub fn bind(path: &Path, agent: Arc<Mutex<Agent>>) -> io::Result<Bound> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: remove it or pick another --socket",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let meta = std::fs::symlink_metadata(path)?;
    let generation = CancellationToken::new();
    tokio::spawn(accept_loop(listener, agent, generation.clone()));
    info!(socket = %path.display(), "registration socket listening");
    Ok(Bound {
        path: path.into(),
        ino: (meta.dev(), meta.ino()),
        generation,
    })
}

async fn accept_loop(
    listener: UnixListener,
    agent: Arc<Mutex<Agent>>,
    generation: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("registration socket accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = generation.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!("{MAX_CONNECTIONS} registration connections open: closing a new one");
            continue;
        };
        let agent = agent.clone();
        let generation = generation.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_connection(stream, agent) => {}
                () = generation.cancelled() => debug!("registration connection closed: socket re-bound"),
            }
            drop(permit);
        });
    }
}

/// What one connection has registered.
#[derive(Default)]
struct Session {
    pod_uid: Option<String>,
}

async fn serve_connection(stream: UnixStream, agent: Arc<Mutex<Agent>>) {
    let cred = stream.peer_cred().ok();
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::AsyncReadExt::take(BufReader::new(read), u64::MAX);
    let mut session = Session::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE as u64 + 1);
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_LINE {
            lock(&agent).refused("bad_request");
            let r = Reply::refused(
                "bad_request",
                format!("request longer than {MAX_LINE} bytes"),
            );
            let _ = send(&mut write, &r).await;
            break;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handle(&agent, cred, req, &mut session),
                Err(e) => {
                    lock(&agent).refused("bad_request");
                    Reply::refused("bad_request", format!("not a request: {e}"))
                }
            }
        };
        if send(&mut write, &reply).await.is_err() {
            break;
        }
    }
    // A connection that ends without deregistering keeps its pod intercepted (fail-closed):
    // the sidecar crashed or the agent restarts; it re-registers when it comes back, and the
    // sweep removes the pod when its cgroup goes.
    if let Some(uid) = session.pod_uid {
        debug!(pod_uid = %uid, "registration connection ended; interception stays");
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialize");
    line.push(b'\n');
    write.write_all(&line).await
}

fn handle(
    agent: &Arc<Mutex<Agent>>,
    cred: Option<tokio::net::unix::UCred>,
    req: Request,
    session: &mut Session,
) -> Reply {
    let mut agent = lock(agent);
    let pid = cred
        .and_then(|c| c.pid())
        .filter(|p| *p > 0)
        .map(|p| p as u32);
    match req {
        Request::Register {
            pod_uid,
            proxy_port,
            inbound_port,
            exclude_ports,
            exclude_cidrs,
            ipv6,
            allow_metadata,
        } => {
            let Some(pid) = pid else {
                return agent.refuse(
                    "no_peer_pid",
                    "the caller's pid is not visible to the agent (the agent needs hostPID)",
                );
            };
            let cgroup = match pod::cgroup_of(&agent.cgroup2, pid, agent.ns_root.as_deref()) {
                Ok(c) => c,
                Err(e) => return agent.refuse("process_gone", format!("pid {pid}: {e}")),
            };
            let pod = match pod::derive(&agent.root, &cgroup) {
                Ok(p) => p,
                Err(e) => return agent.refuse(e.reason(), format!("pid {pid}: {e}")),
            };
            let claimed = pod::canonical_uid(&pod_uid);
            if claimed != pod.uid {
                return agent.refuse(
                    "uid_mismatch",
                    format!(
                        "pid {pid} claims pod {claimed} but its cgroup is pod {}'s",
                        pod.uid
                    ),
                );
            }
            if let Some(other) = session.pod_uid.as_ref().filter(|u| **u != pod.uid) {
                return agent.refuse(
                    "uid_mismatch",
                    format!("this connection registered pod {other} already"),
                );
            }
            let cidrs: Result<Vec<crate::cidr::Cidr>, _> =
                exclude_cidrs.iter().map(|c| c.parse()).collect();
            let exclude_cidrs = match cidrs {
                Ok(c) => c,
                Err(e) => return agent.refuse("bad_request", format!("exclude_cidrs: {e}")),
            };
            let req = registry::Request {
                pod,
                pid,
                proxy_port,
                inbound_port,
                exclude_ports,
                exclude_cidrs,
                ipv6,
                allow_metadata,
            };
            let Agent { pins, registry, .. } = &mut *agent;
            match registry.register(pins, req) {
                Ok(reg) => {
                    info!(pod_uid = %reg.pod_uid, pid, proxy_port, cgroup = %reg.pod_cgroup.display(), "pod registered: interception on");
                    session.pod_uid = Some(reg.pod_uid.clone());
                    Reply {
                        ok: true,
                        pod_uid: Some(reg.pod_uid),
                        pod_cgroup: Some(reg.pod_cgroup.display().to_string()),
                        proxy_cgroup: Some(reg.proxy_cgroup.display().to_string()),
                        scope: Some(reg.scope),
                        ..Reply::default()
                    }
                }
                Err(e) => agent.refuse(e.reason(), e),
            }
        }
        Request::Deregister => {
            let Some(uid) = session.pod_uid.take() else {
                return agent.refuse("not_registered", "this connection has not registered a pod");
            };
            let Agent { pins, registry, .. } = &mut *agent;
            match registry.remove(pins, &uid) {
                Ok(_) => {
                    info!(pod_uid = %uid, "pod deregistered: interception off");
                    Reply {
                        ok: true,
                        pod_uid: Some(uid),
                        ..Reply::default()
                    }
                }
                Err(e) => Reply::refused("internal", e),
            }
        }
        Request::Status => {
            if cred.map(|c| c.uid()) != Some(0) {
                return agent.refuse("not_root", "status is for root on the node (uid 0)");
            }
            Reply {
                ok: true,
                status: Some(agent.status()),
                ..Reply::default()
            }
        }
    }
}

fn lock(agent: &Arc<Mutex<Agent>>) -> std::sync::MutexGuard<'_, Agent> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}
