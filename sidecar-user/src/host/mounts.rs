//! Reading `/proc/mounts`.

use std::path::PathBuf;

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
}

/// All mounts, in the kernel's order. An unreadable file gives an empty list: callers then
/// report the specific filesystem as missing, which names the fix.
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/mounts")
        .map(|s| parse(&s))
        .unwrap_or_default()
}

/// The first mount point of a filesystem type.
pub fn find(fstype: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|m| m.fstype == fstype)
        .map(|m| m.target)
}

/// Whether `path` is itself a mount point of `fstype`.
pub fn is_mounted(path: &std::path::Path, fstype: &str) -> bool {
    mounts()
        .iter()
        .any(|m| m.fstype == fstype && m.target == path)
}

pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some(Mount {
                source: unescape(fields.next()?),
                target: PathBuf::from(unescape(fields.next()?)),
                fstype: fields.next()?.to_string(),
            })
        })
        .collect()
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let text = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                    cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                    cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        let cg2 = m.iter().find(|m| m.fstype == "cgroup2").unwrap();
        assert_eq!(cg2.target, PathBuf::from("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn unescapes_octal() {
        let m = parse("none /mnt/with\\040space bpf rw 0 0\n");
        assert_eq!(m[0].target, PathBuf::from("/mnt/with space"));
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }
}
