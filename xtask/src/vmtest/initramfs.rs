//! Packs the guest: `/init`, `/dev/console`, the binaries at the same absolute paths as on
//! the host (the tests find their helpers through paths compiled into them), host tools the
//! tests call (with the shared libraries they load), and the plan `/init` follows.

use std::{
    collections::BTreeSet,
    fs,
    io::BufWriter,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{build::Prepared, cpio::Archive, guest::PLAN};

/// Files of the guest, by absolute path in the guest.
#[derive(Default)]
pub struct Contents {
    files: Vec<(String, Source)>,
    dirs: BTreeSet<String>,
    plan: String,
}

enum Source {
    Host(PathBuf, u32),
    Bytes(Vec<u8>, u32),
    Symlink(String),
}

impl Contents {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a host file under the same path, or `guest` when given.
    pub fn add_file(&mut self, host: &Path, guest: Option<&str>) -> Result<()> {
        let guest = guest
            .map(str::to_owned)
            .unwrap_or_else(|| host.display().to_string());
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(host)
                .with_context(|| format!("{} is missing", host.display()))?
                .permissions()
                .mode()
                & 0o7777
        };
        self.add_parents(&guest);
        self.files
            .push((guest, Source::Host(host.to_path_buf(), mode)));
        Ok(())
    }

    pub fn add_bytes(&mut self, guest: &str, bytes: Vec<u8>, mode: u32) {
        self.add_parents(guest);
        self.files
            .push((guest.to_owned(), Source::Bytes(bytes, mode)));
    }

    pub fn add_symlink(&mut self, guest: &str, target: &str) {
        self.add_parents(guest);
        self.files
            .push((guest.to_owned(), Source::Symlink(target.to_owned())));
    }

    pub fn plan(&mut self, line: &str) {
        self.plan.push_str(line);
        self.plan.push('\n');
    }

    fn add_parents(&mut self, guest: &str) {
        let mut path = Path::new(guest).parent();
        while let Some(p) = path {
            let s = p.display().to_string();
            if s != "/" && !s.is_empty() {
                self.dirs.insert(s);
            }
            path = p.parent();
        }
    }

    /// Writes the archive to `out`; returns its size in bytes.
    pub fn write(mut self, out: &Path) -> Result<u64> {
        let plan = std::mem::take(&mut self.plan);
        self.add_bytes(PLAN, plan.into_bytes(), 0o644);
        for d in ["/dev", "/proc", "/sys", "/tmp", "/run", "/root"] {
            self.dirs.insert(d.into());
        }
        let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut a = Archive::new(BufWriter::new(file));
        // BTreeSet order puts every parent before its children.
        for d in &self.dirs {
            a.dir(d)?;
        }
        a.char_dev("/dev/console", 5, 1)?;
        a.char_dev("/dev/null", 1, 3)?;
        for (guest, source) in &self.files {
            match source {
                Source::Host(host, mode) => {
                    let bytes =
                        fs::read(host).with_context(|| format!("reading {}", host.display()))?;
                    a.file(guest, *mode, &bytes)?;
                }
                Source::Bytes(bytes, mode) => a.file(guest, *mode, bytes)?,
                Source::Symlink(target) => a.symlink(guest, target)?,
            }
        }
        use std::io::Write;
        a.finish()?.flush()?;
        Ok(fs::metadata(out)?.len())
    }
}

/// What the guest runs besides the defaults.
pub struct Plan<'a> {
    /// Only these integration test targets (by crate name); empty: all.
    pub tests: &'a [String],
    /// libtest's name filter for every target.
    pub filter: Option<&'a str>,
    /// Tests excluded on this kernel (see `exclusions.rs`), by full name.
    pub skip: Vec<&'static str>,
    /// Whole test executables excluded on this kernel (see `exclusions.rs`), by target name.
    pub skip_targets: Vec<&'static str>,
    /// A sidecar to put in place of the built one (already stripped).
    pub sidecar: Option<&'a Path>,
}

/// The guest for one kernel: the binaries, the plan and the modules to load.
pub fn contents(prepared: &Prepared, modules: &[PathBuf], plan: &Plan) -> Result<Contents> {
    let bins = prepared.bins;
    let mut c = Contents::new();
    c.add_file(&prepared.file(&bins.init)?, Some("/init"))?;
    super::userland::add_tools(&mut c)?;
    let sidecar = bins.profile_dir.join("sidecar");
    for path in bins.helpers()? {
        let guest = path.display().to_string();
        match plan.sidecar {
            Some(replacement) if path == sidecar => c.add_file(replacement, Some(&guest))?,
            _ => c.add_file(&prepared.file(&path)?, Some(&guest))?,
        }
    }
    for module in modules {
        let name = module.file_name().context("module name")?.to_string_lossy();
        let guest = format!("/vm/modules/{name}");
        c.add_file(module, Some(&guest))?;
        c.plan(&format!("module {guest}"));
    }
    c.plan(&format!("probe {}", sidecar.display()));
    let mut args = vec!["--test-threads=1".to_owned()];
    if let Some(f) = plan.filter {
        args.push(f.to_owned());
    }
    for name in &plan.skip {
        args.push(format!("--skip={name}"));
    }
    for test in &bins.tests {
        if !plan.tests.is_empty() && !plan.tests.iter().any(|t| target_name(test) == *t) {
            continue;
        }
        if plan.skip_targets.contains(&target_name(test).as_str()) {
            continue;
        }
        c.add_file(&prepared.file(test)?, Some(&test.display().to_string()))?;
        c.plan(&format!("test {} {}", test.display(), args.join(" ")));
    }
    Ok(c)
}

/// `interception` for `.../deps/interception-0123abcd`.
fn target_name(exe: &Path) -> String {
    let name = exe.file_name().unwrap_or_default().to_string_lossy();
    match name.rsplit_once('-') {
        Some((stem, _hash)) => stem.to_owned(),
        None => name.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_drop_the_hash() {
        assert_eq!(
            target_name(Path::new("/t/deps/interception-164f77418da80990")),
            "interception"
        );
        assert_eq!(target_name(Path::new("/t/deps/iptables")), "iptables");
    }
}
