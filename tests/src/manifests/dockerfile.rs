//! The Dockerfile builds what the manifests run. Nothing else ties the two together: a
//! renamed stage, a moved binary or a root proxy image would only show once deployed.

use std::path::Path;

use super::{
    BINARY, Doc, PROXY_UID,
    images::{AGENT_IMAGE, PROXY_IMAGE, image_name_tag},
    pod::each_sidecar,
};

/// The Dockerfile builds what the manifests run: the stages exist, every COPY source is in
/// the repository (and not dockerignored), the binary lands where the manifests call it, the
/// proxy image is not root.
pub fn check(workspace: &Path, text: &str, dockerignore: &str, docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Logical lines: continuations joined.
    let joined = text.replace("\\\n", " ");
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for line in joined.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_uppercase()).as_deref() {
            Some("FROM") => {
                let name = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("AS"))
                    .and_then(|i| words.get(i + 1))
                    .unwrap_or(&"")
                    .to_string();
                stages.push((name, Vec::new()));
            }
            Some(_) => {
                if let Some((_, lines)) = stages.last_mut() {
                    lines.push(line.to_string());
                }
            }
            None => {}
        }
    }
    let stage = |name: &str| stages.iter().find(|(n, _)| n == name).map(|(_, l)| l);
    for name in ["builder", AGENT_IMAGE.1, PROXY_IMAGE.1] {
        if stage(name).is_none() {
            p.push(format!("Dockerfile: no stage {name:?}"));
        }
    }
    for (name, lines) in &stages {
        for line in lines
            .iter()
            .filter(|l| l.to_ascii_uppercase().starts_with("COPY "))
        {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            if words.iter().any(|w| w.starts_with("--from=")) {
                continue;
            }
            let args: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
            for src in &args[..args.len().saturating_sub(1)] {
                let src = src.trim_end_matches('/');
                if src == "." {
                    continue;
                }
                if !workspace.join(src).exists() {
                    p.push(format!(
                        "Dockerfile stage {name}: COPY {src}: not in the repository"
                    ));
                }
                if ignored.iter().any(|i| i.trim_end_matches('/') == src) {
                    p.push(format!(
                        "Dockerfile stage {name}: COPY {src}: excluded by .dockerignore"
                    ));
                }
            }
        }
    }
    for target in [AGENT_IMAGE.1, PROXY_IMAGE.1] {
        let Some(lines) = stage(target) else { continue };
        let copies_binary = lines.iter().any(|l| {
            l.to_ascii_uppercase().starts_with("COPY ")
                && l.contains("--from=builder")
                && l.split_whitespace().last() == Some(BINARY)
        });
        if !copies_binary {
            p.push(format!(
                "Dockerfile stage {target}: does not COPY --from=builder the binary to {BINARY}"
            ));
        }
        let user = lines
            .iter()
            .rfind(|l| l.to_ascii_uppercase().starts_with("USER "))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(|u| u.split(':').next().unwrap_or(u).to_string());
        if target == PROXY_IMAGE.1 && user.as_deref() != Some(&PROXY_UID.to_string()) {
            p.push(format!(
                "Dockerfile stage {target}: USER is {user:?}, not the numeric non-root {PROXY_UID} \
                 (runAsNonRoot can only verify a numeric user)"
            ));
        }
    }
    // The manifests run the binary of the image built from the matching stage.
    for (mode, (image, _)) in [("agent", AGENT_IMAGE), ("proxy", PROXY_IMAGE)] {
        each_sidecar(docs, mode, |c| {
            let (name, _) = image_name_tag(c.value["image"].as_str().unwrap_or(""));
            if name != image {
                p.push(format!(
                    "{}: runs `sidecar {mode}` from image {name}",
                    c.label()
                ));
            }
        });
    }
    // The builder is a developer machine: the workspace's toolchain, xtask's eBPF build.
    if let Some(lines) = stage("builder") {
        let runs = lines
            .iter()
            .filter(|l| l.to_ascii_uppercase().starts_with("RUN "))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        for needed in ["cargo xtask build-ebpf", "--locked"] {
            if !runs.contains(needed) {
                p.push(format!("Dockerfile stage builder: no RUN uses {needed:?}"));
            }
        }
    }
    let cargo_toml = std::fs::read_to_string(workspace.join("Cargo.toml")).unwrap_or_default();
    let rust_version = cargo_toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string());
    let arg = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG RUST_VERSION="))
        .map(str::to_owned);
    if arg.is_none() || arg != rust_version {
        p.push(format!(
            "Dockerfile: ARG RUST_VERSION={arg:?}, the workspace's rust-version is {rust_version:?}"
        ));
    }
    if !ignored.iter().any(|i| i.trim_end_matches('/') == "target") {
        p.push(".dockerignore: target/ is not excluded (gigabytes of build context)".into());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        manifests::{
            parse,
            testing::{PROXY_POD, edited},
        },
        scratch::Scratch,
    };

    /// The shape of our Dockerfile: a builder, then the two runtime stages.
    const DOCKERFILE: &str = "\
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION} AS builder
COPY Cargo.toml ./
COPY src/ src
RUN cargo xtask build-ebpf \\
 && cargo build --release --locked
FROM distroless AS agent
COPY --from=builder /out/sidecar /usr/local/bin/sidecar
FROM distroless:nonroot AS proxy
COPY --from=builder /out/sidecar /usr/local/bin/sidecar
USER 65532:65532
";

    #[test]
    fn the_dockerfile_builds_what_the_manifests_run() {
        let workspace = Scratch::new("manifests-dockerfile");
        workspace.write(
            "Cargo.toml",
            "[workspace.package]\nrust-version = \"1.95\"\n",
        );
        std::fs::create_dir_all(workspace.path("src")).unwrap();
        let docs = parse("fixture.yaml", &edited("", ""));
        let edit = |from: &str, to: &str| {
            assert!(DOCKERFILE.contains(from), "{from:?}");
            DOCKERFILE.replacen(from, to, 1)
        };
        let ignore = "# build outputs\ntarget/\n";
        let cases = [
            ("ours", edit("", ""), ignore, None),
            (
                "lower-case instructions, the user without its group",
                edit("USER 65532:65532", "user 65532").replace("COPY", "copy"),
                ignore,
                None,
            ),
            (
                "a stage renamed",
                edit("AS agent", "AS node-agent"),
                ignore,
                Some("Dockerfile: no stage \"agent\""),
            ),
            (
                "a COPY of a missing path",
                edit("COPY src/ src", "COPY tools tools"),
                ignore,
                Some("Dockerfile stage builder: COPY tools: not in the repository"),
            ),
            (
                "a COPY of an ignored path",
                edit("", ""),
                "target\nsrc/\n",
                Some("Dockerfile stage builder: COPY src: excluded by .dockerignore"),
            ),
            (
                "the binary elsewhere",
                edit(
                    "/out/sidecar /usr/local/bin/sidecar",
                    "/out/sidecar /sidecar",
                ),
                ignore,
                Some(
                    "Dockerfile stage agent: does not COPY --from=builder the binary to /usr/local/bin/sidecar",
                ),
            ),
            (
                "the proxy as root",
                edit("USER 65532:65532", "USER root"),
                ignore,
                Some(
                    "Dockerfile stage proxy: USER is Some(\"root\"), not the numeric non-root 65532",
                ),
            ),
            (
                "the proxy without a USER",
                edit("USER 65532:65532\n", ""),
                ignore,
                Some("USER is None"),
            ),
            (
                "no xtask eBPF build",
                edit("cargo xtask build-ebpf \\\n && ", ""),
                ignore,
                Some("Dockerfile stage builder: no RUN uses \"cargo xtask build-ebpf\""),
            ),
            (
                "not --locked",
                edit(" --locked", ""),
                ignore,
                Some("no RUN uses \"--locked\""),
            ),
            (
                "another toolchain",
                edit("RUST_VERSION=1.95", "RUST_VERSION=1.90"),
                ignore,
                Some(
                    "Dockerfile: ARG RUST_VERSION=Some(\"1.90\"), the workspace's rust-version is Some(\"1.95\")",
                ),
            ),
            (
                "target/ in the build context",
                edit("", ""),
                "",
                Some(".dockerignore: target/ is not excluded"),
            ),
        ];
        let mut wrong = Vec::new();
        for (name, text, dockerignore, expect) in cases {
            let problems = check(&workspace.dir, &text, dockerignore, &docs);
            let ok = match expect {
                None => problems.is_empty(),
                Some(expect) => problems.iter().any(|p| p.contains(expect)),
            };
            if !ok {
                wrong.push(format!("{name}: expected {expect:?}, got {problems:#?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn each_image_runs_its_own_mode() {
        let workspace = Scratch::new("manifests-dockerfile-modes");
        workspace.write("Cargo.toml", "rust-version = \"1.95\"\n");
        std::fs::create_dir_all(workspace.path("src")).unwrap();
        let agent_image_as_proxy = PROXY_POD.replace(
            "registry.example/sidecar-proxy:0.1.0",
            "registry.example/sidecar-agent:0.1.0",
        );
        let problems = check(
            &workspace.dir,
            DOCKERFILE,
            "target\n",
            &parse("pod.yaml", &agent_image_as_proxy),
        );
        assert_eq!(
            problems,
            ["pod.yaml Pod/app container sidecar: runs `sidecar proxy` from image sidecar-agent"]
        );
    }
}
