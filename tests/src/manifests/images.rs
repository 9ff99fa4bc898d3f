//! Our two images, under their names, at the workspace's version: a manifest must not run
//! some other build, nor the agent's image as the proxy.

use std::collections::BTreeSet;

use super::{Doc, pod::each_sidecar, seq};

/// Image names (repository part) and the Dockerfile stage each is built from.
pub const AGENT_IMAGE: (&str, &str) = ("sidecar-agent", "agent");
pub const PROXY_IMAGE: (&str, &str) = ("sidecar-proxy", "proxy");

/// `name:tag` of an image reference (registry and digest ignored).
pub fn image_name_tag(image: &str) -> (String, Option<String>) {
    let last = image.rsplit('/').next().unwrap_or(image);
    let without_digest = last.split('@').next().unwrap_or(last);
    match without_digest.split_once(':') {
        Some((n, t)) => (n.to_string(), Some(t.to_string())),
        None => (without_digest.to_string(), None),
    }
}

/// Our two images, by their names, at the workspace's version; the kustomization can retag
/// exactly those.
pub fn check(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let version = env!("CARGO_PKG_VERSION");
    for (mode, (image, _)) in [
        ("agent", AGENT_IMAGE),
        ("uninstall", AGENT_IMAGE),
        ("proxy", PROXY_IMAGE),
    ] {
        each_sidecar(docs, mode, |c| {
            let got = c.value["image"].as_str().unwrap_or("");
            let (name, tag) = image_name_tag(got);
            if name != image || tag.as_deref() != Some(version) {
                p.push(format!(
                    "{}: image {got:?}, expected {image}:{version}",
                    c.label()
                ));
            }
        });
    }
    let ours = [AGENT_IMAGE.0, PROXY_IMAGE.0];
    for doc in docs.iter().filter(|d| d.kind() == "Kustomization") {
        let mut names = BTreeSet::new();
        for i in seq(&doc.value["images"]) {
            let name = i["name"].as_str().unwrap_or("");
            names.insert(name);
            if !ours.contains(&name) || i["newTag"].as_str() != Some(version) {
                p.push(format!(
                    "{}: images entry {name}:{:?} is not one of ours ({ours:?}) at {version}",
                    doc.file,
                    i["newTag"].as_str()
                ));
            }
        }
        if doc.file == "deploy/kustomization.yaml" && names != ours.into_iter().collect() {
            p.push(format!("{}: images {names:?}, expected {ours:?}", doc.file));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{
        parse,
        testing::{edited, run_table},
    };

    #[test]
    fn our_images_at_our_version_and_the_kustomization_retags_only_those() {
        let kustomization = |images: &str| {
            format!("kind: Kustomization\nmetadata: {{name: k}}\nimages: {images}\n")
        };
        let cases = [
            ("the proxy, agent and uninstall", edited("", ""), None),
            (
                "pinned by digest too",
                edited(
                    "sidecar-proxy:0.1.0",
                    "sidecar-proxy:0.1.0@sha256:0123456789abcdef",
                ),
                None,
            ),
            (
                "the agent's image as the proxy",
                edited(
                    "registry.example/sidecar-proxy:0.1.0",
                    "registry.example/sidecar-agent:0.1.0",
                ),
                Some(
                    "image \"registry.example/sidecar-agent:0.1.0\", expected sidecar-proxy:0.1.0",
                ),
            ),
            (
                "latest",
                edited("image: sidecar-agent:0.1.0", "image: sidecar-agent:latest"),
                Some("image \"sidecar-agent:latest\", expected sidecar-agent:0.1.0"),
            ),
            (
                "no tag",
                edited("image: sidecar-agent:0.1.0", "image: sidecar-agent"),
                Some("expected sidecar-agent:0.1.0"),
            ),
            (
                "a kustomization retagging ours",
                kustomization("[{name: sidecar-agent, newTag: 0.1.0}]"),
                None,
            ),
            (
                "a kustomization retagging something else",
                kustomization("[{name: sidecar, newTag: 0.1.0}]"),
                Some("images entry sidecar:Some(\"0.1.0\") is not one of ours"),
            ),
            (
                "a kustomization retagging ours to another version",
                kustomization("[{name: sidecar-proxy, newTag: latest}]"),
                Some("is not one of ours ([\"sidecar-agent\", \"sidecar-proxy\"]) at 0.1.0"),
            ),
        ];
        run_table(cases, check);
    }

    #[test]
    fn the_main_kustomization_retags_both_images() {
        for (images, ok) in [
            (
                "[{name: sidecar-agent, newTag: 0.1.0}, {name: sidecar-proxy, newTag: 0.1.0}]",
                true,
            ),
            ("[{name: sidecar-agent, newTag: 0.1.0}]", false),
        ] {
            let docs = parse(
                "deploy/kustomization.yaml",
                &format!("kind: Kustomization\nimages: {images}\n"),
            );
            let problems = check(&docs);
            assert_eq!(problems.is_empty(), ok, "{images}: {problems:#?}");
            if !ok {
                assert!(problems[0].starts_with(
                    "deploy/kustomization.yaml: images {\"sidecar-agent\"}, expected"
                ));
            }
        }
    }

    #[test]
    fn image_references_are_read_as_name_and_tag() {
        for (image, name, tag) in [
            ("sidecar-proxy:0.1.0", "sidecar-proxy", Some("0.1.0")),
            ("sidecar-proxy", "sidecar-proxy", None),
            (
                "registry:5000/team/sidecar-proxy:0.1.0",
                "sidecar-proxy",
                Some("0.1.0"),
            ),
            ("sidecar-proxy@sha256:abc", "sidecar-proxy", None),
            (
                "ghcr.io/x/sidecar-agent:0.1.0@sha256:abc",
                "sidecar-agent",
                Some("0.1.0"),
            ),
        ] {
            assert_eq!(
                image_name_tag(image),
                (name.to_string(), tag.map(str::to_string)),
                "{image}"
            );
        }
    }
}
