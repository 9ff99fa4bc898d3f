//! Loading workload credentials (`--tls-dir`: cert.pem, key.pem, bundle.pem, re-read on every
//! change) from arbitrary bytes. Half of the inputs are raw; the other half start from a valid
//! set minted once and apply the input as edits (truncate, overwrite, insert, delete, swap
//! files), so the fuzzer reaches the checks past PEM syntax — key/certificate match, SPIFFE
//! ID, chain — without a seed corpus. Properties: never panics; an error is one line and never
//! quotes private-key material; an accepted set names a SPIFFE ID.
#![no_main]

use std::{path::PathBuf, sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;

// The credentials code is compiled from its source files (with the modules `tls/mod.rs`
// declares), so fuzzing does not build the whole sidecar (eBPF object, aya …).
#[path = "../../src/tls/mod.rs"]
#[allow(dead_code)]
mod tls;

use tls::{Credentials, TlsFiles, certs};

/// A valid set: workload certificate, its key, the CA as bundle; and the CA's key.
struct Valid {
    files: [Vec<u8>; 3],
    ca_key: Vec<u8>,
}

fn valid() -> &'static Valid {
    static VALID: OnceLock<Valid> = OnceLock::new();
    VALID.get_or_init(|| {
        let day = Duration::from_secs(86_400);
        let ca = certs::mint_ca("example.org", day).expect("minting a CA");
        let id = "spiffe://example.org/ns/fuzz/sa/w".parse().unwrap();
        let w = certs::mint_workload(&ca.cert_pem, &ca.key_pem, &id, day, Duration::ZERO)
            .expect("minting a workload certificate");
        Valid {
            files: [
                w.cert_pem.into_bytes(),
                w.key_pem.into_bytes(),
                ca.cert_pem.into_bytes(),
            ],
            ca_key: ca.key_pem.into_bytes(),
        }
    })
}

/// Every 16-character piece of the valid private keys' base64 bodies: an error quoting any
/// of them (even from an edited copy of the key) leaks key material.
fn key_pieces() -> &'static Vec<String> {
    static PIECES: OnceLock<Vec<String>> = OnceLock::new();
    PIECES.get_or_init(|| {
        let v = valid();
        let mut pieces = Vec::new();
        for pem in [&v.files[1], &v.ca_key] {
            for line in String::from_utf8_lossy(pem)
                .lines()
                .filter(|l| !l.starts_with("-----"))
            {
                let b = line.as_bytes();
                for w in b.windows(16) {
                    pieces.push(String::from_utf8_lossy(w).into_owned());
                }
            }
        }
        pieces
    })
}

fn edit(data: &[u8]) -> [Vec<u8>; 3] {
    let v = valid();
    let mut files = v.files.clone();
    for op in data.chunks_exact(4) {
        let (file, kind, at, value) = (op[0] as usize % 3, op[1] % 7, op[2] as usize, op[3]);
        let f = &mut files[file];
        let pos = if f.is_empty() {
            0
        } else {
            (at * 7 + value as usize) % f.len()
        };
        match kind {
            0 => f.truncate(pos),
            1 if !f.is_empty() => f[pos] = value,
            2 => f.insert(pos, value),
            3 if !f.is_empty() => {
                f.remove(pos);
            }
            4 => files.swap(file, (file + 1) % 3),
            5 => files[1] = v.ca_key.clone(),
            // Repeat the tail, while the file stays small (real sets are a few KiB).
            _ if f.len() < 16 * 1024 => {
                let copy = f[pos..].to_vec();
                f.extend_from_slice(&copy);
            }
            _ => {}
        }
    }
    files
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let files = if mode & 1 == 0 {
        edit(rest)
    } else {
        // Raw: two length bytes split the rest into cert | key | bundle.
        let (a, b) = match rest {
            [a, b, ..] => (*a as usize, *b as usize),
            _ => (0, 0),
        };
        let body = rest.get(2..).unwrap_or_default();
        let a = a.min(body.len());
        let b = b.min(body.len() - a);
        [
            body[..a].to_vec(),
            body[a..a + b].to_vec(),
            body[a + b..].to_vec(),
        ]
    };
    let names = TlsFiles {
        cert: PathBuf::from("cert.pem"),
        key: PathBuf::from("key.pem"),
        bundle: PathBuf::from("bundle.pem"),
    };
    match Credentials::from_pem(&names, &files[0], &files[1], &files[2]) {
        Ok(creds) => assert!(creds.identity.to_string().starts_with("spiffe://")),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            for piece in key_pieces() {
                assert!(
                    !msg.contains(piece.as_str()),
                    "the error quotes key material: {msg}"
                );
            }
        }
    }
});
