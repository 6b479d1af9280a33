//! The records that flow through the pipeline, in the shared vocabulary.
//! Their Avro schemas live in `schemas/`; field names match one to one.

use serde::{Deserialize, Serialize};

use crate::rules::Request;

/// One request seen by a gateway (topic `requests`, schema `request_event.avsc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEvent {
    pub event_id: String,
    /// Gateway clock, milliseconds since the epoch.
    pub timestamp_ms: i64,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Textual IPv4 or IPv6 address; an unparsable one sends the event to the
    /// dead-letter topic.
    #[serde(default)]
    pub client_ip: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "one")]
    pub cost: i64,
    #[serde(default)]
    pub gateway_id: Option<String>,
}

fn one() -> i64 {
    1
}

impl RequestEvent {
    /// The message key gateways give this event: the values of the
    /// `partition_key` dimensions joined by `|` (absent ones empty). Kafka
    /// partitions by it (murmur2, as Java clients do), so every event of
    /// one key lands on one partition and one owner.
    pub fn partition_key(&self, dims: &[crate::rules::Dimension]) -> Vec<u8> {
        use crate::rules::Dimension;
        let mut key = Vec::new();
        for (i, d) in dims.iter().enumerate() {
            if i > 0 {
                key.push(b'|');
            }
            let v = match d {
                Dimension::UserId => &self.user_id,
                Dimension::ApiKey => &self.api_key,
                Dimension::ClientIp => &self.client_ip,
                Dimension::Method => &self.method,
                Dimension::Path => &self.path,
            };
            key.extend_from_slice(v.as_deref().unwrap_or_default().as_bytes());
        }
        key
    }

    /// The request to rate limit written into `req`, or why this event
    /// cannot be one. The processor keeps one `req` and one event for all
    /// its records, so the strings are copied into buffers that are already
    /// there instead of allocated per event.
    pub fn request_into(&self, req: &mut Request) -> Result<(), String> {
        req.client_ip = match &self.client_ip {
            None => None,
            Some(text) => Some(
                text.parse()
                    .map_err(|_| format!("client_ip `{text}` is not an IP address"))?,
            ),
        };
        req.cost =
            u64::try_from(self.cost).map_err(|_| format!("cost {} is negative", self.cost))?;
        req.user_id.clone_from(&self.user_id);
        req.api_key.clone_from(&self.api_key);
        req.method.clone_from(&self.method);
        req.path.clone_from(&self.path);
        req.validate().map_err(|e| e.to_string())
    }
}

/// What a gateway's deny cache acts on (topic `decisions`, schema `decision.avsc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Refuse this key until `until_ms`.
    Block,
    /// The key is within its limit again; drop it from the deny cache.
    Unblock,
    /// One request allowed (only with `decisions.every_event`).
    Allow,
    /// One request refused (only with `decisions.every_event`).
    Deny,
}

/// One part of a limited key as outputs show it: a dimension's name and its
/// value, e.g. `user_id = alice` (the Avro schemas' `dimensions` items).
/// API keys appear as `fp:<fingerprint>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyPart {
    pub name: String,
    pub value: String,
}

/// A decision about one key of one limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Deterministic: `topic:partition:offset:decision:n` of the input that caused it.
    pub decision_id: String,
    pub action: Action,
    pub limit: String,
    /// The record key: limit name and dimensions, e.g. `per_user/user_id=alice`.
    pub key: String,
    pub dimensions: Vec<KeyPart>,
    /// For `BLOCK`/`DENY`: when the key may pass again (event time, ms).
    pub until_ms: Option<i64>,
    pub reason: String,
    /// The limit's quota (`capacity` or `limit`).
    pub quota: i64,
    /// Event time the decision was made at (after clock-skew clamping).
    pub event_time_ms: i64,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub config_version: i64,
}

/// How serious a breach alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Severity {
    Warning,
    Critical,
}

/// A dimension value seen among a breach's refused requests, with its count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offender {
    pub dimension: String,
    pub value: String,
    pub count: i64,
}

/// Refusals of one key in one alert window (topic `breach-alerts`, schema
/// `breach_alert.avsc`), for security teams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachAlert {
    /// Deterministic: `topic:partition:offset:alert:n` of the input that closed the window.
    pub alert_id: String,
    pub limit: String,
    pub key: String,
    pub dimensions: Vec<KeyPart>,
    pub shadow: bool,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    /// Refused requests of this key in the window.
    pub refused: i64,
    /// Cost units refused.
    pub refused_cost: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub severity: Severity,
    /// The most frequent values of the request dimensions not in the key
    /// (paths, client IPs, …) among the refused requests, most frequent first.
    pub top_offenders: Vec<Offender>,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}
