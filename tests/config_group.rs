//! Kafka mode: the group's rate-limit config lives in the config topic.
//! Three real `quotaflow serve` processes on loopback, against real Kafka
//! and Redis: a config posted to any of them runs on all within a second;
//! of two writers from the same version one wins and the other gets 409; an
//! invalid config changes nothing anywhere; an instance started later runs
//! the group's latest version, not its file's.

mod common;

use std::time::{Duration, Instant};

use common::services::{create_topics, kafka, redis, unique};
use common::stream::FINGERPRINT_KEY;
use common::{client, get_text, Server};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

/// The admin token every instance accepts (`token:env-1` in the logs),
/// which no log line may contain.
const TOKEN: &str = "cfg-group-secret-5e1d7a";
/// An API key whitelisted in a write, which no log line may contain.
const API_KEY: &str = "sk_live_config_group_9c2b";

const FILE_LIMITS: &str = r#"
[[limits]]
name = "fw"
algorithm = "fixed_window"
key = ["user_id"]
limit = 100
window = "1h"
"#;

/// One group's topics, consumer group and Redis key prefix.
struct Group {
    name: String,
    config_topic: String,
}

impl Group {
    async fn new(name: &str) -> Self {
        let g = Self {
            name: unique(name),
            config_topic: unique(&format!("{name}-config")),
        };
        create_topics(&[
            (&g.topic("requests"), 2),
            (&g.topic("decisions"), 1),
            (&g.topic("alerts"), 1),
            (&g.topic("dlq"), 1),
        ])
        .await;
        g
    }

    fn topic(&self, what: &str) -> String {
        format!("{}-{what}", self.name)
    }

    /// Settings of an instance: the config topic is created by the first
    /// instance that starts, not by the test.
    fn config(&self, limits: &str) -> String {
        format!(
            r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{name}-group"
requests_topic = "{requests}"
decisions_topic = "{decisions}"
alerts_topic = "{alerts}"
dead_letter_topic = "{dlq}"
config_topic = "{config_topic}"
session_timeout = "6s"

[redis]
url = "{redis}"
key_prefix = "qftest-{name}"

[security]
fingerprint_key = "{FINGERPRINT_KEY}"

{limits}
"#,
            kafka = kafka(),
            redis = redis(),
            name = self.name,
            requests = self.topic("requests"),
            decisions = self.topic("decisions"),
            alerts = self.topic("alerts"),
            dlq = self.topic("dlq"),
            config_topic = self.config_topic,
        )
    }

    /// `n` instances started at once (they race to seed the empty log).
    fn start(&self, n: usize, limits: &str) -> Vec<Server> {
        let config = self.config(limits);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| Server::start(Some(&config), &[("QUOTAFLOW_ADMIN_TOKEN", TOKEN)]))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("start"))
                .collect()
        })
    }
}

async fn running(c: &reqwest::Client, s: &Server) -> Value {
    c.get(s.url("/rate_limit/config"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn version(c: &reqwest::Client, s: &Server) -> u64 {
    running(c, s).await["version"].as_u64().expect("version")
}

async fn post(c: &reqwest::Client, s: &Server, body: &Value) -> (u16, Value) {
    let r = c
        .post(s.url("/rate_limit/config"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn one_limit(limit: u64, version: u64) -> Value {
    json!({"version": version, "limits": [{"name": "fw", "algorithm": "fixed_window",
        "key": ["user_id"], "limit": limit, "window": "1h"}]})
}

/// The value of an unlabelled metric in `/metrics`.
async fn metric(c: &reqwest::Client, s: &Server, name: &str) -> Option<String> {
    let text = get_text(c, &s.url("/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
}

/// Poll every instance until it runs `want`, or panic once `within` has
/// passed since `t`; returns when the last one did.
async fn wait_version(
    c: &reqwest::Client,
    servers: &[&Server],
    want: u64,
    t: Instant,
    within: Duration,
) -> Duration {
    for s in servers {
        loop {
            let v = version(c, s).await;
            if v == want {
                break;
            }
            assert!(
                t.elapsed() < within,
                "{} runs version {v}, not {want}, {:?} after the write",
                s.base,
                t.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    t.elapsed()
}

fn assert_no_secret(s: &Server) {
    for line in s.logs() {
        assert!(!line.contains(TOKEN), "token in a log line: {line}");
        assert!(!line.contains(API_KEY), "API key in a log line: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_posted_to_one_instance_is_in_force_on_all_three_within_a_second_and_one_of_two_concurrent_writers_wins(
) {
    let g = Group::new("cfggroup").await;
    let servers = g.start(3, FILE_LIMITS);
    let c = client();
    // They agree on version 1: the file config the first of them proposed.
    let first: Vec<Value> = all_configs(&c, &servers).await;
    for v in &first {
        assert_eq!(v["version"], 1, "{v}");
        assert_eq!(v["limits"], first[0]["limits"]);
        assert!(v["applies_from_ms"].as_i64().is_some_and(|t| t > 0), "{v}");
        assert_eq!(v["applies_from_ms"], first[0]["applies_from_ms"]);
    }
    let seeded: usize = servers
        .iter()
        .map(|s| {
            let joined = s.wait_log(Duration::from_secs(5), |v| v["event"] == "config_joined");
            assert_eq!(joined["version"], 1);
            usize::from(joined["seeded_by_this_instance"] == true)
        })
        .sum();
    assert_eq!(seeded, 1, "exactly one instance's file config is version 1");

    let mut change = one_limit(3, 1);
    change["whitelist"] = json!({"api_keys": [API_KEY], "user_ids": ["ops"]});
    let t = Instant::now();
    let (status, body) = post(&c, &servers[0], &change).await;
    let answered = t.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    let all = wait_version(
        &c,
        &[&servers[1], &servers[2]],
        2,
        t,
        Duration::from_secs(1),
    )
    .await;
    eprintln!(
        "config write answered after {answered:?}; in force on all three {all:?} after it was sent"
    );
    let now: Vec<Value> = all_configs(&c, &servers).await;
    for v in &now {
        assert_eq!(v["limits"][0]["limit"], 3, "{v}");
        assert_eq!(v["applies_from_ms"], now[0]["applies_from_ms"]);
        // Stored as a fingerprint, never in clear.
        let keys = v["whitelist"]["api_keys"].to_string();
        assert!(!keys.contains(API_KEY) && keys.contains("fp:"), "{keys}");
    }
    for s in &servers {
        assert_eq!(
            metric(&c, s, "quotaflow_config_version").await.as_deref(),
            Some("2"),
            "{}",
            s.base
        );
        let line = s.wait_log(Duration::from_secs(2), |v| {
            v["event"] == "config_applied" && v["version"] == 2
        });
        assert_eq!(line["by"], "token:env-1", "{line}");
        let summary = line["summary"].as_str().unwrap_or_default();
        assert!(summary.contains("limits changed [fw]"), "{summary}");
        assert!(summary.contains("whitelist.api_keys +1 -0"), "{summary}");
        assert!(summary.contains("whitelist.user_ids +1 -0"), "{summary}");
    }

    // Two writers edited version 2 at once, on two instances: one wins,
    // the other gets 409 with the version that runs.
    let (ten, twenty) = (one_limit(10, 2), one_limit(20, 2));
    let (a, b) = tokio::join!(post(&c, &servers[1], &ten), post(&c, &servers[2], &twenty));
    let mut results = [a, b];
    results.sort_by_key(|r| r.0);
    assert_eq!([results[0].0, results[1].0], [200, 409], "{results:?}");
    assert_eq!(results[0].1["version"], 3);
    assert_eq!(results[1].1["current_version"], 3, "{results:?}");
    let t = Instant::now();
    wait_version(
        &c,
        &servers.iter().collect::<Vec<_>>(),
        3,
        t,
        Duration::from_secs(1),
    )
    .await;
    let winner = all_configs(&c, &servers).await;
    assert!(winner.iter().all(|v| v["limits"] == winner[0]["limits"]));
    // A stale write, later, is refused the same way.
    let (status, body) = post(&c, &servers[0], &one_limit(30, 1)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["current_version"], 3);
    for s in &servers {
        assert_no_secret(s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_changes_nothing_and_a_new_instance_runs_the_groups_latest_version() {
    let g = Group::new("cfgrestart").await;
    let mut servers = g.start(3, FILE_LIMITS);
    let c = client();
    for s in &servers {
        assert_eq!(version(&c, s).await, 1);
    }
    // Invalid: field errors, and every instance keeps version 1.
    let bad = json!({"version": 1, "limits": [{"name": "fw", "algorithm": "fixed_window",
        "limit": 0, "window": "1h"}, {"name": "bad name", "capacity": 1, "refill_per_sec": 1}]});
    let (status, body) = post(&c, &servers[1], &bad).await;
    assert_eq!(status, 400, "{body}");
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert!(fields.contains(&"limits[1].name"), "{fields:?}");
    assert!(
        fields.iter().any(|f| f.starts_with("limits[0].")),
        "{fields:?}"
    );
    // An invalid proposal that reached the log anyway (a newer binary's):
    // every instance refuses it alike.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("producer");
    let raw = json!({"proposal": "from-the-future", "base_version": null, "by": "token:future",
        "doc": {"limits": [], "from_the_future": true}});
    producer
        .send(
            FutureRecord::to(&g.config_topic)
                .key("from-the-future")
                .payload(&raw.to_string()),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
    for s in &servers {
        let line = s.wait_log(Duration::from_secs(2), |v| {
            v["event"] == "config_proposal_refused" && v["proposal"] == "from-the-future"
        });
        assert_eq!(line["version"], 1);
        assert_eq!(version(&c, s).await, 1);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in &servers {
        assert_eq!(version(&c, s).await, 1, "{}", s.base);
    }

    // One instance dies; the group moves on to version 2 and 3 without it.
    servers[2].terminate();
    let (status, _) = post(&c, &servers[0], &one_limit(7, 1)).await;
    assert_eq!(status, 200);
    let (status, _) = post(&c, &servers[1], &one_limit(8, 2)).await;
    assert_eq!(status, 200);
    // A new instance with another file config runs the group's version 3.
    let other = FILE_LIMITS.replace("limit = 100", "limit = 555");
    let late = Server::start(Some(&g.config(&other)), &[("QUOTAFLOW_ADMIN_TOKEN", TOKEN)]);
    let v = running(&c, &late).await;
    assert_eq!(v["version"], 3, "{v}");
    assert_eq!(v["limits"][0]["limit"], 8, "{v}");
    assert_eq!(
        v["applies_from_ms"],
        running(&c, &servers[0]).await["applies_from_ms"]
    );
    let joined = late.wait_log(Duration::from_secs(2), |v| v["event"] == "config_joined");
    assert_eq!(joined["version"], 3);
    assert_eq!(joined["seeded_by_this_instance"], false);
    assert_eq!(joined["file_config_runs"], false);
    assert_eq!(
        metric(&c, &late, "quotaflow_config_version")
            .await
            .as_deref(),
        Some("3")
    );
    // And it follows the group from there.
    let t = Instant::now();
    let (status, _) = post(&c, &late, &one_limit(9, 3)).await;
    assert_eq!(status, 200);
    wait_version(
        &c,
        &[&servers[0], &servers[1]],
        4,
        t,
        Duration::from_secs(1),
    )
    .await;
    for s in servers.iter().chain([&late]) {
        assert_no_secret(s);
    }
}

async fn all_configs(c: &reqwest::Client, servers: &[Server]) -> Vec<Value> {
    let mut out = Vec::new();
    for s in servers {
        out.push(running(c, s).await);
    }
    out
}
