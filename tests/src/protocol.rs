//! What `sidecar-testclient` prints, one JSON object per line. The client serializes these
//! types and the tests parse them back, so the two sides cannot drift apart.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The line `hold` prints after its `hold` connections are all up: the test waits for it
/// before inspecting kernel maps.
pub const READY: &str = "READY";

/// Size of the ping-pong `hold` does on each connection.
pub const HOLD_PING_SIZE: usize = 64;

/// One connection of `echo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoLine {
    /// The client socket's own address (`None` if the connect failed).
    pub local: Option<SocketAddr>,
    /// What `getpeername` says: the proxy when intercepted, the server when bypassed.
    pub peer: Option<SocketAddr>,
    /// Bytes written before the half-close.
    pub sent: u64,
    /// Bytes read before EOF.
    pub received: u64,
    /// Connected, sent everything, got exactly the same bytes back, then EOF.
    pub ok: bool,
    /// What went wrong, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Reads/writes of this BLOCKING socket that failed with `EAGAIN` long before their
    /// timeout, and were retried. An unmodified application would have seen them as
    /// errors, so anything but 0 is a transparency defect (see `sidecar-testclient`).
    #[serde(default)]
    pub spurious_wouldblock: u64,
}

/// Asserts that `lines` are `streams` connections that each ran to the end byte-exact: every
/// one connected, sent something, and got exactly that back (long streams across a
/// certificate rotation must not break).
pub fn assert_streams_intact(lines: &[EchoLine], streams: usize) {
    assert_eq!(lines.len(), streams, "{lines:#?}");
    for l in lines {
        assert!(
            l.ok && l.received > 0 && l.received == l.sent,
            "stream broke: {l:?}"
        );
    }
}

/// One connection of `hold`, printed once its ping-pong succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldLine {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// As [`EchoLine::spurious_wouldblock`], for the ping-pong.
    #[serde(default)]
    pub spurious_wouldblock: u64,
}

/// The single line of `connect-fail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectFailLine {
    /// Whether `connect()` itself succeeded (it does when the proxy accepts first).
    pub connected: bool,
    /// How the connection failed (`connect: …`, `write: …`, `read: EOF`, `read: …`); `None`
    /// means a byte came back, i.e. the connection did NOT fail.
    pub error: Option<String>,
    /// From the start of the connect to the failure (or to the reply).
    pub elapsed_ms: u64,
    /// As [`EchoLine::spurious_wouldblock`] (retried, so `error` is the real failure).
    #[serde(default)]
    pub spurious_wouldblock: u64,
}

/// The single line of `hbone-reset-flood`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloodLine {
    /// Streams opened and reset at once.
    pub reset: u64,
    /// The reason of the server's GOAWAY (e.g. `ENHANCE_YOUR_CALM`), if it sent one.
    pub goaway: Option<String>,
    /// Why opening another stream failed, if one did.
    pub error: Option<String>,
}

/// What `hbone-raw-flood` prints: what it wrote and how the server answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawFloodLine {
    /// CONTINUATION frames (or, for `streams`, HEADERS frames: streams opened) written.
    pub frames_sent: u64,
    /// Streams the server answered (HEADERS frames it sent).
    pub answered: u64,
    /// Streams the server reset (RST_STREAM frames it sent).
    pub refused: u64,
    /// The reason of the server's GOAWAY (e.g. `ENHANCE_YOUR_CALM`), if it sent one.
    pub goaway: Option<String>,
    /// Why writing stopped early (the server closed the connection), if it did.
    pub write_error: Option<String>,
}

/// What `soak` prints after each phase (cumulative) and at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoakLine {
    /// Phases finished so far.
    pub phase: usize,
    /// Every connection attempted (all go through the proxy).
    pub connections: u64,
    /// Connections meant to work that did, byte for byte.
    pub ok: u64,
    /// Connections meant to work that failed (a soak must have none).
    pub failed: u64,
    /// Connections to a port where nothing listens: failed, as they should.
    pub refused: u64,
    /// Connections to an upstream that resets: failed, as they should.
    pub reset: u64,
    /// Connections meant to fail that did not.
    pub unexpected_success: u64,
    /// Payload bytes written and read back on the `ok` connections.
    pub sent: u64,
    pub received: u64,
    /// `ok` connections per kind (`rr`, `churn`, `bulk`, `half_close`) and target.
    pub by_kind: std::collections::BTreeMap<String, u64>,
    /// The first few failures, for the test's message.
    pub errors: Vec<String>,
    /// As [`EchoLine::spurious_wouldblock`], summed.
    pub spurious_wouldblock: u64,
}

/// A deterministic pseudo-random payload (xorshift64*), different for every `seed`, so an
/// echo that mixes up, drops or reorders bytes — or two connections' bytes — is caught.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Parses every stdout line that is a `T`; other lines (e.g. `READY`) are skipped.
pub fn parse_lines<'a, T: serde::de::DeserializeOwned>(
    lines: impl IntoIterator<Item = &'a String>,
) -> Vec<T> {
    lines
        .into_iter()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}
