//! Adapters of the stream processor: Avro encoding, Kafka, Redis
//! checkpoints, the in-process bus of the embedded default, and the
//! partition workers they all feed.

pub mod avro;
pub mod embedded;
pub mod kafka;
mod partition_queue;
pub mod redis_store;
pub mod worker;
