//! The guest kernels: pinned Debian `cloud` flavour packages, fetched through apt with a
//! private configuration (its own sources list, lists and cache under `target/vm/apt`), so
//! the host's sources and installed packages are never touched. Cached under `target/vm/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::step;

/// One kernel of the matrix.
pub struct Kernel {
    /// What `--kernel` accepts.
    pub version: &'static str,
    /// The pinned Debian packages (the `cloud` flavour: small, boots in seconds under TCG).
    /// Up to 6.18 one `linux-image-*` holds image and modules; newer kernels split them into
    /// `linux-binary-*` and `linux-modules-*`.
    pub packages: &'static [&'static str],
}

/// The matrix. Bump a pin when the archive drops it (`apt-cache search` in the private
/// configuration lists what is there).
pub const KERNELS: &[Kernel] = &[
    Kernel {
        version: "5.10",
        packages: &["linux-image-5.10.0-46-cloud-amd64"],
    },
    Kernel {
        version: "6.1",
        packages: &["linux-image-6.1.0-56-cloud-amd64"],
    },
    Kernel {
        version: "6.12",
        packages: &["linux-image-6.12.117+deb12-cloud-amd64"],
    },
    // The CI host's kernel line (trixie-backports).
    Kernel {
        version: "6.18",
        packages: &["linux-image-6.18.15+deb13-cloud-amd64"],
    },
    // The newest Debian kernel (trixie-backports): what a verifier fix reaches first.
    Kernel {
        version: "7.3",
        packages: &[
            "linux-binary-7.3.4+deb13-cloud-amd64",
            "linux-modules-7.3.4+deb13-cloud-amd64",
        ],
    },
];

pub fn find(version: &str) -> Result<&'static Kernel> {
    KERNELS
        .iter()
        .find(|k| k.version == version)
        .with_context(|| {
            let known: Vec<_> = KERNELS.iter().map(|k| k.version).collect();
            format!(
                "unknown kernel {version:?}: pass --kernel with one of {}",
                known.join(", ")
            )
        })
}

/// Where the suites live (Debian's archive signing keys, as installed on Debian hosts).
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// The extracted kernel: its image and module tree.
pub struct Extracted {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Fetches (once) and extracts the package into `vm_dir/kernels/<package>/`.
pub fn fetch(kernel: &Kernel, vm_dir: &Path) -> Result<Extracted> {
    let root = vm_dir.join("kernels").join(kernel.packages[0]);
    let done = root.join(".extracted");
    if !done.exists() {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        for package in kernel.packages {
            let deb = download(package, &vm_dir.join("apt"))?;
            step(&format!("extracting {}", deb.display()));
            crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        }
        fs::write(&done, "")?;
    }
    // bookworm and older ship /lib/modules, trixie (merged /usr) /usr/lib/modules.
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .with_context(|| format!("no lib/modules in {}", root.display()))?;
    let modules = glob_one(&modules_root, "")?;
    let vmlinuz = match glob_one(&root.join("boot"), "vmlinuz-") {
        Ok(path) => path,
        // Split packages keep the image next to its modules.
        Err(_) => modules.join("vmlinuz"),
    };
    Ok(Extracted { vmlinuz, modules })
}

/// `apt-get download` with every state and cache directory private to `apt_dir`.
fn download(package: &str, apt_dir: &Path) -> Result<PathBuf> {
    let debs = apt_dir.join("debs");
    if let Some(deb) = find_deb(&debs, package)? {
        return Ok(deb);
    }
    for dir in ["etc", "lists/partial", "cache/archives/partial", "debs"] {
        fs::create_dir_all(apt_dir.join(dir))?;
    }
    let sources = apt_dir.join("etc/sources.list");
    fs::write(&sources, SOURCES)?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-q")
            .arg(format!("-oDir::Etc::sourcelist={}", sources.display()))
            // An empty parts directory: none of the host's sources.list.d.
            .arg(format!(
                "-oDir::Etc::sourceparts={}",
                apt_dir.join("etc").display()
            ))
            .arg(format!(
                "-oDir::State::Lists={}",
                apt_dir.join("lists").display()
            ))
            .arg(format!("-oDir::Cache={}", apt_dir.join("cache").display()))
            .arg("-oAPT::Get::List-Cleanup=0")
            .args(args)
            .current_dir(&debs);
        cmd
    };
    step(&format!(
        "fetching {package} through apt (private configuration)"
    ));
    crate::run(&mut apt(&["update"]))?;
    crate::run(&mut apt(&["download", package]))?;
    find_deb(&debs, package)?.with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            debs.display()
        )
    })
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    // apt names the file <package>_<version>_<arch>.deb, escaping '+' as %2b.
    let prefix = format!("{}_", package.replace('+', "%2b"));
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if (name.starts_with(&prefix) || name.starts_with(&format!("{package}_")))
            && name.ends_with(".deb")
        {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn glob_one(dir: &Path, prefix: &str) -> Result<PathBuf> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        {
            return Ok(path);
        }
    }
    bail!("no {prefix}* in {}", dir.display())
}
