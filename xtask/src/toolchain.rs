//! Makes sure the nightly toolchain, its rust-src, and a matching bpf-linker are installed.
//! Every step first checks, so running it again does nothing.

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{output, run, step};

/// The toolchain that builds the eBPF object (`-Z build-std` needs nightly).
pub const NIGHTLY: &str = "nightly";

pub fn ensure_all() -> Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn ensure_nightly() -> Result<()> {
    let list = output(rustup().args(["toolchain", "list"]))?;
    if list.lines().any(|l| l.starts_with(&format!("{NIGHTLY}-"))) {
        return Ok(());
    }
    step("installing the nightly toolchain (needed for -Z build-std)");
    run(rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

fn ensure_rust_src() -> Result<()> {
    let installed =
        output(rustup().args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain");
    run(rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The nightly's sysroot, whose `lib/` holds its own `libLLVM.so.*-rust-*`.
pub fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

/// The LLVM major version the nightly was built with (`LLVM version: 22.1.4` → 22).
fn nightly_llvm_major() -> Result<u32> {
    let out = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("unexpected LLVM version {version:?}"))
}

fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin")
}

/// bpf-linker links the nightly's libLLVM dynamically; rustup puts the nightly's `lib/` on the
/// library path when rustc runs it. It is usable when it starts with that same path.
fn bpf_linker_works(bin: &Path, sysroot: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .env("LD_LIBRARY_PATH", sysroot.join("lib"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn ensure_bpf_linker() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let bin = cargo_bin_dir().join("bpf-linker");
    if bin.exists() && bpf_linker_works(&bin, &sysroot) {
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    let libllvm = std::fs::read_dir(sysroot.join("lib"))
        .with_context(|| format!("reading {}", sysroot.join("lib").display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}/lib", sysroot.display()))?;

    // A prefix whose lib/libLLVM.so is the nightly's own LLVM: the system LLVM is too old.
    let prefix = std::env::temp_dir().join(format!("sidecar-llvm-prefix-{major}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;

    step(&format!(
        "building bpf-linker against the nightly's LLVM {major} ({}); this takes a few minutes",
        libllvm.display()
    ));
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_works(&bin, &sysroot) {
        bail!(
            "bpf-linker was installed at {} but does not start with the nightly's libLLVM; \
             remove it and run `cargo xtask build-ebpf` again",
            bin.display()
        );
    }
    Ok(())
}
