//! The circuit breaker of the Redis state mode: after a few failures in a
//! row, checks stop trying Redis (each would wait its whole budget) and
//! answer by their failure modes at once, while one thread probes Redis and
//! closes the breaker when it answers again. No restart is needed.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Link;
use crate::metrics::Metrics;

/// Failures in a row that open the breaker: connections that could not be
/// made or broke (a round trip past its read timeout), counted per
/// connection, not per check, so one slow answer for a large batch does not
/// open it.
const OPEN_AFTER: u32 = 3;

pub struct Breaker {
    open: AtomicBool,
    failures: AtomicU32,
    opened_at: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl Breaker {
    pub(super) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            open: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            opened_at: Mutex::new(None),
            metrics,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// One failure; the one that opens the breaker is logged, no other.
    pub fn failure(&self, why: &str) {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= OPEN_AFTER && !self.open.swap(true, Ordering::AcqRel) {
            *self.opened_at.lock() = Some(Instant::now());
            self.metrics.redis.breaker_open.set(1);
            tracing::warn!(
                event = "redis_state_unavailable",
                reason = why,
                "Redis does not answer: checks answer by their limits' failure_mode until it does"
            );
        }
    }

    /// Open at once (Redis did not answer at start), logged as a failure.
    pub fn open_now(&self, why: &str) {
        self.failures.store(OPEN_AFTER, Ordering::Relaxed);
        self.failure(why);
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    fn close(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::AcqRel) {
            self.metrics.redis.breaker_open.set(0);
            let down = self.opened_at.lock().take().map(|t| t.elapsed());
            tracing::info!(
                event = "redis_state_available",
                down_ms = down.map_or(0, |d| d.as_millis() as u64),
                "Redis answers again: checks are exact again"
            );
        }
    }
}

/// Every `every`, while the breaker is open, try a fresh connection (which
/// also loads the script); close the breaker when one works. Ends when the
/// backend is dropped.
pub(super) fn probe_loop(link: &Weak<Link>, every: Duration) {
    loop {
        std::thread::sleep(every);
        let Some(s) = link.upgrade() else { return };
        if s.breaker.is_open() && s.connect().is_ok() {
            s.breaker.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(Arc::new(Metrics::new().expect("metrics")))
    }

    #[test]
    fn opens_after_failures_in_a_row_and_a_success_resets_the_count() {
        let b = breaker();
        b.failure("x");
        b.failure("x");
        b.success();
        b.failure("x");
        b.failure("x");
        assert!(!b.is_open(), "a success between failures");
        b.failure("x");
        assert!(b.is_open());
        assert_eq!(b.metrics.redis.breaker_open.get(), 1);
        // Only the probe closes it: answers from Redis in flight do not.
        b.success();
        assert!(b.is_open());
        b.close();
        assert!(!b.is_open());
        assert_eq!(b.metrics.redis.breaker_open.get(), 0);
    }
}
