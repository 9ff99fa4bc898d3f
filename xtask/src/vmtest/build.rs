//! The guest's binaries: the workspace built static for musl (the `sidecar` with the eBPF
//! object embedded, the test helpers, the test executables, and this xtask as `/init`).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

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
    let profile_dir = build_ebpf::target_dir().join(TARGET).join("debug");
    let build_cmd = || {
        let mut cmd = cargo();
        cmd.args(["build", "--locked", "--target", TARGET]);
        cmd.args(["-p", "sidecar-user", "-p", "sidecar-tests", "-p", "xtask"]);
        with_env(&mut cmd);
        cmd
    };
    // First: its build leaves the variant where the normal `sidecar` goes, until the next.
    // The copy sits among the helpers, so the guests get it too.
    build_ebpf::build_fillable_map_sidecar(build_cmd(), &profile_dir)?;
    step(&format!("building the workspace for {TARGET} (static)"));
    crate::run(&mut build_cmd())?;

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
    Ok(Binaries {
        init: profile_dir.join("xtask"),
        profile_dir,
        tests,
    })
}

/// The sidecar built against the test-only broken eBPF object (the verifier rejects it), in
/// a target directory of its own so the normal build stays as it is. Returns its path.
pub fn build_broken_sidecar(vm_dir: &Path) -> Result<PathBuf> {
    let object = build_ebpf::build(&build_ebpf::Options {
        broken_for_tests: true,
        ..Default::default()
    })?;
    let cc = which("musl-gcc").context("musl-gcc is missing: apt-get install musl-tools")?;
    let target_dir = vm_dir.join("broken-build");
    step(&format!(
        "building the sidecar with the broken eBPF object ({})",
        target_dir.display()
    ));
    let mut cmd = cargo();
    cmd.args(["build", "--locked", "--target", TARGET])
        .args(["-p", "sidecar-user", "--bin", "sidecar"])
        .current_dir(build_ebpf::workspace_root())
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("SIDECAR_EBPF_OBJECT", &object)
        .env(format!("CC_{}", TARGET.replace('-', "_")), &cc);
    crate::run(&mut cmd)?;
    Ok(target_dir.join(TARGET).join("debug/sidecar"))
}

/// The guest's copies of the built binaries, without debug info (`strip --strip-debug`
/// keeps the symbols, so backtraces still name functions): about a tenth of the size,
/// which is what the initramfs, the guest's RAM and the boot time pay for.
pub struct Prepared<'a> {
    pub bins: &'a Binaries,
    /// Host path of a built binary → its stripped copy.
    stripped: BTreeMap<PathBuf, PathBuf>,
}

impl<'a> Prepared<'a> {
    pub fn new(bins: &'a Binaries, cache: &Path) -> Result<Self> {
        fs::create_dir_all(cache)?;
        let mut all = vec![bins.init.clone()];
        all.extend(bins.helpers()?);
        all.extend(bins.tests.iter().cloned());
        let mut stripped = BTreeMap::new();
        for path in all {
            let copy = strip_copy(&path, cache)?;
            stripped.insert(path, copy);
        }
        Ok(Self { bins, stripped })
    }

    /// The file to pack for the built binary at `host` (its stripped copy).
    pub fn file(&self, host: &Path) -> Result<PathBuf> {
        self.stripped
            .get(host)
            .cloned()
            .with_context(|| format!("{} was not prepared for the guest", host.display()))
    }
}

impl Binaries {
    /// The executables next to the sidecar (the sidecar itself and the test helpers the
    /// tests find by path), but not the xtask (the guest's `/init`).
    pub fn helpers(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.profile_dir)? {
            let path = entry?.path();
            let executable = {
                use std::os::unix::fs::PermissionsExt;
                fs::metadata(&path)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            };
            let is_exe = executable
                && path.extension().is_none()
                && path
                    .file_name()
                    .is_some_and(|n| n != "xtask" && !n.to_string_lossy().starts_with('.'));
            if is_exe {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// `strip --strip-debug` into `cache/<name>`, redone only when the binary is newer.
pub fn strip_copy(path: &Path, cache: &Path) -> Result<PathBuf> {
    fs::create_dir_all(cache)?;
    let name = path.file_name().context("binary name")?;
    // Test executables carry a hash in their name; helpers do not, but live in one directory.
    let out = cache.join(name);
    let fresh = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(src), Some(dst)) = (fresh(path), fresh(&out))
        && dst >= src
    {
        return Ok(out);
    }
    let strip = which("strip").context("`strip` is missing: apt-get install binutils")?;
    crate::run(
        Command::new(strip)
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(path),
    )?;
    Ok(out)
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
