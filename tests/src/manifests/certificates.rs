//! The cert-manager certificate is the one the proxy can use: the proxy refuses to start with
//! a certificate that is not its pod's SPIFFE ID, so a mismatch here is a pod that never
//! becomes ready.

use serde_yaml_ng::Value;

use super::{Doc, pod::each_sidecar, seq};

/// The trust domain the example certificates use.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The cert-manager certificate fills the Secret the pod mounts as --tls-dir, with the pod's
/// SPIFFE ID and both usages mTLS needs.
pub fn check(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    let certs: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Certificate").collect();
    if certs.is_empty() {
        return p;
    }
    each_sidecar(docs, "proxy", |c| {
        let Some(tls_dir) = c.flag("--tls-dir") else {
            return;
        };
        let volume = seq(&c.value["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(tls_dir.as_str()))
            .and_then(|m| m["name"].as_str())
            .and_then(|name| {
                seq(&c.pod.spec["volumes"])
                    .iter()
                    .find(|v| v["name"].as_str() == Some(name))
            });
        let Some(secret) = volume.and_then(|v| v["secret"]["secretName"].as_str()) else {
            p.push(format!(
                "{}: --tls-dir {tls_dir} is not a Secret volume",
                c.label()
            ));
            return;
        };
        let ns = c.pod.doc.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let sa = c.pod.spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let id = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}");
        let Some(cert) = certs.iter().find(|d| {
            d.value["spec"]["secretName"].as_str() == Some(secret)
                && d.value["metadata"]["namespace"].as_str() == Some(ns)
        }) else {
            p.push(format!(
                "{}: no Certificate writes Secret {ns}/{secret}",
                c.label()
            ));
            return;
        };
        let uris: Vec<&str> = seq(&cert.value["spec"]["uris"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if uris != [id.as_str()] {
            p.push(format!(
                "{}: uris {uris:?}, the pod's SPIFFE ID is {id}",
                cert.label()
            ));
        }
        if !seq(&cert.value["spec"]["dnsNames"]).is_empty() {
            p.push(format!(
                "{}: dnsNames play no part in SPIFFE identities",
                cert.label()
            ));
        }
        let usages: Vec<&str> = seq(&cert.value["spec"]["usages"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for needed in ["server auth", "client auth"] {
            if !usages.contains(&needed) {
                p.push(format!("{}: usages lack {needed:?}", cert.label()));
            }
        }
    });
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::testing::{edited, run_table};

    /// The certificate [`PROXY_POD`](crate::manifests::testing::PROXY_POD) needs.
    const CERTIFICATE: &str = r#"
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: app, namespace: demo}
spec:
  secretName: app-tls
  uris: [spiffe://cluster.local/ns/demo/sa/app]
  usages: [digital signature, server auth, client auth]
"#;

    fn with(pod: String, certificate: &str) -> String {
        format!("{pod}---{certificate}")
    }

    #[test]
    fn the_certificate_is_the_pods_identity_in_the_secret_it_mounts() {
        let cert = |from: &str, to: &str| {
            assert!(CERTIFICATE.contains(from), "{from:?}");
            with(edited("", ""), &CERTIFICATE.replacen(from, to, 1))
        };
        let cases = [
            ("no certificates at all", edited("", ""), None),
            ("the pod's certificate", cert("", ""), None),
            (
                "another identity",
                cert("sa/app]", "sa/other]"),
                Some(
                    "Certificate/app: uris [\"spiffe://cluster.local/ns/demo/sa/other\"], the pod's SPIFFE ID is spiffe://cluster.local/ns/demo/sa/app",
                ),
            ),
            (
                "two identities",
                cert("sa/app]", "sa/app, spiffe://cluster.local/ns/demo/sa/b]"),
                Some("the pod's SPIFFE ID is"),
            ),
            (
                "a DNS name",
                cert(
                    "  secretName: app-tls\n",
                    "  secretName: app-tls\n  dnsNames: [app]\n",
                ),
                Some("dnsNames play no part in SPIFFE identities"),
            ),
            (
                "no client auth",
                cert(", client auth]", "]"),
                Some("usages lack \"client auth\""),
            ),
            (
                "in another namespace",
                cert("namespace: demo}", "namespace: other}"),
                Some("no Certificate writes Secret demo/app-tls"),
            ),
            (
                "another Secret",
                cert("secretName: app-tls", "secretName: other-tls"),
                Some("no Certificate writes Secret demo/app-tls"),
            ),
            (
                "the service account's default",
                with(
                    edited("  serviceAccountName: app\n", ""),
                    &CERTIFICATE.replacen("sa/app]", "sa/default]", 1),
                ),
                None,
            ),
            (
                "--tls-dir not from a Secret",
                with(
                    edited(
                        "{name: tls, secret: {secretName: app-tls}}",
                        "{name: tls, emptyDir: {}}",
                    ),
                    CERTIFICATE,
                ),
                Some("--tls-dir /etc/sidecar/tls is not a Secret volume"),
            ),
        ];
        run_table(cases, check);
    }
}
