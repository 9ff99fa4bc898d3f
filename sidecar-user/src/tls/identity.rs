//! SPIFFE identities: `spiffe://<trust-domain>/<path>`, carried as the one URI SAN of an X.509
//! workload certificate. Workloads in Kubernetes use the path `/ns/<namespace>/sa/<account>`.

use std::{fmt, str::FromStr};

use thiserror::Error;
use x509_parser::{extensions::GeneralName, prelude::*};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID: {1}")]
    Invalid(String, &'static str),
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate has no SPIFFE ID (a spiffe:// URI SAN)")]
    Missing,
    #[error("the certificate has {0} URI SANs; an X509-SVID carries exactly one, its SPIFFE ID")]
    Several(usize),
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

const MAX_LEN: usize = 2048;

impl SpiffeId {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The SPIFFE ID of a certificate (DER). The X509-SVID standard says a leaf carries
    /// exactly one URI SAN, and that it is the SPIFFE ID: a certificate with a second URI
    /// (of any scheme) beside it is not an SVID, since a verifier elsewhere might pick the
    /// other one as the peer's name.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        Self::from_parsed(&cert)
    }

    /// [`SpiffeId::from_certificate`] of a certificate already parsed.
    pub fn from_parsed(cert: &X509Certificate<'_>) -> Result<Self, IdentityError> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris: Vec<&str> = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        match uris.as_slice() {
            [] => Err(IdentityError::Missing),
            [one] => one.parse(),
            many => Err(IdentityError::Several(many.len())),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| IdentityError::Invalid(s.to_string(), why);
        if s.len() > MAX_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(bad("empty trust domain"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad("trust domain may only hold a-z 0-9 - . _"));
        }
        if path.is_empty() || path == "/" {
            return Err(bad("a workload ID needs a path, e.g. /ns/default/sa/app"));
        }
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad("path segments may not be empty, . or .."));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(bad("path may only hold letters, digits, - . _ and /"));
            }
        }
        Ok(Self {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id: SpiffeId = "spiffe://example.org/ns/default/sa/client".parse().unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/client");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/client");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://example.org/ns/a",
            "SPIFFE://example.org/ns/a",
            "Spiffe://example.org/ns/a",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://Example.org/ns/a",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/ns//a",
            "spiffe://example.org/ns/../a",
            "spiffe://example.org/ns/a?x=1",
            "spiffe://exa mple.org/ns/a",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(3000));
        assert!(long.parse::<SpiffeId>().is_err());
    }

    /// A self-signed certificate carrying `uris` as URI SANs (and a DNS name, which an SVID
    /// may have beside its one URI).
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .chain([SanType::DnsName("app.example.org".try_into().unwrap())])
            .collect();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_carries_exactly_one_uri_san_which_is_its_spiffe_id() {
        let id = "spiffe://example.org/ns/default/sa/app";
        assert_eq!(
            SpiffeId::from_certificate(&cert_with_uris(&[id]))
                .unwrap()
                .to_string(),
            id
        );
        assert_eq!(
            SpiffeId::from_certificate(&cert_with_uris(&[])),
            Err(IdentityError::Missing)
        );
        let two = cert_with_uris(&[id, "spiffe://example.org/ns/default/sa/other"]);
        assert_eq!(
            SpiffeId::from_certificate(&two),
            Err(IdentityError::Several(2))
        );
        let beside = cert_with_uris(&["https://app.example.org/", id]);
        assert_eq!(
            SpiffeId::from_certificate(&beside),
            Err(IdentityError::Several(2))
        );
        let upper_beside = cert_with_uris(&["SPIFFE://example.org/ns/default/sa/x", id]);
        assert_eq!(
            SpiffeId::from_certificate(&upper_beside),
            Err(IdentityError::Several(2))
        );
        // The scheme is lower-case: an upper-case one alone is not a SPIFFE ID.
        let upper = cert_with_uris(&["SPIFFE://example.org/ns/default/sa/app"]);
        assert!(matches!(
            SpiffeId::from_certificate(&upper),
            Err(IdentityError::Invalid(_, _))
        ));
        let not_spiffe = cert_with_uris(&["https://example.org/ns/default/sa/app"]);
        assert!(matches!(
            SpiffeId::from_certificate(&not_spiffe),
            Err(IdentityError::Invalid(_, _))
        ));
    }
}
