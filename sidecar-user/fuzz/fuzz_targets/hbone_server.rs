//! The HBONE server's request handling on arbitrary bytes from an authenticated peer: after
//! the HTTP/2 client preface, the input is whatever frames the fuzzer makes (CONNECTs with a
//! bad authority, missing or duplicate pseudo-headers, other methods, addresses that are not
//! the one dialled, resets, CONTINUATION runs …). The server must never panic or hang, and
//! every stream it hands on must name the dialled address.
#![no_main]

use std::{net::IpAddr, time::Duration};

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

#[path = "hbone_tunnel/mod.rs"]
mod tunnel;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dialled: IpAddr = "10.0.0.2".parse().unwrap();
        let (mut peer, ours) = tokio::io::duplex(64 * 1024);
        let input = [PREFACE, data].concat();
        let writer = tokio::spawn(async move {
            let _ = peer.write_all(&input).await;
            // End of input: the server sees the peer's side close.
            let _ = peer.shutdown().await;
            // Keep reading what the server answers so it never blocks on a full pipe.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut peer, &mut sink).await;
        });
        let settings = tunnel::Settings::new(100, Duration::from_secs(60));
        let serve = tunnel::server::serve(
            ours,
            dialled,
            &settings,
            Duration::from_millis(200),
            CancellationToken::new(),
            |incoming| {
                if let Ok(target) = &incoming.target {
                    assert_eq!(target.original_dst.ip(), dialled);
                    assert_ne!(target.original_dst.port(), 0);
                }
                match incoming.target.clone() {
                    Ok(_) => drop(incoming.accept()),
                    Err(refusal) => incoming.refuse(refusal),
                }
            },
        );
        // The input is finite: the server ends once it is read (or on its own deadline).
        let _ = tokio::time::timeout(Duration::from_secs(2), serve).await;
        writer.abort();
    });
});
