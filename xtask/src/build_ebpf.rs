//! `cargo xtask build-ebpf`: the eBPF object that the `sidecar` binary embeds.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{step, toolchain};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Build the test-only broken program (the verifier must reject it), into a separate
    /// target directory so the normal object is untouched.
    #[arg(long)]
    pub broken_for_tests: bool,
}

/// Root of the workspace (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// Builds the object and returns its path.
pub fn build(opts: &Options) -> Result<PathBuf> {
    toolchain::ensure_all()?;
    let root = workspace_root();
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root.join("target"),
    };
    let target_dir = if opts.broken_for_tests {
        target_dir.join("broken-ebpf")
    } else {
        target_dir
    };
    step("building the eBPF object (nightly, bpfel-unknown-none, -Z build-std=core)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .arg(format!("+{}", toolchain::NIGHTLY))
        .args(["build", "--locked", "--release", "-p", "sidecar-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // The stable toolchain's environment must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    if opts.broken_for_tests {
        cmd.args(["--features", "broken-for-tests"]);
    }
    crate::run(&mut cmd)?;
    let object = target_dir.join("bpfel-unknown-none/release/sidecar-ebpf");
    step(&format!("eBPF object: {}", object.display()));
    Ok(object)
}
