//! Partition ownership: which partitions this instance owns, taking them
//! over and handing them back. One coordinator serves the embedded bus and
//! Kafka alike; Kafka's rebalance callback only forwards to it.
//!
//! - **assign**: every partition is taken in parallel: bump its fencing
//!   epoch and load its checkpoint (retried while the store is unavailable,
//!   until the partition is revoked or the coordinator shuts down), then
//!   start its worker. The caller learns each taken partition's start offset.
//! - **revoke**: every revoked partition is asked to drain and write a final
//!   checkpoint at once, and all are awaited against one deadline, so a
//!   revoke of N partitions takes at most the deadline, never N of them.
//!   What could not be checkpointed is logged and reported.
//! - **lose**: a partition lost without a revoke (the member was dropped
//!   from the group) is handed back the same way: its final checkpoint is
//!   saved if its epoch still holds and fenced if a new owner has taken it.
//!
//! docs/architecture.md draws how a record and a `/check` reach the state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quotaflow_core::pipeline::{Checkpoint, CheckpointError};
use quotaflow_core::state::KeyedStore;

use crate::worker::{
    self, Msg, Source, StopOutcome, StoppedBecause, Stopping, Worker, WorkerContext,
};

/// First pause before retrying a partition whose checkpoint could not be
/// loaded; it doubles up to [`MAX_RESTORE_BACKOFF`].
const RESTORE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RESTORE_BACKOFF: Duration = Duration::from_secs(2);

/// How long a partition whose outputs failed delivery `times` times since
/// it was assigned waits before it is taken over again.
fn retake_backoff(times: u32) -> Duration {
    match times {
        0 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 1).min(6)),
    }
}

/// A partition taken by [`Coordinator::assign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub partition: i32,
    pub epoch: u64,
    /// Where its records resume: the checkpoint's next offset, or `None`
    /// for a partition with no checkpoint (start at the earliest record).
    pub next_offset: Option<i64>,
    /// Where its repartition records resume (the checkpoint's home side),
    /// `None` as for `next_offset`.
    pub home_offset: Option<i64>,
}

/// What a revoke (or shutdown) did with each partition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevokeReport {
    /// (partition, how its worker stopped), in partition order.
    pub stopped: Vec<(i32, StopOutcome)>,
    /// Partitions revoked while still being restored: never started.
    pub cancelled: Vec<i32>,
    pub took: Duration,
}

impl RevokeReport {
    /// Partitions whose final checkpoint is not known to be saved.
    pub fn not_checkpointed(&self) -> impl Iterator<Item = i32> + '_ {
        self.stopped.iter().filter_map(|(p, o)| match o {
            StopOutcome::Checkpointed { .. } | StopOutcome::Clean => None,
            _ => Some(*p),
        })
    }
}

enum Slot {
    /// Being restored; the flag cancels it.
    Restoring(Arc<AtomicBool>),
    Running(Worker),
}

/// This instance's partitions and their workers.
pub struct Coordinator {
    ctx: Arc<WorkerContext>,
    slots: Mutex<BTreeMap<i32, Slot>>,
    /// Partitions taken over again since they were last assigned, and how
    /// often: a failure that repeats waits longer each time.
    retaken: Mutex<BTreeMap<i32, u32>>,
    drain_deadline: Duration,
    shutting_down: AtomicBool,
}

impl Coordinator {
    /// `drain_deadline` bounds every revoke and shutdown: it must fit inside
    /// the consumer's `max.poll.interval.ms`, since a revoke runs on the
    /// consumer's thread.
    pub fn new(ctx: Arc<WorkerContext>, drain_deadline: Duration) -> Self {
        Self {
            ctx,
            slots: Mutex::new(BTreeMap::new()),
            retaken: Mutex::new(BTreeMap::new()),
            drain_deadline,
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn context(&self) -> &Arc<WorkerContext> {
        &self.ctx
    }

    /// Take `partitions`, in parallel. `make_source(taken, channel)`
    /// builds each worker's source around its control channel, knowing the
    /// epoch and offset the partition was taken at (it may rewind the
    /// consumer there before the worker reads anything); a partition
    /// whose source cannot be built, or whose restore was cancelled, is left
    /// out of the result. A partition already owned is handed back first
    /// (a new generation of the same assignment).
    pub fn assign<S: Source>(
        &self,
        partitions: &[i32],
        depth: usize,
        make_source: impl Fn(&Taken, Receiver<Msg>) -> Option<S> + Sync,
    ) -> Vec<Taken> {
        let owned: Vec<i32> = {
            let slots = self.slots.lock();
            partitions
                .iter()
                .copied()
                .filter(|p| slots.contains_key(p))
                .collect()
        };
        if !owned.is_empty() {
            tracing::warn!(event = "partition_reassigned", partitions = ?owned, "assigned partitions this instance already owns; handing them back first");
            self.revoke(&owned);
        }
        let cancels: Vec<(i32, Arc<AtomicBool>)> = {
            let mut slots = self.slots.lock();
            partitions
                .iter()
                .map(|&p| {
                    let cancel = Arc::new(AtomicBool::new(false));
                    slots.insert(p, Slot::Restoring(cancel.clone()));
                    (p, cancel)
                })
                .collect()
        };
        let make_source = &make_source;
        let mut taken: Vec<Taken> = std::thread::scope(|scope| {
            let handles: Vec<_> = cancels
                .into_iter()
                .map(|(p, cancel)| {
                    let mine = cancel.clone();
                    let handle = scope.spawn(move || self.take(p, &mine, depth, make_source));
                    (p, cancel, handle)
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|(p, cancel, h)| match h.join() {
                    Ok(taken) => taken,
                    Err(_) => {
                        // A panicking restore leaves no slot behind.
                        let mut slots = self.slots.lock();
                        if matches!(slots.get(&p), Some(Slot::Restoring(c)) if Arc::ptr_eq(c, &cancel))
                        {
                            slots.remove(&p);
                        }
                        tracing::error!(event = "assign_failed", partition = p, "restoring the partition panicked");
                        None
                    }
                })
                .collect()
        });
        taken.sort_by_key(|t| t.partition);
        taken
    }

    /// Restore one partition and start its worker, unless cancelled.
    fn take<S: Source>(
        &self,
        p: i32,
        cancel: &AtomicBool,
        depth: usize,
        make_source: &(impl Fn(&Taken, Receiver<Msg>) -> Option<S> + Sync),
    ) -> Option<Taken> {
        let started = Instant::now();
        let restored = self.restore(p, cancel);
        let mut slots = self.slots.lock();
        // Still ours to start? A revoke during the restore removed the slot
        // (or replaced it with a newer generation's flag).
        let current =
            matches!(slots.get(&p), Some(Slot::Restoring(c)) if std::ptr::eq(&**c, cancel));
        let Some((epoch, cp)) = restored.filter(|_| current && !cancel.load(Ordering::SeqCst))
        else {
            if current {
                slots.remove(&p);
            }
            tracing::info!(
                event = "restore_cancelled",
                partition = p,
                "partition revoked before it was restored"
            );
            return None;
        };
        let next_offset = cp.as_ref().map(|c| c.next_offset);
        let home_offset = cp.as_ref().map(|c| c.home.next_offset);
        let keys = cp.as_ref().map_or(0, |c| c.keys.len() + c.home.keys.len());
        let taken = Taken {
            partition: p,
            epoch,
            next_offset,
            home_offset,
        };
        let (tx, rx) = worker::channel(depth);
        let Some(source) = make_source(&taken, rx) else {
            slots.remove(&p);
            tracing::error!(
                event = "assign_failed",
                partition = p,
                "no source for the partition"
            );
            return None;
        };
        let worker = match Worker::spawn(self.ctx.clone(), p, epoch, cp, tx, source) {
            Ok(w) => w,
            Err(e) => {
                slots.remove(&p);
                tracing::error!(event = "worker_spawn_failed", partition = p, error = %e);
                return None;
            }
        };
        let m = &self.ctx.metrics.stream;
        m.restore_duration.observe(started.elapsed().as_secs_f64());
        tracing::info!(
            event = "partition_assigned",
            partition = p,
            epoch,
            offset = next_offset.unwrap_or(0),
            keys,
            restore_ms = started.elapsed().as_millis() as u64,
            "took partition"
        );
        slots.insert(p, Slot::Running(worker));
        Some(taken)
    }

    /// Bump the epoch and load the checkpoint, retrying while the store is
    /// unavailable: a partition is never processed without its fencing
    /// epoch. `None` when cancelled first.
    fn restore(&self, p: i32, cancel: &AtomicBool) -> Option<(u64, Option<Checkpoint>)> {
        let mut backoff = RESTORE_BACKOFF;
        loop {
            if cancel.load(Ordering::SeqCst) || self.shutting_down.load(Ordering::SeqCst) {
                return None;
            }
            match self.ctx.checkpoints.store.acquire(p) {
                Ok(v) => return Some(v),
                Err(e) => {
                    let fatal = !matches!(e, CheckpointError::Unavailable(_));
                    tracing::error!(event = "restore_failed", partition = p, error = %e, "cannot take partition yet; retrying");
                    if fatal {
                        // A corrupt checkpoint stays corrupt: retrying slowly
                        // keeps the log readable while an operator looks.
                        backoff = MAX_RESTORE_BACKOFF;
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if cancel.load(Ordering::SeqCst)
                            || self.shutting_down.load(Ordering::SeqCst)
                        {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    backoff = (backoff * 2).min(MAX_RESTORE_BACKOFF);
                }
            }
        }
    }

    /// Hand `partitions` back: each drains and writes a final checkpoint,
    /// all in parallel against one deadline.
    pub fn revoke(&self, partitions: &[i32]) -> RevokeReport {
        self.hand_back(partitions, "revoked")
    }

    /// Hand back `partitions` lost without a revoke. Another instance may
    /// own them already: the final checkpoint is still tried, and the
    /// epoch fence refuses it if so (a partition's state is always a
    /// consistent prefix of its records, so saving it while the epoch holds
    /// is correct and spares the next owner a replay).
    pub fn lose(&self, partitions: &[i32]) -> RevokeReport {
        self.hand_back(partitions, "lost")
    }

    /// Stop taking partitions: restores under way give up. Called before
    /// waiting for the thread that may be inside [`Coordinator::assign`]
    /// (Kafka's consumer thread, in the rebalance callback), so a shutdown
    /// while Redis is unreachable does not wait for Redis.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Hand back everything (shutdown); restores under way are cancelled.
    pub fn revoke_all(&self) -> RevokeReport {
        self.shut_down();
        let all = self.partitions();
        self.hand_back(&all, "shutdown")
    }

    /// Hand back everything after the group dropped this member's whole
    /// assignment (a rebalance error), without stopping the coordinator.
    pub fn lose_all(&self) -> RevokeReport {
        let all = self.partitions();
        self.hand_back(&all, "lost")
    }

    /// Every partition with a slot: restoring, running or stopped on its own.
    fn partitions(&self) -> Vec<i32> {
        self.slots.lock().keys().copied().collect()
    }

    fn hand_back(&self, partitions: &[i32], why: &'static str) -> RevokeReport {
        let started = Instant::now();
        let deadline = started + self.drain_deadline;
        let mut report = RevokeReport::default();
        let workers: Vec<Worker> = {
            let mut slots = self.slots.lock();
            partitions
                .iter()
                .filter_map(|p| match slots.remove(p)? {
                    Slot::Restoring(cancel) => {
                        cancel.store(true, Ordering::SeqCst);
                        report.cancelled.push(*p);
                        None
                    }
                    Slot::Running(w) => Some(w),
                })
                .collect()
        };
        for p in &report.cancelled {
            self.ctx.checkpoints.store.release(*p);
        }
        {
            let mut retaken = self.retaken.lock();
            for p in partitions {
                retaken.remove(p);
            }
        }
        // Asked outside the lock: a channel-fed worker's stop request
        // queues behind the records already sent to it.
        let stopping: Vec<Stopping> = workers
            .into_iter()
            .map(|w| {
                tracing::info!(
                    event = "partition_revoked",
                    partition = w.partition(),
                    why,
                    "draining"
                );
                w.request_stop()
            })
            .collect();
        for s in stopping {
            let p = s.partition();
            let outcome = s.wait(deadline);
            match &outcome {
                StopOutcome::Checkpointed { .. } | StopOutcome::Clean => {}
                StopOutcome::AlreadyStopped => tracing::warn!(
                    event = "partition_not_checkpointed",
                    partition = p,
                    "the worker had stopped on its own (fenced by a newer owner); the next owner replays from the last checkpoint"
                ),
                StopOutcome::NotCheckpointed { reason } => tracing::error!(
                    event = "partition_not_checkpointed",
                    partition = p,
                    reason = %reason,
                    "final checkpoint not saved; the next owner replays from the last one that was"
                ),
                StopOutcome::TimedOut => tracing::error!(
                    event = "partition_not_checkpointed",
                    partition = p,
                    deadline_ms = self.drain_deadline.as_millis() as u64,
                    "the worker did not drain before the deadline; it finishes on its own unless the process exits first (shutdown), and a late checkpoint is fenced if the partition has a new owner"
                ),
            }
            if !matches!(outcome, StopOutcome::TimedOut) {
                self.ctx.checkpoints.store.release(p);
            }
            report.stopped.push((p, outcome));
        }
        report.stopped.sort_by_key(|(p, _)| *p);
        report.took = started.elapsed();
        if !partitions.is_empty() {
            tracing::info!(
                event = "partitions_handed_back",
                why,
                partitions = ?partitions,
                not_checkpointed = ?report.not_checkpointed().collect::<Vec<_>>(),
                took_ms = report.took.as_millis() as u64,
                "handed back"
            );
        }
        report
    }

    /// Take over again the partitions still assigned here whose worker
    /// stopped on its own: after a fence once it has lasted `fenced_after`
    /// (the group would have revoked the partition by then if another
    /// member owned it; so it is this instance's, and the fence came from
    /// a zombie or a store that lost data), and at once after its
    /// checkpoints stopped (outputs failed delivery: replay from the last
    /// checkpoint). Each goes through the take-over path of
    /// [`Coordinator::assign`]: a new epoch, the last checkpoint, a new
    /// worker; the caller resumes its records at the returned offsets.
    pub fn retake_stopped<S: Source>(
        &self,
        fenced_after: Duration,
        depth: usize,
        make_source: impl Fn(&Taken, Receiver<Msg>) -> Option<S> + Sync,
    ) -> Vec<Taken> {
        let due: Vec<(i32, StoppedBecause)> = {
            let mut slots = self.slots.lock();
            let retaken = self.retaken.lock();
            let due: Vec<(i32, StoppedBecause)> = slots
                .iter()
                .filter_map(|(p, s)| match s {
                    Slot::Running(w) => {
                        let (since, why) = w.stopped_because()?;
                        let wait = match why {
                            StoppedBecause::Fenced => fenced_after,
                            // At once the first time; a delivery failure
                            // that repeats waits 1, 2, 4 … 64 s.
                            StoppedBecause::CheckpointsStopped => {
                                retake_backoff(retaken.get(p).copied().unwrap_or(0))
                            }
                        };
                        (since.elapsed() >= wait).then_some((*p, why))
                    }
                    Slot::Restoring(_) => None,
                })
                .collect();
            for (p, _) in &due {
                slots.remove(p);
            }
            due
        };
        if due.is_empty() {
            return Vec::new();
        }
        let partitions: Vec<i32> = due.iter().map(|(p, _)| *p).collect();
        for (p, why) in &due {
            let times = {
                let mut retaken = self.retaken.lock();
                let n = retaken.entry(*p).or_insert(0);
                *n = n.saturating_add(1);
                *n
            };
            self.ctx
                .metrics
                .stream
                .partitions_retaken
                .with_label_values(&[why.as_str()])
                .inc();
            tracing::warn!(
                event = "partition_retaken",
                partition = *p,
                reason = why.as_str(),
                times,
                "the partition's worker had stopped on its own while the partition is still assigned here; taking it over again from its last checkpoint"
            );
        }
        self.assign(&partitions, depth, make_source)
    }

    /// Whether this instance owns `partition` now: taken, and its worker
    /// still running (a fenced worker stops on its own).
    pub fn owns(&self, partition: i32) -> bool {
        self.owner_epoch(partition).is_some()
    }

    /// The fencing epoch this instance holds `partition` under, if it owns it.
    pub fn owner_epoch(&self, partition: i32) -> Option<u64> {
        match self.slots.lock().get(&partition)? {
            Slot::Running(w) if !w.is_finished() => Some(w.epoch()),
            _ => None,
        }
    }

    /// The partitions owned now, in order.
    pub fn owned(&self) -> Vec<i32> {
        self.slots
            .lock()
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Running(w) if !w.is_finished()))
            .map(|(p, _)| *p)
            .collect()
    }

    /// (partition, next offset) of every running worker: for lag.
    pub fn positions(&self) -> Vec<(i32, i64)> {
        self.slots
            .lock()
            .iter()
            .filter_map(|(p, s)| match s {
                Slot::Running(w) if !w.is_finished() => Some((*p, w.position())),
                _ => None,
            })
            .collect()
    }

    /// Where a synchronous check of a key of `partition` is counted, if
    /// this instance owns it and has replayed what a previous owner decided.
    pub fn sync_target(&self, partition: i32) -> Option<crate::worker::SyncTarget> {
        match self.slots.lock().get(&partition)? {
            Slot::Running(w) if !w.is_finished() => w.sync_target(),
            _ => None,
        }
    }

    /// The state of an owned partition (tests and the live page).
    pub fn store(&self, partition: i32) -> Option<Arc<KeyedStore>> {
        match self.slots.lock().get(&partition)? {
            Slot::Running(w) if !w.is_finished() => Some(w.store().clone()),
            _ => None,
        }
    }

    /// The home-side state of an owned partition: where the keys of
    /// unaligned limits homed here (`Routing::home`) are counted.
    pub fn home_store(&self, partition: i32) -> Option<Arc<KeyedStore>> {
        match self.slots.lock().get(&partition)? {
            Slot::Running(w) if !w.is_finished() => Some(w.home_store().clone()),
            _ => None,
        }
    }

    /// A sender into a channel-fed partition's worker (the embedded bus).
    pub fn sender(&self, partition: i32) -> Option<SyncSender<Msg>> {
        match self.slots.lock().get(&partition)? {
            Slot::Running(w) => Some(w.sender()),
            Slot::Restoring(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::test_support::{ctx_with, feed, wait_until, FaultyStore, HeldSink, InstantSink};
    use crate::worker::{ChannelSource, CHANNEL_DEPTH};
    use quotaflow_core::pipeline::{CheckpointStore, MemoryCheckpoints};

    const DEADLINE: Duration = Duration::from_secs(5);
    /// Long enough that only final checkpoints are written in a test.
    const NO_PERIODIC: Duration = Duration::from_secs(3600);

    fn coordinator(store: Arc<dyn CheckpointStore>, interval: Duration) -> Coordinator {
        Coordinator::new(ctx_with(Arc::new(InstantSink), store, interval), DEADLINE)
    }

    fn assign(c: &Coordinator, partitions: &[i32]) -> Vec<Taken> {
        c.assign(partitions, CHANNEL_DEPTH, |_, rx| {
            Some(ChannelSource::new(rx))
        })
    }

    /// Feed `n` events of one user into `partition` from offset `from`.
    fn feed_partition(c: &Coordinator, partition: i32, from: i64, n: i64) {
        let tx = c.sender(partition).expect("an owned partition");
        feed(
            c.context(),
            &tx,
            &format!("user-{partition}"),
            from..from + n,
        );
    }

    fn position(c: &Coordinator, partition: i32) -> Option<i64> {
        c.positions()
            .into_iter()
            .find(|(p, _)| *p == partition)
            .map(|(_, pos)| pos)
    }

    #[test]
    fn assign_restores_each_partition_at_its_checkpoint() {
        let store = Arc::new(MemoryCheckpoints::default());
        // Partition 1 was owned before and checkpointed at offset 7.
        let first = coordinator(store.clone(), NO_PERIODIC);
        assign(&first, &[1]);
        feed_partition(&first, 1, 0, 7);
        wait_until("the events", || position(&first, 1) == Some(7));
        let first_epoch = first.owner_epoch(1);
        first.revoke(&[1]);

        let c = coordinator(store.clone(), NO_PERIODIC);
        let taken = assign(&c, &[0, 1]);
        let got: Vec<(i32, Option<i64>)> =
            taken.iter().map(|t| (t.partition, t.next_offset)).collect();
        assert_eq!(got, vec![(0, None), (1, Some(7))]);
        assert!(
            Some(taken[1].epoch) > first_epoch,
            "a new owner, a newer epoch"
        );
        assert!(c.owns(0) && c.owns(1) && !c.owns(2));
        assert_eq!(c.owner_epoch(1), Some(taken[1].epoch));
        assert_eq!(c.owned(), vec![0, 1]);
        assert_eq!(c.context().metrics.stream.partitions_owned.get(), 2);
        c.revoke_all();
        assert_eq!(c.owned(), Vec::<i32>::new());
        assert_eq!(c.context().metrics.stream.partitions_owned.get(), 0);
    }

    #[test]
    fn revoke_drains_and_checkpoints_every_partition_in_parallel() {
        let store = Arc::new(FaultyStore::default());
        let c = coordinator(store.clone(), NO_PERIODIC);
        let all = [0, 1, 2, 3];
        assign(&c, &all);
        for p in all {
            feed_partition(&c, p, 0, 5 + i64::from(p));
        }
        // Each final save takes 400 ms: serially the revoke would take 1.6 s.
        store.save_delay_ms.store(400, Ordering::SeqCst);
        let report = c.revoke(&all);
        let expected: Vec<(i32, StopOutcome)> = all
            .iter()
            .map(|&p| {
                let next_offset = 5 + i64::from(p);
                (p, StopOutcome::Checkpointed { next_offset })
            })
            .collect();
        assert_eq!(report.stopped, expected);
        assert!(
            report.took < Duration::from_millis(1200),
            "{:?}",
            report.took
        );
        for p in all {
            let cp = store.inner.peek(p).unwrap().expect("a final checkpoint");
            assert_eq!(cp.next_offset, 5 + i64::from(p));
            assert!(!c.owns(p));
        }
    }

    #[test]
    fn a_revoke_waits_no_longer_than_its_deadline() {
        let store = Arc::new(FaultyStore::default());
        let deadline = Duration::from_millis(300);
        let c = Coordinator::new(
            ctx_with(Arc::new(InstantSink), store.clone(), NO_PERIODIC),
            deadline,
        );
        assign(&c, &[0, 1]);
        feed_partition(&c, 0, 0, 3);
        feed_partition(&c, 1, 0, 3);
        wait_until("the events", || {
            position(&c, 0) == Some(3) && position(&c, 1) == Some(3)
        });
        // The store hangs for 3 s on every save.
        store.save_delay_ms.store(3000, Ordering::SeqCst);
        let report = c.revoke(&[0, 1]);
        assert!(
            report.took < Duration::from_millis(800),
            "{:?}",
            report.took
        );
        assert_eq!(
            report.stopped,
            vec![(0, StopOutcome::TimedOut), (1, StopOutcome::TimedOut)]
        );
        assert_eq!(report.not_checkpointed().collect::<Vec<_>>(), vec![0, 1]);
        assert!(!c.owns(0) && !c.owns(1));
    }

    #[test]
    fn a_final_checkpoint_the_store_refuses_is_reported() {
        let store = Arc::new(FaultyStore::default());
        let c = coordinator(store.clone(), NO_PERIODIC);
        assign(&c, &[0]);
        feed_partition(&c, 0, 0, 2);
        wait_until("the events", || position(&c, 0) == Some(2));
        store.unavailable.store(true, Ordering::SeqCst);
        let report = c.revoke(&[0]);
        assert!(
            matches!(&report.stopped[..], [(0, StopOutcome::NotCheckpointed { reason })] if reason.contains("store down")),
            "{report:?}"
        );
        assert_eq!(store.inner.peek(0).unwrap(), None);
    }

    #[test]
    fn a_snapshot_the_store_dropped_is_not_reported_as_saved_at_stop() {
        let store = Arc::new(MemoryCheckpoints::default());
        let c = coordinator(store.clone(), Duration::from_millis(20));
        let taken = assign(&c, &[0]);
        // Someone saved offset 100 under our epoch: our saves now go backwards.
        let mut ahead = store.peek(0).unwrap().unwrap_or_default();
        ahead.next_offset = 100;
        store.save(0, taken[0].epoch, &ahead).unwrap();
        feed_partition(&c, 0, 0, 3);
        let failures = c
            .context()
            .metrics
            .stream
            .checkpoint_failures
            .with_label_values(&["backwards"]);
        wait_until("the refused save", || failures.get() >= 1);
        let report = c.revoke(&[0]);
        assert!(
            matches!(&report.stopped[..], [(0, StopOutcome::NotCheckpointed { reason })] if reason.contains("behind")),
            "{report:?}"
        );
    }

    #[test]
    fn a_revoke_during_restore_cancels_the_restore() {
        let store = Arc::new(FaultyStore::default());
        store.unavailable.store(true, Ordering::SeqCst);
        let c = Arc::new(coordinator(store.clone(), NO_PERIODIC));
        let assigning = {
            let c = c.clone();
            std::thread::spawn(move || assign(&c, &[0, 1]))
        };
        wait_until("restores to be tried", || {
            store.acquire_attempts.load(Ordering::SeqCst) >= 2
        });
        assert!(!c.owns(0), "restoring is not owning");
        let report = c.revoke(&[0, 1]);
        assert_eq!(report.cancelled, vec![0, 1]);
        assert!(report.stopped.is_empty());
        let taken = assigning.join().unwrap();
        assert!(taken.is_empty(), "{taken:?}");
        // The store comes back: nothing was started behind the revoke.
        store.unavailable.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.owned(), Vec::<i32>::new());
        assert_eq!(c.context().metrics.stream.partitions_owned.get(), 0);
    }

    #[test]
    fn a_restore_retries_until_the_store_answers() {
        let store = Arc::new(FaultyStore::default());
        store.unavailable.store(true, Ordering::SeqCst);
        let c = Arc::new(coordinator(store.clone(), NO_PERIODIC));
        let assigning = {
            let c = c.clone();
            std::thread::spawn(move || assign(&c, &[3]))
        };
        wait_until("a failed restore", || {
            store.acquire_attempts.load(Ordering::SeqCst) >= 2
        });
        store.unavailable.store(false, Ordering::SeqCst);
        let taken = assigning.join().unwrap();
        assert_eq!(taken.len(), 1);
        assert!(c.owns(3));
        c.revoke_all();
    }

    #[test]
    fn a_lost_partition_is_checkpointed_only_while_its_epoch_holds() {
        let store = Arc::new(MemoryCheckpoints::default());
        let c = coordinator(store.clone(), NO_PERIODIC);
        assign(&c, &[0, 1]);
        feed_partition(&c, 0, 0, 4);
        feed_partition(&c, 1, 0, 6);
        wait_until("the events", || {
            position(&c, 0) == Some(4) && position(&c, 1) == Some(6)
        });
        // Partition 1 has a new owner already; partition 0 has none yet.
        let other = coordinator(store.clone(), NO_PERIODIC);
        assign(&other, &[1]);
        let report = c.lose(&[0, 1]);
        assert_eq!(
            report.stopped[0],
            (0, StopOutcome::Checkpointed { next_offset: 4 })
        );
        assert!(
            matches!(&report.stopped[1], (1, StopOutcome::NotCheckpointed { reason }) if reason.contains("fenced")),
            "{report:?}"
        );
        assert_eq!(store.peek(0).unwrap().unwrap().next_offset, 4);
        assert_eq!(store.peek(1).unwrap(), None, "the zombie wrote nothing");
        assert!(!c.owns(0) && !c.owns(1));
        assert!(other.owns(1));
        other.revoke_all();
    }

    #[test]
    fn two_generations_racing_leave_the_partition_with_the_newer_one() {
        let store = Arc::new(MemoryCheckpoints::default());
        // Instance A owns partition 0; instance B takes it over while A is
        // still running (A has not yet been told: a zombie).
        let a = coordinator(store.clone(), Duration::from_millis(20));
        let b = coordinator(store.clone(), Duration::from_millis(20));
        assign(&a, &[0]);
        feed_partition(&a, 0, 0, 3);
        wait_until("A's checkpoint", || {
            store.peek(0).unwrap().is_some_and(|cp| cp.next_offset == 3)
        });
        let taken = assign(&b, &[0]);
        assert_eq!(taken[0].epoch, 2);
        assert_eq!(taken[0].next_offset, Some(3));
        // A processes more and tries to checkpoint: fenced, it stops.
        feed_partition(&a, 0, 3, 2);
        wait_until("A to be fenced", || !a.owns(0));
        assert_eq!(a.owner_epoch(0), None);
        assert_eq!(
            a.revoke(&[0]).stopped,
            vec![(0, StopOutcome::AlreadyStopped)]
        );
        // B goes on from A's last checkpoint, and its checkpoints count.
        feed_partition(&b, 0, 3, 4);
        wait_until("B's events", || position(&b, 0) == Some(7));
        let report = b.revoke(&[0]);
        assert!(report.not_checkpointed().next().is_none(), "{report:?}");
        assert_eq!(store.peek(0).unwrap().unwrap().next_offset, 7);
    }

    #[test]
    fn a_store_that_forgot_is_reseeded_from_the_live_state() {
        let store = Arc::new(MemoryCheckpoints::default());
        let c = coordinator(store.clone(), Duration::from_millis(20));
        let taken = assign(&c, &[0]);
        feed_partition(&c, 0, 0, 3);
        wait_until("the first checkpoint", || {
            store.peek(0).unwrap().is_some_and(|cp| cp.next_offset == 3)
        });
        // Redis restarted without its data.
        store.forget();
        feed_partition(&c, 0, 3, 2);
        wait_until("the re-seeded checkpoint", || {
            store.peek(0).unwrap().is_some_and(|cp| cp.next_offset == 5)
        });
        assert_eq!(c.context().metrics.stream.checkpoint_reseeds.get(), 1);
        let epoch = c.owner_epoch(0).expect("still owned");
        assert!(epoch > taken[0].epoch, "a new epoch: {epoch}");
        // It keeps checkpointing under the new epoch, and its state is whole.
        feed_partition(&c, 0, 5, 1);
        let report = c.revoke(&[0]);
        assert_eq!(
            report.stopped,
            vec![(0, StopOutcome::Checkpointed { next_offset: 6 })]
        );
        let cp = store.peek(0).unwrap().unwrap();
        assert_eq!(cp.keys.len(), 1, "user-0's state survived the loss");
    }

    #[test]
    fn a_zombie_cannot_reseed_over_the_new_owner_after_a_loss() {
        let (store, zombie, owner) = zombie_and_owner_after_a_loss();
        // The owner notices first and re-seeds; the zombie's save then meets
        // an epoch above its own: fenced, never forgotten.
        feed_partition(&owner, 0, 4, 1);
        wait_until("the re-seed", || {
            owner.context().metrics.stream.checkpoint_reseeds.get() == 1
        });
        let report = zombie.revoke(&[0]);
        assert!(
            matches!(&report.stopped[..], [(0, StopOutcome::NotCheckpointed { reason })] if reason.contains("fenced")),
            "{report:?}"
        );
        assert_eq!(zombie.context().metrics.stream.checkpoint_reseeds.get(), 0);
        assert_eq!(store.peek(0).unwrap().unwrap().next_offset, 5);
        owner.revoke_all();
    }

    /// A zombie that processed two events (never checkpointed) and the new
    /// owner of its partition, checkpointed at 4; then the store forgets.
    fn zombie_and_owner_after_a_loss() -> (Arc<MemoryCheckpoints>, Coordinator, Coordinator) {
        let store = Arc::new(MemoryCheckpoints::default());
        let zombie = coordinator(store.clone(), NO_PERIODIC);
        let owner = coordinator(store.clone(), Duration::from_millis(20));
        assign(&zombie, &[0]);
        feed_partition(&zombie, 0, 0, 2);
        wait_until("the zombie's events", || position(&zombie, 0) == Some(2));
        assign(&owner, &[0]);
        feed_partition(&owner, 0, 0, 4);
        wait_until("the owner's checkpoint", || {
            store.peek(0).unwrap().is_some_and(|cp| cp.next_offset == 4)
        });
        store.forget();
        (store, zombie, owner)
    }

    /// The other order, after a total loss: the zombie saves first. Its
    /// re-seed cannot be told from a true owner's (the store holds nothing
    /// to compare), so the owner is fenced and takes the partition over
    /// again from the zombie's older checkpoint — a replay, not a miscount.
    #[test]
    fn a_zombie_that_reseeds_first_costs_the_owner_a_replay_only() {
        let (_store, zombie, owner) = zombie_and_owner_after_a_loss();
        let report = zombie.revoke(&[0]);
        assert_eq!(
            report.stopped,
            vec![(0, StopOutcome::Checkpointed { next_offset: 2 })]
        );
        feed_partition(&owner, 0, 4, 1);
        wait_until("the owner to be fenced", || !owner.owns(0));
        let taken = assign_stopped(&owner, Duration::ZERO);
        assert_eq!(taken.len(), 1);
        assert_eq!(
            taken[0].next_offset,
            Some(2),
            "replays from the zombie's checkpoint"
        );
        owner.revoke_all();
    }

    #[test]
    fn a_fenced_partition_still_assigned_here_is_taken_over_again() {
        let store = Arc::new(MemoryCheckpoints::default());
        let a = coordinator(store.clone(), Duration::from_millis(20));
        let b = coordinator(store.clone(), Duration::from_millis(20));
        assign(&a, &[0]);
        assign(&b, &[0]);
        feed_partition(&b, 0, 0, 3);
        wait_until("b's checkpoint", || {
            store.peek(0).unwrap().is_some_and(|cp| cp.next_offset == 3)
        });
        b.revoke(&[0]);
        // A's worker meets b's newer epoch and stops; the group still says
        // the partition is A's, so A takes it over again.
        feed_partition(&a, 0, 0, 1);
        wait_until("a to be fenced", || !a.owns(0));
        assert!(
            assign_stopped(&a, Duration::from_secs(60)).is_empty(),
            "not before the grace"
        );
        let taken = assign_stopped(&a, Duration::ZERO);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].next_offset, Some(3), "from b's checkpoint");
        assert!(a.owns(0));
        assert_eq!(
            a.context()
                .metrics
                .stream
                .partitions_retaken
                .with_label_values(&["fenced"])
                .get(),
            1
        );
        a.revoke_all();
    }

    #[test]
    fn a_partition_whose_outputs_failed_is_taken_over_again_at_once() {
        let store = Arc::new(MemoryCheckpoints::default());
        let sink = Arc::new(HeldSink::default());
        let c = Coordinator::new(
            ctx_with(sink.clone(), store.clone(), Duration::from_millis(20)),
            DEADLINE,
        );
        assign(&c, &[0]);
        // Three events of one user: the second is refused (a BLOCK decision).
        feed_partition(&c, 0, 0, 3);
        wait_until("the decision", || !sink.held.lock().is_empty());
        sink.settle(false);
        wait_until("the worker to give up", || !c.owns(0));
        let taken = assign_stopped(&c, Duration::from_secs(3600));
        assert_eq!(taken.len(), 1, "no grace for failed deliveries");
        assert_eq!(taken[0].next_offset, None, "replayed from the start");
        assert!(c.owns(0));
        c.revoke_all();
    }

    #[test]
    fn repeated_delivery_failures_are_retaken_less_and_less_often() {
        let waits: Vec<u64> = (0..9).map(|n| retake_backoff(n).as_secs()).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 32, 64, 64]);
    }

    fn assign_stopped(c: &Coordinator, fenced_after: Duration) -> Vec<Taken> {
        c.retake_stopped(fenced_after, CHANNEL_DEPTH, |_, rx| {
            Some(ChannelSource::new(rx))
        })
    }

    #[test]
    fn assigning_an_owned_partition_hands_the_old_generation_back_first() {
        let store = Arc::new(MemoryCheckpoints::default());
        let c = coordinator(store.clone(), NO_PERIODIC);
        assign(&c, &[0]);
        feed_partition(&c, 0, 0, 5);
        wait_until("the events", || position(&c, 0) == Some(5));
        let taken = assign(&c, &[0]);
        assert_eq!(
            taken,
            vec![Taken {
                partition: 0,
                epoch: 2,
                next_offset: Some(5),
                home_offset: Some(0),
            }]
        );
        assert_eq!(c.owner_epoch(0), Some(2));
        assert_eq!(c.context().metrics.stream.partitions_owned.get(), 1);
        c.revoke_all();
    }
}
