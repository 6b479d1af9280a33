//! A partition worker's checkpointer thread: it saves the snapshots the
//! worker hands it, once the outputs they cover are delivered, retrying
//! while the store is unavailable, so the worker keeps deciding meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quotaflow_core::pipeline::delivery::Settled;
use quotaflow_core::pipeline::{Checkpoint, CheckpointError, Delivery};

use super::{Progress, StopOutcome, WorkerContext};

/// Bound on each wait for a checkpoint's outputs to be delivered.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before retrying a checkpoint the store refused (e.g. Redis down).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often the worker's progress is marked between checkpoints: the
/// granularity of `outputs_republished_total` after a crash.
const MARK_EVERY: Duration = Duration::from_millis(250);

enum Job {
    /// Save this snapshot; its ticket says so once it is saved (or dropped).
    Save(Box<Checkpoint>, Arc<Delivery>, u64),
    /// Save this last snapshot (or retry the one still pending), then stop.
    Final(Option<(Box<Checkpoint>, Arc<Delivery>)>),
    /// Stop without saving anything more.
    Abandon,
}

/// The worker's handle on its checkpointer thread.
pub(super) struct Checkpointer {
    tx: Option<SyncSender<Job>>,
    flags: Arc<Flags>,
    /// The ticket of the last snapshot submitted.
    tickets: u64,
    join: Option<JoinHandle<StopOutcome>>,
}

impl Checkpointer {
    pub(super) fn spawn(
        ctx: Arc<WorkerContext>,
        partition: i32,
        epoch: Arc<AtomicU64>,
        progress: Arc<Progress>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(1);
        let flags = Arc::new(Flags::default());
        let theirs = flags.clone();
        let join = std::thread::Builder::new()
            .name(format!("quotaflow-cp{partition}"))
            .spawn(move || checkpoints(ctx, partition, &epoch, &progress, rx, &theirs))?;
        Ok(Self {
            tx: Some(tx),
            flags,
            tickets: 0,
            join: Some(join),
        })
    }

    /// Whether a new snapshot would be taken up now; while one is still
    /// being saved, or once none can be saved any more, the worker does not
    /// copy its state again.
    pub(super) fn idle(&self) -> bool {
        !self.flags.busy.load(Ordering::SeqCst) && !self.stopped()
    }

    pub(super) fn stopped(&self) -> bool {
        self.flags.stopped.load(Ordering::SeqCst)
    }

    pub(super) fn fenced(&self) -> bool {
        self.flags.fenced.load(Ordering::SeqCst)
    }

    /// Hand `cp` over to be saved once `generation` (and every earlier
    /// one) is delivered; its ticket, for [`Checkpointer::fate`].
    pub(super) fn submit(&mut self, cp: Checkpoint, generation: Arc<Delivery>) -> u64 {
        self.tickets += 1;
        self.flags.busy.store(true, Ordering::SeqCst);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Save(Box::new(cp), generation, self.tickets));
        }
        self.tickets
    }

    /// What became of the snapshot of `ticket`, if it is settled: saved,
    /// or dropped (the store refused it for good). A snapshot being
    /// retried (Redis unavailable, outputs not yet delivered) is neither.
    pub(super) fn fate(&self, ticket: u64) -> Option<Fate> {
        if self.flags.saved.load(Ordering::SeqCst) >= ticket {
            Some(Fate::Saved)
        } else if self.flags.dropped.load(Ordering::SeqCst) >= ticket {
            Some(Fate::Dropped)
        } else {
            None
        }
    }

    /// Save `last` (or whatever is still pending), wait for the thread and
    /// say how the final save went.
    pub(super) fn finish(self, last: Option<(Checkpoint, Arc<Delivery>)>) -> StopOutcome {
        self.end(Job::Final(last.map(|(cp, d)| (Box::new(cp), d))))
    }

    /// Stop the thread without saving anything more.
    pub(super) fn abandon(self) {
        self.end(Job::Abandon);
    }

    fn end(mut self, job: Job) -> StopOutcome {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(job);
        }
        match self.join.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            _ => StopOutcome::NotCheckpointed {
                reason: "the checkpointer thread panicked".into(),
            },
        }
    }
}

/// What became of a snapshot handed to the checkpointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    Saved,
    Dropped,
}

/// What the checkpointer thread tells its worker.
#[derive(Default)]
struct Flags {
    /// The ticket of the last snapshot saved: a worker moving to another
    /// config version waits for its checkpoint to be saved first.
    saved: AtomicU64,
    /// The ticket of the last snapshot the store refused for good.
    dropped: AtomicU64,
    /// A snapshot is being saved (or retried): take no new one.
    busy: AtomicBool,
    /// Another instance owns the partition now.
    fenced: AtomicBool,
    /// Outputs failed delivery: no snapshot will ever be saved again.
    stopped: AtomicBool,
}

fn checkpoints(
    ctx: Arc<WorkerContext>,
    partition: i32,
    epoch: &AtomicU64,
    progress: &Progress,
    rx: Receiver<Job>,
    flags: &Flags,
) -> StopOutcome {
    let Flags {
        saved,
        dropped,
        busy,
        fenced,
        stopped,
    } = flags;
    // A re-seed is under way (its answer was lost): retry it, not a save.
    let reseeding = &AtomicBool::new(false);
    // Delivery generations not yet known to be settled, oldest first: a
    // snapshot is saved only once all of them are, since it covers them all.
    let mut unsettled: Vec<Arc<Delivery>> = Vec::new();
    let mut pending: Option<Box<Checkpoint>> = None;
    // The ticket of the snapshot in hand (0: a final one, which no worker
    // waits for).
    let mut ticket = 0;
    // Why the newest snapshot was not saved, when it was dropped: a final
    // job with nothing new must not report the state as saved.
    let mut unsaved: Option<String> = None;
    let mut marked = progress.position.load(Ordering::Relaxed);
    loop {
        // How this job's save went: what a final job reports.
        let mut outcome = StopOutcome::Clean;
        let job = match &pending {
            Some(_) => rx.recv_timeout(RETRY_AFTER),
            // Idle: mark the worker's progress while waiting for a job.
            None => loop {
                match rx.recv_timeout(MARK_EVERY) {
                    Err(RecvTimeoutError::Timeout) => {
                        let at = progress.position.load(Ordering::Relaxed);
                        if at > marked && !stopped.load(Ordering::SeqCst) {
                            match ctx.checkpoints.store.mark_progress(partition, at) {
                                Ok(()) => marked = at,
                                Err(e) => {
                                    tracing::debug!(event = "progress_mark_failed", partition, error = %e)
                                }
                            }
                        }
                    }
                    other => break other,
                }
            },
        };
        let (cp, last) = match job {
            Ok(Job::Save(cp, generation, t)) => {
                unsettled.push(generation);
                ticket = t;
                (Some(cp), false)
            }
            Ok(Job::Final(Some((cp, generation)))) => {
                unsettled.push(generation);
                ticket = 0;
                (Some(cp), true)
            }
            Ok(Job::Final(None)) => {
                if let Some(reason) = unsaved.take().filter(|_| pending.is_none()) {
                    outcome = StopOutcome::NotCheckpointed { reason };
                }
                (pending.take(), true)
            }
            Ok(Job::Abandon) => return StopOutcome::AlreadyStopped,
            Err(RecvTimeoutError::Timeout) => {
                // Retrying on our own: the worker must not hand over a new
                // snapshot meanwhile.
                busy.store(true, Ordering::SeqCst);
                (pending.take(), false)
            }
            Err(RecvTimeoutError::Disconnected) => return outcome,
        };
        if stopped.load(Ordering::SeqCst) {
            unsettled.clear();
            if last {
                outcome = StopOutcome::NotCheckpointed {
                    reason: "outputs failed delivery earlier; no checkpoint may cover them".into(),
                };
            }
        } else if let Some(cp) = cp {
            pending = None;
            let next_offset = cp.next_offset;
            match save(&ctx, partition, epoch, reseeding, &cp, &mut unsettled) {
                Saved::Yes => {
                    saved.fetch_max(ticket, Ordering::SeqCst);
                    unsaved = None;
                    outcome = StopOutcome::Checkpointed { next_offset };
                }
                Saved::Dropped(reason) => {
                    dropped.fetch_max(ticket, Ordering::SeqCst);
                    unsaved = Some(reason.clone());
                    outcome = StopOutcome::NotCheckpointed { reason };
                }
                Saved::Retry(reason) => {
                    pending = Some(cp);
                    outcome = StopOutcome::NotCheckpointed { reason };
                }
                Saved::Stopped => {
                    stopped.store(true, Ordering::SeqCst);
                    outcome = StopOutcome::NotCheckpointed {
                        reason: "outputs failed delivery".into(),
                    };
                }
                Saved::Fenced => {
                    fenced.store(true, Ordering::SeqCst);
                    busy.store(false, Ordering::SeqCst);
                    // The worker stops on its own; a final job may still come.
                    let _ = rx.recv();
                    return StopOutcome::NotCheckpointed {
                        reason: "fenced: the partition has a newer owner".into(),
                    };
                }
            }
        }
        busy.store(false, Ordering::SeqCst);
        if last {
            return outcome;
        }
    }
}

/// The store lost this partition's epoch (and probably its checkpoint):
/// write the live state's snapshot again under a new epoch, so the
/// partition neither stalls nor loses what it counted.
fn reseed(
    ctx: &WorkerContext,
    partition: i32,
    epoch: &AtomicU64,
    reseeding: &AtomicBool,
    ours: u64,
    current: u64,
    cp: &Checkpoint,
) -> Result<(), CheckpointError> {
    reseeding.store(true, Ordering::SeqCst);
    let result = ctx.checkpoints.store.reseed(partition, ours, cp);
    if !matches!(result, Err(CheckpointError::Unavailable(_))) {
        reseeding.store(false, Ordering::SeqCst);
    }
    let new = result?;
    epoch.store(new, Ordering::SeqCst);
    ctx.metrics.stream.checkpoint_reseeds.inc();
    tracing::error!(
        event = "checkpoint_store_forgot",
        partition,
        epoch = ours,
        store_epoch = current,
        new_epoch = new,
        next_offset = cp.next_offset,
        keys = cp.keys.len(),
        "the checkpoint store lost this partition's epoch (Redis restarted without its data, flushed, or failed over to a replica behind); re-seeded it from the live state under a new epoch"
    );
    Ok(())
}

enum Saved {
    Yes,
    /// Not written (why); try again with this snapshot unless a newer one comes.
    Retry(String),
    /// Not written (why) and not worth retrying.
    Dropped(String),
    /// Outputs failed delivery: no checkpoint is written from now on.
    Stopped,
    Fenced,
}

/// Wait for every unsettled delivery generation, then write `cp`.
fn save(
    ctx: &WorkerContext,
    partition: i32,
    epoch: &AtomicU64,
    reseeding: &AtomicBool,
    cp: &Checkpoint,
    unsettled: &mut Vec<Arc<Delivery>>,
) -> Saved {
    let m = &ctx.metrics.stream;
    for generation in unsettled.iter() {
        match generation.wait(DELIVERY_TIMEOUT) {
            Settled::Delivered => {}
            Settled::Pending(n) => {
                m.checkpoint_failures.with_label_values(&["flush"]).inc();
                tracing::warn!(
                    event = "checkpoint_skipped",
                    partition,
                    in_flight = n,
                    "outputs not yet delivered; checkpoint postponed"
                );
                return Saved::Retry(format!("{n} outputs not yet delivered"));
            }
            Settled::Failed(n) => {
                m.checkpoint_failures.with_label_values(&["flush"]).inc();
                tracing::error!(event = "checkpoint_stopped", partition, failed = n, "outputs failed delivery; no checkpoint will cover them, so a restart replays them");
                return Saved::Stopped;
            }
        }
    }
    unsettled.clear();
    let started = Instant::now();
    let ours = epoch.load(Ordering::SeqCst);
    // A re-seed whose answer was lost is retried as a re-seed: as a save
    // it would meet its own new epoch and read it as a fence.
    let saved = if reseeding.load(Ordering::SeqCst) {
        reseed(ctx, partition, epoch, reseeding, ours, 0, cp)
    } else {
        match ctx.checkpoints.store.save(partition, ours, cp) {
            Err(CheckpointError::Forgotten { current, .. }) => {
                reseed(ctx, partition, epoch, reseeding, ours, current, cp)
            }
            other => other,
        }
    };
    match saved {
        Ok(()) => {
            m.checkpoint_duration
                .observe(started.elapsed().as_secs_f64());
            m.checkpoint_last_success
                .set((crate::clock::now_ms() / 1000) as i64);
            tracing::debug!(
                event = "checkpoint",
                partition,
                next_offset = cp.next_offset,
                keys = cp.keys.len(),
                save_ms = started.elapsed().as_millis() as u64
            );
            Saved::Yes
        }
        Err(e @ CheckpointError::Fenced { .. }) => {
            m.checkpoint_failures.with_label_values(&["fenced"]).inc();
            tracing::warn!(event = "checkpoint_fenced", partition, error = %e, "partition taken by another instance; stopping its worker");
            Saved::Fenced
        }
        Err(e) => {
            let (reason, outcome) = match e {
                CheckpointError::Unavailable(_) => ("unavailable", Saved::Retry(e.to_string())),
                CheckpointError::Backwards { .. } => ("backwards", Saved::Dropped(e.to_string())),
                _ => ("corrupt", Saved::Dropped(e.to_string())),
            };
            m.checkpoint_failures.with_label_values(&[reason]).inc();
            tracing::warn!(event = "checkpoint_failed", partition, error = %e, "checkpoint not written; will retry");
            outcome
        }
    }
}
