//! Fixed window counter: at most `limit` units per aligned window.
//!
//! Windows are aligned to the epoch (`now - now % window`), so every key
//! resets at the same instants, as envoy's ratelimit does; this is the
//! cheapest algorithm and the easiest to explain, at the price of allowing
//! up to `2 * limit` across a window boundary.
//!
//! State layout: `[window_start_ms, count, 0]`. The window start is also the
//! key's clock: a late request is counted in the key's current window.

use serde_json::{Map, Value};

use super::{
    Algorithm, Outcome, ParamError, Params, PolicyShape, State, Verdict, MAX_QUOTA, MAX_WINDOW,
};

/// At most `limit` units per aligned window of `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedWindow {
    limit: u64,
    window_ms: u64,
}

impl FixedWindow {
    /// `None` when either parameter is zero or beyond the supported range.
    pub fn new(limit: u64, window_ms: u64) -> Option<Self> {
        let ok = (1..=MAX_QUOTA).contains(&limit)
            && (1..=MAX_WINDOW.as_millis() as u64).contains(&window_ms);
        ok.then_some(Self { limit, window_ms })
    }

    pub(crate) fn from_params(map: &Map<String, Value>) -> Result<Self, Vec<ParamError>> {
        let mut p = Params::new(map, &["limit", "window"]);
        let limit = p.integer("limit", 1, MAX_QUOTA);
        let window_ms = p.duration_ms("window", MAX_WINDOW);
        p.finish(Self { limit, window_ms })
    }
}

impl FixedWindow {
    /// [`Algorithm::decide`], or with `force` [`Algorithm::charge`].
    fn step(&self, state: &State, now_ms: u64, cost: u64, force: bool) -> Outcome {
        let now_ms = now_ms.max(state[0]);
        let start = now_ms - now_ms % self.window_ms;
        let count = if start == state[0] { state[1] } else { 0 };
        let allowed = count.saturating_add(cost) <= self.limit;
        let count = if allowed || force {
            count.saturating_add(cost)
        } else {
            count
        };
        let end = start.saturating_add(self.window_ms);
        Outcome {
            verdict: Verdict {
                allowed,
                limit: self.limit,
                // The count may exceed a limit lowered since it was made.
                remaining: self.limit.saturating_sub(count),
                reset_ms: end - now_ms,
                retry_after_ms: if allowed { 0 } else { end - now_ms },
                clock_ms: now_ms,
            },
            state: [start, count, 0],
            expires_at_ms: end,
        }
    }
}

impl Algorithm for FixedWindow {
    fn name(&self) -> &'static str {
        "fixed_window"
    }

    fn decide(&self, state: &State, now_ms: u64, cost: u64) -> Outcome {
        self.step(state, now_ms, cost, false)
    }

    fn charge(&self, state: &State, now_ms: u64, cost: u64) -> Outcome {
        self.step(state, now_ms, cost, true)
    }

    fn shape(&self) -> PolicyShape {
        PolicyShape {
            quota: self.limit,
            window_secs: self.window_ms.div_ceil(1000),
        }
    }

    fn spec(&self) -> super::Spec {
        super::Spec::FixedWindow {
            limit: self.limit,
            window_ms: self.window_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_per_aligned_window() {
        let fw = FixedWindow::new(2, 1000).unwrap();
        let mut s = State::default();
        let mut seen = Vec::new();
        for t in [1000, 1500, 1999, 2000, 2001, 2002] {
            let o = fw.decide(&s, t, 1);
            s = o.state;
            seen.push((
                o.verdict.allowed,
                o.verdict.remaining,
                o.verdict.retry_after_ms,
            ));
        }
        assert_eq!(
            seen,
            vec![
                (true, 1, 0),
                (true, 0, 0),
                (false, 0, 1),
                (true, 1, 0),
                (true, 0, 0),
                (false, 0, 998)
            ]
        );
    }

    #[test]
    fn late_request_counts_in_current_window() {
        let fw = FixedWindow::new(1, 1000).unwrap();
        let s = fw.decide(&State::default(), 5_500, 1).state;
        // An event stamped in an earlier window cannot reopen it.
        let o = fw.decide(&s, 4_200, 1);
        assert!(!o.verdict.allowed);
        assert_eq!(o.state[0], 5_000);
    }

    proptest! {
        /// No window ever admits more than `limit` units, whatever the order of times.
        #[test]
        fn never_more_than_limit_per_window(
            limit in 1u64..20,
            window in 1u64..2_000,
            events in prop::collection::vec((0u64..10_000, 1u64..4), 1..300),
        ) {
            let fw = FixedWindow::new(limit, window).unwrap();
            let mut state = State::default();
            let mut per_window = std::collections::HashMap::<u64, u64>::new();
            for &(t, c) in &events {
                let o = fw.decide(&state, t, c);
                prop_assert!(o.state[0] >= state[0], "key clock ran backwards");
                if o.verdict.allowed {
                    *per_window.entry(o.state[0]).or_default() += c;
                }
                state = o.state;
            }
            for (&start, &total) in &per_window {
                prop_assert!(total <= limit, "window {} admitted {} > {}", start, total, limit);
            }
        }
    }
}
