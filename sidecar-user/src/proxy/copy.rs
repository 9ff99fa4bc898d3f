//! Bidirectional copy with correct half-close and an idle timeout.
//!
//! Each direction copies until EOF, then shuts down the write side of the other socket, so a
//! client that half-closes still receives the rest of the response. The connection ends when
//! both directions are done, when either fails, or when no byte moved for `idle`.
//!
//! Copy buffers are taken from a shared pool only while bytes are moving: a plain socket is
//! waited on for readability with no buffer, so an idle connection holds none (it used to
//! hold 2 × 16 KiB for its whole life: ~320 MiB for 10,000 idle connections).

use std::{
    future::Future,
    io,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Meter;

const BUF_SIZE: usize = 16 * 1024;

/// Free buffers kept for reuse; more than this go back to the allocator. Enough for the
/// connections that move bytes at the same instant on a small node, 1 MiB at most.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// A copy buffer on loan from [`POOL`]; returned when dropped.
struct Buffer(Option<Box<[u8]>>);

impl Buffer {
    fn take() -> Self {
        let reused = POOL.lock().ok().and_then(|mut free| free.pop());
        Self(Some(
            reused.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice()),
        ))
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let (Some(buf), Ok(mut free)) = (self.0.take(), POOL.lock())
            && free.len() < POOL_MAX
        {
            free.push(buf);
        }
    }
}

/// A read half the copy can wait on before it takes a buffer.
pub trait Source: AsyncRead + Unpin {
    /// Resolves once a read can make progress: a plain socket knows from epoll readiness, an
    /// HBONE stream once its next DATA frame (or its end) is in.
    fn ready(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

impl Source for tokio::net::tcp::ReadHalf<'_> {
    async fn ready(&mut self) -> io::Result<()> {
        self.readable().await
    }
}

/// An HBONE stream knows when its next DATA frame is in, and keeps it until read.
impl Source for crate::tunnel::stream::RecvHalf {
    fn ready(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        crate::tunnel::stream::RecvHalf::ready(self)
    }
}

/// No metering (for callers that only want the totals in [`Copied`]).
impl Meter for () {
    fn client_to_upstream(&self, _: u64) {}
    fn upstream_to_client(&self, _: u64) {}
}

/// Bytes moved in each direction, and why the copy stopped.
#[derive(Debug)]
pub struct Copied {
    pub from_client: u64,
    pub from_upstream: u64,
    pub end: CopyEnd,
}

#[derive(Debug)]
pub enum CopyEnd {
    Done,
    Idle,
    Aborted,
    Error(io::Error),
}

impl CopyEnd {
    /// A read or write failed (e.g. a peer reset): the stream was cut short. The caller
    /// resets the other end too, so the failure reaches it as a failure, not as EOF.
    pub fn is_error(&self) -> bool {
        matches!(self, Self::Error(_))
    }
}

/// Copies between the two halves of each side. Plain sockets pass `TcpStream::split` halves
/// (no locking); HBONE streams pass their own recv and send halves.
pub async fn bidirectional<CR, CW, UR, UW>(
    client: (CR, CW),
    upstream: (UR, UW),
    idle: Duration,
    abort: &CancellationToken,
    meter: &impl Meter,
) -> Copied
where
    CR: Source,
    CW: AsyncWrite + Unpin,
    UR: Source,
    UW: AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, in either direction.
    let last = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let (mut cr, mut cw) = client;
    let (mut ur, mut uw) = upstream;

    let both = async {
        tokio::try_join!(
            one_way(&mut cr, &mut uw, &up, &last, start, |n| meter
                .client_to_upstream(n)),
            one_way(&mut ur, &mut cw, &down, &last, start, |n| meter
                .upstream_to_client(n)),
        )
    };
    let watchdog = async {
        loop {
            let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            sleep_until(deadline).await;
        }
    };
    let end = tokio::select! {
        r = both => match r {
            Ok(_) => CopyEnd::Done,
            Err(e) => CopyEnd::Error(e),
        },
        () = watchdog => CopyEnd::Idle,
        () = abort.cancelled() => CopyEnd::Aborted,
    };
    Copied {
        from_client: up.load(Ordering::Relaxed),
        from_upstream: down.load(Ordering::Relaxed),
        end,
    }
}

async fn one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    total: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
    meter: impl Fn(u64),
) -> io::Result<()>
where
    R: Source,
    W: AsyncWrite + Unpin,
{
    loop {
        // No buffer is held while waiting; one is on loan for this chunk only.
        reader.ready().await?;
        let mut buffer = Buffer::take();
        let buf = buffer.bytes();
        let n = reader.read(buf).await?;
        if n == 0 {
            // Propagate the half-close; the other direction keeps going. A peer that has
            // already gone away needs no FIN.
            return match writer.shutdown().await {
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                other => other,
            };
        }
        write_all_retrying(writer, &buf[..n]).await?;
        // A writer that buffers would hold the bytes back until its next write, and a peer
        // waiting for them would stall. (A no-op on plain TCP halves and HBONE streams.)
        writer.flush().await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        meter(n as u64);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Longest pause between two tries of a write the kernel refused with `ENOMEM`.
const ENOMEM_BACKOFF_MAX: Duration = Duration::from_millis(5);

/// `write_all`, except that `ENOMEM` is waited out. A write the sockmap fast path redirects
/// into the peer's receive queue fails with `ENOMEM` while that queue is full (the redirect has
/// no TCP flow control); it succeeds once the peer has read. The idle timeout still bounds a
/// peer that never reads.
async fn write_all_retrying<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut buf: &[u8],
) -> io::Result<()> {
    let mut backoff = Duration::from_micros(50);
    while !buf.is_empty() {
        match writer.write(buf).await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                backoff = Duration::from_micros(50);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ENOMEM_BACKOFF_MAX);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
