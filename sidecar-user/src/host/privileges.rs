//! Do we have the capabilities the kernel will ask for? Checked up front so the user gets one
//! clear line instead of an EPERM from somewhere in the middle of setup.

use thiserror::Error;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
#[error(
    "{what} needs root (CAP_SYS_ADMIN, or CAP_BPF with CAP_NET_ADMIN) to load eBPF programs and \
     create cgroups: run it with sudo"
)]
pub struct NotPrivileged {
    pub what: &'static str,
}

/// The effective capability set from `/proc/self/status`.
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Whether the capability set allows loading and attaching our programs.
pub fn sufficient(caps: u64) -> bool {
    has(caps, CAP_SYS_ADMIN) || (has(caps, CAP_BPF) && has(caps, CAP_NET_ADMIN))
}

pub fn require(what: &'static str) -> Result<(), NotPrivileged> {
    if sufficient(effective_caps()) {
        Ok(())
    } else {
        Err(NotPrivileged { what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_rules() {
        assert!(sufficient(1 << CAP_SYS_ADMIN));
        assert!(sufficient((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)));
        assert!(!sufficient(1 << CAP_BPF));
        assert!(!sufficient(0));
    }
}
