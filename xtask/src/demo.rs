//! `cargo xtask demo`: the newcomer's first run. Builds the release binary, serves a small
//! page on 127.0.0.1 from this process, and runs `sidecar run -- curl` against it, so the
//! interception, the fast path and the exit summary can be seen without any setup.

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
    step(&format!("running: sidecar run -- curl -sS {url}"));
    let sidecar = build_ebpf::workspace_root().join("target/release/sidecar");
    let status = Command::new(sidecar)
        .args(["run", "--", "curl", "-sS", &url])
        .status()
        .context("starting the sidecar")?;
    if !status.success() {
        bail!(
            "the demo failed ({status}); `sudo target/release/sidecar probe` says what is missing"
        );
    }
    Ok(())
}
