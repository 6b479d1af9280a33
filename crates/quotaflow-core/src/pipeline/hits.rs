//! Synchronous hits in the partition log: a hit an owner counted for
//! `/check` is appended to the repartition topic's partition of its home,
//! so that a replay after the owner's crash counts it again rather than
//! losing it (docs/group.md, "A synchronous hit and crashes").
//!
//! The owner counts the hit in the partition's state at once and keeps its
//! id in a *pending* set until the partition's worker reads the record
//! back; a checkpoint saves the state and the pending set together. So for
//! every hit either the checkpoint's state holds it (and its id is pending
//! or its record is below the checkpoint's offset), or it does not and its
//! record lies after the offset: a replay skips a pending record and counts
//! any other, and each hit is counted exactly once.
//!
//! A record carries each charged key as its id and the limit's name, never
//! the key's values: nothing in it reveals a user, an IP or an API key.

use crate::rules::Rules;
use crate::state::{KeyId, KeyedStore, Probe};

/// First byte of a hit record: 1 and 2 are repartition records and their
/// batches (`super::repartition`).
pub const HIT_FORMAT: u8 = 3;

/// A hit's identity within its partition: the owner's fencing epoch of
/// the partition and the hit's place among those that owner appended.
/// Unique across the partition's owners because its epochs are (another
/// partition's epochs may repeat it).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct HitId {
    pub epoch: u64,
    pub seq: u64,
}

/// Which of the partition's two states a charged key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Limits aligned with the partition key, counted where events arrive.
    Arrival,
    /// Other limits, whose key is homed on this partition.
    Home,
}

/// One key a hit was counted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub side: Side,
    /// The limit's name: its algorithm is looked up in the rules the record
    /// is replayed under.
    pub limit: String,
    pub key: KeyId,
}

/// A synchronous hit as the partition log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncHit {
    pub id: HitId,
    /// The owner's wall clock when it counted the hit: the time it is
    /// replayed at.
    pub time_ms: u64,
    pub cost: u64,
    pub charges: Vec<Charge>,
}

/// A hit record that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sync hit record: {0}")]
pub struct DecodeError(pub &'static str);

impl SyncHit {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(34 + self.charges.len() * 32);
        out.push(HIT_FORMAT);
        out.extend_from_slice(&self.id.epoch.to_be_bytes());
        out.extend_from_slice(&self.id.seq.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        out.extend_from_slice(&self.cost.to_be_bytes());
        let n = u8::try_from(self.charges.len()).unwrap_or(u8::MAX);
        out.push(n);
        for c in self.charges.iter().take(usize::from(n)) {
            out.push(match c.side {
                Side::Arrival => 0,
                Side::Home => 1,
            });
            out.extend_from_slice(&c.key.0.to_be_bytes());
            // Limit names are short; a longer one is cut, and then matches
            // no limit on replay rather than another's.
            let name = &c.limit.as_bytes()[..c.limit.len().min(usize::from(u16::MAX))];
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        if r.take::<1>()?[0] != HIT_FORMAT {
            return Err(DecodeError("not a hit record"));
        }
        let epoch = u64::from_be_bytes(r.take()?);
        let seq = u64::from_be_bytes(r.take()?);
        let time_ms = u64::from_be_bytes(r.take()?);
        let cost = u64::from_be_bytes(r.take()?);
        let n = r.take::<1>()?[0];
        let mut charges = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let side = match r.take::<1>()?[0] {
                0 => Side::Arrival,
                1 => Side::Home,
                _ => return Err(DecodeError("unknown side")),
            };
            let key = KeyId(u128::from_be_bytes(r.take()?));
            let len = usize::from(u16::from_be_bytes(r.take()?));
            let name = r.bytes(len)?;
            let limit = std::str::from_utf8(name)
                .map_err(|_| DecodeError("limit name is not UTF-8"))?
                .to_owned();
            charges.push(Charge { side, limit, key });
        }
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(Self {
            id: HitId { epoch, seq },
            time_ms,
            cost,
            charges,
        })
    }
}

/// A hit counted in the state whose record the partition's worker has not
/// read back yet, as a checkpoint keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingHit {
    pub id: HitId,
    pub time_ms: u64,
}

/// Count `hit`'s charges on `side` in `store` (the state does not hold the
/// hit: its owner crashed before a checkpoint saved it), whatever their
/// verdicts now, at the time it was answered. Charges of limits `rules` no
/// longer has are left out. Returns how many were counted.
pub fn replay(store: &KeyedStore, rules: &Rules, hit: &SyncHit, side: Side) -> usize {
    let mut n = 0;
    for c in hit.charges.iter().filter(|c| c.side == side) {
        let Some(limit) = rules.limits.iter().find(|l| l.name == c.limit) else {
            continue;
        };
        let probe = Probe {
            key: c.key,
            algorithm: &*limit.algorithm,
            enforce: !limit.shadow,
        };
        store.charge(&probe, hit.time_ms, hit.cost);
        n += 1;
    }
    n
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let head = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(head);
        Ok(a)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn charge() -> impl Strategy<Value = Charge> {
        (any::<bool>(), "[a-z_]{0,20}", any::<u128>()).prop_map(|(home, limit, key)| Charge {
            side: if home { Side::Home } else { Side::Arrival },
            limit,
            key: KeyId(key),
        })
    }

    proptest! {
        #[test]
        fn round_trips(epoch in any::<u64>(), seq in any::<u64>(), time_ms in any::<u64>(),
                       cost in any::<u64>(), charges in proptest::collection::vec(charge(), 0..6)) {
            let hit = SyncHit { id: HitId { epoch, seq }, time_ms, cost, charges };
            prop_assert_eq!(SyncHit::decode(&hit.encode()), Ok(hit));
        }

        #[test]
        fn a_cut_record_is_an_error_not_a_panic(charges in proptest::collection::vec(charge(), 1..4),
                                                 cut in any::<proptest::sample::Index>()) {
            let hit = SyncHit { id: HitId { epoch: 1, seq: 2 }, time_ms: 3, cost: 4, charges };
            let bytes = hit.encode();
            let at = cut.index(bytes.len());
            prop_assert!(SyncHit::decode(&bytes[..at]).is_err());
        }
    }

    #[test]
    fn a_replay_charges_this_sides_keys_of_known_limits_even_over_the_limit() {
        let fp = crate::fingerprint::Fingerprinter::from_secret("t");
        let doc = crate::rules::RulesDoc::from_json(
            br#"{"limits": [{"name": "per_user", "algorithm": "fixed_window", "key": ["user_id"], "limit": 2, "window": "1h"}]}"#,
        )
        .unwrap();
        let rules = Rules::compile(doc, 1, &fp).unwrap();
        let store = KeyedStore::new(1);
        let key = KeyId(42);
        let hit = |seq| SyncHit {
            id: HitId { epoch: 1, seq },
            time_ms: 1_000,
            cost: 1,
            charges: vec![
                Charge {
                    side: Side::Arrival,
                    limit: "per_user".into(),
                    key,
                },
                Charge {
                    side: Side::Home,
                    limit: "per_user".into(),
                    key: KeyId(7),
                },
                Charge {
                    side: Side::Arrival,
                    limit: "gone".into(),
                    key: KeyId(8),
                },
            ],
        };
        for seq in 0..3 {
            assert_eq!(replay(&store, &rules, &hit(seq), Side::Arrival), 1);
        }
        assert_eq!(
            store.get(key).map(|s| s[1]),
            Some(3),
            "counted past the limit of 2"
        );
        assert_eq!(store.len(), 1, "only this side's keys of known limits");
    }

    #[test]
    fn other_formats_are_refused() {
        assert_eq!(
            SyncHit::decode(&[1, 0, 0]),
            Err(DecodeError("not a hit record"))
        );
        assert!(SyncHit::decode(&[]).is_err());
    }
}
