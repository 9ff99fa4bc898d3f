//! `cargo xtask sanitize`: the unsafe code of the user half under Miri and AddressSanitizer
//! (`cargo xtask test` runs it). What each covers, and what neither can, is in
//! docs/testing.md ("Unsafe code, Miri and sanitizers").
//!
//! - Miri interprets the tests whose unsafe is pure Rust: `sidecar-common` (byte views of
//!   the types shared with the kernel, the verifier-friendly volatile read) and the user-half
//!   tests listed in [`MIRI_USER_TESTS`] (ring-buffer event decoding, and the parsers around
//!   it). It cannot run code that calls the kernel (syscalls through libc are foreign calls).
//! - AddressSanitizer runs every unit test of the `sidecar` library — those are the ones
//!   that call the syscall wrappers (getsockopt TCP_INFO / SO_NETNS_COOKIE /
//!   SO_ORIGINAL_DST, mount, kill, access, listen) on real sockets and files — with std
//!   rebuilt instrumented (`-Z build-std`), in its own target directory.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, run, step, toolchain::NIGHTLY};

/// Filters of the `sidecar` library tests that Miri runs (no syscalls, no C crypto).
const MIRI_USER_TESTS: &[&str] = &[
    "deny_events",
    "tunnel::request",
    "cidr::",
    "admin::http::client",
    "policy::rules",
];

#[derive(clap::Args, Default)]
pub struct Options {
    /// Only Miri (skip the AddressSanitizer build, the slow half).
    #[arg(long)]
    pub miri_only: bool,
}

fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{NIGHTLY}"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .current_dir(build_ebpf::workspace_root());
    c
}

fn ensure_components() -> Result<()> {
    step("making sure the nightly has miri and rust-src");
    run(Command::new("rustup").args([
        "component",
        "add",
        "miri",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))
}

pub fn sanitize(opts: &Options) -> Result<()> {
    let object = build_ebpf::build(&build_ebpf::Options::default())?;
    ensure_components()?;
    step("Miri: sidecar-common");
    run(nightly_cargo().args(["miri", "test", "--locked", "-p", "sidecar-common"]))?;
    step("Miri: the pure-Rust unsafe of the sidecar library");
    run(nightly_cargo()
        .args([
            "miri",
            "test",
            "--locked",
            "-p",
            "sidecar-user",
            "--lib",
            "--",
        ])
        .args(MIRI_USER_TESTS)
        .env("SIDECAR_EBPF_OBJECT", &object))?;
    if opts.miri_only {
        return Ok(());
    }
    step("AddressSanitizer: the sidecar library's unit tests (syscall wrappers)");
    let target_dir = build_ebpf::workspace_root().join("target/sanitizer");
    run(nightly_cargo()
        .args([
            "test",
            "--locked",
            "-Zbuild-std",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .args(["-p", "sidecar-user", "--lib"])
        .env("RUSTFLAGS", "-Zsanitizer=address")
        .env("RUSTDOCFLAGS", "-Zsanitizer=address")
        // Deliberate leaks only (a test that simulates a crash with `mem::forget`).
        .env(
            "LSAN_OPTIONS",
            format!(
                "suppressions={}",
                build_ebpf::workspace_root()
                    .join("xtask/lsan-suppressions.txt")
                    .display()
            ),
        )
        .env("CARGO_TARGET_DIR", target_dir)
        .env("SIDECAR_EBPF_OBJECT", &object))
}
