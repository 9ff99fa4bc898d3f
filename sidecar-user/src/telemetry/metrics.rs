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
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
};
use sidecar_common::Counter;

use super::{
    labels::{Attempt, Cap, Decision, Direction, Outcome, Path, Transition, Transport},
    process::ProcessCollector,
};

/// Metric name prefix.
pub const NAMESPACE: &str = "sidecar";
/// The value of the `destination` label once the per-destination cap is reached.
pub const OTHER_DESTINATION: &str = "other";

/// Which socket of a proxied connection a TCP statistic is about.
pub const LEGS: [&str; 2] = ["app", "upstream"];
/// Values of the `kind` label of mTLS handshakes: a full handshake (certificates exchanged and
/// verified) or a resumption of an earlier session (a ticket, no certificates).
pub const HANDSHAKE_KINDS: [&str; 2] = ["full", "resumed"];

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
    pub tls_handshakes: IntCounterVec,
    pub proxy_setup: HistogramVec,
    pub fast_path: IntCounterVec,
    pub policy_decisions: IntCounterVec,
    pub refused_at_cap: IntCounterVec,
    pub connect_retries: IntCounterVec,
    pub circuits_open: IntGauge,
    pub circuit_fast_failed: IntCounter,
    pub circuit_transitions: IntCounterVec,
    pub tunnel_failures: IntCounterVec,
    pub hbone_connections: IntGaugeVec,
    pub hbone_streams_per_connection: HistogramVec,
    pub hbone_handshakes_avoided: IntCounterVec,
    pub hbone_violations: IntCounterVec,
    pub access_log_dropped: IntCounter,
    pub certificates_loaded: IntGauge,
    pub certificate_expiry: GaugeVec,
    pub certificate_reload_errors: IntCounter,
    pub certificates_stale: IntGauge,
    pub tcp_srtt: HistogramVec,
    pub tcp_retransmits: IntCounterVec,
    pub tcp_delivery_rate: HistogramVec,
    pub ready: IntGauge,
    pub interception_attached: IntGauge,
    pub startup: Gauge,
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
        let dir_path = &["direction", "path"];
        let m = Self {
            opened: reg!(IntCounterVec::new(
                opts(
                    "connections_opened_total",
                    "Connections opened: accepted by the proxy (path=\"proxy\"), or let through \
                     to their destination by the kernel (path=\"passthrough\", counted when \
                     the kernel reports them, at close)."
                ),
                &["direction", "mode", "path"]
            )),
            closed: reg!(IntCounterVec::new(
                opts(
                    "connections_closed_total",
                    "Connections that ended, by why they ended (failures included)."
                ),
                &["direction", "reason", "path"]
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
                    "Bytes from the app to the destination: counted as the proxy forwards \
                     them, or as the destination acknowledged them (pass-through, at close)."
                ),
                dir_path
            )),
            received_bytes: reg!(IntCounterVec::new(
                opts(
                    "received_bytes_total",
                    "Bytes from the destination back to the app (as forwarded, or as received \
                     by the app's socket for pass-through, at close)."
                ),
                dir_path
            )),
            duration: reg!(HistogramVec::new(
                hist(
                    "connection_duration_seconds",
                    "Lifetime of closed connections: accept to close, or connect to close \
                     (pass-through).",
                    buckets(0.001, 4.0, 12)
                ),
                dir_path
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
                    "mTLS handshake time (no observations without --tls-dir).",
                    buckets(0.0001, 4.0, 10)
                ),
                dir
            )),
            tls_handshakes: reg!(IntCounterVec::new(
                opts(
                    "tls_handshakes_total",
                    "Completed mTLS handshakes, by kind: full (certificates exchanged and \
                     verified) or resumed (an earlier session's ticket; cheaper)."
                ),
                &["direction", "kind"]
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
                    "Connections whose leg was spliced by the kernel sockmap (--sockmap)."
                ),
                &["direction", "leg"]
            )),
            policy_decisions: reg!(IntCounterVec::new(
                opts(
                    "policy_decisions_total",
                    "Authorization policy decisions (zero without --policy)."
                ),
                &["direction", "decision"]
            )),
            refused_at_cap: reg!(IntCounterVec::new(
                opts(
                    "connections_refused_total",
                    "Connections refused because a cap was reached (--max-connections, \
                     --max-pending-handshakes: reset right after accept; \
                     --max-connections-per-destination: outcome overloaded)."
                ),
                &["direction", "reason"]
            )),
            connect_retries: reg!(IntCounterVec::new(
                opts(
                    "upstream_connect_retries_total",
                    "Connect attempts after a first failed one (refused, unreachable, no \
                     answer), before any byte was forwarded; outcome: whether that attempt \
                     connected."
                ),
                &["direction", "outcome"]
            )),
            circuits_open: reg!(IntGauge::with_opts(opts(
                "circuits_open",
                "Destinations whose circuit is open or half-open: new connections to them \
                 fail at once."
            ))),
            circuit_fast_failed: reg!(IntCounter::with_opts(opts(
                "circuit_fast_failed_total",
                "Connections failed at once because their destination's circuit was open \
                 (outcome circuit_open)."
            ))),
            circuit_transitions: reg!(IntCounterVec::new(
                opts(
                    "circuit_transitions_total",
                    "Circuit state changes: to open (the failure threshold, or a failed \
                     trial), half_open (a trial connection goes) or closed (it connected)."
                ),
                &["to"]
            )),
            tunnel_failures: reg!(IntCounterVec::new(
                opts(
                    "tunnel_failures_total",
                    "Outbound mTLS tunnels that could not be used, by reason: no_answer \
                     (nothing listens on the tunnel port: the only case in which permissive \
                     mode falls back to plaintext), a failed connect, TLS handshake, ALPN, \
                     identity or HTTP/2 handshake; a stream lost with its connection, not \
                     answered in time, or refused by the peer (refused_bad_request, \
                     refused_denied, refused_unreachable, refused_other); or \
                     server_identity_denied (the outbound policy refused the verified server)."
                ),
                &["reason"]
            )),
            hbone_connections: reg!(IntGaugeVec::new(
                opts(
                    "hbone_connections",
                    "HBONE (HTTP/2 over mTLS) connections open now: outbound, the pooled \
                     connections to peers; inbound, peers' connections to our tunnel port."
                ),
                dir
            )),
            hbone_streams_per_connection: reg!(HistogramVec::new(
                hist(
                    "hbone_streams_per_connection",
                    "Streams (application connections) an HBONE connection carried in its \
                     life, observed when it closes.",
                    buckets(1.0, 4.0, 9)
                ),
                dir
            )),
            hbone_handshakes_avoided: reg!(IntCounterVec::new(
                opts(
                    "hbone_handshakes_avoided_total",
                    "Streams that rode an HBONE connection already open: each is a TLS \
                     handshake not made."
                ),
                dir
            )),
            hbone_violations: reg!(IntCounterVec::new(
                opts(
                    "hbone_violations_total",
                    "Inbound HBONE connections sent away (GOAWAY) for breaking HTTP/2's rules \
                     or our bounds, by reason: rapid_reset (streams reset before we answered, \
                     over the per-second bound), protocol_error, enhance_your_calm (h2's own \
                     flood bounds), compression_error, …"
                ),
                &["reason"]
            )),
            access_log_dropped: reg!(IntCounter::with_opts(opts(
                "access_log_dropped_total",
                "Access-log lines dropped because the writer (stdout or the file) fell behind \
                 and its queue was full."
            ))),
            certificates_loaded: reg!(IntGauge::with_opts(opts(
                "certificates_loaded",
                "Workload certificates loaded (0 without --tls-dir)."
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
            startup: reg!(Gauge::with_opts(opts(
                "startup_seconds",
                "Seconds from exec to the first time /readyz was ready (0 until then): what \
                 a restart costs before the workload's traffic flows again."
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
        // The sidecar's own CPU, memory and descriptors, under the standard `process_*` names.
        m.registry
            .register(Box::new(ProcessCollector::new()))
            .expect("process metric names are unique");
        m.initialise_series();
        m
    }

    /// Touches every bounded label combination so each series exists at zero.
    fn initialise_series(&self) {
        for direction in Direction::ALL {
            let d = direction.as_str();
            for path in Path::ALL {
                if !path.applies_to(direction) {
                    continue;
                }
                let p = path.as_str();
                for mode in Transport::ALL.map(Transport::as_str) {
                    self.opened.with_label_values(&[d, mode, p]);
                }
                for reason in Outcome::ALL {
                    self.closed.with_label_values(&[d, reason.as_str(), p]);
                }
                self.sent_bytes.with_label_values(&[d, p]);
                self.received_bytes.with_label_values(&[d, p]);
                self.duration.with_label_values(&[d, p]);
            }
            for reason in Outcome::ALL {
                if reason.is_setup_failure() {
                    self.failed.with_label_values(&[d, reason.as_str()]);
                }
            }
            for decision in Decision::ALL.map(Decision::as_str) {
                self.policy_decisions.with_label_values(&[d, decision]);
            }
            for leg in LEGS {
                self.fast_path.with_label_values(&[d, leg]);
            }
            for cap in Cap::ALL.map(Cap::as_str) {
                self.refused_at_cap.with_label_values(&[d, cap]);
            }
            for outcome in Attempt::ALL.map(Attempt::as_str) {
                self.connect_retries.with_label_values(&[d, outcome]);
            }
            self.active.with_label_values(&[d]);
            self.upstream_connect.with_label_values(&[d]);
            self.tls_handshake.with_label_values(&[d]);
            for kind in HANDSHAKE_KINDS {
                self.tls_handshakes.with_label_values(&[d, kind]);
            }
            self.proxy_setup.with_label_values(&[d]);
            self.hbone_connections.with_label_values(&[d]);
            self.hbone_streams_per_connection.with_label_values(&[d]);
            self.hbone_handshakes_avoided.with_label_values(&[d]);
        }
        for reason in crate::tunnel::server::VIOLATIONS {
            self.hbone_violations.with_label_values(&[reason]);
        }
        for to in Transition::ALL.map(Transition::as_str) {
            self.circuit_transitions.with_label_values(&[to]);
        }
        for reason in crate::tunnel::FAILURE_REASONS {
            self.tunnel_failures.with_label_values(&[reason]);
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
    fn handshake_kinds_start_at_zero_in_both_directions() {
        let text = Metrics::new(0).render();
        for d in Direction::ALL.map(Direction::as_str) {
            for kind in HANDSHAKE_KINDS {
                let series =
                    format!("sidecar_tls_handshakes_total{{direction=\"{d}\",kind=\"{kind}\"}} 0");
                assert!(text.contains(&series), "{series} missing:\n{text}");
            }
        }
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
