//! Evaluation cost of a 1,000-rule policy: `cargo bench -p sidecar-user --bench policy`.
//!
//! A plain timing harness (no extra dependency): each case is timed over a fixed number of
//! evaluations, five times, and the median per-evaluation cost is printed with the spread.
//! Also timed once: parsing + validating the file, and compiling it for the kernel.

use std::{
    hint::black_box,
    net::SocketAddr,
    time::{Duration, Instant},
};

use sidecar::{
    policy::{
        kernel,
        rules::{Policy, Request},
        schema,
    },
    telemetry::labels::Direction,
    tls::identity::SpiffeId,
};

const RULES: usize = 1000;
const ITERATIONS: u32 = 200_000;
const REPEATS: usize = 5;

/// 500 outbound rules (one /24 each, a port range, deny/allow alternating) interleaved with
/// 500 inbound identity rules (exact IDs and namespace prefixes).
fn policy_text() -> String {
    let mut text = String::from("[defaults]\noutbound = \"allow\"\ninbound = \"deny\"\n");
    for i in 0..RULES {
        let n = i / 2;
        if i % 2 == 0 {
            let action = if n % 2 == 0 { "deny" } else { "allow" };
            text.push_str(&format!(
                "[[rule]]\naction = \"{action}\"\ndirection = \"outbound\"\n\
                 destinations = [\"10.{}.{}.0/24\"]\nports = [\"{}-{}\"]\n",
                n / 256,
                n % 256,
                1000 + n,
                1010 + n
            ));
        } else {
            let source = if n % 2 == 0 {
                format!("spiffe://example.org/ns/ns{n}/sa/app")
            } else {
                format!("spiffe://example.org/ns/team{n}/*")
            };
            text.push_str(&format!(
                "[[rule]]\naction = \"allow\"\ndirection = \"inbound\"\nsources = [\"{source}\"]\n\
                 ports = [8080]\n"
            ));
        }
    }
    text
}

fn time(policy: &Policy, req: &Request<'_>) -> Duration {
    let mut samples: Vec<Duration> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ITERATIONS {
                black_box(policy.evaluate(black_box(req)));
            }
            start.elapsed() / ITERATIONS
        })
        .collect();
    samples.sort();
    let median = samples[REPEATS / 2];
    println!(
        "    median {:>8.1?} per evaluation (min {:.1?}, max {:.1?}, {REPEATS} × {ITERATIONS})",
        median,
        samples[0],
        samples[REPEATS - 1]
    );
    median
}

fn main() {
    let text = policy_text();
    let start = Instant::now();
    let policy = schema::parse(&text).expect("the benchmark policy is valid");
    println!(
        "parse + validate {} rules ({} KiB): {:.1?}",
        policy.rules.len(),
        text.len() / 1024,
        start.elapsed()
    );
    let start = Instant::now();
    let compiled = kernel::compile(&policy).expect("compiles for the kernel");
    println!(
        "compile for the kernel: {} prefixes in {:.1?}",
        compiled.entries.len(),
        start.elapsed()
    );

    let peer: SpiffeId = "spiffe://example.org/ns/nobody/sa/x".parse().unwrap();
    let matched: SpiffeId = "spiffe://example.org/ns/team499/sa/web".parse().unwrap();
    let cases: [(&str, Request<'_>); 4] = [
        (
            "outbound, no rule matches (all 1,000 scanned, default)",
            Request {
                direction: Direction::Outbound,
                peer: None,
                dst: "192.0.2.1:443".parse::<SocketAddr>().unwrap(),
            },
        ),
        (
            "outbound, matches rule 500 (10.0.250.0/24)",
            Request {
                direction: Direction::Outbound,
                peer: None,
                dst: "10.0.250.7:1255".parse().unwrap(),
            },
        ),
        (
            "inbound, no identity matches (default deny)",
            Request {
                direction: Direction::Inbound,
                peer: Some(&peer),
                dst: "10.0.0.2:8080".parse().unwrap(),
            },
        ),
        (
            "inbound, matches the last rule (prefix pattern)",
            Request {
                direction: Direction::Inbound,
                peer: Some(&matched),
                dst: "10.0.0.2:8080".parse().unwrap(),
            },
        ),
    ];
    for (name, req) in &cases {
        println!("{name}");
        time(&policy, req);
    }
}
