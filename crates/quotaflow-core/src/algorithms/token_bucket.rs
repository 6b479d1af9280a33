//! Token bucket, in its virtual-scheduling form (GCRA).
//!
//! A bucket of `capacity` tokens refilled at `refill_per_sec` is exactly
//! described by one instant, the *theoretical arrival time* (TAT): the moment
//! the bucket would be full again. Keeping the TAT instead of a token count
//! and a timestamp makes refill exact integer arithmetic with no drift.
//!
//! State layout: `[tat_ns, last_ms, 0]`, where `last_ms` is the key's clock
//! (the latest time it has seen), so a late request is applied at that time.

use serde_json::{Map, Value};

use super::{
    div_ceil, Algorithm, Outcome, ParamError, Params, PolicyShape, State, Verdict, MAX_QUOTA,
    MAX_WINDOW,
};

const NS_PER_MS: u64 = 1_000_000;
const NS_PER_SEC: f64 = 1_000_000_000.0;

/// `capacity` tokens, refilled continuously at `refill_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    capacity: u64,
    /// Nanoseconds per token, rounded up so the effective rate never exceeds
    /// the configured one.
    interval_ns: u64,
    /// `capacity * interval_ns`: how far ahead of now the TAT may run.
    burst_ns: u64,
}

impl TokenBucket {
    /// A bucket of `capacity` tokens refilled at `refill_per_sec`, or `None`
    /// when the refill period of a full bucket exceeds a year (or is zero).
    pub fn new(capacity: u64, refill_per_sec: f64) -> Option<Self> {
        if capacity == 0 || capacity > MAX_QUOTA || refill_per_sec.is_nan() || refill_per_sec <= 0.0
        {
            return None;
        }
        let interval = (NS_PER_SEC / refill_per_sec).ceil();
        if !(1.0..=MAX_WINDOW.as_nanos() as f64).contains(&interval) {
            return None;
        }
        let interval_ns = interval as u64;
        let burst_ns = capacity.checked_mul(interval_ns)?;
        if u128::from(burst_ns) > MAX_WINDOW.as_nanos() {
            return None;
        }
        Some(Self {
            capacity,
            interval_ns,
            burst_ns,
        })
    }

    pub(crate) fn from_params(map: &Map<String, Value>) -> Result<Self, Vec<ParamError>> {
        let mut p = Params::new(map, &["capacity", "refill_per_sec"]);
        let capacity = p.integer("capacity", 1, MAX_QUOTA);
        let refill = p.positive("refill_per_sec", 1e9);
        p.finish(())?;
        Self::new(capacity, refill).ok_or_else(|| {
            vec![ParamError::new(
                "refill_per_sec",
                format!(
                    "refilling {capacity} tokens at {refill}/s takes longer than {}; raise refill_per_sec or lower capacity",
                    humantime::format_duration(MAX_WINDOW)
                ),
            )]
        })
    }
}

impl TokenBucket {
    /// [`Algorithm::decide`], or with `force` [`Algorithm::charge`].
    fn step(&self, state: &State, now_ms: u64, cost: u64, force: bool) -> Outcome {
        let now_ms = now_ms.max(state[1]);
        let now_ns = now_ms.saturating_mul(NS_PER_MS);
        let tat = state[0].max(now_ns);
        let new_tat = tat.saturating_add(cost.saturating_mul(self.interval_ns));
        let allowed = new_tat - now_ns <= self.burst_ns;
        let kept_tat = if allowed || force { new_tat } else { tat };
        let ahead = kept_tat - now_ns;
        let reset_ms = div_ceil(ahead, NS_PER_MS);
        let retry_after_ms = if allowed {
            0
        } else if cost > self.capacity {
            reset_ms.max(1)
        } else {
            div_ceil(new_tat - now_ns - self.burst_ns, NS_PER_MS).max(1)
        };
        Outcome {
            verdict: Verdict {
                allowed,
                limit: self.capacity,
                remaining: self.burst_ns.saturating_sub(ahead) / self.interval_ns,
                reset_ms,
                retry_after_ms,
                clock_ms: now_ms,
            },
            state: [kept_tat, now_ms, 0],
            expires_at_ms: div_ceil(kept_tat, NS_PER_MS).max(now_ms),
        }
    }
}

impl Algorithm for TokenBucket {
    fn name(&self) -> &'static str {
        "token_bucket"
    }

    fn decide(&self, state: &State, now_ms: u64, cost: u64) -> Outcome {
        self.step(state, now_ms, cost, false)
    }

    fn charge(&self, state: &State, now_ms: u64, cost: u64) -> Outcome {
        self.step(state, now_ms, cost, true)
    }

    fn shape(&self) -> PolicyShape {
        PolicyShape {
            quota: self.capacity,
            window_secs: div_ceil(self.burst_ns, 1_000_000_000).max(1),
        }
    }

    fn spec(&self) -> super::Spec {
        super::Spec::TokenBucket {
            capacity: self.capacity,
            interval_ns: self.interval_ns,
            burst_ns: self.burst_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(tb: &TokenBucket, events: &[(u64, u64)]) -> Vec<bool> {
        let mut state = State::default();
        events
            .iter()
            .map(|&(t, c)| {
                let o = tb.decide(&state, t, c);
                state = o.state;
                o.verdict.allowed
            })
            .collect()
    }

    #[test]
    fn burst_then_refill() {
        let tb = TokenBucket::new(3, 1.0).unwrap();
        let got = run(
            &tb,
            &[
                (1000, 1),
                (1000, 1),
                (1000, 1),
                (1000, 1),
                (1999, 1),
                (2000, 1),
                (2000, 1),
            ],
        );
        assert_eq!(got, vec![true, true, true, false, false, true, false]);
    }

    #[test]
    fn verdict_carries_header_values() {
        let tb = TokenBucket::new(10, 2.0).unwrap();
        let o = tb.decide(&State::default(), 5_000, 4);
        assert_eq!(
            o.verdict,
            Verdict {
                allowed: true,
                limit: 10,
                remaining: 6,
                reset_ms: 2_000,
                retry_after_ms: 0,
                clock_ms: 5_000
            }
        );
        let o = tb.decide(&o.state, 5_000, 7);
        assert!(!o.verdict.allowed);
        assert_eq!(o.verdict.remaining, 6);
        // One more token is needed; at 2 per second that is 500 ms away.
        assert_eq!(o.verdict.retry_after_ms, 500);
        assert_eq!(o.expires_at_ms, 7_000);
    }

    #[test]
    fn cost_above_capacity_is_never_admitted() {
        let tb = TokenBucket::new(5, 100.0).unwrap();
        let o = tb.decide(&State::default(), 0, 6);
        assert!(!o.verdict.allowed);
        assert!(o.verdict.retry_after_ms >= 1);
    }

    #[test]
    fn rejects_refill_periods_beyond_a_year() {
        assert!(TokenBucket::new(10, 1e-9).is_none());
        assert!(TokenBucket::new(0, 1.0).is_none());
        assert!(TokenBucket::new(10, f64::NAN).is_none());
    }

    proptest! {
        /// In every interval [a, b] the admitted cost is at most
        /// capacity + rate * (b - a), even with out-of-order times.
        #[test]
        fn never_admits_more_than_capacity_plus_refill(
            capacity in 1u64..50,
            rate_milli in 1u64..50_000,
            events in prop::collection::vec((0u64..20_000, 1u64..5), 1..200),
        ) {
            let rate = rate_milli as f64 / 1000.0;
            let tb = TokenBucket::new(capacity, rate).unwrap();
            let mut state = State::default();
            let mut admitted = Vec::new();
            for &(t, c) in &events {
                let o = tb.decide(&state, t, c);
                if o.verdict.allowed {
                    // Applied at the key's clock, which never runs backwards.
                    admitted.push((o.state[1], c));
                }
                prop_assert!(o.state[1] >= state[1]);
                state = o.state;
            }
            for i in 0..admitted.len() {
                let mut total = 0u64;
                for j in i..admitted.len() {
                    total += admitted[j].1;
                    let elapsed_s = (admitted[j].0 - admitted[i].0) as f64 / 1000.0;
                    prop_assert!(total as f64 <= capacity as f64 + rate * elapsed_s + 1e-9,
                        "admitted {} in {}s, capacity {} rate {}", total, elapsed_s, capacity, rate);
                }
            }
        }

        /// A refused request changes nothing but the key's clock.
        #[test]
        fn refusal_consumes_nothing(capacity in 1u64..20, t in 0u64..10_000, cost in 1u64..40) {
            let tb = TokenBucket::new(capacity, 1.0).unwrap();
            let full = tb.decide(&State::default(), t, capacity).state;
            let o = tb.decide(&full, t, cost);
            prop_assert!(!o.verdict.allowed);
            prop_assert_eq!(o.state[0], full[0]);
        }

        /// Remaining never exceeds the limit and a fresh key admits a full burst.
        #[test]
        fn remaining_is_bounded(capacity in 1u64..100, t in 0u64..1_000_000) {
            let tb = TokenBucket::new(capacity, 10.0).unwrap();
            let o = tb.decide(&State::default(), t, capacity);
            prop_assert!(o.verdict.allowed);
            prop_assert_eq!(o.verdict.remaining, 0);
            let o = tb.decide(&State::default(), t, 1);
            prop_assert_eq!(o.verdict.remaining, capacity - 1);
        }
    }
}
