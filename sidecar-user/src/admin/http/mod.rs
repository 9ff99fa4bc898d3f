//! The admin endpoints' HTTP/1.1 server, on hyper, with the limits that keep a slow or
//! hostile client from holding the admin thread; and the CLI's blocking client ([`get`]).
//!
//! hyper parses and writes the messages (the project carries it anyway for its HTTP/2
//! tunnel, so a hand-written parser of network bytes was one more thing to fuzz and keep).
//! This module adds what hyper does not: slots in total and per client address taken at
//! accept, with a `503` written at once beyond them ([`busy`], before any byte is read), and a
//! deadline on each connection as a whole. Each connection carries one request and is closed
//! after its answer (`Connection: close`), so a slot is one request.

mod client;
mod slots;
#[cfg(test)]
mod tests;

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

pub use self::client::get;
use self::slots::PeerSlots;

/// The largest request head served; a longer one is answered 431 and the connection closed
/// (by hyper). hyper's read buffer cannot be set below 8 KiB, which is all six GET endpoints
/// need.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head (the probe listener gives less).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long, past the head timeout, a connection may last while its answer is written: a
/// client that stops reading gives its slot back then.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How much of a server its clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight at once; beyond that a newcomer is answered 503 at once.
    pub total: usize,
    /// Requests in flight at once from one IP address. Without it, silent clients on one
    /// address could hold every slot for a head timeout each, renew them, and every other
    /// client (kubelet's probes, Prometheus) would get 503s for as long as they kept on.
    pub per_peer: usize,
    /// How long a client has to send its request head.
    pub head_timeout: Duration,
    /// How long, on top of `head_timeout`, the answer may take to be written: a client that
    /// asks and then never reads would otherwise hold its slot as long as it likes.
    pub answer_timeout: Duration,
}

/// What a route sees of a request: its path, without the query string (never interpreted).
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub path: String,
}

/// A complete response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        let mut body = serde_json::to_string_pretty(value).unwrap_or_else(|e| e.to_string());
        body.push('\n');
        Self::new(status, "application/json", body)
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }

    /// The message hyper writes: the body's length becomes `Content-Length` (hyper leaves
    /// the body out for a HEAD request; it adds `Connection: close`, keep-alive being off).
    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let mut response = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = hyper::StatusCode::from_u16(self.status)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        response
    }
}

/// Accepts on `listener` until the future is dropped, answering each request with `route` on
/// a task of its own. A newcomer beyond `limits` (in total, or from its address) gets 503 at
/// once ([`busy`]), so slow or silent clients cannot hold the probes and scrapes back. A
/// failed accept (say, out of fds) is retried after 50 ms rather than spinning.
pub async fn serve<R>(listener: TcpListener, limits: Limits, route: R)
where
    R: Fn(&Request) -> Response + Clone + Send + 'static,
{
    let slots = std::sync::Arc::new(Semaphore::new(limits.total));
    let peers = PeerSlots::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!("admin accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let held = peers
            .take(peer.ip().to_canonical(), limits.per_peer)
            .and_then(|p| Some((p, slots.clone().try_acquire_owned().ok()?)));
        match held {
            Some(held) => {
                let route = route.clone();
                tokio::spawn(async move {
                    serve_one(stream, limits, route).await;
                    drop(held);
                });
            }
            None => {
                tokio::spawn(busy(stream));
            }
        }
    }
}

/// Serves the one request of a connection with hyper: its head must arrive within
/// `head_timeout` and fit in [`MAX_HEAD`], only GET and HEAD are routed (405 otherwise), and
/// the connection is gone after `head_timeout + answer_timeout` whatever its state.
async fn serve_one<R>(stream: TcpStream, limits: Limits, route: R)
where
    R: Fn(&Request) -> Response + Send + 'static,
{
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let response = match *req.method() {
            Method::GET | Method::HEAD => route(&Request {
                path: req.uri().path().to_owned(),
            }),
            _ => Response::text(405, "only GET and HEAD are supported\n"),
        };
        std::future::ready(Ok::<_, Infallible>(response.into_hyper()))
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_HEAD)
        // One request per connection (hyper adds `Connection: close`): a slot is one
        // request, and a client may read its answer to EOF, as [`get`] does.
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let deadline = limits.head_timeout + limits.answer_timeout;
    match tokio::time::timeout(deadline, connection).await {
        Ok(Ok(())) => {}
        // A malformed or oversized head (answered by hyper), a timeout, a client gone.
        Ok(Err(e)) => tracing::debug!("admin connection: {e}"),
        Err(_) => tracing::debug!("admin connection: still open after {deadline:?}; closed"),
    }
}

/// Answers 503 without reading the request: the server is at its concurrency limit. Written
/// by hand because hyper answers only once it has read a head, which is what a silent client
/// never sends.
async fn busy(mut stream: TcpStream) {
    let body = "admin server busy; retry\n";
    let out = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
