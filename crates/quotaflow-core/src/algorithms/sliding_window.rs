//! Sliding window, as the weighted two-window counter Cloudflare describes.
//!
//! The rate at `now` is estimated as `prev * (window - elapsed) / window +
//! curr`, where `prev` and `curr` are the counts of the previous and current
//! aligned windows and `elapsed` is how far `now` is into the current one. A
//! request passes when the estimate plus its cost stays within `limit`.
//!
//! Stated bound (checked by property tests): each aligned window admits at
//! most `limit`, and any interval of one window's length admits less than
//! `2 * limit`; under steady traffic the estimate tracks the true rate, which
//! is why this smooths the boundary bursts of a fixed window at the cost of
//! two counters.
//!
//! State layout: `[window_start_ms, curr, prev]`; the window start is the
//! key's clock.

use serde_json::{Map, Value};

use super::{
    Algorithm, Outcome, ParamError, Params, PolicyShape, State, Verdict, MAX_QUOTA, MAX_WINDOW,
};

/// At most `limit` units per sliding window of `window_ms` (weighted estimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindow {
    limit: u64,
    window_ms: u64,
}

impl SlidingWindow {
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

    /// `prev * (window - elapsed) + curr * window`: the estimate scaled by
    /// `window` so the comparison stays exact in integers.
    fn weighted(&self, prev: u64, curr: u64, elapsed: u64) -> u128 {
        u128::from(prev) * u128::from(self.window_ms - elapsed)
            + u128::from(curr) * u128::from(self.window_ms)
    }

    /// Milliseconds after `elapsed` until `prev`'s weight has decayed enough
    /// for `curr + cost` to fit, or `None` if it never fits in this window.
    fn wait_in_window(&self, prev: u64, curr: u64, cost: u64, elapsed: u64) -> Option<u64> {
        let need = curr.checked_add(cost)?;
        if need > self.limit {
            return None;
        }
        if prev == 0 {
            return Some(0);
        }
        // Smallest e with prev * (W - e) <= (limit - need) * W.
        let w = u128::from(self.window_ms);
        let slack = u128::from(self.limit - need) * w;
        let prev = u128::from(prev);
        let min_e = if prev * w <= slack {
            0
        } else {
            w - slack / prev
        };
        let min_e = (min_e as u64).max(elapsed);
        (min_e < self.window_ms).then(|| min_e - elapsed)
    }
}

impl SlidingWindow {
    /// [`Algorithm::decide`], or with `force` [`Algorithm::charge`].
    fn step(&self, state: &State, now_ms: u64, cost: u64, force: bool) -> Outcome {
        let w = self.window_ms;
        let now_ms = now_ms.max(state[0]);
        let start = now_ms - now_ms % w;
        let (curr, prev) = if start == state[0] {
            (state[1], state[2])
        } else if state[0].checked_add(w) == Some(start) {
            (0, state[1])
        } else {
            (0, 0)
        };
        let elapsed = now_ms - start;
        let allowed = cost <= self.limit
            && self.weighted(prev, curr.saturating_add(cost), elapsed)
                <= u128::from(self.limit) * u128::from(w);
        let curr = if allowed || force {
            curr.saturating_add(cost)
        } else {
            curr
        };
        let used = self.weighted(prev, curr, elapsed).div_ceil(u128::from(w)) as u64;
        // Saturating: a clock (or a restored state) at the end of time
        // yields an answer, not an overflow.
        let to_next = start.saturating_add(w) - now_ms;
        let retry_after_ms = if allowed {
            0
        } else if let Some(wait) = self.wait_in_window(prev, curr, cost, elapsed) {
            wait.max(1)
        } else if let Some(wait) = self.wait_in_window(curr, 0, cost, 0) {
            to_next.saturating_add(wait)
        } else {
            to_next.saturating_add(w)
        };
        Outcome {
            verdict: Verdict {
                allowed,
                limit: self.limit,
                remaining: self.limit.saturating_sub(used),
                reset_ms: if curr > 0 {
                    to_next.saturating_add(w)
                } else {
                    to_next
                },
                retry_after_ms,
                clock_ms: now_ms,
            },
            state: [start, curr, prev],
            expires_at_ms: start.saturating_add(2 * w),
        }
    }
}

impl Algorithm for SlidingWindow {
    fn name(&self) -> &'static str {
        "sliding_window"
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
        super::Spec::SlidingWindow {
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
    fn previous_window_weighs_in_linearly() {
        let sw = SlidingWindow::new(10, 1000).unwrap();
        let mut s = State::default();
        for _ in 0..10 {
            s = sw.decide(&s, 500, 1).state;
        }
        // At 1250 the previous window (10) still weighs 75%: 7.5 used, 2 fit.
        let a = sw.decide(&s, 1250, 2);
        assert!(a.verdict.allowed);
        let b = sw.decide(&a.state, 1250, 1);
        assert!(!b.verdict.allowed);
        // 7.5 + 2 + 1 fits once prev's weight drops to 0.7, at 1300.
        assert_eq!(b.verdict.retry_after_ms, 50);
        let c = sw.decide(&a.state, 1300, 1);
        assert!(c.verdict.allowed);
    }

    #[test]
    fn retry_after_is_exact() {
        let sw = SlidingWindow::new(4, 1000).unwrap();
        let mut s = State::default();
        for t in [100, 200, 300, 400] {
            s = sw.decide(&s, t, 1).state;
        }
        let refused = sw.decide(&s, 900, 1);
        assert!(!refused.verdict.allowed);
        let wait = refused.verdict.retry_after_ms;
        assert!(!sw.decide(&s, 900 + wait - 1, 1).verdict.allowed);
        assert!(sw.decide(&s, 900 + wait, 1).verdict.allowed);
    }

    proptest! {
        /// Each aligned window admits at most `limit`; any interval of one
        /// window's length admits less than `2 * limit`; at every admission
        /// the weighted estimate is within the limit; the key clock never
        /// runs backwards.
        #[test]
        fn stays_within_stated_bound(
            limit in 1u64..20,
            window in 2u64..1_000,
            mut events in prop::collection::vec((0u64..8_000, 1u64..4), 1..300),
            sorted in any::<bool>(),
        ) {
            if sorted { events.sort(); }
            let sw = SlidingWindow::new(limit, window).unwrap();
            let mut state = State::default();
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for &(t, c) in &events {
                let o = sw.decide(&state, t, c);
                prop_assert!(o.state[0] >= state[0], "key clock ran backwards");
                if o.verdict.allowed {
                    let clock = t.max(state[0]);
                    prop_assert!(o.state[1] <= limit);
                    prop_assert!(sw.weighted(o.state[2], o.state[1], clock - o.state[0])
                        <= u128::from(limit) * u128::from(window));
                    admitted.push((clock, c));
                }
                state = o.state;
            }
            for i in 0..admitted.len() {
                let total: u64 = admitted.iter()
                    .filter(|(t, _)| *t >= admitted[i].0 && *t < admitted[i].0 + window)
                    .map(|(_, c)| c)
                    .sum();
                prop_assert!(total < 2 * limit, "interval from {} admitted {}", admitted[i].0, total);
            }
        }

        /// A retry at exactly `retry_after_ms` later passes (costs within the limit).
        #[test]
        fn retry_after_is_sufficient(
            limit in 1u64..10,
            window in 10u64..1_000,
            events in prop::collection::vec((0u64..50, 1u64..3), 1..40),
            cost in 1u64..3,
        ) {
            prop_assume!(cost <= limit);
            let sw = SlidingWindow::new(limit, window).unwrap();
            let mut state = State::default();
            let mut t = 0;
            for &(dt, c) in &events {
                t += dt;
                state = sw.decide(&state, t, c).state;
            }
            let o = sw.decide(&state, t, cost);
            if !o.verdict.allowed {
                let later = sw.decide(&state, t + o.verdict.retry_after_ms, cost);
                prop_assert!(later.verdict.allowed);
            }
        }
    }
}
