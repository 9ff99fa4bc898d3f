//! `cargo xtask demo`: the newcomer's first run, in two acts.
//!
//! 1. One sidecar: a small page served on 127.0.0.1 by this process, fetched with
//!    `sidecar run -- curl`: interception, the kernel fast path and the exit summary.
//! 2. Two "pods" (network namespaces joined by a veth pair, no route out), each with its
//!    sidecar: curl in pod A fetches a page twice from a server in pod B over HBONE (mTLS);
//!    both sidecars print the verified SPIFFE identity of the other, and that the second
//!    connection rode the first one's tunnel connection. Certificates are minted on the spot
//!    with `sidecar cert`; the namespaces and certificates are removed afterwards.

use std::{
    io::{Read, Write},
    net::TcpListener,
    process::Command,
    thread,
};

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, cargo, run, step};

pub fn demo() -> Result<()> {
    build_ebpf::build(&build_ebpf::Options::default())?;
    step("building the sidecar (release)");
    run(cargo().args(["build", "--release", "--locked", "-p", "sidecar-user"]))?;

    let listener = TcpListener::bind("127.0.0.1:0").context("binding the demo server")?;
    let port = listener.local_addr()?.port();
    thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            let body = "hello from a server the sidecar did not touch\n";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });

    let url = format!("http://127.0.0.1:{port}/");
    step(&format!("act 1 — running: sidecar run -- curl -sS {url}"));
    let sidecar = build_ebpf::workspace_root().join("target/release/sidecar");
    let status = Command::new(&sidecar)
        .args(["run", "--", "curl", "-sS", &url])
        .status()
        .context("starting the sidecar")?;
    if !status.success() {
        bail!(
            "the demo failed ({status}); `sudo target/release/sidecar probe` says what is missing"
        );
    }
    two_pods_over_mtls(&sidecar)
}

/// Names and addresses of the demo's pods.
const POD_A: &str = "sidecar-demo-a";
const POD_B: &str = "sidecar-demo-b";
const ADDR_A: &str = "10.250.0.1";
const ADDR_B: &str = "10.250.0.2";

/// The demo's namespaces and certificates; removed on drop, also when the demo fails.
struct Pods {
    certs: std::path::PathBuf,
}

impl Pods {
    fn create() -> Result<Self> {
        let certs = std::env::temp_dir().join(format!("sidecar-demo-{}", std::process::id()));
        let pods = Self { certs };
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["netns", "add", POD_A])?;
        ip(&["netns", "add", POD_B])?;
        ip(&[
            "link", "add", "sdemo-a", "type", "veth", "peer", "name", "sdemo-b",
        ])?;
        ip(&["link", "set", "sdemo-a", "netns", POD_A])?;
        ip(&["link", "set", "sdemo-b", "netns", POD_B])?;
        for (ns, dev, addr) in [(POD_A, "sdemo-a", ADDR_A), (POD_B, "sdemo-b", ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pods)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in [POD_A, POD_B] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

fn in_pod(ns: &str, sidecar: &std::path::Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg(sidecar);
    cmd
}

fn two_pods_over_mtls(sidecar: &std::path::Path) -> Result<()> {
    step(
        "act 2 — two pods, two sidecars, mTLS over HBONE (namespaces sidecar-demo-a/b, \
         10.250.0.0/30)",
    );
    let pods = Pods::create()?;
    let dir = |name: &str| pods.certs.join(name).display().to_string();
    run(Command::new(sidecar).args([
        "cert",
        "ca",
        "--dir",
        &dir("ca"),
        "--trust-domain",
        "demo.local",
    ]))?;
    for (who, out) in [("client", "a"), ("server", "b")] {
        run(Command::new(sidecar).args([
            "cert",
            "issue",
            "--ca-dir",
            &dir("ca"),
            "--spiffe-id",
            &format!("spiffe://demo.local/ns/demo/sa/{who}"),
            "--out",
            &dir(out),
        ]))?;
    }

    step("pod B: sidecar run -- python3 -m http.server 8080");
    let mut server = in_pod(POD_B, sidecar)
        .args([
            "run",
            "--tls-dir",
            &dir("b"),
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
        ])
        .spawn()
        .context("starting pod B's sidecar")?;
    // Wait for the server app to listen (bounded).
    let ready = (0..100).any(|_| {
        thread::sleep(std::time::Duration::from_millis(100));
        Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{POD_B}"),
                "ss",
                "-Htln",
                "sport = :8080",
            ])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    });
    let url = format!("http://{ADDR_B}:8080/");
    let result = if ready {
        step(&format!(
            "pod A: sidecar run --mesh-cidrs {ADDR_B}/32 -- curl {url}"
        ));
        in_pod(POD_A, sidecar)
            .args([
                "run",
                "--tls-dir",
                &dir("a"),
                "--no-inbound",
                "--mesh-cidrs",
                &format!("{ADDR_B}/32"),
            ])
            // Two requests, two connections: the second rides the first one's HBONE
            // connection (the summaries say "reused tunnel").
            .args([
                "--",
                "sh",
                "-c",
                &format!(
                    "for n in 1 2; do curl -sS -o /dev/null -w \"pod A got HTTP %{{http_code}} \
                     from pod B (connection $n)\\n\" {url} || exit 1; done"
                ),
            ])
            .status()
            .context("starting pod A's sidecar")
    } else {
        Err(anyhow::anyhow!(
            "pod B's server did not start listening within 10 s"
        ))
    };
    step("stopping pod B (its sidecar prints what it saw)");
    // SIGINT: the sidecar stops the server, drains, prints its summary and cleans up.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGINT) };
    let _ = server.wait();
    let status = result?;
    if !status.success() {
        bail!("pod A's request failed ({status})");
    }
    Ok(())
}
