//! No secret in logs (issue 9): a pair of mTLS sidecars run with the most verbose logging
//! (`SIDECAR_LOG=trace`, `RUST_LOG=trace`), an access log and admin endpoints, through
//! handshakes, a rotation, refused (half-written, corrupted, mismatched) key files and refused
//! peers; then every byte they wrote — stderr, stdout, access logs, `/config`, `/status`,
//! `/metrics`, `/connections`, `/readyz` — is searched for private-key material: PEM key
//! headers, every base64 body line of every private key involved, and each EC private
//! scalar in hex and as a byte list.
//!
//! Privileged (netns, eBPF): skips locally, fails in CI, when it cannot run. Network
//! namespaces `scrl-*` (10.207.x.x, no route out). The proxy ports come from
//! `sidecar_tests::ports`; the app and admin ports inside the namespaces are fixed.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use sidecar_tests::{
    SidecarRun, host, netns::PodPair, ports, privileged, protocol::EchoLine, scratch::Scratch,
    serial,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_sidecar-testclient");
const APP_PORT: u16 = 8080;
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const SERVER_ADMIN: u16 = 24141;
const CLIENT_ADMIN: u16 = 24143;

/// What must never appear: key headers, and each base64 line of each private key's body
/// (lines shorter than 16 characters — the tail of a body — are too short to be a
/// meaningful match and are skipped).
///
/// The EC private scalar itself is also looked for in the forms a careless `{:?}` or hex
/// dump would print it: lowercase hex, and the decimal byte list `[b0, b1, b2, b3`.
fn secret_needles(keys: &[PathBuf]) -> Vec<String> {
    // PEM key headers and footers (a bare "PRIVATE KEY" is fine: the error for a key file cut
    // short names the section it lacks).
    let mut needles: Vec<String> = [
        "BEGIN PRIVATE KEY",
        "BEGIN EC PRIVATE KEY",
        "BEGIN RSA PRIVATE KEY",
        "PRIVATE KEY-----",
    ]
    .map(String::from)
    .to_vec();
    for key in keys {
        let pem = fs::read_to_string(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        assert!(
            pem.contains("PRIVATE KEY"),
            "{} is not a PEM key",
            key.display()
        );
        let body: Vec<&str> = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        needles.extend(body.iter().filter(|l| l.len() >= 16).map(|l| l.to_string()));
        let der = base64_decode(&body.concat());
        // ECPrivateKey inside PKCS#8: INTEGER 1, then OCTET STRING of 32 bytes (the scalar).
        let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
        let scalar = der
            .windows(marker.len())
            .position(|w| w == marker)
            .map(|i| &der[i + marker.len()..i + marker.len() + 32])
            .unwrap_or_else(|| panic!("{}: no EC private scalar found", key.display()));
        needles.push(scalar.iter().map(|b| format!("{b:02x}")).collect());
        needles.push(format!(
            "[{}, {}, {}, {}",
            scalar[0], scalar[1], scalar[2], scalar[3]
        ));
    }
    needles
}

/// Standard base64 (what PEM bodies use); stops at padding.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().take_while(|c| *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .unwrap_or_else(|| panic!("not base64: {c}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn no_private_key_material_in_logs_admin_output_or_errors() {
    if !privileged()
        || host::which("nsenter").is_none() && !sidecar_tests::skip("no nsenter (.ci/run)")
    {
        return;
    }
    let _serial = serial();
    let certs = Scratch::new("scrl-secrets");
    certs.ca("ca", "example.org");
    certs.ca("other-ca", "example.org");
    let client_tls = certs.issue("ca", "spiffe://example.org/ns/a/sa/client", "client", &[]);
    let server_tls = certs.issue("ca", "spiffe://example.org/ns/b/sa/server", "server", &[]);
    let rogue_tls = certs.issue(
        "other-ca",
        "spiffe://example.org/ns/a/sa/rogue",
        "rogue",
        &[],
    );
    // Every private key that takes part, saved before rotation replaces the server's.
    let mut keys = vec![
        certs.path("ca/ca-key.pem"),
        certs.path("other-ca/ca-key.pem"),
        certs.path("client/key.pem"),
        certs.path("rogue/key.pem"),
    ];
    let first_server_key = certs.path("server-key-1.pem");
    fs::copy(certs.path("server/key.pem"), &first_server_key).unwrap();
    keys.push(first_server_key);
    let access_b = certs.path("access-b.log");
    let pods = PodPair::create_in("scrl", 207, 1);
    let mut server = SidecarRun::builder(ports::take())
        .env("SIDECAR_LOG", "trace")
        .env("RUST_LOG", "trace")
        .wrapped_in(pods.b.enter())
        .arg("--tls-dir")
        .arg(&server_tls)
        .arg(format!("--admin-addr=127.0.0.1:{SERVER_ADMIN}"))
        .arg("--access-log")
        .arg(&access_b)
        .command([CLIENT, "serve", "--addr", &format!("0.0.0.0:{APP_PORT}")])
        .start();
    server.wait_ready(Duration::from_secs(20));

    let mut outputs: Vec<(String, String)> = Vec::new();
    let client_run = |tls: &str, port: u16, count: usize| {
        let mut run = SidecarRun::builder(port)
            .env("SIDECAR_LOG", "trace")
            .env("RUST_LOG", "trace")
            .meshed_client_of(&pods, tls)
            .arg(format!("--admin-addr=127.0.0.1:{CLIENT_ADMIN}"))
            .arg("--access-log=stdout")
            .command([
                CLIENT.to_string(),
                "echo".into(),
                format!("--addr={}:{APP_PORT}", pods.b.addr),
                "--size=512".into(),
                format!("--count={count}"),
            ])
            .start();
        run.finish(RUN_TIMEOUT)
    };
    let record =
        |outputs: &mut Vec<(String, String)>, name: &str, done: &sidecar_tests::Finished| {
            outputs.push((format!("{name} stderr"), done.stderr_text()));
            outputs.push((format!("{name} stdout"), done.stdout.join("\n")));
        };

    // Handshakes that work.
    let ok = client_run(&client_tls, ports::take(), 3);
    let lines: Vec<EchoLine> = ok.parse_stdout();
    assert!(
        lines.len() == 3 && lines.iter().all(|l| l.ok),
        "{lines:?}\n{}",
        ok.stderr_text()
    );
    record(&mut outputs, "client", &ok);

    // A peer from another CA: refused by the server (and its own side fails).
    let rogue = client_run(&rogue_tls, ports::take(), 1);
    record(&mut outputs, "rogue client", &rogue);

    // Admin endpoints of the server while it runs, and of a client mid-run.
    for path in [
        "/config",
        "/status",
        "/metrics",
        "/connections",
        "/readyz",
        "/healthz",
    ] {
        let body = pods
            .b
            .http_get(SocketAddr::from(([127, 0, 0, 1], SERVER_ADMIN)), path);
        assert!(body.starts_with("HTTP/1.1 200"), "{path}: {body}");
        outputs.push((format!("server {path}"), body));
    }

    // Bad key files: half-written, corrupted base64, and a key that belongs to another
    // certificate. Each is refused with an error naming the file; the old set stays.
    let key = Path::new(&server_tls).join("key.pem");
    let good = fs::read_to_string(&key).unwrap();
    let half = &good[..good.len() / 2];
    let corrupt = good.replacen('A', "*", 3);
    let client_key = fs::read_to_string(certs.path("client/key.pem")).unwrap();
    for bad in [half, corrupt.as_str(), client_key.as_str()] {
        let tmp = key.with_extension("tmp");
        fs::write(&tmp, bad).unwrap();
        fs::rename(&tmp, &key).unwrap();
        std::thread::sleep(Duration::from_millis(1300));
    }
    // A rotation to a new valid set (new key), then traffic with it.
    certs.issue("ca", "spiffe://example.org/ns/b/sa/server", "server", &[]);
    keys.push(certs.path("server/key.pem"));
    std::thread::sleep(Duration::from_millis(1500));
    let after = client_run(&client_tls, ports::take(), 2);
    let lines: Vec<EchoLine> = after.parse_stdout();
    assert!(lines.len() == 2 && lines.iter().all(|l| l.ok), "{lines:?}");
    record(&mut outputs, "client after rotation", &after);
    for path in ["/config", "/status", "/readyz"] {
        let body = pods
            .b
            .http_get(SocketAddr::from(([127, 0, 0, 1], SERVER_ADMIN)), path);
        outputs.push((format!("server {path} after rotation"), body));
    }

    // A sidecar that cannot start: a key that does not match its certificate.
    let mismatched = certs.issue("ca", "spiffe://example.org/ns/a/sa/broken", "broken", &[]);
    fs::copy(
        certs.path("client/key.pem"),
        Path::new(&mismatched).join("key.pem"),
    )
    .unwrap();
    let mut broken = SidecarRun::builder(ports::take())
        .env("SIDECAR_LOG", "trace")
        .no_report()
        .arg("--tls-dir")
        .arg(&mismatched)
        .arg("--admin-addr=off")
        .command(["true"])
        .start();
    let broken = broken.finish(RUN_TIMEOUT);
    assert_ne!(broken.exit_code(), Some(0));
    assert_eq!(broken.error_lines().len(), 1, "{}", broken.stderr_text());
    record(&mut outputs, "mismatched key", &broken);

    server.release();
    let server = server.finish(RUN_TIMEOUT);
    let log = server.stderr_text();
    assert!(log.contains("new certificates refused"), "{log}");
    assert!(
        log.contains("inbound connection refused"),
        "the rogue peer: {log}"
    );
    assert!(
        log.contains("TRACE"),
        "the run should really log at trace level"
    );
    record(&mut outputs, "server", &server);
    outputs.push((
        "server access log".into(),
        fs::read_to_string(&access_b).unwrap_or_default(),
    ));

    let needles = secret_needles(&keys);
    assert!(
        needles.len() > 4 * keys.len(),
        "too few key lines to look for: {needles:?}"
    );
    let total: usize = outputs.iter().map(|(_, t)| t.len()).sum();
    let mut found = Vec::new();
    for (name, text) in &outputs {
        for n in &needles {
            if text.contains(n.as_str()) {
                found.push(format!("{name}: {n}"));
            }
        }
    }
    eprintln!(
        "searched {} outputs ({total} bytes) for {} key needles",
        outputs.len(),
        needles.len()
    );
    assert!(
        found.is_empty(),
        "private key material in the output:\n{}",
        found.join("\n")
    );
}
