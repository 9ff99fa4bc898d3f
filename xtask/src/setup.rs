//! `cargo xtask setup`: installs what the tests, the demo and the bench need on a fresh
//! machine of the project's kind (Debian, root), one line per thing installed, nothing when
//! all is there. `cargo xtask test` and `cargo xtask demo` run it first, and `.ci/run` calls it
//! instead of keeping a list of its own, so a newcomer following the README gets the same
//! machine as CI.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{run, step};

/// A command the tests run, and the Debian package that brings it.
struct Tool {
    command: &'static str,
    package: &'static str,
    why: &'static str,
}

const TOOLS: &[Tool] = &[
    Tool {
        command: "ip",
        package: "iproute2",
        why: "network namespaces and veths in the tests and the bench",
    },
    Tool {
        command: "nsenter",
        package: "util-linux",
        why: "running the sidecar inside a test namespace",
    },
    Tool {
        command: "setpriv",
        package: "util-linux",
        why: "the unprivileged-user tests",
    },
    Tool {
        command: "pgrep",
        package: "procps",
        why: "process checks in the tests",
    },
    Tool {
        command: "tcpdump",
        package: "tcpdump",
        why: "the mTLS tests capture the wire",
    },
    Tool {
        command: "openssl",
        package: "openssl",
        why: "the mTLS tests play a raw TLS client",
    },
    Tool {
        command: "iptables",
        package: "iptables",
        why: "`--mode iptables` and its tests",
    },
    Tool {
        command: "sockperf",
        package: "sockperf",
        why: "the bench's external cross-check",
    },
    Tool {
        command: "haproxy",
        package: "haproxy",
        why: "the bench's userspace-proxy peer",
    },
    Tool {
        command: "wrk",
        package: "wrk",
        why: "the bench's HTTP cross-check (client)",
    },
    Tool {
        command: "nginx",
        package: "nginx-light",
        why: "the bench's HTTP cross-check (server)",
    },
    Tool {
        command: "curl",
        package: "curl",
        why: "the Kubernetes tests read a pod sidecar's /readyz",
    },
    Tool {
        command: "promtool",
        package: "prometheus",
        why: "the observability tests lint a real /metrics scrape",
    },
    Tool {
        command: "python3",
        package: "python3",
        why: "the manifest validator's venv",
    },
];

/// The manifest validator (`tests/src/manifests/validator.rs` looks for it here): the Kubernetes
/// OpenAPI schemas bundled in a pinned PyPI package, so validation is offline and only
/// changes on purpose.
pub const VALIDATOR_VENV: &str = "target/kubernetes-validate";
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

pub fn setup() -> Result<()> {
    let missing: Vec<&Tool> = TOOLS
        .iter()
        .filter(|t| which(t.command).is_none())
        .collect();
    if !missing.is_empty() {
        let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        packages.dedup();
        if !is_root() {
            bail!(
                "missing {}: run `sudo apt-get install {}` (or `sudo cargo xtask setup`)",
                missing
                    .iter()
                    .map(|t| t.command)
                    .collect::<Vec<_>>()
                    .join(", "),
                packages.join(" ")
            );
        }
        for t in &missing {
            step(&format!(
                "installing {} (package {}): {}",
                t.command, t.package, t.why
            ));
        }
        apt_install(&packages)?;
    }
    validator_venv()
}

fn validator_venv() -> Result<()> {
    let venv = crate::build_ebpf::workspace_root().join(VALIDATOR_VENV);
    let bin = venv.join("bin/kubernetes-validate");
    if bin.is_file() {
        return Ok(());
    }
    step(&format!(
        "installing {VALIDATOR} into {} (the manifests test)",
        venv.display()
    ));
    // Debian's python3 needs python3-venv for `-m venv` (ensurepip).
    if !venv_works(&venv) {
        if !is_root() {
            bail!(
                "python3 cannot create a venv: run `sudo apt-get install python3-venv`, then \
                 `cargo xtask setup`"
            );
        }
        step("installing python3-venv (python3 -m venv needs it)");
        apt_install(&["python3-venv"])?;
        let _ = std::fs::remove_dir_all(&venv);
        if !venv_works(&venv) {
            bail!(
                "python3 -m venv {} failed even with python3-venv",
                venv.display()
            );
        }
    }
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", VALIDATOR]))
        .with_context(|| format!("installing {VALIDATOR} from PyPI"))
}

fn venv_works(venv: &Path) -> bool {
    Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && venv.join("bin/pip").is_file()
}

fn apt_install(packages: &[&str]) -> Result<()> {
    // The package lists of a fresh machine may be missing or old.
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The first `name` on PATH (or in the sbin directories, where Debian keeps iptables and
/// which root's PATH may lack).
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
