//! The load generator: the hidden `bench-server` and `bench-client` subcommands the bench
//! runs (the release xtask binary re-invoked), inside the scenario's network namespaces and,
//! for the proxied modes, as the command of `sidecar run`.
//!
//! Blocking std sockets and one thread per connection: the simplest client that adds the
//! least of its own to the figures. Every loop is bounded by a count or a deadline, every
//! socket has timeouts.

use std::{
    fs,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Socket timeouts: a stuck exchange fails the run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bulk write size.
const BULK_CHUNK: usize = 64 * 1024;
/// Exchanges run before timing starts on each persistent connection.
const WARMUP: usize = 200;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on; the echo service takes this port, the sink the next one.
    #[arg(long)]
    pub listen: SocketAddr,
}

/// Echo on `listen` (request/response and connect-exchange-close), sink on port+1 (bulk:
/// read chunks until the end chunk, answer with the byte count as 8 bytes). Runs until
/// killed.
pub fn server(args: &ServerArgs) -> Result<()> {
    let echo = TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let mut sink_addr = args.listen;
    sink_addr.set_port(args.listen.port() + 1);
    let sink = TcpListener::bind(sink_addr).with_context(|| format!("bind {sink_addr}"))?;
    thread::spawn(move || accept_loop(sink, sink_conn));
    println!("ready");
    io::stdout().flush()?;
    accept_loop(echo, echo_conn);
    Ok(())
}

fn accept_loop(listener: TcpListener, handle: fn(TcpStream) -> io::Result<()>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
            let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
            let _ = handle(conn);
        });
    }
}

fn echo_conn(mut c: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BULK_CHUNK];
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        c.write_all(&buf[..n])?;
    }
}

/// Bulk framing: fixed-size chunks whose first byte says data or end. The end chunk makes
/// the sink answer with its count while both directions are still open: a half-close would
/// also work, but it would measure half-close handling, not throughput.
const CHUNK_DATA: u8 = 0x5a;
const CHUNK_END: u8 = 0xee;

fn sink_conn(mut c: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut total = 0u64;
    loop {
        c.read_exact(&mut buf)?;
        match buf[0] {
            CHUNK_DATA => total += BULK_CHUNK as u64,
            CHUNK_END => break,
            other => {
                return Err(io::Error::other(format!("bad bulk chunk tag {other:#x}")));
            }
        }
    }
    c.write_all(&total.to_le_bytes())
}

#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct ClientArgs {
    /// The echo server (the sink is on the next port).
    #[arg(long)]
    pub server: SocketAddr,
    /// Timed request/response exchanges per message size.
    #[arg(long)]
    pub exchanges: usize,
    /// Connections for the connect-exchange-close test.
    #[arg(long)]
    pub connections: usize,
    /// Seconds each bulk test runs.
    #[arg(long)]
    pub bulk_secs: f64,
    /// Read the parent's (the sidecar's) CPU time and memory from /proc.
    #[arg(long)]
    pub sidecar_stats: bool,
    /// Read the parent sidecar's eBPF programs' run counts and times around the
    /// connect-exchange-close loop (needs `kernel.bpf_stats_enabled`; see `kernel_cost`).
    #[arg(long, requires = "sidecar_stats")]
    pub bpf_cost: bool,
    /// A proxy that is not our parent (HAProxy), measured as the sidecar would be.
    #[arg(long, conflicts_with = "sidecar_stats")]
    pub proxy_pid: Option<u32>,
    /// With mTLS: the server pod's sidecar, measured the same way.
    #[arg(long)]
    pub peer_sidecar: Option<u32>,
    /// Where to write the results (JSON).
    #[arg(long)]
    pub out: PathBuf,
}

/// Message sizes of the request/response test.
pub const SIZES: [usize; 2] = [64, 4096];
/// Stream counts of the bulk test.
pub const STREAMS: [usize; 2] = [1, 16];

/// What one client run measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ClientResult {
    /// Round-trip latency of each timed exchange, in nanoseconds, per size in [`SIZES`].
    pub rr_ns: Vec<Vec<u32>>,
    /// Connect-exchange-close: connections and the seconds they took.
    pub crr_count: usize,
    pub crr_secs: f64,
    /// Bulk, per stream count in [`STREAMS`]: bytes the server received and seconds.
    pub bulk_bytes: Vec<u64>,
    pub bulk_secs: Vec<f64>,
    /// The sidecar's figures (proxied modes only).
    pub sidecar: Option<SidecarStats>,
    /// The server pod's sidecar's (mTLS modes only).
    #[serde(default)]
    pub peer_sidecar: Option<SidecarStats>,
    /// Writes the kernel refused with ENOMEM and that were retried (sockmap's ingress
    /// redirect has no backpressure: a full receiver fails the sender's write). An app would
    /// see these as errors; the bench retries so it can still measure, and reports them.
    #[serde(default)]
    pub enomem_retries: u64,
    /// Blocking reads that returned EAGAIN long before their timeout, retried: the kernel's
    /// sockmap receive path (`tcp_bpf_recvmsg`) gives up after one wake-up without data.
    #[serde(default)]
    pub eagain_retries: u64,
    /// With `--bpf-cost`: the sidecar's programs' runs and time during the
    /// connect-exchange-close loop, by program type.
    #[serde(default)]
    pub crr_bpf: Option<Vec<super::kernel_cost::ProgRuns>>,
}

/// Spurious EAGAINs seen by this client process's blocking reads.
static SPURIOUS_EAGAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `read_exact` on a blocking socket, retrying an EAGAIN that comes back before the read
/// timeout could have expired (see [`RunResult::eagain_retries`]).
fn read_exact_retrying(c: &mut TcpStream, mut buf: &mut [u8]) -> io::Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !buf.is_empty() {
        match c.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                SPURIOUS_EAGAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// CPU time is read from `/proc/<pid>/stat` (utime + stime, all threads, clock ticks).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SidecarStats {
    /// CPU seconds the sidecar spent during each rr size's timed exchanges.
    pub rr_cpu_secs: Vec<f64>,
    /// CPU seconds during the connect-exchange-close test.
    pub crr_cpu_secs: f64,
    /// VmRSS before any traffic, and VmHWM at the end, in KiB.
    pub idle_rss_kib: u64,
    pub peak_rss_kib: u64,
}

pub fn client(args: &ClientArgs) -> Result<()> {
    let parent = if args.sidecar_stats {
        let ppid = std::os::unix::process::parent_id();
        let comm = fs::read_to_string(format!("/proc/{ppid}/comm")).unwrap_or_default();
        if comm.trim() != "sidecar" {
            bail!("--sidecar-stats: the parent is {comm:?}, not the sidecar");
        }
        Some(ppid)
    } else {
        args.proxy_pid
    };
    // The sidecars measured: ours (the parent), then the peer's.
    let mut watched: Vec<Watched> = parent
        .into_iter()
        .chain(args.peer_sidecar)
        .map(Watched::new)
        .collect::<Result<_>>()?;
    let mut result = ClientResult::default();

    for size in SIZES {
        let mut conn = connect(args.server)?;
        let mut samples = Vec::with_capacity(args.exchanges);
        let mut buf = vec![0u8; size];
        for _ in 0..WARMUP {
            exchange(&mut conn, &mut buf)?;
        }
        Watched::mark_all(&mut watched)?;
        for _ in 0..args.exchanges {
            let t = Instant::now();
            exchange(&mut conn, &mut buf)?;
            samples.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        for w in &mut watched {
            let cpu = w.since_mark()?;
            w.stats.rr_cpu_secs.push(cpu);
        }
        result.rr_ns.push(samples);
    }

    Watched::mark_all(&mut watched)?;
    let bpf_before = match (args.bpf_cost, parent) {
        (true, Some(pid)) => Some(super::kernel_cost::read(pid)?),
        _ => None,
    };
    let started = Instant::now();
    let mut buf = vec![0u8; 64];
    for _ in 0..args.connections {
        let mut conn = connect(args.server)?;
        exchange(&mut conn, &mut buf)?;
    }
    result.crr_secs = started.elapsed().as_secs_f64();
    result.crr_count = args.connections;
    if let (Some(before), Some(pid)) = (bpf_before, parent) {
        // The last connection's final callbacks may land after this reading (its close
        // completes when the server's FIN arrives): one connection in thousands.
        let after = super::kernel_cost::read(pid)?;
        result.crr_bpf = Some(super::kernel_cost::delta(&before, &after));
    }
    for w in &mut watched {
        w.stats.crr_cpu_secs = w.since_mark()?;
    }

    let mut sink = args.server;
    sink.set_port(args.server.port() + 1);
    for streams in STREAMS {
        let (bytes, secs, retries) = bulk(sink, streams, Duration::from_secs_f64(args.bulk_secs))?;
        result.enomem_retries += retries;
        result.eagain_retries = SPURIOUS_EAGAIN.load(std::sync::atomic::Ordering::Relaxed);
        result.bulk_bytes.push(bytes);
        result.bulk_secs.push(secs);
    }

    let mut stats = watched.into_iter().map(Watched::finish);
    if parent.is_some() {
        result.sidecar = stats.next().transpose()?;
    }
    result.peer_sidecar = stats.next().transpose()?;
    fs::write(&args.out, serde_json::to_vec(&result)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

/// A sidecar process whose CPU time and memory a client run measures.
struct Watched {
    pid: u32,
    stats: SidecarStats,
    /// CPU seconds at the start of the current test.
    mark: f64,
}

impl Watched {
    fn new(pid: u32) -> Result<Self> {
        let stats = SidecarStats {
            idle_rss_kib: status_kib(pid, "VmRSS")?,
            ..Default::default()
        };
        Ok(Self {
            pid,
            stats,
            mark: 0.0,
        })
    }

    fn mark_all(all: &mut [Watched]) -> Result<()> {
        for w in all {
            w.mark = cpu_secs(w.pid)?;
        }
        Ok(())
    }

    fn since_mark(&self) -> Result<f64> {
        Ok(cpu_secs(self.pid)? - self.mark)
    }

    fn finish(mut self) -> Result<SidecarStats> {
        self.stats.peak_rss_kib = status_kib(self.pid, "VmHWM")?;
        Ok(self.stats)
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let c = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

/// Sends the buffer and reads the same number of bytes back.
fn exchange(c: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    // No ENOMEM retry here: one message in flight never fills a receiver.
    c.write_all(buf).context("sending a request")?;
    read_exact_retrying(c, buf).context("reading the echo")?;
    Ok(())
}

/// `streams` connections each writing for `time`; returns what the server counted, the
/// time from start until the last count came back, and the ENOMEM retries.
fn bulk(sink: SocketAddr, streams: usize, time: Duration) -> Result<(u64, f64, u64)> {
    let started = Instant::now();
    let deadline = started + time;
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || -> Result<(u64, u64)> {
                let mut c = connect(sink)?;
                let mut chunk = vec![CHUNK_DATA; BULK_CHUNK];
                let mut retries = 0;
                while Instant::now() < deadline {
                    retries += write_retrying(&mut c, &chunk).context("bulk write")?;
                }
                chunk[0] = CHUNK_END;
                retries += write_retrying(&mut c, &chunk).context("bulk write")?;
                let mut count = [0u8; 8];
                read_exact_retrying(&mut c, &mut count).context("reading the sink's count")?;
                Ok((u64::from_le_bytes(count), retries))
            })
        })
        .collect();
    let (mut total, mut retries) = (0, 0);
    for w in workers {
        let (bytes, r) = w
            .join()
            .map_err(|_| anyhow::anyhow!("bulk thread panicked"))??;
        total += bytes;
        retries += r;
    }
    Ok((total, started.elapsed().as_secs_f64(), retries))
}

/// `write_all`, except that ENOMEM is waited out (bounded: 10 s of retries at most) and
/// counted instead of failing. Returns the number of retries.
fn write_retrying(c: &mut TcpStream, mut buf: &[u8]) -> io::Result<u64> {
    let mut retries = 0u64;
    let deadline = Instant::now() + IO_TIMEOUT;
    while !buf.is_empty() {
        match c.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && Instant::now() < deadline => {
                retries += 1;
                thread::sleep(Duration::from_micros(100));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(retries)
}

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), itself in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("parsing /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// A `kB` line of /proc/PID/status.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}
