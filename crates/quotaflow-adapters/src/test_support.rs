//! Helpers of the unit tests of workers and the coordinator: a context on
//! in-memory parts, a sink whose deliveries a test settles by hand, and
//! encoded events.

use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::limiter::Limiter;
use quotaflow_core::pipeline::records::RequestEvent;
use quotaflow_core::pipeline::{
    Checkpoint, CheckpointError, CheckpointStore, Delivery, MemoryCheckpoints, Output, OutputSink,
    ProcessorConfig, SinkError,
};
use quotaflow_core::rules::RulesDoc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::avro::{Codec, Encoding};
use crate::metrics::Metrics;
use crate::worker::{BusRecord, Checkpointing, Msg, Processing, WorkerContext};

/// A sink whose deliveries the test settles by hand.
#[derive(Default)]
pub struct HeldSink {
    pub held: Mutex<Vec<Arc<Delivery>>>,
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
    /// Settle every delivery held so far; how many there were.
    pub fn settle(&self, delivered: bool) -> usize {
        let held: Vec<_> = self.held.lock().drain(..).collect();
        for d in &held {
            d.done(delivered);
        }
        held.len()
    }
}

/// A sink that delivers at once.
#[derive(Default)]
pub struct InstantSink;

impl OutputSink for InstantSink {
    fn publish(&self, _: i32, _: &[Output], _: &Arc<Delivery>) -> Result<(), SinkError> {
        Ok(())
    }
}

/// One limit, `per_user`: one request per user per 10 s window, so the
/// second event of a user is refused (and publishes a BLOCK decision).
/// Checkpoints every 20 ms.
pub fn ctx(sink: Arc<dyn OutputSink>, store: Arc<dyn CheckpointStore>) -> Arc<WorkerContext> {
    ctx_with(sink, store, Duration::from_millis(20))
}

/// [`ctx`] checkpointing every `interval`.
pub fn ctx_with(
    sink: Arc<dyn OutputSink>,
    store: Arc<dyn CheckpointStore>,
    interval: Duration,
) -> Arc<WorkerContext> {
    let doc = RulesDoc::from_json(
        br#"{"limits": [{"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "10s"}]}"#,
    )
    .unwrap();
    Arc::new(WorkerContext {
        processing: Processing {
            limiter: Arc::new(Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap()),
            codec: Arc::new(Codec::new(Encoding::SingleObject).unwrap()),
            processor: Arc::new(ProcessorConfig {
                topic: "requests".into(),
                max_clock_skew_ms: 1_000,
                alert_window_ms: 60_000,
                alert_min_refused: 1_000,
                alert_critical_refused: 10_000,
                every_event: false,
                sweep_interval_ms: 3_600_000,
                key_check: 1,
                routing: None,
            }),
            shards: 1,
            key_cap: quotaflow_core::state::KeyCap::UNLIMITED,
        },
        sink,
        checkpoints: Checkpointing { store, interval },
        metrics: Arc::new(Metrics::new().unwrap()),
        shadow: None,
    })
}

/// Send events of `user` at `offsets` into a channel-fed worker.
pub fn feed(ctx: &WorkerContext, tx: &SyncSender<Msg>, user: &str, offsets: std::ops::Range<i64>) {
    for offset in offsets {
        let ts = 1_700_000_000_000 + offset;
        let e = RequestEvent {
            event_id: format!("e{offset}"),
            timestamp_ms: ts,
            user_id: Some(user.into()),
            api_key: None,
            client_ip: None,
            method: None,
            path: None,
            cost: 1,
            gateway_id: None,
        };
        let record = BusRecord {
            offset,
            broker_ts_ms: Some(ts),
            key: None,
            payload: ctx.processing.codec.encode_request(&e).unwrap(),
        };
        tx.send(Msg::Record(record)).unwrap();
    }
}

pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A checkpoint store in memory whose faults a test turns on: loads that
/// fail as if Redis were down, and slow saves.
#[derive(Default)]
pub struct FaultyStore {
    pub inner: MemoryCheckpoints,
    pub unavailable: AtomicBool,
    pub save_delay_ms: AtomicU64,
    pub acquire_attempts: AtomicU64,
}

impl CheckpointStore for FaultyStore {
    fn acquire(&self, partition: i32) -> Result<(u64, Option<Checkpoint>), CheckpointError> {
        self.acquire_attempts.fetch_add(1, Ordering::SeqCst);
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(CheckpointError::Unavailable("store down (test)".into()));
        }
        self.inner.acquire(partition)
    }

    fn save(&self, partition: i32, epoch: u64, cp: &Checkpoint) -> Result<(), CheckpointError> {
        std::thread::sleep(Duration::from_millis(
            self.save_delay_ms.load(Ordering::SeqCst),
        ));
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(CheckpointError::Unavailable("store down (test)".into()));
        }
        self.inner.save(partition, epoch, cp)
    }

    fn reseed(&self, partition: i32, ours: u64, cp: &Checkpoint) -> Result<u64, CheckpointError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(CheckpointError::Unavailable("store down (test)".into()));
        }
        self.inner.reseed(partition, ours, cp)
    }
}
