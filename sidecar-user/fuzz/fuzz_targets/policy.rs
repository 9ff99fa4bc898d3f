//! The policy file parser on arbitrary text: it must never panic; an error must be one line
//! naming a line that exists; an accepted policy must evaluate any connection without
//! panicking, and its rules must sit on lines of the file.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;

// The parser is compiled from its source files, with the two modules it uses, so fuzzing
// does not build the whole sidecar (eBPF object, aya, rustls …).
#[path = "../../src/cidr.rs"]
#[allow(dead_code)]
mod cidr;

#[path = "../../src/tls/identity.rs"]
#[allow(dead_code)]
mod identity;

/// `crate::tls::identity`, as the parser names it.
mod tls {
    pub(crate) use super::identity;
}

#[path = "../../src/telemetry/labels.rs"]
#[allow(dead_code)]
mod labels;

/// `crate::telemetry::labels` (the connection vocabulary), as the parser names it.
mod telemetry {
    pub(crate) use super::labels;
}

// schema.rs names its siblings `super::rules` and `super::destinations`: all sit at the
// crate root here.
#[path = "../../src/policy/rules.rs"]
#[allow(dead_code)]
mod rules;

#[path = "../../src/policy/destinations.rs"]
#[allow(dead_code)]
mod destinations;

#[path = "../../src/policy/schema.rs"]
#[allow(dead_code)]
mod schema;

use labels::Direction;
use rules::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.split('\n').count();
    match schema::parse(text) {
        Err(e) => {
            assert!(e.line <= lines, "line {} of {lines}", e.line);
            assert!(!e.to_string().contains('\n'));
        }
        Ok(p) => {
            for r in &p.rules {
                assert!(r.line >= 1 && r.line <= lines);
            }
            for d in &p.destinations {
                assert!(d.line >= 1 && d.line <= lines);
                let _ = p.destination(SocketAddr::new(d.destinations[0].addr, 0));
            }
            let id: tls::identity::SpiffeId = "spiffe://example.org/ns/a/sa/b".parse().unwrap();
            for dst in ["10.0.0.1:80", "[2001:db8::1]:443", "[::ffff:10.0.0.1]:0", "0.0.0.0:65535"] {
                let dst: SocketAddr = dst.parse().unwrap();
                let peers = [
                    (Direction::Outbound, None),
                    (Direction::Outbound, Some(&id)),
                    (Direction::Inbound, Some(&id)),
                ];
                for (direction, peer) in peers {
                    let _ = p.depends_on_peer(&Request { direction, peer, dst });
                    let d = p.evaluate(&Request { direction, peer, dst });
                    assert!(d.rule.is_none_or(|i| i < p.rules.len()));
                    let _ = p.rule_label(&d, direction);
                }
            }
        }
    }
});
