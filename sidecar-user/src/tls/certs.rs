//! Development certificates for `sidecar cert`: a CA per trust domain and workload certificates
//! carrying a SPIFFE ID, so the demo and the tests need nothing outside the project. Keys are
//! ECDSA P-256. Production deployments get theirs from cert-manager or SPIRE instead.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::identity::SpiffeId;

/// File names inside the directories `sidecar cert` writes and `sidecar run --tls-dir` reads.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
pub const BUNDLE: &str = "bundle.pem";

/// A CA certificate and key, PEM.
pub struct Minted {
    pub cert_pem: String,
    pub key_pem: String,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The time-seeded low bits are enough to tell dev certificates apart; the top bit is
    // cleared so the DER integer stays positive.
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos() as u128;
    bytes.copy_from_slice(&nanos.to_be_bytes());
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

pub fn mint_ca(trust_domain: &str, valid: Duration) -> Result<Minted> {
    // Validates the trust domain with the same rules as a SPIFFE ID.
    format!("spiffe://{trust_domain}/ca").parse::<SpiffeId>()?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sidecar development CA");
    dn.push(DnType::CommonName, format!("{trust_domain} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + valid;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(Minted {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A workload certificate for `id`, valid from `now - backdate` for `valid`, for both ends of
/// a tunnel (serverAuth and clientAuth).
pub fn mint_workload(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    id: &SpiffeId,
    valid: Duration,
    backdate: Duration,
) -> Result<Minted> {
    let both = [
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    mint_workload_with_usages(ca_cert_pem, ca_key_pem, id, valid, backdate, &both)
}

/// [`mint_workload`] with the extended key usages given, e.g. to show that a certificate
/// for one end of a tunnel only is refused.
pub fn mint_workload_with_usages(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    id: &SpiffeId,
    valid: Duration,
    backdate: Duration,
    usages: &[ExtendedKeyUsagePurpose],
) -> Result<Minted> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("reading the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("reading the CA certificate")?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sidecar workload");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages.to_vec();
    params.not_before = OffsetDateTime::now_utc() - backdate;
    params.not_after = params.not_before + valid;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Minted {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes a file atomically (temporary file, then rename), private when `secret`.
pub fn write_atomic(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::set_permissions(
        &tmp,
        fs::Permissions::from_mode(if secret { 0o600 } else { 0o644 }),
    )?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// `sidecar cert ca`: writes `ca.pem` and `ca-key.pem` into `dir`.
pub fn write_ca(dir: &Path, trust_domain: &str, valid: Duration) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if dir.join(CA_KEY).exists() {
        bail!(
            "{} already exists: refusing to replace a CA key",
            dir.join(CA_KEY).display()
        );
    }
    let ca = mint_ca(trust_domain, valid)?;
    write_atomic(&dir.join(CA_KEY), &ca.key_pem, true)?;
    write_atomic(&dir.join(CA_CERT), &ca.cert_pem, false)
}

/// `sidecar cert issue`: writes `cert.pem`, `key.pem` and `bundle.pem` (the CA) into `out`,
/// key first so a watcher never pairs a new certificate with a stale key for long.
pub fn write_workload(
    ca_dir: &Path,
    out: &Path,
    id: &SpiffeId,
    valid: Duration,
    backdate: Duration,
) -> Result<()> {
    let read = |name: &str| {
        fs::read_to_string(ca_dir.join(name)).with_context(|| {
            format!(
                "reading {} (create a CA with `sidecar cert ca`)",
                ca_dir.join(name).display()
            )
        })
    };
    let (ca_cert, ca_key) = (read(CA_CERT)?, read(CA_KEY)?);
    let minted = mint_workload(&ca_cert, &ca_key, id, valid, backdate)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join(BUNDLE), &ca_cert, false)?;
    write_atomic(&out.join(KEY), &minted.key_pem, true)?;
    write_atomic(&out.join(CERT), &minted.cert_pem, false)
}
