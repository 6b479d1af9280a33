//! The stream processor's core: what one partition does with one event,
//! its checkpoints, and the interfaces to the outside (sink, checkpoint
//! store). Nothing here knows Kafka, Redis or Avro; `quotaflow-adapters` adapts
//! these to them, and to the in-process bus of the embedded default.

pub mod alerts;
pub mod backtest;
pub mod checkpoint;
pub mod delivery;
pub mod hits;
#[cfg(test)]
mod home_tests;
pub mod partition;
pub mod partitioner;
pub mod pin;
#[cfg(test)]
mod pin_tests;
pub mod records;
pub mod repartition;
pub mod routing;

pub use checkpoint::{
    Applied, Checkpoint, CheckpointError, CheckpointStore, HomeState, MemoryCheckpoints,
};
pub use delivery::Delivery;
pub use partition::{Output, PartitionProcessor, ProcessorConfig};

use std::sync::Arc;

/// Where a partition's outputs go: Kafka topics, or the embedded bus.
pub trait OutputSink: Send + Sync {
    /// Queue `outputs` of `partition` for delivery, in order. A sink that
    /// delivers asynchronously counts each queued output on `delivery` and
    /// settles it when the output is acknowledged, because a checkpoint may
    /// only cover events whose outputs are safely delivered. On error, none
    /// of the outputs not yet queued were counted.
    fn publish(
        &self,
        partition: i32,
        outputs: &[Output],
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError>;

    /// Queue `batch` (repartition records of source `partition`, see
    /// [`repartition::append_to_batch`]) for partition `home` of the
    /// repartition topic, counted on `delivery` as `publish` counts
    /// outputs. A sink without a repartition topic refuses.
    fn publish_repartition(
        &self,
        partition: i32,
        home: i32,
        batch: &[u8],
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        let _ = (batch, delivery);
        Err(SinkError(format!(
            "no repartition topic for partition {partition}'s records to {home}"
        )))
    }

    /// Queue `record`, a synchronous hit ([`hits::SyncHit`]), for
    /// partition `partition` of the repartition topic, counted on
    /// `delivery`. A client waits for it: a sink may send it sooner than
    /// routed batches.
    fn append_hit(
        &self,
        partition: i32,
        record: &[u8],
        delivery: &Arc<Delivery>,
    ) -> Result<(), SinkError> {
        self.publish_repartition(partition, partition, record, delivery)
    }
}

/// An output that could not be queued or delivered.
#[derive(Debug, thiserror::Error)]
#[error("output sink: {0}")]
pub struct SinkError(pub String);
