//! The sidecar's side of the registration: connect to the agent's socket, register, keep the
//! connection open, and register again whenever it breaks (agent restart, socket re-bound),
//! with bounded backoff.
//!
//! Stopping never deregisters: the sidecar cannot tell a pod's deletion from a restart of
//! its own container (liveness failure, OOM kill, image update), and a deregistration would
//! let the app's connects go direct, without mTLS or policy, until the restarted sidecar
//! registers. The pod stays intercepted (its connects are refused while no proxy listens)
//! until the restarted sidecar takes the registration back or the pod's cgroup goes.
//!
//! Every register line carries the proxy's outbound listeners (`host::fd_passing`): the
//! agent marks them as the proxy's and redirects the pod's connects to nothing else. The
//! registrar holds copies of them for its re-registrations, so it is stopped before the
//! proxy's listeners are to close (the copies would keep them listening).
//!
//! The pod's policy goes with the register line, and each reload the sidecar accepts goes to
//! the agent on the same connection (`{"op":"policy"}`) before the proxy takes it: the
//! kernel half of the pod's policy is the agent's. The register line always carries the
//! policy the agent last accepted, so a re-registration never brings an older one back.
//!
//! The proxy's open circuits go the same way (`{"op":"circuit"}`, see `circuits`): what
//! changed while registered, and all of them after each registration.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::circuits::{self, AgentCircuits};
use crate::{
    host::fd_passing,
    policy::{AgentRefusal, KernelUpdate},
    registration::{Reply, Request},
};

/// First and longest wait between attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the agent may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Registrar::stop`] waits for the task (it only has to notice the cancel).
const STOP_DEADLINE: Duration = Duration::from_secs(1);

/// The running registration task.
pub struct Registrar {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Why the registration task gave up for good.
pub type Fatal = oneshot::Receiver<String>;

impl Registrar {
    /// Starts registering `request` at `socket`, its listeners passed each time.
    /// `on_registered` runs after each successful registration (the first one makes the
    /// sidecar ready). A refusal of the very first registration is fatal (a misconfigured pod
    /// must fail visibly) and reported on the returned receiver, unless the agent marks it
    /// `retry` (the node is full, not the pod wrong): those, and later refusals, are retried
    /// with backoff, the sidecar not ready.
    /// `policies`: reloads of the pod's policy for the agent to install (see the module's
    /// docs); each is answered once the agent did or refused. `circuits`: the proxy's open
    /// circuits, for the agent to refuse in the kernel.
    pub fn start(
        socket: PathBuf,
        request: Registration,
        policies: mpsc::Receiver<KernelUpdate>,
        circuits: Arc<AgentCircuits>,
        on_registered: impl Fn(&Reply) + Send + Sync + 'static,
    ) -> (Self, Fatal) {
        let stop = CancellationToken::new();
        let (fatal_tx, fatal) = oneshot::channel();
        let task = tokio::spawn(register_loop(
            socket,
            request,
            policies,
            circuits,
            on_registered,
            stop.clone(),
            fatal_tx,
        ));
        (Self { stop, task }, fatal)
    }

    /// Ends the task and closes the registration connection, leaving the registration in
    /// place (see the module's docs), and closes the registrar's copies of the listeners.
    pub async fn stop(self) {
        self.stop.cancel();
        if tokio::time::timeout(STOP_DEADLINE, self.task)
            .await
            .is_err()
        {
            warn!("the registration task did not stop within {STOP_DEADLINE:?}");
        }
    }
}

/// A register request and the listeners that go with it (`host::fd_passing`).
pub type Registration = (Request, Vec<OwnedFd>);

async fn register_loop(
    socket: PathBuf,
    mut request: Registration,
    mut policies: mpsc::Receiver<KernelUpdate>,
    circuits: Arc<AgentCircuits>,
    on_registered: impl Fn(&Reply),
    stop: CancellationToken,
    fatal: oneshot::Sender<String>,
) {
    let mut fatal = Some(fatal);
    let mut registered_once = false;
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    loop {
        let session = session(
            &socket,
            &mut request,
            &mut policies,
            &circuits,
            &stop,
            &on_registered,
        );
        match session.await {
            Session::Stopped => return,
            Session::Broken(why) => {
                registered_once = true;
                backoff = BACKOFF_MIN;
                info!("agent connection lost ({why}): registering again");
            }
            Session::Refused { error, retry: true } => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!("the agent cannot register this pod now: {error}; retrying");
                } else {
                    debug!("the agent cannot register this pod now: {error}");
                }
            }
            Session::Refused { error, .. } => {
                if !registered_once && let Some(tx) = fatal.take() {
                    let _ = tx.send(error);
                    return;
                }
                warn!("the agent refused the registration: {error}; retrying");
            }
            Session::Unreachable(e) => {
                failures += 1;
                // The agent may simply not be up yet: say so once, then every 30 attempts.
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!(
                        "cannot reach the agent at {}: {e}; retrying",
                        socket.display()
                    );
                } else {
                    debug!("cannot reach the agent: {e}");
                }
            }
        }
        let pause = tokio::time::sleep(backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                () = stop.cancelled() => return,
                Some(update) = policies.recv() => {
                    let _ = update.done.send(Err(AgentRefusal {
                        error: "the pod is not registered with the agent right now (tried again \
                                once it is)"
                            .into(),
                        retry: true,
                    }));
                }
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Session {
    Stopped,
    Broken(String),
    /// `retry`: the agent says to try again later ([`Reply::retry`]).
    Refused {
        error: String,
        retry: bool,
    },
    Unreachable(String),
}

async fn session(
    socket: &PathBuf,
    request: &mut Registration,
    policies: &mut mpsc::Receiver<KernelUpdate>,
    circuits: &AgentCircuits,
    stop: &CancellationToken,
    on_registered: &impl Fn(&Reply),
) -> Session {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => return Session::Unreachable(e.to_string()),
    };
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let reply = match ask(&mut write, &mut lines, request).await {
        Ok(r) => r,
        Err(e) => return Session::Unreachable(e),
    };
    if !reply.ok {
        return Session::Refused {
            error: reply.error.unwrap_or_else(|| "no reason given".into()),
            retry: reply.retry,
        };
    }
    on_registered(&reply);
    // Connected and registered: hand the agent the open circuits, then each change of them
    // and each policy reload, until the connection breaks or the stop.
    let mut sent = BTreeSet::new();
    if let Err(e) = send_circuits(&mut write, &mut lines, circuits, &mut sent).await {
        return Session::Broken(e);
    }
    loop {
        tokio::select! {
            () = circuits.changed() => {
                if let Err(e) = send_circuits(&mut write, &mut lines, circuits, &mut sent).await {
                    return Session::Broken(e);
                }
            }
            line = lines.next_line() => return Session::Broken(match line {
                Ok(None) => "closed by the agent".into(),
                Ok(Some(l)) => format!("unexpected message {l:?}"),
                Err(e) => e.to_string(),
            }),
            () = stop.cancelled() => {
                info!("registration left in place: the pod stays intercepted until a restarted sidecar registers or the pod is gone");
                return Session::Stopped;
            }
            Some(update) = policies.recv() => {
                let ask_line = (Request::Policy { text: update.text.clone() }, Vec::new());
                match ask(&mut write, &mut lines, &ask_line).await {
                    Ok(reply) if reply.ok => {
                        if let Request::Register { policy, .. } = &mut request.0 {
                            *policy = Some(update.text);
                        }
                        let _ = update.done.send(Ok(()));
                    }
                    Ok(reply) => {
                        let error = reply.error.unwrap_or_else(|| "no reason given".into());
                        let _ = update.done.send(Err(AgentRefusal { error, retry: reply.retry }));
                    }
                    Err(e) => {
                        let _ = update.done.send(Err(AgentRefusal {
                            error: format!("no answer from the agent: {e}"),
                            retry: true,
                        }));
                        return Session::Broken(e);
                    }
                }
            }
        }
    }
}

/// Tells the agent what changed between the circuits it has (`sent`) and those the proxy
/// holds open. One it refuses (the pod's share is full) stays with the proxy alone, and is
/// not asked for again while open.
async fn send_circuits(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    wanted: &AgentCircuits,
    sent: &mut BTreeSet<SocketAddr>,
) -> Result<(), String> {
    for (dst, open) in circuits::changes(&wanted.wanted(), sent) {
        let line = (Request::Circuit { dst, open }, Vec::new());
        let reply = ask(write, lines, &line).await?;
        if !reply.ok {
            let error = reply.error.unwrap_or_else(|| "no reason given".into());
            warn!(%dst, open, "the agent did not take a circuit change: {error}");
        }
        if open {
            sent.insert(dst);
        } else {
            sent.remove(&dst);
        }
    }
    Ok(())
}

async fn ask(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    (request, listeners): &Registration,
) -> Result<Reply, String> {
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    // The agent may answer and close before reading the request (a connection it refuses
    // at once): the write then fails, but the answer is there to read.
    let written = send_line(write, &line, listeners).await;
    match (
        tokio::time::timeout(ANSWER_TIMEOUT, lines.next_line()).await,
        written,
    ) {
        (Ok(Ok(Some(l))), _) => {
            serde_json::from_str(&l).map_err(|e| format!("bad answer {l:?}: {e}"))
        }
        (_, Err(e)) => Err(e.to_string()),
        (Err(_), Ok(())) => Err(format!("no answer within {ANSWER_TIMEOUT:?}")),
        (Ok(Err(e)), Ok(())) => Err(e.to_string()),
        (Ok(Ok(None)), Ok(())) => Err("the agent closed the connection".into()),
    }
}

/// Writes `line`, with `listeners` attached to its first byte if there are any.
async fn send_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    line: &[u8],
    listeners: &[OwnedFd],
) -> std::io::Result<()> {
    let sent = if listeners.is_empty() {
        0
    } else {
        let fds: Vec<_> = listeners.iter().map(AsFd::as_fd).collect();
        fd_passing::send(write.as_ref(), line, &fds).await?
    };
    write.write_all(&line[sent..]).await
}
