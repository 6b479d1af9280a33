//! Kafka adapter: a consumer-group member that takes partitions at their
//! Redis checkpoint offsets, and a producer for decisions, alerts and dead
//! letters.
//!
//! The group member is one `BaseConsumer`, polled on one thread for group
//! events only: each owned partition's records go to its own librdkafka
//! partition queue, polled by that partition's worker thread, so records
//! are handed over without a copy or a channel hop, and partitions never
//! wait on one another. The rebalance callback is overridden: on assignment
//! it bumps each partition's epoch and loads its checkpoint, splits off the
//! partition's queue and starts its worker on it, and assigns the partition
//! at the checkpoint's `next_offset` (offsets live in Redis with the state,
//! never in Kafka's group offsets); on revocation it lets each worker drain
//! and write a final checkpoint before unassigning.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use super::avro::Codec;
use super::partition_queue::{BatchQueue, Record};
use super::worker::{Control, Msg, Shared, Source, Worker, STOP_TIMEOUT};
use crate::pipeline::partition::InputRecord;
use crate::pipeline::{Delivery, Output, OutputSink, SinkError};
use crate::settings::KafkaSettings;

/// Header carrying every output's deterministic id.
pub const ID_HEADER: &str = "quotaflow.id";
/// Header carrying a dead letter's reason.
pub const ERROR_HEADER: &str = "quotaflow.error";
/// Header carrying a dead letter's origin, `topic:partition:offset`.
pub const SOURCE_HEADER: &str = "quotaflow.source";

fn client_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

struct SinkContext;

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Arc<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Arc<Delivery>) {
        if let Err((e, m)) = result {
            tracing::error!(event = "delivery_failed", topic = m.topic(), error = %e, "output not delivered; checkpoints stop until restart so it is replayed");
        }
        delivery.done(result.is_ok());
    }
}

/// Publishes outputs to the decisions, alerts and dead-letter topics.
pub struct KafkaSink {
    producer: ThreadedProducer<SinkContext>,
    codec: Arc<Codec>,
    settings: KafkaSettings,
}

impl KafkaSink {
    pub fn new(settings: &KafkaSettings, codec: Arc<Codec>) -> anyhow::Result<Self> {
        let producer = client_config(settings)
            .set("enable.idempotence", "true")
            // Block decisions are what gateways wait for: batch briefly.
            .set("linger.ms", "1")
            // Retry until delivered: a failed output is never dropped silently.
            .set("message.timeout.ms", "0")
            .create_with_context(SinkContext)
            .context("creating the Kafka producer")?;
        Ok(Self {
            producer,
            codec,
            settings: settings.clone(),
        })
    }

    fn send(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: OwnedHeaders,
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        delivery.queued();
        loop {
            let record = BaseRecord::with_opaque_to(topic, delivery.clone())
                .key(key)
                .payload(payload)
                .headers(headers.clone());
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    delivery.cancelled();
                    return Err(SinkError(format!("producing to {topic}: {e}")));
                }
            }
        }
    }
}

fn headers(pairs: &[(&str, &str)]) -> OwnedHeaders {
    pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        })
    })
}

impl OutputSink for KafkaSink {
    fn publish(
        &self,
        partition: i32,
        outputs: &[Output],
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        let enc = |e: super::avro::EncodeError| SinkError(format!("encoding: {e}"));
        for o in outputs {
            match o {
                Output::Decision(d) => {
                    let bytes = self.codec.encode_decision(d).map_err(enc)?;
                    self.send(
                        &self.settings.decisions_topic,
                        d.key.as_bytes(),
                        &bytes,
                        headers(&[(ID_HEADER, &d.decision_id)]),
                        delivery,
                    )?;
                }
                Output::Alert(a) => {
                    let bytes = self.codec.encode_alert(a).map_err(enc)?;
                    self.send(
                        &self.settings.alerts_topic,
                        a.key.as_bytes(),
                        &bytes,
                        headers(&[(ID_HEADER, &a.alert_id)]),
                        delivery,
                    )?;
                }
                Output::DeadLetter {
                    source_offset,
                    key,
                    payload,
                    reason,
                } => {
                    let topic = &self.settings.requests_topic;
                    let source = format!("{topic}:{partition}:{source_offset}");
                    let id = format!("{source}:dead_letter:0");
                    let h = headers(&[
                        (ID_HEADER, &id),
                        (ERROR_HEADER, reason),
                        (SOURCE_HEADER, &source),
                    ]);
                    self.send(
                        &self.settings.dead_letter_topic,
                        key.as_deref().unwrap_or_default(),
                        payload,
                        h,
                        delivery,
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// A partition's records, from its own librdkafka queue; the worker's
/// channel carries only the stop request.
struct QueueSource {
    queue: BatchQueue<ConsumerCtx>,
    control: Receiver<Msg>,
}

/// Longest a worker waits on its queue before looking at its channel: the
/// bound on how long a revoke waits for the worker to notice.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Records taken per wake-up before the channel is looked at again.
const BURST: usize = 512;
/// Records taken from the queue per call.
const BATCH: usize = 128;

impl Source for QueueSource {
    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(InputRecord<'_>)) -> Control {
        match self.control.try_recv() {
            Ok(Msg::Stop(ack)) => return Control::Stop(ack),
            Ok(Msg::Record(_)) | Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => return Control::Closed,
        }
        let mut wait = timeout.min(POLL_SLICE);
        let mut taken = 0;
        while taken < BURST {
            let n = self.queue.drain(wait, &mut |r| match r {
                Record::Ok(r) => f(r),
                Record::Err(error) => tracing::warn!(event = "consumer_error", error),
            });
            if n == 0 {
                break;
            }
            taken += n;
            wait = Duration::ZERO;
        }
        Control::Continue
    }
}

struct ConsumerCtx {
    shared: Arc<Shared>,
    topic: String,
    workers: Mutex<BTreeMap<i32, Worker>>,
    stop: Arc<AtomicBool>,
    /// The consumer itself, set right after it is created: splitting a
    /// partition queue needs an `Arc` of it, and the rebalance callback is
    /// handed only a reference.
    consumer: OnceLock<Weak<BaseConsumer<ConsumerCtx>>>,
}

impl ClientContext for ConsumerCtx {}

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
        let m = &self.shared.metrics.stream;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                m.rebalances.with_label_values(&["assign"]).inc();
                let Some(me) = self.consumer.get().and_then(Weak::upgrade) else {
                    tracing::error!(
                        event = "assign_failed",
                        "consumer is closing; not taking partitions"
                    );
                    return;
                };
                let mut assignment = TopicPartitionList::new();
                for p in partitions {
                    let started = Instant::now();
                    let Some((epoch, cp)) = self.acquire(p) else {
                        return;
                    };
                    m.restore_duration.observe(started.elapsed().as_secs_f64());
                    let offset = cp
                        .as_ref()
                        .map_or(Offset::Beginning, |c| Offset::Offset(c.next_offset));
                    tracing::info!(
                        event = "partition_assigned",
                        partition = p,
                        epoch,
                        offset = cp.as_ref().map_or(0, |c| c.next_offset),
                        keys = cp.as_ref().map_or(0, |c| c.keys.len()),
                        restore_ms = started.elapsed().as_millis() as u64,
                        "took partition"
                    );
                    // Split before assigning, so that no record of the
                    // partition is ever fetched into the group's queue.
                    let Some(queue) = BatchQueue::split(&me, &self.topic, p, BATCH) else {
                        tracing::error!(
                            event = "assign_failed",
                            partition = p,
                            "no partition queue"
                        );
                        continue;
                    };
                    let spawned = Worker::spawn(self.shared.clone(), p, epoch, cp, 1, |control| {
                        QueueSource { queue, control }
                    });
                    match spawned {
                        Ok(w) => {
                            self.workers.lock().insert(p, w);
                            if let Err(e) = assignment.add_partition_offset(&self.topic, p, offset)
                            {
                                tracing::error!(event = "assign_failed", partition = p, error = %e);
                            }
                        }
                        Err(e) => {
                            tracing::error!(event = "worker_spawn_failed", partition = p, error = %e)
                        }
                    }
                }
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
                let revoked: Vec<Worker> = {
                    let mut workers = self.workers.lock();
                    partitions
                        .iter()
                        .filter_map(|p| workers.remove(p))
                        .collect()
                };
                for w in revoked {
                    tracing::info!(
                        event = "partition_revoked",
                        partition = w.partition(),
                        "draining and checkpointing"
                    );
                    w.stop(STOP_TIMEOUT);
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(event = "unassign_failed", error = %e);
                }
            }
            other => {
                tracing::error!(event = "rebalance_error", error = ?other, "rebalance failed; dropping the assignment");
                let _ = consumer.unassign();
            }
        }
    }
}

impl ConsumerCtx {
    /// Take a partition: retried while Redis is unreachable, because a
    /// partition must never be processed without its fencing epoch.
    fn acquire(&self, p: i32) -> Option<(u64, Option<crate::pipeline::Checkpoint>)> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.shared.checkpoints.acquire(p) {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::error!(event = "restore_failed", partition = p, error = %e, "cannot take partition yet; retrying");
                    if self.stop.load(Ordering::SeqCst) {
                        return None;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// librdkafka stops fetching a partition whose local queue holds more than
/// `queued.min.messages` and, by default, waits a whole second before it
/// looks again. A worker that is slower than the fetcher (the normal case
/// while catching up) then drains its queue and sits idle for the rest of
/// that second: with two partitions per instance, a third of the time.
/// Looking again after 10 ms keeps the queue topped up at the cost of a
/// timer check.
const FETCH_QUEUE_BACKOFF: &str = "fetch.queue.backoff.ms";
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// The consumer settings of a processor: offsets live in Redis, never in
/// Kafka's group offsets. Public so the raw-consumer baseline of the stream
/// benchmark fetches exactly as the processor does.
pub fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let session_ms = settings.session_timeout.as_millis().max(1000);
    let mut c = client_config(settings);
    if !settings.properties.contains_key(FETCH_QUEUE_BACKOFF) {
        c.set(FETCH_QUEUE_BACKOFF, FETCH_QUEUE_BACKOFF_MS);
    }
    c.set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", session_ms.to_string())
        .set("heartbeat.interval.ms", (session_ms / 3).to_string());
    c
}

/// A running consumer-group member.
pub struct KafkaProcessor {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl KafkaProcessor {
    /// Join the group and process until [`KafkaProcessor::stop`].
    pub fn start(
        shared: Arc<Shared>,
        settings: &KafkaSettings,
        ready: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = ConsumerCtx {
            shared,
            topic: settings.requests_topic.clone(),
            workers: Mutex::new(BTreeMap::new()),
            stop: stop.clone(),
            consumer: OnceLock::new(),
        };
        let consumer: Arc<BaseConsumer<ConsumerCtx>> = Arc::new(
            consumer_config(settings)
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
            stop,
            join: Some(join),
        })
    }

    /// Stop consuming: every worker drains and writes a final checkpoint,
    /// then the consumer leaves the group.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn consume(
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
) {
    let ctx = consumer.context();
    let mut last_lag = Instant::now();
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
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            let owned: Vec<(i32, i64)> = ctx
                .workers
                .lock()
                .values()
                .filter(|w| !w.is_finished())
                .map(|w| (w.partition(), w.position()))
                .collect();
            for (p, pos) in owned {
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(&ctx.topic, p, Duration::from_millis(500))
                {
                    ctx.shared
                        .metrics
                        .stream
                        .partition_lag
                        .with_label_values(&[&p.to_string()])
                        .set((high - pos).max(0));
                }
            }
        }
    }
    let workers: Vec<Worker> = std::mem::take(&mut *ctx.workers.lock())
        .into_values()
        .collect();
    for w in workers {
        w.stop(STOP_TIMEOUT);
    }
    // Dropping the last reference closes the consumer: it leaves the group
    // (the revoke callback finds no workers left) before returning.
    drop(consumer);
    tracing::info!(event = "consumer_stopped", "left the consumer group");
}

/// Used by `simulate` and tests: a producer of request events.
pub fn request_producer(
    settings: &KafkaSettings,
) -> anyhow::Result<ThreadedProducer<rdkafka::producer::DefaultProducerContext>> {
    client_config(settings)
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()
        .context("creating the Kafka producer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_look_again_at_a_full_partition_queue_within_milliseconds() {
        let c = consumer_config(&KafkaSettings::default());
        assert_eq!(c.get(FETCH_QUEUE_BACKOFF), Some(FETCH_QUEUE_BACKOFF_MS));
    }

    #[test]
    fn an_operator_setting_for_the_fetch_queue_backoff_wins() {
        let mut settings = KafkaSettings::default();
        settings
            .properties
            .insert(FETCH_QUEUE_BACKOFF.into(), "250".into());
        let c = consumer_config(&settings);
        assert_eq!(c.get(FETCH_QUEUE_BACKOFF), Some("250"));
    }
}
