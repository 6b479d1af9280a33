//! One thread per owned partition: decode, process, publish; and beside it
//! one checkpointer thread that saves the partition's snapshots.
//!
//! The same worker serves Kafka partitions and the embedded bus; only the
//! [`Source`] feeding it, the sink and the checkpoint store differ. Saving
//! a checkpoint waits for the outputs it covers to be delivered and for
//! Redis; both happen on the checkpointer thread, so the worker keeps
//! deciding while a checkpoint is in flight. The worker only takes the
//! snapshot (a copy of the state) and starts a new delivery generation.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::avro::Codec;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::pipeline::delivery::Settled;
use crate::pipeline::partition::InputRecord;
use crate::pipeline::records::{Action, RequestEvent};
use crate::pipeline::{
    Checkpoint, CheckpointError, CheckpointStore, Delivery, Output, OutputSink, PartitionProcessor,
    ProcessorConfig,
};
use crate::state::KeyedStore;

/// One record from the source, owned so it can cross threads.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    pub broker_ts_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// What reaches a worker through its channel: records (the embedded bus)
/// and the stop request (every source).
pub enum Msg {
    Record(Record),
    Stop(SyncSender<()>),
}

/// What a source saw while the worker waited on it.
pub enum Control {
    Continue,
    /// Drain, write a final checkpoint, acknowledge and stop.
    Stop(SyncSender<()>),
    /// The feeding side is gone: write a final checkpoint and stop.
    Closed,
}

/// Where a partition's records come from. `poll` waits at most `timeout`
/// for records and lends each, in offset order and without a copy, to `f`.
pub trait Source: Send + 'static {
    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(InputRecord<'_>)) -> Control;
}

/// Records pushed through the worker's own channel (the embedded bus).
pub struct ChannelSource(Receiver<Msg>);

impl Source for ChannelSource {
    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(InputRecord<'_>)) -> Control {
        let mut next = self.0.recv_timeout(timeout);
        loop {
            match next {
                Ok(Msg::Record(r)) => f(InputRecord {
                    offset: r.offset,
                    broker_ts_ms: r.broker_ts_ms,
                    key: r.key.as_deref(),
                    payload: &r.payload,
                }),
                Ok(Msg::Stop(ack)) => return Control::Stop(ack),
                Err(RecvTimeoutError::Timeout) => return Control::Continue,
                Err(RecvTimeoutError::Disconnected) => return Control::Closed,
            }
            next = match self.0.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Empty) => return Control::Continue,
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            };
        }
    }
}

/// Everything the workers of one process share.
pub struct Shared {
    pub limiter: Arc<Limiter>,
    pub codec: Arc<Codec>,
    pub sink: Arc<dyn OutputSink>,
    pub checkpoints: Arc<dyn CheckpointStore>,
    pub metrics: Arc<Metrics>,
    pub processor: Arc<ProcessorConfig>,
    pub checkpoint_interval: Duration,
    pub shards: usize,
    /// The partitions owned now and their state: the sync path and the
    /// metrics read it; only the owning worker writes events into it.
    pub owned: RwLock<std::collections::BTreeMap<i32, Arc<KeyedStore>>>,
}

/// Bound on how long a revoke or shutdown waits for a worker's final checkpoint.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each wait for a checkpoint's outputs to be delivered.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before retrying a checkpoint the store refused (e.g. Redis down).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Records buffered per partition between the embedded bus and its worker.
pub const CHANNEL_DEPTH: usize = 4096;

/// A running partition worker.
pub struct Worker {
    partition: i32,
    tx: SyncSender<Msg>,
    position: Arc<AtomicI64>,
    join: Option<JoinHandle<()>>,
}

impl Worker {
    /// Take `partition` at `epoch`, resuming from `restored`, reading from
    /// the source `make_source` builds around the worker's channel (of
    /// `depth` messages).
    pub fn spawn<S: Source>(
        shared: Arc<Shared>,
        partition: i32,
        epoch: u64,
        restored: Option<Checkpoint>,
        depth: usize,
        make_source: impl FnOnce(Receiver<Msg>) -> S,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(depth);
        let source = make_source(rx);
        let start = restored.as_ref().map_or(0, |c| c.next_offset);
        let position = Arc::new(AtomicI64::new(start));
        let checkpointer = Checkpointer::spawn(shared.clone(), partition, epoch)?;
        let pos = position.clone();
        let join = std::thread::Builder::new()
            .name(format!("quotaflow-p{partition}"))
            .spawn(move || run(shared, partition, restored, source, pos, checkpointer))?;
        Ok(Self {
            partition,
            tx,
            position,
            join: Some(join),
        })
    }

    /// A worker fed through its channel by [`Worker::send`].
    pub fn spawn_channel(
        shared: Arc<Shared>,
        partition: i32,
        epoch: u64,
        restored: Option<Checkpoint>,
    ) -> std::io::Result<Self> {
        Self::spawn(
            shared,
            partition,
            epoch,
            restored,
            CHANNEL_DEPTH,
            ChannelSource,
        )
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The offset of the next record the worker expects.
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::Relaxed)
    }

    /// Whether the worker has stopped on its own (it was fenced).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Hand a record to a channel-fed worker (blocks while its queue is
    /// full). `false` when the worker has stopped, e.g. because it was fenced.
    pub fn send(&self, record: Record) -> bool {
        self.tx.send(Msg::Record(record)).is_ok()
    }

    /// Finish the records in hand (a channel-fed worker: everything already
    /// queued), write a final checkpoint and stop.
    pub fn stop(mut self, timeout: Duration) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Stop(ack_tx)).is_ok() && ack_rx.recv_timeout(timeout).is_err() {
            tracing::warn!(
                event = "worker_stop_timeout",
                partition = self.partition,
                "partition worker did not stop in time"
            );
            return;
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn run<S: Source>(
    shared: Arc<Shared>,
    partition: i32,
    restored: Option<Checkpoint>,
    mut source: S,
    position: Arc<AtomicI64>,
    checkpointer: Checkpointer,
) {
    let store = Arc::new(KeyedStore::new(shared.shards));
    let mut proc =
        PartitionProcessor::new(shared.processor.clone(), partition, store.clone(), restored);
    if proc.foreign_keys() > 0 {
        tracing::error!(
            event = "checkpoint_key_mismatch",
            partition,
            keys = proc.foreign_keys(),
            "the checkpoint's key ids were made under another security.fingerprint_key: \
             its counts restart from zero (offsets and open alerts are kept); set the same \
             fingerprint_key on every instance"
        );
    }
    shared.owned.write().insert(partition, store);
    shared
        .metrics
        .stream
        .partitions_owned
        .set(shared.owned.read().len() as i64);
    let label = partition.to_string();
    let consumed = shared
        .metrics
        .stream
        .events_consumed
        .with_label_values(&[&label]);
    // Where a restored partition must resume: a first record beyond it
    // means events were lost before we read them (retention deleted them
    // and the consumer reset to the earliest offset left).
    let mut resume_at = (proc.next_offset() > 0).then(|| proc.next_offset());
    let mut out = Vec::new();
    // Every record is decoded into this one event, reusing its strings.
    let mut decoded = RequestEvent::default();
    let mut delivery = Arc::new(Delivery::default());
    // Partitions start their checkpoint timers out of phase (spread over
    // the interval by the golden ratio), so that partitions assigned
    // together do not all snapshot and save at the same moment.
    let phase = shared
        .checkpoint_interval
        .mul_f64((f64::from(partition.unsigned_abs()) * 0.618_033_988_749_895).fract());
    let mut last_checkpoint = Instant::now()
        .checked_sub(phase)
        .unwrap_or_else(Instant::now);
    let mut dirty = false;
    let end = loop {
        let wait = shared
            .checkpoint_interval
            .saturating_sub(last_checkpoint.elapsed());
        let control = source.poll(wait, &mut |r| {
            if let Some(at) = resume_at.take().filter(|&at| r.offset > at) {
                let skipped = r.offset - at;
                shared
                    .metrics
                    .stream
                    .offsets_skipped
                    .with_label_values(&[&label])
                    .inc_by(skipped as u64);
                tracing::error!(event = "offsets_skipped", partition, from = at, to = r.offset, skipped, "events after the checkpoint are gone from the topic (retention?); resuming at the first one left");
            }
            let event = shared
                .codec
                .decode_request_into(r.payload, &mut decoded)
                .map(|()| &decoded)
                .map_err(|e| format!("undecodable: {e}"));
            proc.process(&shared.limiter, r, event, &mut out);
            position.store(r.offset + 1, Ordering::Relaxed);
            consumed.inc();
            if !out.is_empty() {
                count_outputs(&shared.metrics, &out);
                publish(&shared, partition, &out, &delivery);
                out.clear();
            }
            dirty = true;
        });
        match control {
            Control::Continue => {}
            Control::Stop(ack) => break End::Stop(ack),
            Control::Closed => break End::Closed,
        }
        if checkpointer.fenced() {
            break End::Fenced;
        }
        if last_checkpoint.elapsed() >= shared.checkpoint_interval {
            last_checkpoint = Instant::now();
            shared.metrics.keys_expired.inc_by(proc.take_expired());
            if dirty && checkpointer.idle() {
                let generation = std::mem::take(&mut delivery);
                checkpointer.submit(proc.checkpoint(shared.limiter.rules().version), generation);
                dirty = false;
            }
        }
    };
    match end {
        End::Fenced => {
            // Another instance owns the partition now: our state goes, and
            // the source stops feeding us (sends fail once it is dropped).
            drop(source);
            checkpointer.finish(None);
        }
        End::Stop(_) | End::Closed => {
            let last = (dirty && !checkpointer.stopped()).then(|| {
                let cp = proc.checkpoint(shared.limiter.rules().version);
                (cp, std::mem::take(&mut delivery))
            });
            checkpointer.finish(last);
        }
    }
    if let End::Stop(ack) = end {
        let _ = ack.send(());
    }
    shared.owned.write().remove(&partition);
    shared
        .metrics
        .stream
        .partitions_owned
        .set(shared.owned.read().len() as i64);
    shared
        .metrics
        .stream
        .partition_lag
        .remove_label_values(&[&label])
        .ok();
}

enum End {
    Stop(SyncSender<()>),
    Closed,
    Fenced,
}

enum Job {
    Save(Box<Checkpoint>, Arc<Delivery>),
    /// Save this last snapshot (or retry the one still pending), then stop.
    Final(Option<(Box<Checkpoint>, Arc<Delivery>)>),
}

/// The worker's handle on its checkpointer thread.
struct Checkpointer {
    tx: Option<SyncSender<Job>>,
    flags: Arc<Flags>,
    join: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn spawn(shared: Arc<Shared>, partition: i32, epoch: u64) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(1);
        let flags = Arc::new(Flags::default());
        let theirs = flags.clone();
        let join = std::thread::Builder::new()
            .name(format!("quotaflow-cp{partition}"))
            .spawn(move || checkpoints(shared, partition, epoch, rx, &theirs))?;
        Ok(Self {
            tx: Some(tx),
            flags,
            join: Some(join),
        })
    }

    /// Whether a new snapshot would be taken up now; while one is still
    /// being saved, or once none can be saved any more, the worker does not
    /// copy its state again.
    fn idle(&self) -> bool {
        !self.flags.busy.load(Ordering::SeqCst) && !self.stopped()
    }

    fn stopped(&self) -> bool {
        self.flags.stopped.load(Ordering::SeqCst)
    }

    fn fenced(&self) -> bool {
        self.flags.fenced.load(Ordering::SeqCst)
    }

    fn submit(&self, cp: Checkpoint, generation: Arc<Delivery>) {
        self.flags.busy.store(true, Ordering::SeqCst);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Save(Box::new(cp), generation));
        }
    }

    /// Save `last` (or whatever is still pending) and wait for the thread.
    fn finish(mut self, last: Option<(Checkpoint, Arc<Delivery>)>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Job::Final(last.map(|(cp, d)| (Box::new(cp), d))));
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// What the checkpointer thread tells its worker.
#[derive(Default)]
struct Flags {
    /// A snapshot is being saved (or retried): take no new one.
    busy: AtomicBool,
    /// Another instance owns the partition now.
    fenced: AtomicBool,
    /// Outputs failed delivery: no snapshot will ever be saved again.
    stopped: AtomicBool,
}

fn checkpoints(shared: Arc<Shared>, partition: i32, epoch: u64, rx: Receiver<Job>, flags: &Flags) {
    let Flags {
        busy,
        fenced,
        stopped,
    } = flags;
    // Delivery generations not yet known to be settled, oldest first: a
    // snapshot is saved only once all of them are, since it covers them all.
    let mut unsettled: Vec<Arc<Delivery>> = Vec::new();
    let mut pending: Option<Box<Checkpoint>> = None;
    loop {
        let job = match &pending {
            Some(_) => rx.recv_timeout(RETRY_AFTER),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let (cp, last) = match job {
            Ok(Job::Save(cp, generation)) => {
                unsettled.push(generation);
                (Some(cp), false)
            }
            Ok(Job::Final(Some((cp, generation)))) => {
                unsettled.push(generation);
                (Some(cp), true)
            }
            Ok(Job::Final(None)) => (pending.take(), true),
            Err(RecvTimeoutError::Timeout) => {
                // Retrying on our own: the worker must not hand over a new
                // snapshot meanwhile.
                busy.store(true, Ordering::SeqCst);
                (pending.take(), false)
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if stopped.load(Ordering::SeqCst) {
            unsettled.clear();
        } else if let Some(cp) = cp {
            pending = None;
            match save(&shared, partition, epoch, &cp, &mut unsettled) {
                Saved::Yes | Saved::Dropped => {}
                Saved::Retry => pending = Some(cp),
                Saved::Stopped => {
                    stopped.store(true, Ordering::SeqCst);
                    shared.metrics.stream.checkpoints_stopped.inc();
                }
                Saved::Fenced => {
                    fenced.store(true, Ordering::SeqCst);
                    busy.store(false, Ordering::SeqCst);
                    // The worker stops on its own; a final job may still come.
                    let _ = rx.recv();
                    return;
                }
            }
        }
        busy.store(false, Ordering::SeqCst);
        if last {
            break;
        }
    }
    if stopped.load(Ordering::SeqCst) {
        // The partition leaves this instance: its replay is the new owner's.
        shared.metrics.stream.checkpoints_stopped.dec();
    }
}

enum Saved {
    Yes,
    /// Not written; try again with this snapshot unless a newer one comes.
    Retry,
    /// Not written and not worth retrying.
    Dropped,
    /// Outputs failed delivery: no checkpoint is written from now on.
    Stopped,
    Fenced,
}

/// Wait for every unsettled delivery generation, then write `cp`.
fn save(
    shared: &Shared,
    partition: i32,
    epoch: u64,
    cp: &Checkpoint,
    unsettled: &mut Vec<Arc<Delivery>>,
) -> Saved {
    let m = &shared.metrics.stream;
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
                return Saved::Retry;
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
    match shared.checkpoints.save(partition, epoch, cp) {
        Ok(()) => {
            m.checkpoint_duration
                .observe(started.elapsed().as_secs_f64());
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
                CheckpointError::Unavailable(_) => ("unavailable", Saved::Retry),
                CheckpointError::Backwards { .. } => ("backwards", Saved::Dropped),
                _ => ("corrupt", Saved::Dropped),
            };
            m.checkpoint_failures.with_label_values(&[reason]).inc();
            tracing::warn!(event = "checkpoint_failed", partition, error = %e, "checkpoint not written; will retry");
            outcome
        }
    }
}

fn publish(shared: &Shared, partition: i32, out: &[Output], delivery: &Arc<Delivery>) {
    // A sink refuses only when it cannot queue; keep trying, the source is
    // backpressured meanwhile and nothing is dropped. Outputs queued before
    // a refusal are queued again: their deterministic ids make the copies
    // recognisable.
    let mut backoff = Duration::from_millis(5);
    while let Err(e) = shared.sink.publish(partition, out, delivery) {
        tracing::warn!(event = "publish_retry", partition, error = %e, "output sink refused; retrying");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

fn count_outputs(metrics: &Metrics, out: &[Output]) {
    let m = &metrics.stream;
    for o in out {
        match o {
            Output::Decision(d) => {
                let action = match d.action {
                    Action::Block => "block",
                    Action::Unblock => "unblock",
                    Action::Allow => "allow",
                    Action::Deny => "deny",
                };
                m.decisions.with_label_values(&[action]).inc();
            }
            Output::Alert(a) => {
                let sev = match a.severity {
                    crate::pipeline::records::Severity::Warning => "warning",
                    crate::pipeline::records::Severity::Critical => "critical",
                };
                m.alerts.with_label_values(&[sev]).inc();
            }
            Output::DeadLetter { reason, .. } => {
                let kind = if reason.starts_with("undecodable") {
                    "decode"
                } else {
                    "invalid"
                };
                m.dead_letters.with_label_values(&[kind]).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprinter;
    use crate::pipeline::records::RequestEvent;
    use crate::pipeline::{MemoryCheckpoints, SinkError};
    use crate::rules::RulesDoc;
    use crate::stream::avro::Encoding;
    use parking_lot::Mutex;

    /// A sink whose deliveries the test settles by hand.
    #[derive(Default)]
    struct HeldSink {
        held: Mutex<Vec<Arc<Delivery>>>,
    }

    impl OutputSink for HeldSink {
        fn publish(
            &self,
            _partition: i32,
            outputs: &[Output],
            delivery: &Arc<Delivery>,
        ) -> Result<(), SinkError> {
            for _ in outputs {
                delivery.queued();
                self.held.lock().push(delivery.clone());
            }
            Ok(())
        }
    }

    impl HeldSink {
        fn settle(&self, delivered: bool) -> usize {
            let held: Vec<_> = self.held.lock().drain(..).collect();
            for d in &held {
                d.done(delivered);
            }
            held.len()
        }
    }

    fn shared(sink: Arc<HeldSink>, store: Arc<MemoryCheckpoints>) -> Arc<Shared> {
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "10s"}]}"#,
        )
        .unwrap();
        Arc::new(Shared {
            limiter: Arc::new(Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap()),
            codec: Arc::new(Codec::new(Encoding::SingleObject).unwrap()),
            sink,
            checkpoints: store,
            metrics: Arc::new(Metrics::new().unwrap()),
            processor: Arc::new(ProcessorConfig {
                topic: "requests".into(),
                max_clock_skew_ms: 1_000,
                alert_window_ms: 60_000,
                alert_min_refused: 1_000,
                alert_critical_refused: 10_000,
                every_event: false,
                sweep_interval_ms: 3_600_000,
                key_check: 1,
            }),
            checkpoint_interval: Duration::from_millis(20),
            shards: 1,
            owned: Default::default(),
        })
    }

    /// Three events of one user: the second is refused, which publishes a
    /// BLOCK decision.
    fn feed(shared: &Shared, worker: &Worker) {
        for offset in 0..3 {
            let ts = 1_700_000_000_000 + offset;
            let e = RequestEvent {
                event_id: format!("e{offset}"),
                timestamp_ms: ts,
                user_id: Some("alice".into()),
                api_key: None,
                client_ip: None,
                method: None,
                path: None,
                cost: 1,
                gateway_id: None,
            };
            assert!(worker.send(Record {
                offset,
                broker_ts_ms: Some(ts),
                key: None,
                payload: shared.codec.encode_request(&e).unwrap(),
            }));
        }
    }

    struct Started {
        sink: Arc<HeldSink>,
        store: Arc<MemoryCheckpoints>,
        shared: Arc<Shared>,
        worker: Worker,
    }

    /// A worker on partition 0 that has processed three events and
    /// published one BLOCK decision, not yet delivered.
    fn start_with_a_block_in_flight() -> Started {
        let (sink, store) = (
            Arc::new(HeldSink::default()),
            Arc::new(MemoryCheckpoints::default()),
        );
        let shared = shared(sink.clone(), store.clone());
        let (epoch, _) = store.acquire(0).unwrap();
        let worker = Worker::spawn_channel(shared.clone(), 0, epoch, None).unwrap();
        feed(&shared, &worker);
        wait_until("the BLOCK decision", || !sink.held.lock().is_empty());
        Started {
            sink,
            store,
            shared,
            worker,
        }
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_checkpoint_is_saved_only_once_its_outputs_are_delivered() {
        let Started {
            sink,
            store,
            worker,
            ..
        } = start_with_a_block_in_flight();
        // Several checkpoint intervals pass with the decision in flight.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(store.peek(0).unwrap(), None);
        assert_eq!(sink.settle(true), 1);
        wait_until("the checkpoint", || store.peek(0).unwrap().is_some());
        assert_eq!(store.peek(0).unwrap().unwrap().next_offset, 3);
        worker.stop(STOP_TIMEOUT);
    }

    #[test]
    fn outputs_that_failed_delivery_are_never_checkpointed_past() {
        let Started {
            sink,
            store,
            shared,
            worker,
        } = start_with_a_block_in_flight();
        assert_eq!(sink.settle(false), 1);
        let failures = shared
            .metrics
            .stream
            .checkpoint_failures
            .with_label_values(&["flush"]);
        wait_until("the checkpointer to notice", || failures.get() >= 1);
        let stopped = &shared.metrics.stream.checkpoints_stopped;
        wait_until("the partition to be reported", || stopped.get() == 1);
        // Not even the final checkpoint at stop: a restart must replay.
        worker.stop(STOP_TIMEOUT);
        assert_eq!(store.peek(0).unwrap(), None);
        assert_eq!(stopped.get(), 0, "the partition is no longer ours");
    }
}
