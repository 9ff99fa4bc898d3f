//! Which pod a process belongs to, from its cgroup path alone: the agent never believes what
//! a caller claims. kubelet lays pods out as
//!
//! ```text
//! cgroupfs driver: <root>/[burstable|besteffort/]pod<uid>/<container>
//! systemd driver:  <root>/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid_with_underscores>.slice/<x>.scope
//! ```
//!
//! where `<root>` is `kubepods` or `kubepods.slice` under the cgroup v2 mount.

use std::{
    fs, io,
    path::{Component, Path, PathBuf},
};

use thiserror::Error;

/// The pods' cgroup roots kubelet uses, tried in this order under the cgroup2 mount.
pub const DEFAULT_ROOTS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// Why a caller's cgroup does not make it a pod's container. `reason()` is the counter name.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NotAPod {
    #[error("the caller's cgroup {0} is not under the pods' cgroup root")]
    OutsideRoot(PathBuf),
    #[error("the caller's cgroup {0} is not a pod's (no pod<uid> level)")]
    NoPod(PathBuf),
    #[error("the caller is in the pod cgroup {0} itself, not in one of its containers")]
    NotInContainer(PathBuf),
}

/// The reason of [`NotAPod::OutsideRoot`]: the caller is none of the pods' (a process of
/// the node itself).
pub const OUTSIDE_PODS: &str = "outside_pods";

impl NotAPod {
    pub fn reason(&self) -> &'static str {
        match self {
            NotAPod::OutsideRoot(_) => OUTSIDE_PODS,
            NotAPod::NoPod(_) => "not_in_pod",
            NotAPod::NotInContainer(_) => "not_in_container",
        }
    }
}

/// A process's place in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID in its canonical (dashed, lowercase) form.
    pub uid: String,
    /// `…/pod<uid>`: every container of the pod is below it.
    pub pod: PathBuf,
    /// The container cgroup directly below the pod's.
    pub container: PathBuf,
}

/// The pod and container of a process whose cgroup is `cgroup` (absolute, under the cgroup2
/// mount), given the pods' root.
pub fn derive(root: &Path, cgroup: &Path) -> Result<PodCgroup, NotAPod> {
    let rel = cgroup
        .strip_prefix(root)
        .map_err(|_| NotAPod::OutsideRoot(cgroup.into()))?;
    let parts: Vec<&str> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    // The pod level is the first or second one (after an optional QoS level).
    for (i, part) in parts.iter().enumerate().take(2) {
        let Some(uid) = pod_uid(part) else { continue };
        let pod: PathBuf = parts[..=i]
            .iter()
            .fold(root.to_path_buf(), |p, s| p.join(s));
        let Some(container) = parts.get(i + 1) else {
            return Err(NotAPod::NotInContainer(pod));
        };
        let container = pod.join(container);
        return Ok(PodCgroup {
            uid,
            pod,
            container,
        });
    }
    Err(NotAPod::NoPod(cgroup.into()))
}

/// The pod UID in one cgroup path level, if the level is a pod's.
fn pod_uid(level: &str) -> Option<String> {
    // systemd: kubepods-burstable-pod<uid_>.slice, kubepods-pod<uid_>.slice
    if let Some(stem) = level.strip_suffix(".slice") {
        let (_, uid) = stem.rsplit_once("-pod")?;
        return valid_uid(uid);
    }
    // cgroupfs: pod<uid>
    valid_uid(level.strip_prefix("pod")?)
}

/// A UID as kubelet writes it (dashes, or underscores in systemd unit names), canonicalised.
fn valid_uid(raw: &str) -> Option<String> {
    let uid = canonical_uid(raw);
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some(uid)
}

/// Lowercase, underscores as dashes: how UIDs are compared.
pub fn canonical_uid(raw: &str) -> String {
    raw.trim().to_ascii_lowercase().replace('_', "-")
}

/// Where this process's cgroup namespace is rooted under the cgroup2 mount, if it has one
/// of its own (a container's, when joining PID 1's was not possible); `None` in the host's.
///
/// `/proc/<pid>/cgroup` is relative to the *reader's* cgroup namespace: in a namespace of our
/// own our cgroup reads `/` while we are not in the hierarchy's root, and every caller's path
/// (`/x`, or `/../../x` outside our subtree) is relative to our namespace root, the directory
/// whose `cgroup.procs` lists us.
pub fn own_namespace_root(cgroup2: &Path) -> io::Result<Option<PathBuf>> {
    let me = std::process::id().to_string();
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let reads_root = own.lines().any(|l| l.trim() == "0::/");
    let at_root = fs::read_to_string(cgroup2.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|l| l.trim() == me));
    if !reads_root || at_root {
        return Ok(None);
    }
    find_own_cgroup(cgroup2).map(Some)
}

/// The cgroup of process `pid` as a path under the cgroup2 mount, given our namespace root
/// (see [`own_namespace_root`]).
pub fn cgroup_of(cgroup2: &Path, pid: u32, ns_root: Option<&Path>) -> io::Result<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other(format!("pid {pid} has no cgroup v2 entry")))?;
    resolve_relative(cgroup2, ns_root.unwrap_or(cgroup2), rel)
        .ok_or_else(|| io::Error::other(format!("pid {pid}: cgroup {rel} leaves the hierarchy")))
}

/// `base` joined with a path of `..` and names, kept under `cgroup2`.
fn resolve_relative(cgroup2: &Path, base: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<&str> = base
        .strip_prefix(cgroup2)
        .ok()?
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            parts.pop()?;
        } else {
            parts.push(part);
        }
    }
    Some(parts.iter().fold(cgroup2.to_path_buf(), |p, s| p.join(s)))
}

/// The directory of the hierarchy this process is in (bounded search).
fn find_own_cgroup(cgroup2: &Path) -> io::Result<PathBuf> {
    const MAX_DIRS: usize = 200_000;
    let me = std::process::id().to_string();
    let mut queue = std::collections::VecDeque::from([cgroup2.to_path_buf()]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        seen += 1;
        if seen > MAX_DIRS {
            break;
        }
        if fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim() == me))
        {
            return Ok(dir);
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            queue.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Err(io::Error::other(format!(
        "cannot find this process's own cgroup under {} (needed to read callers' cgroups from \
         inside a cgroup namespace): mount the host's cgroup2 hierarchy into the agent",
        cgroup2.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn cgroupfs_layouts() {
        let root = p("/cg/kubepods");
        let got = derive(
            &root,
            &p(&format!("/cg/kubepods/burstable/pod{UID}/abc123")),
        )
        .unwrap();
        assert_eq!(got.uid, UID);
        assert_eq!(got.pod, p(&format!("/cg/kubepods/burstable/pod{UID}")));
        assert_eq!(
            got.container,
            p(&format!("/cg/kubepods/burstable/pod{UID}/abc123"))
        );
        // Guaranteed QoS: no QoS level. Nested cgroups inside the container count as it.
        let got = derive(&root, &p(&format!("/cg/kubepods/pod{UID}/c1/nested"))).unwrap();
        assert_eq!(got.container, p(&format!("/cg/kubepods/pod{UID}/c1")));
    }

    #[test]
    fn systemd_layouts() {
        let root = p("/cg/kubepods.slice");
        let u = UID.replace('-', "_");
        let pod = format!(
            "/cg/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
        );
        let got = derive(&root, &p(&format!("{pod}/cri-containerd-42.scope"))).unwrap();
        assert_eq!(got.uid, UID);
        assert_eq!(got.pod, p(&pod));
        let got = derive(
            &root,
            &p(&format!("/cg/kubepods.slice/kubepods-pod{u}.slice/x.scope")),
        )
        .unwrap();
        assert_eq!(got.uid, UID);
    }

    #[test]
    fn refusals() {
        let root = p("/cg/kubepods");
        assert_eq!(
            derive(&root, &p("/cg/system.slice/sshd.service"))
                .unwrap_err()
                .reason(),
            "outside_pods"
        );
        assert_eq!(
            derive(&root, &p("/cg/kubepods")).unwrap_err().reason(),
            "not_in_pod"
        );
        assert_eq!(
            derive(&root, &p("/cg/kubepods/burstable"))
                .unwrap_err()
                .reason(),
            "not_in_pod"
        );
        assert_eq!(
            derive(&root, &p(&format!("/cg/kubepods/burstable/pod{UID}")))
                .unwrap_err()
                .reason(),
            "not_in_container"
        );
        // A sibling whose name only starts like the root is outside it.
        assert_eq!(
            derive(&root, &p(&format!("/cg/kubepods2/pod{UID}/c")))
                .unwrap_err()
                .reason(),
            "outside_pods"
        );
        // Not a UID.
        assert_eq!(
            derive(&root, &p("/cg/kubepods/podcast/c"))
                .unwrap_err()
                .reason(),
            "not_in_pod"
        );
        // Pod level too deep (below a container) is not believed.
        assert_eq!(
            derive(&root, &p(&format!("/cg/kubepods/a/b/pod{UID}/c")))
                .unwrap_err()
                .reason(),
            "not_in_pod"
        );
    }

    #[test]
    fn paths_relative_to_a_cgroup_namespace() {
        let cg2 = p("/cg");
        let base = p("/cg/kubepods/besteffort/podX/agent");
        assert_eq!(
            resolve_relative(&cg2, &base, "/../../../burstable/podY/c"),
            Some(p("/cg/kubepods/burstable/podY/c"))
        );
        assert_eq!(resolve_relative(&cg2, &base, "/../../../../.."), None);
        assert_eq!(resolve_relative(&cg2, &cg2, "/.."), None);
    }

    #[test]
    fn uids_compare_canonically() {
        assert_eq!(canonical_uid("0F1E_2D"), "0f1e-2d");
    }
}
