//! The pod's pass-through records: the agent records the connections it let go straight to
//! their destination and streams this pod's (and only this pod's: it goes by this process's
//! cgroup) on a connection of their own; each becomes the same record a proxied connection
//! gets (metrics, access log). The connects the kernel refused under the pod's policy come
//! the same way (`denies`), each counted and logged by rule as the proxy's own denies are
//! (the total is among the pod's kernel counters, see `counters`).
//! Reconnects with backoff when the stream breaks (agent restart).

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    policy::Enforcer,
    redirect::passthrough::Recorder,
    registration::{PassedThrough, PolicyDenied, Reply, Request},
};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The running stream reader.
pub struct Listener {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// What a stream carries, and what becomes of each of its lines.
trait Sink: Send + Sync + 'static {
    const REQUEST: Request;
    const WHAT: &'static str;
    fn take(&self, line: &str);
}

impl Sink for Recorder {
    const REQUEST: Request = Request::Records;
    const WHAT: &'static str = "pass-through records";
    fn take(&self, line: &str) {
        match serde_json::from_str::<PassedThrough>(line) {
            Ok(closed) => self.record(&closed),
            Err(e) => warn!("unreadable pass-through record from the agent: {e}"),
        }
    }
}

/// The pod's policy, which the kernel's refusals are counted against by rule.
struct Denies {
    enforcer: Arc<Enforcer>,
}

impl Sink for Denies {
    const REQUEST: Request = Request::Denies;
    const WHAT: &'static str = "kernel policy refusals";
    fn take(&self, line: &str) {
        match serde_json::from_str::<PolicyDenied>(line) {
            Ok(d) => self.enforcer.record_kernel_denies([(d.dst, d.pid)]),
            Err(e) => warn!("unreadable policy refusal from the agent: {e}"),
        }
    }
}

impl Listener {
    /// Starts reading the records at the agent's `socket` (on the current runtime).
    pub fn start(socket: PathBuf, recorder: Recorder) -> Self {
        Self::spawn(socket, recorder)
    }

    /// Starts reading the connects the kernel refused under the pod's policy: counted by
    /// rule (and logged) by `enforcer`.
    pub fn start_denies(socket: PathBuf, enforcer: Arc<Enforcer>) -> Self {
        Self::spawn(socket, Denies { enforcer })
    }

    fn spawn(socket: PathBuf, sink: impl Sink) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(listen(socket, sink, stop.clone()));
        Self { stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.task).await;
    }
}

async fn listen<S: Sink>(socket: PathBuf, sink: S, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    loop {
        let result = tokio::select! {
            r = stream(&socket, &sink) => r,
            () = stop.cancelled() => return,
        };
        match result {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                info!("the agent's {} stream ended: reconnecting", S::WHAT);
            }
            Err(e) => {
                failures += 1;
                // Before the registration is in place the agent refuses: say so once.
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!("{} unavailable ({e}); retrying", S::WHAT);
                } else {
                    debug!("{} unavailable ({e})", S::WHAT);
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

/// One stream: ask, then hand every line to `sink` until it ends.
async fn stream<S: Sink>(socket: &PathBuf, sink: &S) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot reach the agent at {}: {e}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(&S::REQUEST).expect("requests serialize");
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(read).lines();
    let answer = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("the agent closed the connection")?;
    let reply: Reply = serde_json::from_str(&answer).map_err(|e| e.to_string())?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "refused".into()));
    }
    debug!("receiving this pod's {} from the agent", S::WHAT);
    while let Some(l) = lines.next_line().await.map_err(|e| e.to_string())? {
        sink.take(&l);
    }
    Ok(())
}
