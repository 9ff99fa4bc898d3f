//! The user half's module layout holds: the commands in `cmd/` are the only wiring, no
//! concern imports a command, and the top-level modules import each other without a circle
//! (a circle means neither side can be read or changed alone). Read from the sources, so a
//! new `use crate::…` that breaks a rule fails here with the file that added it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sidecar-user/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`proxy` for `proxy/mod.rs`, `cmd` for anything
/// under `cmd/`), or `None` for the crate roots.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        _ => Some(first.trim_end_matches(".rs").to_string()),
    }
}

/// The top-level modules named after `crate::` in `text`: `crate::a::…` and each item of a
/// `crate::{a::…, b, …}` group. Comments are dropped first.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top level: names after `{` or a `,` at depth 0.
            let (mut depth, mut start) = (0usize, true);
            let mut word = String::new();
            for c in group.chars() {
                if depth == 0 && matches!(c, ',' | '}') && !word.is_empty() {
                    names.insert(std::mem::take(&mut word));
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && depth == 0 && (c.is_ascii_alphanumeric() || c == '_') => {
                        word.push(c)
                    }
                    _ if start && !word.is_empty() => {
                        names.insert(std::mem::take(&mut word));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let word: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(word);
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

/// Module → the other top-level modules it imports, and for each edge one file that does.
fn graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut edges: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let text = fs::read_to_string(&file).unwrap();
        let deps = edges.entry(module.clone()).or_default();
        for dep in crate_imports(&text) {
            if dep != module {
                deps.entry(dep).or_insert_with(|| file.clone());
            }
        }
    }
    edges
}

#[test]
fn the_parser_reads_paths_and_groups() {
    let names = crate_imports(
        "use crate::{\n    a::b,\n    c::{d, e::f},\n    g,\n}; // crate::h\nuse crate::{k, l};\nlet x = crate::i::j();",
    );
    let expected: BTreeSet<String> = ["a", "c", "g", "i", "k", "l"].map(String::from).into();
    assert_eq!(names, expected);
}

#[test]
fn nothing_outside_cmd_imports_a_command() {
    let edges = graph();
    assert!(edges.contains_key("cmd"), "no cmd/ module: {edges:#?}");
    let leaks: Vec<String> = edges
        .iter()
        .filter(|(module, _)| module.as_str() != "cmd")
        .filter_map(|(module, deps)| {
            deps.get("cmd")
                .map(|file| format!("{module} imports cmd ({})", file.display()))
        })
        .collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let edges = graph();
    // Depth-first search from each module; a path back to it is a circle.
    fn path_back(
        edges: &BTreeMap<String, BTreeMap<String, PathBuf>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        for next in edges.get(from).into_iter().flat_map(|d| d.keys()) {
            if next == to {
                return Some(vec![from.to_string(), to.to_string()]);
            }
            if seen.insert(next.clone())
                && let Some(mut rest) = path_back(edges, next, to, seen)
            {
                rest.insert(0, from.to_string());
                return Some(rest);
            }
        }
        None
    }
    let circles: Vec<String> = edges
        .keys()
        .filter_map(|m| path_back(&edges, m, m, &mut BTreeSet::new()))
        .map(|c| {
            let why: Vec<String> = c
                .windows(2)
                .map(|w| format!("{} → {} ({})", w[0], w[1], edges[&w[0]][&w[1]].display()))
                .collect();
            why.join(", ")
        })
        .collect();
    assert!(circles.is_empty(), "import circles: {circles:#?}");
}
