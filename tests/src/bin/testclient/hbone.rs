//! `hbone-reset-flood`: an authenticated peer that abuses HTTP/2 on a sidecar's tunnel port.
//! It dials like a sidecar (TLS 1.3, ALPN h2, a certificate of the mesh: the sidecar's own
//! `tunnel::dial`), then opens CONNECT streams and resets each at once ("rapid reset"),
//! up to `streams` of them or until the server sends it away. It prints one `FloodLine`: how
//! many streams it reset and how the connection ended.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use sidecar::{
    tls::{TlsFiles, TlsState},
    tunnel::{
        dial::{Dialled, dial},
        request::connect_request,
    },
};
use sidecar_tests::protocol::FloodLine;

use crate::emit;

/// How long the whole flood may take.
const FLOOD_DEADLINE: Duration = Duration::from_secs(20);

/// Where a flood goes, as a peer of the mesh: the tunnel port it dials, the certificates it
/// dials with, and the destination its CONNECTs name.
#[derive(clap::Args, Debug)]
pub struct FloodTarget {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub tls_dir: PathBuf,
    #[arg(long)]
    pub target: SocketAddr,
}

impl FloodTarget {
    /// Dials the tunnel port as a sidecar does (TLS 1.3, ALPN h2, the peer verified).
    pub async fn dial(&self) -> anyhow::Result<Dialled> {
        let tls = TlsState::load(TlsFiles::discover(&self.tls_dir)?)?;
        Ok(dial(&tls, self.addr, Duration::from_secs(5)).await?)
    }
}

pub fn reset_flood(to: &FloodTarget, streams: u64) -> ExitCode {
    run_flood(flood(to, streams))
}

/// Runs a flood on a runtime of its own and prints its line; an error is one `error:` line
/// and exit status 1.
pub fn run_flood<T: serde::Serialize>(
    flood: impl std::future::Future<Output = anyhow::Result<T>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(flood) {
        Ok(line) => {
            emit(&line);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn flood(to: &FloodTarget, streams: u64) -> anyhow::Result<FloodLine> {
    let dialled = to.dial().await?;
    let (sender, connection) = h2::client::handshake(dialled.stream).await?;
    let driver = tokio::spawn(connection);
    let mut reset = 0;
    let mut ended = None;
    let client: SocketAddr = ([10, 0, 0, 1], 40000).into();
    let sending = async {
        while reset < streams {
            let mut ready = match sender.clone().ready().await {
                Ok(s) => s,
                Err(e) => return Some(e),
            };
            match ready.send_request(connect_request(to.target, client), false) {
                // Dropping both handles before any answer resets the stream (CANCEL).
                Ok((response, send)) => drop((response, send)),
                Err(e) => return Some(e),
            }
            reset += 1;
            // Let the connection task write the frames out.
            tokio::task::yield_now().await;
        }
        None
    };
    if let Ok(error) = tokio::time::timeout(FLOOD_DEADLINE, sending).await {
        ended = error;
    }
    // With no handle left, the connection ends once the server is done with it.
    drop(sender);
    // Whatever the sender saw, the connection's own end says how the server treated us.
    let connection_end = tokio::time::timeout(Duration::from_secs(5), driver).await;
    let goaway = match (&ended, connection_end) {
        (Some(e), _) if e.is_go_away() => e.reason().map(|r| format!("{r:?}")),
        (_, Ok(Ok(Err(e)))) if e.is_go_away() => e.reason().map(|r| format!("{r:?}")),
        _ => None,
    };
    Ok(FloodLine {
        reset,
        goaway,
        error: ended.map(|e| e.to_string()),
    })
}
