//! `cargo xtask build-ebpf`: the eBPF object that the `sidecar` binary embeds.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{step, toolchain};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Build the test-only broken program (the verifier must reject it), into a separate
    /// target directory so the normal object is untouched.
    #[arg(long)]
    pub broken_for_tests: bool,
    /// Build the test-only object whose COOKIE_ORIG_DST evicts nothing (a test fills it to
    /// make the connect hook's insert fail), into a separate target directory.
    #[arg(long, conflicts_with = "broken_for_tests")]
    pub fillable_map_for_tests: bool,
}

/// Where, under the target directory, the fillable-map object is built (sidecar-user's
/// `build.rs` looks there too).
pub const FILLABLE_MAP_DIR: &str = "fillable-map-ebpf";

/// Root of the workspace (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// `$CARGO_TARGET_DIR`, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the object and returns its path.
pub fn build(opts: &Options) -> Result<PathBuf> {
    toolchain::ensure_all()?;
    let root = workspace_root();
    let target_dir = target_dir();
    let target_dir = if opts.broken_for_tests {
        target_dir.join("broken-ebpf")
    } else if opts.fillable_map_for_tests {
        target_dir.join(FILLABLE_MAP_DIR)
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
    if opts.fillable_map_for_tests {
        cmd.args(["--features", "fillable-map-for-tests"]);
    }
    crate::run(&mut cmd)?;
    let object = target_dir.join("bpfel-unknown-none/release/sidecar-ebpf");
    step(&format!("eBPF object: {}", object.display()));
    Ok(object)
}

/// The name `sidecar-tests` looks for, next to `sidecar`, for the sidecar that embeds the
/// fillable-map object.
pub const FILLABLE_MAP_SIDECAR: &str = "sidecar-fillable-map";

/// Builds the sidecar against the fillable-map object (`--fillable-map-for-tests`) and copies
/// it to `profile_dir/sidecar-fillable-map`. `build` is the caller's own `cargo build` with
/// its package selection, target and environment, so the dependencies resolve to the same
/// features and only sidecar-user compiles again (a separate target directory would rebuild
/// them all). That build leaves the variant at `profile_dir/sidecar`: the caller runs its
/// normal build afterwards, which links the normal one back (cargo re-links fresh outputs).
pub fn build_fillable_map_sidecar(
    mut build: Command,
    profile_dir: &std::path::Path,
) -> Result<PathBuf> {
    let object = self::build(&Options {
        fillable_map_for_tests: true,
        ..Default::default()
    })?;
    step("building the sidecar with the fillable-map eBPF object");
    build
        .args(["--bin", "sidecar", "--features"])
        .arg("sidecar-user/fillable-map-for-tests")
        .env("SIDECAR_EBPF_OBJECT", &object);
    crate::run(&mut build)?;
    let copy = profile_dir.join(FILLABLE_MAP_SIDECAR);
    std::fs::copy(profile_dir.join("sidecar"), &copy)
        .with_context(|| format!("copying the fillable-map sidecar to {}", copy.display()))?;
    Ok(copy)
}
