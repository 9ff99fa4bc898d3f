//! Caps on what one proxy holds at once, so a flood of connections (or of silent TLS clients
//! on the tunnel port, each of which would otherwise hold a handshake task until its deadline)
//! is refused at the door instead of exhausting file descriptors and memory.
//!
//! A connection over a cap is closed right after `accept` with a reset (the client sees the
//! refusal at once, not a hang), counted in `sidecar_connections_refused_total{reason}`, and
//! logged at most once per [`LOG_EVERY`] with how many were refused in between.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::telemetry::labels::Cap;

/// File descriptors kept back from the connection budget: listeners, the admin server,
/// certificate and policy files, the agent socket, logs.
const RESERVED_FDS: u64 = 256;
/// Descriptors one proxied connection holds: the accepted socket and the upstream one.
const FDS_PER_CONNECTION: u64 = 2;
/// Default cap on tunnel handshakes in progress (never more than the connection cap).
const DEFAULT_PENDING_HANDSHAKES: usize = 1024;
/// Smallest connection cap derived from a low `RLIMIT_NOFILE`.
const MIN_CONNECTIONS: usize = 16;
/// At most one log line per cap and this period.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The command-line flags, shared by `sidecar run` and `sidecar proxy`.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LimitArgs {
    /// Connections (both directions) the proxy serves at once; more are reset right after
    /// accept and counted. Default: half of RLIMIT_NOFILE, less 256 descriptors kept back.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Tunnel connections still in their TLS handshake at once; more are reset right after
    /// accept and counted. Default: 1024 (at most --max-connections).
    #[arg(long, value_name = "N")]
    pub max_pending_handshakes: Option<usize>,
    /// Outbound connections open at once to one destination (ip:port); more fail at once
    /// with the outcome `overloaded`. Default: --max-connections (no cap of its own); set it
    /// so that one slow destination cannot take every slot. When set, the kernel holds it
    /// for pass-through connections too (their connect() fails with EPERM past it).
    #[arg(long, value_name = "N")]
    pub max_connections_per_destination: Option<usize>,
    /// Connects to destinations in progress at once (each may wait up to
    /// --connect-timeout-ms); more fail at once with the outcome `overloaded`. Default:
    /// --max-connections (no cap of its own); set it to bound what unanswered connects hold.
    #[arg(long, value_name = "N")]
    pub max_pending_connects: Option<usize>,
}

/// The caps in force (shown in `/config` under their flags' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending_handshakes: usize,
    pub max_connections_per_destination: usize,
    pub max_pending_connects: usize,
    /// The cap on pass-through connections to one destination the kernel holds: only an
    /// explicit `--max-connections-per-destination`, since the default derives from the
    /// proxy's descriptor budget, which pass-through connections (the app's own sockets)
    /// do not use.
    #[serde(rename = "passthrough_max_connections_per_destination")]
    pub passthrough_per_destination: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("--{flag} must be at least 1")]
    Zero { flag: &'static str },
}

impl Limits {
    /// The caps for these flags, defaults derived from this process's `RLIMIT_NOFILE`.
    pub fn resolve(args: LimitArgs) -> Result<Self, LimitError> {
        Self::from_args(args, nofile_soft_limit())
    }

    fn from_args(args: LimitArgs, nofile: Option<u64>) -> Result<Self, LimitError> {
        for (flag, value) in [
            ("max-connections", args.max_connections),
            ("max-pending-handshakes", args.max_pending_handshakes),
            ("max-pending-connects", args.max_pending_connects),
            (
                "max-connections-per-destination",
                args.max_connections_per_destination,
            ),
        ] {
            if value == Some(0) {
                return Err(LimitError::Zero { flag });
            }
        }
        let max_connections = args
            .max_connections
            .unwrap_or_else(|| connections_for(nofile));
        let max_pending_handshakes = args
            .max_pending_handshakes
            .unwrap_or(DEFAULT_PENDING_HANDSHAKES)
            .min(max_connections);
        let max_connections_per_destination = args
            .max_connections_per_destination
            .unwrap_or(max_connections)
            .min(max_connections);
        let max_pending_connects = args
            .max_pending_connects
            .unwrap_or(max_connections)
            .min(max_connections);
        Ok(Self {
            max_connections,
            max_pending_handshakes,
            max_connections_per_destination,
            max_pending_connects,
            passthrough_per_destination: args
                .max_connections_per_destination
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        })
    }
}

/// The connection cap `RLIMIT_NOFILE` allows; unlimited or unknown limits give the cap of a
/// 1M-descriptor process.
fn connections_for(nofile: Option<u64>) -> usize {
    let fds = nofile.unwrap_or(1 << 20).min(1 << 20);
    let n = fds.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION;
    (n as usize).max(MIN_CONNECTIONS)
}

fn nofile_soft_limit() -> Option<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return None;
    }
    (rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur)
}

/// The live caps: one semaphore each, and a rate-limited log per cap.
pub struct Gate {
    limits: Limits,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    connects: Arc<Semaphore>,
    destinations: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    logs: [RateLimitedLog; 4],
}

/// What an admitted connection holds; dropping a permit frees its slot.
pub struct Admitted {
    pub connection: OwnedSemaphorePermit,
    /// Inbound only, until the TLS handshake is done.
    pub handshake: Option<OwnedSemaphorePermit>,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_pending_handshakes)),
            connects: Arc::new(Semaphore::new(limits.max_pending_connects)),
            destinations: Arc::default(),
            logs: Default::default(),
        }
    }

    /// Slots for a new connection (`handshake`: it starts with a TLS handshake), or the cap
    /// that refuses it.
    pub fn admit(&self, handshake: bool) -> Result<Admitted, Cap> {
        let connection = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Cap::Connections)?;
        let handshake = if handshake {
            let slot = self.handshakes.clone().try_acquire_owned();
            Some(slot.map_err(|_| Cap::PendingHandshakes)?)
        } else {
            None
        };
        Ok(Admitted {
            connection,
            handshake,
        })
    }

    /// A slot among the connections open to `dst` (at most `cap`: the policy file may set
    /// one for it), or [`Cap::PerDestination`]. The table holds only destinations with
    /// connections open (the slot's drop removes the last).
    pub fn admit_destination(&self, dst: SocketAddr, cap: usize) -> Result<DestinationSlot, Cap> {
        let mut open = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(dst).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                open.remove(&dst);
            }
            return Err(Cap::PerDestination);
        }
        *n += 1;
        Ok(DestinationSlot {
            table: self.destinations.clone(),
            dst,
        })
    }

    /// A slot among the connects in progress, held until the connect is done.
    pub fn admit_connect(&self) -> Result<OwnedSemaphorePermit, Cap> {
        self.connects
            .clone()
            .try_acquire_owned()
            .map_err(|_| Cap::PendingConnects)
    }

    /// Destinations with connections open now (for leak checks).
    pub fn destinations_open(&self) -> usize {
        self.destinations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Logs a refusal by `cap`, at most once per [`LOG_EVERY`].
    pub fn log_refusal(&self, cap: Cap) {
        let (slot, limit) = match cap {
            Cap::Connections => (&self.logs[0], self.limits.max_connections),
            Cap::PendingHandshakes => (&self.logs[1], self.limits.max_pending_handshakes),
            Cap::PerDestination => (&self.logs[2], self.limits.max_connections_per_destination),
            Cap::PendingConnects => (&self.logs[3], self.limits.max_pending_connects),
        };
        if let Some(refused) = slot.tick(Instant::now()) {
            warn!(
                refused,
                "{limit} connections at --{}: refusing new ones (counted in sidecar_connections_refused_total)",
                cap.as_str().replace('_', "-")
            );
        }
    }
}

/// One connection open to a destination; dropping it frees the slot.
pub struct DestinationSlot {
    table: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    dst: SocketAddr,
}

impl Drop for DestinationSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.dst) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.dst);
            }
        }
    }
}

/// Counts events and says when one may be logged: the first, then the first after each
/// [`LOG_EVERY`], with how many happened since the last line.
#[derive(Default)]
struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    since: AtomicU64,
}

impl RateLimitedLog {
    fn tick(&self, now: Instant) -> Option<u64> {
        let n = self.since.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        *last = Some(now);
        self.since.fetch_sub(n, Ordering::Relaxed);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_descriptor_limit() {
        let l = Limits::from_args(LimitArgs::default(), Some(1024)).unwrap();
        assert_eq!(l.max_connections, (1024 - 256) / 2);
        assert_eq!(l.max_pending_handshakes, 384);
        assert_eq!(l.max_connections_per_destination, 384);
        assert_eq!(l.max_pending_connects, 384);
        let l = Limits::from_args(LimitArgs::default(), Some(1 << 20)).unwrap();
        assert_eq!(l.max_connections, ((1 << 20) - 256) / 2);
        assert_eq!(l.max_pending_handshakes, DEFAULT_PENDING_HANDSHAKES);
        let l = Limits::from_args(LimitArgs::default(), Some(64)).unwrap();
        assert_eq!(l.max_connections, MIN_CONNECTIONS);
        assert_eq!(
            Limits::from_args(LimitArgs::default(), None).unwrap(),
            Limits::from_args(LimitArgs::default(), Some(u64::MAX)).unwrap()
        );
    }

    #[test]
    fn flags_win_and_zero_is_refused() {
        let args = LimitArgs {
            max_connections: Some(10),
            max_pending_handshakes: Some(50),
            max_connections_per_destination: Some(20),
            max_pending_connects: Some(30),
        };
        let l = Limits::from_args(args, Some(1024)).unwrap();
        assert_eq!((l.max_connections, l.max_pending_handshakes), (10, 10));
        assert_eq!(l.max_connections_per_destination, 10);
        assert_eq!(l.max_pending_connects, 10);
        let zero = LimitArgs {
            max_pending_handshakes: Some(0),
            ..LimitArgs::default()
        };
        let e = Limits::from_args(zero, Some(1024)).unwrap_err();
        assert_eq!(e.to_string(), "--max-pending-handshakes must be at least 1");
    }

    #[test]
    fn gate_admits_up_to_each_cap_and_frees_slots_on_drop() {
        let gate = Gate::new(Limits {
            max_connections: 3,
            max_pending_handshakes: 1,
            max_connections_per_destination: 3,
            max_pending_connects: 1,
            passthrough_per_destination: None,
        });
        let connect = gate.admit_connect().unwrap();
        assert_eq!(gate.admit_connect().err(), Some(Cap::PendingConnects));
        drop(connect);
        assert!(gate.admit_connect().is_ok());
        let a = gate.admit(true).unwrap();
        assert_eq!(gate.admit(true).err(), Some(Cap::PendingHandshakes));
        let b = gate.admit(false).unwrap();
        drop(a.handshake);
        let c = gate.admit(true).unwrap();
        assert_eq!(gate.admit(false).err(), Some(Cap::Connections));
        drop((b, c));
        assert!(gate.admit(false).is_ok());
    }

    #[test]
    fn destinations_have_their_own_cap_and_forget_closed_ones() {
        let gate = Gate::new(Limits {
            max_connections: 10,
            max_pending_handshakes: 1,
            max_connections_per_destination: 2,
            max_pending_connects: 1,
            passthrough_per_destination: None,
        });
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.1:81".parse().unwrap(),
        );
        let a1 = gate.admit_destination(a, 2).unwrap();
        let a2 = gate.admit_destination(a, 2).unwrap();
        assert_eq!(
            gate.admit_destination(a, 2).err(),
            Some(Cap::PerDestination)
        );
        let b1 = gate.admit_destination(b, 2).unwrap();
        drop(a1);
        let a3 = gate.admit_destination(a, 2).unwrap();
        assert_eq!(gate.destinations_open(), 2);
        drop((a2, a3, b1));
        assert_eq!(gate.destinations_open(), 0);
    }

    #[test]
    fn refusal_log_is_rate_limited() {
        let log = RateLimitedLog::default();
        let t0 = Instant::now();
        assert_eq!(log.tick(t0), Some(1));
        assert_eq!(log.tick(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.tick(t0 + Duration::from_secs(2)), None);
        assert_eq!(log.tick(t0 + LOG_EVERY + Duration::from_secs(1)), Some(3));
    }
}
