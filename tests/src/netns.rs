//! Two "pods" for tests that cross a network: network namespaces joined by a veth pair, with
//! addresses only inside them and no route out of the machine. Removed on drop, also when
//! the test fails.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use crate::host::output_with_timeout;

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
        let id = std::process::id() % 100_000;
        let tag = match self.a.addr {
            IpAddr::V4(v4) => v4.octets()[2],
            IpAddr::V6(_) => 0,
        };
        format!("{}A{tag}x{}", self.prefix, id % 1000)
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
