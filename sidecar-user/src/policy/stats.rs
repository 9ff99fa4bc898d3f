//! Every policy decision, counted by direction, rule and decision, for the report (the
//! metrics count them by direction and decision only: rule names are not bounded).

use std::{collections::BTreeMap, sync::Mutex};

use serde::Serialize;

use crate::telemetry::labels::{Decision, Direction};

/// One counter row of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DecisionCount {
    pub direction: Direction,
    pub rule: String,
    #[serde(rename = "outcome")]
    pub decision: Decision,
    pub count: u64,
}

#[derive(Default)]
pub struct PolicyStats {
    counts: Mutex<BTreeMap<(Direction, String, Decision), u64>>,
}

impl PolicyStats {
    pub fn count(&self, direction: Direction, rule: &str, decision: Decision) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(&(direction, rule.to_string(), decision)) {
            Some(n) => *n += 1,
            None => {
                counts.insert((direction, rule.to_string(), decision), 1);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<DecisionCount> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((direction, rule, decision), count)| DecisionCount {
                direction: *direction,
                rule: rule.clone(),
                decision: *decision,
                count: *count,
            })
            .collect()
    }
}
