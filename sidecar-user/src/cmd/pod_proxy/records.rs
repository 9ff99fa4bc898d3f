//! The pod's pass-through records: the agent records the connections it let go straight to
//! their destination and streams this pod's (and only this pod's: it goes by this process's
//! cgroup) on a connection of their own; each becomes the same record a proxied connection
//! gets (metrics, access log). Reconnects with backoff when the stream breaks (agent restart).

use std::{path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    redirect::passthrough::Recorder,
    registration::{PassedThrough, Reply, Request},
};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The running stream reader.
pub struct Listener {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Listener {
    /// Starts reading the records at the agent's `socket` (on the current runtime).
    pub fn start(socket: PathBuf, recorder: Recorder) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(listen(socket, recorder, stop.clone()));
        Self { stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.task).await;
    }
}

async fn listen(socket: PathBuf, recorder: Recorder, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u64;
    loop {
        let result = tokio::select! {
            r = stream(&socket, &recorder) => r,
            () = stop.cancelled() => return,
        };
        match result {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                info!("the agent's pass-through records stream ended: reconnecting");
            }
            Err(e) => {
                failures += 1;
                // Before the registration is in place the agent refuses: say so once.
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!("pass-through records unavailable ({e}); retrying");
                } else {
                    debug!("pass-through records unavailable ({e})");
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

/// One stream: ask, then record every line until it ends.
async fn stream(socket: &PathBuf, recorder: &Recorder) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot reach the agent at {}: {e}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(&Request::Records).expect("requests serialize");
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
    debug!("receiving this pod's pass-through records from the agent");
    while let Some(l) = lines.next_line().await.map_err(|e| e.to_string())? {
        match serde_json::from_str::<PassedThrough>(&l) {
            Ok(closed) => recorder.record(&closed),
            Err(e) => warn!("unreadable pass-through record from the agent: {e}"),
        }
    }
    Ok(())
}
