//! The sidecar's side of the registration: connect to the agent's socket, register, keep the
//! connection open, and register again whenever it breaks (agent restart, socket re-bound),
//! with bounded backoff. On stop, deregister on the live connection.

use std::{path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    sync::oneshot,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::protocol::{Reply, Request};

/// First and longest wait between attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the agent may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The running registration task.
pub struct Registrar {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Why the registration task gave up for good.
pub type Fatal = oneshot::Receiver<String>;

impl Registrar {
    /// Starts registering `request` at `socket`. `on_registered` runs after each successful
    /// registration (the first one makes the sidecar ready). A refusal of the very first
    /// registration is fatal (a misconfigured pod must fail visibly) and reported on the
    /// returned receiver; later refusals are retried.
    pub fn start(
        socket: PathBuf,
        request: Request,
        on_registered: impl Fn(&Reply) + Send + Sync + 'static,
    ) -> (Self, Fatal) {
        let stop = CancellationToken::new();
        let (fatal_tx, fatal) = oneshot::channel();
        let task = tokio::spawn(register_loop(
            socket,
            request,
            on_registered,
            stop.clone(),
            fatal_tx,
        ));
        (Self { stop, task }, fatal)
    }

    /// Deregisters (if connected) and ends the task, within `deadline`.
    pub async fn deregister(self, deadline: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            warn!("deregistering from the agent took longer than {deadline:?}: gave up");
        }
    }
}

async fn register_loop(
    socket: PathBuf,
    request: Request,
    on_registered: impl Fn(&Reply),
    stop: CancellationToken,
    fatal: oneshot::Sender<String>,
) {
    let mut fatal = Some(fatal);
    let mut registered_once = false;
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    loop {
        match session(&socket, &request, &stop, &on_registered).await {
            Session::Stopped => return,
            Session::Broken(why) => {
                registered_once = true;
                backoff = BACKOFF_MIN;
                info!("agent connection lost ({why}): registering again");
            }
            Session::Refused(error) => {
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
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Session {
    Stopped,
    Broken(String),
    Refused(String),
    Unreachable(String),
}

async fn session(
    socket: &PathBuf,
    request: &Request,
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
        return Session::Refused(reply.error.unwrap_or_else(|| "no reason given".into()));
    }
    on_registered(&reply);
    // Connected and registered: wait for the connection to break, or for the stop.
    tokio::select! {
        line = lines.next_line() => Session::Broken(match line {
            Ok(None) => "closed by the agent".into(),
            Ok(Some(l)) => format!("unexpected message {l:?}"),
            Err(e) => e.to_string(),
        }),
        () = stop.cancelled() => {
            match ask(&mut write, &mut lines, &Request::Deregister).await {
                Ok(r) if r.ok => info!("deregistered from the agent: interception off"),
                Ok(r) => warn!("the agent refused the deregistration: {}", r.error.unwrap_or_default()),
                Err(e) => warn!("deregistering: {e}"),
            }
            Session::Stopped
        }
    }
}

async fn ask(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    request: &Request,
) -> Result<Reply, String> {
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(ANSWER_TIMEOUT, lines.next_line()).await {
        Err(_) => Err(format!("no answer within {ANSWER_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(None)) => Err("the agent closed the connection".into()),
        Ok(Ok(Some(l))) => serde_json::from_str(&l).map_err(|e| format!("bad answer {l:?}: {e}")),
    }
}
