//! Do we have the capabilities the kernel will ask for? Checked up front so the user gets one
//! clear line instead of an EPERM from somewhere in the middle of setup.

use thiserror::Error;

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
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

/// `struct __user_cap_header_struct` of capget(2)/capset(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two (capabilities 0–31 and 32–63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Takes CAP_NET_RAW from this process for good, before it execs a workload: raw sockets
/// send without `connect()`, so no connect hook sees them and nothing of the mesh (policy,
/// the metadata refusal, mTLS) applies. Removed from the bounding set, so no later exec
/// regains it (not a setuid-root binary, not file capabilities), and from the ambient,
/// inheritable, permitted and effective sets (root's exec would otherwise refill permitted
/// from inheritable). Raw syscalls only: it runs between fork and exec.
pub fn drop_net_raw() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_RAW as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above. It fails only where ambient capabilities do not exist (before
    // Linux 4.3), where there is nothing to lower.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_LOWER as libc::c_ulong,
            CAP_NET_RAW as libc::c_ulong,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills the two data structs of a version-3 header, both ours.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let keep = !(1u32 << CAP_NET_RAW);
    data[0].effective &= keep;
    data[0].permitted &= keep;
    data[0].inheritable &= keep;
    // SAFETY: capset reads the same header and data; lowering sets needs no privilege.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
