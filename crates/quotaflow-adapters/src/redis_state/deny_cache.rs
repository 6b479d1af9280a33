//! Refusals known in advance. When Redis refuses an enforced limit's key
//! for a cost until `retry_after_ms`, no request of that cost or more can
//! pass on that key before then: other requests only consume, never free.
//! So until then the instance answers such requests itself, exactly,
//! without a round trip — which is most of the traffic of a client
//! hammering past its limit. The instant is taken from when the check was
//! sent, before Redis read its clock, so the cache never refuses longer
//! than Redis would. Entries belong to one rule set version: a config
//! change (a raised limit) forgets them.

use std::time::Instant;

use parking_lot::Mutex;

use quotaflow_core::algorithms::Verdict;
use quotaflow_core::state::KeyId;

const SHARDS: usize = 16;
/// Entries per shard at most: refused keys are few compared to keys, but a
/// flood of distinct refused keys must not grow memory without bound.
const SHARD_CAP: usize = 8_192;

struct Denied {
    version: u64,
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
    pub fn get(&self, version: u64, key: KeyId, cost: u64, now: Instant) -> Option<Verdict> {
        let shard = self.shard(key).lock();
        let d = shard.get(&key)?;
        if d.version != version || cost < d.cost || d.until <= now {
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

    pub fn put(&self, version: u64, key: KeyId, cost: u64, until: Instant, verdict: Verdict) {
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
                version,
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
    use std::time::Duration;

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
        c.put(3, k, 2, t0 + Duration::from_millis(100), refused(100));
        let v = c.get(3, k, 2, t0 + Duration::from_millis(40)).unwrap();
        assert_eq!(
            (v.allowed, v.retry_after_ms, v.clock_ms),
            (false, 60, 1_040)
        );
        assert!(c.get(3, k, 5, t0).is_some());
        assert!(c.get(3, k, 1, t0).is_none(), "a smaller cost may fit");
        assert!(c.get(4, k, 2, t0).is_none(), "another rule set");
        assert!(c.get(3, k, 2, t0 + Duration::from_millis(100)).is_none());
        assert!(c.get(3, KeyId(8), 2, t0).is_none());
    }

    #[test]
    fn is_bounded() {
        let c = DenyCache::new();
        let until = Instant::now() + Duration::from_secs(60);
        for i in 0..(SHARDS * SHARD_CAP * 2) as u128 {
            c.put(1, KeyId(i), 1, until, refused(60_000));
        }
        assert!(c.len() <= SHARDS * SHARD_CAP);
    }
}
