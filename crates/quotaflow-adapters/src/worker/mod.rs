//! One thread per owned partition: decode, process, publish; and beside it
//! one checkpointer thread that saves the partition's snapshots.
//!
//! The same worker serves Kafka partitions and the embedded bus; only the
//! [`Source`] feeding it, the sink and the checkpoint store differ. Saving
//! a checkpoint waits for the outputs it covers to be delivered and for
//! Redis; both happen on the checkpointer thread, so the worker keeps
//! deciding while a checkpoint is in flight. The worker only takes the
//! snapshot (a copy of the state) and starts a new delivery generation.

mod checkpointer;
mod hit_log;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::avro::Codec;
use crate::metrics::Metrics;
use checkpointer::{Checkpointer, Fate};
use hit_log::HitLog;
use quotaflow_core::limiter::Limiter;
use quotaflow_core::pipeline::hits::{self, Charge, Side, SyncHit, HIT_FORMAT};
use quotaflow_core::pipeline::partition::{InputRecord, RoutedEvent};
use quotaflow_core::pipeline::pin::{ConfigPin, Hold, Restored};
use quotaflow_core::pipeline::records::{Action, RequestEvent};
use quotaflow_core::pipeline::repartition::{append_to_batch, decode_batch, BodyRef};
use quotaflow_core::pipeline::{
    Checkpoint, CheckpointStore, Delivery, Output, OutputSink, PartitionProcessor, ProcessorConfig,
};
use quotaflow_core::state::KeyedStore;

/// A record of the embedded bus, owned so it crosses to its partition's
/// worker through the worker's channel (Kafka records are lent straight
/// from librdkafka's queue as [`InputRecord`]s instead).
#[derive(Debug, Clone)]
pub struct BusRecord {
    pub offset: i64,
    pub broker_ts_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl BusRecord {
    /// Lent to the worker as the Kafka records are.
    fn input(&self) -> InputRecord<'_> {
        InputRecord {
            offset: self.offset,
            broker_ts_ms: self.broker_ts_ms,
            key: self.key.as_deref(),
            payload: &self.payload,
        }
    }
}

/// What reaches a worker through its channel: records (the embedded bus)
/// and the stop request (every source).
pub enum Msg {
    Record(BusRecord),
    /// Repartition records wait in the source's own routed queue (see
    /// [`ChannelSource::with_routed`]): look at it.
    Wake,
    Stop(StopRequest),
}

/// Which of a partition's two inputs a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The requests topic: events as gateways published them.
    Requests,
    /// The repartition topic: events of unaligned limits routed here, the
    /// home of their key (see `quotaflow_core::pipeline::repartition`).
    Repartition,
}

/// Asks a worker to drain, write a final checkpoint and stop, and carries
/// its answer back.
pub struct StopRequest {
    ack: SyncSender<StopOutcome>,
}

/// How a worker's stop ended, as the coordinator reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// The final checkpoint was saved, up to this offset.
    Checkpointed { next_offset: i64 },
    /// Nothing new since the last checkpoint (or the last one is still
    /// being retried and was saved now).
    Clean,
    /// The final checkpoint could not be saved: the next owner replays
    /// from the last checkpoint that was.
    NotCheckpointed { reason: String },
    /// The worker had already stopped on its own: fenced by a newer owner,
    /// or its checkpoints had stopped.
    AlreadyStopped,
    /// No answer before the deadline; the worker finishes on its own.
    TimedOut,
}

/// What a source saw while the worker waited on it.
pub enum Control {
    Continue,
    /// Drain, write a final checkpoint, acknowledge and stop.
    Stop(StopRequest),
    /// The feeding side is gone: write a final checkpoint and stop.
    Closed,
}

/// Where a partition's records come from. `poll` waits at most `timeout`
/// for records and lends each, in offset order per stream and without a
/// copy, to `f` (the two streams interleave in any order: each moves only
/// its own side of the partition).
pub trait Source: Send + 'static {
    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(Stream, InputRecord<'_>)) -> Control;

    /// Wait at most `timeout` for a stop request, taking no record: the
    /// worker holds its partition still while the checkpoint that moves it
    /// to a new config version is saved.
    fn control(&mut self, timeout: Duration) -> Control;

    /// The offsets (requests, repartition) below which a previous owner
    /// may have decided records: the partitions' high watermarks now, read
    /// once when the worker starts. `Ok(None)`: no previous owner in
    /// another process can have decided any (the embedded bus). A worker
    /// resumed from a checkpoint keeps its config version up to them
    /// (`quotaflow_core::pipeline::pin`), and serves `/check` only once its
    /// home side has read to the repartition mark: the synchronous hits a
    /// previous owner answered all lie below it (docs/group.md).
    fn takeover_marks(&mut self) -> Result<Option<[i64; 2]>, String> {
        Ok(None)
    }
}

/// Records pushed through the worker's own channel (the embedded bus).
pub struct ChannelSource {
    rx: Receiver<Msg>,
    /// Records that came while the worker only looked for a stop request
    /// ([`Source::control`]): handed over first at the next poll.
    held: std::collections::VecDeque<BusRecord>,
    /// A stop request that came after held records: answered once they are
    /// processed (the embedded bus processes everything it accepted).
    stop: Option<StopRequest>,
    /// Repartition records: an unbounded queue of their own, so that a
    /// worker routing to another never blocks on it (two workers each
    /// blocked on the other's full channel would never wake); the bus's
    /// requests channels still bound what is in flight.
    routed: Option<Receiver<BusRecord>>,
}

/// Requests records taken before the routed queue is looked at again,
/// so a steady stream of requests cannot starve it.
const ROUTED_EVERY: usize = 256;

impl ChannelSource {
    pub fn new(rx: Receiver<Msg>) -> Self {
        Self {
            rx,
            held: Default::default(),
            stop: None,
            routed: None,
        }
    }

    /// Also read repartition records from `routed`; a [`Msg::Wake`] on the
    /// channel says some arrived.
    pub fn with_routed(rx: Receiver<Msg>, routed: Receiver<BusRecord>) -> Self {
        Self {
            rx,
            held: Default::default(),
            stop: None,
            routed: Some(routed),
        }
    }

    fn drain_routed(&mut self, f: &mut dyn FnMut(Stream, InputRecord<'_>)) {
        let Some(routed) = &self.routed else { return };
        while let Ok(r) = routed.try_recv() {
            f(Stream::Repartition, r.input());
        }
    }
}

impl Source for ChannelSource {
    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(Stream, InputRecord<'_>)) -> Control {
        self.drain_routed(f);
        let held = !self.held.is_empty();
        while let Some(r) = self.held.pop_front() {
            f(Stream::Requests, r.input());
        }
        if let Some(req) = self.stop.take() {
            self.drain_routed(f);
            return Control::Stop(req);
        }
        let mut next = if held {
            // Records were handed over: look for more without waiting.
            match self.rx.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Empty) => return Control::Continue,
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            }
        } else {
            self.rx.recv_timeout(timeout)
        };
        let mut taken = 0usize;
        loop {
            match next {
                Ok(Msg::Record(r)) => {
                    f(Stream::Requests, r.input());
                    taken += 1;
                    if taken % ROUTED_EVERY == 0 {
                        self.drain_routed(f);
                    }
                }
                Ok(Msg::Wake) => self.drain_routed(f),
                Ok(Msg::Stop(ack)) => {
                    self.drain_routed(f);
                    return Control::Stop(ack);
                }
                Err(RecvTimeoutError::Timeout) => return Control::Continue,
                Err(RecvTimeoutError::Disconnected) => return Control::Closed,
            }
            next = match self.rx.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Empty) => return Control::Continue,
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            };
        }
    }

    fn control(&mut self, timeout: Duration) -> Control {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Msg::Record(r)) => self.held.push_back(r),
                // The routed queue is looked at by the next poll.
                Ok(Msg::Wake) => {}
                Ok(Msg::Stop(req)) if self.held.is_empty() => return Control::Stop(req),
                Ok(Msg::Stop(req)) => {
                    self.stop = Some(req);
                    return Control::Continue;
                }
                Err(RecvTimeoutError::Timeout) => return Control::Continue,
                Err(RecvTimeoutError::Disconnected) => return Control::Closed,
            }
        }
    }
}

/// How every partition's records are decoded and decided.
pub struct Processing {
    pub limiter: Arc<Limiter>,
    pub codec: Arc<Codec>,
    pub processor: Arc<ProcessorConfig>,
    /// Shards of each partition's keyed state.
    pub shards: usize,
    /// Keys each partition's state holds at most (`state.max_keys`): in
    /// Kafka mode `/check` adds keys there too, so clients must not be able
    /// to grow it without bound.
    pub key_cap: quotaflow_core::state::KeyCap,
}

/// Where partitions' state is saved, and how often.
pub struct Checkpointing {
    pub store: Arc<dyn CheckpointStore>,
    pub interval: Duration,
}

/// What every partition worker of a process is given.
pub struct WorkerContext {
    pub processing: Processing,
    pub sink: Arc<dyn OutputSink>,
    pub checkpoints: Checkpointing,
    pub metrics: Arc<Metrics>,
    /// A candidate config deciding the same records beside the real one.
    pub shadow: Option<Shadow>,
}

/// A shadow config (`[shadow] config`): each worker runs a second
/// processor with these rules and its own state, never checkpointed, and
/// publishes only its decisions, apart from the real outputs.
pub struct Shadow {
    pub limiter: Arc<Limiter>,
    /// Where its decisions go (`kafka.shadow_decisions_topic`); none in
    /// the embedded mode, where they are only counted.
    pub sink: Option<Arc<dyn OutputSink>>,
}

/// Records buffered per partition between the embedded bus and its worker.
pub const CHANNEL_DEPTH: usize = 4096;

/// A worker's control channel, of `depth` messages: the source keeps the
/// receiver, the worker's handle the sender.
pub fn channel(depth: usize) -> (SyncSender<Msg>, Receiver<Msg>) {
    mpsc::sync_channel(depth)
}

/// Why a worker stopped on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoppedBecause {
    /// A newer owner holds the partition's epoch.
    Fenced,
    /// Outputs failed delivery: no checkpoint may be written any more.
    CheckpointsStopped,
}

impl StoppedBecause {
    pub fn as_str(self) -> &'static str {
        match self {
            StoppedBecause::Fenced => "fenced",
            StoppedBecause::CheckpointsStopped => "checkpoints_stopped",
        }
    }
}

/// A running partition worker.
pub struct Worker {
    partition: i32,
    /// Raised by the checkpointer when it re-seeds a store that forgot.
    epoch: Arc<AtomicU64>,
    tx: SyncSender<Msg>,
    progress: Arc<Progress>,
    store: Arc<KeyedStore>,
    /// The home side's state: the unaligned limits' keys homed here.
    home_store: Arc<KeyedStore>,
    hits: Arc<HitLog>,
    sink: Arc<dyn OutputSink>,
    join: JoinHandle<()>,
}

/// What a worker's thread reports to its handle.
struct Progress {
    /// The offset of the next record the worker expects.
    position: AtomicI64,
    /// Set when the worker stops on its own: when, and why.
    stopped_because: OnceLock<(Instant, StoppedBecause)>,
    /// Whether synchronous checks may be counted here: the checkpoint is
    /// restored and every event a previous owner had decided is replayed.
    serving: std::sync::atomic::AtomicBool,
    /// Synchronous hits counted since the worker last looked: they make
    /// the state dirty, so it is checkpointed even with no event coming.
    sync_hits: AtomicU64,
}

/// An owned partition's state as synchronous checks reach it.
#[derive(Clone)]
pub struct SyncTarget {
    partition: i32,
    store: Arc<KeyedStore>,
    home_store: Arc<KeyedStore>,
    progress: Arc<Progress>,
    hits: Arc<HitLog>,
    sink: Arc<dyn OutputSink>,
}

impl SyncTarget {
    /// The arrival side's state: keys of limits aligned with the
    /// partition key, counted where their events arrive.
    pub fn store(&self) -> &KeyedStore {
        &self.store
    }

    /// The home side's state: keys of unaligned limits whose home is this
    /// partition, counted from the repartition topic.
    pub fn home_store(&self) -> &KeyedStore {
        &self.home_store
    }

    /// Record that a synchronous hit changed the state: it goes into the
    /// next checkpoint.
    pub fn counted(&self) {
        self.progress.sync_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Hold from before a synchronous hit is counted until it is logged
    /// ([`SyncTarget::log_hit`]): no checkpoint is taken in between.
    /// `None` once the worker is stopping: count nothing here then.
    pub fn counting(&self) -> Option<parking_lot::RwLockReadGuard<'_, ()>> {
        self.hits.counting()
    }

    /// Number a hit just counted at `time_ms` on `charges` and keep it
    /// pending until the worker reads its record back; the record to
    /// [`SyncTarget::append`].
    pub fn log_hit(&self, time_ms: u64, cost: u64, charges: Vec<Charge>) -> SyncHit {
        self.hits.log(time_ms, cost, charges)
    }

    /// Append `hit` to the partition's log (its partition of the
    /// repartition topic). `done(true)` once the broker has it; `done` is
    /// dropped uncalled, or called with `false`, if it never will.
    pub fn append(&self, hit: &SyncHit, done: impl FnOnce(bool) + Send + 'static) {
        let delivery = Arc::new(Delivery::notifying(done));
        if let Err(e) = self
            .sink
            .append_hit(self.partition, &hit.encode(), &delivery)
        {
            tracing::error!(event = "sync_hit_not_appended", partition = self.partition, error = %e, "a synchronous hit could not be appended to its partition's log; it is answered by its limit's failure mode and stays counted");
        }
    }
}

impl Worker {
    /// Take `partition` at `epoch`, resuming from `restored`, reading from
    /// `source`, which holds the receiving end of `tx` (see [`channel`]) so
    /// that stop requests reach the worker through it.
    pub fn spawn<S: Source>(
        ctx: Arc<WorkerContext>,
        partition: i32,
        epoch: u64,
        restored: Option<Checkpoint>,
        tx: SyncSender<Msg>,
        source: S,
    ) -> std::io::Result<Self> {
        let start = restored.as_ref().map_or(0, |c| c.next_offset);
        let progress = Arc::new(Progress {
            position: AtomicI64::new(start),
            stopped_because: OnceLock::new(),
            serving: std::sync::atomic::AtomicBool::new(false),
            sync_hits: AtomicU64::new(0),
        });
        let store = Arc::new(KeyedStore::with_cap(
            ctx.processing.shards,
            ctx.processing.key_cap,
        ));
        let home_store = Arc::new(KeyedStore::with_cap(
            ctx.processing.shards,
            ctx.processing.key_cap,
        ));
        let epoch = Arc::new(AtomicU64::new(epoch));
        let hits = Arc::new(HitLog::new(
            epoch.clone(),
            restored.as_ref().map_or(&[][..], |c| &c.pending_hits),
        ));
        let sink = ctx.sink.clone();
        let checkpointer =
            Checkpointer::spawn(ctx.clone(), partition, epoch.clone(), progress.clone())?;
        let (theirs, st, hst, hl) = (
            progress.clone(),
            store.clone(),
            home_store.clone(),
            hits.clone(),
        );
        let owned = ctx.metrics.stream.partitions_owned.clone();
        // Counted here, and uncounted as the worker's thread ends.
        owned.inc();
        let join = std::thread::Builder::new()
            .name(format!("quotaflow-p{partition}"))
            .spawn(move || {
                run(
                    ctx,
                    partition,
                    ([st, hst], hl),
                    restored,
                    source,
                    &theirs,
                    checkpointer,
                )
            })
            .inspect_err(|_| owned.dec())?;
        Ok(Self {
            partition,
            epoch,
            tx,
            progress,
            store,
            home_store,
            hits,
            sink,
            join,
        })
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The fencing epoch the worker saves its checkpoints under.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The partition's keyed state; only this worker writes events into it.
    pub fn store(&self) -> &Arc<KeyedStore> {
        &self.store
    }

    /// Where synchronous checks of this partition's keys are counted, once
    /// the worker has restored and replayed what a previous owner decided.
    pub fn sync_target(&self) -> Option<SyncTarget> {
        self.progress
            .serving
            .load(Ordering::Acquire)
            .then(|| SyncTarget {
                partition: self.partition,
                store: self.store.clone(),
                home_store: self.home_store.clone(),
                progress: self.progress.clone(),
                hits: self.hits.clone(),
                sink: self.sink.clone(),
            })
    }

    /// The home side's keyed state: the keys of unaligned limits whose home
    /// is this partition (`Routing::home`); only this worker writes events
    /// into it.
    pub fn home_store(&self) -> &Arc<KeyedStore> {
        &self.home_store
    }

    /// The offset of the next record the worker expects.
    pub fn position(&self) -> i64 {
        self.progress.position.load(Ordering::Relaxed)
    }

    /// Whether the worker has stopped on its own (fenced, or its source closed).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// When and why the worker stopped on its own, if it did.
    pub fn stopped_because(&self) -> Option<(Instant, StoppedBecause)> {
        self.progress.stopped_because.get().copied()
    }

    /// A sender into a channel-fed worker: [`Msg::Record`]s it sends are
    /// processed in order; a send fails once the worker has stopped.
    pub fn sender(&self) -> SyncSender<Msg> {
        self.tx.clone()
    }

    /// Ask the worker to finish the records in hand (a channel-fed worker:
    /// everything already queued), write a final checkpoint and stop.
    /// Returns at once; [`Stopping::wait`] collects the outcome.
    pub fn request_stop(self) -> Stopping {
        let (ack, ack_rx) = mpsc::sync_channel(1);
        // A failed send means the worker is gone already; `wait` says so.
        let _ = self.tx.send(Msg::Stop(StopRequest { ack }));
        Stopping {
            partition: self.partition,
            ack: ack_rx,
            join: self.join,
        }
    }

    /// Stop and wait up to `timeout` (tests and tools; the coordinator
    /// stops many workers against one deadline instead).
    pub fn stop(self, timeout: Duration) -> StopOutcome {
        self.request_stop().wait(Instant::now() + timeout)
    }
}

/// A worker asked to stop.
pub struct Stopping {
    partition: i32,
    ack: Receiver<StopOutcome>,
    join: JoinHandle<()>,
}

impl Stopping {
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Wait until `deadline` for the worker's answer. A worker that does
    /// not answer in time is left to finish on its own (its late checkpoint
    /// is fenced if the partition has a new owner by then).
    pub fn wait(self, deadline: Instant) -> StopOutcome {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.ack.recv_timeout(left) {
            Ok(outcome) => {
                let _ = self.join.join();
                outcome
            }
            // The worker dropped the request unanswered: it had stopped on
            // its own before it read it.
            Err(RecvTimeoutError::Disconnected) => {
                let _ = self.join.join();
                StopOutcome::AlreadyStopped
            }
            Err(RecvTimeoutError::Timeout) => StopOutcome::TimedOut,
        }
    }
}

/// A partition counted as owned in the metrics, uncounted when its worker
/// ends, also by a panic.
struct Counted<'a> {
    ctx: &'a WorkerContext,
    label: String,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let m = &self.ctx.metrics.stream;
        m.partitions_owned.dec();
        m.partition_lag.remove_label_values(&[&self.label]).ok();
    }
}

/// The checkpoint of both sides of a partition, with the synchronous hits
/// pending in its log.
fn both_sides(
    proc: &PartitionProcessor,
    home: &PartitionProcessor,
    hits: &HitLog,
    version: u64,
) -> Checkpoint {
    let (mut cp, pending) = hits.snapshot(crate::clock::now_ms(), || {
        let mut cp = proc.checkpoint(version);
        cp.home = home.home_state();
        cp
    });
    cp.pending_hits = pending;
    cp
}

/// The repartition stream's takeover mark, for serving synchronous checks:
/// `Ok(None)` nothing to wait for, `Err` not read yet.
fn routed_mark(hold: Hold) -> Result<Option<i64>, ()> {
    match hold {
        Hold::Until { repartition, .. } => Ok(Some(repartition)),
        Hold::Nothing => Ok(None),
        Hold::Unknown => Err(()),
    }
}

/// How often a worker asks again for the takeover marks it could not read.
const MARKS_RETRY: Duration = Duration::from_secs(1);
/// How often a worker looks for a stop request while it holds its
/// partition still for a config version's checkpoint.
const SWITCH_POLL: Duration = Duration::from_millis(5);

/// Read the offsets a previous owner may have decided, for `pin`'s hold.
/// `failed` counts the reads that failed so far: the first failure is
/// logged, then one a minute, not one a second.
fn ask_marks<S: Source>(source: &mut S, pin: &mut ConfigPin, partition: i32, failed: &mut u32) {
    match source.takeover_marks() {
        Ok(marks) => {
            pin.set_hold(match marks {
                None => Hold::Nothing,
                Some([requests, repartition]) => Hold::Until {
                    requests,
                    repartition,
                },
            });
            if *failed > 0 {
                tracing::info!(
                    event = "takeover_marks_read",
                    partition,
                    failed = *failed,
                    "the partition's high watermarks could be read again"
                );
            }
            *failed = 0;
        }
        Err(e) => {
            if *failed % 60 == 0 {
                tracing::warn!(event = "takeover_marks_unavailable", partition, failed = *failed, error = %e, "the partition's high watermarks could not be read: it keeps its checkpoint's config version until they can (asked again every second, logged once a minute)");
            }
            *failed = failed.saturating_add(1);
        }
    }
}

/// How a move to a new config version ended.
enum Switched {
    Yes,
    /// The store refused the checkpoint for good: the version stays.
    No,
    /// The worker must end while holding still.
    End(End),
}

/// Move the partition to `running`: save a checkpoint that records its
/// version at the current offsets, holding the partition still (taking no
/// record) until it is saved, then decide with it. So the version in force
/// from any saved checkpoint's offsets on is the one it names, and a new
/// owner replaying from it decides as this one did.
#[allow(clippy::too_many_arguments)]
fn switch_version<S: Source>(
    partition: i32,
    hits: &HitLog,
    running: &Arc<quotaflow_core::rules::Rules>,
    source: &mut S,
    checkpointer: &mut Checkpointer,
    pin: &mut ConfigPin,
    [proc, home]: [&mut PartitionProcessor; 2],
    delivery: &mut Arc<Delivery>,
) -> Switched {
    let cp = both_sides(proc, home, hits, running.version);
    let ticket = checkpointer.submit(cp, std::mem::take(delivery));
    let started = Instant::now();
    loop {
        match checkpointer.fate(ticket) {
            Some(Fate::Saved) => break,
            Some(Fate::Dropped) => return Switched::No,
            None => {}
        }
        if checkpointer.fenced() {
            return Switched::End(End::Fenced);
        }
        if checkpointer.stopped() {
            return Switched::End(End::CheckpointsStopped);
        }
        match source.control(SWITCH_POLL) {
            Control::Continue => {}
            Control::Stop(req) => return Switched::End(End::Stop(req)),
            Control::Closed => return Switched::End(End::Closed),
        }
    }
    tracing::info!(
        event = "partition_config_switched",
        partition,
        from = pin.version(),
        to = running.version,
        next_offset = proc.next_offset(),
        home_next_offset = home.next_offset(),
        held_ms = started.elapsed().as_millis() as u64,
        "the partition decides with the running config version from here on (its checkpoint recording it is saved)"
    );
    pin.switch(running.clone());
    proc.pin(running.clone());
    home.pin(running.clone());
    Switched::Yes
}

fn run<S: Source>(
    ctx: Arc<WorkerContext>,
    partition: i32,
    ([store, home_store], hits): ([Arc<KeyedStore>; 2], Arc<HitLog>),
    restored: Option<Checkpoint>,
    mut source: S,
    progress: &Progress,
    mut checkpointer: Checkpointer,
) {
    let hits = &*hits;
    // The config version this partition decides with: its checkpoint's,
    // kept until the offsets a previous owner may have decided are passed
    // (docs/stream.md, "Config versions and replays").
    let limiter = &ctx.processing.limiter;
    let (mut pin, how) = ConfigPin::restore(
        restored.as_ref().map(|c| c.config_version),
        limiter,
        Hold::Unknown,
    );
    if let Restored::Unknown { version, running } = how {
        tracing::warn!(
            event = "config_version_unknown",
            partition,
            version,
            running,
            oldest_kept = limiter.oldest_kept_version(),
            "the checkpoint's config version is not one this instance keeps: the events replayed from it are decided with the running version, and may be decided differently than before the takeover"
        );
    }
    let mut marks_failed = 0;
    ask_marks(&mut source, &mut pin, partition, &mut marks_failed);
    let mut marks_asked = Instant::now();
    let mut switch_tried: Option<Instant> = None;
    let mut home = PartitionProcessor::home(
        ctx.processing.processor.clone(),
        partition,
        home_store,
        restored.as_ref(),
    );
    let mut proc = PartitionProcessor::new(
        ctx.processing.processor.clone(),
        partition,
        store.clone(),
        restored,
    );
    proc.pin(pin.rules().clone());
    home.pin(pin.rules().clone());
    let foreign = proc.foreign_keys() + home.foreign_keys();
    if foreign > 0 {
        tracing::error!(
            event = "checkpoint_key_mismatch",
            partition,
            keys = foreign,
            "the checkpoint's key ids were made under another security.fingerprint_key: \
             its counts restart from zero (offsets and open alerts are kept); set the same \
             fingerprint_key on every instance"
        );
    }
    let label = partition.to_string();
    let counted = Counted {
        ctx: &ctx,
        label: label.clone(),
    };
    let consumed = ctx
        .metrics
        .stream
        .events_consumed
        .with_label_values(&[&label]);
    // Exported at 0 from the start, so a skip is an increase Prometheus sees.
    ctx.metrics
        .stream
        .offsets_skipped
        .with_label_values(&[&label]);
    // Where the partition must resume: its checkpoint's offset, or 0 with
    // none. A first record beyond it means events were lost before anyone
    // read them (retention deleted them and the consumer reset to the
    // earliest offset left), also for a partition never checkpointed, or
    // whose checkpoint the store lost.
    let mut resume_at = Some(proc.next_offset());
    // Events up to a previous owner's progress mark were decided, and
    // their outputs published, before it went: their outputs now are
    // published again (consumers drop them by `quotaflow.id`).
    let replay_until = match ctx.checkpoints.store.progress(partition) {
        Ok(Some(mark)) if mark > proc.next_offset() => {
            tracing::info!(
                event = "replaying_decided_events",
                partition,
                from = proc.next_offset(),
                to = mark,
                "a previous owner decided these events after its last checkpoint; their outputs are published again"
            );
            mark
        }
        _ => i64::MIN,
    };
    // Hits a previous owner answered are in the repartition stream below
    // its end at the take-over: read back before serving, so that a check
    // never answers from a count that lacks them.
    // (The takeover marks: read above, for the config pin too.)
    let routed_end = std::cell::Cell::new(routed_mark(pin.hold()));
    let caught_up = |proc: &PartitionProcessor, home: &PartitionProcessor| {
        let home_until = match routed_end.get() {
            Ok(Some(end)) => end,
            Ok(None) => i64::MIN,
            // Unknown yet: not served until it is read.
            Err(()) => i64::MAX,
        };
        proc.next_offset() >= replay_until && home.next_offset() >= home_until
    };
    if caught_up(&proc, &home) {
        progress.serving.store(true, Ordering::Release);
    }
    let mut out = Vec::new();
    let mut shadow = ctx
        .shadow
        .as_ref()
        .map(|s| ShadowRun::new(&ctx, s, partition));
    // Every record is decoded into this one event, reusing its strings.
    let mut decoded = RequestEvent::default();
    // Looked up once, not per repartition record.
    let routed_counter = |outcome| {
        ctx.metrics
            .stream
            .repartition_records
            .with_label_values(&[outcome])
    };
    let (routed_applied, routed_duplicate, routed_invalid) = (
        routed_counter("applied"),
        routed_counter("duplicate"),
        routed_counter("invalid"),
    );
    let mut delivery = Arc::new(Delivery::default());
    // Repartition records of this poll, one batch per home partition.
    let mut routed_batches: Vec<(i32, Vec<u8>)> = Vec::new();
    // Partitions start their checkpoint timers out of phase (spread over
    // the interval by the golden ratio), so that partitions assigned
    // together do not all snapshot and save at the same moment.
    let phase = ctx
        .checkpoints
        .interval
        .mul_f64((f64::from(partition.unsigned_abs()) * 0.618_033_988_749_895).fract());
    let mut last_checkpoint = Instant::now()
        .checked_sub(phase)
        .unwrap_or_else(Instant::now);
    let mut dirty = false;
    let end = loop {
        let wait = ctx
            .checkpoints
            .interval
            .saturating_sub(last_checkpoint.elapsed());
        let control = source.poll(wait, &mut |stream, r| {
            if stream == Stream::Repartition {
                if !home.start_routed(r.offset) {
                    return;
                }
                if r.payload.first() == Some(&HIT_FORMAT) {
                    let end = routed_end.get().ok().flatten();
                    read_hit(&ctx, partition, hits, [&proc, &home], r, end);
                    if caught_up(&proc, &home) {
                        progress.serving.store(true, Ordering::Release);
                    }
                    dirty = true;
                    return;
                }
                let batch = decode_batch(r.payload).unwrap_or_else(|e| {
                    unreadable_routed(partition, r.offset, &e, &routed_invalid);
                    Vec::new()
                });
                for routed in &batch {
                    let decoded_payload;
                    let event = match &routed.body {
                        BodyRef::Request(q) => RoutedEvent::Request(q),
                        // A record of the first format (written by a
                        // version before the request travelled decoded).
                        BodyRef::Payload(p) => {
                            decoded_payload = ctx
                                .processing
                                .codec
                                .decode_request_into(p, &mut decoded)
                                .map_err(|e| format!("undecodable: {e}"));
                            RoutedEvent::Decoded(
                                decoded_payload
                                    .as_ref()
                                    .map(|()| &decoded)
                                    .map_err(String::as_str),
                            )
                        }
                    };
                    let outcome = home.process_routed(limiter, routed, event, &mut out);
                    if let Some(reason) = &outcome.reason {
                        tracing::error!(event = "repartition_record_invalid", partition, offset = r.offset, reason = %reason, "a repartition record could not be read; skipped (only quotaflow should write to the repartition topic)");
                    }
                    routed_applied.inc_by(outcome.applied);
                    routed_duplicate.inc_by(outcome.duplicate);
                    routed_invalid.inc_by(outcome.invalid);
                }
                if !out.is_empty() {
                    count_outputs(&ctx.metrics, &out, false);
                    publish(&ctx, partition, &out, &delivery);
                    out.clear();
                }
                if caught_up(&proc, &home) {
                    progress.serving.store(true, Ordering::Release);
                }
                dirty = true;
                return;
            }
            if let Some(at) = resume_at.take().filter(|&at| r.offset > at) {
                let skipped = r.offset - at;
                ctx
                    .metrics
                    .stream
                    .offsets_skipped
                    .with_label_values(&[&label])
                    .inc_by(skipped as u64);
                tracing::error!(event = "offsets_skipped", partition, from = at, to = r.offset, skipped, "events after the checkpoint (or from the start, with none) are gone from the topic (retention?) and cannot be counted; resuming at the first one left");
            }
            let event = ctx
                .processing
                .codec
                .decode_request_into(r.payload, &mut decoded)
                .map(|()| &decoded)
                .map_err(|e| format!("undecodable: {e}"));
            let decided = event.as_ref().ok().copied();
            proc.process(limiter, r, event, &mut out);
            stage_routed(&ctx, &mut out, &mut routed_batches);
            if routed_batches
                .iter()
                .any(|(_, b)| b.len() >= ROUTED_BATCH_BYTES)
            {
                flush_routed(&ctx, partition, &mut routed_batches, &delivery);
            }
            progress.position.store(r.offset + 1, Ordering::Relaxed);
            if caught_up(&proc, &home) {
                progress.serving.store(true, Ordering::Release);
            }
            consumed.inc();
            if !out.is_empty() {
                count_outputs(&ctx.metrics, &out, r.offset < replay_until);
                publish(&ctx, partition, &out, &delivery);
                out.clear();
            }
            if let (Some(shadow), Some(e)) = (shadow.as_mut(), decided) {
                shadow.process(&ctx, r, e);
            }
            dirty = true;
        });
        // Before anything may snapshot: a checkpoint covers only events
        // whose repartition records are queued in its delivery generation.
        flush_routed(&ctx, partition, &mut routed_batches, &delivery);
        match control {
            Control::Continue => {}
            Control::Stop(ack) => break End::Stop(ack),
            Control::Closed => break End::Closed,
        }
        if checkpointer.fenced() {
            break End::Fenced;
        }
        if checkpointer.stopped() {
            break End::CheckpointsStopped;
        }
        if progress.sync_hits.swap(0, Ordering::Relaxed) > 0 {
            dirty = true;
        }
        if last_checkpoint.elapsed() >= ctx.checkpoints.interval {
            last_checkpoint = Instant::now();
            ctx.metrics
                .keys_expired
                .inc_by(proc.take_expired() + home.take_expired());
            if dirty && checkpointer.idle() {
                let generation = std::mem::take(&mut delivery);
                checkpointer.submit(both_sides(&proc, &home, hits, pin.version()), generation);
                dirty = false;
            }
        }
        if pin.hold() == Hold::Unknown && marks_asked.elapsed() >= MARKS_RETRY {
            marks_asked = Instant::now();
            ask_marks(&mut source, &mut pin, partition, &mut marks_failed);
            routed_end.set(routed_mark(pin.hold()));
            if caught_up(&proc, &home) {
                progress.serving.store(true, Ordering::Release);
            }
        }
        let running = limiter.rules();
        if running.version != pin.version() {
            // A checkpoint the store refused is not retried before the
            // next interval: a refusal for good (the offset went
            // backwards) comes with a fence soon after.
            let retry_due = switch_tried.is_none_or(|t| t.elapsed() >= ctx.checkpoints.interval);
            if retry_due
                && checkpointer.idle()
                && pin.due(&running, proc.next_offset(), home.next_offset())
            {
                switch_tried = Some(Instant::now());
                match switch_version(
                    partition,
                    hits,
                    &running,
                    &mut source,
                    &mut checkpointer,
                    &mut pin,
                    [&mut proc, &mut home],
                    &mut delivery,
                ) {
                    Switched::Yes => {
                        dirty = false;
                        switch_tried = None;
                    }
                    Switched::No => dirty = true,
                    Switched::End(end) => break end,
                }
            }
        }
    };
    let version = pin.version();
    let snapshot = |proc: &PartitionProcessor, delivery: &mut Arc<Delivery>| {
        let cp = both_sides(proc, &home, hits, version);
        (cp, std::mem::take(delivery))
    };
    let answer = match end {
        End::Fenced | End::CheckpointsStopped => {
            // Fenced: another instance owns the partition now. Checkpoints
            // stopped: outputs failed delivery, so no checkpoint may cover
            // what this worker did since; it gives the partition up, to be
            // taken over again from its last checkpoint (and replayed).
            // Either way its state goes, and the source stops feeding it.
            let reason = match end {
                End::Fenced => StoppedBecause::Fenced,
                _ => StoppedBecause::CheckpointsStopped,
            };
            drop(source);
            checkpointer.abandon();
            let _ = progress.stopped_because.set((Instant::now(), reason));
            None
        }
        End::Stop(req) => {
            hits.close();
            dirty |= progress.sync_hits.swap(0, Ordering::Relaxed) > 0;
            let last = (dirty && !checkpointer.stopped()).then(|| snapshot(&proc, &mut delivery));
            let outcome = checkpointer.finish(last);
            Some((req, outcome))
        }
        End::Closed => {
            hits.close();
            dirty |= progress.sync_hits.swap(0, Ordering::Relaxed) > 0;
            let last = (dirty && !checkpointer.stopped()).then(|| snapshot(&proc, &mut delivery));
            checkpointer.finish(last);
            None
        }
    };
    // Answered last, so a coordinator that hears back finds the partition
    // no longer counted as owned.
    drop(counted);
    if let Some((req, outcome)) = answer {
        let _ = req.ack.send(outcome);
    }
}

/// A synchronous hit read back from the partition's log: already counted
/// if it is pending, else (its owner crashed before a checkpoint held it)
/// counted now.
///
/// A hit of an earlier owner logged at or after the stream's end at the
/// take-over (`routed_end`) comes from a fenced owner (paused past its
/// session, then woken): it decided on a state no longer the partition's,
/// and is not counted. A previous owner's hits that it answered are all
/// below that end: it answers only once the broker has the record, and it
/// counts nothing after its final snapshot.
fn read_hit(
    ctx: &WorkerContext,
    partition: i32,
    hits: &HitLog,
    [proc, home]: [&PartitionProcessor; 2],
    r: InputRecord<'_>,
    routed_end: Option<i64>,
) {
    let outcome = match SyncHit::decode(r.payload) {
        Ok(hit) if hits.read_back(hit.id) => "read_back",
        Ok(hit) if hit.id.epoch < hits.epoch() && routed_end.is_some_and(|end| r.offset >= end) => {
            "fenced"
        }
        Ok(hit) => {
            let rules = ctx.processing.limiter.rules();
            hits::replay(proc.store(), &rules, &hit, Side::Arrival);
            hits::replay(home.store(), &rules, &hit, Side::Home);
            "replayed"
        }
        Err(e) => {
            let invalid = ctx
                .metrics
                .stream
                .repartition_records
                .with_label_values(&["invalid"]);
            return unreadable_routed(partition, r.offset, &e, &invalid);
        }
    };
    ctx.metrics.sync_hits.with_label_values(&[outcome]).inc();
}

/// A repartition-topic message that cannot be read: skipped, logged and
/// counted.
fn unreadable_routed(
    partition: i32,
    offset: i64,
    reason: &dyn std::fmt::Display,
    invalid: &prometheus::IntCounter,
) {
    tracing::error!(event = "repartition_record_invalid", partition, offset, reason = %reason, "a repartition record could not be read; skipped (only quotaflow should write to the repartition topic)");
    invalid.inc();
}

/// A worker's shadow processor: after the real one, on the same records.
struct ShadowRun<'a> {
    shadow: &'a Shadow,
    proc: PartitionProcessor,
    out: Vec<Output>,
    /// Never waited for: no checkpoint covers shadow decisions.
    delivery: Arc<Delivery>,
    last_warning: Option<Instant>,
}

impl<'a> ShadowRun<'a> {
    fn new(ctx: &WorkerContext, shadow: &'a Shadow, partition: i32) -> Self {
        let store = Arc::new(KeyedStore::with_cap(
            ctx.processing.shards,
            ctx.processing.key_cap,
        ));
        // A shadow config counts every limit where the event arrives: it
        // has no repartition topic of its own (docs/stream.md).
        let cfg = Arc::new(ProcessorConfig {
            routing: None,
            ..(*ctx.processing.processor).clone()
        });
        Self {
            shadow,
            proc: PartitionProcessor::new(cfg, partition, store, None).shadow(),
            out: Vec::new(),
            delivery: Arc::new(Delivery::default()),
            last_warning: None,
        }
    }

    fn process(&mut self, ctx: &WorkerContext, r: InputRecord<'_>, event: &RequestEvent) {
        self.proc
            .process(&self.shadow.limiter, r, Ok(event), &mut self.out);
        // Its alerts and dead letters would repeat the real ones' kind of
        // output under the real topics' names: only decisions are kept.
        self.out.retain(|o| matches!(o, Output::Decision(_)));
        if self.out.is_empty() {
            return;
        }
        let m = &ctx.metrics.stream;
        for o in &self.out {
            if let Output::Decision(d) = o {
                m.shadow_decisions
                    .with_label_values(&[action_label(d.action)])
                    .inc();
            }
        }
        if let Some(sink) = &self.shadow.sink {
            // Tried once: the real outputs never wait for the shadow's.
            if let Err(e) = sink.publish(self.proc.partition(), &self.out, &self.delivery) {
                m.shadow_decisions_dropped.inc_by(self.out.len() as u64);
                if self
                    .last_warning
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(event = "shadow_publish_failed", partition = self.proc.partition(), error = %e, "shadow decisions dropped (logged once a minute at most); the real outputs are not affected");
                }
            }
        }
        self.out.clear();
    }
}

fn action_label(action: Action) -> &'static str {
    match action {
        Action::Block => "block",
        Action::Unblock => "unblock",
        Action::Allow => "allow",
        Action::Deny => "deny",
    }
}

enum End {
    Stop(StopRequest),
    Closed,
    Fenced,
    CheckpointsStopped,
}

/// A home's batch is published once this large even within a poll (a
/// source whose poll keeps finding records, as the embedded bus's can):
/// well under Kafka's default 1 MB message size.
const ROUTED_BATCH_BYTES: usize = 256 * 1024;

/// Move the repartition records out of `out` into their home's batch.
fn stage_routed(ctx: &WorkerContext, out: &mut Vec<Output>, batches: &mut Vec<(i32, Vec<u8>)>) {
    if !out.iter().any(|o| matches!(o, Output::Repartition { .. })) {
        return;
    }
    let routed = ctx
        .metrics
        .stream
        .repartition_records
        .with_label_values(&["routed"]);
    out.retain(|o| {
        let Output::Repartition { home, record } = o else {
            return true;
        };
        let at = match batches.iter().position(|(h, _)| h == home) {
            Some(i) => i,
            None => {
                batches.push((*home, Vec::new()));
                batches.len() - 1
            }
        };
        if let Some((_, batch)) = batches.get_mut(at) {
            append_to_batch(batch, record);
        }
        // Counted per key shape, as the home counts what it applies.
        routed.inc_by(record.shapes.len() as u64);
        false
    });
}

/// Publish each home's batch (retrying as [`publish`] does), in home
/// order: one Kafka message per home per poll, not one per event.
fn flush_routed(
    ctx: &WorkerContext,
    partition: i32,
    batches: &mut Vec<(i32, Vec<u8>)>,
    delivery: &Arc<Delivery>,
) {
    for (home, batch) in batches.drain(..) {
        let mut backoff = Duration::from_millis(5);
        while let Err(e) = ctx
            .sink
            .publish_repartition(partition, home, &batch, delivery)
        {
            tracing::warn!(event = "publish_retry", partition, error = %e, "output sink refused; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn publish(ctx: &WorkerContext, partition: i32, out: &[Output], delivery: &Arc<Delivery>) {
    // A sink refuses only when it cannot queue; keep trying, the source is
    // backpressured meanwhile and nothing is dropped. Outputs queued before
    // a refusal are queued again: their deterministic ids make the copies
    // recognisable.
    let mut backoff = Duration::from_millis(5);
    while let Err(e) = ctx.sink.publish(partition, out, delivery) {
        tracing::warn!(event = "publish_retry", partition, error = %e, "output sink refused; retrying");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

fn count_outputs(metrics: &Metrics, out: &[Output], republished: bool) {
    let m = &metrics.stream;
    for o in out {
        if let Output::Repartition { .. } = o {
            continue;
        }
        if republished {
            let kind = match o {
                Output::Decision(_) => "decision",
                Output::Alert(_) => "alert",
                Output::DeadLetter { .. } | Output::Repartition { .. } => "dead_letter",
            };
            m.outputs_republished.with_label_values(&[kind]).inc();
        }
        m.recent.note(o);
        match o {
            Output::Decision(d) => {
                m.decisions
                    .with_label_values(&[action_label(d.action)])
                    .inc();
            }
            Output::Alert(a) => {
                let sev = match a.severity {
                    quotaflow_core::pipeline::records::Severity::Warning => "warning",
                    quotaflow_core::pipeline::records::Severity::Critical => "critical",
                };
                m.alerts.with_label_values(&[sev]).inc();
            }
            Output::Repartition { .. } => {}
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
    use crate::test_support::{ctx, feed, wait_until, HeldSink};
    use parking_lot::Mutex;
    use quotaflow_core::fingerprint::Fingerprinter;
    use quotaflow_core::pipeline::{MemoryCheckpoints, SinkError};
    use quotaflow_core::rules::RulesDoc;

    const STOP_TIMEOUT: Duration = Duration::from_secs(10);

    struct Started {
        sink: Arc<HeldSink>,
        store: Arc<MemoryCheckpoints>,
        ctx: Arc<WorkerContext>,
        worker: Worker,
    }

    /// A worker on partition 0 that has processed three events and
    /// published one BLOCK decision, not yet delivered.
    fn start_with_a_block_in_flight() -> Started {
        let (sink, store) = (
            Arc::new(HeldSink::default()),
            Arc::new(MemoryCheckpoints::default()),
        );
        let ctx = ctx(sink.clone(), store.clone());
        let (epoch, _) = store.acquire(0).unwrap();
        let (tx, rx) = channel(CHANNEL_DEPTH);
        let worker =
            Worker::spawn(ctx.clone(), 0, epoch, None, tx, ChannelSource::new(rx)).unwrap();
        feed(&ctx, &worker.sender(), "alice", 0..3);
        wait_until("the BLOCK decision", || !sink.held.lock().is_empty());
        Started {
            sink,
            store,
            ctx,
            worker,
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
        assert_eq!(worker.stop(STOP_TIMEOUT), StopOutcome::Clean);
    }

    #[test]
    fn outputs_that_failed_delivery_are_never_checkpointed_past() {
        let Started {
            sink,
            store,
            ctx,
            worker,
        } = start_with_a_block_in_flight();
        assert_eq!(sink.settle(false), 1);
        let failures = ctx
            .metrics
            .stream
            .checkpoint_failures
            .with_label_values(&["flush"]);
        wait_until("the checkpointer to notice", || failures.get() >= 1);
        // The worker gives the partition up at once, writing nothing: its
        // next owner (this instance again, see the coordinator) replays.
        wait_until("the worker to stop", || worker.is_finished());
        assert_eq!(
            worker.stopped_because().map(|(_, why)| why),
            Some(StoppedBecause::CheckpointsStopped)
        );
        assert_eq!(worker.stop(STOP_TIMEOUT), StopOutcome::AlreadyStopped);
        assert_eq!(store.peek(0).unwrap(), None);
        assert_eq!(ctx.metrics.stream.partitions_owned.get(), 0);
    }

    #[test]
    fn a_stop_saves_what_came_after_the_last_checkpoint() {
        let Started {
            sink,
            store,
            ctx,
            worker,
        } = start_with_a_block_in_flight();
        assert_eq!(sink.settle(true), 1);
        wait_until("the checkpoint", || store.peek(0).unwrap().is_some());
        // One more of another user: nothing refused, nothing in flight.
        feed(&ctx, &worker.sender(), "bob", 3..4);
        wait_until("the event", || worker.position() == 4);
        // The periodic checkpoint (every 20 ms) may cover it before the stop.
        let outcome = worker.stop(STOP_TIMEOUT);
        assert!(
            matches!(
                outcome,
                StopOutcome::Checkpointed { next_offset: 4 } | StopOutcome::Clean
            ),
            "{outcome:?}"
        );
        assert_eq!(store.peek(0).unwrap().unwrap().next_offset, 4);
    }

    /// Keeps what it is given, delivered at once.
    #[derive(Default)]
    struct Recording(Mutex<Vec<Output>>);

    impl OutputSink for Recording {
        fn publish(&self, _: i32, out: &[Output], _: &Arc<Delivery>) -> Result<(), SinkError> {
            self.0.lock().extend_from_slice(out);
            Ok(())
        }
    }

    /// Alice's events 0..3 through a worker (the real config admits one per
    /// window), with `shadow` beside it; its outputs and final checkpoint.
    fn run_alice(shadow: Option<Shadow>) -> (Vec<Output>, Checkpoint, Arc<WorkerContext>) {
        let (sink, store) = (
            Arc::new(Recording::default()),
            Arc::new(MemoryCheckpoints::default()),
        );
        let Ok(mut c) = Arc::try_unwrap(ctx(sink.clone(), store.clone())) else {
            panic!("a fresh context is not shared")
        };
        c.shadow = shadow;
        let ctx = Arc::new(c);
        let (epoch, _) = store.acquire(0).unwrap();
        let (tx, rx) = channel(CHANNEL_DEPTH);
        let worker =
            Worker::spawn(ctx.clone(), 0, epoch, None, tx, ChannelSource::new(rx)).unwrap();
        feed(&ctx, &worker.sender(), "alice", 0..3);
        wait_until("the events", || worker.position() == 3);
        assert!(matches!(
            worker.stop(STOP_TIMEOUT),
            StopOutcome::Checkpointed { next_offset: 3 } | StopOutcome::Clean
        ));
        let mut cp = store.peek(0).unwrap().expect("a checkpoint");
        cp.keys.sort_by_key(|k| k.key);
        let out = sink.0.lock().clone();
        (out, cp, ctx)
    }

    #[test]
    fn a_shadow_config_decides_apart_and_never_holds_up_the_real_outputs_or_checkpoints() {
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 2, "window": "10s"}]}"#,
        )
        .unwrap();
        let limiter = Arc::new(Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap());
        // Its deliveries are never settled: the real checkpoint must not wait.
        let held = Arc::new(HeldSink::default());
        let shadow = Shadow {
            limiter,
            sink: Some(held.clone()),
        };
        let (real, cp, ctx) = run_alice(Some(shadow));
        let (alone, cp_alone, _) = run_alice(None);
        assert_eq!(real, alone);
        assert_eq!(cp, cp_alone);
        let [Output::Decision(block)] = &real[..] else {
            panic!("{real:?}")
        };
        assert_eq!(block.decision_id, "requests:0:1:decision:0");
        // The shadow admits two: its block is the third event's.
        assert_eq!(held.held.lock().len(), 1);
        let shadow = &ctx.metrics.stream.shadow_decisions;
        assert_eq!(shadow.with_label_values(&["block"]).get(), 1);
    }

    /// Records that come while the worker holds still for a version
    /// switch are kept and handed over first; a stop request behind them
    /// is answered once they are (the embedded bus loses nothing it took).
    #[test]
    fn a_channel_source_keeps_the_records_and_the_stop_seen_while_holding_still() {
        let (tx, rx) = channel(8);
        let mut source = ChannelSource::new(rx);
        for offset in 0..2 {
            let r = BusRecord {
                offset,
                broker_ts_ms: None,
                key: None,
                payload: vec![],
            };
            tx.send(Msg::Record(r)).unwrap();
        }
        let (ack, _ack_rx) = mpsc::sync_channel(1);
        tx.send(Msg::Stop(StopRequest { ack })).unwrap();
        assert!(matches!(
            source.control(Duration::from_millis(50)),
            Control::Continue
        ));
        let mut seen = Vec::new();
        let control = source.poll(Duration::from_millis(50), &mut |_, r| seen.push(r.offset));
        assert_eq!(seen, vec![0, 1]);
        assert!(matches!(control, Control::Stop(_)));
    }

    /// A channel source whose takeover marks are given.
    struct Marked {
        inner: ChannelSource,
        marks: [i64; 2],
    }

    impl Source for Marked {
        fn poll(
            &mut self,
            timeout: Duration,
            f: &mut dyn FnMut(Stream, InputRecord<'_>),
        ) -> Control {
            self.inner.poll(timeout, f)
        }

        fn control(&mut self, timeout: Duration) -> Control {
            self.inner.control(timeout)
        }

        fn takeover_marks(&mut self) -> Result<Option<[i64; 2]>, String> {
            Ok(Some(self.marks))
        }
    }

    /// A partition resumed from a checkpoint of version 1 while version 2
    /// runs decides with version 1 up to the offsets its previous owner may
    /// have decided (here 3), then saves a checkpoint of version 2 at its
    /// offsets before deciding anything with it.
    #[test]
    fn a_resumed_partition_keeps_its_checkpoints_version_up_to_the_takeover_marks() {
        let (sink, store) = (
            Arc::new(Recording::default()),
            Arc::new(MemoryCheckpoints::default()),
        );
        let ctx = ctx(sink.clone(), store.clone());
        let (epoch, _) = store.acquire(0).unwrap();
        let first = Checkpoint {
            config_version: 1,
            key_check: ctx.processing.processor.key_check,
            ..Checkpoint::default()
        };
        store.save(0, epoch, &first).unwrap();
        let three = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 3, "window": "10s"}]}"#,
        )
        .unwrap();
        assert_eq!(ctx.processing.limiter.replace_rules(three).unwrap(), 2);
        let (epoch, restored) = store.acquire(0).unwrap();
        let (tx, rx) = channel(CHANNEL_DEPTH);
        let source = Marked {
            inner: ChannelSource::new(rx),
            marks: [3, 0],
        };
        let worker = Worker::spawn(ctx.clone(), 0, epoch, restored, tx, source).unwrap();
        feed(&ctx, &worker.sender(), "alice", 0..3);
        wait_until("the switch to version 2", || {
            store
                .peek(0)
                .unwrap()
                .is_some_and(|cp| cp.config_version == 2)
        });
        assert_eq!(store.peek(0).unwrap().unwrap().next_offset, 3);
        feed(&ctx, &worker.sender(), "alice", 3..6);
        wait_until("the events", || worker.position() == 6);
        assert!(matches!(
            worker.stop(STOP_TIMEOUT),
            StopOutcome::Checkpointed { next_offset: 6 } | StopOutcome::Clean
        ));
        let decided: Vec<(i64, Action, i64)> = sink
            .0
            .lock()
            .iter()
            .filter_map(|o| match o {
                Output::Decision(d) => Some((d.source_offset, d.action, d.config_version)),
                _ => None,
            })
            .collect();
        // Version 1 (one per window) blocks alice at 1; version 2 (three)
        // lets her through at 3 and blocks her at 5.
        assert_eq!(
            decided,
            vec![
                (1, Action::Block, 1),
                (3, Action::Unblock, 2),
                (5, Action::Block, 2)
            ]
        );
        assert_eq!(store.peek(0).unwrap().unwrap().config_version, 2);
    }

    /// A shadow sink that refuses everything: its decisions are dropped and
    /// counted, the real ones flow.
    #[test]
    fn a_refusing_shadow_sink_drops_shadow_decisions_only() {
        struct Refusing;
        impl OutputSink for Refusing {
            fn publish(&self, _: i32, _: &[Output], _: &Arc<Delivery>) -> Result<(), SinkError> {
                Err(SinkError("full (test)".into()))
            }
        }
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "10s"}]}"#,
        )
        .unwrap();
        let shadow = Shadow {
            limiter: Arc::new(Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap()),
            sink: Some(Arc::new(Refusing)),
        };
        let (real, _, ctx) = run_alice(Some(shadow));
        assert_eq!(real.len(), 1);
        assert_eq!(ctx.metrics.stream.shadow_decisions_dropped.get(), 1);
    }
}
