//! Connections to echo servers: `echo`, `pingpong`, `hold`, and the server side (`serve`).

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use sidecar_tests::protocol::{EchoLine, HOLD_PING_SIZE, HoldLine, READY, pattern};

use crate::{CHUNK, IO_TIMEOUT, connect, emit, print_line, read_exact, read_to_eof, write_all};

pub fn echo(addr: SocketAddr, size: usize, count: usize, concurrency: usize) -> ExitCode {
    if count == 0 {
        return ExitCode::SUCCESS;
    }
    let workers = concurrency.clamp(1, count);
    // Every worker's FIRST connection waits here after connecting, so `concurrency`
    // connections really are open at the same time (not just started close together).
    let first_round = Arc::new(Barrier::new(workers));
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (first_round, next, tx) = (first_round.clone(), next.clone(), tx.clone());
        let spawned = thread::Builder::new().name("echo".into()).spawn(move || {
            let mut barrier = Some(first_round);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let line = echo_one(addr, size, i as u64, barrier.take());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("error: cannot start worker thread: {e}");
                // The barrier counts on every worker: without this one nobody would pass it.
                std::process::exit(1);
            }
        }
    }
    drop(tx);
    let (mut failed, mut seen) = (0usize, 0usize);
    for line in rx {
        seen += 1;
        failed += usize::from(!line.ok);
        emit(&line);
    }
    for h in handles {
        failed += usize::from(h.join().is_err());
    }
    if failed > 0 || seen != count {
        eprintln!("error: {failed} of {count} echo connections failed ({seen} reported)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Load the test paces with files: start once `--after` exists, stop once `--until` does,
/// and rest `--pause-ms` between connections (`echo`) or exchanges (`pingpong`). The counts
/// still bound everything.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Pace {
    /// Wait for this file to exist before the first connection.
    #[arg(long)]
    after: Option<PathBuf>,
    /// Stop (between connections or exchanges) once this file exists.
    #[arg(long)]
    until: Option<PathBuf>,
    /// Pause between connections (`echo`) or exchanges (`pingpong`), in milliseconds.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

impl Pace {
    pub fn is_set(&self) -> bool {
        self.after.is_some() || self.until.is_some() || self.pause_ms > 0
    }

    fn wait_to_start(&self) {
        while self.after.as_ref().is_some_and(|p| !p.exists()) {
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn stopped(&self) -> bool {
        self.until.as_ref().is_some_and(|p| p.exists())
    }

    fn pause(&self) {
        thread::sleep(Duration::from_millis(self.pause_ms));
    }
}

/// Up to `count` echo connections one after the other, paced by `pace`; each line is printed
/// as soon as its connection ends, so the test can follow the progress.
pub fn echo_paced(addr: SocketAddr, size: usize, count: usize, pace: &Pace) -> ExitCode {
    pace.wait_to_start();
    let (mut failed, mut done) = (0usize, 0usize);
    for i in 0..count {
        if pace.stopped() {
            break;
        }
        let line = echo_one(addr, size, i as u64, None);
        failed += usize::from(!line.ok);
        done += 1;
        emit(&line);
        pace.pause();
    }
    if failed > 0 {
        eprintln!("error: {failed} of {done} echo connections failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

pub fn pingpong(addr: SocketAddr, size: usize, rounds: usize, count: usize) -> ExitCode {
    let mut failed = 0;
    for i in 0..count {
        let line = pingpong_one(addr, size, rounds, i as u64);
        failed += usize::from(!line.ok);
        emit(&line);
    }
    if failed > 0 {
        eprintln!("error: {failed} of {count} ping-pong connections failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `count` parallel connections, each exchanging `rounds` times or until `deadline`.
pub fn pingpong_parallel(
    addr: SocketAddr,
    size: usize,
    rounds: usize,
    count: usize,
    deadline: Option<Instant>,
    pace: &Pace,
) -> ExitCode {
    pace.wait_to_start();
    let handles: Vec<_> = (0..count)
        .map(|i| {
            let pace = pace.clone();
            thread::spawn(move || pingpong_one_with(addr, size, rounds, i as u64, deadline, &pace))
        })
        .collect();
    let mut failed = 0;
    for h in handles {
        match h.join() {
            Ok(line) => {
                failed += usize::from(!line.ok);
                emit(&line);
            }
            Err(_) => failed += 1,
        }
    }
    if failed > 0 {
        eprintln!("error: {failed} of {count} streaming connections failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Echo server for the far side of a tunnel (runs inside that side's sidecar). With
/// `close_after`, each connection is closed once that many bytes were echoed on it.
pub fn serve(addr: SocketAddr, close_after: Option<u64>) -> ExitCode {
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_line(READY);
    // Stdin EOF (the test releasing us) ends the process.
    thread::spawn(|| {
        let _ = io::copy(&mut io::stdin(), &mut io::sink());
        std::process::exit(0);
    });
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let peer = stream.peer_addr().ok();
        print_line(&serde_json::json!({ "peer": peer }).to_string());
        thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = close_after.unwrap_or(u64::MAX);
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                match (&stream).read(&mut buf[..want]) {
                    Ok(0) => break,
                    Ok(n) => {
                        if (&stream).write_all(&buf[..n]).is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
            if left == 0 {
                // Closed with the answer: the client's EOF is not waited for.
                return;
            }
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
    ExitCode::SUCCESS
}

pub fn pingpong_one(addr: SocketAddr, size: usize, rounds: usize, seed: u64) -> EchoLine {
    pingpong_one_with(addr, size, rounds, seed, None, &Pace::default())
}

fn pingpong_one_with(
    addr: SocketAddr,
    size: usize,
    rounds: usize,
    seed: u64,
    deadline: Option<Instant>,
    pace: &Pace,
) -> EchoLine {
    let spurious = AtomicU64::new(0);
    let mut line = EchoLine {
        local: None,
        peer: None,
        sent: 0,
        received: 0,
        ok: false,
        error: None,
        spurious_wouldblock: 0,
    };
    let result = (|| -> io::Result<()> {
        let stream = connect(addr)?;
        line.local = stream.local_addr().ok();
        line.peer = stream.peer_addr().ok();
        let request = pattern(seed, size);
        let mut reply = vec![0u8; size];
        for round in 0..rounds {
            if deadline.is_some_and(|d| Instant::now() >= d) || pace.stopped() {
                break;
            }
            if round > 0 {
                pace.pause();
            }
            write_all(&stream, &request, &spurious)?;
            line.sent += size as u64;
            read_exact(&stream, &mut reply, &spurious)?;
            line.received += size as u64;
            if reply != request {
                return Err(io::Error::other("reply differs from request"));
            }
        }
        Ok(())
    })();
    line.spurious_wouldblock = spurious.load(Ordering::Relaxed);
    match result {
        Ok(()) => line.ok = true,
        Err(e) => line.error = Some(e.to_string()),
    }
    line
}

/// One echo connection. Writing happens on a second thread while this one reads: with a
/// large payload, writing everything before reading would deadlock once the server's send
/// buffer is full and it stops reading.
pub fn echo_one(
    addr: SocketAddr,
    size: usize,
    seed: u64,
    barrier: Option<Arc<Barrier>>,
) -> EchoLine {
    let payload = Arc::new(pattern(seed, size));
    let connected = connect(addr);
    if let Some(b) = barrier {
        b.wait();
    }
    let mut line = EchoLine {
        local: None,
        peer: None,
        sent: 0,
        received: 0,
        ok: false,
        error: None,
        spurious_wouldblock: 0,
    };
    let stream = match connected {
        Ok(s) => Arc::new(s),
        Err(e) => {
            line.error = Some(format!("connect {addr}: {e}"));
            return line;
        }
    };
    (line.local, line.peer) = (stream.local_addr().ok(), stream.peer_addr().ok());
    let spurious = Arc::new(AtomicU64::new(0));

    let write_side = {
        let (stream, payload, spurious) = (stream.clone(), payload.clone(), spurious.clone());
        thread::spawn(move || {
            let mut sent = 0u64;
            for chunk in payload.chunks(CHUNK) {
                if let Err(e) = write_all(&stream, chunk, &spurious) {
                    return (sent, Err(format!("write after {sent} bytes: {e}")));
                }
                sent += chunk.len() as u64;
            }
            let shut = stream.shutdown(Shutdown::Write);
            (sent, shut.map_err(|e| format!("shutdown(Write): {e}")))
        })
    };
    let (received, read) = read_to_eof(&stream, size + 1, &spurious);
    let (sent, wrote) = write_side
        .join()
        .unwrap_or((0, Err("writer thread panicked".to_string())));

    line.sent = sent;
    line.received = received.len() as u64;
    line.spurious_wouldblock = spurious.load(Ordering::Relaxed);
    line.error = match (wrote, read) {
        (Err(e), _) => Some(e),
        (_, Err(e)) => Some(format!("read after {} bytes: {e}", received.len())),
        _ if received.len() != size => {
            Some(format!("echo has {} bytes, sent {size}", received.len()))
        }
        _ => received
            .iter()
            .zip(payload.iter())
            .position(|(a, b)| a != b)
            .map(|at| format!("echo differs from what was sent at byte {at}")),
    };
    line.ok = line.error.is_none();
    line
}

pub fn hold(addr: SocketAddr, count: usize) -> ExitCode {
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        match ping_pong(addr, i as u64) {
            Ok((stream, line)) => {
                emit(&line);
                streams.push(stream);
            }
            Err(e) => {
                eprintln!("error: hold connection {i} to {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    print_line(READY);
    // Keep the sockets open until the test closes our stdin (or the sidecar kills us).
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
    drop(streams);
    ExitCode::SUCCESS
}

fn ping_pong(addr: SocketAddr, seed: u64) -> io::Result<(TcpStream, HoldLine)> {
    let stream = connect(addr)?;
    let spurious = AtomicU64::new(0);
    let ping = pattern(seed, HOLD_PING_SIZE);
    write_all(&stream, &ping, &spurious)?;
    let mut pong = vec![0u8; HOLD_PING_SIZE];
    read_exact(&stream, &mut pong, &spurious)?;
    if pong != ping {
        return Err(io::Error::other("the echo differs from the ping"));
    }
    let line = HoldLine {
        local: stream.local_addr()?,
        peer: stream.peer_addr()?,
        spurious_wouldblock: spurious.load(Ordering::Relaxed),
    };
    Ok((stream, line))
}
