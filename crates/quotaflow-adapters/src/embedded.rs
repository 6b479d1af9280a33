//! The embedded default: the same partition workers and coordinator, fed
//! by an in-process bus instead of Kafka, with outputs kept in memory (and
//! logged) instead of published, and checkpoints in memory instead of Redis.
//! Its repartition topic is in-process too ([`Routes`]): an unaligned
//! limit's events go to the worker of their key's home partition, so, say,
//! a global limit is counted once across the bus's partitions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use crate::avro::EncodeError;
use crate::clock::now_ms;
use crate::coordinator::{Coordinator, RevokeReport};
use crate::worker::{BusRecord, ChannelSource, Msg, CHANNEL_DEPTH};
use quotaflow_core::pipeline::partitioner::partition_for;
use quotaflow_core::pipeline::records::{BreachAlert, DecisionRecord, RequestEvent};
use quotaflow_core::pipeline::{CheckpointError, Delivery, Output, OutputSink, SinkError};
use quotaflow_core::rules::Dimension;

/// One partition of the in-process repartition topic.
#[derive(Default)]
struct RoutePartition {
    next_offset: i64,
    /// The home worker's routed queue, and its channel to wake it.
    to: Option<(Sender<BusRecord>, SyncSender<Msg>)>,
}

/// The embedded bus's repartition topic: one queue per partition, read by
/// that partition's worker beside its requests. Offsets are given under the
/// partition's lock, in the order records are queued, as a broker would.
pub struct Routes {
    partitions: Vec<Mutex<RoutePartition>>,
}

impl Routes {
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions: (0..partitions.max(1))
                .map(|_| Mutex::new(RoutePartition::default()))
                .collect(),
        }
    }

    /// Append `batch` to partition `home`, waking its worker.
    fn send(&self, home: i32, batch: Vec<u8>) -> Result<(), SinkError> {
        let slot = usize::try_from(home)
            .ok()
            .and_then(|i| self.partitions.get(i))
            .ok_or_else(|| SinkError(format!("no repartition partition {home}")))?;
        let mut part = slot.lock();
        let offset = part.next_offset;
        part.next_offset += 1;
        if let Some((queue, wake)) = &part.to {
            let bus = BusRecord {
                offset,
                broker_ts_ms: None,
                key: None,
                payload: batch,
            };
            // A failed send: the home's worker stopped (shutdown); as for
            // requests, the record stays behind as one no consumer read.
            if queue.send(bus).is_ok() {
                // Full: the worker has records queued and looks at its
                // routed queue between them anyway.
                let _ = wake.try_send(Msg::Wake);
            }
        }
        Ok(())
    }
}

struct BusPartition {
    next_offset: i64,
    /// The partition's worker, while this bus's coordinator owns it.
    worker: Option<SyncSender<Msg>>,
}

/// An in-process, partitioned request topic. Its partitions are taken and
/// handed back through a [`Coordinator`], as Kafka's are.
pub struct EmbeddedBus {
    coordinator: Arc<Coordinator>,
    partitions: Vec<Mutex<BusPartition>>,
    partition_key: Vec<Dimension>,
    round_robin: AtomicUsize,
    routes: Arc<Routes>,
}

impl EmbeddedBus {
    /// Take every partition through `coordinator` (bumping epochs,
    /// restoring checkpoints) and start their workers.
    pub fn start(
        coordinator: Arc<Coordinator>,
        partitions: u32,
        partition_key: Vec<Dimension>,
        routes: Arc<Routes>,
    ) -> Result<Self, CheckpointError> {
        let all: Vec<i32> = (0..partitions.max(1))
            .filter_map(|p| i32::try_from(p).ok())
            .collect();
        let queues: Mutex<HashMap<i32, Sender<BusRecord>>> = Mutex::default();
        let taken = coordinator.assign(&all, CHANNEL_DEPTH, |t, rx| {
            let (routed_tx, routed_rx) = mpsc::channel();
            queues.lock().insert(t.partition, routed_tx);
            Some(ChannelSource::with_routed(rx, routed_rx))
        });
        let mut queues = queues.into_inner();
        let mut parts = Vec::with_capacity(all.len());
        for p in all {
            let t = taken
                .iter()
                .find(|t| t.partition == p)
                .ok_or_else(|| CheckpointError::Unavailable(format!("partition {p} not taken")))?;
            let worker = coordinator.sender(p);
            if let Some(route) = usize::try_from(p)
                .ok()
                .and_then(|i| routes.partitions.get(i))
            {
                let mut route = route.lock();
                route.next_offset = t.home_offset.unwrap_or(0);
                route.to = queues.remove(&p).zip(worker.clone());
            }
            parts.push(Mutex::new(BusPartition {
                next_offset: t.next_offset.unwrap_or(0),
                worker,
            }));
        }
        Ok(Self {
            coordinator,
            partitions: parts,
            partition_key,
            round_robin: AtomicUsize::new(0),
            routes,
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.len() as u32
    }

    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// The offset the next record of each partition will get: with a
    /// worker's position, the partition's lag.
    pub fn end_offsets(&self) -> Vec<(i32, i64)> {
        self.partitions
            .iter()
            .enumerate()
            .filter_map(|(p, part)| Some((i32::try_from(p).ok()?, part.lock().next_offset)))
            .collect()
    }

    /// Append a raw record (any bytes: the worker decodes it, and dead-letters
    /// what it cannot). Returns its partition and offset.
    pub fn publish_raw(&self, key: Option<&[u8]>, payload: Vec<u8>) -> (i32, i64) {
        let p = match key {
            Some(k) => partition_for(k, self.partitions()),
            None => (self.round_robin.fetch_add(1, Ordering::Relaxed) % self.partitions.len())
                .try_into()
                .unwrap_or(0),
        };
        let Some(slot) = usize::try_from(p).ok().and_then(|i| self.partitions.get(i)) else {
            return (p, -1);
        };
        let mut part = slot.lock();
        let offset = part.next_offset;
        part.next_offset += 1;
        let record = BusRecord {
            offset,
            broker_ts_ms: i64::try_from(now_ms()).ok(),
            key: key.map(<[u8]>::to_vec),
            payload,
        };
        if let Some(w) = &part.worker {
            // A failed send: the worker stopped (shutdown); the record stays
            // in the bus's offsets, as a record no consumer read.
            let _ = w.send(Msg::Record(record));
        }
        (p, offset)
    }

    /// Encode and append a request event, keyed by the partition key.
    pub fn publish(&self, event: &RequestEvent) -> Result<(i32, i64), EncodeError> {
        let payload = self
            .coordinator
            .context()
            .processing
            .codec
            .encode_request(event)?;
        let key = event.partition_key(&self.partition_key);
        Ok(self.publish_raw(Some(&key), payload))
    }

    /// Drain every partition and write final checkpoints.
    pub fn stop(&self) -> RevokeReport {
        for part in &self.partitions {
            part.lock().worker = None;
        }
        for route in &self.routes.partitions {
            route.lock().to = None;
        }
        self.coordinator.revoke_all()
    }
}

/// The embedded default's pipeline: its bus and the outputs it keeps.
pub struct Embedded {
    pub bus: EmbeddedBus,
    pub sink: Arc<EmbeddedSink>,
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
    /// The bus's repartition topic.
    routes: Option<Arc<Routes>>,
}

impl EmbeddedSink {
    pub fn new(topic: &str, cap: usize) -> Self {
        Self {
            topic: topic.to_owned(),
            cap: cap.max(1),
            decisions: Mutex::default(),
            alerts: Mutex::default(),
            dead_letters: Mutex::default(),
            routes: None,
        }
    }

    /// Route repartition records through `routes` (the bus's own).
    pub fn with_routes(mut self, routes: Arc<Routes>) -> Self {
        self.routes = Some(routes);
        self
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
    fn publish_repartition(
        &self,
        _partition: i32,
        home: i32,
        batch: &[u8],
        _delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        match &self.routes {
            Some(routes) => routes.send(home, batch.to_vec()),
            None => Err(SinkError("no repartition topic".into())),
        }
    }

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
                Output::Repartition { home, record } => match &self.routes {
                    Some(routes) => routes.send(*home, record.encode())?,
                    None => return Err(SinkError("no repartition topic".into())),
                },
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
