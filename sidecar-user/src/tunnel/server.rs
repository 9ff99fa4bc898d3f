//! The server side of one HBONE connection: HTTP/2 on a verified mTLS stream from a peer,
//! each CONNECT checked and handed to the proxy as an [`Incoming`] stream.
//!
//! A peer that passed mTLS is still untrusted input, so the connection is bounded: streams
//! open at once ([`Settings::max_inbound_streams`], refused beyond it by HTTP/2 itself), the
//! size of a header list (which also bounds a CONTINUATION flood), malformed streams h2 had
//! to reset, and streams the peer resets before we answer them ("rapid reset"). A peer over
//! a bound is sent GOAWAY and the connection ends with a counted reason; other connections
//! have their own bounds, so one abusive peer cannot use up another's.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::Response;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    Settings,
    request::{Refusal, Target},
    stream::HboneStream,
};

/// One stream a peer opened: its checked target (or why it cannot be honoured), to be
/// answered with [`accept`](Incoming::accept) or [`refuse`](Incoming::refuse).
pub struct Incoming {
    pub target: Result<Target, Refusal>,
    /// Whether an earlier stream rode this connection (no handshake for this one).
    pub reused: bool,
    recv: RecvStream,
    respond: SendResponse<Bytes>,
    resets: Arc<ResetBudget>,
}

impl Incoming {
    /// Answers 200: the stream carries the app's bytes from now on. Fails when the peer has
    /// already given up on the stream (counted against its reset budget).
    pub fn accept(mut self) -> std::io::Result<HboneStream> {
        match self.respond.send_response(Response::new(()), false) {
            Ok(send) => Ok(HboneStream::new(self.recv, send, None)),
            Err(e) => {
                self.resets.reset();
                Err(super::stream::to_io(e))
            }
        }
    }

    /// Answers with the refusal's status and ends the stream.
    pub fn refuse(mut self, refusal: Refusal) {
        let mut response = Response::new(());
        *response.status_mut() = refusal.status();
        if self.respond.send_response(response, true).is_err() {
            self.resets.reset();
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer closed it, or it drained after our GOAWAY.
    Closed,
    /// The peer did not start HTTP/2: `http2_preface` (something else came) or
    /// `http2_timeout` (nothing came in time).
    Refused(&'static str),
    /// The peer broke HTTP/2's rules or one of our bounds: it was sent GOAWAY. The reason
    /// is a label (`protocol_error`, `rapid_reset`, `enhance_your_calm`, …).
    Violation(&'static str),
    /// The connection failed (I/O, a dead peer that stopped answering pings).
    Failed(String),
}

/// Streams the peer reset before we answered, in the current one-second window.
struct ResetBudget {
    limit: u32,
    window: Mutex<(Instant, u32)>,
    exceeded: AtomicBool,
    notify: Notify,
}

impl ResetBudget {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            window: Mutex::new((Instant::now(), 0)),
            exceeded: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    fn reset(&self) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0.elapsed() >= Duration::from_secs(1) {
            *w = (Instant::now(), 0);
        }
        w.1 += 1;
        if w.1 > self.limit && !self.exceeded.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    async fn exceeded(&self) {
        loop {
            let notified = self.notify.notified();
            if self.exceeded.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// Serves HTTP/2 on `io`, a connection the peer made to our address `dialled`, handing each
/// stream to `on_stream` (which must not block: it spawns what the stream needs). On
/// `drain`, sends GOAWAY and keeps serving the streams already open until they end.
/// `handshake_timeout` bounds the HTTP/2 preface and settings exchange. Returns how the
/// connection ended and how many streams it carried.
pub async fn serve<T>(
    io: T,
    dialled: IpAddr,
    settings: &Settings,
    handshake_timeout: Duration,
    drain: CancellationToken,
    mut on_stream: impl FnMut(Incoming),
) -> (End, u64)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_concurrent_streams(settings.max_inbound_streams)
        .max_header_list_size(super::MAX_HEADER_LIST)
        .max_send_buffer_size(SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) if e.is_io() => return (End::Failed(e.to_string()), 0),
        Ok(Err(_)) => return (End::Refused("http2_preface"), 0),
        Err(_) => return (End::Refused("http2_timeout"), 0),
    };
    let keepalive = super::keepalive(conn.ping_pong());
    tokio::pin!(keepalive);
    let resets = Arc::new(ResetBudget::new(settings.max_resets_per_second));
    let mut draining = false;
    let mut streams = 0u64;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                None => return (End::Closed, streams),
                Some(Err(e)) => return (violation_or_failure(e), streams),
                Some(Ok((request, respond))) => {
                    let target = Target::check(&request, dialled);
                    streams += 1;
                    on_stream(Incoming {
                        target,
                        reused: streams > 1,
                        recv: request.into_body(),
                        respond,
                        resets: resets.clone(),
                    });
                }
            },
            () = &mut keepalive => {
                return (End::Failed("the peer stopped answering pings".into()), streams);
            }
            () = resets.exceeded() => {
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                // Flush the GOAWAY; whatever the peer still sends is not read.
                let _ = tokio::time::timeout(Duration::from_millis(100), conn.accept()).await;
                return (End::Violation("rapid_reset"), streams);
            }
            () = drain.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
        }
    }
}

/// HTTP/2's own refusals (GOAWAY that h2 sent) by reason; anything else is a failure.
fn violation_or_failure(e: h2::Error) -> End {
    if e.is_go_away() && e.is_remote() {
        // The peer sent GOAWAY: it closed the connection, we did not refuse it.
        return End::Closed;
    }
    match e.reason() {
        Some(h2::Reason::NO_ERROR) => End::Closed,
        Some(reason) if !e.is_io() => End::Violation(reason_label(reason)),
        _ => End::Failed(e.to_string()),
    }
}

/// Every label of [`End::Violation`] (the metric's label values).
pub const VIOLATIONS: [&str; 9] = [
    "rapid_reset",
    "protocol_error",
    "flow_control_error",
    "frame_size_error",
    "compression_error",
    "enhance_your_calm",
    "refused_stream",
    "stream_closed",
    "other",
];

fn reason_label(reason: h2::Reason) -> &'static str {
    match reason {
        h2::Reason::PROTOCOL_ERROR => "protocol_error",
        h2::Reason::FLOW_CONTROL_ERROR => "flow_control_error",
        h2::Reason::FRAME_SIZE_ERROR => "frame_size_error",
        h2::Reason::COMPRESSION_ERROR => "compression_error",
        h2::Reason::ENHANCE_YOUR_CALM => "enhance_your_calm",
        h2::Reason::REFUSED_STREAM => "refused_stream",
        h2::Reason::STREAM_CLOSED => "stream_closed",
        _ => "other",
    }
}

/// What one stream may have written and not yet sent to the peer (as hyper).
const SEND_BUFFER: usize = 1024 * 1024;
/// Streams h2 itself had to reset for a peer's error (malformed headers, …) before the
/// connection is sent away.
const MAX_LOCAL_ERROR_RESETS: usize = 256;
