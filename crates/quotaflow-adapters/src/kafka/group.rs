//! The consumer-group member. Its rebalance callback only translates: it
//! splits each assigned partition's queue off the consumer, forwards the
//! partitions to the [`Coordinator`] (which restores and starts them, or
//! drains and checkpoints them) and tells librdkafka the outcome.
//!
//! The group assigns partitions of the requests topic only; with requests
//! partition q this member also assigns itself partition q of the
//! repartition topic (the home side of q), at the offset of q's checkpoint,
//! and hands it back with q. Both are read by q's worker, under q's
//! fencing epoch, so the two positions are checkpointed together.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use super::consumer_config;
use super::partition_queue::{BatchQueue, Fetched};
use crate::coordinator::Coordinator;
use crate::settings::KafkaSettings;
use crate::worker::{Control, Msg, Source, Stream};
use quotaflow_core::pipeline::partition::InputRecord;

/// A partition's records, from its own librdkafka queues (requests and
/// repartition); the worker's channel carries only the stop request.
struct QueueSource {
    queue: BatchQueue<ConsumerCtx>,
    routed: BatchQueue<ConsumerCtx>,
    control: Receiver<Msg>,
    /// When the last repartition record came.
    last_routed: Option<Instant>,
    /// Where the partition's high watermarks are asked (the takeover marks).
    marks: Marks,
}

/// What a worker needs to read its partition's high watermarks.
struct Marks {
    consumer: Weak<BaseConsumer<ConsumerCtx>>,
    requests_topic: String,
    repartition_topic: String,
    partition: i32,
}

/// Bound on each ask for a partition's high watermark.
const MARKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a worker waits on its queue before looking at its channel: the
/// bound on how long a revoke waits for the worker to notice.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Records taken per wake-up before the channel is looked at again.
const BURST: usize = 512;
/// Records taken from the queue per call.
const BATCH: usize = 128;
/// A Kafka-fed worker's channel carries only its stop request.
const CONTROL_DEPTH: usize = 1;

impl Source for QueueSource {
    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(Stream, InputRecord<'_>)) -> Control {
        match self.control.try_recv() {
            Ok(Msg::Stop(req)) => return Control::Stop(req),
            Ok(Msg::Record(_) | Msg::Wake) | Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => return Control::Closed,
        }
        // Both queues in turn, a batch of each, so neither starves the
        // other. Only the requests queue is waited on: while repartition
        // records came lately the wait is a short slice, so they are not
        // held back by a quiet requests partition; with every limit aligned
        // none ever come and the worker sleeps as before.
        let slice = if self
            .last_routed
            .is_some_and(|t| t.elapsed() < ROUTED_RECENTLY)
        {
            ROUTED_SLICE
        } else {
            POLL_SLICE
        };
        let mut wait = timeout.min(slice);
        let mut taken = 0;
        while taken < BURST {
            let routed = self.routed.drain(Duration::ZERO, &mut |r| match r {
                Fetched::Ok(r) => f(Stream::Repartition, r),
                Fetched::Err(error) => tracing::warn!(event = "consumer_error", error),
            });
            if routed > 0 {
                self.last_routed = Some(Instant::now());
                wait = Duration::ZERO;
            }
            let n = self.queue.drain(wait, &mut |r| match r {
                Fetched::Ok(r) => f(Stream::Requests, r),
                Fetched::Err(error) => tracing::warn!(event = "consumer_error", error),
            });
            if routed + n == 0 {
                break;
            }
            taken += routed + n;
            wait = Duration::ZERO;
        }
        Control::Continue
    }

    fn control(&mut self, timeout: Duration) -> Control {
        match self.control.recv_timeout(timeout) {
            Ok(Msg::Stop(req)) => Control::Stop(req),
            Ok(Msg::Record(_) | Msg::Wake) | Err(RecvTimeoutError::Timeout) => Control::Continue,
            Err(RecvTimeoutError::Disconnected) => Control::Closed,
        }
    }

    /// The log end offsets of both topics' partition, from the broker: a
    /// previous owner decided nothing at or beyond them, since it could
    /// not read it. An empty partition (everything deleted, or never
    /// written) holds nothing to replay: its mark is 0, passed at once,
    /// since no record would ever move the position up to its end.
    fn takeover_marks(&mut self) -> Result<Option<[i64; 2]>, String> {
        let m = &self.marks;
        let consumer = m
            .consumer
            .upgrade()
            .ok_or_else(|| "the consumer is closing".to_string())?;
        let high = |topic: &str| {
            consumer
                .fetch_watermarks(topic, m.partition, MARKS_TIMEOUT)
                .map(|(low, high)| if low >= high { 0 } else { high })
                .map_err(|e| format!("{topic}/{}: {e}", m.partition))
        };
        Ok(Some([
            high(&m.requests_topic)?,
            high(&m.repartition_topic)?,
        ]))
    }
}

/// How long after its last repartition record a worker keeps waiting on
/// its requests queue in short slices.
const ROUTED_RECENTLY: Duration = Duration::from_secs(1);
/// The wait on the requests queue meanwhile: the most a repartition record
/// waits for a worker whose requests partition is quiet.
const ROUTED_SLICE: Duration = Duration::from_millis(2);

struct ConsumerCtx {
    coordinator: Arc<Coordinator>,
    topic: String,
    /// `kafka.repartition_topic`: its partition q goes with requests q.
    repartition_topic: String,
    session_timeout: Duration,
    /// The consumer itself, set right after it is created: splitting a
    /// partition queue needs an `Arc` of it, and the rebalance callback is
    /// handed only a reference.
    consumer: OnceLock<Weak<BaseConsumer<ConsumerCtx>>>,
    /// Each partition's high watermark, from librdkafka's statistics (its
    /// fetch responses): the lag gauge reads it without a broker call.
    high_watermarks: parking_lot::Mutex<HashMap<i32, i64>>,
}

impl ClientContext for ConsumerCtx {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut high = self.high_watermarks.lock();
        for (&p, s) in &topic.partitions {
            // The partition -1 is librdkafka's "unassigned" bucket; -1 is an
            // offset not known yet.
            if p >= 0 && s.hi_offset >= 0 {
                high.insert(p, s.hi_offset);
            }
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        let m = &self.coordinator.context().metrics.stream;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                m.rebalances.with_label_values(&["assign"]).inc();
                let assignment = self.assign(&partitions);
                let result = if cooperative {
                    consumer.incremental_assign(&assignment)
                } else {
                    consumer.assign(&assignment)
                };
                if let Err(e) = result {
                    tracing::error!(event = "assign_failed", error = %e, "could not assign partitions");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                m.rebalances.with_label_values(&["revoke"]).inc();
                if consumer.assignment_lost() {
                    self.coordinator.lose(&partitions);
                } else {
                    self.coordinator.revoke(&partitions);
                }
                let result = if cooperative {
                    // The repartition partitions this member took with them.
                    let mut both = tpl.clone();
                    for &p in &partitions {
                        let _ =
                            both.add_partition_offset(&self.repartition_topic, p, Offset::Invalid);
                    }
                    consumer.incremental_unassign(&both)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(event = "unassign_failed", error = %e);
                }
            }
            other => {
                tracing::error!(event = "rebalance_error", error = ?other, "rebalance failed; dropping the assignment");
                self.coordinator.lose_all();
                let _ = consumer.unassign();
            }
        }
    }
}

impl ConsumerCtx {
    fn marks(&self, consumer: &Arc<BaseConsumer<ConsumerCtx>>, partition: i32) -> Marks {
        Marks {
            consumer: Arc::downgrade(consumer),
            requests_topic: self.topic.clone(),
            repartition_topic: self.repartition_topic.clone(),
            partition,
        }
    }

    /// Hand `partitions` to the coordinator, each with its own queue split
    /// off before it is assigned (so that no record of it is ever fetched
    /// into the group's queue), and list them at their checkpoints' offsets.
    fn assign(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut assignment = TopicPartitionList::new();
        let Some(me) = self.consumer.get().and_then(Weak::upgrade) else {
            tracing::error!(
                event = "assign_failed",
                "consumer is closing; not taking partitions"
            );
            return assignment;
        };
        let taken = self
            .coordinator
            .assign(partitions, CONTROL_DEPTH, |t, control| {
                let queue = BatchQueue::split(&me, &self.topic, t.partition, BATCH)?;
                let routed = BatchQueue::split(&me, &self.repartition_topic, t.partition, BATCH)?;
                Some(QueueSource {
                    queue,
                    routed,
                    control,
                    last_routed: None,
                    marks: self.marks(&me, t.partition),
                })
            });
        for t in taken {
            let offset = t.next_offset.map_or(Offset::Beginning, Offset::Offset);
            let home = t.home_offset.map_or(Offset::Beginning, Offset::Offset);
            let added = assignment
                .add_partition_offset(&self.topic, t.partition, offset)
                .and_then(|()| {
                    assignment.add_partition_offset(&self.repartition_topic, t.partition, home)
                });
            if let Err(e) = added {
                tracing::error!(event = "assign_failed", partition = t.partition, error = %e);
            }
        }
        assignment
    }
}

/// How often the consumer thread looks for partitions whose worker
/// stopped on its own.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// A partition whose worker was fenced is taken over again only if the
/// group still assigns it here this long after: a member that lost it
/// (paused past its session) learns so from the group within a session
/// timeout, and is revoked before this.
fn fenced_grace(session_timeout: Duration) -> Duration {
    session_timeout.saturating_mul(2)
}

/// Take over again, through the coordinator, the partitions whose worker
/// stopped on its own while still assigned here, each resumed at its
/// checkpoint (a worker that gave its partition up must not keep it idle).
fn retake_stopped(consumer: &Arc<BaseConsumer<ConsumerCtx>>, ctx: &ConsumerCtx) {
    ctx.coordinator.retake_stopped(
        fenced_grace(ctx.session_timeout),
        CONTROL_DEPTH,
        |t, control| {
            // Rewind before the new worker reads anything: records the old
            // worker left queued are from before the seek, and librdkafka
            // drops them.
            let offset = t.next_offset.map_or(Offset::Beginning, Offset::Offset);
            let home = t.home_offset.map_or(Offset::Beginning, Offset::Offset);
            let sought = consumer
                .seek(&ctx.topic, t.partition, offset, SEEK_TIMEOUT)
                .and_then(|()| {
                    consumer.seek(&ctx.repartition_topic, t.partition, home, SEEK_TIMEOUT)
                });
            if let Err(e) = sought {
                tracing::error!(event = "seek_failed", partition = t.partition, error = %e, "could not rewind the retaken partition to its checkpoint; it stays idle until the next rebalance");
                return None;
            }
            let queue = BatchQueue::split(consumer, &ctx.topic, t.partition, BATCH)?;
            let routed = BatchQueue::split(consumer, &ctx.repartition_topic, t.partition, BATCH)?;
            Some(QueueSource {
                queue,
                routed,
                control,
                last_routed: None,
                marks: ctx.marks(consumer, t.partition),
            })
        },
    );
}

/// Bound on rewinding a retaken partition.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// A running consumer-group member.
pub struct KafkaProcessor {
    coordinator: Arc<Coordinator>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl KafkaProcessor {
    /// Join the group and process until [`KafkaProcessor::stop`].
    pub fn start(
        coordinator: Arc<Coordinator>,
        settings: &KafkaSettings,
        ready: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = ConsumerCtx {
            coordinator: coordinator.clone(),
            topic: settings.requests_topic.clone(),
            repartition_topic: settings.repartition_topic(),
            session_timeout: settings.session_timeout,
            consumer: OnceLock::new(),
            high_watermarks: Default::default(),
        };
        let mut config = consumer_config(settings);
        if !settings.properties.contains_key(STATISTICS_INTERVAL) {
            config.set(STATISTICS_INTERVAL, LAG_EVERY.as_millis().to_string());
        }
        let consumer: Arc<BaseConsumer<ConsumerCtx>> = Arc::new(
            config
                .create_with_context(ctx)
                .context("creating the Kafka consumer")?,
        );
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        consumer
            .subscribe(&[&settings.requests_topic])
            .with_context(|| format!("subscribing to {}", settings.requests_topic))?;
        let flag = stop.clone();
        let join = std::thread::Builder::new()
            .name("quotaflow-consumer".into())
            .spawn(move || consume(consumer, flag, ready))
            .context("starting the consumer thread")?;
        Ok(Self {
            coordinator,
            stop,
            join: Some(join),
        })
    }

    /// Stop consuming: every partition drains and writes a final checkpoint
    /// (within the coordinator's deadline), then the consumer leaves the group.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The consumer thread may be restoring partitions in a rebalance
        // callback, retrying while Redis is unreachable: let it give up.
        self.coordinator.shut_down();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

const STATISTICS_INTERVAL: &str = "statistics.interval.ms";

/// How often the lag gauge is refreshed (librdkafka's statistics come as
/// often: `statistics.interval.ms`, set in `KafkaProcessor::start`).
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Set every running partition's lag: its high watermark less the worker's
/// next offset. A partition without statistics yet asks the broker once,
/// briefly (this runs on the thread that polls the group); a lag still
/// unknown is left unset, not reported as 0.
fn update_lag(consumer: &BaseConsumer<ConsumerCtx>, ctx: &ConsumerCtx, asked: &mut HashSet<i32>) {
    let lag = &ctx.coordinator.context().metrics.stream.partition_lag;
    for (p, pos) in ctx.coordinator.positions() {
        let known = ctx.high_watermarks.lock().get(&p).copied();
        let high = match known {
            Some(h) => h,
            None if asked.insert(p) => {
                match consumer.fetch_watermarks(&ctx.topic, p, Duration::from_millis(200)) {
                    Ok((_, h)) => h,
                    Err(_) => continue,
                }
            }
            None => continue,
        };
        lag.with_label_values(&[&p.to_string()])
            .set(high.saturating_sub(pos).max(0));
    }
}

fn consume(
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
) {
    let ctx = consumer.context();
    let mut last_lag = Instant::now();
    let mut asked_watermarks = HashSet::new();
    let mut last_reap = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        // Records go to the partition queues; this serves group events.
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => tracing::error!(
                event = "unexpected_record",
                partition = m.partition(),
                offset = m.offset(),
                "record reached the group queue instead of its partition's; it is skipped here and replayed by the partition's next owner"
            ),
            Some(Err(e)) => tracing::warn!(event = "consumer_error", error = %e),
            None => {}
        }
        ready.store(true, Ordering::SeqCst);
        if last_reap.elapsed() >= REAP_EVERY {
            last_reap = Instant::now();
            retake_stopped(&consumer, ctx);
        }
        if last_lag.elapsed() >= LAG_EVERY {
            last_lag = Instant::now();
            update_lag(&consumer, ctx, &mut asked_watermarks);
        }
    }
    ctx.coordinator.revoke_all();
    // Dropping the last reference closes the consumer: it leaves the group
    // (the revoke callback finds no partitions left) before returning.
    drop(consumer);
    tracing::info!(event = "consumer_stopped", "left the consumer group");
}
