//! The commands the README and the guides in `docs/` show still work as written: every
//! `sidecar …` and `cargo xtask …` they name (in code blocks and in inline code) is a real
//! subcommand, and every flag it passes is one of that subcommand's options (asked of the
//! built binaries' `--help`, so a renamed or removed flag fails here, naming the file and
//! line). Running each command for real is the business of the tests of its feature.
//!
//! Needs no privileges. It reads the repository's Markdown, which the kernel matrix's guests
//! do not carry, so it runs on the host only.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

/// A command as the docs write it.
#[derive(Debug)]
struct Shown {
    /// `README.md:155`
    at: String,
    /// `sidecar` or `xtask`.
    program: &'static str,
    /// The words after the program, up to `--` (the workload's own command follows it).
    words: Vec<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn markdown_files() -> Vec<PathBuf> {
    let root = workspace();
    let mut files = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The commands in `text`: lines of code blocks (a trailing `\` continues them) and inline
/// code spans that start a `sidecar` or `cargo xtask` command.
fn commands_in(file: &str, text: &str) -> Vec<Shown> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            let (start, joined) = match pending.take() {
                Some((start, before)) => (start, format!("{before} {}", line.trim())),
                None => (n, line.trim().to_string()),
            };
            if let Some(cont) = joined.strip_suffix('\\') {
                pending = Some((start, cont.to_string()));
                continue;
            }
            out.extend(parse(&format!("{file}:{start}"), &joined));
        } else {
            for (k, span) in line.split('`').enumerate() {
                if k % 2 == 1 {
                    out.extend(parse(&format!("{file}:{n}"), span));
                }
            }
        }
    }
    out
}

/// The command `text` shows, if it shows one: `sidecar WORDS` or `cargo xtask WORDS`, after
/// whatever leads up to it (a prompt, `sudo`, a path to the binary, `kubectl exec … --`).
/// A `#` comment ends it.
fn parse(at: &str, text: &str) -> Option<Shown> {
    let text = text.split(" #").next().unwrap_or("");
    let words: Vec<&str> = text.split_whitespace().collect();
    let (program, start) = words.iter().enumerate().find_map(|(i, w)| {
        let prev = i.checked_sub(1).map(|p| words[p]);
        if *w == "xtask" && prev == Some("cargo") {
            Some(("xtask", i + 1))
        } else if (*w == "sidecar" || w.ends_with("/sidecar"))
            && prev.is_none_or(|p| ["sudo", "-E", "--", "$", "exec"].contains(&p))
        {
            Some(("sidecar", i + 1))
        } else {
            None
        }
    })?;
    let rest: Vec<String> = words[start..]
        .iter()
        .take_while(|w| **w != "--")
        .map(|w| w.trim_end_matches([',', ';', ')']).to_string())
        .collect();
    // A bare program name in prose ("the sidecar binary") is no command.
    let first = rest.first()?;
    if !first.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
        return None;
    }
    Some(Shown {
        at: at.to_string(),
        program,
        words: rest,
    })
}

/// The built binaries: `sidecar` and xtask, next to this test's profile directory.
fn binary(program: &str) -> PathBuf {
    match program {
        "sidecar" => sidecar_tests::sidecar_bin(),
        _ => {
            let path = sidecar_tests::sidecar_bin().with_file_name("xtask");
            assert!(
                path.is_file(),
                "xtask is not built at {} (`cargo xtask test` builds it)",
                path.display()
            );
            path
        }
    }
}

/// `--help` of `program` with `path` (subcommand words), or `None` if that is no subcommand.
type Cache = HashMap<(String, Vec<String>), Option<String>>;

fn help(cache: &mut Cache, program: &str, path: &[String]) -> Option<String> {
    cache
        .entry((program.to_string(), path.to_vec()))
        .or_insert_with(|| {
            let out = Command::new(binary(program))
                .args(path)
                .arg("--help")
                .output()
                .expect("run --help");
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .clone()
}

/// The `--options` a `--help` text lists (`--admin-addr <ADDR|off>`, `[--json]`, `--x=N`).
fn options_in(help_text: &str) -> impl Iterator<Item = &str> {
    help_text
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | '<' | '='))
        .map(|t| t.trim_end_matches([']', '.']))
        .filter(|t| t.starts_with("--") && t.len() > 2)
}

/// What is wrong with `shown`, if anything.
fn check(cache: &mut Cache, shown: &Shown) -> Option<String> {
    let program = shown.program;
    // The longest run of leading words that names a subcommand (`policy check`, `cert ca`).
    let mut path: Vec<String> = Vec::new();
    for w in &shown.words {
        if w.starts_with('-') {
            break;
        }
        let mut longer = path.clone();
        longer.push(w.clone());
        if help(cache, program, &longer).is_some() {
            path = longer;
        } else {
            break;
        }
    }
    if path.is_empty() {
        return Some(format!(
            "{}: `{program} {}`: {:?} is not a subcommand of {program}",
            shown.at,
            shown.words.join(" "),
            shown.words[0]
        ));
    }
    let text = help(cache, program, &path).expect("checked above");
    for w in &shown.words {
        let Some(flag) = w.strip_prefix("--") else {
            continue;
        };
        let name = flag.split('=').next().unwrap_or(flag);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            continue;
        }
        let listed = options_in(&text).any(|o| o == format!("--{name}"));
        if !listed {
            return Some(format!(
                "{}: `{program} {}`: --{name} is not an option of `{program} {}`",
                shown.at,
                shown.words.join(" "),
                path.join(" ")
            ));
        }
    }
    None
}

#[test]
fn documented_commands_are_subcommands_with_real_flags() {
    let root = workspace();
    let mut shown = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        shown.extend(commands_in(&name, &text));
    }
    // The README alone shows the demo, the tests and three `sidecar` commands.
    assert!(
        shown.len() >= 20,
        "found only {} commands in the docs: {shown:#?}",
        shown.len()
    );
    let mut cache = Cache::new();
    let problems: Vec<String> = shown.iter().filter_map(|s| check(&mut cache, s)).collect();
    assert!(
        problems.is_empty(),
        "{} documented command(s) do not work as written:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// Flags of other tools the docs name in inline code (cargo's, apt-get's), which no help of
/// ours lists, and `--inbound-ports`, which docs/operations.md names as a flag we do not have.
const NOT_OURS: [&str; 5] = [
    "--locked",
    "--ignore-rust-version",
    "--help",
    "--no-upgrade",
    "--inbound-ports",
];

/// The subcommands `program path` lists under `Commands:` (without `help`).
fn subcommands(help_text: &str) -> Vec<String> {
    help_text
        .split("Commands:")
        .nth(1)
        .map(|rest| {
            rest.lines()
                .skip(1)
                .take_while(|l| l.starts_with("  "))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|w| *w != "help")
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Every `--option` any subcommand of `program` lists, at any depth.
fn all_options(cache: &mut Cache, program: &str, path: Vec<String>, out: &mut Vec<String>) {
    let text = help(cache, program, &path).expect("a listed subcommand has a help");
    out.extend(options_in(&text).map(String::from));
    for sub in subcommands(&text) {
        let mut deeper = path.clone();
        deeper.push(sub);
        all_options(cache, program, deeper, out);
    }
}

/// A flag the prose names on its own (`--sockmap`) is an option of one of our commands.
#[test]
fn flags_named_in_prose_are_options_of_a_command() {
    let root = workspace();
    let mut cache = Cache::new();
    let mut known = Vec::new();
    all_options(&mut cache, "sidecar", Vec::new(), &mut known);
    all_options(&mut cache, "xtask", Vec::new(), &mut known);
    assert!(known.iter().any(|o| o == "--sockmap"), "{known:?}");
    let mut problems = Vec::new();
    let mut seen = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        for (i, line) in text.lines().enumerate() {
            for span in line.split('`').skip(1).step_by(2) {
                let Some(first) = span.split_whitespace().next() else {
                    continue;
                };
                let flag = first.split('=').next().unwrap_or(first);
                if !flag.starts_with("--") || flag.contains('/') {
                    continue;
                }
                seen += 1;
                if !known.iter().any(|o| o == flag) && !NOT_OURS.contains(&flag) {
                    problems.push(format!("{name}:{}: `{span}`", i + 1));
                }
            }
        }
    }
    assert!(seen >= 50, "found only {seen} flags in the docs' prose");
    assert!(
        problems.is_empty(),
        "flags in the docs that no command of ours has:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn a_wrong_flag_or_subcommand_in_the_docs_is_caught() {
    let mut cache = Cache::new();
    let text = "```\nsudo sidecar run --proxy-port 15001 -- curl --no-such-curl-flag x\n\
                sidecar run --no-such-flag -- true\n```\n\
                Try `sidecar polcy check p.toml` or `cargo xtask bench --quick`.\n";
    let shown = commands_in("t.md", text);
    let verdicts: Vec<Option<String>> = shown.iter().map(|s| check(&mut cache, s)).collect();
    assert_eq!(verdicts.len(), 4, "{shown:#?}");
    assert_eq!(verdicts[0], None, "flags after `--` are the workload's");
    let bad_flag = verdicts[1].as_deref().unwrap_or("");
    assert!(
        bad_flag.contains("t.md:3") && bad_flag.contains("--no-such-flag"),
        "{bad_flag}"
    );
    let bad_sub = verdicts[2].as_deref().unwrap_or("");
    assert!(
        bad_sub.contains("\"polcy\" is not a subcommand"),
        "{bad_sub}"
    );
    assert_eq!(verdicts[3], None, "{:?}", verdicts[3]);
}
