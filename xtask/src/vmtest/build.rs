//! The guest's binaries: the workspace built static for musl (the `sidecar` with the eBPF
//! object embedded, the test helpers, the test executables, and this xtask as `/init`).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, cargo, step};

pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// What the guest runs.
pub struct Binaries {
    /// This xtask, static: the guest's `/init`.
    pub init: PathBuf,
    /// `target/<musl>/debug/`: the sidecar and the helpers the tests find by path.
    pub profile_dir: PathBuf,
    /// The integration test executables.
    pub tests: Vec<PathBuf>,
}

pub fn build() -> Result<Binaries> {
    let object = build_ebpf::build(&build_ebpf::Options::default())?;
    ensure_target()?;
    let cc = which("musl-gcc").context(
        "musl-gcc is missing (ring's C code needs it for the musl target): apt-get install musl-tools",
    )?;
    let with_env = |cmd: &mut Command| {
        cmd.current_dir(build_ebpf::workspace_root())
            .env("SIDECAR_EBPF_OBJECT", &object)
            .env(format!("CC_{}", TARGET.replace('-', "_")), &cc);
    };
    step(&format!("building the workspace for {TARGET} (static)"));
    let mut cmd = cargo();
    cmd.args(["build", "--locked", "--target", TARGET]);
    cmd.args(["-p", "sidecar-user", "-p", "sidecar-tests", "-p", "xtask"]);
    with_env(&mut cmd);
    crate::run(&mut cmd)?;

    step(&format!("building the integration tests for {TARGET}"));
    let mut cmd = cargo();
    cmd.args(["test", "--no-run", "--locked", "--target", TARGET]);
    cmd.args(["-p", "sidecar-tests", "--tests", "--message-format=json"]);
    with_env(&mut cmd);
    let out = crate::output(&mut cmd)?;
    let mut tests = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["profile"]["test"].as_bool() == Some(true)
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, msg["executable"].as_str()) {
            tests.push(PathBuf::from(exe));
        }
    }
    if tests.is_empty() {
        bail!("cargo test --no-run listed no integration test executables");
    }
    tests.sort();
    let profile_dir = target_dir().join(TARGET).join("debug");
    Ok(Binaries {
        init: profile_dir.join("xtask"),
        profile_dir,
        tests,
    })
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| build_ebpf::workspace_root().join("target"))
}

/// `rustup target add` when the musl standard library is missing.
fn ensure_target() -> Result<()> {
    let installed = crate::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        step(&format!("rustup target add {TARGET}"));
        crate::run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    Ok(())
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|p| p.is_file())
}
