//! Publishes outputs to the decisions, alerts and dead-letter topics, each
//! with its deterministic id in a header, and repartition records to their
//! home partition of the repartition topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use super::polled::PolledProducer;
use super::{client_config, ERROR_HEADER, ID_HEADER, SOURCE_HEADER};
use crate::avro::Codec;
use crate::settings::KafkaSettings;
use quotaflow_core::pipeline::{Delivery, Output, OutputSink, SinkError};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sends {
    /// Decisions, alerts, dead letters and routed events: a failure stops
    /// the partition's checkpoints.
    Outputs,
    /// A shadow config's decisions: a failure costs those decisions only.
    Shadow,
    /// Synchronous hits: a failure is answered by the failure mode.
    Hits,
}

struct SinkContext {
    sends: Sends,
}

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Arc<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Arc<Delivery>) {
        match result {
            Err((e, m)) if self.sends == Sends::Shadow => {
                tracing::warn!(event = "shadow_delivery_failed", topic = m.topic(), error = %e, "shadow decision not delivered; the real outputs are not affected");
            }
            Err((e, m)) if self.sends == Sends::Hits => {
                tracing::error!(event = "sync_hit_not_appended", partition = m.partition(), error = %e, "a synchronous hit could not be appended to its partition's log; it is answered by its limit's failure mode and stays counted");
            }
            Err((e, m)) => {
                tracing::error!(event = "delivery_failed", topic = m.topic(), error = %e, "output not delivered; its partition stops, and is taken over again from its last checkpoint and replayed");
            }
            Ok(_) => {}
        }
        delivery.done(result.is_ok());
    }
}

/// Publishes outputs to the decisions, alerts and dead-letter topics.
pub struct KafkaSink {
    producer: PolledProducer<SinkContext>,
    /// Synchronous hits, which a client waits for: sent at once (no
    /// linger), apart from the batched outputs. Made at start, so that its
    /// connection and idempotent-producer id are ready by the first hit.
    hits: Option<PolledProducer<SinkContext>>,
    codec: Arc<Codec>,
    settings: KafkaSettings,
    /// `settings.repartition_topic()`, resolved once.
    repartition_topic: String,
    /// How long a send waits for room in a full producer queue.
    queue_full_wait: Duration,
}

impl KafkaSink {
    pub fn new(settings: &KafkaSettings, codec: Arc<Codec>) -> anyhow::Result<Self> {
        // Block decisions are what gateways wait for: batch briefly. Retry
        // until delivered (no message timeout): a failed output is never
        // dropped silently.
        let producer = sink_producer(settings, Sends::Outputs, "1", "0")
            .context("creating the Kafka producer")?;
        let hits = sink_producer(settings, Sends::Hits, "1", "0")
            .context("creating the synchronous hits' Kafka producer")?;
        Ok(Self {
            producer,
            hits: Some(hits),
            codec,
            settings: settings.clone(),
            repartition_topic: settings.repartition_topic(),
            queue_full_wait: Duration::from_secs(30),
        })
    }

    /// The shadow config's decisions, to `kafka.shadow_decisions_topic`.
    /// A producer of its own, which gives up after a minute and never
    /// waits for queue room, so the shadow can neither hold up nor fail
    /// the real outputs (nor their checkpoints).
    pub fn shadow(settings: &KafkaSettings, codec: Arc<Codec>) -> anyhow::Result<Self> {
        let producer = sink_producer(settings, Sends::Shadow, "5", "60000")
            .context("creating the shadow decisions' Kafka producer")?;
        let mut settings = settings.clone();
        settings.decisions_topic = settings.shadow_decisions_topic.clone();
        Ok(Self {
            producer,
            // The shadow's decisions only: no hits go through it.
            hits: None,
            codec,
            repartition_topic: settings.repartition_topic(),
            settings,
            queue_full_wait: Duration::ZERO,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        payload: &[u8],
        headers: OwnedHeaders,
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        let deadline = Instant::now() + self.queue_full_wait;
        delivery.queued();
        loop {
            let mut record = BaseRecord::with_opaque_to(topic, delivery.clone())
                .key(key)
                .payload(payload)
                .headers(headers.clone());
            if let Some(p) = partition {
                record = record.partition(p);
            }
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

/// An idempotent producer for `sends`, with its `linger.ms` and
/// `message.timeout.ms`.
fn sink_producer(
    settings: &KafkaSettings,
    sends: Sends,
    linger_ms: &str,
    timeout_ms: &str,
) -> rdkafka::error::KafkaResult<PolledProducer<SinkContext>> {
    let name = match sends {
        Sends::Outputs => "kafka-outputs",
        Sends::Shadow => "kafka-shadow",
        Sends::Hits => "kafka-hits",
    };
    PolledProducer::new(
        client_config(settings)
            .set("enable.idempotence", "true")
            .set("linger.ms", linger_ms)
            .set("message.timeout.ms", timeout_ms),
        SinkContext { sends },
        name,
    )
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
    fn append_hit(
        &self,
        partition: i32,
        record: &[u8],
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        let producer = self
            .hits
            .as_ref()
            .ok_or_else(|| SinkError("no producer for synchronous hits".into()))?;
        delivery.queued();
        let record = BaseRecord::with_opaque_to(&self.repartition_topic, delivery.clone())
            .partition(partition)
            .key(&[][..])
            .payload(record);
        producer.send(record).map_err(|(e, _)| {
            delivery.cancelled();
            SinkError(format!("producing to {}: {e}", self.repartition_topic))
        })
    }

    fn publish_repartition(
        &self,
        partition: i32,
        home: i32,
        batch: &[u8],
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        // Informational: copies are recognised by the records' own source
        // coordinates, not by this id (a replay may batch them otherwise).
        let id = format!(
            "{}:{partition}:repartition-batch",
            self.settings.requests_topic
        );
        self.send(
            &self.repartition_topic,
            Some(home),
            &[],
            batch,
            headers(&[(ID_HEADER, &id)]),
            delivery,
        )
    }

    fn publish(
        &self,
        partition: i32,
        outputs: &[Output],
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        let enc = |e: crate::avro::EncodeError| SinkError(format!("encoding: {e}"));
        for o in outputs {
            match o {
                Output::Decision(d) => {
                    let bytes = self.codec.encode_decision(d).map_err(enc)?;
                    self.send(
                        &self.settings.decisions_topic,
                        None,
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
                        None,
                        a.key.as_bytes(),
                        &bytes,
                        headers(&[(ID_HEADER, &a.alert_id)]),
                        delivery,
                    )?;
                }
                Output::Repartition { home, record } => {
                    // Named by the source event and the place of the first
                    // of its key shapes in the record: a replaying source
                    // sends the same id.
                    let id = format!(
                        "{}:{}:{}:repartition:{}",
                        self.settings.requests_topic,
                        record.source_partition,
                        record.source_offset,
                        record.shapes.first().map_or(0, |s| s.seq)
                    );
                    self.send(
                        &self.repartition_topic,
                        Some(*home),
                        &[],
                        &record.encode(),
                        headers(&[(ID_HEADER, &id)]),
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
                        None,
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
