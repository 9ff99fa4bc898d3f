//! `sidecar cert`: development certificates (a CA per trust domain, workload certificates
//! with SPIFFE IDs), so a demo or test mesh needs nothing outside this binary.

use std::{path::PathBuf, time::Duration};

use clap::Subcommand;

use crate::tls::{certs, identity::SpiffeId};

#[derive(Subcommand)]
pub enum CertCommand {
    /// Create a CA: writes ca.pem and ca-key.pem into DIR.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain, e.g. example.org.
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Issue a workload certificate: writes cert.pem, key.pem and bundle.pem into OUT.
    Issue {
        /// Directory of the CA (from `sidecar cert ca`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// e.g. spiffe://example.org/ns/default/sa/client
        #[arg(long)]
        spiffe_id: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in hours.
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// Start the validity this many hours in the past (e.g. to mint an expired one).
        #[arg(long, default_value_t = 0)]
        backdate_hours: u64,
    },
}

impl CertCommand {
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            Self::Ca {
                dir,
                trust_domain,
                days,
            } => {
                certs::write_ca(&dir, &trust_domain, Duration::from_secs(days * 86_400))?;
                println!(
                    "wrote {} and {}",
                    dir.join(certs::CA_CERT).display(),
                    dir.join(certs::CA_KEY).display()
                );
            }
            Self::Issue {
                ca_dir,
                spiffe_id,
                out,
                hours,
                backdate_hours,
            } => {
                let id: SpiffeId = spiffe_id.parse()?;
                certs::write_workload(
                    &ca_dir,
                    &out,
                    &id,
                    Duration::from_secs(hours * 3600),
                    Duration::from_secs(backdate_hours * 3600),
                )?;
                println!("wrote {id} to {}", out.join(certs::CERT).display());
            }
        }
        Ok(0)
    }
}
