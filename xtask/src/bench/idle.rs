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
//! The meshed variant ([`measure_meshed`]) holds them through the HBONE pair instead: the
//! client pod's sidecar (eBPF mode, `--tls-dir`, `--mesh-cidrs`) carries each as a stream
//! of its pooled connection(s) to the server pod's sidecar, which delivers it to a hold
//! server in the server pod (`bench-hold-serve`); both sidecars' VmRSS are read. There each
//! process holds one descriptor per connection (the app's leg; the streams share a few
//! pooled connections), so 10,000 fit under a hard limit of 20,000; with less, it holds
//! what fits and the report scales, as above.
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

use super::{
    Mode, Server, Side, check_carried, load,
    mesh::{self, Mesh},
    netns::{Netns, POD_SERVER_IP, Pods},
    wait_bounded,
};

/// Connections to hold open: the target's figure, 10,000.
pub const CONNECTIONS: usize = 10_000;
/// Connections opened and closed before the baseline.
pub const WARMUP: usize = 200;
/// Descriptors kept back for everything but the connections (the sidecar caps its
/// connections at half its limit less 256).
const FD_HEADROOM: u64 = 1024;
/// Bounds on every wait.
const STEP_LIMIT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const ADMIN: ([u8; 4], u16) = ([127, 0, 0, 1], 20150);
const PROXY_PORT: u16 = 20151;
const HOLD_PORT: u16 = 20152;
/// The meshed variant's client-pod sidecar's proxy port.
const MESH_PROXY_PORT: u16 = 20153;
/// Connections the meshed variant holds in a quick run (the full run: [`CONNECTIONS`]).
pub const QUICK_MESHED: usize = 500;

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
    .args(["--max-connections", &count.to_string()]);
    let hold = HoldArgs {
        listen: SocketAddr::from(([127, 0, 0, 1], HOLD_PORT)),
        remote: false,
        count,
        warmup: WARMUP,
        go: go.clone(),
        done: done.clone(),
    };
    hold.command_of(&mut cmd, load_bin, ns, &log, nofile)?;
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

/// The meshed variant: what idle connections through the HBONE pair add to each sidecar.
#[derive(Debug, Clone, Copy)]
pub struct Meshed {
    /// The client pod's sidecar.
    pub client: Idle,
    /// The server pod's sidecar.
    pub server: Idle,
}

/// Up to `wanted` connections from the client pod to a hold server in the server pod,
/// through both pods' sidecars in eBPF mode with the HBONE tunnel between them, held idle.
/// Counts only if both sidecars' reports list every connection (warm-up included) over
/// mTLS with the peer's identity.
pub fn measure_meshed(
    sidecar: &Path,
    load_bin: &Path,
    pods: &Pods,
    mesh: &Mesh,
    wanted: usize,
    raw: &Path,
) -> Result<Meshed> {
    let nofile = hard_nofile()?;
    let count = meshed_connections_for(nofile, wanted);
    if count < wanted / 2 {
        bail!(
            "the hard RLIMIT_NOFILE ({nofile}) allows only {count} meshed idle connections: \
             raise it for a meaningful figure"
        );
    }
    let dir = raw.join("idle-meshed");
    fs::create_dir_all(&dir)?;
    let (go, done) = (dir.join("go"), dir.join("done"));
    for f in [&go, &done] {
        let _ = fs::remove_file(f);
    }
    let target = SocketAddr::new(POD_SERVER_IP.parse()?, HOLD_PORT);
    let mut hold_server = Command::new(load_bin);
    hold_server
        .args(["bench-hold-serve", "--listen", &target.to_string()])
        .args(["--count", &count.to_string()])
        .args(["--warmup", &WARMUP.to_string()])
        .stderr(fs::File::create(dir.join("hold-server.log"))?);
    let mut hold_server = Server::start(hold_server, &pods.server)?;
    // Room for every connection and the warm-up's, whatever the descriptor limit's default.
    let cap = (count + WARMUP).to_string();
    let peer = mesh.start_server_with(
        Mode::EbpfMtls,
        &dir.join("server"),
        &["--max-connections", &cap],
        Some(nofile),
    )?;
    let client_report = dir.join("client.sidecar.json");
    let log = dir.join("client.sidecar.log");
    let mut cmd = Command::new(sidecar);
    cmd.args(["run", "--mode", "ebpf"])
        .args(mesh.client_args())
        .args(["--proxy-port", &MESH_PROXY_PORT.to_string()])
        .args(["--max-connections", &cap])
        .arg("--report")
        .arg(&client_report);
    let hold = HoldArgs {
        listen: target,
        remote: true,
        count,
        warmup: WARMUP,
        go: go.clone(),
        done: done.clone(),
    };
    hold.command_of(&mut cmd, load_bin, &pods.client, &log, nofile)?;
    let mut child = cmd
        .spawn()
        .context("starting the client pod's sidecar for the meshed idle connections")?;
    let (pid, peer_pid) = (child.id(), peer.pid());
    let mut lines = BufReader::new(child.stdout.take().context("the command's stdout")?);
    let measured = (|| {
        expect_line(&mut lines, "warm", &log)?;
        let before = (settled_rss(pid)?, settled_rss(peer_pid)?);
        fs::write(&go, b"")?;
        let held = expect_line(&mut lines, "held", &log)?;
        if held != format!("held {count}") {
            bail!("the command said {held:?}, not held {count}");
        }
        let with = (settled_rss(pid)?, settled_rss(peer_pid)?);
        let idle = |before_kib, with_kib| Idle {
            connections: count,
            before_kib,
            with_kib,
        };
        Ok(Meshed {
            client: idle(before.0, with.0),
            server: idle(before.1, with.1),
        })
    })();
    let _ = fs::write(&done, b"");
    let status = wait_bounded(&mut child, STEP_LIMIT)?;
    // The hold server ends once every connection it kept has been closed by the client.
    let served = hold_server.wait(STEP_LIMIT);
    let server_report = peer.stop()?;
    let meshed = measured?;
    if !status.success() {
        bail!("sidecar run exited with {status} (log: {})", log.display());
    }
    served.context("the hold server in the server pod")?;
    let tunnelled = count + WARMUP;
    check_carried(
        &client_report,
        "outbound",
        "proxy",
        tunnelled,
        Some(("dst_identity", mesh::SERVER_ID)),
    )?;
    check_carried(
        &server_report,
        "inbound",
        "proxy",
        tunnelled,
        Some(("src_identity", mesh::CLIENT_ID)),
    )?;
    Ok(meshed)
}

/// Meshed connections each process can hold under `nofile`: one descriptor per connection
/// (and one per pooled HBONE connection, at most one per 100 streams), less the headroom.
fn meshed_connections_for(nofile: u64, wanted: usize) -> usize {
    (nofile.saturating_sub(FD_HEADROOM) * 100 / 101).min(wanted as u64) as usize
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
pub fn set_nofile(limit: u64) -> std::io::Result<()> {
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
        assert_eq!(meshed_connections_for(20_000, CONNECTIONS), CONNECTIONS);
        assert_eq!(meshed_connections_for(20_000, 500), 500);
        assert_eq!(meshed_connections_for(10_000, CONNECTIONS), 8_887);
    }
}

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// Where to serve the connections (and to connect them to).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Another process serves `listen` (`bench-hold-serve`, in the server pod): only
    /// connect.
    #[arg(long)]
    pub remote: bool,
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

impl HoldArgs {
    /// Makes `sidecar_run` (a `sidecar run` with its options) run this as its command, in
    /// `ns` on the client's CPU, with its steps on a pipe, its log in `log`, and both
    /// processes' descriptor limits at `nofile`.
    fn command_of(
        &self,
        sidecar_run: &mut Command,
        load_bin: &Path,
        ns: &Netns,
        log: &Path,
        nofile: u64,
    ) -> Result<()> {
        sidecar_run
            .arg("--")
            .arg(load_bin)
            .args(["bench-hold", "--listen", &self.listen.to_string()])
            .args(self.remote.then_some("--remote"))
            .args(["--count", &self.count.to_string()])
            .args(["--warmup", &self.warmup.to_string()])
            .arg("--go")
            .arg(&self.go)
            .arg("--done")
            .arg(&self.done)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log)?);
        ns.enter(sidecar_run)?;
        Side::Client.pin(sidecar_run);
        // SAFETY: `set_nofile` only calls setrlimit(2), which is async-signal-safe; raising
        // the soft limit to the hard one needs no privilege.
        unsafe {
            sidecar_run.pre_exec(move || set_nofile(nofile));
        }
        Ok(())
    }
}

/// The command side: serve, warm up, say `warm`, wait for `go`, open and hold `count`
/// connections, say `held N`, wait for `done`.
pub fn hold(args: &HoldArgs) -> Result<()> {
    set_nofile(hard_nofile()?)?;
    let (warmup, count) = (args.warmup, args.count);
    let server = (!args.remote).then(|| {
        let listener =
            TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
        Ok::<_, anyhow::Error>(thread::spawn(move || {
            serve(&listener, warmup, count).map(drop)
        }))
    });
    let server = server.transpose()?;
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
    match server {
        Some(server) => server
            .join()
            .map_err(|_| anyhow::anyhow!("the hold server panicked"))?,
        None => Ok(()),
    }
}

#[derive(clap::Args, Debug)]
pub struct HoldServeArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    /// Connections to keep after the warm-up ones.
    #[arg(long)]
    pub count: usize,
    /// Connections answered and closed first.
    #[arg(long)]
    pub warmup: usize,
}

/// The meshed variant's server: says `ready`, answers `warmup` connections (closed once
/// their client closed) and keeps the `count` next, each closed once its client closes it;
/// then exits.
pub fn hold_serve(args: &HoldServeArgs) -> Result<()> {
    set_nofile(hard_nofile()?)?;
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    say("ready")?;
    for mut c in serve(&listener, args.warmup, args.count)? {
        c.set_read_timeout(Some(STEP_LIMIT))?;
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .context("a held connection's close")?;
    }
    Ok(())
}

/// Answers each accepted connection's one 64 B message, in turn: the `warmup` first ones
/// are closed once their client has (or the sidecar would keep them open, half-closed),
/// the `count` next kept open and returned.
fn serve(listener: &TcpListener, warmup: usize, count: usize) -> Result<Vec<TcpStream>> {
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
    Ok(kept)
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
