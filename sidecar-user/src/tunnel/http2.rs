//! The HTTP/2 settings of our HBONE connections, both sides, and the keepalive that finds
//! a dead peer between streams.

use std::time::Duration;

/// HTTP/2 settings of our HBONE connections, both sides.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Settings {
    /// Streams one pooled connection carries at once before another is dialled.
    #[serde(rename = "pool_max_streams")]
    pub max_streams_per_connection: u32,
    /// A pooled connection with no stream for this long is closed.
    #[serde(rename = "pool_idle_timeout_secs", serialize_with = "as_secs")]
    pub idle_timeout: Duration,
    /// Flow-control window of one stream, and of a whole connection: how much may be in
    /// flight unacknowledged. Bulk transfers need it larger than HTTP/2's 64 KiB default.
    #[serde(skip)]
    pub stream_window: u32,
    #[serde(skip)]
    pub connection_window: u32,
    /// Server side: streams a peer may have open at once on one connection.
    #[serde(skip)]
    pub max_inbound_streams: u32,
    /// Server side: streams a peer may reset per second on one connection before it is
    /// sent away (GOAWAY) as abusive.
    #[serde(skip)]
    pub max_resets_per_second: u32,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// 1 MiB per stream and 4 MiB per connection. Measured (`cargo xtask bench --windows`,
/// docs/performance.md): one stream moves as much as with ztunnel's 4 MiB / 16 MiB, sixteen
/// streams on one connection move about a fifth more, and the sidecar holds less. The
/// connection's window stays four streams' worth, so a reader that stops (and holds its
/// stream's window) cannot stall the other streams of its connection. A link whose round
/// trip is long enough that 1 MiB per round trip limits one stream (about 8 Gbit/s at 1 ms)
/// wants the flags raised.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Streams one peer connection may hold open on our inbound side (ztunnel's bound).
pub const MAX_INBOUND_STREAMS: u32 = 200;
/// The headers of an HBONE request are a handful of short lines; 16 KiB is generous and
/// bounds what a CONTINUATION flood makes us buffer.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Resets a peer may send per second on one connection (rapid-reset flood bound).
pub const MAX_RESETS_PER_SECOND: u32 = 200;

impl Settings {
    pub fn new(max_streams_per_connection: u32, idle_timeout: Duration) -> Self {
        Self {
            max_streams_per_connection,
            idle_timeout,
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_inbound_streams: MAX_INBOUND_STREAMS,
            max_resets_per_second: MAX_RESETS_PER_SECOND,
        }
    }
}

/// How often an idle connection is pinged, and how long the answer may take before the
/// connection is taken for dead.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Pings the peer every [`PING_INTERVAL`]; resolves when one goes unanswered (or the
/// connection cannot ping). Never resolves without a ping handle.
pub async fn keepalive(ping_pong: Option<h2::PingPong>) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
