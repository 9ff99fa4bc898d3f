//! Which files in a `--tls-dir` are the certificate, the key and the trust bundle.
//!
//! Three producers write workload credentials, each with its own names:
//! - `sidecar cert issue`: `cert.pem`, `key.pem`, `bundle.pem`;
//! - a cert-manager `Certificate`'s Secret, mounted as a volume: `tls.crt`, `tls.key`,
//!   `ca.crt`;
//! - the SPIFFE helper (SPIRE): `svid.pem`, `svid_key.pem`, `svid_bundle.pem`.
//!
//! The directory must hold exactly one of these sets, complete. A mix (say `tls.crt` next to
//! `cert.pem`) is refused rather than guessed at: picking the wrong certificate would only
//! show up later, as a peer refusing our identity.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{TlsFiles, certs};

/// One producer's file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `sidecar cert issue`.
    Sidecar,
    /// A cert-manager `Certificate`'s Secret (`kubernetes.io/tls` keys plus `ca.crt`).
    CertManager,
    /// The SPIFFE helper's files (SPIRE).
    Spiffe,
}

impl Layout {
    pub const ALL: [Layout; 3] = [Layout::Sidecar, Layout::CertManager, Layout::Spiffe];

    /// The certificate, key and bundle file names, in that order.
    pub fn names(self) -> [&'static str; 3] {
        match self {
            Layout::Sidecar => [certs::CERT, certs::KEY, certs::BUNDLE],
            Layout::CertManager => ["tls.crt", "tls.key", "ca.crt"],
            Layout::Spiffe => ["svid.pem", "svid_key.pem", "svid_bundle.pem"],
        }
    }

    /// Who writes this layout, for messages and logs.
    pub fn producer(self) -> &'static str {
        match self {
            Layout::Sidecar => "sidecar cert",
            Layout::CertManager => "cert-manager Secret",
            Layout::Spiffe => "SPIFFE helper",
        }
    }

    pub fn files(self, dir: &Path) -> TlsFiles {
        let [cert, key, bundle] = self.names().map(|n| dir.join(n));
        TlsFiles { cert, key, bundle }
    }

    /// `cert.pem+key.pem+bundle.pem (sidecar cert); …`: the list every error repeats.
    fn all_described() -> String {
        Layout::ALL
            .iter()
            .map(|l| format!("{} ({})", l.names().join("+"), l.producer()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error(
        "--tls-dir {dir}: no certificate set found{found}; expected exactly one of {}",
        Layout::all_described()
    )]
    NoneComplete { dir: PathBuf, found: String },
    #[error(
        "--tls-dir {dir}: files of more than one layout ({found}); keep exactly one of {}",
        Layout::all_described()
    )]
    Mixed { dir: PathBuf, found: String },
    #[error("--tls-dir {dir}: {source}")]
    Read {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Finds the one complete layout in `dir`. A name counts as present when it resolves to a
/// file (kubelet's Secret volumes hold symlinks into `..data/`: they are followed).
pub fn discover(dir: &Path) -> Result<(Layout, TlsFiles), LayoutError> {
    if let Err(source) = std::fs::read_dir(dir) {
        return Err(LayoutError::Read {
            dir: dir.to_path_buf(),
            source,
        });
    }
    let present: Vec<(Layout, Vec<&'static str>)> = Layout::ALL
        .iter()
        .map(|&l| {
            let names = l
                .names()
                .into_iter()
                .filter(|n| dir.join(n).is_file())
                .collect::<Vec<_>>();
            (l, names)
        })
        .filter(|(_, names)| !names.is_empty())
        .collect();
    let found = present
        .iter()
        .flat_map(|(_, names)| names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ");
    match present.as_slice() {
        [(layout, names)] if names.len() == 3 => Ok((*layout, layout.files(dir))),
        [] | [_] => Err(LayoutError::NoneComplete {
            dir: dir.to_path_buf(),
            found: if found.is_empty() {
                String::new()
            } else {
                format!(" (only {found})")
            },
        }),
        _ => Err(LayoutError::Mixed {
            dir: dir.to_path_buf(),
            found,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(names: &[&str]) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sidecar-layout-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        dir
    }

    #[test]
    fn each_complete_layout_is_found() {
        for layout in Layout::ALL {
            let dir = dir_with(&layout.names());
            let (found, files) = discover(&dir).unwrap();
            assert_eq!(found, layout);
            assert_eq!(files.cert, dir.join(layout.names()[0]));
            assert_eq!(files.key, dir.join(layout.names()[1]));
            assert_eq!(files.bundle, dir.join(layout.names()[2]));
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn unrelated_files_do_not_matter() {
        // cert-manager's additionalOutputFormats and kubelet's own entries sit beside the set.
        let dir = dir_with(&[
            "tls.crt",
            "tls.key",
            "ca.crt",
            "tls-combined.pem",
            "key.der",
        ]);
        std::fs::create_dir(dir.join("..2026_11_25_13_00_00.000000001")).unwrap();
        assert_eq!(discover(&dir).unwrap().0, Layout::CertManager);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn incomplete_empty_and_mixed_are_one_line_errors_naming_all_layouts() {
        for (names, expect) in [
            (&[][..], "no certificate set found;"),
            (&["tls.crt", "tls.key"][..], "(only tls.crt, tls.key)"),
            (
                &["cert.pem", "key.pem", "bundle.pem", "tls.crt"][..],
                "files of more than one layout (cert.pem, key.pem, bundle.pem, tls.crt)",
            ),
            (
                &["svid.pem", "key.pem"][..],
                "files of more than one layout",
            ),
        ] {
            let dir = dir_with(names);
            let msg = discover(&dir).unwrap_err().to_string();
            assert!(msg.contains(expect), "{names:?}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
            for l in Layout::ALL {
                assert!(msg.contains(&l.names().join("+")), "{msg}");
            }
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_missing_directory_is_named() {
        let msg = discover(Path::new("/nonexistent/tls"))
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("--tls-dir /nonexistent/tls: "), "{msg}");
    }
}
