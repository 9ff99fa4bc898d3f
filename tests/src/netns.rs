//! Two "pods" for tests that cross a network: network namespaces joined by a veth pair, with
//! addresses only inside them and no route out of the machine. Removed on drop, also when
//! the test fails.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use crate::host::{self, output_with_timeout};

const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// `a` at 10.203.N.1, `b` at 10.203.N.2, /30 on the veth pair; loopback up in both.
pub struct PodPair {
    pub a: Netns,
    pub b: Netns,
    /// Prefix of the namespace and veth names.
    prefix: &'static str,
}

pub struct Netns {
    pub name: String,
    pub addr: IpAddr,
}

impl Netns {
    /// `nsenter` arguments that run a command in this namespace (network only: the mount
    /// namespace, hence cgroupfs and bpffs, stays the host's).
    pub fn enter(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", self.path().display())]
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `GET path` against an HTTP server at `addr` inside this namespace (the admin endpoint
    /// of a sidecar in a pod): a thread enters the namespace, so the test process itself
    /// stays where it is. Returns the whole response, head and body (5 s connect and read
    /// timeouts; panics on failure).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> String {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let ns_path = self.path();
        let ns =
            std::fs::File::open(&ns_path).unwrap_or_else(|e| panic!("{}: {e}", ns_path.display()));
        let path = path.to_string();
        std::thread::spawn(move || {
            // SAFETY: setns on an fd we own, for this thread only (it ends right after).
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let timeout = Duration::from_secs(5);
            let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
                .unwrap_or_else(|e| panic!("admin {addr}: {e}"));
            s.set_read_timeout(Some(timeout)).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut raw = String::new();
            s.read_to_string(&mut raw).unwrap();
            raw
        })
        .join()
        .expect("the admin request thread panicked")
    }

    /// Runs `f` on a thread that entered this namespace (the test process stays where it
    /// is; sockets made there stay in the namespace).
    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd;
        let ns_path = self.path();
        let ns =
            std::fs::File::open(&ns_path).unwrap_or_else(|e| panic!("{}: {e}", ns_path.display()));
        std::thread::spawn(move || {
            // SAFETY: setns on an fd we own, for this thread only (it ends right after).
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }

    /// IPv4 TCP sockets of this namespace on local `port` in `state` (`/proc` net/tcp's hex
    /// code: `0A` listening, `01` established).
    pub fn tcp_sockets(&self, port: u16, state: &str) -> usize {
        let table = self.inside(|| {
            std::fs::read_to_string("/proc/thread-self/net/tcp").expect("reading net/tcp")
        });
        // `sl local_address rem_address st …`, the local address as HEXIP:HEXPORT.
        let local = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let mut fields = l.split_whitespace().skip(1);
                let (addr, st) = (fields.next(), fields.nth(1));
                addr.is_some_and(|a| a.ends_with(&local)) && st == Some(state)
            })
            .count()
    }

    /// Whether a TCP socket listens on `port` (any address, IPv4) in this namespace.
    pub fn listens_on(&self, port: u16) -> bool {
        self.tcp_sockets(port, "0A") > 0
    }

    /// A listener on `addr` in this namespace that never accepts: a peer's connect
    /// completes (the kernel queues it) and then nothing ever answers. Closed on drop (the
    /// queued connections are reset).
    pub fn listen_silently(&self, addr: SocketAddr) -> std::net::TcpListener {
        self.inside(move || {
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"))
        })
    }

    /// `sidecar-testclient serve` on `addr` in this namespace, with no sidecar of ours around
    /// it (a pod's localhost-only service, or an app behind another mesh's proxy). Returns
    /// once it listens.
    pub fn serve(&self, addr: SocketAddr) -> PodServer {
        let enter = self.enter();
        let mut child = Command::new(&enter[0])
            .args(&enter[1..])
            .arg(crate::testclient_bin())
            .args(["serve", &format!("--addr={addr}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the pod's echo server");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut first = String::new();
        lines.read_line(&mut first).expect("reading READY");
        assert_eq!(
            first.trim(),
            "READY",
            "echo server in {} on {addr}",
            self.name
        );
        PodServer { child, lines }
    }

    /// Runs a command in the namespace and returns its output (bounded).
    pub fn run(&self, argv: &[&str]) -> std::process::Output {
        let enter = self.enter();
        output_with_timeout(
            Command::new(&enter[0]).args(&enter[1..]).args(argv),
            IP_TIMEOUT,
        )
    }
}

fn ip(args: &[&str]) {
    let out = output_with_timeout(Command::new("ip").args(args), IP_TIMEOUT);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PodPair {
    /// `tag` (0–255) keeps concurrent pairs apart in names and addresses.
    pub fn create(tag: u8) -> Self {
        Self::create_in("sct", 203, tag)
    }

    /// Like [`PodPair::create`], with names starting `<prefix>-` (3 letters) and addresses
    /// 10.`octet`.`tag`.1/2, for suites that own another name prefix and address block.
    pub fn create_in(prefix: &'static str, octet: u8, tag: u8) -> Self {
        let id = std::process::id() % 100_000;
        let (na, nb) = (
            format!("{prefix}-a{tag}-{id}"),
            format!("{prefix}-b{tag}-{id}"),
        );
        let (va, vb) = (
            format!("{prefix}A{tag}x{}", id % 1000),
            format!("{prefix}B{tag}x{}", id % 1000),
        );
        let pair = Self {
            a: Netns {
                name: na.clone(),
                addr: IpAddr::V4(Ipv4Addr::new(10, octet, tag, 1)),
            },
            b: Netns {
                name: nb.clone(),
                addr: IpAddr::V4(Ipv4Addr::new(10, octet, tag, 2)),
            },
            prefix,
        };
        // From here on, Drop removes whatever was created.
        ip(&["netns", "add", &na]);
        ip(&["netns", "add", &nb]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &na]);
        ip(&["link", "set", &vb, "netns", &nb]);
        for (ns, dev, addr) in [(&na, &va, &pair.a.addr), (&nb, &vb, &pair.b.addr)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Name of the veth end inside `a` (for captures).
    pub fn veth_a(&self) -> String {
        self.veth('A')
    }

    /// Name of the veth end inside `b`.
    pub fn veth_b(&self) -> String {
        self.veth('B')
    }

    fn veth(&self, side: char) -> String {
        let id = std::process::id() % 100_000;
        let tag = match self.a.addr {
            IpAddr::V4(v4) => v4.octets()[2],
            IpAddr::V6(_) => 0,
        };
        format!("{}{side}{tag}x{}", self.prefix, id % 1000)
    }
}

impl Drop for PodPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and with it the pair.
        for ns in [&self.a.name, &self.b.name] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// An echo server started by [`Netns::serve`]; killed when dropped.
pub struct PodServer {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl PodServer {
    /// Stops the server; returns every connection it accepted (one JSON line each).
    pub fn stop(mut self) -> Vec<String> {
        drop(self.child.stdin.take());
        let _ = host::wait_child(&mut self.child, Duration::from_secs(5));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut lines = Vec::new();
        let mut line = String::new();
        while self.lines.read_line(&mut line).is_ok_and(|n| n > 0) {
            lines.push(std::mem::take(&mut line));
        }
        lines
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
