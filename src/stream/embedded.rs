//! The embedded default: the same partition workers, fed by an in-process
//! bus instead of Kafka, with outputs kept in memory (and logged) instead of
//! published, and checkpoints in memory instead of Redis.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use super::avro::EncodeError;
use super::worker::{Record, Shared, Worker, STOP_TIMEOUT};
use crate::pipeline::records::{BreachAlert, DecisionRecord, RequestEvent};
use crate::pipeline::{CheckpointError, Delivery, Output, OutputSink, SinkError};
use crate::rules::Dimension;

/// Kafka's default partitioner: murmur2 of the key, as Java clients compute
/// it (librdkafka's `murmur2_random`), so the embedded bus and Kafka agree on
/// which partition owns a key.
pub fn partition_for(key: &[u8], partitions: u32) -> i32 {
    ((murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff) % partitions.max(1)) as i32
}

struct BusPartition {
    next_offset: i64,
    worker: Option<Worker>,
}

/// An in-process, partitioned request topic.
pub struct EmbeddedBus {
    shared: Arc<Shared>,
    partitions: Vec<Mutex<BusPartition>>,
    partition_key: Vec<Dimension>,
    round_robin: AtomicUsize,
}

impl EmbeddedBus {
    /// Take every partition (bumping epochs, restoring checkpoints) and start their workers.
    pub fn start(
        shared: Arc<Shared>,
        partitions: u32,
        partition_key: Vec<Dimension>,
    ) -> Result<Self, CheckpointError> {
        let mut parts = Vec::new();
        for p in 0..partitions.max(1) as i32 {
            let (epoch, cp) = shared.checkpoints.acquire(p)?;
            let next_offset = cp.as_ref().map_or(0, |c| c.next_offset);
            let worker = Worker::spawn_channel(shared.clone(), p, epoch, cp)
                .map_err(|e| CheckpointError::Unavailable(format!("starting worker: {e}")))?;
            parts.push(Mutex::new(BusPartition {
                next_offset,
                worker: Some(worker),
            }));
        }
        Ok(Self {
            shared,
            partitions: parts,
            partition_key,
            round_robin: AtomicUsize::new(0),
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Append a raw record (any bytes: the worker decodes it, and dead-letters
    /// what it cannot). Returns its partition and offset.
    pub fn publish_raw(&self, key: Option<&[u8]>, payload: Vec<u8>) -> (i32, i64) {
        let p = match key {
            Some(k) => partition_for(k, self.partitions()),
            None => {
                (self.round_robin.fetch_add(1, Ordering::Relaxed) % self.partitions.len()) as i32
            }
        };
        let mut part = self.partitions[p as usize].lock();
        let offset = part.next_offset;
        part.next_offset += 1;
        let record = Record {
            offset,
            broker_ts_ms: Some(crate::api::now_ms() as i64),
            key: key.map(<[u8]>::to_vec),
            payload,
        };
        if let Some(w) = &part.worker {
            w.send(record);
        }
        (p, offset)
    }

    /// Encode and append a request event, keyed by the partition key.
    pub fn publish(&self, event: &RequestEvent) -> Result<(i32, i64), EncodeError> {
        let payload = self.shared.codec.encode_request(event)?;
        let key = event.partition_key(&self.partition_key);
        Ok(self.publish_raw(Some(&key), payload))
    }

    /// Drain every partition and write final checkpoints.
    pub fn stop(&self) {
        for part in &self.partitions {
            if let Some(w) = part.lock().worker.take() {
                w.stop(STOP_TIMEOUT);
            }
        }
    }
}

/// A dead letter as the embedded sink keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub source: String,
    pub reason: String,
    pub payload_len: usize,
}

/// Outputs of the embedded pipeline: the latest ones in memory (served by
/// `GET /stream/...`) and each logged as one JSON line.
pub struct EmbeddedSink {
    topic: String,
    cap: usize,
    pub decisions: Mutex<VecDeque<DecisionRecord>>,
    pub alerts: Mutex<VecDeque<BreachAlert>>,
    pub dead_letters: Mutex<VecDeque<DeadLetter>>,
}

impl EmbeddedSink {
    pub fn new(topic: &str, cap: usize) -> Self {
        Self {
            topic: topic.to_owned(),
            cap: cap.max(1),
            decisions: Mutex::default(),
            alerts: Mutex::default(),
            dead_letters: Mutex::default(),
        }
    }

    fn keep<T>(&self, q: &Mutex<VecDeque<T>>, item: T) {
        let mut q = q.lock();
        if q.len() == self.cap {
            q.pop_front();
        }
        q.push_back(item);
    }
}

impl OutputSink for EmbeddedSink {
    /// Kept synchronously: nothing is ever in flight, so `delivery` is not
    /// touched.
    fn publish(
        &self,
        partition: i32,
        outputs: &[Output],
        _delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        for o in outputs {
            match o {
                Output::Decision(d) => {
                    tracing::info!(
                        event = "decision",
                        decision_id = %d.decision_id,
                        action = ?d.action,
                        key = %d.key,
                        until_ms = d.until_ms,
                        reason = %d.reason,
                    );
                    self.keep(&self.decisions, d.clone());
                }
                Output::Alert(a) => {
                    tracing::warn!(
                        event = "breach_alert",
                        alert_id = %a.alert_id,
                        severity = ?a.severity,
                        key = %a.key,
                        refused = a.refused,
                        window_start_ms = a.window_start_ms,
                    );
                    self.keep(&self.alerts, a.clone());
                }
                Output::DeadLetter {
                    source_offset,
                    payload,
                    reason,
                    ..
                } => {
                    let source = format!("{}:{partition}:{source_offset}", self.topic);
                    tracing::warn!(event = "dead_letter", source = %source, reason = %reason);
                    self.keep(
                        &self.dead_letters,
                        DeadLetter {
                            source,
                            reason: reason.clone(),
                            payload_len: payload.len(),
                        },
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_like_java_clients() {
        // Kafka's own test vectors for Utils.murmur2.
        assert_eq!(
            murmur2::murmur2(b"21", murmur2::KAFKA_SEED) as i32,
            -973_932_308
        );
        assert_eq!(
            murmur2::murmur2(b"foobar", murmur2::KAFKA_SEED) as i32,
            -790_332_482
        );
        assert_eq!(partition_for(b"21", 1), 0);
    }
}
