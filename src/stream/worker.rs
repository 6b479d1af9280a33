//! One thread per owned partition: decode, process, publish, checkpoint.
//!
//! The same worker serves Kafka partitions and the embedded bus; only the
//! source feeding its channel, the sink and the checkpoint store differ.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::avro::Codec;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::pipeline::partition::InputRecord;
use crate::pipeline::records::Action;
use crate::pipeline::{
    Checkpoint, CheckpointError, CheckpointStore, Output, OutputSink, PartitionProcessor,
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

enum Msg {
    Record(Record),
    Stop(SyncSender<()>),
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
/// Bound on each wait for outputs to be delivered before a checkpoint.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Records buffered per partition between the source and its worker.
const CHANNEL_DEPTH: usize = 4096;

/// A running partition worker.
pub struct Worker {
    partition: i32,
    tx: SyncSender<Msg>,
    join: Option<JoinHandle<()>>,
}

impl Worker {
    /// Take `partition` at `epoch`, resuming from `restored`.
    pub fn spawn(
        shared: Arc<Shared>,
        partition: i32,
        epoch: u64,
        restored: Option<Checkpoint>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(CHANNEL_DEPTH);
        let join = std::thread::Builder::new()
            .name(format!("quotaflow-p{partition}"))
            .spawn(move || run(shared, partition, epoch, restored, rx))?;
        Ok(Self {
            partition,
            tx,
            join: Some(join),
        })
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Hand a record to the worker (blocks while its queue is full). `false`
    /// when the worker has stopped, e.g. because it was fenced.
    pub fn send(&self, record: Record) -> bool {
        self.tx.send(Msg::Record(record)).is_ok()
    }

    /// Process everything queued, write a final checkpoint and stop.
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

fn run(
    shared: Arc<Shared>,
    partition: i32,
    epoch: u64,
    restored: Option<Checkpoint>,
    rx: Receiver<Msg>,
) {
    let store = Arc::new(KeyedStore::new(shared.shards));
    let mut proc =
        PartitionProcessor::new(shared.processor.clone(), partition, store.clone(), restored);
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
    let mut out = Vec::new();
    let mut last_checkpoint = Instant::now();
    let mut dirty = false;
    loop {
        let wait = shared
            .checkpoint_interval
            .saturating_sub(last_checkpoint.elapsed());
        match rx.recv_timeout(wait) {
            Ok(Msg::Record(r)) => {
                let event = shared
                    .codec
                    .decode_request(&r.payload)
                    .map_err(|e| format!("undecodable: {e}"));
                let input = InputRecord {
                    offset: r.offset,
                    broker_ts_ms: r.broker_ts_ms,
                    key: r.key.as_deref(),
                    payload: &r.payload,
                };
                proc.process(&shared.limiter, input, event, &mut out);
                consumed.inc();
                if !out.is_empty() {
                    count_outputs(&shared.metrics, &out);
                    publish(&shared, partition, &out);
                    out.clear();
                }
                dirty = true;
            }
            Ok(Msg::Stop(ack)) => {
                if dirty {
                    checkpoint(&shared, &proc, epoch);
                }
                let _ = ack.send(());
                break;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if dirty {
                    checkpoint(&shared, &proc, epoch);
                }
                break;
            }
        }
        if last_checkpoint.elapsed() >= shared.checkpoint_interval {
            last_checkpoint = Instant::now();
            shared.metrics.keys_expired.inc_by(proc.take_expired());
            if dirty {
                match checkpoint(&shared, &proc, epoch) {
                    Saved::Yes => dirty = false,
                    Saved::Fenced => break,
                    Saved::No => {}
                }
            }
        }
    }
    // When fenced, another instance owns the partition now: our state goes,
    // and the source stops feeding us (sends fail once `rx` is dropped).
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

enum Saved {
    Yes,
    No,
    Fenced,
}

fn checkpoint(shared: &Shared, proc: &PartitionProcessor, epoch: u64) -> Saved {
    let started = Instant::now();
    let m = &shared.metrics.stream;
    let partition = proc.partition();
    if let Err(e) = shared.sink.flush(FLUSH_TIMEOUT) {
        m.checkpoint_failures.with_label_values(&["flush"]).inc();
        tracing::warn!(event = "checkpoint_skipped", partition, error = %e, "outputs not delivered; checkpoint postponed");
        return Saved::No;
    }
    let cp = proc.checkpoint(shared.limiter.rules().version);
    match shared.checkpoints.save(partition, epoch, &cp) {
        Ok(()) => {
            m.checkpoint_duration
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(
                event = "checkpoint",
                partition,
                next_offset = cp.next_offset,
                keys = cp.keys.len()
            );
            Saved::Yes
        }
        Err(e @ CheckpointError::Fenced { .. }) => {
            m.checkpoint_failures.with_label_values(&["fenced"]).inc();
            tracing::warn!(event = "checkpoint_fenced", partition, error = %e, "partition taken by another instance; stopping its worker");
            Saved::Fenced
        }
        Err(e) => {
            let reason = match e {
                CheckpointError::Unavailable(_) => "unavailable",
                CheckpointError::Backwards { .. } => "backwards",
                _ => "corrupt",
            };
            m.checkpoint_failures.with_label_values(&[reason]).inc();
            tracing::warn!(event = "checkpoint_failed", partition, error = %e, "checkpoint not written; will retry");
            Saved::No
        }
    }
}

fn publish(shared: &Shared, partition: i32, out: &[Output]) {
    // A sink refuses only when its local queue stays full; keep trying, the
    // source is backpressured meanwhile and nothing is dropped.
    let mut backoff = Duration::from_millis(5);
    while let Err(e) = shared.sink.publish(partition, out) {
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
