//! `cargo xtask fuzz`: runs every cargo-fuzz target (network bytes: the HBONE server's HTTP/2;
//! configuration: policy file, credentials PEM, CLI values; agent registration requests, and
//! the agent's handling of them against its registry)
//! for a bounded time (installing cargo-fuzz when missing). `cargo xtask test` runs it briefly
//! so the targets cannot rot; crashes found become regression tests beside the parser.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{build_ebpf::workspace_root, output, run, step, toolchain::NIGHTLY};

/// Fuzz crates (relative to the workspace root) and their targets.
const TARGETS: &[(&str, &str)] = &[
    ("sidecar-user/fuzz", "hbone_server"),
    ("sidecar-user/fuzz", "policy"),
    ("sidecar-user/fuzz", "tls_pem"),
    ("sidecar-user/fuzz", "config"),
    ("sidecar-user/fuzz", "agent_protocol"),
    ("sidecar-user/fuzz", "agent_requests"),
];

#[derive(clap::Args)]
pub struct Options {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = output(Command::new("cargo").args(["install", "--list"]))?;
    if installed.lines().any(|l| l.starts_with("cargo-fuzz ")) {
        return Ok(());
    }
    step("installing cargo-fuzz (once)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

pub fn fuzz(opts: &Options) -> Result<()> {
    ensure_cargo_fuzz()?;
    for (dir, target) in TARGETS {
        let fuzz_dir = workspace_root().join(dir);
        step(&format!("fuzzing {target} for {} s", opts.seconds));
        run(Command::new("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args(["fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .current_dir(fuzz_dir.parent().context("fuzz dir has a parent")?)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"))?;
    }
    Ok(())
}
