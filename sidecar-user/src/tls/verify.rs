//! Peer verification for the tunnel. Both directions check the chain against our trust bundle
//! (validity period and extended key usage included, via rustls' webpki), then the key usage
//! an X.509-SVID must carry (webpki does not look at it), then require the peer's SPIFFE ID
//! to be in our trust domain. There are no DNS names in SPIFFE certificates,
//! so the server name the client dials is not checked; the identity is. Once a handshake is
//! done, full or resumed, [`verified_peer`] names the peer for the proxies.

use std::sync::Arc;

use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, Error, HandshakeKind,
    RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::{IdentityError, SpiffeId};

/// Why a certificate's key usage makes it no workload certificate.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyUsageError(pub &'static str);

/// An X.509-SVID must have the key usage extension with digitalSignature, and must not be
/// able to sign certificates or CRLs (SPIFFE X.509-SVID §4.3). Without this, a certificate
/// with no key usage at all, or a CA's, would be taken as a peer's.
pub fn check_key_usage(end_entity: &CertificateDer<'_>) -> Result<(), KeyUsageError> {
    let (_, cert) = X509Certificate::from_der(end_entity)
        .map_err(|_| KeyUsageError("the certificate does not parse"))?;
    key_usage_of(&cert)
}

fn key_usage_of(cert: &X509Certificate<'_>) -> Result<(), KeyUsageError> {
    let usage = cert
        .key_usage()
        .map_err(|_| KeyUsageError("its key usage extension is malformed or repeated"))?
        .ok_or(KeyUsageError(
            "it has no key usage extension (a SPIFFE certificate must allow digitalSignature)",
        ))?
        .value;
    if !usage.digital_signature() {
        return Err(KeyUsageError(
            "its key usage does not allow digitalSignature",
        ));
    }
    if usage.key_cert_sign() || usage.crl_sign() {
        return Err(KeyUsageError(
            "its key usage allows signing certificates or CRLs (a CA's, not a workload's)",
        ));
    }
    Ok(())
}

/// What both ends check of a peer's certificate once its chain verified, parsing it once: the
/// key usage of a workload certificate ([`check_key_usage`]), and a SPIFFE ID in our trust
/// domain.
fn check_workload(end_entity: &CertificateDer<'_>, trust_domain: &str) -> Result<(), Error> {
    let parsed = X509Certificate::from_der(end_entity)
        .map_err(|_| KeyUsageError("the certificate does not parse"));
    let cert = match parsed.and_then(|(_, cert)| key_usage_of(&cert).map(|()| cert)) {
        Ok(cert) => cert,
        Err(e) => {
            tracing::debug!("peer certificate refused: {e}");
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(e)),
            )));
        }
    };
    match SpiffeId::from_parsed(&cert) {
        Ok(id) if id.trust_domain() == trust_domain => Ok(()),
        Ok(id) => {
            tracing::debug!(peer = %id, "peer is outside trust domain {trust_domain}");
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
        Err(e) => {
            tracing::debug!("peer certificate has no usable SPIFFE ID: {e}");
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: String,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            trust_domain,
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_workload(end_entity, &self.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// rustls' own client verifier (chain, validity, clientAuth usage), plus the trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, trust_domain: String) -> Self {
        Self {
            inner,
            trust_domain,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_workload(end_entity, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who answered a finished handshake, and how.
#[derive(Debug)]
pub struct VerifiedPeer {
    pub id: SpiffeId,
    /// The handshake resumed an earlier session: no certificate was exchanged this time.
    pub resumed: bool,
}

/// `Error` here is rustls' error type: the derive is named in full.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no certificate")]
    NoCertificate,
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "its certificate is not valid now (valid from {not_before} to {not_after}, Unix \
         seconds): the session resumed outlived it"
    )]
    NotValidNow { not_before: i64, not_after: i64 },
}

/// The peer of a finished handshake, full or resumed: its SPIFFE ID, from the certificate
/// the verifiers above accepted. On resumption rustls hands back the chain of the full
/// handshake that issued the ticket — verified then, under the same credentials (see
/// [`super::Credentials`]) — but does not look at its validity period again, and a session
/// may outlive the certificate. So the validity period is checked here, at `now`, for every
/// handshake alike (for a full one it repeats what the verifier just did).
pub fn verified_peer(conn: &CommonState, now: UnixTime) -> Result<VerifiedPeer, PeerError> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(PeerError::NoCertificate)?;
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let validity = parsed.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if now < not_before || now > not_after {
        return Err(PeerError::NotValidNow {
            not_before,
            not_after,
        });
    }
    Ok(VerifiedPeer {
        id: SpiffeId::from_certificate(cert)?,
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, Issuer, KeyPair, KeyUsagePurpose as Ku, SanType};
    use rustls::pki_types::pem::PemObject;

    use super::*;

    /// A workload certificate for `spiffe://example.org/w` with exactly `usages`.
    fn with_key_usage(usages: &[Ku]) -> CertificateDer<'static> {
        let ca = super::super::certs::mint_ca("example.org", std::time::Duration::from_secs(60))
            .unwrap();
        let issuer =
            Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem).unwrap())
                .unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("spiffe://example.org/w".try_into().unwrap())];
        params.key_usages = usages.to_vec();
        let cert = params
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()
    }

    #[test]
    fn a_peer_certificate_must_be_a_workload_s_by_its_key_usage() {
        check_key_usage(&with_key_usage(&[Ku::DigitalSignature])).expect("digitalSignature");
        check_key_usage(&with_key_usage(&[
            Ku::DigitalSignature,
            Ku::KeyEncipherment,
        ]))
        .expect("with keyEncipherment too");
        for (usages, problem) in [
            (&[][..], "no key usage extension"),
            (
                &[Ku::KeyEncipherment][..],
                "does not allow digitalSignature",
            ),
            (
                &[Ku::DigitalSignature, Ku::KeyCertSign][..],
                "signing certificates",
            ),
            (
                &[Ku::DigitalSignature, Ku::CrlSign][..],
                "signing certificates",
            ),
        ] {
            let err = check_key_usage(&with_key_usage(usages)).expect_err("refused");
            assert!(err.to_string().contains(problem), "{usages:?}: {err}");
        }
    }
}
