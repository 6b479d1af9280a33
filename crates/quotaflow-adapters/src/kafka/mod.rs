//! Kafka adapter: a consumer-group member whose rebalances are forwarded
//! to the partition [`Coordinator`](crate::coordinator::Coordinator), and a
//! producer for decisions, alerts and dead letters.
//!
//! - [`group`]: the group member. One `BaseConsumer` polled on one thread
//!   for group events only; each owned partition's records go to its own
//!   librdkafka queue ([`partition_queue`]), polled by that partition's
//!   worker. Partitions are assigned at their checkpoint's offset: offsets
//!   live in Redis with the state, never in Kafka's group offsets.
//! - [`sink`]: the output producer (also of repartition records), polled
//!   by a thread of its own ([`polled`]).
//! - [`repartition`]: the repartition topic, created at start if missing.
//! - [`config`]: the group's rate-limit config, a log of proposals in a
//!   compacted topic that every instance follows and rules on alike.
//! - [`replay`]: a time range of the requests topic read again, outside
//!   the group, for a backtest.

pub mod config;
pub mod group;
mod partition_queue;
mod polled;
pub mod repartition;
pub mod replay;
pub mod sink;

pub use group::KafkaProcessor;
pub use sink::KafkaSink;

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::ThreadedProducer;

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
