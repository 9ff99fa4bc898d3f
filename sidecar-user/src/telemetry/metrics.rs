//! Every Prometheus metric the sidecar exports, in one registry.
//!
//! Labels are bounded by construction: direction, mode, close reason, policy decision, leg —
//! each a small enum, all pre-initialised so every series exists (at zero) from the start and
//! a dashboard never sees a series appear out of nowhere. Ports and addresses never become
//! labels unless the operator opts in with `--metrics-destinations N`, and then at most N
//! distinct destinations get their own series; the rest share `destination="other"`.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::Mutex,
};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
};
use sidecar_common::Counter;

use crate::proxy::record::{Direction, Mode, Outcome};

/// Metric name prefix.
pub const NAMESPACE: &str = "sidecar";
/// The value of the `destination` label once the per-destination cap is reached.
pub const OTHER_DESTINATION: &str = "other";

/// Which socket of a proxied connection a TCP statistic is about.
pub const LEGS: [&str; 2] = ["app", "upstream"];
/// Values of the `decision` label of policy decisions.
pub const DECISIONS: [&str; 4] = ["allow", "deny", "audit", "would_deny"];

pub struct Metrics {
    registry: Registry,
    pub opened: IntCounterVec,
    pub closed: IntCounterVec,
    pub failed: IntCounterVec,
    pub active: IntGaugeVec,
    pub sent_bytes: IntCounterVec,
    pub received_bytes: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_connect: HistogramVec,
    pub tls_handshake: HistogramVec,
    pub proxy_setup: HistogramVec,
    pub fast_path: IntCounterVec,
    pub policy_decisions: IntCounterVec,
    pub certificates_loaded: IntGauge,
    pub certificate_expiry: GaugeVec,
    pub certificate_reload_errors: IntCounter,
    pub certificates_stale: IntGauge,
    pub tcp_srtt: HistogramVec,
    pub tcp_retransmits: IntCounterVec,
    pub tcp_delivery_rate: HistogramVec,
    pub ready: IntGauge,
    pub interception_attached: IntGauge,
    /// One counter per eBPF counter, advanced to the kernel's sum at each scrape.
    ebpf: Mutex<Vec<(&'static str, IntCounter, u64)>>,
    destinations: Option<Destinations>,
}

/// The opt-in per-destination series, capped.
struct Destinations {
    cap: usize,
    seen: Mutex<HashSet<SocketAddr>>,
    connections: IntCounterVec,
    sent_bytes: IntCounterVec,
    received_bytes: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn hist(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets)
}

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    exponential_buckets(start, factor, count).expect("static bucket layout")
}

impl Metrics {
    /// `destination_cap`: how many distinct destinations get their own series (0 = none).
    pub fn new(destination_cap: usize) -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("static metric definition");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let dir = &["direction"];
        let m = Self {
            opened: reg!(IntCounterVec::new(
                opts(
                    "connections_opened_total",
                    "Connections accepted by the proxy."
                ),
                &["direction", "mode"]
            )),
            closed: reg!(IntCounterVec::new(
                opts(
                    "connections_closed_total",
                    "Connections that ended, by why they ended (failures included)."
                ),
                &["direction", "reason"]
            )),
            failed: reg!(IntCounterVec::new(
                opts(
                    "connections_failed_total",
                    "Connections that ended before any byte could be forwarded."
                ),
                &["direction", "reason"]
            )),
            active: reg!(IntGaugeVec::new(
                opts("connections_active", "Connections open now."),
                dir
            )),
            sent_bytes: reg!(IntCounterVec::new(
                opts(
                    "sent_bytes_total",
                    "Bytes forwarded from the app to the destination, counted as they move."
                ),
                dir
            )),
            received_bytes: reg!(IntCounterVec::new(
                opts(
                    "received_bytes_total",
                    "Bytes forwarded from the destination back to the app, counted as they move."
                ),
                dir
            )),
            duration: reg!(HistogramVec::new(
                hist(
                    "connection_duration_seconds",
                    "Lifetime of closed connections, accept to close.",
                    buckets(0.001, 4.0, 12)
                ),
                dir
            )),
            upstream_connect: reg!(HistogramVec::new(
                hist(
                    "upstream_connect_seconds",
                    "Time to connect to the original destination (successful connects).",
                    buckets(0.0001, 4.0, 10)
                ),
                dir
            )),
            tls_handshake: reg!(HistogramVec::new(
                hist(
                    "tls_handshake_seconds",
                    "mTLS handshake time (no observations until mTLS is built).",
                    buckets(0.0001, 4.0, 10)
                ),
                dir
            )),
            proxy_setup: reg!(HistogramVec::new(
                hist(
                    "proxy_setup_seconds",
                    "Time the proxy itself added before bytes could flow: accept to upstream \
                     ready, minus the upstream's own connect time.",
                    buckets(0.00001, 4.0, 10)
                ),
                dir
            )),
            fast_path: reg!(IntCounterVec::new(
                opts(
                    "fast_path_connections_total",
                    "Connections whose leg was spliced by the kernel sockmap fast path."
                ),
                &["direction", "leg"]
            )),
            policy_decisions: reg!(IntCounterVec::new(
                opts(
                    "policy_decisions_total",
                    "Authorization policy decisions (zero until policy is built)."
                ),
                &["direction", "decision"]
            )),
            certificates_loaded: reg!(IntGauge::with_opts(opts(
                "certificates_loaded",
                "Workload certificates loaded (0 until mTLS is built)."
            ))),
            certificate_expiry: reg!(GaugeVec::new(
                opts(
                    "certificate_expiry_timestamp_seconds",
                    "Unix time the loaded certificate expires (no series until one is loaded)."
                ),
                &["kind"]
            )),
            certificate_reload_errors: reg!(IntCounter::with_opts(opts(
                "certificate_reload_errors_total",
                "Changes of the certificate files that were refused (missing, invalid, half \
                 written): the last good set stays in force."
            ))),
            certificates_stale: reg!(IntGauge::with_opts(opts(
                "certificates_stale",
                "1 while the certificate files on disk are refused and the last good set is \
                 served; 0 once a valid set is loaded again."
            ))),
            tcp_srtt: reg!(HistogramVec::new(
                hist(
                    "tcp_srtt_seconds",
                    "Kernel smoothed RTT (TCP_INFO) of each leg at close.",
                    buckets(0.00001, 4.0, 12)
                ),
                &["leg"]
            )),
            tcp_retransmits: reg!(IntCounterVec::new(
                opts(
                    "tcp_retransmits_total",
                    "Segments the kernel retransmitted (TCP_INFO), summed over closed connections."
                ),
                &["leg"]
            )),
            tcp_delivery_rate: reg!(HistogramVec::new(
                hist(
                    "tcp_delivery_rate_bytes_per_second",
                    "Kernel delivery-rate estimate (TCP_INFO) of each leg at close.",
                    buckets(1e4, 10.0, 8)
                ),
                &["leg"]
            )),
            ready: reg!(IntGauge::with_opts(opts(
                "ready",
                "1 when /readyz is ready: interception attached, listeners serving."
            ))),
            interception_attached: reg!(IntGauge::with_opts(opts(
                "interception_attached",
                "1 while the eBPF programs are attached for this workload."
            ))),
            ebpf: Mutex::new(
                Counter::ALL
                    .iter()
                    .map(|(_, name)| {
                        let c = reg!(IntCounter::with_opts(opts(
                            &format!("ebpf_{name}_total"),
                            &format!("eBPF counter {name}, summed over CPUs.")
                        )));
                        (*name, c, 0)
                    })
                    .collect(),
            ),
            destinations: (destination_cap > 0).then(|| Destinations {
                cap: destination_cap,
                seen: Mutex::new(HashSet::new()),
                connections: reg!(IntCounterVec::new(
                    opts(
                        "destination_connections_total",
                        "Connections by original destination (opt-in, capped; the rest are \
                         destination=\"other\")."
                    ),
                    &["destination"]
                )),
                sent_bytes: reg!(IntCounterVec::new(
                    opts(
                        "destination_sent_bytes_total",
                        "Bytes sent, by original destination (opt-in, capped)."
                    ),
                    &["destination"]
                )),
                received_bytes: reg!(IntCounterVec::new(
                    opts(
                        "destination_received_bytes_total",
                        "Bytes received, by original destination (opt-in, capped)."
                    ),
                    &["destination"]
                )),
            }),
            registry,
        };
        m.initialise_series();
        m
    }

    /// Touches every bounded label combination so each series exists at zero.
    fn initialise_series(&self) {
        for d in Direction::ALL.map(Direction::as_str) {
            for mode in Mode::ALL.map(Mode::as_str) {
                self.opened.with_label_values(&[d, mode]);
            }
            for reason in Outcome::ALL {
                self.closed.with_label_values(&[d, reason.as_str()]);
                if reason.is_setup_failure() {
                    self.failed.with_label_values(&[d, reason.as_str()]);
                }
            }
            for decision in DECISIONS {
                self.policy_decisions.with_label_values(&[d, decision]);
            }
            for leg in LEGS {
                self.fast_path.with_label_values(&[d, leg]);
            }
            self.active.with_label_values(&[d]);
            self.sent_bytes.with_label_values(&[d]);
            self.received_bytes.with_label_values(&[d]);
            self.duration.with_label_values(&[d]);
            self.upstream_connect.with_label_values(&[d]);
            self.tls_handshake.with_label_values(&[d]);
            self.proxy_setup.with_label_values(&[d]);
        }
        for leg in LEGS {
            self.tcp_srtt.with_label_values(&[leg]);
            self.tcp_retransmits.with_label_values(&[leg]);
            self.tcp_delivery_rate.with_label_values(&[leg]);
        }
    }

    /// Moves the eBPF counters up to the kernel's current sums (they only grow).
    pub fn update_ebpf(&self, kernel: &BTreeMap<&'static str, u64>) {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        for (name, counter, last) in ebpf.iter_mut() {
            if let Some(&now) = kernel.get(name)
                && now > *last
            {
                counter.inc_by(now - *last);
                *last = now;
            }
        }
    }

    /// Counts a closed connection under its destination, if per-destination series are on.
    pub fn count_destination(&self, dst: SocketAddr, sent: u64, received: u64) {
        let Some(d) = &self.destinations else { return };
        let label = {
            let mut seen = d.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(&dst) || (seen.len() < d.cap && seen.insert(dst)) {
                dst.to_string()
            } else {
                OTHER_DESTINATION.to_string()
            }
        };
        d.connections.with_label_values(&[&label]).inc();
        d.sent_bytes.with_label_values(&[&label]).inc_by(sent);
        d.received_bytes
            .with_label_values(&[&label])
            .inc_by(received);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_capped() {
        let m = Metrics::new(3);
        for port in 1..=100u16 {
            m.count_destination(SocketAddr::from(([127, 0, 0, 1], port)), 1, 2);
        }
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("sidecar_destination_connections_total{"))
            .count();
        assert_eq!(series, 4, "3 destinations + other:\n{text}");
        assert!(text.contains("sidecar_destination_connections_total{destination=\"other\"} 97"));
    }

    #[test]
    fn no_destination_series_by_default() {
        let m = Metrics::new(0);
        m.count_destination(SocketAddr::from(([127, 0, 0, 1], 80)), 1, 1);
        assert!(!m.render().contains("sidecar_destination_"));
    }

    #[test]
    fn ebpf_counters_follow_the_kernel_sums() {
        let m = Metrics::new(0);
        m.update_ebpf(&BTreeMap::from([("connect_seen", 5)]));
        m.update_ebpf(&BTreeMap::from([("connect_seen", 7)]));
        assert!(m.render().contains("sidecar_ebpf_connect_seen_total 7"));
    }
}
