//! A Kafka + Redis fixture for processor tests: its own topics, consumer
//! group and Redis key prefix; a producer of Avro request events with
//! explicit timestamps; and an independent oracle for fixed-window limits.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use quotaflow_adapters::avro::{Codec, Encoding};
use quotaflow_adapters::redis_checkpoints::RedisCheckpoints;
use quotaflow_core::pipeline::records::RequestEvent;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::services::{create_topics, kafka, redis, unique};

/// `security.fingerprint_key` of every processor a fixture configures: the
/// secret state key ids are made with, the same on every instance.
pub const FINGERPRINT_KEY: &str = "test-fingerprint-key";

pub struct Fixture {
    pub requests: String,
    pub decisions: String,
    pub alerts: String,
    pub dlq: String,
    /// `kafka.shadow_decisions_topic` (see `[shadow]`).
    pub shadow: String,
    /// `kafka.config_topic`: the group's config log, created and seeded by
    /// its first processor with the limits of its `config`.
    pub config_topic: String,
    pub group: String,
    pub prefix: String,
    pub partitions: i32,
    pub producer: FutureProducer,
    pub codec: Codec,
    /// The Redis its processors checkpoint to: the shared one unless a
    /// test gives it one of its own ([`Fixture::with_redis`]).
    pub redis_url: String,
}

/// One produced record and where it landed.
#[derive(Debug, Clone)]
pub struct Sent {
    pub partition: i32,
    pub offset: i64,
    pub broker_ts: i64,
    pub event: Option<RequestEvent>,
}

impl Fixture {
    pub async fn new(name: &str, partitions: i32) -> Self {
        let f = Self {
            requests: unique(&format!("{name}-requests")),
            decisions: unique(&format!("{name}-decisions")),
            alerts: unique(&format!("{name}-alerts")),
            dlq: unique(&format!("{name}-dlq")),
            shadow: unique(&format!("{name}-shadow")),
            config_topic: unique(&format!("{name}-config")),
            group: unique(&format!("{name}-group")),
            prefix: unique(&format!("qftest-{name}")),
            partitions,
            producer: ClientConfig::new()
                .set("bootstrap.servers", kafka())
                .set("partitioner", "murmur2_random")
                .set("linger.ms", "1")
                // A retried send must not land twice: the oracle counts each
                // produced record once, at the offset the delivery reported.
                .set("enable.idempotence", "true")
                .create()
                .expect("producer"),
            codec: Codec::new(Encoding::SingleObject).expect("codec"),
            redis_url: redis(),
        };
        create_topics(&[
            (&f.requests, partitions),
            (&f.decisions, 1),
            (&f.alerts, 1),
            (&f.dlq, 1),
            (&f.shadow, 1),
        ])
        .await;
        f
    }

    /// Checkpoint to `url` instead of the shared Redis.
    pub fn with_redis(mut self, url: String) -> Self {
        self.redis_url = url;
        self
    }

    /// Settings for a processor of this fixture, with `limits` (TOML) and extra sections.
    pub fn config(&self, limits: &str, extra: &str) -> String {
        format!(
            r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
requests_topic = "{requests}"
decisions_topic = "{decisions}"
alerts_topic = "{alerts}"
dead_letter_topic = "{dlq}"
shadow_decisions_topic = "{shadow}"
config_topic = "{config_topic}"
session_timeout = "6s"

[redis]
url = "{redis}"
key_prefix = "{prefix}"

[security]
fingerprint_key = "{fingerprint_key}"

{extra}

{limits}
"#,
            fingerprint_key = FINGERPRINT_KEY,
            kafka = kafka(),
            redis = self.redis_url,
            group = self.group,
            requests = self.requests,
            decisions = self.decisions,
            alerts = self.alerts,
            dlq = self.dlq,
            shadow = self.shadow,
            config_topic = self.config_topic,
            prefix = self.prefix,
        )
    }

    pub fn checkpoints(&self) -> RedisCheckpoints {
        RedisCheckpoints::new(
            &self.redis_url,
            &self.prefix,
            &self.group,
            &self.requests,
            Duration::from_secs(5),
        )
        .expect("redis checkpoints")
    }

    /// Produce `event` keyed by its user, with broker timestamp `broker_ts`.
    pub async fn send(&self, event: RequestEvent, broker_ts: i64) -> Sent {
        let payload = self.codec.encode_request(&event).expect("encode");
        let key = event.user_id.clone().unwrap_or_default();
        let sent = self.send_raw(key.as_bytes(), &payload, broker_ts).await;
        Sent {
            event: Some(event),
            ..sent
        }
    }

    pub async fn send_raw(&self, key: &[u8], payload: &[u8], broker_ts: i64) -> Sent {
        let record = FutureRecord::to(&self.requests)
            .key(key)
            .payload(payload)
            .timestamp(broker_ts);
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        Sent {
            partition: delivery.partition,
            offset: delivery.offset,
            broker_ts,
            event: None,
        }
    }

    /// Wait until every partition's checkpoint covers everything in `sent`.
    pub fn wait_checkpointed(&self, sent: &[Sent], timeout: Duration) {
        let mut want: BTreeMap<i32, i64> = BTreeMap::new();
        for s in sent {
            let e = want.entry(s.partition).or_default();
            *e = (*e).max(s.offset + 1);
        }
        let store = self.checkpoints();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let behind: Vec<(i32, i64, i64)> = want
                .iter()
                .filter_map(|(&p, &w)| {
                    let have = store
                        .peek(p)
                        .ok()
                        .and_then(|(_, cp)| cp)
                        .map_or(0, |c| c.next_offset);
                    (have < w).then_some((p, have, w))
                })
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "checkpoints behind (partition, have, want): {behind:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn event(user: &str, ts: i64, n: usize) -> RequestEvent {
    RequestEvent {
        event_id: format!("{user}-{n}"),
        timestamp_ms: ts,
        user_id: Some(user.to_owned()),
        api_key: None,
        client_ip: Some(format!("203.0.113.{}", n % 200 + 1)),
        method: Some("GET".into()),
        path: Some(if n.is_multiple_of(3) { "/a" } else { "/b" }.into()),
        cost: 1,
        gateway_id: Some("gw-test".into()),
    }
}

/// What the oracle expects on the decisions topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedDecision {
    pub id: String,
    pub action: String,
    pub key: String,
    pub until_ms: Option<i64>,
}

/// What the oracle expects on the alerts topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedAlert {
    pub id: String,
    pub key: String,
    pub window_start_ms: i64,
    pub refused: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub critical: bool,
}

/// An independent model of one fixed-window limit keyed by `user_id`
/// (named `limit_name`), block/unblock decisions and breach-alert windows,
/// written from the documented semantics, not from the processor's code.
pub struct Oracle {
    pub topic: String,
    pub limit_name: String,
    pub limit: u64,
    pub window_ms: i64,
    pub max_skew_ms: i64,
    pub alert_window_ms: i64,
    pub min_refused: i64,
    pub critical_refused: i64,
    /// Event time between expiry sweeps (`state.sweep_interval`).
    pub sweep_ms: i64,
}

/// The oracle's verdicts.
#[derive(Debug, Default)]
pub struct Expected {
    pub decisions: Vec<ExpectedDecision>,
    pub alerts: Vec<ExpectedAlert>,
    /// user -> (window start, count): each key's final state.
    pub state: BTreeMap<String, (i64, u64)>,
}

impl Oracle {
    pub fn run(&self, sent: &[Sent]) -> Expected {
        let mut out = Expected::default();
        let mut by_partition: BTreeMap<i32, Vec<&Sent>> = BTreeMap::new();
        for s in sent {
            by_partition.entry(s.partition).or_default().push(s);
        }
        for (p, mut records) in by_partition {
            records.sort_by_key(|s| s.offset);
            let mut watermark = 0i64;
            let mut horizon = 0i64;
            // window start -> key -> (refused, first, last)
            let mut windows: BTreeMap<i64, BTreeMap<String, (i64, i64, i64)>> = BTreeMap::new();
            let mut keys: HashMap<String, (i64, u64, u32)> = HashMap::new();
            for s in records {
                let Some(e) = &s.event else { continue };
                let user = e.user_id.clone().unwrap_or_default();
                // Clamp to broker time + skew; never before the last sweep.
                let now = e
                    .timestamp_ms
                    .min(s.broker_ts + self.max_skew_ms)
                    .max(horizon);
                watermark = watermark.max(now);
                let mut n = 0;
                while let Some((&start, _)) = windows.iter().next() {
                    if start + self.alert_window_ms > watermark {
                        break;
                    }
                    let group = windows.remove(&start).unwrap_or_default();
                    for (key, (refused, first, last)) in group {
                        if refused >= self.min_refused {
                            out.alerts.push(ExpectedAlert {
                                id: format!("{}:{p}:{}:alert:{n}", self.topic, s.offset),
                                key,
                                window_start_ms: start,
                                refused,
                                first_seen_ms: first,
                                last_seen_ms: last,
                                critical: refused >= self.critical_refused,
                            });
                            n += 1;
                        }
                    }
                }
                // Keys whose window ended are forgotten at each sweep boundary.
                if watermark / self.sweep_ms > horizon / self.sweep_ms {
                    horizon = watermark;
                    keys.retain(|_, (ws, _, _)| *ws + self.window_ms > horizon);
                }
                let (ws, count, streak) = keys.get(&user).copied().unwrap_or((0, 0, 0));
                let clock = now.max(ws);
                let start = clock - clock % self.window_ms;
                let count = if start == ws { count } else { 0 };
                let key = format!("{}/user_id={user}", self.limit_name);
                let id = format!("{}:{p}:{}:decision:0", self.topic, s.offset);
                if count < self.limit {
                    if streak > 0 {
                        out.decisions.push(ExpectedDecision {
                            id,
                            action: "UNBLOCK".into(),
                            key,
                            until_ms: None,
                        });
                    }
                    keys.insert(user.clone(), (start, count + 1, 0));
                } else {
                    if streak == 0 {
                        out.decisions.push(ExpectedDecision {
                            id,
                            action: "BLOCK".into(),
                            key: key.clone(),
                            until_ms: Some(start + self.window_ms),
                        });
                    }
                    keys.insert(user.clone(), (start, count, streak + 1));
                    let w = watermark - watermark % self.alert_window_ms;
                    let agg = windows
                        .entry(w)
                        .or_default()
                        .entry(key)
                        .or_insert((0, now, now));
                    agg.0 += 1;
                    agg.1 = agg.1.min(now);
                    agg.2 = agg.2.max(now);
                }
            }
            for (user, (ws, count, _)) in keys {
                out.state.insert(user, (ws, count));
            }
        }
        out.decisions.sort();
        out.alerts.sort();
        out
    }
}

/// Three processors of `f`'s group, started with `config`, once the six
/// partitions are spread over all three.
pub fn group_of_three(f: &Fixture, config: &str) -> [super::Server; 3] {
    assert_eq!(f.partitions, 6);
    let group = [
        super::Server::start(Some(config), &[]),
        super::Server::start(Some(config), &[]),
        super::Server::start(Some(config), &[]),
    ];
    super::wait_for(
        "6 partitions owned by 3 processors",
        Duration::from_secs(60),
        || {
            let owned: Vec<f64> = group
                .iter()
                .map(|s| super::metric(s, "quotaflow_partitions_owned"))
                .collect();
            owned.iter().sum::<f64>() == 6.0 && owned.iter().all(|&n| n >= 1.0)
        },
    );
    group
}
