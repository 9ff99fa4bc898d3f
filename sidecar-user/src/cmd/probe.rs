//! `sidecar probe`: does this host have what eBPF interception needs? Each check prints a
//! verdict and, when it fails, the fix. The program check really loads, attaches (to a
//! temporary cgroup) and pins the embedded object, then removes all of it.

use std::path::Path;

use crate::{
    host::{bpffs::Bpffs, cgroup, privileges},
    redirect::{
        ebpf::{EbpfInterception, Settings},
        iptables,
    },
};

#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found (on success) or what is wrong (on failure).
    pub detail: String,
    /// How to fix a failure.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every check: what eBPF mode needs, what `sidecar agent` adds, then iptables mode (the
/// fallback).
pub fn probe(bpffs_path: &Path) -> Vec<Check> {
    let mut checks = ebpf_checks(bpffs_path);
    let privileged = privileges::sufficient(privileges::effective_caps());
    if let (true, Ok(root)) = (privileged, cgroup::root()) {
        checks.push(agent_programs(&root, bpffs_path));
        checks.push(iptables_mode(&root));
    }
    checks
}

/// The check that makes `--mode auto` fall back: the eBPF programs check, when
/// `SIDECAR_TEST_FAIL_EBPF_PROBE` is set. Test-only: every kernel the suite runs on has the
/// hooks, and the fallback must be exercised for real (it is the real probe failing, the
/// real warning, the real iptables run).
pub const TEST_FAIL_ENV: &str = "SIDECAR_TEST_FAIL_EBPF_PROBE";

/// The interception mode `--mode auto` picks: eBPF when every eBPF check passes, else
/// iptables, with the failed checks' one-line reason.
pub fn auto_mode(bpffs_path: &Path) -> Result<crate::redirect::Mode, String> {
    let failed: Vec<String> = ebpf_checks(bpffs_path)
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if failed.is_empty() {
        Ok(crate::redirect::Mode::Ebpf)
    } else {
        Err(failed.join("; "))
    }
}

/// What eBPF mode needs, up to really loading and attaching the programs.
pub fn ebpf_checks(bpffs_path: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(kernel_release());

    let privileged = privileges::sufficient(privileges::effective_caps());
    checks.push(if privileged {
        Check::pass(
            "privileges",
            "CAP_SYS_ADMIN or CAP_BPF+CAP_NET_ADMIN present",
        )
    } else {
        Check::fail(
            "privileges",
            "not root",
            "run `sudo sidecar probe` (and `sudo sidecar run`)",
        )
    });

    let cg_root = cgroup::root();
    checks.push(match &cg_root {
        Ok(p) => Check::pass("cgroup v2", format!("mounted at {}", p.display())),
        Err(e) => Check::fail(
            "cgroup v2",
            "no cgroup2 mount in /proc/mounts",
            e.to_string(),
        ),
    });

    checks.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::pass("BTF", "/sys/kernel/btf/vmlinux present")
    } else {
        // Our programs use no CO-RE relocations, so this is informational.
        Check::pass(
            "BTF",
            "no /sys/kernel/btf/vmlinux (not required by these programs)",
        )
    });

    let bpffs_mounted = crate::host::mounts::is_mounted(bpffs_path, "bpf");
    checks.push(if bpffs_mounted {
        Check::pass("bpffs", format!("mounted at {}", bpffs_path.display()))
    } else if privileged {
        Check::pass(
            "bpffs",
            format!(
                "not mounted at {}; `sidecar run` mounts it (and unmounts it after)",
                bpffs_path.display()
            ),
        )
    } else {
        Check::fail(
            "bpffs",
            format!("not mounted at {}", bpffs_path.display()),
            format!("`mount -t bpf bpffs {}` (as root)", bpffs_path.display()),
        )
    });

    if std::env::var_os(TEST_FAIL_ENV).is_some() {
        checks.push(Check::fail(
            "eBPF programs",
            format!("failed on purpose: {TEST_FAIL_ENV} is set (test-only)"),
            format!("unset {TEST_FAIL_ENV}"),
        ));
    } else if let (true, Ok(root)) = (privileged, &cg_root) {
        checks.push(programs(root, bpffs_path));
    } else {
        checks.push(Check::fail(
            "eBPF programs",
            "not tried (needs root and cgroup v2)",
            "fix the checks above, then run `sidecar probe` again",
        ));
    }
    checks
}

/// `--mode iptables`: which backend, and whether a chain with the cgroup match and REDIRECT
/// can really be installed (on a scratch cgroup; removed again). Optional: without the
/// iptables package only eBPF mode is available, which is not a failure.
fn iptables_mode(cg_root: &Path) -> Check {
    const NAME: &str = "iptables mode";
    let pid = std::process::id();
    let scratch = match cgroup::Cgroup::create(cg_root.join(format!("sidecar/probe-ipt-{pid}"))) {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, e.to_string(), "see the cgroup v2 check"),
    };
    let result = iptables::probe(
        cg_root,
        scratch.path(),
        &format!("{}PROBE-{pid}", iptables::CHAIN_PREFIX),
    );
    drop(scratch);
    let _ = std::fs::remove_dir(cg_root.join("sidecar"));
    match result {
        Ok(tool) => Check::pass(
            NAME,
            format!(
                "iptables-{} backend ({}): nat chain, -m cgroup --path, REDIRECT work",
                tool.backend.as_str(),
                tool.binary(iptables::Family::V4, false)
            ),
        ),
        Err(iptables::IptablesError::NotInstalled(bin)) => Check::pass(
            NAME,
            format!("unavailable: no `{bin}` (optional; `apt-get install iptables` enables it)"),
        ),
        Err(e) => Check::fail(
            NAME,
            e.to_string(),
            "a kernel with netfilter nat, xt_cgroup and xt_REDIRECT (or nft_compat), or use --mode ebpf",
        ),
    }
}

/// `sidecar agent`'s set (with the getsockopt program that serves unprivileged proxies),
/// installed at a scratch cgroup the way the agent installs it, then removed.
fn agent_programs(cg_root: &Path, bpffs_path: &Path) -> Check {
    const NAME: &str = "agent programs";
    let pid = std::process::id();
    let result = (|| -> anyhow::Result<()> {
        let bpffs = Bpffs::ensure(bpffs_path)?;
        let scratch = cgroup::Cgroup::create(cg_root.join(format!("sidecar/probe-agent-{pid}")))?;
        let dir = bpffs.path().join(format!("sidecar/probe-agent-{pid}"));
        let result = crate::cmd::agent::pins::probe(scratch.path(), &dir);
        let _ = std::fs::remove_dir(bpffs.path().join("sidecar"));
        drop(scratch);
        let _ = std::fs::remove_dir(cg_root.join("sidecar"));
        Ok(result?)
    })();
    match result {
        Ok(()) => Check::pass(
            NAME,
            "connect4, connect6, sockops, getsockopt, strict_in, sock_release, sk_msg load, attach and pin (`sidecar agent` works)",
        ),
        // Before 5.15 the getsockopt program cannot call bpf_get_netns_cookie: the agent is
        // unavailable there by design (it refuses to start), while `sidecar run` works, so
        // this is not a failure of the host.
        Err(e) if format!("{e:#}").contains("bpf_get_netns_cookie") => Check::pass(
            NAME,
            "unavailable on this kernel: `sidecar agent` needs Linux ≥ 5.15 (its getsockopt \
             program keys original destinations by netns cookie); `sidecar run` works",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{e:#}"),
            "`sidecar agent` needs a kernel ≥ 5.15 with cgroup getsockopt programs (CONFIG_CGROUP_BPF)",
        ),
    }
}

fn kernel_release() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Check::pass("kernel", format!("Linux {release}"))
}

/// Loads the object, attaches connect4/connect6/sockops/strict-inbound to a scratch cgroup and sk_msg to the
/// sockhash, pins everything, then tears it all down.
fn programs(cg_root: &Path, bpffs_path: &Path) -> Check {
    const NAME: &str = "eBPF programs";
    let pid = std::process::id();
    let result = (|| -> anyhow::Result<Option<&'static str>> {
        let bpffs = Bpffs::ensure(bpffs_path)?;
        let scratch = cgroup::Cgroup::create(cg_root.join(format!("sidecar/probe-{pid}")))?;
        let interception = EbpfInterception::attach(
            &Settings {
                connect_cgroup: scratch.path().into(),
                sockops_cgroup: scratch.path().into(),
                pin_dir: bpffs.path().join(format!("sidecar/probe-{pid}")),
                sockmap: true,
                bpf_log: false,
                strict_inbound_cgroup: Some(scratch.path().into()),
            },
            &[],
            Default::default(),
        )?;
        let degraded = interception.fast_path_unavailable();
        let failures = interception.detach();
        let _ = std::fs::remove_dir(bpffs.path().join("sidecar"));
        drop(scratch);
        let _ = std::fs::remove_dir(cg_root.join("sidecar"));
        if failures.is_empty() {
            Ok(degraded)
        } else {
            anyhow::bail!(failures.join("; "))
        }
    })();
    match result {
        Ok(None) => Check::pass(
            NAME,
            "connect4, connect6, sockops, sk_msg, strict_in, sock_release load, attach and pin (sockmap fast path available)",
        ),
        Ok(Some(why)) => Check::pass(
            NAME,
            format!(
                "connect4, connect6, sockops, sk_msg, strict_in, sock_release load, attach and pin; sockmap \
                 fast path unavailable: {why}"
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{e:#}"),
            "a kernel ≥ 5.10 built with CONFIG_CGROUP_BPF, CONFIG_BPF_SYSCALL and \
             CONFIG_BPF_STREAM_PARSER (sockmap) is needed; without it, intercept with \
             `--mode iptables` (or `--mode auto`, which falls back to it by itself)",
        ),
    }
}

/// `sidecar probe`'s flags.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// bpffs mount point to check.
    #[arg(long, default_value = crate::defaults::BPFFS)]
    pub bpffs: std::path::PathBuf,
}

impl ProbeArgs {
    /// Prints each check (and its fix); exit status 1 if any failed.
    pub fn run(self) -> i32 {
        let checks = probe(&self.bpffs);
        for c in &checks {
            println!(
                "{} {:<14} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
            if let Some(fix) = &c.fix {
                println!("     {:<14} fix: {fix}", "");
            }
        }
        let failed = checks.iter().filter(|c| !c.ok).count();
        let iptables_ok = checks
            .iter()
            .any(|c| c.name == "iptables mode" && c.ok && !c.detail.starts_with("unavailable"));
        if failed == 0 {
            println!("eBPF interception is supported on this host.");
            0
        } else {
            println!("{failed} check(s) failed.");
            if iptables_ok {
                println!(
                    "iptables mode works here: `sidecar run --mode iptables`, or \
                     `--mode auto` to fall back by itself"
                );
            }
            1
        }
    }
}
