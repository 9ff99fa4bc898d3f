//! `sidecar policy check`: validate a policy file and show, for given connections, what the
//! proxy and the kernel would decide.

use std::{net::SocketAddr, path::PathBuf};

use clap::Subcommand;

use crate::{policy::rules::Request, telemetry::labels::Direction, tls::identity::SpiffeId};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate FILE (exit 1 with the line and problem if it is invalid), then print the
    /// verdict for each --outbound / --inbound connection, as the proxy and the kernel see it.
    Check {
        file: PathBuf,
        /// An outbound destination IP:PORT, or SPIFFE_ID=IP:PORT for a tunnel whose server
        /// presented that identity.
        #[arg(long)]
        outbound: Vec<String>,
        /// An inbound connection SPIFFE_ID=IP:PORT (peer identity, destination).
        #[arg(long)]
        inbound: Vec<String>,
    },
}

impl PolicyCommand {
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            Self::Check {
                file,
                outbound,
                inbound,
            } => check(&file, &outbound, &inbound),
        }
    }
}

/// `sidecar policy check`.
fn check(file: &std::path::Path, outbound: &[String], inbound: &[String]) -> anyhow::Result<i32> {
    let loaded = crate::policy::load(file)?;
    let policy = &loaded.policy;
    eprintln!(
        "{}: {} rule(s), {} kernel prefix(es){}",
        file.display(),
        policy.rules.len(),
        loaded.compiled.entries.len(),
        if policy.dry_run { ", dry run" } else { "" }
    );
    let print = |req: Request<'_>, kernel: Option<bool>| {
        let d = policy.evaluate(&req);
        let line = serde_json::json!({
            "direction": req.direction.as_str(),
            "source": req.peer.filter(|_| req.direction == Direction::Inbound).map(|s| s.to_string()),
            "server": req.peer.filter(|_| req.direction == Direction::Outbound).map(|s| s.to_string()),
            "dst": req.dst.to_string(),
            "action": d.action.as_str(),
            "rule": policy.rule_label(&d, req.direction),
            "refused": d.refuse,
            "kernel_refuses": kernel,
        });
        println!("{line}");
    };
    let connection = |flag: &str, spec: &str| -> anyhow::Result<(Option<SpiffeId>, SocketAddr)> {
        let (id, dst) = match spec.split_once('=') {
            Some((id, dst)) => (Some(id.parse::<SpiffeId>()?), dst),
            None => (None, spec),
        };
        let dst = dst.parse().map_err(|e| {
            anyhow::anyhow!("--{flag} {spec:?}: {e} (write IP:PORT or SPIFFE_ID=IP:PORT)")
        })?;
        Ok((id, dst))
    };
    for spec in outbound {
        let (server, dst) = connection("outbound", spec)?;
        let kernel = loaded.compiled.denies(dst.ip(), dst.port());
        print(
            Request {
                direction: Direction::Outbound,
                peer: server.as_ref(),
                dst,
            },
            Some(kernel),
        );
    }
    for spec in inbound {
        let (id, dst) = connection("inbound", spec)?;
        let id =
            id.ok_or_else(|| anyhow::anyhow!("--inbound {spec:?}: write SPIFFE_ID=IP:PORT"))?;
        print(
            Request {
                direction: Direction::Inbound,
                peer: Some(&id),
                dst,
            },
            None,
        );
    }
    Ok(0)
}
