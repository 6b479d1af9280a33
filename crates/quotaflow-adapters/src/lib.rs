//! quotaflow-adapters: the core's partition processor and limiter wired to
//! the outside world. Everything here depends on `quotaflow-core`, never
//! the reverse.
//!
//! - [`avro`]: the Avro codec of request events, decisions and alerts
//!   (single-object and Confluent framing, record mapping, the fast request
//!   decoder);
//! - [`kafka`]: the consumer-group member (rebalances forwarded to the
//!   coordinator, one librdkafka queue per partition) and the output producer;
//! - [`redis_checkpoints`]: the checkpoint store with epoch fencing in Redis;
//! - [`redis_state`]: the Redis state mode (all instances count in one Redis);
//! - [`embedded`]: the in-process bus and sink of the embedded default;
//! - [`worker`]: one thread per owned partition (decode, process, publish)
//!   and its checkpointer;
//! - [`coordinator`]: which partitions this instance owns, taking them over
//!   and handing them back, for the embedded bus and Kafka alike;
//! - [`owners`]: the registry of partition owners and their internal
//!   addresses, which `/check` is forwarded by;
//! - [`metrics`]: Prometheus metrics and breach log events;
//! - [`settings`]: the `[kafka]` and `[redis]` settings;
//! - [`clock`]: wall-clock time, read only at the edges.

pub mod avro;
pub mod clock;
pub mod coordinator;
pub mod embedded;
pub mod kafka;
pub mod metrics;
pub mod owners;
pub mod redis_checkpoints;
pub mod redis_state;
pub mod settings;
#[cfg(test)]
mod test_support;
pub mod worker;
