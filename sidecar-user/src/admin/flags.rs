//! The observability flags (`--admin-addr`, `--probe-addr`, `--access-log`,
//! `--metrics-destinations`): one group, flattened into `sidecar run` and `sidecar proxy`.

use std::net::SocketAddr;

use super::config::{AdminListen, ObserveOptions};
use crate::telemetry::access_log::AccessLogTarget;

/// The most per-destination series `--metrics-destinations` may ask for: beyond this a
/// Prometheus server pays more than the breakdown is worth; use the access log instead.
const MAX_DESTINATION_SERIES: i64 = 10_000;

/// Observability flags of the serving commands.
#[derive(clap::Args, Debug, Clone)]
pub struct ObserveArgs {
    /// Admin endpoint (/metrics, /readyz, /status, …): IP:PORT, or `off`. Default
    /// 127.0.0.1:15000, skipped with a warning if that port is busy; an address given here
    /// must be free.
    #[arg(long, value_name = "ADDR|off")]
    pub admin_addr: Option<AdminListen>,
    /// A listener for kubelet's probes only (/healthz, /readyz), apart from the admin
    /// endpoint: clients holding the admin endpoint's slots cannot fail the probes. In
    /// Kubernetes, 0.0.0.0:15021 (deploy/). Default: none.
    #[arg(long, value_name = "ADDR")]
    pub probe_addr: Option<SocketAddr>,
    /// Access log, one JSON line per closed connection: `stdout`, a file (appended), or `off`.
    #[arg(long, value_name = "stdout|FILE|off", default_value = "off")]
    pub access_log: AccessLogTarget,
    /// Give up to N distinct original destinations their own metric series (the rest share
    /// destination="other"). 0: no per-destination series.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=MAX_DESTINATION_SERIES))]
    pub metrics_destinations: u16,
}

impl From<ObserveArgs> for ObserveOptions {
    fn from(a: ObserveArgs) -> Self {
        Self {
            admin: a.admin_addr.unwrap_or_default(),
            probe: a.probe_addr,
            access_log: a.access_log,
            destination_labels: usize::from(a.metrics_destinations),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The observability options show in `/config` under their flags' names, the same for
    /// every command that has them.
    #[test]
    fn observe_options_show_in_config_under_their_flags_names() {
        use clap::{CommandFactory, Parser};

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            observe: ObserveArgs,
        }
        let cli = Cli::parse_from(["t", "--access-log", "stdout", "--metrics-destinations", "3"]);
        let shown =
            crate::admin::config::with(serde_json::json!({}), &ObserveOptions::from(cli.observe));
        let mut flags: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
            .collect();
        let mut keys: Vec<String> = shown.as_object().unwrap().keys().cloned().collect();
        flags.sort();
        keys.sort();
        assert_eq!(keys, flags);
        assert_eq!(shown["admin_addr"], crate::admin::DEFAULT_ADDR);
        assert_eq!(shown["probe_addr"], serde_json::Value::Null);
        assert_eq!(shown["access_log"], "stdout");
        assert_eq!(shown["metrics_destinations"], 3);
    }
}
