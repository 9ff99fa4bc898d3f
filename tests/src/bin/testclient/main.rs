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
//!
//! Two subcommands print plain text instead, for the tests that read it that way:
//! `exchange` (`local=… peer=…` and `ok` per address, as a shell script's step) and
//! `lockstep` (progress lines, moving on at each line the test writes to stdin).
//!
//! One file per group of subcommands: [`echo`] (echo, pingpong, hold, serve),
//! [`connect_fail`], [`exchange`], [`lockstep`], [`soak`], [`agent`] (agent-ask) and
//! [`hbone`] (hbone-reset-flood: an abusive mesh peer, the one subcommand that is not plain
//! TCP).

mod agent;
mod connect_fail;
mod echo;
mod exchange;
mod hbone;
mod hbone_raw;
mod lockstep;
mod soak;

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::atomic::AtomicU64,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use sidecar_tests::{blocking::retrying, protocol::READY};

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
    /// Paced (`--after`, `--until`, `--pause-ms`): one at a time, each line printed as it ends.
    Echo {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[command(flatten)]
        pace: echo::Pace,
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
        /// Run the `count` connections in parallel, each for `rounds` exchanges.
        #[arg(long)]
        parallel: bool,
        #[command(flatten)]
        pace: echo::Pace,
    },
    /// Echo server: listen on `addr`, print `READY`, then one JSON line per accepted
    /// connection (its peer address); echo each until EOF. Exit when stdin reaches EOF.
    Serve {
        #[arg(long)]
        addr: SocketAddr,
        /// Close each connection once this many bytes were echoed on it, without waiting for
        /// the client's EOF (the server ends first, as one answering a single request does).
        #[arg(long)]
        close_after: Option<u64>,
    },
    /// Connect, send one byte, read: report how (and how fast) the connection failed.
    ConnectFail {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Open a raw ICMP socket and print `raw socket: ok` or `raw socket: <the error>`: what
    /// the workload may send past every connect hook.
    RawSocket,
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
    /// For each address in turn: connect, print `local=<addr> peer=<addr>` (what this socket
    /// sees), send `bytes` bytes, half-close, check the echo is byte-exact and print `ok`.
    /// Exits 1 with an `error:` line on stderr at the first failure.
    Exchange {
        #[arg(long, default_value_t = 64)]
        bytes: usize,
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
    },
    /// As a peer of the mesh (certificates in `tls_dir`), dial the tunnel port `addr`, then
    /// open up to `streams` HBONE streams to `target` and reset each at once (the HTTP/2
    /// "rapid reset" flood), until the server sends us away. Prints one `FloodLine`.
    HboneResetFlood {
        #[command(flatten)]
        to: hbone::FloodTarget,
        #[arg(long, default_value_t = 10_000)]
        streams: u64,
    },
    /// As a peer of the mesh, dial the tunnel port `addr` and break HTTP/2's rules with
    /// hand-written frames: a CONTINUATION flood (`--kind continuation`, `frames` of them)
    /// or `frames` concurrent CONNECT streams to `target` past the server's limit
    /// (`--kind streams`). Prints one `RawFloodLine`.
    HboneRawFlood {
        #[command(flatten)]
        to: hbone::FloodTarget,
        #[arg(long, value_enum)]
        kind: hbone_raw::Kind,
        #[arg(long)]
        frames: u64,
    },
    /// Known traffic in steps the test paces: print `ready` and wait for a stdin line, do
    /// the step (printing progress lines), print `done` and wait for stdin to close.
    Lockstep {
        #[command(subcommand)]
        step: lockstep::Step,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Echo {
            addr,
            size,
            count,
            concurrency: _,
            pace,
        } if pace.is_set() => echo::echo_paced(addr, size, count, &pace),
        Command::Echo {
            addr,
            size,
            count,
            concurrency,
            pace: _,
        } => echo::echo(addr, size, count, concurrency),
        Command::Hold { addr, count } => echo::hold(addr, count),
        Command::Pingpong {
            addr,
            size,
            rounds,
            count,
            seconds,
            parallel,
            pace,
        } => match (seconds, parallel || pace.is_set()) {
            (None, false) => echo::pingpong(addr, size, rounds, count),
            (None, true) => echo::pingpong_parallel(addr, size, rounds, count, None, &pace),
            // Bounded by time; the round cap only guards against a clock gone wrong.
            (Some(s), _) => echo::pingpong_parallel(
                addr,
                size,
                10_000_000,
                count,
                Some(Instant::now() + Duration::from_secs_f64(s)),
                &pace,
            ),
        },
        Command::Serve { addr, close_after } => echo::serve(addr, close_after),
        Command::ConnectFail { addr } => connect_fail::connect_fail(addr),
        Command::RawSocket => connect_fail::raw_socket(),
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
        Command::Exchange { bytes, addrs } => exchange::run(&addrs, bytes),
        Command::Lockstep { step } => lockstep::run(step),
        Command::HboneResetFlood { to, streams } => hbone::reset_flood(&to, streams),
        Command::HboneRawFlood { to, kind, frames } => hbone_raw::raw_flood(&to, kind, frames),
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
