//! The internal call's body and answer (JSON). Limits are named, not
//! numbered: two instances may run different config versions for a
//! moment, and a limit the owner does not know is then answered by its
//! failure mode rather than by another limit's state.

use serde::{Deserialize, Serialize};

use quotaflow_core::algorithms::Verdict;
use quotaflow_core::rules::Request;
use quotaflow_core::state::Probed;

/// Decide and count (`apply`), or decide only (`peek`: the first phase of
/// a check whose limits live on several homes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Apply,
    Peek,
}

/// A forwarded check: the request and the home partitions to decide it on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ask {
    pub phase: Phase,
    pub homes: Vec<i32>,
    pub request: Request,
}

/// The owner's answer: one outcome per limit it decided, and the homes it
/// does not own (any more).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub outcomes: Vec<WireOutcome>,
    pub not_owned: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireOutcome {
    pub limit: String,
    pub allowed: bool,
    pub quota: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    pub retry_after_ms: u64,
    pub clock_ms: u64,
    pub refused_before: u32,
}

impl WireOutcome {
    pub fn of(limit: &str, p: &Probed) -> Self {
        let v = p.outcome.verdict;
        Self {
            limit: limit.to_owned(),
            allowed: v.allowed,
            quota: v.limit,
            remaining: v.remaining,
            reset_ms: v.reset_ms,
            retry_after_ms: v.retry_after_ms,
            clock_ms: v.clock_ms,
            refused_before: p.refused_before,
        }
    }

    pub fn probed(&self) -> Probed {
        Probed::remote(
            Verdict {
                allowed: self.allowed,
                limit: self.quota,
                remaining: self.remaining,
                reset_ms: self.reset_ms,
                retry_after_ms: self.retry_after_ms,
                clock_ms: self.clock_ms,
            },
            self.refused_before,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quotaflow_core::algorithms::Outcome;

    #[test]
    fn an_outcome_survives_the_wire() {
        let p = Probed {
            outcome: Outcome {
                verdict: Verdict {
                    allowed: false,
                    limit: 10,
                    remaining: 0,
                    reset_ms: 900,
                    retry_after_ms: 90,
                    clock_ms: 1_700_000_000_000,
                },
                state: [1, 2, 3],
                expires_at_ms: 5,
            },
            refused_before: 4,
        };
        let w = WireOutcome::of("per_user", &p);
        let back: WireOutcome = serde_json::from_slice(&serde_json::to_vec(&w).unwrap()).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.probed().outcome.verdict, p.outcome.verdict);
        assert_eq!(back.probed().refused_before, 4);
    }
}
