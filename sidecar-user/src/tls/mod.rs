//! Mutual TLS between sidecars: identities, certificate loading and verification, rotation.
//!
//! Crypto provider: `ring`. It builds with nothing but a C compiler (aws-lc-rs needs cmake and
//! a much longer build), is what rustls has been tested against longest, and offers every
//! TLS 1.3 suite and the ECDSA/Ed25519/RSA verification we need. FIPS is not a goal here; if it
//! becomes one, aws-lc-rs is a one-line switch of `provider()`.

pub mod certs;
pub mod identity;
pub mod layout;
pub mod reload;
pub mod resumption;
pub mod verify;

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use thiserror::Error;

use self::{
    identity::SpiffeId,
    verify::{SpiffeClientVerifier, SpiffeServerVerifier},
};

/// The ALPN protocol of our tunnel, HBONE's: HTTP/2 over TLS. A peer that does not speak it
/// is refused.
pub const ALPN: &[u8] = b"h2";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {what} (expected PEM)")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path} is not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {path}: {source}")]
    Identity {
        path: PathBuf,
        source: identity::IdentityError,
    },
    #[error(
        "certificate {path} does not chain to the bundle {bundle}, or is not valid now: {reason}"
    )]
    Chain {
        path: PathBuf,
        bundle: PathBuf,
        reason: String,
    },
    #[error(
        "certificate {path} is not valid for {usage}: its extended key usage must list both \
         serverAuth and clientAuth (every sidecar is the server of some tunnels and the client \
         of others)"
    )]
    Usage { path: PathBuf, usage: &'static str },
    #[error("certificate {path} is no workload certificate: {problem}")]
    KeyUsage {
        path: PathBuf,
        problem: verify::KeyUsageError,
    },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// Where the workload's credentials live (cert-manager/SPIRE style: three PEM files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The workload certificate, followed by any intermediates.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The trust bundle: CA certificates of our trust domain.
    pub bundle: PathBuf,
}

/// The three files' contents, read as one set (see [`TlsFiles::read_set`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileSet {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub bundle: Vec<u8>,
}

/// How often [`TlsFiles::read_set`] re-reads a set that moved while it was being read.
const READ_SET_TRIES: usize = 5;

impl TlsFiles {
    /// The files of whichever layout `dir` holds: ours, a cert-manager Secret's or the SPIFFE
    /// helper's (see [`layout`]).
    pub fn discover(dir: &std::path::Path) -> Result<Self, layout::LayoutError> {
        layout::discover(dir).map(|(_, files)| files)
    }

    fn paths(&self) -> [&PathBuf; 3] {
        [&self.cert, &self.key, &self.bundle]
    }

    /// Reads the three files as one set. kubelet updates a mounted Secret atomically: it
    /// writes the new files into a fresh `..<timestamp>` directory and renames a `..data`
    /// symlink onto it; the names we open are symlinks through `..data`. Opening them one by
    /// one could straddle that rename (old certificate, new key), so where the names resolve
    /// to is compared before and after reading, and the set is read again if it moved.
    pub fn read_set(&self) -> Result<FileSet, TlsError> {
        let resolve = || self.paths().map(|p| std::fs::canonicalize(p).ok());
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let before = resolve();
            let set = (|| {
                Ok(FileSet {
                    cert: read(&self.cert)?,
                    key: read(&self.key)?,
                    bundle: read(&self.bundle)?,
                })
            })();
            // A read that failed because the old directory was removed mid-swap is retried
            // like one that succeeded across the swap.
            if resolve() == before || tries == READ_SET_TRIES {
                return set;
            }
        }
    }
}

/// One loaded, validated set of credentials and the configurations built from it.
#[derive(Debug)]
pub struct Credentials {
    pub identity: SpiffeId,
    pub not_after: SystemTime,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Credentials {
    /// Reads and validates the three files. Every check that a peer would make is made here,
    /// so a bad set is refused at load time (and a rotation keeps the old set).
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::from_set(files, &files.read_set()?)
    }

    /// Validates a set already read (`files` names its origin in errors).
    pub fn from_set(files: &TlsFiles, set: &FileSet) -> Result<Self, TlsError> {
        Self::from_pem(files, &set.cert, &set.key, &set.bundle)
    }

    /// [`Credentials::load`] on the files' contents (`files` names them in errors). Fuzzed
    /// (`sidecar-user/fuzz`, target `tls_pem`): errors never quote key material.
    pub fn from_pem(
        files: &TlsFiles,
        cert_pem: &[u8],
        key_pem: &[u8],
        bundle_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let pem_err = |path: &PathBuf| {
            let path = path.clone();
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                path,
                reason: pem_reason(&e),
            }
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(pem_err(&files.cert))?;
        if chain.is_empty() {
            return Err(TlsError::Empty {
                path: files.cert.clone(),
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem_err(&files.key))?;
        let bundle: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bundle_pem)
            .collect::<Result<_, _>>()
            .map_err(pem_err(&files.bundle))?;
        if bundle.is_empty() {
            return Err(TlsError::Empty {
                path: files.bundle.clone(),
                what: "CA certificate",
            });
        }

        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::Pem {
                path: files.key.clone(),
                reason: e.to_string(),
            })?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|_| TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })?;
        let identity =
            SpiffeId::from_certificate(&chain[0]).map_err(|source| TlsError::Identity {
                path: files.cert.clone(),
                source,
            })?;

        let mut roots = RootCertStore::empty();
        for ca in &bundle {
            roots.add(ca.clone()).map_err(|e| TlsError::Pem {
                path: files.bundle.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let chain_err = |reason: String| TlsError::Chain {
            path: files.cert.clone(),
            bundle: files.bundle.clone(),
            reason,
        };
        // What a peer checks, checked here for each end of a tunnel: a set that one end would
        // refuse is refused now (and a rotation to it keeps the old set).
        let checked = |usage: &'static str| {
            move |e: rustls::Error| match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::InvalidPurpose
                    | rustls::CertificateError::InvalidPurposeContext { .. },
                ) => TlsError::Usage {
                    path: files.cert.clone(),
                    usage,
                },
                other => chain_err(other.to_string()),
            }
        };
        let now = UnixTime::now();
        let parsed =
            ParsedCertificate::try_from(&chain[0]).map_err(|e| chain_err(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(checked("serverAuth"))?;
        verify::check_key_usage(&chain[0]).map_err(|problem| TlsError::KeyUsage {
            path: files.cert.clone(),
            problem,
        })?;
        let not_after = not_after(&chain[0]).map_err(chain_err)?;

        let trust_domain = identity.trust_domain().to_string();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        client_verifier
            .verify_client_cert(&chain[0], &chain[1..], now)
            .map_err(checked("clientAuth"))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                client_verifier,
                trust_domain.clone(),
            )))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        resumption::enable_on_server(&mut server)?;

        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                roots,
                trust_domain,
                provider,
            )))
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        resumption::enable_on_client(&mut client);

        Ok(Self {
            identity,
            not_after,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// PEM errors in words (the library's messages quote raw bytes). Never quotes the file's
/// content: a key file whose header lost its line break puts the key's first base64 line on
/// the "section start" line (found by the `tls_pem` fuzz target), and errors are logged.
fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => {
            // A well-formed label (`PRIVATE KEY`, `CERTIFICATE` …) is safe to name.
            let label = String::from_utf8_lossy(end_marker);
            let section = if label.len() <= 32
                && label.bytes().all(|b| b.is_ascii_uppercase() || b == b' ')
            {
                format!("the {label} section")
            } else {
                "a section".into()
            };
            format!("{section} has no END line (file cut short or half-written?)")
        }
        E::IllegalSectionStart { .. } => "a malformed \"-----BEGIN …-----\" line (content not \
             shown: it may hold key material); is the line break after it missing?"
            .into(),
        E::NoItemsFound => "no item of the expected kind".into(),
        other => other.to_string(),
    }
}

fn not_after(der: &CertificateDer<'_>) -> Result<SystemTime, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
}

/// The credentials in force. Rotation swaps the whole set at once; a handshake takes the
/// set current when it starts, so connections already established are never touched.
#[derive(Debug)]
pub struct TlsState {
    files: TlsFiles,
    current: RwLock<Arc<Credentials>>,
    /// Bumped at each rotation: tunnel connections made under an older generation take no
    /// new streams (see `tunnel::pool` and `proxy::inbound`).
    generation: std::sync::atomic::AtomicU64,
}

impl TlsState {
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let creds = Credentials::load(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(creds)),
            generation: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// How many times the credentials were rotated.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn replace(&self, creds: Credentials) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(creds);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> TlsFiles {
        TlsFiles {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            bundle: "bundle.pem".into(),
        }
    }

    /// A certificate for one end of a tunnel only: every sidecar is both ends, so the set
    /// is refused, naming the missing usage.
    #[test]
    fn a_certificate_must_allow_both_server_and_client_auth() {
        use rcgen::ExtendedKeyUsagePurpose as Eku;
        let ca = certs::mint_ca("example.org", std::time::Duration::from_secs(3600)).unwrap();
        let id: SpiffeId = "spiffe://example.org/ns/default/sa/app".parse().unwrap();
        let mint = |usages: &[Eku]| {
            certs::mint_workload_with_usages(
                &ca.cert_pem,
                &ca.key_pem,
                &id,
                std::time::Duration::from_secs(3600),
                std::time::Duration::ZERO,
                usages,
            )
            .unwrap()
        };
        let load = |w: &certs::Minted| {
            Credentials::from_pem(
                &names(),
                w.cert_pem.as_bytes(),
                w.key_pem.as_bytes(),
                ca.cert_pem.as_bytes(),
            )
        };
        load(&mint(&[Eku::ServerAuth, Eku::ClientAuth])).expect("both usages load");
        for (usages, missing) in [
            (&[Eku::ServerAuth][..], "clientAuth"),
            (&[Eku::ClientAuth][..], "serverAuth"),
        ] {
            let err = load(&mint(usages)).expect_err("one usage is refused");
            assert!(
                matches!(&err, TlsError::Usage { usage, .. } if *usage == missing),
                "{err}"
            );
            assert!(err.to_string().contains("cert.pem"), "{err}");
        }
    }

    /// Regression (fuzz target `tls_pem`): a key whose BEGIN line lost its line break was
    /// quoted, first base64 line included, in the error — which the rotation watcher logs.
    #[test]
    fn pem_errors_never_quote_key_material() {
        let ca = certs::mint_ca("example.org", std::time::Duration::from_secs(3600)).unwrap();
        let body: Vec<&str> = ca
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let joined = ca.key_pem.replacen("-----\n", "-----", 1);
        let truncated = &ca.key_pem[..ca.key_pem.len() / 2];
        for bad in [joined.as_str(), truncated] {
            let err = Credentials::from_pem(
                &names(),
                ca.cert_pem.as_bytes(),
                bad.as_bytes(),
                ca.cert_pem.as_bytes(),
            )
            .expect_err("a broken key is refused")
            .to_string();
            assert!(err.contains("key.pem"), "{err}");
            for line in &body {
                assert!(!err.contains(line), "the error quotes the key: {err}");
            }
        }
    }
}
