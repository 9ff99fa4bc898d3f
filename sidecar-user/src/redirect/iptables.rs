//! iptables interception, the classic Istio/Linkerd way, as a baseline for the eBPF mode:
//! a nat `REDIRECT` to the proxy port, and the original destination read back from the
//! accepted socket with `SO_ORIGINAL_DST` (conntrack remembers it).
//!
//! Each run owns one chain per address family in the nat table, `SIDECAR-<pid>`, and one jump
//! rule at the top of nat `OUTPUT`:
//!
//! ```text
//! -I OUTPUT -p tcp -m cgroup --path sidecar/run-PID/app -j SIDECAR-PID
//! -A SIDECAR-PID -o lo -p tcp --dport PROXY_PORT -j RETURN     (straight to the proxy: leave it)
//! -A SIDECAR-PID -p tcp --dport P -j RETURN                     (each --exclude-ports P)
//! -A SIDECAR-PID -d CIDR -j RETURN                              (each --exclude-cidrs of the family)
//! -A SIDECAR-PID -p tcp -j REDIRECT --to-ports PROXY_PORT
//! ```
//!
//! The jump matches on the workload's cgroup v2 path (`xt_cgroup` revision 2), so nothing
//! outside the run is affected. **Proxy exclusion**: the proxy lives in the run's `proxy`
//! cgroup, a sibling of `app` that the jump does not match, so its upstream connects are never
//! redirected back to itself. (The classic alternative, `-m owner ! --uid-owner PROXY_UID`,
//! needs the proxy to run as a dedicated user; the cgroup match needs no uid convention and
//! is the same rule the eBPF mode applies.)
//!
//! The host's backend (iptables-nft or iptables-legacy) is detected the way kube-proxy's
//! iptables-wrapper does: whichever backend already holds rules wins, else the one
//! `iptables --version` reports. The matching binaries are used for every command.
//!
//! [`IptablesInterception`] owns the chains and jumps: dropping it deletes the jumps, flushes
//! and deletes the chains. A leftover chain with our name can only belong to a dead run that
//! had our pid, so it is flushed and reused (jumps to it removed first): re-runs are
//! idempotent. `sidecar cleanup` removes what a killed run left, from its state file.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cidr::Cidr;

/// Prefix of every chain the sidecar creates.
pub const CHAIN_PREFIX: &str = "SIDECAR-";
/// The table our chains and the jump live in.
const TABLE: &str = "nat";
/// How long iptables may wait for the xtables lock (legacy backend; harmless with nft).
const LOCK_WAIT_SECS: &str = "5";

#[derive(Debug, Error)]
pub enum IptablesError {
    #[error(
        "iptables is not installed (no `{0}` in PATH): install it (`apt-get install iptables`) \
         or use --mode ebpf"
    )]
    NotInstalled(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error(
        "the workload cgroup {0} is not below the cgroup v2 root, so `-m cgroup --path` cannot name it"
    )]
    CgroupPath(PathBuf),
}

/// Which iptables implementation the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// iptables-nft: the iptables syntax on top of nf_tables.
    Nft,
    /// iptables-legacy: the old x_tables interface.
    Legacy,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
}

/// An address family's binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

/// The binaries to run for one backend: `iptables-nft`/`ip6tables-nft` (or `-legacy`), or
/// plain `iptables`/`ip6tables` on hosts that only have those.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    pub backend: Backend,
    /// Suffix of the binaries: `-nft`, `-legacy` or empty.
    pub suffix: String,
}

impl Tool {
    /// The backend's own binaries (`iptables-nft`, `iptables-legacy`, …).
    pub fn of(backend: Backend) -> Self {
        Self {
            backend,
            suffix: format!("-{}", backend.as_str()),
        }
    }

    /// The binary for a family, e.g. `ip6tables-nft`, or its `-save` companion.
    pub fn binary(&self, family: Family, save: bool) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let suffix = &self.suffix;
        if save {
            format!("{base}{suffix}-save")
        } else {
            format!("{base}{suffix}")
        }
    }

    /// Runs one iptables command on the nat table; stderr becomes the error.
    fn nat(&self, family: Family, args: &[&str]) -> Result<String, IptablesError> {
        let bin = self.binary(family, false);
        let mut cmd = Command::new(&bin);
        cmd.args(["-w", LOCK_WAIT_SECS, "-t", TABLE]).args(args);
        output(&bin, &mut cmd)
    }

    /// Whether the chain exists in the nat table of this family.
    fn chain_exists(&self, family: Family, chain: &str) -> bool {
        self.nat(family, &["-S", chain]).is_ok()
    }
}

/// Runs a command and returns its stdout, or its stderr as the error.
fn output(bin: &str, cmd: &mut Command) -> Result<String, IptablesError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            IptablesError::NotInstalled(bin.into())
        } else {
            IptablesError::Spawn {
                command: command.clone(),
                source,
            }
        }
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(IptablesError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; "),
        })
    }
}

fn in_path(bin: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(bin).is_file())
}

/// Finds the backend the host uses and the binaries to drive it (see the module doc).
pub fn detect() -> Result<Tool, IptablesError> {
    let have = |suffix: &str| in_path(&format!("iptables{suffix}"));
    if have("-nft") && have("-legacy") {
        let (nft, legacy) = (rule_count(Backend::Nft), rule_count(Backend::Legacy));
        if nft != legacy {
            let backend = if legacy > nft {
                Backend::Legacy
            } else {
                Backend::Nft
            };
            return Ok(Tool::of(backend));
        }
    }
    // No rules anywhere (or only one flavour installed): the default `iptables` decides.
    // `iptables v1.8.9 (nf_tables)`; older releases print no suffix and are legacy.
    let version = output("iptables", Command::new("iptables").arg("--version"))?;
    let backend = if version.contains("nf_tables") {
        Backend::Nft
    } else {
        Backend::Legacy
    };
    let tool = Tool::of(backend);
    Ok(if have(&tool.suffix) {
        tool
    } else {
        Tool {
            backend,
            suffix: String::new(),
        }
    })
}

/// Rules (`-A` lines) a backend holds in all its tables, IPv4 and IPv6.
fn rule_count(backend: Backend) -> usize {
    let tool = Tool::of(backend);
    [Family::V4, Family::V6]
        .iter()
        .map(|f| {
            let bin = tool.binary(*f, true);
            output(&bin, &mut Command::new(&bin))
                .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
                .unwrap_or(0)
        })
        .sum()
}

/// What one run installs; also what its state file records for `sidecar cleanup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    pub tool: Tool,
    /// `SIDECAR-<pid>`, the same name in each family's nat table.
    pub chain: String,
    /// The workload cgroup as `-m cgroup --path` names it (relative to the cgroup2 root).
    pub cgroup_path: String,
    /// The families that have the chain and jump (IPv6 only with an IPv6 listener).
    pub families: Vec<Family>,
}

/// Where and what to intercept.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The cgroup v2 root; `app_cgroup` must be below it.
    pub cgroup_root: PathBuf,
    /// The workload's cgroup (the proxy's is a sibling, so it is not matched).
    pub app_cgroup: PathBuf,
    pub proxy_port: u16,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    /// Also intercept IPv6 (only if the proxy listens on `::1`).
    pub ipv6: bool,
    /// Chain name; `SIDECAR-<pid>` for a run.
    pub chain: String,
}

/// What [`IptablesInterception::install`] will create, for the state file written before it.
pub fn planned(tool: Tool, settings: &Settings) -> Result<Rules, IptablesError> {
    let cgroup_path = settings
        .app_cgroup
        .strip_prefix(&settings.cgroup_root)
        .map_err(|_| IptablesError::CgroupPath(settings.app_cgroup.clone()))?
        .to_string_lossy()
        .into_owned();
    let mut families = vec![Family::V4];
    if settings.ipv6 {
        families.push(Family::V6);
    }
    Ok(Rules {
        tool,
        chain: settings.chain.clone(),
        cgroup_path,
        families,
    })
}

/// The rules one run installed; removed on drop.
#[derive(Debug)]
pub struct IptablesInterception {
    rules: Rules,
    removed: bool,
}

impl IptablesInterception {
    /// Installs the chains and jumps. On failure, whatever was installed is removed again.
    pub fn install(tool: Tool, settings: &Settings) -> Result<Self, IptablesError> {
        let planned = planned(tool, settings)?;
        let mut this = Self {
            rules: Rules {
                families: Vec::new(),
                ..planned.clone()
            },
            removed: false,
        };
        for family in planned.families {
            // Recorded before the first command, so a failure halfway is undone by drop.
            this.rules.families.push(family);
            install_family(&this.rules, family, settings)?;
        }
        Ok(this)
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Removes everything now; returns what could not be removed.
    pub fn remove(mut self) -> Vec<String> {
        self.removed = true;
        remove(&self.rules)
    }
}

impl Drop for IptablesInterception {
    fn drop(&mut self) {
        if !self.removed {
            for failure in remove(&self.rules) {
                tracing::warn!("{failure}");
            }
        }
    }
}

/// The rule spec of the jump, without `-I`/`-D` and the chain it sits in.
fn jump_spec(rules: &Rules) -> Vec<String> {
    [
        "-p",
        "tcp",
        "-m",
        "cgroup",
        "--path",
        &rules.cgroup_path,
        "-j",
        &rules.chain,
    ]
    .map(String::from)
    .to_vec()
}

fn install_family(rules: &Rules, family: Family, s: &Settings) -> Result<(), IptablesError> {
    let tool = &rules.tool;
    let chain = rules.chain.as_str();
    if tool.chain_exists(family, chain) {
        // Our pid, so its owner is dead: take it over.
        tracing::info!(chain, ?family, "replacing a leftover chain of a dead run");
        remove_jumps(tool, family, chain);
        tool.nat(family, &["-F", chain])?;
    } else {
        tool.nat(family, &["-N", chain])?;
    }
    let port = s.proxy_port.to_string();
    let lo_proxy = ["-o", "lo", "-p", "tcp", "--dport", &port, "-j", "RETURN"];
    tool.nat(family, &[&["-A", chain][..], &lo_proxy].concat())?;
    for p in &s.exclude_ports {
        let p = p.to_string();
        tool.nat(
            family,
            &["-A", chain, "-p", "tcp", "--dport", &p, "-j", "RETURN"],
        )?;
    }
    for c in &s.exclude_cidrs {
        if c.addr.is_ipv4() != (family == Family::V4) {
            continue;
        }
        let cidr = format!("{}/{}", c.addr, c.prefix);
        tool.nat(family, &["-A", chain, "-d", &cidr, "-j", "RETURN"])?;
    }
    let redirect = ["-p", "tcp", "-j", "REDIRECT", "--to-ports", &port];
    tool.nat(family, &[&["-A", chain][..], &redirect].concat())?;
    // The jump last, so the chain is complete before any connect can enter it. At the top of
    // OUTPUT, so an earlier ACCEPT in another chain cannot silently bypass interception.
    let spec = jump_spec(rules);
    let mut args = vec!["-I", "OUTPUT", "1"];
    args.extend(spec.iter().map(String::as_str));
    tool.nat(family, &args)?;
    Ok(())
}

/// Deletes every OUTPUT rule that jumps to `chain` (normally one), whatever its match.
fn remove_jumps(tool: &Tool, family: Family, chain: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let Ok(listing) = tool.nat(family, &["-S", "OUTPUT"]) else {
        return failures;
    };
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let jumps_to_us = words.windows(2).any(|w| w[0] == "-j" && w[1] == chain);
        if words.first() == Some(&"-A") && jumps_to_us {
            let spec = unquote(&words[1..]);
            let mut args = vec!["-D"];
            args.extend(spec.iter().map(String::as_str));
            if let Err(e) = tool.nat(family, &args) {
                failures.push(e.to_string());
            }
        }
    }
    failures
}

/// `iptables -S` quotes arguments with spaces; our rules have none, but strip quotes so a
/// listed rule can be fed back to `-D`.
fn unquote(words: &[&str]) -> Vec<String> {
    words
        .iter()
        .map(|w| w.trim_matches('"').to_string())
        .collect()
}

/// Removes the jumps, then flushes and deletes the chains. Missing pieces are not errors, so
/// this is safe to repeat (cleanup after a crash, or a drop after a failed install).
pub fn remove(rules: &Rules) -> Vec<String> {
    let mut failures = Vec::new();
    for &family in &rules.families {
        let tool = &rules.tool;
        failures.extend(remove_jumps(tool, family, &rules.chain));
        if !tool.chain_exists(family, &rules.chain) {
            continue;
        }
        for op in ["-F", "-X"] {
            if let Err(e) = tool.nat(family, &[op, &rules.chain]) {
                failures.push(e.to_string());
            }
        }
    }
    failures
}

/// Chains named `SIDECAR-<pid>` present in a family's nat table (for cleanup of runs that
/// died before writing a state file).
pub fn our_chains(tool: &Tool, family: Family) -> Vec<(String, u32)> {
    let Ok(listing) = tool.nat(family, &["-S"]) else {
        return Vec::new();
    };
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("-N "))
        .filter_map(|c| {
            let pid = c.strip_prefix(CHAIN_PREFIX)?.parse().ok()?;
            Some((c.to_string(), pid))
        })
        .collect()
}

/// The chain name a run uses.
pub fn chain_for(pid: u32) -> String {
    format!("{CHAIN_PREFIX}{pid}")
}

/// For `sidecar probe`: the backend and whether the matches and target we need are usable,
/// tried on a scratch chain that is removed again.
pub fn probe(
    cgroup_root: &Path,
    scratch_cgroup: &Path,
    chain: &str,
) -> Result<Tool, IptablesError> {
    let tool = detect()?;
    let settings = Settings {
        cgroup_root: cgroup_root.into(),
        app_cgroup: scratch_cgroup.into(),
        proxy_port: 1,
        exclude_ports: vec![2],
        exclude_cidrs: vec![Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)),
            prefix: 24,
        }],
        ipv6: false,
        chain: chain.into(),
    };
    let installed = IptablesInterception::install(tool.clone(), &settings)?;
    let failures = installed.remove();
    if let Some(f) = failures.into_iter().next() {
        return Err(IptablesError::Command {
            command: "removing the probe's rules".into(),
            stderr: f,
        });
    }
    Ok(tool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_follow_backend_and_family() {
        let t = Tool {
            backend: Backend::Legacy,
            suffix: "-legacy".into(),
        };
        assert_eq!(t.binary(Family::V6, false), "ip6tables-legacy");
        assert_eq!(t.binary(Family::V4, true), "iptables-legacy-save");
        let plain = Tool {
            backend: Backend::Nft,
            suffix: String::new(),
        };
        assert_eq!(plain.binary(Family::V4, true), "iptables-save");
    }

    #[test]
    fn jump_names_cgroup_and_chain() {
        let r = Rules {
            tool: Tool {
                backend: Backend::Nft,
                suffix: "-nft".into(),
            },
            chain: chain_for(42),
            cgroup_path: "sidecar/run-42/app".into(),
            families: vec![Family::V4],
        };
        assert_eq!(
            jump_spec(&r).join(" "),
            "-p tcp -m cgroup --path sidecar/run-42/app -j SIDECAR-42"
        );
    }

    #[test]
    fn rules_round_trip_through_the_state_file_format() {
        let r = Rules {
            tool: Tool {
                backend: Backend::Legacy,
                suffix: "-legacy".into(),
            },
            chain: "SIDECAR-7".into(),
            cgroup_path: "x/app".into(),
            families: vec![Family::V4, Family::V6],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"legacy\""));
        assert_eq!(serde_json::from_str::<Rules>(&json).unwrap(), r);
    }

    /// Privileged tests: root and the binaries, else skip (or fail under CI).
    fn privileged(bin: &str) -> bool {
        let why = if !crate::host::privileges::sufficient(crate::host::privileges::effective_caps())
        {
            "needs root".to_string()
        } else if !in_path(bin) {
            format!("needs {bin} (apt-get install iptables)")
        } else {
            return true;
        };
        assert!(std::env::var_os("CI").is_none(), "cannot run: {why}");
        eprintln!("skipped: {why}");
        false
    }

    /// Runs `f` on a thread of its own in a fresh, unnamed network namespace, so its rules
    /// never touch the host's tables (child processes inherit the thread's namespace); the
    /// namespace disappears with the thread.
    fn in_private_netns(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) of the network namespace affects this thread only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            f();
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    }

    /// A crashed run with our pid left its chain and jump: installing again takes them over
    /// (one jump, fresh rules), and removing leaves nothing.
    fn leftover_chain_is_taken_over(tool: Tool) {
        let root = crate::host::cgroup::root().unwrap();
        let pid = std::process::id();
        let name = format!("sci-ipt-unit-{pid}-{}", tool.backend.as_str());
        let cg = crate::host::cgroup::Cgroup::create(root.join(name)).unwrap();
        let settings = Settings {
            cgroup_root: root.clone(),
            app_cgroup: cg.path().into(),
            proxy_port: 16199,
            exclude_ports: vec![7],
            exclude_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            ipv6: true,
            chain: format!("{CHAIN_PREFIX}UT{pid}"),
        };
        let jumps = |family| {
            tool.nat(family, &["-S", "OUTPUT"])
                .unwrap()
                .lines()
                .filter(|l| l.ends_with(&format!("-j {}", settings.chain)))
                .count()
        };
        let crashed = IptablesInterception::install(tool.clone(), &settings).unwrap();
        std::mem::forget(crashed); // as if killed: nothing removed
        let again = IptablesInterception::install(tool.clone(), &settings);
        let again = again.expect("a leftover chain of ours is taken over");
        assert_eq!(jumps(Family::V4), 1);
        assert_eq!(jumps(Family::V6), 1);
        let v4 = tool.nat(Family::V4, &["-S", &settings.chain]).unwrap();
        assert_eq!(v4.lines().filter(|l| l.contains("REDIRECT")).count(), 1);
        assert!(
            v4.contains("-d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::"),
            "{v4}"
        );
        let v6 = tool.nat(Family::V6, &["-S", &settings.chain]).unwrap();
        assert!(
            v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("10.0.0.0"),
            "{v6}"
        );
        assert!(again.remove().is_empty());
        assert!(!tool.chain_exists(Family::V4, &settings.chain));
        assert!(!tool.chain_exists(Family::V6, &settings.chain));
        assert_eq!(jumps(Family::V4), 0);
        assert_eq!(jumps(Family::V6), 0);
    }

    #[test]
    fn leftover_chain_is_taken_over_nft() {
        if privileged("iptables-nft") {
            in_private_netns(|| {
                leftover_chain_is_taken_over(Tool {
                    backend: Backend::Nft,
                    suffix: "-nft".into(),
                })
            });
        }
    }

    #[test]
    fn leftover_chain_is_taken_over_legacy() {
        if privileged("iptables-legacy") {
            in_private_netns(|| {
                leftover_chain_is_taken_over(Tool {
                    backend: Backend::Legacy,
                    suffix: "-legacy".into(),
                })
            });
        }
    }

    /// In a namespace with rules only in the legacy backend, detection picks legacy.
    #[test]
    fn detection_follows_the_backend_that_holds_rules() {
        if privileged("iptables-legacy") && privileged("iptables-nft") {
            in_private_netns(|| {
                let legacy = Tool {
                    backend: Backend::Legacy,
                    suffix: "-legacy".into(),
                };
                legacy.nat(Family::V4, &["-N", "SIDECAR-DETECT"]).unwrap();
                legacy
                    .nat(Family::V4, &["-A", "SIDECAR-DETECT", "-j", "RETURN"])
                    .unwrap();
                let detected = detect();
                legacy.nat(Family::V4, &["-F", "SIDECAR-DETECT"]).unwrap();
                legacy.nat(Family::V4, &["-X", "SIDECAR-DETECT"]).unwrap();
                assert_eq!(detected.unwrap().backend, Backend::Legacy);
            });
        }
    }
}
