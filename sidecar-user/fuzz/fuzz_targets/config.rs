//! The command-line values users type: CIDR lists (`--exclude-cidrs`, `--mesh-cidrs`, split on
//! `,` as clap does), port lists (`--exclude-ports`), and SPIFFE IDs (`sidecar policy check
//! --inbound ID=IP:PORT`, certificate SANs). Properties: never panics; an error is one line;
//! whatever parses prints back to something that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/cidr.rs"]
#[allow(dead_code)]
mod cidr;

#[path = "../../src/tls/identity.rs"]
#[allow(dead_code)]
mod identity;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for item in text.split(',') {
        match item.parse::<cidr::Cidr>() {
            Ok(c) => {
                assert!(c.prefix <= if c.addr.is_ipv4() { 32 } else { 128 });
                assert_eq!(c.to_string().parse::<cidr::Cidr>(), Ok(c));
            }
            Err(e) => assert!(!e.contains('\n'), "{e}"),
        }
        let _ = item.parse::<u16>();
        match item.parse::<identity::SpiffeId>() {
            Ok(id) => {
                let again: identity::SpiffeId = id.to_string().parse().expect("re-parses");
                assert_eq!(again.to_string(), id.to_string());
                assert!(id.to_string().len() <= 2048);
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
        }
        if let Some((id, dst)) = item.split_once('=') {
            let _ = (
                id.parse::<identity::SpiffeId>(),
                dst.parse::<std::net::SocketAddr>(),
            );
        }
    }
});
