//! The stream processor's core: what one partition does with one event,
//! its checkpoints, and the interfaces to the outside (sink, checkpoint
//! store). Nothing here knows Kafka, Redis or Avro; `crate::stream` adapts
//! these to them, and to the in-process bus of the embedded default.

pub mod checkpoint;
pub mod partition;
pub mod records;

use std::time::Duration;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointStore, MemoryCheckpoints};
pub use partition::{Output, PartitionProcessor, ProcessorConfig};

/// Where a partition's outputs go: Kafka topics, or the embedded bus.
pub trait OutputSink: Send + Sync {
    /// Queue `outputs` of `partition` for delivery, in order.
    fn publish(&self, partition: i32, outputs: &[Output]) -> Result<(), SinkError>;
    /// Wait until everything queued so far is delivered. A checkpoint is
    /// written only after this succeeds, so no output of a checkpointed
    /// event can be lost.
    fn flush(&self, timeout: Duration) -> Result<(), SinkError>;
}

/// An output that could not be queued or delivered.
#[derive(Debug, thiserror::Error)]
#[error("output sink: {0}")]
pub struct SinkError(pub String);
