//! Shutdown fits in the grace period: kubelet kills whatever still runs when it ends, so a
//! drain cut short drops the connections it was meant to finish.

use super::{Doc, pod::each_sidecar, seq};

/// Seconds the app may take to exit after its preStop, before the sidecar's drain begins.
pub const APP_EXIT_MARGIN_SECS: i64 = 10;

/// The pod's grace period covers the app's preStop, its exit and the sidecar's drain (the
/// sidecar is signalled only once the app has exited).
pub fn check(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    each_sidecar(docs, "proxy", |c| {
        let Some(drain) = c
            .flag("--drain-timeout-secs")
            .and_then(|d| d.parse::<i64>().ok())
        else {
            p.push(format!("{}: no --drain-timeout-secs", c.label()));
            return;
        };
        let grace = c.pod.spec["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30);
        let pre_stop = seq(&c.pod.spec["containers"])
            .iter()
            .filter_map(|a| a["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64())
            .max()
            .unwrap_or(0);
        let need = pre_stop + APP_EXIT_MARGIN_SECS + drain;
        if grace < need {
            p.push(format!(
                "{}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} + app exit \
                 {APP_EXIT_MARGIN_SECS} + --drain-timeout-secs {drain} = {need}",
                c.pod.doc.label()
            ));
        }
    });
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::testing::{edited, run_table};

    #[test]
    fn the_grace_period_covers_pre_stop_exit_and_drain() {
        let cases = [
            ("40 s for 5 + 10 + 20", edited("", ""), None),
            (
                "exactly enough",
                edited(
                    "terminationGracePeriodSeconds: 40",
                    "terminationGracePeriodSeconds: 35",
                ),
                None,
            ),
            (
                "one second short",
                edited(
                    "terminationGracePeriodSeconds: 40",
                    "terminationGracePeriodSeconds: 34",
                ),
                Some(
                    "Pod/app: terminationGracePeriodSeconds 34 < preStop 5 + app exit 10 + --drain-timeout-secs 20 = 35",
                ),
            ),
            (
                "kubelet's default of 30",
                edited("  terminationGracePeriodSeconds: 40\n", ""),
                Some("terminationGracePeriodSeconds 30 <"),
            ),
            (
                "a longer preStop",
                edited("seconds: 5", "seconds: 11"),
                Some("terminationGracePeriodSeconds 40 < preStop 11 + app exit 10"),
            ),
            (
                "no drain timeout",
                edited("--drain-timeout-secs=20", "--other"),
                Some("container sidecar: no --drain-timeout-secs"),
            ),
        ];
        run_table(cases, check);
    }
}
