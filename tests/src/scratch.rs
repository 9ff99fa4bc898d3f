//! A scratch directory per test (policy files, certificates, captures), removed on drop, with
//! the `sidecar` subcommands the tests prepare things with.

use std::{path::PathBuf, process::Command, time::Duration};

use crate::{host::output_with_timeout, sidecar_bin};

const STEP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sidecar-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// [`Scratch::path`] as a string, for command lines.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Writes a file atomically (rename), so a sidecar polling it never sees half of it.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("writing a scratch file");
        let path = self.path(name);
        std::fs::rename(&tmp, &path).expect("renaming a scratch file");
        path
    }

    /// `sidecar <args>`, which must succeed; returns its stdout.
    pub fn sidecar(&self, args: &[&str]) -> String {
        let out = output_with_timeout(Command::new(sidecar_bin()).args(args), STEP_TIMEOUT);
        assert!(
            out.status.success(),
            "sidecar {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sidecar cert ca` into directory `ca`.
    pub fn ca(&self, ca: &str, trust_domain: &str) {
        self.sidecar(&[
            "cert",
            "ca",
            "--dir",
            &self.arg(ca),
            "--trust-domain",
            trust_domain,
        ]);
    }

    /// `sidecar cert issue` of `id` from the CA in `ca` into directory `out` (returned).
    pub fn issue(&self, ca: &str, id: &str, out: &str, extra: &[&str]) -> String {
        let (ca, out) = (self.arg(ca), self.arg(out));
        let mut args = vec![
            "cert",
            "issue",
            "--ca-dir",
            &ca,
            "--spiffe-id",
            id,
            "--out",
            &out,
        ];
        args.extend(extra);
        self.sidecar(&args);
        out
    }
}

impl Scratch {
    /// A certificate from the CA in directory `ca` made by openssl with the extensions in
    /// `ext` (config lines), into directory `out` (returned): for what `sidecar cert` will not
    /// make, such as a certificate for one end only or with no key usage at all.
    pub fn openssl_issue(&self, ca: &str, out: &str, ext: &str) -> String {
        let dir = self.path(out);
        std::fs::create_dir_all(&dir).expect("creating the certificate directory");
        let ext_file = self.write(&format!("{out}.ext"), ext);
        let run = |args: &[&str]| {
            let out = output_with_timeout(Command::new("openssl").args(args), STEP_TIMEOUT);
            assert!(
                out.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let file = |name: &str| dir.join(name).display().to_string();
        let (key, csr, cert) = (file("key.pem"), file("req.csr"), file("cert.pem"));
        run(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            "/O=test",
            "-out",
            &csr,
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.arg(&format!("{ca}/ca.pem")),
            "-CAkey",
            &self.arg(&format!("{ca}/ca-key.pem")),
            "-set_serial",
            "7",
            "-days",
            "1",
            "-extfile",
            &ext_file.display().to_string(),
            "-out",
            &cert,
        ]);
        dir.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
