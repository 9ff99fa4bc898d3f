//! The Kubernetes schemas, from `kubernetes-validate` (PyPI; the OpenAPI schemas of each
//! release bundled, so validation is offline), in strict mode: unknown fields are errors, and
//! so are kinds it has no schema for, except the ones named in [`CRD_KINDS`].
//!
//! `cargo xtask setup` (which `cargo xtask test` and `.ci/run` run) installs it into
//! `target/kubernetes-validate`, a venv.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::host::output_with_timeout;

/// The Kubernetes release whose schemas the manifests must satisfy (kubernetes-validate
/// 1.37.0 bundles 1.25–1.37; `.ci/run` pins that version).
pub const KUBERNETES_VERSION: &str = "1.37.0";
/// The oldest release the manifests are for, validated too: native sidecars came in 1.29,
/// `appArmorProfile` and the `sleep` preStop action in 1.30 (1.29's schema refuses the first).
pub const OLDEST_KUBERNETES_VERSION: &str = "1.30.0";
/// (apiVersion, kind) the validator has no schema for and lets through with a warning:
/// cert-manager's CRDs and kustomize's own file. Any other unknown kind (a typo'd apiVersion,
/// say) is an error. Their fields are checked by [`super::certificates`] and
/// [`super::kustomization`] instead.
pub const CRD_KINDS: [(&str, &str); 3] = [
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
];

/// What a test without the validator says (it skips, or fails in CI).
pub const INSTALL_HINT: &str = "kubernetes-validate is not installed: `python3 -m venv \
     target/kubernetes-validate && target/kubernetes-validate/bin/pip install \
     kubernetes-validate==1.37.0` (what .ci/run does)";

/// `$SIDECAR_KUBERNETES_VALIDATE`, else `.ci/run`'s venv under the workspace's target/, else
/// PATH.
pub fn find(workspace: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SIDECAR_KUBERNETES_VALIDATE") {
        return Some(p.into());
    }
    let venv = workspace.join("target/kubernetes-validate/bin/kubernetes-validate");
    if venv.is_file() {
        return Some(venv);
    }
    crate::host::which("kubernetes-validate")
}

/// Runs the validator `bin` on `files` against the schemas of Kubernetes `version`; returns
/// the problems (see [`problems_in`]). Its whole output goes to stderr, for the test's log.
pub fn validate(bin: &Path, version: &str, files: &[PathBuf]) -> Vec<String> {
    let out = output_with_timeout(
        Command::new(bin)
            .args(["--strict", "--kubernetes-version", version])
            .args(files),
        Duration::from_secs(120),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    let mut problems = problems_in(&text);
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("kubernetes-validate exited with {}", out.status));
    }
    problems
}

/// The validator's output lines that are problems: errors, and warnings other than a missing
/// schema for one of [`CRD_KINDS`]. `INFO` lines and blank ones are not.
pub fn problems_in(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| {
            if l.starts_with("INFO ") {
                return false;
            }
            !CRD_KINDS.iter().any(|(api, kind)| {
                l.starts_with("WARN ")
                    && l.contains(&format!(
                        "Couldn't find schema for kind {kind} with api version {api} "
                    ))
            })
        })
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::problems_in;

    #[test]
    fn only_errors_and_unexpected_warnings_are_problems() {
        let missing = |kind: &str, api: &str| {
            format!(
                "WARN  a.yaml: Couldn't find schema for kind {kind} with api version {api} in 1.37.0"
            )
        };
        for (name, line, problem) in [
            ("info", "INFO  a.yaml passed".to_string(), false),
            ("blank", "   ".to_string(), false),
            (
                "a listed CRD",
                missing("Certificate", "cert-manager.io/v1"),
                false,
            ),
            (
                "kustomize's file",
                missing("Kustomization", "kustomize.config.k8s.io/v1beta1"),
                false,
            ),
            (
                "a typo'd apiVersion",
                missing("Deployment", "apps/v2"),
                true,
            ),
            (
                "a CRD at another version",
                missing("Certificate", "cert-manager.io/v1alpha2"),
                true,
            ),
            (
                "an error",
                "ERROR a.yaml: 'nmespace' was unexpected".to_string(),
                true,
            ),
            (
                "another warning",
                "WARN  a.yaml: deprecated".to_string(),
                true,
            ),
        ] {
            assert_eq!(
                problems_in(&line) == [line.clone()],
                problem,
                "{name}: {line:?}"
            );
        }
    }
}
