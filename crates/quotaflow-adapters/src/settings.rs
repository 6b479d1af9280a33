//! The settings of the adapters: Kafka and Redis, as the `[kafka]` and
//! `[redis]` tables of quotaflow's settings file read them.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Kafka: when `bootstrap_servers` is empty, quotaflow runs the embedded bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub requests_topic: String,
    pub decisions_topic: String,
    pub alerts_topic: String,
    pub dead_letter_topic: String,
    /// Decisions of the shadow config (`[shadow] config`), if any.
    pub shadow_decisions_topic: String,
    /// The group's rate-limit config: a log of proposals every instance
    /// follows (one partition, compacted; created at start if missing).
    pub config_topic: String,
    /// Replication factor of the config topic when an instance creates it;
    /// -1: the broker's `default.replication.factor`.
    pub config_topic_replication: i32,
    /// The internal topic carrying unaligned limits' events to their key's
    /// home partition; empty: `<requests_topic>-repartition`.
    pub repartition_topic: String,
    #[serde(deserialize_with = "duration")]
    pub session_timeout: Duration,
    /// Extra librdkafka properties for both consumer and producer.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl KafkaSettings {
    /// `repartition_topic`, or `<requests_topic>-repartition` when unset.
    pub fn repartition_topic(&self) -> String {
        if self.repartition_topic.is_empty() {
            format!("{}-repartition", self.requests_topic)
        } else {
            self.repartition_topic.clone()
        }
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: String::new(),
            group_id: "quotaflow".into(),
            requests_topic: "requests".into(),
            decisions_topic: "decisions".into(),
            alerts_topic: "breach-alerts".into(),
            dead_letter_topic: "requests-dlq".into(),
            shadow_decisions_topic: "shadow-decisions".into(),
            config_topic: "quotaflow-config".into(),
            config_topic_replication: -1,
            repartition_topic: String::new(),
            session_timeout: Duration::from_secs(10),
            properties: Default::default(),
        }
    }
}

/// Redis: partition checkpoints (Kafka mode) and the shared state of the
/// Redis state mode (`[state] backend = "redis"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    pub url: String,
    /// Prefix of every key quotaflow writes, so several deployments can share a Redis.
    pub key_prefix: String,
    /// Bound on each checkpoint call.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Redis state mode: longest a check waits for Redis before its limits'
    /// failure modes answer instead.
    #[serde(deserialize_with = "duration")]
    pub budget: Duration,
    /// Redis state mode: connections, each a thread sending pipelined batches.
    pub connections: usize,
    /// Redis state mode: most checks sent in one round trip (1 = one
    /// `EVALSHA` round trip per check, the baseline of the benchmarks).
    pub max_batch: usize,
    /// Redis state mode: answer a key Redis refused until a known instant
    /// locally until then.
    pub deny_cache: bool,
    /// Redis state mode: how often a breaker that opened probes Redis.
    #[serde(deserialize_with = "duration")]
    pub probe_interval: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "quotaflow".into(),
            timeout: Duration::from_secs(2),
            budget: Duration::from_millis(50),
            connections: 2,
            max_batch: 128,
            deny_cache: true,
            probe_interval: Duration::from_millis(250),
        }
    }
}

/// A duration written as humans do (`"10s"`, `"250ms"`), as every duration
/// in the settings file is.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration \"{text}\": {e}")))
}
