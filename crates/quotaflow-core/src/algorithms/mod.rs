//! Rate-limiting algorithms as pure functions.
//!
//! Every algorithm maps `(policy, state, now_ms, cost)` to `(verdict, state')`
//! and never reads a clock: the stream processor feeds it event time and the
//! sidecar feeds it wall time, and replaying the same inputs after a crash must
//! give the same state. Adding an algorithm means adding one file with one
//! [`Algorithm`] implementation and one line in [`build`].

mod fixed_window;
mod sliding_window;
mod token_bucket;

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

pub use fixed_window::FixedWindow;
pub use sliding_window::SlidingWindow;
pub use token_bucket::TokenBucket;

/// Per-key algorithm state: three words whose meaning each algorithm documents.
///
/// A fixed-size, plain-data state keeps the store compact (no per-key boxing)
/// and makes checkpoints a straight copy. All zeros is the state of a key that
/// has never been seen, so an expired key and a fresh key are the same thing.
pub type State = [u64; 3];

/// What one algorithm says about one request, with what response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request fits in the quota.
    pub allowed: bool,
    /// The quota in requests (or cost units): bucket capacity or window limit.
    pub limit: u64,
    /// Quota left after this request (if allowed) or now (if refused).
    pub remaining: u64,
    /// Milliseconds until the quota is fully available again.
    pub reset_ms: u64,
    /// Milliseconds until a request of the same cost could pass; 0 when allowed.
    pub retry_after_ms: u64,
    /// The instant the verdict holds at: the request's time, or the key's own
    /// later clock for a late request. `clock_ms + retry_after_ms` is when the
    /// key may pass again.
    pub clock_ms: u64,
}

/// The result of [`Algorithm::decide`]: the verdict and the state to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The key's next state. For a refused request only the key's clock moves.
    pub state: State,
    /// From this instant on, `state` is equivalent to a fresh key, so the
    /// store may drop it without changing any future verdict.
    pub expires_at_ms: u64,
}

/// The static shape of a policy, for the `RateLimit-Policy` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyShape {
    /// Quota units per window (`q`).
    pub quota: u64,
    /// Window length in seconds (`w`), rounded up.
    pub window_secs: u64,
}

/// An algorithm's bound parameters as plain data, for a backend that runs
/// the same algorithm elsewhere (the Redis scripts) and must agree with
/// [`Algorithm::decide`] to the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// See [`TokenBucket`]: `burst_ns = capacity * interval_ns`.
    TokenBucket {
        capacity: u64,
        interval_ns: u64,
        burst_ns: u64,
    },
    FixedWindow {
        limit: u64,
        window_ms: u64,
    },
    SlidingWindow {
        limit: u64,
        window_ms: u64,
    },
}

/// A rate-limiting algorithm with its parameters bound.
pub trait Algorithm: Send + Sync + fmt::Debug + 'static {
    /// The name used in config (`algorithm = "..."`).
    fn name(&self) -> &'static str;

    /// Decide one request of `cost` units at `now_ms` for a key in `state`.
    ///
    /// Must be pure and total: any state and any time (including a time
    /// earlier than the key has seen, which is applied at the key's own time)
    /// gives an outcome.
    fn decide(&self, state: &State, now_ms: u64, cost: u64) -> Outcome;

    /// As [`Algorithm::decide`], but the units are counted whatever the
    /// verdict: a synchronous hit admitted earlier and replayed from the
    /// partition log after a crash, where the state it is replayed on may
    /// hold events the live decision had not seen yet (docs/group.md).
    fn charge(&self, state: &State, now_ms: u64, cost: u64) -> Outcome;

    /// The policy as advertised to clients.
    fn shape(&self) -> PolicyShape;

    /// The parameters, for backends that run the algorithm themselves.
    fn spec(&self) -> Spec;
}

/// A configuration problem in an algorithm's parameters, named by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// The parameter's name, relative to the limit (for example `capacity`).
    pub field: String,
    pub message: String,
}

impl ParamError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The algorithm names `build` accepts, for error messages and docs.
pub const NAMES: &[&str] = &["token_bucket", "fixed_window", "sliding_window"];

/// Build an algorithm from its config name and the limit's remaining fields.
///
/// Unknown parameters are errors: a typo such as `capcity` must not silently
/// fall back to a default and enforce something the operator did not write.
pub fn build(
    name: &str,
    params: &Map<String, Value>,
) -> Result<Box<dyn Algorithm>, Vec<ParamError>> {
    match name {
        "token_bucket" => TokenBucket::from_params(params).map(|a| Box::new(a) as _),
        "fixed_window" => FixedWindow::from_params(params).map(|a| Box::new(a) as _),
        "sliding_window" => SlidingWindow::from_params(params).map(|a| Box::new(a) as _),
        other => Err(vec![ParamError::new(
            "algorithm",
            format!(
                "unknown algorithm `{other}`; expected one of: {}",
                NAMES.join(", ")
            ),
        )]),
    }
}

/// Shared parameter parsing, so every algorithm reports errors the same way.
pub(crate) struct Params<'a> {
    map: &'a Map<String, Value>,
    errors: Vec<ParamError>,
}

impl<'a> Params<'a> {
    pub(crate) fn new(map: &'a Map<String, Value>, known: &[&str]) -> Self {
        let mut errors = Vec::new();
        for field in map.keys() {
            if !known.contains(&field.as_str()) {
                errors.push(ParamError::new(
                    field.clone(),
                    format!("unknown parameter; expected one of: {}", known.join(", ")),
                ));
            }
        }
        Self { map, errors }
    }

    /// A required integer in `[min, max]`.
    pub(crate) fn integer(&mut self, field: &str, min: u64, max: u64) -> u64 {
        match self.map.get(field) {
            None => self.fail(field, "is required"),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => n,
                _ => self.fail(
                    field,
                    format!("must be an integer between {min} and {max}, got {v}"),
                ),
            },
        }
    }

    /// A required positive number in `(0, max]`.
    pub(crate) fn positive(&mut self, field: &str, max: f64) -> f64 {
        match self.map.get(field) {
            None => self.fail(field, "is required"),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x <= max => x,
                _ => self.fail(
                    field,
                    format!("must be a number greater than 0 and at most {max}, got {v}"),
                ),
            },
        }
    }

    /// A required duration such as `"60s"`, `"1m"` or `"250ms"`, in ms.
    pub(crate) fn duration_ms(&mut self, field: &str, max: Duration) -> u64 {
        let Some(v) = self.map.get(field) else {
            return self.fail(field, "is required (a duration such as \"60s\" or \"1m\")");
        };
        let Some(text) = v.as_str() else {
            return self.fail(
                field,
                format!("must be a duration string such as \"60s\" or \"1m\", got {v}"),
            );
        };
        match humantime::parse_duration(text) {
            // Whole milliseconds only: "1500us" silently cut to 1 ms would
            // be a different limit from the one written.
            Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => self.fail(
                field,
                format!("must be a whole number of milliseconds, got \"{text}\""),
            ),
            Ok(d) if d >= Duration::from_millis(1) && d <= max => d.as_millis() as u64,
            Ok(_) => self.fail(
                field,
                format!(
                    "must be between 1ms and {}, got \"{text}\"",
                    humantime::format_duration(max)
                ),
            ),
            Err(e) => self.fail(field, format!("invalid duration \"{text}\": {e}")),
        }
    }

    fn fail<T: Default>(&mut self, field: &str, message: impl Into<String>) -> T {
        self.errors.push(ParamError::new(field, message));
        T::default()
    }

    pub(crate) fn finish<T>(self, value: T) -> Result<T, Vec<ParamError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// Upper bound on window lengths: long enough for daily and weekly quotas,
/// short enough that millisecond arithmetic never overflows.
pub(crate) const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);
/// Upper bound on limits and capacities, keeping `limit * window` in u128 range
/// and header values readable.
pub(crate) const MAX_QUOTA: u64 = 1_000_000_000_000;

/// `ceil(a / b)` for the millisecond conversions the headers need.
pub(crate) fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn build_reports_every_bad_parameter_by_name() {
        let err = build(
            "token_bucket",
            &map(json!({"capcity": 10, "refill_per_sec": -1})),
        )
        .unwrap_err();
        let fields: Vec<_> = err.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["capcity", "capacity", "refill_per_sec"]);
    }

    proptest::proptest! {
        /// `charge` is `decide` when `decide` admits; when it refuses,
        /// `charge` still counts: n charges leave no room for more than
        /// the quota minus n.
        #[test]
        fn charge_counts_whatever_the_verdict(
            which in 0usize..3, quota in 1u64..20, extra in 0u64..10,
            now in 0u64..10_000_000, cost in 1u64..4,
        ) {
            let a = build(
                ["token_bucket", "fixed_window", "sliding_window"][which],
                &map(match which {
                    0 => json!({"capacity": quota, "refill_per_sec": 0.001}),
                    _ => json!({"limit": quota, "window": "1h"}),
                }),
            ).unwrap();
            let mut decided = [0u64; 3];
            let mut charged = [0u64; 3];
            let n = quota / cost + extra;
            for _ in 0..n {
                let d = a.decide(&decided, now, cost);
                let c = a.charge(&charged, now, cost);
                proptest::prop_assert_eq!(c.verdict.allowed, a.decide(&charged, now, cost).verdict.allowed);
                if d.verdict.allowed && decided == charged {
                    proptest::prop_assert_eq!(c, d);
                }
                if d.verdict.allowed {
                    decided = d.state;
                }
                charged = c.state;
            }
            // At least quota - cost + 1 units charged: one more is refused.
            proptest::prop_assert!(!a.decide(&charged, now, cost).verdict.allowed);
        }
    }

    #[test]
    fn build_rejects_unknown_algorithm() {
        let err = build("leaky", &Map::new()).unwrap_err();
        assert_eq!(err[0].field, "algorithm");
        assert!(err[0].message.contains("token_bucket"));
    }

    #[test]
    fn durations_accept_human_units() {
        let a = build("fixed_window", &map(json!({"limit": 5, "window": "1m"}))).unwrap();
        assert_eq!(
            a.shape(),
            PolicyShape {
                quota: 5,
                window_secs: 60
            }
        );
        let err = build("fixed_window", &map(json!({"limit": 5, "window": 60}))).unwrap_err();
        assert_eq!(err[0].field, "window");
        // Not silently cut to whole milliseconds.
        let err = build(
            "fixed_window",
            &map(json!({"limit": 5, "window": "1500us"})),
        )
        .unwrap_err();
        assert!(
            err[0].message.contains("whole number of milliseconds"),
            "{}",
            err[0].message
        );
        assert!(build(
            "fixed_window",
            &map(json!({"limit": 5, "window": "1s 500ms"}))
        )
        .is_ok());
    }

    mod config_changes_over_live_state {
        //! A limit's parameters can change at any time while keys hold
        //! state made under the old ones (a config push lowers a limit
        //! below a key's count, shortens a window, shrinks a bucket). Every
        //! algorithm must then still answer — no overflow, no wrapped
        //! `remaining` — with a verdict that makes sense.

        use super::super::*;
        use proptest::prelude::*;

        fn algorithm(kind: u8, quota: u64, window_ms: u64) -> Box<dyn Algorithm> {
            match kind % 3 {
                0 => Box::new(TokenBucket::new(quota, 1000.0 / window_ms as f64).expect("bucket")),
                1 => Box::new(FixedWindow::new(quota, window_ms).expect("fixed")),
                _ => Box::new(SlidingWindow::new(quota, window_ms).expect("sliding")),
            }
        }

        /// The verdict's promises, whatever the state it was made from.
        fn check(v: &Verdict, quota: u64, cost: u64) -> Result<(), TestCaseError> {
            prop_assert_eq!(v.limit, quota);
            prop_assert!(
                v.remaining <= quota,
                "remaining {} > limit {}",
                v.remaining,
                quota
            );
            prop_assert!(!v.allowed || v.retry_after_ms == 0);
            prop_assert!(v.allowed || v.retry_after_ms > 0 || cost == 0);
            Ok(())
        }

        proptest! {
            /// State built by one config, then decided by others: limits
            /// raised and lowered below a key's count, windows lengthened
            /// and shortened, between steps of live traffic.
            #[test]
            fn config_changes_between_steps_give_sane_verdicts(
                kind in 0u8..3,
                configs in prop::collection::vec((1u64..50, 1u64..5_000), 1..5),
                steps in prop::collection::vec((any::<prop::sample::Index>(), 0u64..3_000, 0u64..20), 1..120),
            ) {
                let mut state = State::default();
                let mut clock = 1_700_000_000_000u64;
                for (pick, dt, cost) in steps {
                    let (quota, window_ms) = configs[pick.index(configs.len())];
                    let a = algorithm(kind, quota, window_ms);
                    clock += dt;
                    let o = a.decide(&state, clock, cost);
                    check(&o.verdict, quota, cost)?;
                    state = o.state;
                }
            }

            /// Any state words at all (a corrupt or foreign checkpoint) and
            /// any clock: an answer, never an overflow.
            #[test]
            fn any_state_and_clock_gives_a_sane_verdict(
                kind in 0u8..3,
                state in prop::array::uniform3(prop_oneof![any::<u64>(), u64::MAX - 300_000..=u64::MAX]),
                quota in 1u64..1_000,
                window_ms in 1u64..100_000,
                now in prop_oneof![any::<u64>(), u64::MAX - 300_000..=u64::MAX],
                cost in 0u64..1_000,
            ) {
                let o = algorithm(kind, quota, window_ms).decide(&state, now, cost);
                check(&o.verdict, quota, cost)?;
            }
        }
    }
}
