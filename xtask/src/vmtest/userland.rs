//! Host tools the tests call (`ip`, `iptables`, `nsenter`, `sh`, …), copied into the guest
//! at their host paths with the shared libraries `ldd` names, so the guest needs no distro.
//! And the guest kernel's netfilter modules, in dependency order, for iptables mode.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::{build::which, initramfs::Contents};
use crate::step;

/// Tools the integration tests and the sidecar run. Missing ones are reported, not fatal:
/// the tests that need them fail in the guest (CI is set there) and say which tool.
const TOOLS: &[&str] = &[
    "sh",
    "true",
    "touch",
    "cat",
    "sleep",
    "env",
    "kill",
    "ip",
    "nsenter",
    "setpriv",
    "taskset",
    "iptables",
    "ip6tables",
    "iptables-save",
    "ip6tables-save",
    "iptables-restore",
    "ip6tables-restore",
    "iptables-legacy",
    "ip6tables-legacy",
    "iptables-legacy-save",
    "ip6tables-legacy-save",
    "iptables-nft",
    "ip6tables-nft",
    "iptables-nft-save",
    "ip6tables-nft-save",
    "curl",
    "openssl",
    "tcpdump",
    "unshare",
    "mount",
    "umount",
];

/// iptables loads its matches and targets from here at run time.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

pub fn add_tools(c: &mut Contents) -> Result<()> {
    let mut files = BTreeSet::new();
    for tool in TOOLS {
        let Some(path) = which(tool) else {
            step(&format!(
                "vm-test: `{tool}` is not on this host; the guest lacks it too"
            ));
            continue;
        };
        let real = fs::canonicalize(&path)?;
        if real != path {
            c.add_symlink(&path.display().to_string(), &real.display().to_string());
        }
        files.insert(real);
    }
    if let Ok(entries) = fs::read_dir(XTABLES_DIR) {
        for e in entries {
            files.insert(e?.path());
        }
    }
    let mut libs = BTreeSet::new();
    for f in &files {
        libs.extend(shared_libs(f)?);
    }
    for f in files.iter().chain(&libs) {
        c.add_file(f, None)?;
    }
    // Usernames some tools resolve (setpriv --reuid nobody).
    c.add_bytes(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\ntcpdump:x:101:101::/nonexistent:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
            .to_vec(),
        0o644,
    );
    c.add_bytes(
        "/etc/group",
        b"root:x:0:\ntcpdump:x:101:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    );
    // openssl reads its configuration from OPENSSLDIR (/usr/lib/ssl -> /etc/ssl on Debian).
    let cnf = Path::new("/etc/ssl/openssl.cnf");
    if cnf.is_file() {
        c.add_file(cnf, None)?;
        c.add_file(cnf, Some("/usr/lib/ssl/openssl.cnf"))?;
    }
    // Merged /usr: executables name their loader /lib64/ld-linux-x86-64.so.2.
    let loader = fs::canonicalize("/usr/lib64/ld-linux-x86-64.so.2")
        .context("the host's dynamic loader /usr/lib64/ld-linux-x86-64.so.2 is missing")?;
    c.add_file(&loader, Some("/usr/lib64/ld-linux-x86-64.so.2"))?;
    c.add_symlink("/lib64", "usr/lib64");
    c.add_symlink("/lib", "usr/lib");
    Ok(())
}

/// The libraries (and loader) `ldd` lists for a dynamic executable; none for a static one.
fn shared_libs(file: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(file)
        .output()
        .context("running ldd")?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            // Under its soname (not the versioned file the symlink names), in the canonical
            // directory: /lib64 and /lib are symlinks into /usr on the host.
            let p = Path::new(p);
            let dir = fs::canonicalize(p.parent().context("library path")?)?;
            libs.push(dir.join(p.file_name().context("library name")?));
        }
    }
    Ok(libs)
}

/// Module directories whose modules iptables mode and the netns tests need (only the
/// directory itself: not ipvs/, ipset/ and the like below it), and single modules.
const MODULE_DIRS: &[&str] = &[
    "kernel/net/netfilter",
    "kernel/net/ipv4/netfilter",
    "kernel/net/ipv6/netfilter",
];
/// veth for the tests' namespaces; tcp_diag (and inet_diag) for `sock_diag`, which lists open
/// pass-through connections: a host loads them on first use (as for `ss`), a guest has no
/// modprobe.
const MODULES: &[&str] = &["veth", "inet_diag", "tcp_diag"];

/// The modules iptables mode and the tests need plus their dependencies, dependencies
/// first, as plain `.ko` files. Debian's packages ship no `modules.dep` (depmod runs at
/// install time), so the dependencies come from each module's own `depends=` field.
pub fn modules(tree: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut index = std::collections::BTreeMap::new();
    walk(&tree.join("kernel"), &mut |path| {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if let Some(stem) = name.split(".ko").next().filter(|_| name.contains(".ko")) {
            index.insert(stem.replace('-', "_"), path.to_path_buf());
        }
    })?;
    let wanted: Vec<String> = index
        .iter()
        .filter(|(name, path)| {
            let in_dir = MODULE_DIRS
                .iter()
                .any(|d| path.parent() == Some(&tree.join(d)));
            in_dir || MODULES.contains(&name.as_str())
        })
        .map(|(name, _)| name.clone())
        .collect();
    let mut ordered = Vec::new();
    let mut seen = BTreeSet::new();
    for name in &wanted {
        visit(name, &index, out_dir, &mut seen, &mut ordered)?;
    }
    Ok(ordered)
}

fn visit(
    name: &str,
    index: &std::collections::BTreeMap<String, PathBuf>,
    out_dir: &Path,
    seen: &mut BTreeSet<String>,
    ordered: &mut Vec<PathBuf>,
) -> Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    // Not in the tree: built into the kernel.
    let Some(path) = index.get(name) else {
        return Ok(());
    };
    let plain = plain_module(path, out_dir)?;
    let bytes = fs::read(&plain)?;
    for dep in depends(&bytes) {
        visit(&dep.replace('-', "_"), index, out_dir, seen, ordered)?;
    }
    ordered.push(plain);
    Ok(())
}

/// The `depends=a,b` entry of a module's `.modinfo`.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = module.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &module[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        if path.is_dir() {
            walk(&path, f)?;
        } else {
            f(&path);
        }
    }
    Ok(())
}

/// A module as a plain `.ko` (Debian compresses them on newer kernels; `/init` loads with
/// finit_module and no decompression flags). Decompressed copies are cached in `out_dir`.
fn plain_module(path: &Path, out_dir: &Path) -> Result<PathBuf> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => return Ok(path.to_path_buf()),
    };
    fs::create_dir_all(out_dir)?;
    let out = out_dir.join(path.file_stem().context("module name")?);
    if !out.is_file() {
        let got = Command::new(tool)
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("running {tool} (install it to unpack kernel modules)"))?;
        if !got.status.success() {
            anyhow::bail!("{tool} -dc {} failed", path.display());
        }
        fs::write(&out, got.stdout)?;
    }
    Ok(out)
}
