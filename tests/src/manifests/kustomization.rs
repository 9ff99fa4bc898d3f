//! `kubectl apply -k` applies what a kustomization lists, not what is in the directory: a new
//! file left out would silently not be deployed, a stale entry fails the apply.

use std::{collections::BTreeSet, path::Path};

use super::{Doc, seq};

/// Each kustomization lists exactly the YAML files beside it, and they exist.
pub fn check(workspace: &Path, docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    for doc in docs.iter().filter(|d| d.kind() == "Kustomization") {
        let dir = workspace.join(&doc.file).parent().unwrap().to_path_buf();
        let listed: BTreeSet<String> = seq(&doc.value["resources"])
            .iter()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        let present: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
            .collect();
        for missing in listed.difference(&present) {
            p.push(format!("{}: lists {missing}, which is not there", doc.file));
        }
        for unlisted in present.difference(&listed) {
            p.push(format!("{}: does not list {unlisted}", doc.file));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{manifests::parse, scratch::Scratch};

    #[test]
    fn a_kustomization_lists_exactly_the_yaml_beside_it() {
        let workspace = Scratch::new("manifests-kustomization");
        let deploy = workspace.path("deploy");
        std::fs::create_dir_all(&deploy).unwrap();
        for file in ["a.yaml", "b.yaml", "kustomization.yaml", "notes.md"] {
            std::fs::write(deploy.join(file), "").unwrap();
        }
        for (name, resources, expect) in [
            ("both", "[a.yaml, b.yaml]", None),
            (
                "one left out",
                "[a.yaml]",
                Some("deploy/kustomization.yaml: does not list b.yaml"),
            ),
            (
                "one that is not there",
                "[a.yaml, b.yaml, c.yaml]",
                Some("deploy/kustomization.yaml: lists c.yaml, which is not there"),
            ),
            ("none", "[]", Some("does not list a.yaml")),
        ] {
            let docs = parse(
                "deploy/kustomization.yaml",
                &format!("kind: Kustomization\nresources: {resources}\n"),
            );
            let problems = check(&workspace.dir, &docs);
            match expect {
                None => assert!(problems.is_empty(), "{name}: {problems:#?}"),
                Some(text) => assert!(
                    problems.iter().any(|p| p == text || p.contains(text)),
                    "{name}: expected {text:?}, got {problems:#?}"
                ),
            }
        }
    }
}
