//! `sidecar-testclient`: the workload the integration tests run INSIDE the sidecar
//! (`sidecar run -- sidecar-testclient …`). It only ever talks plain TCP with std blocking
//! sockets, so everything it observes is what an unmodified application would observe.
//!
//! Output is one JSON line per connection on stdout (types in `sidecar_tests::protocol`);
//! diagnostics go to stderr. Every socket operation has a timeout, so a broken proxy makes
//! the client fail with a message instead of hanging the test.
//!
//! Spurious `EAGAIN`: a blocking socket should never return `EAGAIN` except when its
//! timeout expires. Sockets in a sockhash with an sk_msg program use the kernel's `tcp_bpf`
//! receive path, which can return `EAGAIN` early when woken without data (e.g. by a
//! write-space wake-up from a concurrent writer). The client retries such early `EAGAIN`s
//! and COUNTS them (`spurious_wouldblock`), so the tests can check the other behaviours
//! and still assert transparency separately.

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use sidecar_tests::{
    blocking::retrying,
    protocol::{ConnectFailLine, EchoLine, HOLD_PING_SIZE, HoldLine, READY, pattern},
};

/// Longest a connect may take. Generous: the point is to never hang forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a single read or write may block (also bounds waiting for EOF after half-close).
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `connect-fail` waits for the proxy to give up on the upstream.
const FAIL_TIMEOUT: Duration = Duration::from_secs(5);
/// Write granularity of `echo`, so `sent` is exact even when a write fails midway.
const CHUNK: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "sidecar-testclient",
    about = "TCP workload for the sidecar integration tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open `count` connections (`concurrency` at a time); on each send `size` bytes,
    /// half-close, read the echo until EOF and check it byte for byte. Exit 1 if any failed.
    Echo {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Open `count` connections, do one 64-byte ping-pong on each, print them and `READY`,
    /// then keep them open until stdin reaches EOF.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Open `count` connections one after the other; on each do `rounds` blocking
    /// request/response exchanges of `size` bytes (write, then read the echo), then close
    /// without half-closing: the usual RPC pattern.
    Pingpong {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Run the `count` connections in parallel, each exchanging for this long instead of
        /// a number of rounds (a bounded stream, e.g. across a certificate rotation).
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// Echo server: listen on `addr`, print `READY`, then one JSON line per accepted
    /// connection (its peer address); echo each until EOF. Exit when stdin reaches EOF.
    Serve {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Connect, send one byte, read: report how (and how fast) the connection failed.
    ConnectFail {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Mixed traffic for a soak, in `phases` of `phase_secs`: request/response, connection
    /// churn, bulk streams and half-closes to each `--addr` (echo servers), plus connections
    /// to a port where nothing listens and to an upstream that resets (both run here). After
    /// each phase it prints a cumulative `SoakLine` and waits (bounded) for `<go_dir>/go-N`
    /// (the last phase too, so the test can measure the idle sidecar before the exit).
    Soak {
        #[arg(long, required = true)]
        addr: Vec<SocketAddr>,
        #[arg(long, default_value_t = 4)]
        phases: usize,
        #[arg(long, default_value_t = 20.0)]
        phase_secs: f64,
        #[arg(long)]
        go_dir: std::path::PathBuf,
        /// Upper bound on connections per phase (all kinds together).
        #[arg(long, default_value_t = 15_000)]
        max_per_phase: u64,
    },
    /// Talk to `sidecar agent`'s registration socket as a process of the pod this runs in:
    /// open `connections` connections, send every `--line` on each and print each answer as
    /// `{"conn":i,"answer":…}`. Then, with `--partial`, send that text without a newline on
    /// each and print what the agent answers before it closes the connection
    /// (`{"conn":i,"closed_after_secs":…,"answer":…}`); with `--hold`, print `READY` and keep
    /// the connections until stdin ends; with `--orphan` (one connection), fork, print
    /// `HANDED` and exit: the child keeps the connection, sends each stdin line on it and
    /// prints each answer, until stdin ends.
    AgentAsk {
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(long)]
        line: Vec<String>,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long)]
        partial: Option<String>,
        #[arg(long)]
        hold: bool,
        #[arg(long)]
        orphan: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Echo {
            addr,
            size,
            count,
            concurrency,
        } => echo(addr, size, count, concurrency),
        Command::Hold { addr, count } => hold(addr, count),
        Command::Pingpong {
            addr,
            size,
            rounds,
            count,
            seconds,
        } => match seconds {
            None => pingpong(addr, size, rounds, count),
            Some(s) => pingpong_for(addr, size, count, Duration::from_secs_f64(s)),
        },
        Command::Serve { addr } => serve(addr),
        Command::ConnectFail { addr } => connect_fail(addr),
        Command::Soak {
            addr,
            phases,
            phase_secs,
            go_dir,
            max_per_phase,
        } => soak::run(
            &addr,
            phases,
            Duration::from_secs_f64(phase_secs),
            &go_dir,
            max_per_phase,
        ),
        Command::AgentAsk {
            socket,
            line,
            connections,
            partial,
            hold,
            orphan,
        } => agent::ask(
            &socket,
            &line,
            connections,
            partial.as_deref(),
            hold,
            orphan,
        ),
    }
}

/// Prints one line and flushes, so the test sees it even if we are killed right after.
fn print_line(line: &str) {
    let mut out = io::stdout().lock();
    // A closed stdout only loses test output; the exit code still tells the story.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn emit(value: &impl serde::Serialize) {
    print_line(&serde_json::to_string(value).expect("protocol types serialize"));
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

// ---------------------------------------------------------------------------------------
// Blocking I/O that tolerates (and counts) spurious EAGAIN

fn write_all(stream: &TcpStream, mut buf: &[u8], spurious: &AtomicU64) -> io::Result<()> {
    while !buf.is_empty() {
        match retrying(spurious, IO_TIMEOUT, || (&*stream).write(buf))? {
            0 => return Err(io::Error::from(ErrorKind::WriteZero)),
            n => buf = &buf[n..],
        }
    }
    Ok(())
}

fn read_exact(stream: &TcpStream, mut buf: &mut [u8], spurious: &AtomicU64) -> io::Result<()> {
    while !buf.is_empty() {
        match retrying(spurious, IO_TIMEOUT, || (&*stream).read(buf))? {
            0 => return Err(io::Error::from(ErrorKind::UnexpectedEof)),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// Reads until EOF, keeping at most `limit` bytes (one more than expected is enough to
/// notice an over-long echo). Errors carry how much had arrived.
fn read_to_eof(
    stream: &TcpStream,
    limit: usize,
    spurious: &AtomicU64,
) -> (Vec<u8>, io::Result<()>) {
    let mut received = Vec::with_capacity(limit);
    let mut buf = vec![0u8; CHUNK];
    loop {
        match retrying(spurious, IO_TIMEOUT, || (&*stream).read(&mut buf)) {
            Ok(0) => return (received, Ok(())),
            Ok(n) => {
                let keep = n.min(limit.saturating_sub(received.len()));
                received.extend_from_slice(&buf[..keep]);
                if received.len() >= limit {
                    return (received, Ok(()));
                }
            }
            Err(e) => return (received, Err(e)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// echo

fn echo(addr: SocketAddr, size: usize, count: usize, concurrency: usize) -> ExitCode {
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

fn pingpong(addr: SocketAddr, size: usize, rounds: usize, count: usize) -> ExitCode {
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

/// `count` parallel connections, each exchanging until `duration` has passed.
fn pingpong_for(addr: SocketAddr, size: usize, count: usize, duration: Duration) -> ExitCode {
    let deadline = Instant::now() + duration;
    let handles: Vec<_> = (0..count)
        .map(|i| thread::spawn(move || pingpong_until(addr, size, i as u64, deadline)))
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

fn pingpong_until(addr: SocketAddr, size: usize, seed: u64, deadline: Instant) -> EchoLine {
    // Rounds are bounded by time; the cap only guards against a clock gone wrong.
    pingpong_one_with(addr, size, 10_000_000, seed, Some(deadline))
}

/// Echo server for the far side of a tunnel (runs inside that side's sidecar).
fn serve(addr: SocketAddr) -> ExitCode {
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
            loop {
                match (&stream).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if (&stream).write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
    ExitCode::SUCCESS
}

fn pingpong_one(addr: SocketAddr, size: usize, rounds: usize, seed: u64) -> EchoLine {
    pingpong_one_with(addr, size, rounds, seed, None)
}

fn pingpong_one_with(
    addr: SocketAddr,
    size: usize,
    rounds: usize,
    seed: u64,
    deadline: Option<Instant>,
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
        for _ in 0..rounds {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
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
fn echo_one(addr: SocketAddr, size: usize, seed: u64, barrier: Option<Arc<Barrier>>) -> EchoLine {
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

// ---------------------------------------------------------------------------------------
// hold

fn hold(addr: SocketAddr, count: usize) -> ExitCode {
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

// ---------------------------------------------------------------------------------------
// connect-fail

/// Exits 0 whenever it could report: whether the connection failed is data for the test.
fn connect_fail(addr: SocketAddr) -> ExitCode {
    let start = Instant::now();
    let spurious = AtomicU64::new(0);
    let (connected, error) = match TcpStream::connect_timeout(&addr, FAIL_TIMEOUT) {
        Err(e) => (false, Some(format!("connect: {e}"))),
        Ok(stream) => (true, first_failure(&stream, &spurious)),
    };
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let spurious_wouldblock = spurious.load(Ordering::Relaxed);
    emit(&ConnectFailLine {
        connected,
        error,
        elapsed_ms,
        spurious_wouldblock,
    });
    ExitCode::SUCCESS
}

/// After a successful connect: how the connection fails, or `None` if a byte came back.
/// Spurious `EAGAIN`s are retried, so the error is the real failure, not a kernel quirk.
fn first_failure(stream: &TcpStream, spurious: &AtomicU64) -> Option<String> {
    if let Err(e) = stream.set_read_timeout(Some(FAIL_TIMEOUT)) {
        return Some(format!("set_read_timeout: {e}"));
    }
    if let Err(e) = retrying(spurious, FAIL_TIMEOUT, || (&*stream).write(b"x")) {
        return Some(format!("write: {e}"));
    }
    let mut byte = [0u8; 1];
    match retrying(spurious, FAIL_TIMEOUT, || (&*stream).read(&mut byte)) {
        Ok(0) => Some("read: EOF".to_string()),
        Ok(_) => None,
        Err(e) => Some(format!("read: {e}")),
    }
}

/// `soak`: the mixed workload. Every loop stops at the phase deadline or the phase's
/// connection budget, whichever comes first; every socket operation has a timeout.
/// The registration socket of `sidecar agent`, seen from a pod.
mod agent {
    use std::{
        io::{self, BufRead, BufReader, Read, Write},
        os::unix::net::UnixStream,
        path::Path,
        process::ExitCode,
        time::{Duration, Instant},
    };

    use super::{IO_TIMEOUT, print_line};

    pub fn ask(
        socket: &Path,
        lines: &[String],
        connections: usize,
        partial: Option<&str>,
        hold: bool,
        orphan: bool,
    ) -> ExitCode {
        match run(socket, lines, connections, partial, hold, orphan) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agent-ask: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn run(
        socket: &Path,
        lines: &[String],
        connections: usize,
        partial: Option<&str>,
        hold: bool,
        orphan: bool,
    ) -> io::Result<()> {
        let mut streams = Vec::new();
        for conn in 0..connections {
            let s = UnixStream::connect(socket)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            for line in lines {
                let answer = exchange(&s, line)?;
                print_line(&serde_json::json!({"conn": conn, "answer": answer}).to_string());
            }
            streams.push(s);
        }
        if let Some(text) = partial {
            for s in &mut streams {
                // A connection the agent refused at once may be closed already.
                let _ = s.write_all(text.as_bytes());
            }
            let started = Instant::now();
            for (conn, s) in streams.iter_mut().enumerate() {
                let mut rest = String::new();
                // EOF, or a reset (the agent closed before reading our bytes): closed either
                // way; only a read timeout means the connection is still open.
                let closed = match s.read_to_string(&mut rest) {
                    Ok(_) => true,
                    Err(e) => !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                };
                print_line(
                    &serde_json::json!({
                        "conn": conn,
                        "closed": closed,
                        "closed_after_secs": started.elapsed().as_secs_f64(),
                        "answer": rest.trim(),
                    })
                    .to_string(),
                );
            }
        }
        if hold {
            print_line(super::READY);
            let _ = io::stdin().read_to_end(&mut Vec::new());
        }
        if orphan {
            forward_in_child(&streams[0])?;
        }
        Ok(())
    }

    /// Writes `line` and reads one answer line.
    fn exchange(s: &UnixStream, line: &str) -> io::Result<String> {
        writeln!(&*s, "{line}")?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer)?;
        Ok(answer.trim().to_string())
    }

    /// Forks: this process (the one that connected) exits; the child keeps the connection
    /// and forwards stdin lines on it. Single-threaded here, so the child may run Rust code.
    fn forward_in_child(s: &UnixStream) -> io::Result<()> {
        // SAFETY: no other thread exists in this process.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid > 0 {
            print_line("HANDED");
            return Ok(());
        }
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        for line in io::stdin().lock().lines() {
            let answer = exchange(s, &line?).unwrap_or_else(|e| format!("error: {e}"));
            print_line(&serde_json::json!({"answer": answer}).to_string());
        }
        Ok(())
    }
}

mod soak {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, SocketAddr, TcpListener},
        path::Path,
        process::ExitCode,
        sync::{Arc, Mutex, atomic::AtomicU64},
        thread,
        time::{Duration, Instant},
    };

    use sidecar_tests::protocol::{EchoLine, SoakLine};

    use super::{FAIL_TIMEOUT, connect, echo_one, emit, first_failure, pingpong_one};

    /// How long a phase may wait for the test's go file.
    const GO_TIMEOUT: Duration = Duration::from_secs(180);
    const BULK: usize = 1 << 20;

    #[derive(Clone, Copy)]
    enum Kind {
        Rr,
        Churn,
        Bulk,
        HalfClose,
        Fault,
    }

    struct Shared {
        line: Mutex<SoakLine>,
        started: AtomicU64,
    }

    impl Shared {
        fn record(&self, kind: &str, target: usize, l: EchoLine) {
            let mut s = self.line.lock().unwrap();
            s.connections += 1;
            s.spurious_wouldblock += l.spurious_wouldblock;
            if l.ok {
                s.ok += 1;
                s.sent += l.sent;
                s.received += l.received;
                *s.by_kind.entry(format!("{kind}@{target}")).or_default() += 1;
            } else {
                s.failed += 1;
                if s.errors.len() < 10 {
                    s.errors.push(format!("{kind}@{target}: {:?}", l.error));
                }
            }
        }

        fn record_fault(&self, what: &str, failed: bool) {
            let mut s = self.line.lock().unwrap();
            s.connections += 1;
            match (failed, what) {
                (false, _) => {
                    s.unexpected_success += 1;
                    if s.errors.len() < 10 {
                        s.errors.push(format!("{what}: the connection worked"));
                    }
                }
                (true, "refused") => s.refused += 1,
                (true, _) => s.reset += 1,
            }
        }
    }

    /// An upstream that reads what arrives, then resets (SO_LINGER 0): every connection to
    /// it must fail for the client.
    fn start_resetter() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding the resetter");
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf);
                sidecar_tests::blocking::reset_on_close(&stream);
            }
        });
        addr
    }

    /// A loopback port where nothing listens (bound, then released).
    fn closed_port() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a probe port");
        l.local_addr().unwrap()
    }

    fn fault_fails(addr: SocketAddr) -> bool {
        let spurious = AtomicU64::new(0);
        match connect(addr) {
            Err(_) => true,
            Ok(mut s) => {
                let _ = s.set_write_timeout(Some(FAIL_TIMEOUT));
                let _ = s.write_all(&[b'x'; 32]);
                first_failure(&s, &spurious).is_some()
            }
        }
    }

    fn worker(
        kind: Kind,
        targets: Arc<Vec<SocketAddr>>,
        faults: [SocketAddr; 2],
        shared: Arc<Shared>,
        deadline: Instant,
        budget: u64,
        seed0: u64,
    ) {
        let mut i: u64 = 0;
        while Instant::now() < deadline
            && shared
                .started
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                < budget
        {
            let t = (i as usize) % targets.len();
            let seed = seed0.wrapping_mul(1_000_003).wrapping_add(i);
            match kind {
                Kind::Rr => shared.record("rr", t, pingpong_one(targets[t], 64, 20, seed)),
                Kind::Churn => shared.record("churn", t, pingpong_one(targets[t], 32, 1, seed)),
                Kind::Bulk => shared.record("bulk", t, echo_one(targets[t], BULK, seed, None)),
                Kind::HalfClose => shared.record(
                    "half_close",
                    t,
                    echo_one(targets[t], 100 + (i % 900) as usize, seed, None),
                ),
                Kind::Fault => {
                    let (what, addr) = if i.is_multiple_of(2) {
                        ("refused", faults[0])
                    } else {
                        ("reset", faults[1])
                    };
                    shared.record_fault(what, fault_fails(addr));
                    thread::sleep(Duration::from_millis(20));
                }
            }
            i += 1;
        }
    }

    pub fn run(
        addrs: &[SocketAddr],
        phases: usize,
        phase: Duration,
        go_dir: &Path,
        max_per_phase: u64,
    ) -> ExitCode {
        let targets = Arc::new(addrs.to_vec());
        let faults = [closed_port(), start_resetter()];
        let shared = Arc::new(Shared {
            line: Mutex::new(SoakLine::default()),
            started: AtomicU64::new(0),
        });
        let kinds = [
            Kind::Rr,
            Kind::Rr,
            Kind::Churn,
            Kind::Churn,
            Kind::Bulk,
            Kind::HalfClose,
            Kind::Fault,
        ];
        for p in 1..=phases {
            let deadline = Instant::now() + phase;
            let budget = max_per_phase * p as u64;
            let handles: Vec<_> = kinds
                .iter()
                .enumerate()
                .map(|(w, kind)| {
                    let (kind, targets, shared) = (*kind, targets.clone(), shared.clone());
                    let seed = (p * 100 + w) as u64;
                    thread::spawn(move || {
                        worker(kind, targets, faults, shared, deadline, budget, seed)
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            shared.started.store(
                shared.line.lock().unwrap().connections,
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut line = shared.line.lock().unwrap().clone();
            line.phase = p;
            emit(&line);
            // Also after the last phase: the test measures the idle sidecar before it exits.
            {
                let go = go_dir.join(format!("go-{p}"));
                let waited = Instant::now();
                while !go.exists() {
                    if waited.elapsed() > GO_TIMEOUT {
                        eprintln!("soak: no {} within {GO_TIMEOUT:?}", go.display());
                        return ExitCode::FAILURE;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let line = shared.line.lock().unwrap();
        if line.failed == 0 && line.unexpected_success == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
