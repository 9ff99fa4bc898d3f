//! The pod's own kernel counters: the agent charges each pod's connects (and strict inbound
//! drops) to the pod's entry of `SCOPE_COUNTERS`, and this sidecar asks it for them once a
//! second (`{"op":"counters"}`, on a connection of its own; the agent names the pod by this
//! process's cgroup), so `/metrics` shows the pod's `sidecar_ebpf_*_total` as `sidecar run`
//! shows its own. Until the first answer (or with an agent too old to answer) there are none,
//! never zeros that would read as "nothing happened".

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use sidecar_common::Counter;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    registration::{Reply, Request},
    telemetry::CounterSource,
};

/// How often the counters are asked for: well within the agent's request deadline for an
/// idle connection, and finer than any scrape interval worth having.
const EVERY: Duration = Duration::from_secs(1);
/// How long one answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The pod's counters as last answered.
#[derive(Default)]
pub struct PodCounters {
    last: Mutex<BTreeMap<&'static str, u64>>,
}

impl PodCounters {
    /// Takes an answer's counters; names this build does not know are left out.
    fn take(&self, answer: BTreeMap<String, u64>) {
        let known = answer.into_iter().filter_map(|(name, value)| {
            Counter::PER_WORKLOAD
                .iter()
                .map(|c| c.name())
                .find(|n| *n == name)
                .map(|n| (n, value))
        });
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = known.collect();
    }
}

impl CounterSource for PodCounters {
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The running poller.
pub struct Poller {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Poller {
    /// Starts asking the agent at `socket` (on the current runtime).
    pub fn start(socket: PathBuf, counters: Arc<PodCounters>) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(poll(socket, counters, stop.clone()));
        Self { stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.task).await;
    }
}

async fn poll(socket: PathBuf, counters: Arc<PodCounters>, stop: CancellationToken) {
    loop {
        tokio::select! {
            result = ask_on(&socket, &counters) => {
                // Before the pod is registered, or while the agent restarts: asked again.
                debug!("the agent's counters for this pod: {}", result.unwrap_err());
            }
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Asks on one connection, once each [`EVERY`], until something fails.
async fn ask_on(socket: &PathBuf, counters: &PodCounters) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot reach the agent at {}: {e}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut line = serde_json::to_vec(&Request::Counters).expect("requests serialize");
    line.push(b'\n');
    loop {
        write.write_all(&line).await.map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| format!("no answer within {ANSWER_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?
            .ok_or("the agent closed the connection")?;
        let reply: Reply = serde_json::from_str(&answer).map_err(|e| e.to_string())?;
        match reply.counters {
            Some(c) if reply.ok => counters.take(c),
            _ => return Err(reply.error.unwrap_or_else(|| "refused".into())),
        }
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_counters_of_a_workload_are_taken() {
        let c = PodCounters::default();
        assert!(c.counters().is_empty(), "none before the first answer");
        c.take(BTreeMap::from([
            ("connect_seen".to_string(), 3),
            ("sk_msg_redirected".to_string(), 9),
            ("from_the_future".to_string(), 1),
        ]));
        assert_eq!(c.counters(), BTreeMap::from([("connect_seen", 3)]));
    }
}
