//! The client side of one HBONE connection: HTTP/2 over a verified mTLS stream to a peer's
//! tunnel port, carrying one CONNECT stream per application connection.
//!
//! A task drives the connection (h2 does its I/O there), pings the peer so a dead one is found
//! between streams, and closes the connection once it has carried no stream for the idle
//! timeout. Streams are counted here: a connection takes no new stream once it is at its
//! limit, closed, or told to go away, and [`ClientConn::try_reserve`] is the one place that
//! decides it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

use super::{Settings, request::connect_request, stream::HboneStream};

/// The stream count that marks a connection closed: no stream may be reserved on it again.
const CLOSED: u32 = u32::MAX;

/// Why a stream could not be opened on a connection.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The connection failed or went away before the peer answered: nothing reached the
    /// destination, so the stream may be retried on a fresh connection.
    #[error("the HBONE connection to {addr} was lost before the stream opened: {source}")]
    Lost { addr: SocketAddr, source: h2::Error },
    /// The connection ended or went away after the stream's slot was reserved and before
    /// its request was written: the stream was never sent, and goes to a fresh connection.
    #[error("the HBONE connection to {addr} went away before the stream was sent: {source}")]
    NotSent { addr: SocketAddr, source: h2::Error },
    /// The peer answered the CONNECT with something other than 200.
    #[error("the peer at {addr} refused the stream with status {status}")]
    Refused { addr: SocketAddr, status: u16 },
    #[error("the peer at {addr} did not answer the CONNECT within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// One pooled HTTP/2 connection to a peer sidecar (or ztunnel).
pub struct ClientConn {
    /// Taken out when we close the connection: with no sender left, h2 sends GOAWAY once the
    /// open streams have ended, flushes their last frames and closes TLS with close_notify.
    sender: std::sync::Mutex<Option<SendRequest<Bytes>>>,
    addr: SocketAddr,
    /// Streams open now, or [`CLOSED`].
    streams: AtomicU32,
    /// Streams carried since the connection opened (for its histogram).
    carried: AtomicU64,
    max_streams: u32,
    /// Set when the driver saw the connection end or the peer's GOAWAY.
    gone: AtomicBool,
    /// Cancelled to close the connection (idle, or the sidecar shutting down).
    close: CancellationToken,
    /// When the last stream ended (for the idle timeout).
    idle_since: std::sync::Mutex<Instant>,
}

/// A reserved stream slot on a connection: dropped with the stream's last half, it frees the
/// slot.
pub struct Reservation(Arc<ClientConn>);

impl Drop for Reservation {
    fn drop(&mut self) {
        let conn = &self.0;
        if conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *conn.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

impl ClientConn {
    /// Starts HTTP/2 on `io` (a verified TLS stream) and spawns the task that drives it.
    /// `closed` runs once the connection has ended, with the number of streams it carried.
    /// The driving task is spawned on `drivers`, so the pool can wait for its connections to
    /// close.
    pub async fn handshake<T>(
        io: T,
        addr: SocketAddr,
        settings: &Settings,
        drivers: &TaskTracker,
        closed: impl FnOnce(u64) + Send + 'static,
    ) -> Result<Arc<Self>, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_send_buffer_size(settings.stream_window as usize)
            .initial_max_send_streams(settings.max_streams_per_connection as usize)
            .max_header_list_size(super::MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let conn = Arc::new(Self {
            sender: std::sync::Mutex::new(Some(sender)),
            addr,
            streams: AtomicU32::new(0),
            carried: AtomicU64::new(0),
            max_streams: settings.max_streams_per_connection,
            gone: AtomicBool::new(false),
            close: CancellationToken::new(),
            idle_since: std::sync::Mutex::new(Instant::now()),
        });
        let ping_pong = connection.ping_pong();
        let weak = Arc::downgrade(&conn);
        let close = conn.close.clone();
        let idle_timeout = settings.idle_timeout;
        drivers.spawn(async move {
            let keepalive = super::keepalive(ping_pong);
            let idle = async {
                loop {
                    tokio::time::sleep(IDLE_POLL.min(idle_timeout)).await;
                    let Some(conn) = weak.upgrade() else { return };
                    if conn.close_if_idle(idle_timeout) {
                        return;
                    }
                }
            };
            let end = tokio::select! {
                r = &mut connection => r.err().map(|e| e.to_string()),
                () = keepalive => Some("the peer stopped answering pings".into()),
                () = idle => None,
                () = close.cancelled() => None,
            };
            let carried = weak.upgrade().map(|c| {
                c.mark_gone();
                c.release_sender();
                c.carried.load(Ordering::Relaxed)
            });
            match end {
                Some(e) => debug!(%addr, "HBONE connection ended: {e}"),
                // Closed by us: the streams still open finish (for a while), then h2 says
                // GOAWAY and closes the connection cleanly, so the peer sees every stream's
                // end before the connection's.
                None => match tokio::time::timeout(CLOSE_GRACE, &mut connection).await {
                    Ok(Ok(())) => debug!(%addr, "HBONE connection closed"),
                    Ok(Err(e)) => debug!(%addr, "HBONE connection ended while closing: {e}"),
                    Err(_) => debug!(%addr, "HBONE connection cut: streams still open after {CLOSE_GRACE:?}"),
                },
            }
            closed(carried.unwrap_or(0));
        });
        Ok(conn)
    }

    /// Streams open now.
    pub fn open_streams(&self) -> u32 {
        match self.streams.load(Ordering::Acquire) {
            CLOSED => 0,
            n => n,
        }
    }

    /// Whether the connection can still carry new streams.
    pub fn usable(&self) -> bool {
        !self.going_away() && self.streams.load(Ordering::Acquire) != CLOSED
    }

    /// Whether the connection ended, or the peer sent GOAWAY (a draining sidecar, one that
    /// rotated its credentials). h2 takes the GOAWAY in as soon as it arrives, while the
    /// streams already open go on; asking our sender whether it could open a stream finds
    /// it, so no new stream is put on a connection that was sent away.
    fn going_away(&self) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return true;
        }
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let refused = match sender.as_mut() {
            None => true,
            // The pooled sender never has a request pending, so this only checks the
            // connection's state: nothing waits on the no-op waker.
            Some(s) => matches!(
                s.poll_ready(&mut Context::from_waker(Waker::noop())),
                Poll::Ready(Err(_))
            ),
        };
        if refused {
            self.mark_gone();
        }
        refused
    }

    /// Takes a stream slot if the connection is open, not going away and under its limit.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Reservation> {
        if self.going_away() {
            return None;
        }
        let mut n = self.streams.load(Ordering::Acquire);
        loop {
            if n == CLOSED || n >= self.max_streams {
                return None;
            }
            match self
                .streams
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.carried.fetch_add(1, Ordering::Relaxed);
                    return Some(Reservation(self.clone()));
                }
                Err(now) => n = now,
            }
        }
    }

    /// Closes the connection if no stream has been open on it for `timeout`; once closed, it
    /// takes no stream again.
    fn close_if_idle(&self, timeout: Duration) -> bool {
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if since.elapsed() < timeout {
            return false;
        }
        let closed = self
            .streams
            .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if closed {
            self.close.cancel();
        }
        closed
    }

    /// The connection ended or is going away: it takes no new stream.
    pub fn mark_gone(&self) {
        self.gone.store(true, Ordering::Release);
    }

    /// Drops our sender, so the connection closes once its streams end.
    fn release_sender(&self) {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Closes the connection: open streams may finish for a moment, then GOAWAY.
    pub fn shut_down(&self) {
        self.mark_gone();
        self.close.cancel();
    }

    /// Opens a stream for `client`'s connection to `original_dst` on a slot taken with
    /// [`try_reserve`](Self::try_reserve): sends the CONNECT and waits up to `timeout` for
    /// the answer.
    pub async fn open(
        &self,
        slot: Reservation,
        original_dst: SocketAddr,
        client: SocketAddr,
        timeout: Duration,
    ) -> Result<HboneStream, StreamError> {
        let addr = self.addr;
        let gone = |source: &h2::Error| {
            // A connection-level failure (GOAWAY, reset, I/O) means no stream can follow.
            if source.is_go_away()
                || source.is_io()
                || source.reason() == Some(h2::Reason::REFUSED_STREAM)
            {
                self.mark_gone();
            }
        };
        // Before the request is written, h2 refuses it itself (the connection went away
        // between the reservation and now, e.g. a GOAWAY just in): nothing was sent.
        let not_sent = |source: h2::Error| {
            gone(&source);
            StreamError::NotSent { addr, source }
        };
        let lost = |source: h2::Error| {
            gone(&source);
            StreamError::Lost { addr, source }
        };
        let opening = async {
            let sender = self
                .sender
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let sender = sender.ok_or_else(|| h2::Error::from(h2::Reason::REFUSED_STREAM));
            let mut sender = sender.map_err(not_sent)?.ready().await.map_err(not_sent)?;
            let (response, send) = sender
                .send_request(connect_request(original_dst, client), false)
                .map_err(not_sent)?;
            let response = response.await.map_err(lost)?;
            Ok((response, send))
        };
        let (response, send) = match tokio::time::timeout(timeout, opening).await {
            Ok(r) => r?,
            Err(_) => return Err(StreamError::Timeout { addr, timeout }),
        };
        if response.status() != http::StatusCode::OK {
            return Err(StreamError::Refused {
                addr,
                status: response.status().as_u16(),
            });
        }
        let slot: super::stream::Slot = Arc::new(slot);
        Ok(HboneStream::new(response.into_body(), send, Some(slot)))
    }
}

impl StreamError {
    /// Whether the stream may be tried again on a fresh connection: nothing was delivered.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Lost { .. } | Self::NotSent { .. })
    }

    /// What the peer's refusal means, when it answered the CONNECT with a refusal.
    pub fn refusal(&self) -> Option<PeerRefusal> {
        let Self::Refused { status, .. } = self else {
            return None;
        };
        Some(match status {
            400 => PeerRefusal::BadRequest,
            401 | 403 => PeerRefusal::Denied,
            502..=504 => PeerRefusal::Unreachable,
            _ => PeerRefusal::Other,
        })
    }

    /// The `reason` label of `sidecar_tunnel_failures_total`.
    pub fn reason(&self) -> &'static str {
        match (self, self.refusal()) {
            (Self::Lost { .. } | Self::NotSent { .. }, _) => "stream_lost",
            (Self::Timeout { .. }, _) => "stream_timeout",
            (_, Some(PeerRefusal::BadRequest)) => "refused_bad_request",
            (_, Some(PeerRefusal::Denied)) => "refused_denied",
            (_, Some(PeerRefusal::Unreachable)) => "refused_unreachable",
            (_, _) => "refused_other",
        }
    }
}

/// What a peer's non-200 answer to a CONNECT means (HBONE's statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    /// 400: it could not honour the request as asked.
    BadRequest,
    /// 401/403: its policy does not admit us to the destination.
    Denied,
    /// 502–504: it could not reach the destination, as if our own connect had failed.
    Unreachable,
    Other,
}

/// How often an idle connection checks whether its idle timeout has passed.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long streams still open may finish after we close a connection.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
