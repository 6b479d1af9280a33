//! The synchronous hits of one owned partition on their way through its
//! log (`quotaflow_core::pipeline::hits`): numbered, pending until the
//! worker reads them back, and saved with the checkpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use quotaflow_core::pipeline::hits::{Charge, HitId, PendingHit, SyncHit};

/// How long a pending hit is kept when its record never comes back: an
/// owner that crashed after counting a hit and before the broker took its
/// record (the hit was not answered). Far above any delivery delay.
const PENDING_TTL_MS: u64 = 10 * 60 * 1000;

pub(super) struct HitLog {
    /// The worker's fencing epoch (raised on a re-seed): the first half of
    /// every hit id.
    epoch: Arc<AtomicU64>,
    seq: AtomicU64,
    /// Hit id → the time it was counted.
    pending: Mutex<HashMap<HitId, u64>>,
    /// Shared while a hit is counted and made pending, exclusive while the
    /// worker snapshots the state with the pending set, so that a snapshot
    /// never holds a hit's count without its pending id (it would be
    /// counted again on replay) or the reverse.
    gate: RwLock<()>,
    /// Set under the gate before the worker's final snapshot: no hit is
    /// counted after it (it would be in no checkpoint).
    closed: AtomicBool,
}

impl HitLog {
    pub(super) fn new(epoch: Arc<AtomicU64>, restored: &[PendingHit]) -> Self {
        Self {
            epoch,
            seq: AtomicU64::new(0),
            pending: Mutex::new(restored.iter().map(|p| (p.id, p.time_ms)).collect()),
            gate: RwLock::new(()),
            closed: AtomicBool::new(false),
        }
    }

    /// `None` once the worker is stopping.
    pub(super) fn counting(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let gate = self.gate.read();
        (!self.closed.load(Ordering::Acquire)).then_some(gate)
    }

    /// Count no more hits: called before the final snapshot, and waits
    /// for the hits being counted.
    pub(super) fn close(&self) {
        let _exclusive = self.gate.write();
        self.closed.store(true, Ordering::Release);
    }

    /// The owner's current epoch.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Number a hit counted at `time_ms` and make it pending. Call while
    /// holding [`HitLog::counting`] since before the hit was counted.
    pub(super) fn log(&self, time_ms: u64, cost: u64, charges: Vec<Charge>) -> SyncHit {
        let id = HitId {
            epoch: self.epoch.load(Ordering::SeqCst),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
        self.pending.lock().insert(id, time_ms);
        SyncHit {
            id,
            time_ms,
            cost,
            charges,
        }
    }

    /// The worker read hit `id` back from the log: `true` if the state
    /// already holds it (it was pending), `false` if it must be counted.
    pub(super) fn read_back(&self, id: HitId) -> bool {
        self.pending.lock().remove(&id).is_some()
    }

    /// Run `snapshot` with no hit being counted, and return it with the
    /// pending set (less the hits pending longer than the TTL at `now_ms`).
    pub(super) fn snapshot<T>(
        &self,
        now_ms: u64,
        snapshot: impl FnOnce() -> T,
    ) -> (T, Vec<PendingHit>) {
        let _exclusive = self.gate.write();
        let taken = snapshot();
        let mut pending = self.pending.lock();
        pending.retain(|_, &mut t| t.saturating_add(PENDING_TTL_MS) > now_ms);
        let mut hits: Vec<PendingHit> = pending
            .iter()
            .map(|(&id, &time_ms)| PendingHit { id, time_ms })
            .collect();
        hits.sort_unstable_by_key(|p| p.id);
        (taken, hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_per_epoch_and_read_back_once() {
        let epoch = Arc::new(AtomicU64::new(7));
        let log = HitLog::new(epoch.clone(), &[]);
        let a = log.log(1, 1, Vec::new());
        let b = log.log(2, 1, Vec::new());
        assert_eq!((a.id.epoch, b.id.epoch), (7, 7));
        assert_ne!(a.id, b.id);
        assert!(log.read_back(a.id));
        assert!(!log.read_back(a.id), "read back once");
        assert!(log.counting().is_some());
        log.close();
        assert!(log.counting().is_none(), "closed before the final snapshot");
        epoch.store(8, Ordering::SeqCst);
        assert_eq!(log.log(3, 1, Vec::new()).id.epoch, 8);
    }

    #[test]
    fn a_snapshot_carries_the_pending_hits_and_drops_stale_ones() {
        let restored = [PendingHit {
            id: HitId { epoch: 1, seq: 0 },
            time_ms: 0,
        }];
        let log = HitLog::new(Arc::new(AtomicU64::new(2)), &restored);
        let fresh = log.log(PENDING_TTL_MS, 1, Vec::new());
        let ((), pending) = log.snapshot(PENDING_TTL_MS + 1, || ());
        assert_eq!(
            pending,
            vec![PendingHit {
                id: fresh.id,
                time_ms: PENDING_TTL_MS
            }]
        );
        assert!(!log.read_back(restored[0].id), "dropped after the TTL");
    }
}
