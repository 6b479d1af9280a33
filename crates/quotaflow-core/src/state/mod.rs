//! Per-key limiter state: a sharded in-memory map from key to algorithm state.
//!
//! Why not a ready concurrent map: a request that matches several limits must
//! be decided atomically across all their keys ("a refused request consumes
//! from none"), which needs several shard locks taken in a fixed order. A
//! plain array of `Mutex<HashTable>` shards gives exactly that, with a
//! 48-byte slot per entry.
//!
//! Keys are stored as [`KeyId`]s, 128-bit keyed hashes of their text, not as
//! the text: a lookup then touches the slot only, not also the key's bytes
//! elsewhere on the heap (that second cache miss was the largest single cost
//! of the stream processor), a key costs no allocation, and state holds no
//! user's identifiers at all.
//!
//! Keys expire once their state is equivalent to a fresh key's (the
//! algorithm says when), so a sweep never changes a verdict and memory stays
//! bounded by the keys active within their longest window.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use crate::algorithms::{Algorithm, Outcome, State, Verdict};

/// The identity of one state key: a 128-bit keyed hash of the key's text
/// (limit, algorithm and dimension values).
///
/// Two distinct keys share an id with probability about n²/2¹²⁹ (2⁻⁸⁹ for a
/// million keys), and because the hash is keyed with a secret, nobody can
/// choose values that collide. The same secret must be used wherever ids are
/// compared: on every instance that restores another's checkpoints.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub u128);

impl KeyId {
    /// Already uniform: the table and the shard take their bits from it
    /// without hashing again.
    fn table_hash(self) -> u64 {
        self.0 as u64
    }
}

/// 32 hex digits: how logs name a key without revealing it.
impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// As 16 bytes: a varint `u128` would take 19 for a uniform value.
impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.to_le_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <[u8; 16]>::deserialize(d).map(|b| Self(u128::from_le_bytes(b)))
    }
}

/// One key of one limit, to be decided together with the other probes of the
/// same request.
#[derive(Clone, Copy)]
pub struct Probe<'a> {
    pub key: KeyId,
    pub algorithm: &'a dyn Algorithm,
    /// `false` for shadow limits: decided and counted, but never blocking.
    pub enforce: bool,
}

/// What happened to one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    pub outcome: Outcome,
    /// Consecutive refusals of this key before this request, so callers can
    /// tell the start of a breach (0 then refused) from its end (n then allowed).
    pub refused_before: u32,
}

impl Probed {
    /// The outcome of a probe decided elsewhere (a shared backend, or a
    /// limit's failure mode): a verdict with no state for this store to keep.
    pub fn remote(verdict: Verdict, refused_before: u32) -> Self {
        Self {
            outcome: Outcome {
                verdict,
                state: [0; 3],
                expires_at_ms: 0,
            },
            refused_before,
        }
    }
}

/// One key's stored state, as checkpoints carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub key: KeyId,
    pub state: State,
    pub expires_at_ms: u64,
    pub refused: u32,
}

/// 48 bytes: the key's id, the algorithm state, and two 32-bit fields.
struct Slot {
    key: KeyId,
    state: State,
    /// Whole seconds since the epoch, rounded up: a key lives at most a
    /// second longer than needed, for 8 bytes less per key.
    expires_at_s: u32,
    refused: u32,
}

// The memory target (≤ 150 bytes a key) rests on this.
const _: () = assert!(std::mem::size_of::<Slot>() == 48);

/// `ms` as whole seconds, rounded up (saturating at 2106).
fn ceil_secs(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

#[repr(align(64))]
struct Shard(Mutex<HashTable<Slot>>);

/// Sharded map of per-key state. Cheap to share behind an `Arc`.
pub struct KeyedStore {
    shards: Box<[Shard]>,
    mask: usize,
    /// Keys one shard may hold (the store's cap, spread over its shards).
    shard_cap: usize,
    when_full: WhenFull,
    /// New keys that found their shard full, since last taken.
    over_cap: AtomicU64,
}

/// What a store does with a key it has no room for. Distinct keys are the
/// one thing a client can grow without bound (a new user id, IP or path per
/// request), so the store holds at most `max_keys`; past that a new key
/// is decided as a fresh key but not stored (`Allow`: new keys are not
/// limited until room frees up; keys already held are limited as before),
/// or refused (`Refuse`: nobody new gets in until room frees up). Room
/// frees as the sweeper drops keys back at their fresh state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    Allow,
    Refuse,
}

/// How many keys a store holds at most, and what it does past that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCap {
    pub max_keys: usize,
    pub when_full: WhenFull,
}

impl KeyCap {
    pub const UNLIMITED: KeyCap = KeyCap {
        max_keys: usize::MAX,
        when_full: WhenFull::Allow,
    };
}

/// How long a client refused for want of room is told to wait: about one
/// sweep, after which room may have freed.
const FULL_RETRY_MS: u64 = 1_000;

/// `outcome`, refused because the store has no room for a new key.
fn refused_for_room(mut outcome: Outcome) -> Outcome {
    outcome.verdict.allowed = false;
    outcome.verdict.remaining = 0;
    outcome.verdict.retry_after_ms = FULL_RETRY_MS;
    outcome.verdict.reset_ms = outcome.verdict.reset_ms.max(FULL_RETRY_MS);
    outcome
}

const FRESH: State = [0; 3];

impl KeyedStore {
    /// A store with `shards` shards (rounded up to a power of two, at least 1).
    pub fn new(shards: usize) -> Self {
        Self::with_cap(shards, KeyCap::UNLIMITED)
    }

    /// A store holding at most about `cap.max_keys` keys (rounded up to a
    /// whole number per shard).
    pub fn with_cap(shards: usize, cap: KeyCap) -> Self {
        let n = shards.max(1).next_power_of_two();
        Self {
            shards: (0..n)
                .map(|_| Shard(Mutex::new(HashTable::new())))
                .collect(),
            mask: n - 1,
            shard_cap: cap.max_keys.div_ceil(n).max(1),
            when_full: cap.when_full,
            over_cap: AtomicU64::new(0),
        }
    }

    /// New keys that found no room since the last call (for metrics).
    pub fn take_over_cap(&self) -> u64 {
        self.over_cap.swap(0, Ordering::Relaxed)
    }

    /// Whether a new key may go into `table`; counts the ones that may not.
    fn room(&self, table: &HashTable<Slot>) -> bool {
        let room = table.len() < self.shard_cap;
        if !room {
            self.over_cap.fetch_add(1, Ordering::Relaxed);
        }
        room
    }

    fn shard_of(&self, hash: u64) -> usize {
        // hashbrown uses the low bits for buckets and the top 7 for tags;
        // the middle bits pick the shard without correlating with either.
        (hash >> 32) as usize & self.mask
    }

    /// Decide and commit one request against every probe, atomically: either
    /// every enforcing probe allows and all allowing probes consume `cost`,
    /// or nothing is consumed. Returns whether the request is admitted.
    pub fn apply(
        &self,
        probes: &[Probe<'_>],
        now_ms: u64,
        cost: u64,
        out: &mut SmallVec<[Probed; 4]>,
    ) -> bool {
        out.clear();
        match probes {
            [] => true,
            [one] => {
                let probed = self.apply_one(one, now_ms, cost);
                let ok = probed.outcome.verdict.allowed || !one.enforce;
                out.push(probed);
                ok
            }
            many => self.apply_many(many, now_ms, cost, out),
        }
    }

    /// The single-key fast path: one lock, one lookup.
    pub fn apply_one(&self, probe: &Probe<'_>, now_ms: u64, cost: u64) -> Probed {
        let hash = probe.key.table_hash();
        let mut table = self.shards[self.shard_of(hash)].0.lock();
        match table.find_mut(hash, |s| s.key == probe.key) {
            Some(slot) => {
                let outcome = probe.algorithm.decide(&slot.state, now_ms, cost);
                let refused_before = slot.refused;
                commit(slot, &outcome, outcome.verdict.allowed);
                Probed {
                    outcome,
                    refused_before,
                }
            }
            None => {
                let mut outcome = probe.algorithm.decide(&FRESH, now_ms, cost);
                if !self.room(&table) {
                    if self.when_full == WhenFull::Refuse {
                        outcome = refused_for_room(outcome);
                    }
                } else if outcome.verdict.allowed {
                    insert(&mut table, probe.key, &outcome);
                }
                Probed {
                    outcome,
                    refused_before: 0,
                }
            }
        }
    }

    /// Count `cost` on `probe`'s key whatever the verdict
    /// ([`crate::algorithms::Algorithm::charge`]): a synchronous hit,
    /// admitted when it was answered, replayed from the partition log. A
    /// new key that does not fit in a full store is not counted.
    pub fn charge(&self, probe: &Probe<'_>, now_ms: u64, cost: u64) {
        let hash = probe.key.table_hash();
        let mut table = self.shards[self.shard_of(hash)].0.lock();
        match table.find_mut(hash, |s| s.key == probe.key) {
            Some(slot) => {
                let outcome = probe.algorithm.charge(&slot.state, now_ms, cost);
                commit(slot, &outcome, true);
            }
            None => {
                if self.room(&table) {
                    let outcome = probe.algorithm.charge(&FRESH, now_ms, cost);
                    insert(&mut table, probe.key, &outcome);
                }
            }
        }
    }

    fn apply_many(
        &self,
        probes: &[Probe<'_>],
        now_ms: u64,
        cost: u64,
        out: &mut SmallVec<[Probed; 4]>,
    ) -> bool {
        let hashes: SmallVec<[(u64, usize); 4]> = probes
            .iter()
            .map(|p| {
                let h = p.key.table_hash();
                (h, self.shard_of(h))
            })
            .collect();
        let mut order: SmallVec<[usize; 4]> = hashes.iter().map(|&(_, s)| s).collect();
        order.sort_unstable();
        order.dedup();
        // Locks in ascending shard order: two requests never wait on each other
        // in a cycle.
        let mut guards: SmallVec<[(usize, MutexGuard<'_, HashTable<Slot>>); 4]> = order
            .iter()
            .map(|&s| (s, self.shards[s].0.lock()))
            .collect();
        let table_of = |shard: usize| -> usize {
            guards
                .iter()
                .position(|(s, _)| *s == shard)
                .unwrap_or_default()
        };
        let slots: SmallVec<[usize; 4]> = hashes.iter().map(|&(_, s)| table_of(s)).collect();

        // Each key is looked up once: its bucket is remembered for the
        // commit. Found slots are committed before any insert, because an
        // insert may grow a table and move the buckets of other probes. All
        // lookups come before any decision: they are independent, so their
        // cache misses overlap instead of queueing behind each algorithm call.
        let buckets: SmallVec<[Option<usize>; 4]> = probes
            .iter()
            .zip(hashes.iter().zip(&slots))
            .map(|(probe, (&(hash, _), &g))| {
                guards[g].1.find_bucket_index(hash, |s| s.key == probe.key)
            })
            .collect();
        let mut admitted = true;
        for ((probe, &g), &bucket) in probes.iter().zip(&slots).zip(&buckets) {
            let table = &guards[g].1;
            let found = bucket.and_then(|b| table.get_bucket(b));
            let (state, refused_before) = found.map_or((FRESH, 0), |s| (s.state, s.refused));
            let mut outcome = probe.algorithm.decide(&state, now_ms, cost);
            if found.is_none()
                && self.when_full == WhenFull::Refuse
                && table.len() >= self.shard_cap
            {
                outcome = refused_for_room(outcome);
            }
            admitted &= outcome.verdict.allowed || !probe.enforce;
            out.push(Probed {
                outcome,
                refused_before,
            });
        }
        for (i, bucket) in buckets.iter().enumerate() {
            let outcome = out[i].outcome;
            let table = &mut guards[slots[i]].1;
            if let Some(slot) = bucket.and_then(|b| table.get_bucket_mut(b)) {
                commit(slot, &outcome, admitted && outcome.verdict.allowed);
            }
        }
        for (i, probe) in probes.iter().enumerate() {
            let outcome = out[i].outcome;
            if buckets[i].is_none() && admitted && outcome.verdict.allowed {
                let table = &mut guards[slots[i]].1;
                if self.room(table) {
                    insert(table, probe.key, &outcome);
                }
            }
        }
        admitted
    }

    /// Decide every probe as [`KeyedStore::apply`] would, committing
    /// nothing: the first phase of a check whose limits live in several
    /// stores (probe all, then apply all). Returns whether every enforcing
    /// probe would allow it.
    pub fn peek(
        &self,
        probes: &[Probe<'_>],
        now_ms: u64,
        cost: u64,
        out: &mut SmallVec<[Probed; 4]>,
    ) -> bool {
        out.clear();
        let mut admitted = true;
        for probe in probes {
            let hash = probe.key.table_hash();
            let table = self.shards[self.shard_of(hash)].0.lock();
            let found = table.find(hash, |s| s.key == probe.key);
            let (state, refused_before) = found.map_or((FRESH, 0), |s| (s.state, s.refused));
            let mut outcome = probe.algorithm.decide(&state, now_ms, cost);
            if found.is_none()
                && self.when_full == WhenFull::Refuse
                && table.len() >= self.shard_cap
            {
                outcome = refused_for_room(outcome);
            }
            admitted &= outcome.verdict.allowed || !probe.enforce;
            out.push(Probed {
                outcome,
                refused_before,
            });
        }
        admitted
    }

    /// Drop every key whose state is equivalent to a fresh key's at `now_ms`.
    /// Returns how many were dropped.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut table = shard.0.lock();
            let before = table.len();
            table.retain(|s| u64::from(s.expires_at_s) * 1000 > now_ms);
            removed += before - table.len();
            if table.capacity() > 64 && table.len() * 4 < table.capacity() {
                table.shrink_to_fit(|s| s.key.table_hash());
            }
        }
        removed
    }

    /// Number of keys tracked now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every stored key, shard by shard (for checkpoints). Each shard is
    /// copied under its own lock, so concurrent writers wait only briefly.
    pub fn export(&self) -> Vec<StoredKey> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let table = shard.0.lock();
            out.extend(table.iter().map(|s| StoredKey {
                key: s.key,
                state: s.state,
                expires_at_ms: u64::from(s.expires_at_s) * 1000,
                refused: s.refused,
            }));
        }
        out
    }

    /// Replace the whole content with `keys` (a restored checkpoint).
    pub fn import(&self, keys: Vec<StoredKey>) {
        for shard in self.shards.iter() {
            shard.0.lock().clear();
        }
        for k in keys {
            let hash = k.key.table_hash();
            let mut table = self.shards[self.shard_of(hash)].0.lock();
            let slot = Slot {
                key: k.key,
                state: k.state,
                expires_at_s: ceil_secs(k.expires_at_ms),
                refused: k.refused,
            };
            match table.find_mut(hash, |s| s.key == slot.key) {
                Some(existing) => *existing = slot,
                None => {
                    table.insert_unique(hash, slot, |s| s.key.table_hash());
                }
            }
        }
    }

    /// The stored state of `key`, if any (for tests, checkpoints and debugging).
    pub fn get(&self, key: KeyId) -> Option<State> {
        let hash = key.table_hash();
        let table = self.shards[self.shard_of(hash)].0.lock();
        table.find(hash, |s| s.key == key).map(|s| s.state)
    }
}

/// One locked shard of one store: ((store address, shard), its table).
type Locked<'a> = ((usize, usize), MutexGuard<'a, HashTable<Slot>>);

/// [`KeyedStore::apply`] over probes that live in several stores (the
/// partitions one instance owns): every shard involved, in every store, is
/// locked in one global order (store, then shard), all probes are decided,
/// and all are committed or none is. `parts` pairs each probe with its
/// store; outcomes come back in the same order.
pub fn apply_across(
    parts: &[(&KeyedStore, Probe<'_>)],
    now_ms: u64,
    cost: u64,
    out: &mut SmallVec<[Probed; 4]>,
) -> bool {
    out.clear();
    if let Some((first, _)) = parts.first() {
        if parts.iter().all(|(s, _)| std::ptr::eq(*s, *first)) {
            let probes: SmallVec<[Probe<'_>; 4]> = parts.iter().map(|(_, p)| *p).collect();
            return first.apply(&probes, now_ms, cost, out);
        }
    }
    // (store address, shard) of each probe; locks taken in that order.
    let at: SmallVec<[(usize, usize, u64); 4]> = parts
        .iter()
        .map(|(s, p)| {
            let h = p.key.table_hash();
            (std::ptr::from_ref(*s) as usize, s.shard_of(h), h)
        })
        .collect();
    let mut order: SmallVec<[(usize, usize, usize); 4]> = at
        .iter()
        .enumerate()
        .map(|(i, &(store, shard, _))| (store, shard, i))
        .collect();
    order.sort_unstable();
    order.dedup_by_key(|(store, shard, _)| (*store, *shard));
    let mut guards: SmallVec<[Locked<'_>; 4]> = order
        .iter()
        .map(|&(store, shard, i)| ((store, shard), parts[i].0.shards[shard].0.lock()))
        .collect();
    let guard_of = |store: usize, shard: usize| -> usize {
        guards
            .iter()
            .position(|(k, _)| *k == (store, shard))
            .unwrap_or_default()
    };
    let slots: SmallVec<[usize; 4]> = at.iter().map(|&(st, sh, _)| guard_of(st, sh)).collect();
    let buckets: SmallVec<[Option<usize>; 4]> = parts
        .iter()
        .zip(at.iter().zip(&slots))
        .map(|((_, probe), (&(_, _, hash), &g))| {
            guards[g].1.find_bucket_index(hash, |s| s.key == probe.key)
        })
        .collect();
    let mut admitted = true;
    for (((store, probe), &g), &bucket) in parts.iter().zip(&slots).zip(&buckets) {
        let table = &guards[g].1;
        let found = bucket.and_then(|b| table.get_bucket(b));
        let (state, refused_before) = found.map_or((FRESH, 0), |s| (s.state, s.refused));
        let mut outcome = probe.algorithm.decide(&state, now_ms, cost);
        if found.is_none() && store.when_full == WhenFull::Refuse && table.len() >= store.shard_cap
        {
            outcome = refused_for_room(outcome);
        }
        admitted &= outcome.verdict.allowed || !probe.enforce;
        out.push(Probed {
            outcome,
            refused_before,
        });
    }
    for (i, bucket) in buckets.iter().enumerate() {
        let outcome = out[i].outcome;
        let table = &mut guards[slots[i]].1;
        if let Some(slot) = bucket.and_then(|b| table.get_bucket_mut(b)) {
            commit(slot, &outcome, admitted && outcome.verdict.allowed);
        }
    }
    for (i, (store, probe)) in parts.iter().enumerate() {
        let outcome = out[i].outcome;
        if buckets[i].is_none() && admitted && outcome.verdict.allowed {
            let table = &mut guards[slots[i]].1;
            // A probe of the same key earlier in `parts` may have inserted it.
            if table
                .find(probe.key.table_hash(), |s| s.key == probe.key)
                .is_none()
                && store.room(table)
            {
                insert(table, probe.key, &outcome);
            }
        }
    }
    admitted
}

/// Apply an outcome to an existing slot. `consume` is false when the request
/// was refused by this or another limit: then only the key's clock and its
/// refusal streak move.
fn commit(slot: &mut Slot, outcome: &Outcome, consume: bool) {
    if consume {
        slot.state = outcome.state;
        slot.expires_at_s = ceil_secs(outcome.expires_at_ms);
        slot.refused = 0;
    } else if !outcome.verdict.allowed {
        slot.state = outcome.state;
        slot.refused = slot.refused.saturating_add(1);
    }
}

fn insert(table: &mut HashTable<Slot>, key: KeyId, outcome: &Outcome) {
    table.insert_unique(
        key.table_hash(),
        Slot {
            key,
            state: outcome.state,
            expires_at_s: ceil_secs(outcome.expires_at_ms),
            refused: 0,
        },
        |s| s.key.table_hash(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithms::{FixedWindow, TokenBucket};
    use std::sync::Arc;

    fn id(key: &str) -> KeyId {
        crate::fingerprint::Fingerprinter::from_secret("t").key_id(key.as_bytes())
    }

    fn probe<'a>(key: &str, a: &'a dyn Algorithm) -> Probe<'a> {
        Probe {
            key: id(key),
            algorithm: a,
            enforce: true,
        }
    }

    #[test]
    fn refused_request_consumes_from_no_limit() {
        let store = KeyedStore::new(8);
        let roomy = FixedWindow::new(100, 60_000).unwrap();
        let tight = FixedWindow::new(1, 60_000).unwrap();
        let mut out = SmallVec::new();
        let probes = [probe("a", &roomy), probe("b", &tight)];
        assert!(store.apply(&probes, 1_000, 1, &mut out));
        assert!(!store.apply(&probes, 1_001, 1, &mut out));
        assert!(!out[1].outcome.verdict.allowed);
        // "a" was charged once, by the admitted request only.
        assert_eq!(store.get(id("a")).unwrap()[1], 1);
        assert_eq!(out[1].refused_before, 0);
        assert!(!store.apply(&probes, 1_002, 1, &mut out));
        assert_eq!(out[1].refused_before, 1);
    }

    #[test]
    fn peek_decides_as_apply_and_commits_nothing() {
        let store = KeyedStore::new(8);
        let roomy = FixedWindow::new(100, 60_000).unwrap();
        let tight = FixedWindow::new(1, 60_000).unwrap();
        let probes = [probe("a", &roomy), probe("b", &tight)];
        let (mut peeked, mut applied) = (SmallVec::new(), SmallVec::new());
        for t in 0..3 {
            let would = store.peek(&probes, 1_000 + t, 1, &mut peeked);
            let did = store.apply(&probes, 1_000 + t, 1, &mut applied);
            assert_eq!(would, did);
            assert_eq!(peeked, applied);
        }
        let before = store.export();
        store.peek(&probes, 2_000, 1, &mut peeked);
        assert_eq!(store.export(), before);
    }

    #[test]
    fn apply_across_stores_is_atomic_and_agrees_with_one_store() {
        let (a, b) = (KeyedStore::new(4), KeyedStore::new(4));
        let one = KeyedStore::new(4);
        let roomy = FixedWindow::new(3, 60_000).unwrap();
        let tight = FixedWindow::new(2, 60_000).unwrap();
        let (pa, pb) = (probe("a", &roomy), probe("b", &tight));
        let (mut across, mut single) = (SmallVec::new(), SmallVec::new());
        for t in 0..5 {
            let ok = apply_across(&[(&a, pa), (&b, pb)], 1_000 + t, 1, &mut across);
            let want = one.apply(&[pa, pb], 1_000 + t, 1, &mut single);
            assert_eq!(ok, want, "step {t}");
            assert_eq!(across, single, "step {t}");
        }
        // Refused by "b" after two: "a" was charged only twice.
        assert_eq!(a.get(id("a")).unwrap(), one.get(id("a")).unwrap());
        assert_eq!(b.get(id("b")).unwrap(), one.get(id("b")).unwrap());
        assert!(one.get(id("a")).is_some());
    }

    #[test]
    fn shadow_probe_never_blocks() {
        let store = KeyedStore::new(1);
        let tight = FixedWindow::new(1, 60_000).unwrap();
        let shadow = Probe {
            key: id("s"),
            algorithm: &tight,
            enforce: false,
        };
        let mut out = SmallVec::new();
        assert!(store.apply(&[shadow], 0, 1, &mut out));
        assert!(store.apply(&[shadow], 0, 1, &mut out));
        assert!(!out[0].outcome.verdict.allowed);
    }

    #[test]
    fn a_full_store_stores_no_new_key_and_says_so() {
        let tb = TokenBucket::new(2, 1.0).unwrap();
        for when_full in [WhenFull::Allow, WhenFull::Refuse] {
            let store = KeyedStore::with_cap(
                1,
                KeyCap {
                    max_keys: 4,
                    when_full,
                },
            );
            for i in 0..4 {
                assert!(
                    store
                        .apply_one(&probe(&format!("k{i}"), &tb), 1_000, 1)
                        .outcome
                        .verdict
                        .allowed
                );
            }
            let newcomer = store.apply_one(&probe("k4", &tb), 1_000, 1).outcome.verdict;
            assert_eq!(newcomer.allowed, when_full == WhenFull::Allow);
            if when_full == WhenFull::Refuse {
                assert_eq!(newcomer.retry_after_ms, 1_000);
                assert_eq!(newcomer.remaining, 0);
            }
            assert_eq!(store.len(), 4, "{when_full:?}: no fifth key stored");
            assert_eq!(store.take_over_cap(), 1);
            assert_eq!(store.take_over_cap(), 0);
            // Keys held are limited as before.
            store.apply_one(&probe("k0", &tb), 1_000, 1);
            assert!(
                !store
                    .apply_one(&probe("k0", &tb), 1_000, 1)
                    .outcome
                    .verdict
                    .allowed
            );
            // Room frees as keys return to their fresh state.
            store.sweep(60_000);
            assert!(
                store
                    .apply_one(&probe("k4", &tb), 60_000, 1)
                    .outcome
                    .verdict
                    .allowed
            );
            assert_eq!(store.len(), 1);
        }
    }

    #[test]
    fn sweep_drops_only_keys_equivalent_to_fresh() {
        let store = KeyedStore::new(4);
        let tb = TokenBucket::new(10, 10.0).unwrap();
        for i in 0..100 {
            store.apply_one(&probe(&format!("k{i}"), &tb), 1_000, 5);
        }
        assert_eq!(store.len(), 100);
        // 5 tokens at 10/s refill in 500 ms: full at 1.5 s, dropped from 2 s
        // (expiry is kept in whole seconds, rounded up).
        assert_eq!(store.sweep(1_999), 0);
        assert_eq!(store.sweep(2_000), 100);
        assert!(store.is_empty());
    }

    #[test]
    fn export_import_round_trips() {
        let a = KeyedStore::new(4);
        let tb = TokenBucket::new(10, 1.0).unwrap();
        for i in 0..1000 {
            a.apply_one(&probe(&format!("k{i}"), &tb), 5, 1 + i % 3);
        }
        let b = KeyedStore::new(16);
        b.import(a.export());
        assert_eq!(b.len(), 1000);
        let mut x = a.export();
        let mut y = b.export();
        x.sort_by_key(|k| k.key.0);
        y.sort_by_key(|k| k.key.0);
        assert_eq!(x, y);
    }

    #[test]
    fn contended_keys_admit_exactly_the_limit() {
        let store = Arc::new(KeyedStore::new(4));
        let fw = Arc::new(FixedWindow::new(1_000, 60_000).unwrap());
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (store, fw) = (store.clone(), fw.clone());
                    s.spawn(move || {
                        let mut out = SmallVec::new();
                        let probes = [probe("x", &*fw), probe("y", &*fw)];
                        (0..600)
                            .filter(|_| store.apply(&probes, 10, 1, &mut out))
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(admitted, 1_000);
        assert_eq!(store.get(id("x")).unwrap()[1], 1_000);
        assert_eq!(store.get(id("y")).unwrap()[1], 1_000);
    }
}
