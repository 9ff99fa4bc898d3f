//! Every policy decision, counted by direction, rule and outcome. Kept behind this small
//! type so it can be exported as metrics later without touching the data path.

use std::{collections::BTreeMap, sync::Mutex};

use serde::Serialize;

use crate::telemetry::labels::Direction;

/// How a decision went, as counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
    Audit,
    /// A deny in dry-run mode: let through, logged.
    WouldDeny,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::WouldDeny => "would_deny",
        }
    }
}

/// One counter row of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DecisionCount {
    pub direction: Direction,
    pub rule: String,
    pub outcome: Outcome,
    pub count: u64,
}

#[derive(Default)]
pub struct PolicyStats {
    counts: Mutex<BTreeMap<(Direction, String, Outcome), u64>>,
}

impl PolicyStats {
    pub fn count(&self, way: Direction, rule: &str, outcome: Outcome) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(&(way, rule.to_string(), outcome)) {
            Some(n) => *n += 1,
            None => {
                counts.insert((way, rule.to_string(), outcome), 1);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<DecisionCount> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((direction, rule, outcome), count)| DecisionCount {
                direction: *direction,
                rule: rule.clone(),
                outcome: *outcome,
                count: *count,
            })
            .collect()
    }
}
