//! Partition checkpoints and where they are kept.
//!
//! A checkpoint is `{state, next_offset, config_version}` of one partition.
//! Ownership is fenced by an epoch: the owner bumps it when it is assigned
//! the partition, and a save succeeds only while the stored epoch is still
//! the saver's and the offset does not move backwards, so an instance that
//! lost the partition (a zombie) can never overwrite the new owner's work.

use std::collections::HashMap;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::alerts::AlertAgg;
use super::hits::PendingHit;
use crate::state::{KeyId, StoredKey};

/// Format version of the encoded checkpoint, first byte of every blob.
/// 4: adds the pending synchronous hits ([`PendingHit`]); format 3 is still
/// read, with none pending.
/// 3: adds the home side ([`HomeState`]: the repartition topic's position,
/// the applied marks and the state of unaligned keys); format 2 is still
/// read, as a checkpoint with an empty home side.
/// 2: keys are 128-bit ids and the blob carries the secret's check value
/// (format 1 held key texts).
const FORMAT: u8 = 4;
const FORMAT_3: u8 = 3;
const FORMAT_2: u8 = 2;

/// Everything needed to resume a partition exactly where it was.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The offset of the first event not reflected in this state.
    pub next_offset: i64,
    pub config_version: u64,
    /// Check value of the secret the key ids were made with
    /// (`Fingerprinter::check_value`).
    pub key_check: u64,
    /// Highest event time seen (after skew clamping): closes alert windows.
    pub watermark_ms: u64,
    /// Event time of the last expiry sweep; no event is applied before it.
    pub horizon_ms: u64,
    pub keys: Vec<StoredKey>,
    /// Open alert windows: (window start, state key, aggregate).
    pub alerts: Vec<(u64, KeyId, AlertAgg)>,
    /// The partition's home side: the events other partitions routed here
    /// (unaligned limits), saved with the arrival side so that both
    /// positions move together under one epoch.
    pub home: HomeState,
    /// Synchronous hits counted in `keys` or `home.keys` whose records in
    /// the repartition topic lie at or after `home.next_offset`: a replay
    /// skips them there (docs/group.md).
    pub pending_hits: Vec<PendingHit>,
}

/// The home side of a partition: partition q of the repartition topic,
/// consumed by the owner of partition q of the requests topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeState {
    /// The offset of the first repartition record not reflected here.
    pub next_offset: i64,
    /// Per source partition, the last (source offset, seq) applied: a
    /// record at or below it is a copy published again by a replaying
    /// source, and is skipped.
    pub applied: Vec<Applied>,
    pub watermark_ms: u64,
    pub horizon_ms: u64,
    pub keys: Vec<StoredKey>,
    pub alerts: Vec<(u64, KeyId, AlertAgg)>,
}

/// The last repartition record applied from one source partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub source_partition: i32,
    pub source_offset: i64,
    pub seq: u16,
}

/// A format-3 checkpoint, as it was written: read into a [`Checkpoint`]
/// with no pending hits.
#[derive(Deserialize)]
struct CheckpointV3 {
    next_offset: i64,
    config_version: u64,
    key_check: u64,
    watermark_ms: u64,
    horizon_ms: u64,
    keys: Vec<StoredKey>,
    alerts: Vec<(u64, KeyId, AlertAgg)>,
    home: HomeState,
}

/// A format-2 checkpoint, as it was written: read into a [`Checkpoint`]
/// with an empty home side.
#[derive(Deserialize)]
struct CheckpointV2 {
    next_offset: i64,
    config_version: u64,
    key_check: u64,
    watermark_ms: u64,
    horizon_ms: u64,
    keys: Vec<StoredKey>,
    alerts: Vec<(u64, KeyId, AlertAgg)>,
}

impl Checkpoint {
    pub fn encode(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut out = vec![FORMAT];
        postcard::to_io(self, &mut out).map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CheckpointError> {
        match bytes.split_first() {
            Some((&FORMAT, body)) => {
                postcard::from_bytes(body).map_err(|e| CheckpointError::Corrupt(e.to_string()))
            }
            Some((&FORMAT_3, body)) => {
                let v3: CheckpointV3 = postcard::from_bytes(body)
                    .map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
                Ok(Checkpoint {
                    next_offset: v3.next_offset,
                    config_version: v3.config_version,
                    key_check: v3.key_check,
                    watermark_ms: v3.watermark_ms,
                    horizon_ms: v3.horizon_ms,
                    keys: v3.keys,
                    alerts: v3.alerts,
                    home: v3.home,
                    pending_hits: Vec::new(),
                })
            }
            Some((&FORMAT_2, body)) => {
                let v2: CheckpointV2 = postcard::from_bytes(body)
                    .map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
                Ok(Checkpoint {
                    next_offset: v2.next_offset,
                    config_version: v2.config_version,
                    key_check: v2.key_check,
                    watermark_ms: v2.watermark_ms,
                    horizon_ms: v2.horizon_ms,
                    keys: v2.keys,
                    alerts: v2.alerts,
                    home: HomeState::default(),
                    pending_hits: Vec::new(),
                })
            }
            Some((1, _)) => Err(CheckpointError::Corrupt(
                "checkpoint format 1 (key texts, quotaflow before key ids) is not read by this \
                 version: delete the partition's checkpoint to start it from the beginning \
                 of the topic"
                    .into(),
            )),
            Some((v, _)) => Err(CheckpointError::Corrupt(format!(
                "unknown checkpoint format {v}"
            ))),
            None => Err(CheckpointError::Corrupt("empty checkpoint".into())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Another instance took the partition: stop processing it.
    #[error("fenced: epoch {ours} is stale, partition now at epoch {current}")]
    Fenced { ours: u64, current: u64 },
    /// The store no longer holds the epoch this owner took the partition
    /// at (it holds none, `current` 0, or an older one): it lost data — a
    /// restart without persistence, a `FLUSHALL`, a failover to a replica
    /// behind. The owner still holds the live state; see
    /// [`CheckpointStore::reseed`].
    #[error("the checkpoint store forgot epoch {ours} (it holds {current}): it lost data")]
    Forgotten { ours: u64, current: u64 },
    /// The save would move the partition's offset backwards.
    #[error("checkpoint offset {offered} is behind the stored {stored}")]
    Backwards { offered: i64, stored: i64 },
    #[error("checkpoint is unreadable: {0}")]
    Corrupt(String),
    /// The store could not be reached; the caller retries.
    #[error("checkpoint store unavailable: {0}")]
    Unavailable(String),
}

/// Keeps checkpoints and fencing epochs, per partition.
pub trait CheckpointStore: Send + Sync {
    /// Become the partition's owner: bump its epoch and return it with the
    /// last checkpoint, if any.
    fn acquire(&self, partition: i32) -> Result<(u64, Option<Checkpoint>), CheckpointError>;

    /// Save `cp` if `epoch` is still the partition's epoch and the offset
    /// does not move backwards. A newer epoch stored: `Fenced`; an older
    /// one or none: `Forgotten`.
    fn save(&self, partition: i32, epoch: u64, cp: &Checkpoint) -> Result<(), CheckpointError>;

    /// After `Forgotten`: write `cp` under a new epoch, above `ours` and
    /// above every epoch the store has issued and still knows of, and
    /// return it. Epochs must stay unique across the loss, so that a stale
    /// owner and a new one never share a fencing token. `Fenced` when a
    /// newer owner took the partition since, or a checkpoint further ahead
    /// than `cp` is stored. Retrying after `Unavailable` must be safe: a
    /// re-seed that landed but whose answer was lost is not a fence.
    fn reseed(&self, partition: i32, ours: u64, cp: &Checkpoint) -> Result<u64, CheckpointError>;

    /// The partition left this instance: drop what was kept for it (a
    /// connection, say). Saving it again later still works.
    fn release(&self, _partition: i32) {}

    /// Note, between checkpoints, that the owner has decided every event
    /// before `next_offset`: after a crash the next owner can tell which
    /// of the events it replays had their outputs published already. A
    /// hint, not fenced, and lost with the store; it only moves forward.
    fn mark_progress(&self, _partition: i32, _next_offset: i64) -> Result<(), CheckpointError> {
        Ok(())
    }

    /// The highest progress mark of `partition`, if any.
    fn progress(&self, _partition: i32) -> Result<Option<i64>, CheckpointError> {
        Ok(None)
    }
}

/// Per partition: the epoch and the encoded checkpoint.
type Slots = HashMap<i32, (u64, Option<Vec<u8>>)>;

/// Checkpoints in memory: the embedded default, and unit tests.
#[derive(Default)]
pub struct MemoryCheckpoints {
    inner: Mutex<Slots>,
    /// The highest epoch ever issued, for any partition: kept apart from
    /// the slots, so epochs stay unique across [`MemoryCheckpoints::forget`].
    issued: Mutex<u64>,
    marks: Mutex<HashMap<i32, i64>>,
}

impl MemoryCheckpoints {
    /// Lose every epoch and checkpoint, as a Redis restarted without
    /// persistence would (tests of the recovery).
    pub fn forget(&self) {
        self.inner.lock().clear();
        self.marks.lock().clear();
    }

    fn next_epoch(&self, above: u64) -> u64 {
        let mut issued = self.issued.lock();
        *issued = (*issued).max(above).saturating_add(1);
        *issued
    }

    /// The last checkpoint saved for `partition`, without taking it.
    pub fn peek(&self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError> {
        let map = self.inner.lock();
        map.get(&partition)
            .and_then(|(_, bytes)| bytes.as_deref())
            .map(Checkpoint::decode)
            .transpose()
    }
}

impl CheckpointStore for MemoryCheckpoints {
    fn acquire(&self, partition: i32) -> Result<(u64, Option<Checkpoint>), CheckpointError> {
        let mut map = self.inner.lock();
        let entry = map.entry(partition).or_insert((0, None));
        entry.0 = self.next_epoch(entry.0);
        let cp = entry.1.as_deref().map(Checkpoint::decode).transpose()?;
        Ok((entry.0, cp))
    }

    fn save(&self, partition: i32, epoch: u64, cp: &Checkpoint) -> Result<(), CheckpointError> {
        let bytes = cp.encode()?;
        let mut map = self.inner.lock();
        let entry = map.entry(partition).or_insert((0, None));
        if entry.0 > epoch {
            return Err(CheckpointError::Fenced {
                ours: epoch,
                current: entry.0,
            });
        }
        if entry.0 < epoch {
            return Err(CheckpointError::Forgotten {
                ours: epoch,
                current: entry.0,
            });
        }
        if let Some(stored) = entry.1.as_deref().map(Checkpoint::decode).transpose()? {
            if cp.next_offset < stored.next_offset {
                return Err(CheckpointError::Backwards {
                    offered: cp.next_offset,
                    stored: stored.next_offset,
                });
            }
        }
        entry.1 = Some(bytes);
        Ok(())
    }

    fn mark_progress(&self, partition: i32, next_offset: i64) -> Result<(), CheckpointError> {
        let mut marks = self.marks.lock();
        let mark = marks.entry(partition).or_insert(next_offset);
        *mark = (*mark).max(next_offset);
        Ok(())
    }

    fn progress(&self, partition: i32) -> Result<Option<i64>, CheckpointError> {
        Ok(self.marks.lock().get(&partition).copied())
    }

    fn reseed(&self, partition: i32, ours: u64, cp: &Checkpoint) -> Result<u64, CheckpointError> {
        let bytes = cp.encode()?;
        let mut map = self.inner.lock();
        let entry = map.entry(partition).or_insert((0, None));
        if entry.0 > ours {
            return Err(CheckpointError::Fenced {
                ours,
                current: entry.0,
            });
        }
        if let Some(stored) = entry.1.as_deref().map(Checkpoint::decode).transpose()? {
            if stored.next_offset > cp.next_offset {
                return Err(CheckpointError::Fenced {
                    ours,
                    current: entry.0,
                });
            }
        }
        let epoch = self.next_epoch(ours);
        *entry = (epoch, Some(bytes));
        Ok(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_epoch_cannot_overwrite_the_new_owner() {
        let store = MemoryCheckpoints::default();
        let (old, _) = store.acquire(0).unwrap();
        let cp = |n| Checkpoint {
            next_offset: n,
            ..Checkpoint::default()
        };
        store.save(0, old, &cp(10)).unwrap();
        let (new, restored) = store.acquire(0).unwrap();
        assert_eq!(restored.unwrap().next_offset, 10);
        assert_eq!(
            store.save(0, old, &cp(20)),
            Err(CheckpointError::Fenced {
                ours: old,
                current: new
            })
        );
        assert_eq!(
            store.save(0, new, &cp(5)),
            Err(CheckpointError::Backwards {
                offered: 5,
                stored: 10
            })
        );
        store.save(0, new, &cp(30)).unwrap();
    }

    #[test]
    fn a_store_that_forgot_is_reseeded_with_an_epoch_no_one_held() {
        let store = MemoryCheckpoints::default();
        let cp = |n| Checkpoint {
            next_offset: n,
            ..Checkpoint::default()
        };
        let (zombie, _) = store.acquire(0).unwrap();
        let (owner, _) = store.acquire(0).unwrap();
        store.save(0, owner, &cp(10)).unwrap();
        store.forget();
        assert_eq!(
            store.save(0, owner, &cp(20)),
            Err(CheckpointError::Forgotten {
                ours: owner,
                current: 0
            })
        );
        let reseeded = store.reseed(0, owner, &cp(20)).unwrap();
        assert!(reseeded > owner && reseeded > zombie);
        assert_eq!(store.peek(0).unwrap().unwrap().next_offset, 20);
        // The zombie's token is stale for good; a new owner's is new.
        assert_eq!(
            store.save(0, zombie, &cp(99)),
            Err(CheckpointError::Fenced {
                ours: zombie,
                current: reseeded
            })
        );
        assert_eq!(
            store.reseed(0, zombie, &cp(99)),
            Err(CheckpointError::Fenced {
                ours: zombie,
                current: reseeded
            })
        );
        // A re-seed never goes back over a checkpoint further ahead.
        let (newest, _) = store.acquire(0).unwrap();
        store.save(0, newest, &cp(50)).unwrap();
        assert!(matches!(
            store.reseed(0, newest, &cp(40)),
            Err(CheckpointError::Fenced { .. })
        ));
        store.forget();
        let (next, restored) = store.acquire(0).unwrap();
        assert!(next > newest, "epochs stay unique across the loss");
        assert_eq!(restored, None);
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let cp = Checkpoint {
            next_offset: 42,
            config_version: 3,
            key_check: 0xfeed,
            watermark_ms: 99,
            horizon_ms: 90,
            keys: vec![StoredKey {
                key: KeyId(u128::MAX - 7),
                state: [1, 2, 3],
                expires_at_ms: 7,
                refused: 1,
            }],
            alerts: Vec::new(),
            home: HomeState {
                next_offset: 9,
                applied: vec![Applied {
                    source_partition: 2,
                    source_offset: 77,
                    seq: 1,
                }],
                ..HomeState::default()
            },
            pending_hits: vec![crate::pipeline::hits::PendingHit {
                id: crate::pipeline::hits::HitId { epoch: 5, seq: 11 },
                time_ms: 1_700_000_000_000,
            }],
        };
        assert_eq!(Checkpoint::decode(&cp.encode().unwrap()).unwrap(), cp);
        assert!(Checkpoint::decode(&[FORMAT, 0xff, 0xff]).is_err());
        assert!(Checkpoint::decode(&[9]).is_err());
        let old = Checkpoint::decode(&[1, 0]).unwrap_err().to_string();
        assert!(old.contains("format 1"), "{old}");
        assert!(Checkpoint::decode(&[]).is_err());
    }

    /// A checkpoint written before the home side existed restores, with
    /// nothing routed to the partition yet.
    #[test]
    fn a_format_2_checkpoint_restores_with_an_empty_home_side() {
        #[derive(Serialize)]
        struct V2<'a> {
            next_offset: i64,
            config_version: u64,
            key_check: u64,
            watermark_ms: u64,
            horizon_ms: u64,
            keys: &'a [StoredKey],
            alerts: Vec<(u64, KeyId, AlertAgg)>,
        }
        let keys = [StoredKey {
            key: KeyId(5),
            state: [1, 2, 3],
            expires_at_ms: 7,
            refused: 0,
        }];
        let mut bytes = vec![2u8];
        postcard::to_io(
            &V2 {
                next_offset: 42,
                config_version: 3,
                key_check: 9,
                watermark_ms: 99,
                horizon_ms: 90,
                keys: &keys,
                alerts: Vec::new(),
            },
            &mut bytes,
        )
        .unwrap();
        let cp = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(
            cp,
            Checkpoint {
                next_offset: 42,
                config_version: 3,
                key_check: 9,
                watermark_ms: 99,
                horizon_ms: 90,
                keys: keys.to_vec(),
                alerts: Vec::new(),
                home: HomeState::default(),
                pending_hits: Vec::new(),
            }
        );
    }

    /// A checkpoint written before synchronous hits were logged restores
    /// with none pending.
    #[test]
    fn a_format_3_checkpoint_restores_with_no_pending_hits() {
        #[derive(Serialize)]
        struct V3 {
            next_offset: i64,
            config_version: u64,
            key_check: u64,
            watermark_ms: u64,
            horizon_ms: u64,
            keys: Vec<StoredKey>,
            alerts: Vec<(u64, KeyId, AlertAgg)>,
            home: HomeState,
        }
        let home = HomeState {
            next_offset: 12,
            ..HomeState::default()
        };
        let mut bytes = vec![FORMAT_3];
        postcard::to_io(
            &V3 {
                next_offset: 7,
                config_version: 2,
                key_check: 1,
                watermark_ms: 5,
                horizon_ms: 4,
                keys: Vec::new(),
                alerts: Vec::new(),
                home: home.clone(),
            },
            &mut bytes,
        )
        .unwrap();
        let cp = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(cp.next_offset, 7);
        assert_eq!(cp.home, home);
        assert!(cp.pending_hits.is_empty());
    }
}
