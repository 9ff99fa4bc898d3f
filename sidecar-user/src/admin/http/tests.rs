//! The server against real sockets: what each request gets, and each limit shown to hold
//! (silent clients hold their slots, so the next client from the same address, or any
//! client past the total, is answered 503 before it says anything).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

use super::*;

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const THIRD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Generous limits: each test narrows the one it is about.
const ROOMY: Limits = Limits {
    total: 8,
    per_peer: 8,
    head_timeout: Duration::from_secs(5),
    answer_timeout: Duration::from_secs(5),
};

/// `/big` answers 64 MiB (more than loopback's socket buffers take); any other path, its
/// own path.
fn echo(req: &Request) -> Response {
    match req.path.as_str() {
        "/big" => Response::text(200, "x".repeat(64 << 20)),
        path => Response::text(200, format!("{path}\n")),
    }
}

async fn start(limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, limits, echo));
    addr
}

async fn connect(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Everything the server sends until it closes (bounded, so a server that keeps the
/// connection open fails the test instead of hanging it).
async fn read_all(stream: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the server closes after its answer")
        .expect("read");
    String::from_utf8_lossy(&raw).into_owned()
}

/// Sends `request` from `from` and returns the whole answer.
async fn exchange(from: Ipv4Addr, to: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect(from, to).await;
    stream.write_all(request).await.unwrap();
    read_all(&mut stream).await
}

fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Silent clients holding `n` slots from `from`, once the server has taken them.
async fn silent(from: Ipv4Addr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(connect(from, to).await);
    }
    // Accepted and slotted before the test's next client connects.
    tokio::time::sleep(Duration::from_millis(100)).await;
    held
}

#[tokio::test]
async fn a_get_is_answered_with_type_length_and_close() {
    let addr = start(ROOMY).await;
    let answer = exchange(
        LOCAL,
        addr,
        b"GET /metrics?name=x HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(
        body(&answer),
        "/metrics\n",
        "the query string is not the path"
    );
    assert_eq!(
        header(&answer, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(header(&answer, "content-length"), Some("9"));
    assert_eq!(header(&answer, "connection"), Some("close"));
    // HTTP/1.0 clients are served too.
    let answer = exchange(LOCAL, addr, b"GET /a HTTP/1.0\r\n\r\n").await;
    assert_eq!((status(&answer), body(&answer)), (200, "/a\n"), "{answer}");
}

#[tokio::test]
async fn one_request_per_connection() {
    let addr = start(ROOMY).await;
    // Two pipelined requests: the first is answered, then the connection closes.
    let answer = exchange(
        LOCAL,
        addr,
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(body(&answer), "/one\n", "{answer}");
    assert!(!answer.contains("/two"), "{answer}");
}

#[tokio::test]
async fn a_client_may_shut_its_write_side_once_it_has_asked() {
    let addr = start(ROOMY).await;
    let mut stream = connect(LOCAL, addr).await;
    stream.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
    stream.shutdown().await.unwrap();
    let answer = read_all(&mut stream).await;
    assert_eq!((status(&answer), body(&answer)), (200, "/a\n"), "{answer}");
}

#[tokio::test]
async fn head_gets_the_length_without_the_body_and_other_methods_405() {
    let addr = start(ROOMY).await;
    let answer = exchange(LOCAL, addr, b"HEAD /status HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(header(&answer, "content-length"), Some("8"));
    assert_eq!(body(&answer), "");
    let answer = exchange(
        LOCAL,
        addr,
        b"POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(status(&answer), 405, "{answer}");
    assert_eq!(body(&answer), "only GET and HEAD are supported\n");
}

#[tokio::test]
async fn a_malformed_head_gets_400() {
    let addr = start(ROOMY).await;
    for request in [
        &b"GET\r\n\r\n"[..],
        b"GET / HTTP/9\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
    ] {
        let answer = exchange(LOCAL, addr, request).await;
        assert_eq!(status(&answer), 400, "{request:?}: {answer}");
    }
}

#[tokio::test]
async fn a_head_over_max_head_gets_431() {
    let addr = start(ROOMY).await;
    let with_header = |len: usize| {
        format!(
            "GET /x HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(len)
        )
    };
    // Under the bound: served.
    let answer = exchange(LOCAL, addr, with_header(MAX_HEAD - 512).as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}");
    // Over it: refused before the end of the head ever comes.
    let mut stream = connect(LOCAL, addr).await;
    let head = with_header(MAX_HEAD + 1024);
    stream
        .write_all(&head.as_bytes()[..MAX_HEAD + 512])
        .await
        .unwrap();
    let answer = read_all(&mut stream).await;
    assert_eq!(status(&answer), 431, "{answer}");
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_head_timeout_and_frees_its_slot() {
    let limits = Limits {
        total: 1,
        per_peer: 1,
        head_timeout: Duration::from_millis(300),
        ..ROOMY
    };
    let addr = start(limits).await;
    let asked = Instant::now();
    let mut quiet = connect(OTHER, addr).await;
    let answer = read_all(&mut quiet).await;
    let took = asked.elapsed();
    assert!(!answer.contains(" 200 "), "{answer}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    let answer = exchange(LOCAL, addr, b"GET /a HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "the slot came back: {answer}");
}

#[tokio::test]
async fn one_address_holds_at_most_per_peer_slots() {
    let addr = start(Limits {
        total: 8,
        per_peer: 2,
        ..ROOMY
    })
    .await;
    let _held = silent(OTHER, addr, 2).await;
    // The same address again: 503 at once, before it sends anything.
    let mut third = connect(OTHER, addr).await;
    let answer = read_all(&mut third).await;
    assert_eq!(status(&answer), 503, "{answer}");
    assert_eq!(header(&answer, "retry-after"), Some("1"));
    assert_eq!(body(&answer), "admin server busy; retry\n");
    // Another address is served.
    let answer = exchange(LOCAL, addr, b"GET /a HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "{answer}");
}

#[tokio::test]
async fn past_the_total_every_address_gets_503() {
    let addr = start(Limits {
        total: 2,
        per_peer: 2,
        ..ROOMY
    })
    .await;
    let _held = [silent(OTHER, addr, 1).await, silent(THIRD, addr, 1).await];
    let mut late = connect(LOCAL, addr).await;
    let answer = read_all(&mut late).await;
    assert_eq!(status(&answer), 503, "{answer}");
}

#[tokio::test]
async fn a_client_that_does_not_read_its_answer_loses_its_slot() {
    let limits = Limits {
        total: 1,
        per_peer: 1,
        head_timeout: Duration::from_millis(200),
        answer_timeout: Duration::from_millis(300),
    };
    let addr = start(limits).await;
    let mut greedy = connect(OTHER, addr).await;
    greedy
        .write_all(b"GET /big HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    // Never read: the answer fills the socket buffers and the write blocks.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut busy = connect(LOCAL, addr).await;
    assert_eq!(status(&read_all(&mut busy).await), 503, "the slot is held");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let answer = exchange(LOCAL, addr, b"GET /a HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "the slot came back: {answer}");
    drop(greedy);
}
