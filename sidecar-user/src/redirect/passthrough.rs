//! Kernel pass-through records. A connection the proxy adds nothing to goes straight to its
//! destination (the connect hook lets it through); sockops reports it when it closes, with
//! the socket's own counters, in the `DIRECT_EVENTS` ring. Here each report becomes the same
//! [`ConnRecord`] a proxied connection gets, with [`Path::Passthrough`]: metrics, access log,
//! journal (exit report), in that order.

use std::{
    path::{Path as FsPath, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap, MapData, RingBuf};
use sidecar_common::{DirectConn, DirectEvent, maps};
use tokio::{io::unix::AsyncFd, runtime::Runtime, task::JoinHandle};
use tracing::warn;

use super::{
    circuits::ConnectOutcomes,
    ebpf::{EbpfError, open_pinned},
};
use crate::{
    host::sock_diag,
    registration::PassedThrough,
    telemetry::{
        LiveRow, OpenConnections, Telemetry,
        access_log::rfc3339,
        labels::{Direction, Outcome, Path, Transport},
        record::{ConnRecord, Journal},
        tcp_info::TcpStats,
    },
};

/// TCP states (`include/net/tcp_states.h`) a socket can leave for `TCP_CLOSE`.
mod state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const FIN_WAIT2: u32 = 5;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

/// How often the ring of close reports is read. Sockops writes reports without waking the
/// reader until `limits::DIRECT_EVENTS_WAKE_BYTES` are waiting (a wakeup per connection was
/// most of what pass-through added to a new connection), so this bounds how late a record is.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// The ring of close reports, readable from the async runtime.
pub struct DirectEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl DirectEvents {
    /// Opens the pinned ring; needs a running tokio runtime (the caller has entered it).
    pub fn open(pin_dir: &FsPath) -> Result<Self, EbpfError> {
        let name = maps::DIRECT_EVENTS;
        let ring: RingBuf<MapData> = open_pinned(pin_dir, name)?;
        // SAFETY: the ring owns its map fd for as long as the AsyncFd owns the ring, and
        // `as_raw_fd` always returns that fd.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| EbpfError::Watch {
            name,
            source: e.into_parts().1,
        })?;
        Ok(Self { ring })
    }

    /// Every report waiting in the ring (never blocks).
    pub fn drain(&mut self) -> Vec<DirectEvent> {
        read_all(self.ring.get_mut())
    }

    /// Waits until reports are waiting, then returns all of them: at the next timer read, or
    /// sooner if the kernel wakes us because a backlog built up.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<DirectEvent>> {
        loop {
            let out = match tokio::time::timeout(POLL_EVERY, self.ring.readable_mut()).await {
                Ok(guard) => {
                    let mut guard = guard?;
                    let out = read_all(guard.get_inner_mut());
                    // Reports written after the read but before this, without a wakeup, are
                    // left for the next timer read.
                    guard.clear_ready();
                    out
                }
                Err(_elapsed) => self.drain(),
            };
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// Consumes every report in the ring, in one pass.
fn read_all(ring: &mut RingBuf<MapData>) -> Vec<DirectEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.extend(decode(&item));
    }
    out
}

/// Turns the reports of one workload (`scope`) into records.
#[derive(Clone)]
pub struct Recorder {
    pub scope: u32,
    pub telemetry: Arc<Telemetry>,
    pub journal: Arc<Journal>,
    /// Where failed and successful connects count for their destination's circuit.
    pub circuits: Option<Arc<dyn ConnectOutcomes>>,
}

impl Recorder {
    /// Records the closes of this recorder's workload among the kernel's `events`.
    pub fn record_events(&self, events: &[DirectEvent]) {
        let clock = Clock::now();
        for e in events.iter().filter(|e| e.conn.scope == self.scope) {
            self.record(&passed_through(e, &clock));
        }
    }

    /// One closed pass-through connection: metrics, access log, journal.
    pub fn record(&self, closed: &PassedThrough) {
        if let Some(circuits) = &self.circuits {
            let connected = closed.connect_us.is_some();
            // A connect that never got an answer is a failure; one the app gave up on
            // before sending anything (closed in SYN_SENT too) cannot be told apart.
            circuits.connect_outcome(closed.remote, connected);
        }
        let (rec, started, duration) = to_record(self.telemetry.connection_id(), closed);
        self.telemetry.passed_through(&rec, started, duration);
        self.journal.push(rec);
    }

    /// Records reports as they arrive, until the ring fails (it does not while pinned).
    pub async fn run(self, mut events: DirectEvents) {
        loop {
            match events.next_batch().await {
                Ok(batch) => self.record_events(&batch),
                Err(e) => {
                    warn!("pass-through records stopped: {e}");
                    return;
                }
            }
        }
    }
}

/// A [`Recorder`] following the ring on the runtime, for as long as the run lasts.
pub struct Following {
    task: JoinHandle<()>,
    recorder: Recorder,
    pin_dir: PathBuf,
}

impl Following {
    /// Starts recording the reports of the ring pinned in `pin_dir`.
    pub fn start(rt: &Runtime, recorder: Recorder, pin_dir: &FsPath) -> Result<Self, EbpfError> {
        let events = {
            let _entered = rt.enter();
            DirectEvents::open(pin_dir)?
        };
        Ok(Self {
            task: rt.spawn(recorder.clone().run(events)),
            recorder,
            pin_dir: pin_dir.into(),
        })
    }

    /// The command has exited: gives its connections up to `settle` to finish closing (on
    /// loopback and in a LAN that is a round trip or two), records everything reported, and
    /// returns how many of them were still open then (they have no record).
    pub fn finish(self, rt: &Runtime, settle: Duration) -> Result<usize, EbpfError> {
        let deadline = Instant::now() + settle;
        let live = open_live(&self.pin_dir)?;
        let mut open = self.still_open(&live);
        while open > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            open = self.still_open(&live);
        }
        rt.block_on(async {
            self.task.abort();
            let _ = self.task.await;
        });
        // Reports that arrived after the task's last read.
        let mut events = {
            let _entered = rt.enter();
            DirectEvents::open(&self.pin_dir)?
        };
        self.recorder.record_events(&events.drain());
        Ok(open)
    }

    /// Open pass-through connections of this workload the kernel still tracks.
    fn still_open(&self, live: &HashMap<MapData, u64, DirectConn>) -> usize {
        live.iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.scope == self.recorder.scope)
            .count()
    }
}

/// The open pass-through connections of one workload, for `/connections`: which ones from
/// the kernel's live table, their addresses and bytes so far from the socket table
/// (`sock_diag`; the sidecar shares the workload's network namespace).
pub struct OpenDirect {
    live: std::sync::Mutex<HashMap<MapData, u64, DirectConn>>,
    scope: u32,
}

impl OpenDirect {
    pub fn open(pin_dir: &FsPath, scope: u32) -> Result<Self, EbpfError> {
        Ok(Self {
            live: std::sync::Mutex::new(open_live(pin_dir)?),
            scope,
        })
    }
}

impl OpenConnections for OpenDirect {
    fn open(&self) -> Vec<LiveRow> {
        let tracked: std::collections::HashMap<u64, DirectConn> = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.iter()
                .filter_map(Result::ok)
                .filter(|(_, c)| c.scope == self.scope)
                .collect()
        };
        if tracked.is_empty() {
            return Vec::new();
        }
        let sockets = match sock_diag::tcp_sockets() {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot list pass-through connections (sock_diag): {e}");
                return Vec::new();
            }
        };
        let clock = Clock::now();
        let mut rows: Vec<(u64, LiveRow)> = sockets
            .iter()
            .filter_map(|s| Some((s, tracked.get(&s.cookie)?)))
            .map(|(s, c)| {
                let established = c.established_ns != 0;
                let row = LiveRow {
                    id: 0,
                    path: Path::Passthrough,
                    age_ms: clock.mono_ns.saturating_sub(c.connect_ns) / 1_000_000,
                    started: rfc3339(clock.wall_of(c.connect_ns)),
                    direction: Direction::Outbound,
                    transport: Transport::Plain,
                    state: if established { "open" } else { "connecting" },
                    src: s.local,
                    original_dst: Some(s.remote),
                    // The app's own connect: the kernel's SYN retransmits, not ours.
                    connect_retries: 0,
                    // The SYN is in bytes_acked once the handshake is done.
                    bytes_sent: s
                        .bytes_acked
                        .unwrap_or(0)
                        .saturating_sub(u64::from(established)),
                    bytes_received: s.bytes_received.unwrap_or(0),
                    src_identity: None,
                    dst_identity: None,
                };
                (c.connect_ns, row)
            })
            .collect();
        rows.sort_by_key(|(at, _)| *at);
        rows.into_iter().map(|(_, r)| r).collect()
    }
}

fn open_live(pin_dir: &FsPath) -> Result<HashMap<MapData, u64, DirectConn>, EbpfError> {
    open_pinned(pin_dir, maps::DIRECT_LIVE)
}

/// `CLOCK_MONOTONIC` (what `bpf_ktime_get_ns` reads) and the wall clock, read together, to
/// turn kernel timestamps into wall time.
pub struct Clock {
    mono_ns: u64,
    wall: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Self {
            mono_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            wall: SystemTime::now(),
        }
    }

    fn wall_of(&self, mono_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.mono_ns.saturating_sub(mono_ns))
    }
}

/// A kernel report in the form records (and the agent's stream to a pod) use: wall-clock
/// start, durations.
pub fn passed_through(e: &DirectEvent, clock: &Clock) -> PassedThrough {
    let established = e.conn.established_ns != 0;
    PassedThrough {
        local: e.key.local(),
        remote: e.key.remote(),
        started_unix_us: clock
            .wall_of(e.conn.connect_ns)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64),
        duration_us: e.closed_ns.saturating_sub(e.conn.connect_ns) / 1000,
        connect_us: established
            .then(|| e.conn.established_ns.saturating_sub(e.conn.connect_ns) / 1000),
        bytes_acked: e.bytes_acked,
        bytes_received: e.bytes_received,
        srtt_us: e.srtt_us,
        rtt_min_us: e.rtt_min_us,
        retransmits: e.total_retrans,
        last_state: e.last_state,
    }
}

/// One closed connection as a record. The socket's sequence-space counters include the SYN
/// (in `bytes_acked`) and each side's FIN once it was acknowledged / received; a close from
/// `FIN_WAIT2`, `CLOSING` or `LAST_ACK` is an orderly one in which both FINs were exchanged,
/// so those are taken off to leave the application's bytes.
fn to_record(id: u64, p: &PassedThrough) -> (ConnRecord, SystemTime, Duration) {
    let established = p.connect_us.is_some();
    let orderly = matches!(
        p.last_state,
        state::FIN_WAIT2 | state::CLOSING | state::LAST_ACK
    );
    let mut rec = ConnRecord::new(id, Direction::Outbound, p.local);
    rec.path = Path::Passthrough;
    rec.original_dst = Some(p.remote);
    rec.bytes_from_client = p
        .bytes_acked
        .saturating_sub(u64::from(established) + u64::from(orderly));
    rec.bytes_from_upstream = p.bytes_received.saturating_sub(u64::from(orderly));
    let duration = Duration::from_micros(p.duration_us);
    rec.duration_ms = duration.as_millis() as u64;
    rec.upstream_connect_us = p.connect_us;
    if established {
        rec.tcp_app = Some(TcpStats {
            srtt_us: p.srtt_us,
            min_rtt_us: p.rtt_min_us,
            retransmits: p.retransmits,
            delivery_rate_bytes_per_sec: None,
        });
    }
    (rec.outcome, rec.error) = match p.last_state {
        _ if orderly => (Outcome::Ok, None),
        state::SYN_SENT => (
            Outcome::UpstreamConnectFailed,
            Some("the destination refused or never answered the connect".into()),
        ),
        state::ESTABLISHED => (Outcome::IoError, Some("connection reset".into())),
        other => (
            Outcome::IoError,
            Some(format!("closed abnormally from TCP state {other}")),
        ),
    };
    let started = SystemTime::UNIX_EPOCH + Duration::from_micros(p.started_unix_us);
    (rec, started, duration)
}

/// One ring item as the kernel wrote it (a `DirectEvent`, at any alignment); `None` if it is
/// too short. Checked by Miri like the policy events' decoder.
fn decode(item: &[u8]) -> Option<DirectEvent> {
    if item.len() < std::mem::size_of::<DirectEvent>() {
        return None;
    }
    // SAFETY: `item` holds at least size_of::<DirectEvent>() initialized bytes (checked
    // above); the type is plain integers, valid for any bits; the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DirectEvent>()) })
}

#[cfg(test)]
mod tests {
    use sidecar_common::{DirectConn, SockKey};

    use super::*;

    fn event(last_state: u32, established: bool) -> DirectEvent {
        DirectEvent {
            key: SockKey::from_addrs(
                7,
                "10.0.0.1:40000".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
            ),
            cookie: 99,
            conn: DirectConn {
                connect_ns: 1_000_000,
                established_ns: if established { 1_250_000 } else { 0 },
                scope: 1,
                pid: 42,
            },
            closed_ns: 6_000_000,
            bytes_acked: 1 + 300 + 1,
            bytes_received: 4000 + 1,
            segs_in: 5,
            segs_out: 6,
            total_retrans: 0,
            srtt_us: 50,
            rtt_min_us: 20,
            last_state,
        }
    }

    #[test]
    fn an_orderly_close_counts_only_application_bytes() {
        let clock = Clock::now();
        let (rec, _, duration) =
            to_record(3, &passed_through(&event(state::FIN_WAIT2, true), &clock));
        assert_eq!(rec.path, Path::Passthrough);
        assert_eq!(rec.outcome, Outcome::Ok);
        assert_eq!(
            (rec.bytes_from_client, rec.bytes_from_upstream),
            (300, 4000)
        );
        assert_eq!(rec.client.to_string(), "10.0.0.1:40000");
        assert_eq!(rec.original_dst.unwrap().to_string(), "10.0.0.2:80");
        assert_eq!(rec.upstream_connect_us, Some(250));
        assert_eq!(duration, Duration::from_millis(5));
    }

    #[test]
    fn a_refused_connect_is_a_setup_failure() {
        let mut e = event(state::SYN_SENT, false);
        (e.bytes_acked, e.bytes_received) = (0, 0);
        let (rec, _, _) = to_record(4, &passed_through(&e, &Clock::now()));
        assert_eq!(rec.outcome, Outcome::UpstreamConnectFailed);
        assert_eq!((rec.bytes_from_client, rec.bytes_from_upstream), (0, 0));
        assert!(rec.tcp_app.is_none());
    }

    #[test]
    fn events_decode_at_any_alignment() {
        let e = event(state::LAST_ACK, true);
        // SAFETY: a plain-integer struct viewed as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const DirectEvent).cast::<u8>(),
                std::mem::size_of::<DirectEvent>(),
            )
        };
        let mut buf = vec![0u8; bytes.len() + 1];
        buf[1..].copy_from_slice(bytes);
        assert_eq!(decode(&buf[1..]), Some(e));
        assert_eq!(decode(&buf[1..10]), None);
    }
}
