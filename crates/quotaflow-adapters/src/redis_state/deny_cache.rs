//! Refusals known in advance. When Redis refuses an enforced limit's key
//! for a cost until `retry_after_ms`, no request of that cost or more can
//! pass on that key before then: other requests only consume, never free.
//! So until then the instance answers such requests itself, exactly,
//! without a round trip — which is most of the traffic of a client
//! hammering past its limit. The instant is taken from when the check was
//! sent, before Redis read its clock, so the cache never refuses longer
//! than Redis would — as long as Redis keeps the key. Redis can forget it
//! (a restart without data, a failover, an operator deleting the key to
//! unblock a client), so entries belong to one rule set version and one
//! unbroken run of connections (a config change or a lost connection
//! forgets them), and none is held longer than `MAX_HOLD`.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use quotaflow_core::algorithms::Verdict;
use quotaflow_core::state::KeyId;

const SHARDS: usize = 16;
/// Entries per shard at most: refused keys are few compared to keys, but a
/// flood of distinct refused keys must not grow memory without bound.
const SHARD_CAP: usize = 8_192;
/// Longest a refusal is answered locally: past it one check goes to Redis
/// again, which sees a key deleted there (about one round trip per hot
/// refused key every few seconds per instance).
const MAX_HOLD: Duration = Duration::from_secs(5);

/// What an entry belongs to: a rule set version and a generation of the
/// connections to Redis.
pub type Epoch = (u64, u64);

struct Denied {
    epoch: Epoch,
    cost: u64,
    until: Instant,
    verdict: Verdict,
}

pub struct DenyCache {
    shards: Box<[Mutex<hashbrown::HashMap<KeyId, Denied>>]>,
}

impl Default for DenyCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DenyCache {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: KeyId) -> &Mutex<hashbrown::HashMap<KeyId, Denied>> {
        &self.shards[(key.0 as usize) % SHARDS]
    }

    /// The refusal of `key` for `cost` at `now`, with its times counted
    /// from `now`, if one is known.
    pub fn get(&self, epoch: Epoch, key: KeyId, cost: u64, now: Instant) -> Option<Verdict> {
        let shard = self.shard(key).lock();
        let d = shard.get(&key)?;
        if d.epoch != epoch || cost < d.cost || d.until <= now {
            return None;
        }
        let left = d.until.duration_since(now);
        let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
        let passed = d.verdict.retry_after_ms.saturating_sub(left_ms);
        Some(Verdict {
            allowed: false,
            remaining: 0,
            retry_after_ms: left_ms,
            reset_ms: d.verdict.reset_ms.saturating_sub(passed).max(left_ms),
            clock_ms: d.verdict.clock_ms.saturating_add(passed),
            ..d.verdict
        })
    }

    pub fn put(&self, epoch: Epoch, key: KeyId, cost: u64, until: Instant, verdict: Verdict) {
        let until = Instant::now()
            .checked_add(MAX_HOLD)
            .map_or(until, |latest| until.min(latest));
        let mut shard = self.shard(key).lock();
        if shard.len() >= SHARD_CAP && !shard.contains_key(&key) {
            let now = Instant::now();
            shard.retain(|_, d| d.until > now);
            // Still full of live refusals (a flood of distinct refused
            // keys): start over rather than scan again on every insert. A
            // forgotten refusal costs a round trip, never a wrong answer.
            if shard.len() >= SHARD_CAP {
                shard.clear();
            }
        }
        shard.insert(
            key,
            Denied {
                epoch,
                cost,
                until,
                verdict,
            },
        );
    }

    /// Entries held now (for tests).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(retry: u64) -> Verdict {
        Verdict {
            allowed: false,
            limit: 5,
            remaining: 0,
            reset_ms: retry,
            retry_after_ms: retry,
            clock_ms: 1_000,
        }
    }

    #[test]
    fn holds_for_the_same_or_larger_cost_until_its_instant_and_version() {
        let c = DenyCache::new();
        let k = KeyId(7);
        let t0 = Instant::now();
        let e = (3, 0);
        c.put(e, k, 2, t0 + Duration::from_millis(100), refused(100));
        let v = c.get(e, k, 2, t0 + Duration::from_millis(40)).unwrap();
        assert_eq!(
            (v.allowed, v.retry_after_ms, v.clock_ms),
            (false, 60, 1_040)
        );
        assert!(c.get(e, k, 5, t0).is_some());
        assert!(c.get(e, k, 1, t0).is_none(), "a smaller cost may fit");
        assert!(c.get((4, 0), k, 2, t0).is_none(), "another rule set");
        assert!(c.get((3, 1), k, 2, t0).is_none(), "a lost connection since");
        assert!(c.get(e, k, 2, t0 + Duration::from_millis(100)).is_none());
        assert!(c.get(e, KeyId(8), 2, t0).is_none());
    }

    #[test]
    fn holds_a_refusal_a_few_seconds_at_most() {
        let c = DenyCache::new();
        let t0 = Instant::now();
        c.put(
            (1, 0),
            KeyId(1),
            1,
            t0 + Duration::from_secs(86_400),
            refused(86_400_000),
        );
        assert!(c.get((1, 0), KeyId(1), 1, t0).is_some());
        assert!(c
            .get(
                (1, 0),
                KeyId(1),
                1,
                t0 + MAX_HOLD + Duration::from_millis(10)
            )
            .is_none());
    }

    #[test]
    fn is_bounded() {
        let c = DenyCache::new();
        let until = Instant::now() + Duration::from_secs(60);
        for i in 0..(SHARDS * SHARD_CAP * 2) as u128 {
            c.put((1, 0), KeyId(i), 1, until, refused(60_000));
        }
        assert!(c.len() <= SHARDS * SHARD_CAP);
    }
}
