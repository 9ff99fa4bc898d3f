//! One HBONE stream as the proxy's copy sees it: a read half and a write half over h2's
//! `RecvStream` and `SendStream`, with TCP's half-close mapped to END_STREAM.
//!
//! A stream costs no copy buffer while idle: [`RecvHalf`] waits for the next DATA frame
//! itself and keeps it (h2 already holds it in memory), so the copy takes a buffer only once
//! bytes are there. Received bytes are released to the peer's flow-control window as they are
//! handed on, so the window bounds what a slow reader makes us hold.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk handed to h2 in one write: h2 splits it into frames, and a bounded chunk
/// keeps one stream's send buffer from growing past the connection's flow-control window.
const MAX_WRITE: usize = 64 * 1024;

/// Held by both halves of a client stream; dropping the last one gives the stream's slot on
/// its pooled connection back.
pub type Slot = Arc<dyn Send + Sync>;

/// An open HBONE stream, split into its two directions.
pub struct HboneStream {
    pub recv: RecvHalf,
    pub send: SendHalf,
}

impl HboneStream {
    pub fn new(recv: RecvStream, send: SendStream<Bytes>, slot: Option<Slot>) -> Self {
        Self {
            recv: RecvHalf {
                stream: recv,
                pending: Bytes::new(),
                eof: false,
                _slot: slot.clone(),
            },
            send: SendHalf {
                stream: send,
                ended: false,
                _slot: slot,
            },
        }
    }
}

/// The bytes the peer sends on the stream.
pub struct RecvHalf {
    stream: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    eof: bool,
    _slot: Option<Slot>,
}

impl RecvHalf {
    /// Fills `pending` with the next DATA frame, or marks the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() && !self.eof {
            match ready!(self.stream.poll_data(cx)) {
                None => self.eof = true,
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                // The peer ended its side without error (RST_STREAM NO_ERROR after
                // END_STREAM): nothing more will come, as after a FIN.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Resolves once a read will not wait (data, the end of the stream, or an error).
    pub async fn ready(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_fill(cx))?;
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// The bytes we send on the stream; shutting it down sends END_STREAM (a half-close).
pub struct SendHalf {
    stream: SendStream<Bytes>,
    ended: bool,
    _slot: Option<Slot>,
}

impl SendHalf {
    /// The error to report once h2 refuses to send: the peer's reset, mapped like a socket's.
    fn poll_reset_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.stream.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason)),
            Err(e) => to_io(e),
        })
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.stream.reserve_capacity(buf.len().min(MAX_WRITE));
        loop {
            match ready!(this.stream.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    return match this
                        .stream
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    {
                        Ok(()) => Poll::Ready(Ok(n)),
                        Err(_) => this.poll_reset_error(cx).map(Err),
                    };
                }
                Some(Err(_)) | None => return this.poll_reset_error(cx).map(Err),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes what was sent as the socket takes it.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        match this.stream.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.ended = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => this.poll_reset_error(cx).map(Err),
        }
    }
}

/// An h2 error as the copy reports it: I/O errors as themselves, a reset as a reset.
pub fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}
