//! The registration socket: accept, pin the caller ([`Peer`]: SO_PEERCRED and a pidfd),
//! answer requests (see [`registration`](crate::registration)). The socket file is watched: if it is
//! deleted or replaced, the agent binds a new one and closes the connections of the old one,
//! so every sidecar re-registers through the path that exists.
//!
//! Any process on the node can connect, so no caller may hold the agent's resources for
//! long: a request must arrive within [`REQUEST_TIMEOUT`] (a registered sidecar may stay
//! idle, but once it starts a line it must finish it), answers are written under the same
//! deadline, and one caller (a pod, or a user outside the pods) holds at most
//! [`MAX_PER_CALLER`] connections.

use std::{
    io,
    os::{
        fd::{BorrowedFd, OwnedFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Agent,
    callers::{self, MAX_PER_CALLER, PerCaller},
    listener,
    peer::Peer,
    pod::{self, PodCgroup},
    requests::{self, Caller, Outcome, Refusal, Session},
};
use crate::{
    host::fd_passing::FdReader,
    registration::{self, MAX_LINE, ParseError, Reply, Request},
};

/// Connections served at once; more are closed at once (a node has far fewer pods).
const MAX_CONNECTIONS: usize = 4096;
/// How long a request line may take to arrive: from the connect or the previous answer while
/// the connection has not registered, from its first byte once it has. Also the deadline for
/// writing an answer. The sidecar writes each request at once, so this is only ever reached
/// by a caller that holds a connection without using it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    let per_caller = Arc::new(PerCaller::default());
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
            lock(&agent).refused(
                "node",
                "too_many_connections",
                &format!("{MAX_CONNECTIONS} registration connections open: closing a new one"),
            );
            continue;
        };
        let agent = agent.clone();
        let generation = generation.clone();
        let per_caller = per_caller.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_connection(stream, agent, per_caller) => {}
                () = generation.cancelled() => debug!("registration connection closed: socket re-bound"),
            }
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: UnixStream,
    agent: Arc<Mutex<Agent>>,
    per_caller: Arc<PerCaller>,
) {
    let (peer, caller) = match identify(&agent, &stream) {
        Ok(p) => p,
        Err(refusal) => {
            let (_, mut write) = stream.into_split();
            let _ = send(&mut write, &refusal).await;
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let Some(_slot) = per_caller.take(&caller) else {
        let error = format!(
            "{caller} has {MAX_PER_CALLER} registration connections open already: close one (a \
             sidecar needs one)"
        );
        lock(&agent).refused(&caller, "too_many_connections", &error);
        let _ = send(
            &mut write,
            &Reply::retry_later("too_many_connections", error),
        )
        .await;
        return;
    };
    let mut reader = tokio::io::AsyncReadExt::take(BufReader::new(FdReader::new(read)), u64::MAX);
    let mut session = Session::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE as u64 + 1);
        match next_line(&mut reader, &mut line, session.pod_uid.is_some()).await {
            Ok(Some(0)) | Err(_) => break,
            Ok(Some(_)) => {}
            Ok(None) => {
                let r = lock(&agent).refuse(
                    &caller,
                    "timeout",
                    format!(
                        "no complete request within {REQUEST_TIMEOUT:?}: closing the connection"
                    ),
                );
                let _ = send(&mut write, &r).await;
                break;
            }
        }
        // Descriptors belong to the line they came with (the sidecar sends the next request
        // only after this one's answer); any that no request asks for are closed here.
        let fds = reader.get_mut().get_mut().take();
        let connection = reader.get_ref().get_ref().connection();
        let reply = match registration::parse_request(&line) {
            Ok(Request::Records) => {
                match subscribe(&agent, &peer, &caller, requests::records_scope, |a, s| {
                    a.records.subscribe(s)
                }) {
                    Ok(records) => {
                        drop(fds);
                        if send(&mut write, &Reply::ok()).await.is_ok() {
                            stream_records(&mut reader, &mut write, records).await;
                        }
                        break;
                    }
                    Err(refusal) => *refusal,
                }
            }
            Ok(Request::Denies) => {
                match subscribe(&agent, &peer, &caller, requests::denies_scope, |a, s| {
                    a.denies.subscribe(s)
                }) {
                    Ok(denies) => {
                        drop(fds);
                        if send(&mut write, &Reply::ok()).await.is_ok() {
                            stream_records(&mut reader, &mut write, denies).await;
                        }
                        break;
                    }
                    Err(refusal) => *refusal,
                }
            }
            Ok(req) => {
                let passed = Passed { fds, connection };
                handle(&agent, &peer, &caller, req, passed, &mut session)
            }
            Err(e @ ParseError::TooLong) => {
                let r = lock(&agent).refuse(&caller, "bad_request", e);
                let _ = send(&mut write, &r).await;
                break;
            }
            Err(e) => lock(&agent).refuse(&caller, "bad_request", e),
        };
        if send(&mut write, &reply).await.is_err() {
            break;
        }
    }
    // A connection that ends without deregistering keeps its pod intercepted (fail-closed):
    // the sidecar crashed or the agent restarts; it re-registers when it comes back, and the
    // sweep removes the pod when its cgroup goes. Its open circuits go: no proxy is left to
    // close them.
    if let Some(uid) = &session.pod_uid {
        let mut guard = lock(&agent);
        let agent = &mut *guard;
        requests::connection_ended(&mut agent.registry, &mut agent.pins, &session);
        debug!(pod_uid = %uid, "registration connection ended; interception stays");
    }
}

/// A stream of the caller's own pod (its pass-through records, or its kernel refusals): the
/// pod comes from the caller's cgroup, read now, as for a registration; `scope_of` says
/// whether that pod may have this stream, `open` subscribes to its scope.
fn subscribe<T>(
    agent: &Arc<Mutex<Agent>>,
    peer: &Peer,
    caller: &str,
    scope_of: fn(&super::registry::Registry, &PodCgroup) -> Result<u32, Refusal>,
    open: fn(&mut Agent, u32) -> tokio::sync::mpsc::Receiver<T>,
) -> Result<tokio::sync::mpsc::Receiver<T>, Box<Reply>> {
    let mut agent = lock(agent);
    let pod = pod_of(peer, &agent.cgroup2, agent.ns_root.as_deref(), &agent.root);
    match pod.and_then(|pod| scope_of(&agent.registry, &pod)) {
        Ok(scope) => Ok(open(&mut agent, scope)),
        Err(r) => Err(Box::new(agent.refuse(caller, r.reason, r.error))),
    }
}

/// Writes each record as a line until the sidecar closes the connection (or sends anything:
/// a records connection carries no more requests).
async fn stream_records<T: serde::Serialize>(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    write: &mut OwnedWriteHalf,
    mut records: tokio::sync::mpsc::Receiver<T>,
) {
    loop {
        tokio::select! {
            record = records.recv() => {
                let Some(record) = record else { return };
                let mut line = serde_json::to_vec(&record).expect("records serialize");
                line.push(b'\n');
                let written = tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&line)).await;
                if !matches!(written, Ok(Ok(()))) {
                    return;
                }
            }
            _ = reader.fill_buf() => return,
        }
    }
}

/// Pins the caller and names it for the per-caller limits and the log: `pod <uid>` for a
/// process in a pod, else `uid <n>`. A caller that cannot be pinned gets its refusal.
fn identify(agent: &Arc<Mutex<Agent>>, stream: &UnixStream) -> Result<(Peer, String), Box<Reply>> {
    let mut agent = lock(agent);
    let peer = match Peer::of(stream) {
        Ok(p) => p,
        Err(e) => return Err(Box::new(agent.refuse("unidentified", e.reason(), e))),
    };
    let caller = match peer
        .read(|pid| pod::cgroup_of(&agent.cgroup2, pid, agent.ns_root.as_deref()))
    {
        Ok(Ok(cgroup)) => callers::name(pod::derive(&agent.root, &cgroup).ok().as_ref(), peer.uid),
        Ok(Err(_)) => callers::name(None, peer.uid),
        Err(e) => {
            return Err(Box::new(agent.refuse(
                &format!("pid {}", peer.pid),
                e.reason(),
                e,
            )));
        }
    };
    Ok((peer, caller))
}

/// Reads one line into `line`: `Some(0)` at EOF, `None` if it did not arrive in time. With
/// `idle_ok` the wait for its first byte has no deadline.
async fn next_line(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
    idle_ok: bool,
) -> io::Result<Option<usize>> {
    if idle_ok && reader.fill_buf().await?.is_empty() {
        return Ok(Some(0));
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', line)).await {
        Ok(read) => read.map(Some),
        Err(_) => Ok(None),
    }
}

async fn send(write: &mut OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialize");
    line.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&line))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// What came with a request besides its line: descriptors, and the connection itself (whose
/// network namespace is the caller's).
struct Passed<'a> {
    fds: Vec<OwnedFd>,
    connection: BorrowedFd<'a>,
}

/// Answers a request other than `records` (see [`requests::answer`]).
fn handle(
    agent: &Arc<Mutex<Agent>>,
    peer: &Peer,
    caller: &str,
    req: Request,
    passed: Passed<'_>,
    session: &mut Session,
) -> Reply {
    let mut guard = lock(agent);
    let agent = &mut *guard;
    let pid = peer.pid;
    let Agent {
        pins,
        registry,
        cgroup2,
        ns_root,
        root,
        ..
    } = agent;
    let outcome = requests::answer(
        registry,
        pins,
        Caller { pid, uid: peer.uid },
        || pod_of(peer, cgroup2, ns_root.as_deref(), root),
        |named, port, ipv6| {
            // A sidecar that passes no listeners predates the check: registered as before
            // (refusing it would break every pod until its sidecar is updated), and said so.
            if named == 0 && passed.fds.is_empty() {
                return Ok(None);
            }
            listener::verify(passed.fds, named, port, ipv6, passed.connection)
                .map(Some)
                .map_err(|e| Refusal::new("bad_listener", format!("pid {pid}: {e}")))
        },
        req,
        session,
        agent.own_pod.as_deref(),
    );
    match outcome {
        Outcome::Registered(reg) => {
            info!(pod_uid = %reg.pod_uid, pid, proxy_port = reg.proxy_port, listener_checked = reg.listener_checked, cgroup = %reg.pod_cgroup.display(), "pod registered: interception on");
            if !reg.listener_checked {
                warn!(
                    pod_uid = %reg.pod_uid,
                    "the pod's sidecar passed no listeners (it is older than this agent): its \
                     connects are redirected to whatever listens on port {}, also after the \
                     sidecar dies; update the sidecar image",
                    reg.proxy_port
                );
            }
            Reply {
                ok: true,
                pod_uid: Some(reg.pod_uid),
                pod_cgroup: Some(reg.pod_cgroup.display().to_string()),
                proxy_cgroup: Some(reg.proxy_cgroup.display().to_string()),
                scope: Some(reg.scope),
                sockmap: Some(agent.sockmap),
                passthrough: Some(reg.passthrough),
                ..Reply::default()
            }
        }
        Outcome::Circuit => Reply::ok(),
        Outcome::Counters(counters) => Reply {
            ok: true,
            counters: Some(
                counters
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
            ..Reply::default()
        },
        Outcome::PolicyReplaced(uid) => {
            info!(pod_uid = %uid, "pod policy replaced in the kernel");
            Reply {
                ok: true,
                pod_uid: Some(uid),
                ..Reply::default()
            }
        }
        Outcome::Deregistered(uid) => {
            info!(pod_uid = %uid, "pod deregistered: interception off");
            Reply {
                ok: true,
                pod_uid: Some(uid),
                ..Reply::default()
            }
        }
        Outcome::Status => Reply {
            ok: true,
            status: Some(agent.status()),
            ..Reply::default()
        },
        Outcome::Refused(r) => Reply {
            retry: r.retry,
            ..agent.refuse(caller, r.reason, r.error)
        },
        Outcome::Failed(r) => Reply::refused(r.reason, r.error),
    }
}

/// The caller's pod, from its cgroup read now, believed only while the pin holds: the pid
/// may name another process (in another pod) once the caller is gone.
fn pod_of(
    peer: &Peer,
    cgroup2: &Path,
    ns_root: Option<&Path>,
    root: &Path,
) -> Result<PodCgroup, Refusal> {
    let pid = peer.pid;
    let cgroup = match peer.read(|pid| pod::cgroup_of(cgroup2, pid, ns_root)) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(Refusal::new("process_gone", format!("pid {pid}: {e}"))),
        Err(e) => return Err(Refusal::new(e.reason(), e)),
    };
    pod::derive(root, &cgroup).map_err(|e| Refusal::new(e.reason(), format!("pid {pid}: {e}")))
}

fn lock(agent: &Arc<Mutex<Agent>>) -> std::sync::MutexGuard<'_, Agent> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}
