//! What idle proxied connections cost: `sidecar run --proxy-all` with a command that opens
//! 10,000 connections through it, one 64 B ping-pong each, and then holds them idle. The
//! sidecar's VmRSS is read before (after a warm-up of connections opened and closed, so the
//! runtime's first-use allocations are not counted) and with them all open.
//!
//! The descriptors it takes (two per connection in the sidecar, two in the command) may
//! exceed the hard `RLIMIT_NOFILE`, which only CAP_SYS_RESOURCE may raise (this project's
//! CI host runs as root without it, at 20,000): then it holds as many as that limit allows
//! and the report gives the figure scaled to 10,000 from the measured cost per connection.
//!
//! The command serves its own connections (a listener on loopback in the same namespace,
//! answering each connection's one message in turn), so no server has to hold 10,000
//! threads. The bench and the command step each other along with files in the raw
//! directory: `warm` (printed), `go` (created by the bench), `held` (printed), `done`.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Side, load, netns::Netns, wait_bounded};

/// Connections to hold open: the target's figure, 10,000.
pub const CONNECTIONS: usize = 10_000;
/// Connections opened and closed before the baseline.
const WARMUP: usize = 200;
/// Descriptors kept back for everything but the connections (the sidecar caps its
/// connections at half its limit less 256).
const FD_HEADROOM: u64 = 1024;
/// Bounds on every wait.
const STEP_LIMIT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const ADMIN: ([u8; 4], u16) = ([127, 0, 0, 1], 20150);
const PROXY_PORT: u16 = 20151;
const HOLD_PORT: u16 = 20152;

/// The sidecar's RSS before and with the connections open.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub connections: usize,
    pub before_kib: u64,
    pub with_kib: u64,
}

impl Idle {
    /// What the connections held added.
    pub fn added_mib(&self) -> f64 {
        self.with_kib.saturating_sub(self.before_kib) as f64 / 1024.0
    }

    /// The addition scaled to [`CONNECTIONS`] from the cost per connection measured (the
    /// same as [`Self::added_mib`] when all of them fitted under the descriptor limit).
    pub fn added_mib_at_target(&self) -> f64 {
        self.per_connection_kib() * CONNECTIONS as f64 / 1024.0
    }

    pub fn per_connection_kib(&self) -> f64 {
        self.with_kib.saturating_sub(self.before_kib) as f64 / self.connections as f64
    }
}

/// One measurement in namespace `ns`; `raw` keeps the sidecar's log and the step files.
pub fn measure(sidecar: &Path, load_bin: &Path, ns: &Netns, raw: &Path) -> Result<Idle> {
    let nofile = hard_nofile()?;
    let count = connections_for(nofile);
    if count < CONNECTIONS / 2 {
        bail!(
            "the hard RLIMIT_NOFILE ({nofile}) allows only {count} idle connections: raise it \
             to at least {} (ulimit -Hn, or limits.conf) for a meaningful figure",
            2 * CONNECTIONS as u64 + FD_HEADROOM
        );
    }
    let dir = raw.join("idle");
    fs::create_dir_all(&dir)?;
    let (go, done) = (dir.join("go"), dir.join("done"));
    for f in [&go, &done] {
        let _ = fs::remove_file(f);
    }
    let log = dir.join("sidecar.log");
    let mut cmd = Command::new(sidecar);
    cmd.args([
        "run",
        "--proxy-all",
        "--proxy-port",
        &PROXY_PORT.to_string(),
    ])
    .args(["--admin-addr", &SocketAddr::from(ADMIN).to_string()])
    .args(["--max-connections", &count.to_string()])
    .arg("--")
    .arg(load_bin)
    .args(["bench-hold", "--listen"])
    .arg(SocketAddr::from(([127, 0, 0, 1], HOLD_PORT)).to_string())
    .args(["--count", &count.to_string()])
    .args(["--warmup", &WARMUP.to_string()])
    .arg("--go")
    .arg(&go)
    .arg("--done")
    .arg(&done)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(fs::File::create(&log)?);
    ns.enter(&mut cmd)?;
    Side::Client.pin(&mut cmd);
    // SAFETY: `set_nofile` only calls setrlimit(2), which is async-signal-safe; raising the
    // soft limit to the hard one needs no privilege.
    unsafe {
        cmd.pre_exec(move || set_nofile(nofile));
    }
    let mut child = cmd
        .spawn()
        .context("starting sidecar run for the idle connections")?;
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().context("the command's stdout")?);
    let measured = (|| {
        expect_line(&mut lines, "warm", &log)?;
        let before_kib = settled_rss(pid)?;
        fs::write(&go, b"")?;
        let held = expect_line(&mut lines, "held", &log)?;
        let connections: usize = held
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the command said {held:?}"))?;
        if connections != count {
            bail!("the command held {connections} connections, not {count}");
        }
        let with_kib = settled_rss(pid)?;
        Ok(Idle {
            connections,
            before_kib,
            with_kib,
        })
    })();
    let _ = fs::write(&done, b"");
    let status = wait_bounded(&mut child, STEP_LIMIT)?;
    let idle = measured?;
    if !status.success() {
        bail!("sidecar run exited with {status} (log: {})", log.display());
    }
    Ok(idle)
}

/// The hard descriptor limit, which children may raise their soft limit to.
fn hard_nofile() -> Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(rl.rlim_max)
}

/// Soft and hard descriptor limits both at `limit` (the soft one up to the hard one).
fn set_nofile(limit: u64) -> std::io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connections both the sidecar and the command can hold under `nofile`: two descriptors
/// each per connection, less the headroom, at most [`CONNECTIONS`].
fn connections_for(nofile: u64) -> usize {
    (nofile.saturating_sub(FD_HEADROOM) / 2).min(CONNECTIONS as u64) as usize
}

/// Reads the command's lines until one starts with `word`.
fn expect_line(lines: &mut BufReader<ChildStdout>, word: &str, log: &Path) -> Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            bail!(
                "the idle-connections command ended before saying {word:?} (sidecar log: {})",
                log.display()
            );
        }
        if line.starts_with(word) {
            return Ok(line.trim_end().to_string());
        }
    }
}

/// VmRSS once it stops moving (the last copies park, buffers go back to their pool), or
/// after 3 s.
fn settled_rss(pid: u32) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = load::status_kib(pid, "VmRSS")?;
    loop {
        thread::sleep(Duration::from_millis(250));
        let now = load::status_kib(pid, "VmRSS")?;
        if now == last || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_the_descriptor_limit() {
        assert_eq!(connections_for(1_048_576), CONNECTIONS);
        assert_eq!(connections_for(20_000), 9_488);
        assert_eq!(connections_for(512), 0);
    }
}

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// Where to serve the connections (and to connect them to).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Connections to hold open.
    #[arg(long)]
    pub count: usize,
    /// Connections opened and closed before saying `warm`.
    #[arg(long)]
    pub warmup: usize,
    /// Created by the bench when it has read the baseline.
    #[arg(long)]
    pub go: PathBuf,
    /// Created by the bench when it has read the RSS with the connections open.
    #[arg(long)]
    pub done: PathBuf,
}

/// The command side: serve, warm up, say `warm`, wait for `go`, open and hold `count`
/// connections, say `held N`, wait for `done`.
pub fn hold(args: &HoldArgs) -> Result<()> {
    set_nofile(hard_nofile()?)?;
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let (warmup, count) = (args.warmup, args.count);
    let server = thread::spawn(move || serve(&listener, warmup, count));
    for _ in 0..args.warmup {
        drop(ping(args.listen)?);
    }
    say("warm")?;
    wait_for(&args.go)?;
    let held: Vec<TcpStream> = (0..args.count)
        .map(|_| ping(args.listen))
        .collect::<Result<_>>()?;
    say(&format!("held {}", held.len()))?;
    wait_for(&args.done)?;
    drop(held);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the hold server panicked"))?
}

/// Answers each accepted connection's one 64 B message, in turn: the `warmup` first ones
/// are closed once their client has (or the sidecar would keep them open, half-closed),
/// the `count` next kept open.
fn serve(listener: &TcpListener, warmup: usize, count: usize) -> Result<()> {
    let mut kept = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let (mut c, _) = listener.accept()?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut buf = [0u8; 64];
        c.read_exact(&mut buf)?;
        c.write_all(&buf)?;
        if i < warmup {
            let mut rest = Vec::new();
            c.read_to_end(&mut rest)
                .context("a warm-up connection's close")?;
        } else {
            kept.push(c);
        }
    }
    Ok(())
}

/// A new connection that has carried one 64 B exchange.
fn ping(addr: SocketAddr) -> Result<TcpStream> {
    let mut c =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_nodelay(true)?;
    let msg = [0x5au8; 64];
    c.write_all(&msg)?;
    let mut back = [0u8; 64];
    c.read_exact(&mut back).context("the 64 B answer")?;
    if back != msg {
        bail!("the answer differs from the message");
    }
    Ok(c)
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn wait_for(file: &Path) -> Result<()> {
    let deadline = Instant::now() + STEP_LIMIT;
    while !file.exists() {
        if Instant::now() >= deadline {
            bail!("{} did not appear within {STEP_LIMIT:?}", file.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
