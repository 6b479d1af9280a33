//! The stream processor against a real Kafka broker and a real Redis:
//! end to end against an oracle, crash, zombie, clock skew and poison.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::services::read_until;
use common::stream::{event, group_of_three, Fixture, Oracle, Sent, FINGERPRINT_KEY};
use common::{metric, scrape, wait_for, Server};
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::pipeline::partitioner::partition_for;
use quotaflow_core::pipeline::records::DecisionRecord;
use quotaflow_core::rules::{Request, Rules, RulesDoc};
use quotaflow_core::state::KeyId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HOUR: i64 = 3_600_000;

/// A base event time aligned to an hour, so hour windows hold a whole test.
fn base() -> i64 {
    (1_700_000_000_000 / HOUR + 1) * HOUR
}

fn action(d: &DecisionRecord) -> String {
    serde_json::to_value(d.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

const PER_USER_5_PER_10S: &str = r#"
[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 5
window = "10s"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn end_to_end_outputs_match_an_independent_oracle() {
    let f = Fixture::new("e2e", 4).await;
    let extra = "[stream]\ncheckpoint_interval = \"200ms\"\n\n[alerts]\nwindow = \"10s\"\nmin_refused = 3\ncritical_refused = 8\n";
    let server = Server::start(Some(&f.config(PER_USER_5_PER_10S, extra)), &[]);
    let t0 = base();
    let mut rng = StdRng::seed_from_u64(7);
    let mut sent: Vec<Sent> = Vec::new();
    for n in 0..1200 {
        // Thirty users, a few of them hot, over 48 s of event time.
        let user = if rng.random_bool(0.3) {
            format!("hot-{}", rng.random_range(0..3))
        } else {
            format!("user-{}", rng.random_range(0..30))
        };
        let ts = t0 + n as i64 * 40;
        sent.push(f.send(event(&user, ts, n), ts).await);
    }
    // One late event per partition closes every alert window.
    for p in 0..f.partitions {
        let closer = (0..)
            .map(|i| format!("closer-{i}"))
            .find(|u| partition_for(u.as_bytes(), 4) == p)
            .unwrap_or_default();
        let ts = t0 + 120_000;
        sent.push(f.send(event(&closer, ts, 9_999), ts).await);
    }
    let oracle = Oracle {
        topic: f.requests.clone(),
        limit_name: "per_user".into(),
        limit: 5,
        window_ms: 10_000,
        max_skew_ms: 1_000,
        alert_window_ms: 10_000,
        min_refused: 3,
        critical_refused: 8,
        sweep_ms: 5_000,
    };
    let expected = oracle.run(&sent);
    assert!(
        expected.decisions.len() > 20 && expected.alerts.len() > 5,
        "the stream must exercise blocks and alerts"
    );

    f.wait_checkpointed(&sent, Duration::from_secs(60));
    let want = expected.decisions.len();
    let records = read_until(&f.decisions, Duration::from_secs(30), |r| r.len() >= want);
    let mut got: Vec<_> = records
        .iter()
        .map(|r| {
            let d = f
                .codec
                .decode_decision(&r.payload)
                .expect("decision decodes");
            assert_eq!(r.header("quotaflow.id"), Some(d.decision_id.as_str()));
            assert_eq!(r.key, d.key.as_bytes());
            common::stream::ExpectedDecision {
                id: d.decision_id.clone(),
                action: action(&d),
                key: d.key.clone(),
                until_ms: d.until_ms,
            }
        })
        .collect();
    got.sort();
    got.dedup();
    assert_eq!(got, expected.decisions);

    let want = expected.alerts.len();
    let records = read_until(&f.alerts, Duration::from_secs(30), |r| r.len() >= want);
    let mut alerts: Vec<_> = records
        .iter()
        .map(|r| {
            let a = f.codec.decode_alert(&r.payload).expect("alert decodes");
            assert!(!a.top_offenders.is_empty());
            common::stream::ExpectedAlert {
                id: a.alert_id.clone(),
                key: a.key.clone(),
                window_start_ms: a.window_start_ms,
                refused: a.refused,
                first_seen_ms: a.first_seen_ms,
                last_seen_ms: a.last_seen_ms,
                critical: format!("{:?}", a.severity) == "Critical",
            }
        })
        .collect();
    alerts.sort();
    alerts.dedup();
    assert_eq!(alerts, expected.alerts);
    assert!(metric(&server, "quotaflow_events_consumed_total") >= sent.len() as f64);
}

const COUNT_ALL: &str = r#"
[decisions]
every_event = true

[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1000000
window = "1h"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_loses_nothing_and_counts_nothing_twice() {
    let f = Fixture::new("crash", 6).await;
    let config = f.config(COUNT_ALL, "[stream]\ncheckpoint_interval = \"300ms\"\n");
    let [mut a, b, mut c] = group_of_three(&f, &config);
    let mut sent = Vec::new();
    let mut users = Users::new(11);
    users.produce(&f, 0..2000, &mut sent).await;
    wait_for("b to process some events", Duration::from_secs(30), || {
        metric(&b, "quotaflow_events_consumed_total") > 100.0
    });
    drop(b); // SIGKILL: no final checkpoint, no leaving the group
    users.produce(&f, 2000..4000, &mut sent).await;
    f.wait_checkpointed(&sent, Duration::from_secs(90));
    assert!(a.terminate().success());
    assert!(c.terminate().success());

    assert_final_states_match_the_oracle(&f, &sent, 120);
    assert_one_decision_per_event(&f, &sent);
}

/// After a crash the next owner replays what the dead one decided since its
/// last checkpoint: consumers see those outputs twice (same ids), and
/// `quotaflow_outputs_republished_total` counts them.
#[tokio::test(flavor = "multi_thread")]
async fn outputs_published_again_after_a_crash_are_counted() {
    let f = Fixture::new("republished", 1).await;
    // No checkpoint is due during the run: everything is replayed.
    let config = f.config(COUNT_ALL, "[stream]\ncheckpoint_interval = \"1h\"\n");
    let first = Server::start(Some(&config), &[]);
    let t0 = base();
    let mut sent = Vec::new();
    for n in 0..120 {
        sent.push(
            f.send(event(&format!("u{}", n % 7), t0 + n as i64, n), t0)
                .await,
        );
    }
    read_until(&f.decisions, Duration::from_secs(30), |r| r.len() >= 120);
    // Progress is marked every 250 ms.
    std::thread::sleep(Duration::from_millis(1000));
    drop(first); // SIGKILL: no final checkpoint
    let second = Server::start(Some(&config), &[]);
    let records = read_until(&f.decisions, Duration::from_secs(60), |r| r.len() >= 240);
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.header("quotaflow.id").unwrap_or_default().to_owned())
        .collect();
    let distinct = ids.iter().collect::<BTreeSet<_>>().len();
    assert_eq!((ids.len(), distinct), (240, 120), "every decision twice");
    wait_for("the republished count", Duration::from_secs(10), || {
        metric(
            &second,
            "quotaflow_outputs_republished_total{kind=\"decision\"}",
        ) == 120.0
    });
    assert_eq!(
        metric(
            &second,
            "quotaflow_outputs_republished_total{kind=\"alert\"}"
        ),
        0.0
    );
    assert!(
        second
            .logs()
            .iter()
            .any(|l| l.contains("replaying_decided_events")),
        "the replay is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_zombie_cannot_overwrite_the_new_owners_checkpoint() {
    let f = Fixture::new("zombie", 1).await;
    let t0 = base();
    let (zombie, mut sent) = zombie_with_unsaved_work(&f, 50).await;
    let pid = zombie.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .is_ok_and(|s| s.success()));

    let owner = Server::start(
        Some(&f.config(
            PER_USER_5_PER_10S,
            "[stream]\ncheckpoint_interval = \"200ms\"\n",
        )),
        &[],
    );
    f.wait_checkpointed(&sent, Duration::from_secs(60));
    for n in 50..60 {
        sent.push(
            f.send(
                event(&format!("u{}", n % 7), t0 + n as i64, n),
                t0 + n as i64,
            )
            .await,
        );
    }
    f.wait_checkpointed(&sent, Duration::from_secs(30));
    let store = f.checkpoints();
    let (owner_epoch, cp) = store.peek(0).expect("peek");
    let owner_offset = cp.expect("owner checkpoint").next_offset;
    assert!(owner_epoch >= 2, "the new owner bumped the epoch");

    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .is_ok_and(|s| s.success()));
    zombie.wait_log(Duration::from_secs(60), |v| {
        v["event"] == "checkpoint_fenced"
    });
    let (epoch, cp) = store.peek(0).expect("peek");
    assert_eq!(epoch, owner_epoch);
    assert!(cp.expect("checkpoint").next_offset >= owner_offset);
    assert!(
        metric(
            &zombie,
            "quotaflow_checkpoint_failures_total{reason=\"fenced\"}"
        ) >= 1.0
    );
    drop(owner);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_ten_minutes_fast_cannot_refill_a_bucket_early() {
    let f = Fixture::new("skew", 1).await;
    let limits = r#"
[[limits]]
name = "per_user"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 3
refill_per_sec = 0.0166667
"#;
    let _server = Server::start(
        Some(&f.config(
            limits,
            "[stream]\ncheckpoint_interval = \"200ms\"\nmax_clock_skew = \"1s\"\n",
        )),
        &[],
    );
    let t0 = base();
    let mut sent = Vec::new();
    for n in 0..3 {
        sent.push(f.send(event("mallory", t0, n), t0).await);
    }
    // Same real time at the broker, gateway clock ten minutes ahead: were it
    // believed, ten minutes of refill (ten tokens) would admit all three.
    for n in 3..6 {
        sent.push(f.send(event("mallory", t0 + 600_000, n), t0 + 100).await);
    }
    f.wait_checkpointed(&sent, Duration::from_secs(60));
    let records = read_until(&f.decisions, Duration::from_secs(5), |r| r.len() >= 2);
    let decisions: Vec<DecisionRecord> = records
        .iter()
        .map(|r| f.codec.decode_decision(&r.payload).expect("decode"))
        .collect();
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(action(&decisions[0]), "BLOCK");
    // Clamped to broker time + 1 s: the block lasts about a minute from then,
    // not from ten minutes in the future.
    let until = decisions[0].until_ms.unwrap_or_default();
    assert!(
        until > t0 && until < t0 + 120_000,
        "until {until} vs t0 {t0}"
    );
    assert_eq!(decisions[0].event_time_ms, t0 + 1_100);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_goes_to_the_dead_letter_topic_and_nothing_else_is_lost() {
    let f = Fixture::new("poison", 2).await;
    let server = Server::start(
        Some(&f.config(COUNT_ALL, "[stream]\ncheckpoint_interval = \"200ms\"\n")),
        &[],
    );
    let t0 = base();
    let mut rng = StdRng::seed_from_u64(3);
    let mut sent = Vec::new();
    let mut poison = BTreeSet::new();
    for n in 0..300 {
        let ts = t0 + n as i64;
        let user = format!("u{}", n % 11);
        if n % 5 == 0 {
            let valid = f
                .codec
                .encode_request(&event(&user, ts, n))
                .expect("encode");
            let bytes: Vec<u8> = match n % 4 {
                0 => (0..rng.random_range(0..80)).map(|_| rng.random()).collect(),
                1 => valid[..rng.random_range(0..valid.len() - 1)].to_vec(),
                2 => [&valid[..10], b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"].concat(),
                _ => Vec::new(),
            };
            let s = f.send_raw(user.as_bytes(), &bytes, ts).await;
            poison.insert(format!("{}:{}:{}", f.requests, s.partition, s.offset));
            sent.push(s);
        } else {
            sent.push(f.send(event(&user, ts, n), ts).await);
        }
    }
    f.wait_checkpointed(&sent, Duration::from_secs(60));
    let dead = read_until(&f.dlq, Duration::from_secs(30), |r| r.len() >= poison.len());
    let sources: BTreeSet<String> = dead
        .iter()
        .map(|r| {
            assert!(
                !r.header("quotaflow.error").unwrap_or_default().is_empty(),
                "dead letter without a reason"
            );
            r.header("quotaflow.source").unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(sources, poison);
    let valid = sent.len() - poison.len();
    let decisions = read_until(&f.decisions, Duration::from_secs(30), |r| r.len() >= valid);
    let ids: BTreeSet<String> = decisions
        .iter()
        .filter_map(|r| r.header("quotaflow.id").map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), valid, "every valid event was decided");
    assert_eq!(
        metric(&server, "quotaflow_dead_letters_total"),
        poison.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_publishes_decodable_events_keyed_like_java_clients() {
    let f = Fixture::new("simulate", 3).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .args([
            "simulate",
            "--kafka",
            &common::services::kafka(),
            "--topic",
            &f.requests,
        ])
        .args([
            "--rate",
            "0",
            "--duration",
            "1s",
            "--users",
            "50",
            "--poison-every",
            "10",
        ])
        .env("QUOTAFLOW__LOG__LEVEL", "warn")
        .output()
        .expect("run simulate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(
        out.stdout
            .rsplit(|&b| b == b'\n')
            .find(|l| !l.is_empty())
            .unwrap_or_default(),
    )
    .expect("summary line");
    let published = summary["published"].as_u64().unwrap_or_default() as usize;
    assert!(published > 10, "{summary}");
    let records = read_until(&f.requests, Duration::from_secs(30), |r| {
        r.len() >= published
    });
    assert_eq!(records.len(), published);
    let mut decoded = 0;
    for r in &records {
        match f.codec.decode_request(&r.payload) {
            Ok(e) => {
                decoded += 1;
                let user = e.user_id.unwrap_or_default();
                assert_eq!(r.key, user.as_bytes());
                assert_eq!(
                    r.partition,
                    partition_for(user.as_bytes(), 3),
                    "murmur2 partitioning"
                );
            }
            Err(_) => assert_eq!(r.key, b"poison"),
        }
    }
    assert_eq!(decoded, published - published / 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_deleted_before_they_were_processed_are_counted_and_logged() {
    let f = Fixture::new("retention", 1).await;
    let config = f.config(
        PER_USER_5_PER_10S,
        "[stream]\ncheckpoint_interval = \"200ms\"\n",
    );
    let t0 = base();
    let mut server = Server::start(Some(&config), &[]);
    let mut sent = Vec::new();
    for n in 0..10 {
        sent.push(f.send(event("alice", t0 + n as i64, n), t0).await);
    }
    f.wait_checkpointed(&sent, Duration::from_secs(60));
    assert!(server.terminate().success());

    // While no processor runs, ten more events arrive and the broker
    // deletes the first five of them (as retention would).
    for n in 10..20 {
        sent.push(f.send(event("bob", t0 + n as i64, n), t0).await);
    }
    delete_head(&f, 15).await;

    let server = Server::start(Some(&config), &[]);
    assert_skipped(&server, 10, 15, 5);
}

/// Every partition this instance runs reports its lag, at every scrape:
/// the gauge comes from librdkafka's statistics, not from a broker call
/// that could time out behind the consumer's fetch.
#[tokio::test(flavor = "multi_thread")]
async fn every_owned_partition_reports_its_lag_at_every_scrape() {
    let f = Fixture::new("lag-gauge", 6).await;
    let server = Server::start(Some(&f.config(PER_USER_5_PER_10S, "")), &[]);
    wait_for("all six partitions", Duration::from_secs(30), || {
        metric(&server, "quotaflow_partitions_owned") == 6.0
    });
    let t0 = base();
    let mut partitions = BTreeSet::new();
    for n in 0..300 {
        let user = format!("u{}", n % 60);
        partitions.insert(
            f.send(event(&user, t0 + n as i64, n), t0 + n as i64)
                .await
                .partition,
        );
    }
    assert_eq!(partitions.len(), 6, "events reach every partition");
    wait_for("every event consumed", Duration::from_secs(30), || {
        metric(&server, "quotaflow_events_consumed_total") == 300.0
    });
    let series = |text: &str| -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| l.starts_with("quotaflow_partition_lag{"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    // Caught up: within two statistics intervals every series reads 0.
    wait_for("lag 0 on every partition", Duration::from_secs(10), || {
        let s = series(&scrape(&server));
        s.len() == 6 && s.values().all(|v| *v == 0.0)
    });
    for _ in 0..10 {
        let s = series(&scrape(&server));
        assert_eq!(s.len(), 6, "a partition's lag went missing: {s:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A shutdown revokes every partition at once: with Redis stalled (paused,
/// so every call waits for its timeout), the drain still ends within
/// `stream.drain_timeout`, and each partition whose final checkpoint could
/// not be written is named in the log.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_every_partition_with_redis_stalled_ends_within_the_deadline() {
    let redis = common::services::PrivateRedis::start();
    let f = Fixture::new("revoke-redis-down", 4)
        .await
        .with_redis(redis.url());
    // Checkpoints rarely, so every partition holds unsaved work at the end;
    // each Redis call times out after 2 s, the drain after 3 s.
    let config = f.config(
        PER_USER_5_PER_10S,
        "[stream]\ncheckpoint_interval = \"60s\"\ndrain_timeout = \"3s\"\n",
    );
    let mut server = Server::start(Some(&config), &[]);
    wait_for("all four partitions", Duration::from_secs(30), || {
        metric(&server, "quotaflow_partitions_owned") == 4.0
    });
    let t0 = base();
    let mut sent = Vec::new();
    for n in 0..200 {
        let user = format!("u{}", n % 40);
        sent.push(f.send(event(&user, t0 + n as i64, n), t0 + n as i64).await);
    }
    let partitions: BTreeSet<i32> = sent.iter().map(|s| s.partition).collect();
    assert_eq!(partitions.len(), 4, "events reach every partition");
    wait_for("every event consumed", Duration::from_secs(30), || {
        metric(&server, "quotaflow_events_consumed_total") == 200.0
    });

    redis.signal("-STOP");
    let started = Instant::now();
    let status = server.terminate();
    let took = started.elapsed();
    redis.signal("-CONT");
    assert!(status.success(), "{status:?}");
    // The drain's 3 s, plus leaving the group and closing the clients.
    assert!(took < Duration::from_secs(8), "shutdown took {took:?}");

    let logs: Vec<serde_json::Value> = server
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let handed_back = logs
        .iter()
        .find(|v| v["event"] == "partitions_handed_back" && v["why"] == "shutdown")
        .expect("a partitions_handed_back event");
    let took_ms = handed_back["took_ms"].as_u64().expect("took_ms");
    assert!(took_ms <= 3_300, "the drain took {took_ms} ms");
    let not_saved: BTreeSet<i64> = logs
        .iter()
        .filter(|v| v["event"] == "partition_not_checkpointed")
        .filter_map(|v| v["partition"].as_i64())
        .collect();
    assert_eq!(not_saved, BTreeSet::from([0, 1, 2, 3]), "{handed_back}");
    // Nothing reached Redis: the next owner replays from the start.
    let store = f.checkpoints();
    for p in 0..4 {
        let (epoch, cp) = store.peek(p).expect("peek");
        assert!(epoch > 0, "partition {p} was taken");
        assert_eq!(cp, None, "partition {p}");
    }
}

/// Every key's final state in the checkpoints equals an independent
/// oracle's over `sent` (users `user-0` … `user-{users-1}`, `COUNT_ALL`):
/// no event lost, none counted twice.
fn assert_final_states_match_the_oracle(f: &Fixture, sent: &[Sent], users: usize) {
    let expected = Oracle {
        topic: f.requests.clone(),
        limit_name: "per_user".into(),
        limit: 1_000_000,
        window_ms: HOUR,
        max_skew_ms: 1_000,
        alert_window_ms: 60_000,
        min_refused: 10,
        critical_refused: 1000,
        sweep_ms: 5_000,
    }
    .run(sent);
    // Every key's final state equals the oracle's: no event lost, none twice.
    // State holds keyed ids, not texts: name each user's id as the limiter does.
    let fp = Fingerprinter::from_secret(FINGERPRINT_KEY);
    let doc = RulesDoc::from_json(
        br#"{"limits": [{"name": "per_user", "algorithm": "fixed_window", "key": ["user_id"], "limit": 1000000, "window": "1h"}]}"#,
    )
    .expect("the test's limit");
    let rules = Rules::compile(doc, 1, &fp).expect("the test's limit compiles");
    let user_of: BTreeMap<KeyId, String> = (0..users)
        .map(|u| {
            let user = format!("user-{u}");
            let req = Request {
                user_id: Some(user.clone()),
                ..Request::default()
            };
            let id = rules.limits[0].key_id(&req, &mut String::new());
            (id.expect("every user has a per-user key"), user)
        })
        .collect();
    let store = f.checkpoints();
    let mut state = BTreeMap::new();
    for p in 0..f.partitions {
        let (_, cp) = store.peek(p).expect("peek");
        for k in cp.expect("every partition has a checkpoint").keys {
            let user = user_of
                .get(&k.key)
                .cloned()
                .unwrap_or_else(|| format!("{:?}", k.key));
            state.insert(user, (k.state[0] as i64, k.state[1]));
        }
    }
    let differing: Vec<_> = expected
        .state
        .iter()
        .filter(|(u, v)| state.get(*u) != Some(v))
        .map(|(u, v)| (u.clone(), *v, state.get(u).copied()))
        .collect();
    assert!(
        differing.is_empty(),
        "(user, oracle, processor) differ: {differing:?}"
    );
    assert_eq!(state.len(), expected.state.len());
}

/// One decision per event (`every_event`), under its deterministic id;
/// replays repeat ids, never change them.
fn assert_one_decision_per_event(f: &Fixture, sent: &[Sent]) {
    // One decision per event (every_event); replays repeat ids, never change them.
    // The distinct count is taken only once enough records are in: taken
    // at every record it made the read quadratic, and a busy machine ran
    // out of time before the replayed decisions (the last ones) were read.
    let records = read_until(&f.decisions, Duration::from_secs(60), |r| {
        r.len() >= sent.len()
            && r.iter()
                .map(|x| x.header("quotaflow.id").unwrap_or_default())
                .collect::<BTreeSet<_>>()
                .len()
                >= sent.len()
    });
    let mut by_id: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for r in &records {
        let d = f
            .codec
            .decode_decision(&r.payload)
            .expect("decision decodes");
        if let Some(prev) = by_id.insert(d.decision_id.clone(), r.payload.clone()) {
            assert_eq!(
                prev, r.payload,
                "two outputs with id {} disagree",
                d.decision_id
            );
        }
    }
    let want: BTreeSet<String> = sent
        .iter()
        .map(|s| format!("{}:{}:{}:decision:0", f.requests, s.partition, s.offset))
        .collect();
    let got: BTreeSet<String> = by_id.keys().cloned().collect();
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} decisions missing (first {:?}), {} unexpected (first {:?}), {} records read",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>(),
        records.len()
    );
}

/// Redis dies mid-stream and comes back empty (no persistence) while three
/// processors run; with `kill_after`, one of them is killed that long after
/// Redis is back and replaced. No partition stalls: every checkpoint covers
/// the whole stream again, and the final states and decisions are those of
/// a run without the fault.
async fn redis_lost_its_data_mid_stream(name: &str, kill_after: Option<Duration>) {
    let mut redis = common::services::PrivateRedis::start();
    let f = Fixture::new(name, 6).await.with_redis(redis.url());
    let config = f.config(COUNT_ALL, "[stream]\ncheckpoint_interval = \"300ms\"\n");
    let mut servers = Vec::from(group_of_three(&f, &config));
    let mut sent = Vec::new();
    let mut users = Users::new(17);
    users.produce(&f, 0..1500, &mut sent).await;
    f.wait_checkpointed(&sent, Duration::from_secs(60));

    redis.restart_empty();
    users.produce(&f, 1500..3000, &mut sent).await;
    if let Some(after) = kill_after {
        tokio::time::sleep(after).await;
        servers.remove(1); // dropped: SIGKILL, no final checkpoint
        servers.push(Server::start(Some(&config), &[]));
        users.produce(&f, 3000..4000, &mut sent).await;
    }
    // No stall: every partition checkpoints the whole stream again.
    f.wait_checkpointed(&sent, Duration::from_secs(90));
    let reseeds: f64 = servers
        .iter()
        .map(|s| metric(s, "quotaflow_checkpoint_store_reseeds_total"))
        .sum();
    let forgot_logged = servers.iter().any(|s| {
        s.logs()
            .iter()
            .any(|l| l.contains("\"event\":\"checkpoint_store_forgot\""))
    });
    // Every processor re-seeds its partitions once Redis is back (the
    // killed one's count went with it; the two survivors' remain).
    assert!(reseeds >= 1.0, "no re-seed counted ({reseeds})");
    assert!(forgot_logged, "no checkpoint_store_forgot logged");
    for s in &mut servers {
        assert!(s.terminate().success());
    }
    assert_final_states_match_the_oracle(&f, &sent, 120);
    assert_one_decision_per_event(&f, &sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_empty_mid_stream_stalls_no_partition() {
    redis_lost_its_data_mid_stream("redis-loss", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_empty_then_a_processor_killed_stalls_no_partition() {
    redis_lost_its_data_mid_stream("redis-loss-kill", Some(Duration::from_secs(10))).await;
}

/// A partition taken with no checkpoint (never processed, or its checkpoint
/// lost with Redis) while the topic's head was already deleted: the events
/// it can no longer count are logged and exported, not passed over quietly.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_without_a_checkpoint_reports_a_deleted_head() {
    let f = Fixture::new("head-deleted", 1).await;
    let t0 = base();
    let mut sent = Vec::new();
    for n in 0..12 {
        sent.push(f.send(event("carol", t0 + n as i64, n), t0).await);
    }
    delete_head(&f, 7).await;

    let config = f.config(
        PER_USER_5_PER_10S,
        "[stream]\ncheckpoint_interval = \"200ms\"\n",
    );
    let server = Server::start(Some(&config), &[]);
    assert_skipped(&server, 0, 7, 5);
}

/// The zombie test again, with the store losing its data while the zombie
/// is paused: the new owner re-seeds under a newer epoch, and the zombie,
/// resumed, is still fenced — it neither overwrites nor re-seeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_zombie_cannot_overwrite_the_new_owner_after_a_store_loss() {
    let mut redis = common::services::PrivateRedis::start();
    let f = Fixture::new("zombie-loss", 1).await.with_redis(redis.url());
    let t0 = base();
    let (zombie, mut sent) = zombie_with_unsaved_work(&f, 30).await;
    let pid = zombie.pid().to_string();
    let signal = |s: &str| {
        assert!(std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .is_ok_and(|st| st.success()));
    };
    signal("-STOP");
    let owner = Server::start(
        Some(&f.config(
            PER_USER_5_PER_10S,
            "[stream]\ncheckpoint_interval = \"200ms\"\n",
        )),
        &[],
    );
    f.wait_checkpointed(&sent, Duration::from_secs(60));
    let (first_epoch, _) = f.checkpoints().peek(0).expect("peek");

    redis.restart_empty();
    for n in 30..40 {
        sent.push(
            f.send(
                event(&format!("u{}", n % 7), t0 + n as i64, n),
                t0 + n as i64,
            )
            .await,
        );
    }
    f.wait_checkpointed(&sent, Duration::from_secs(30));
    owner.wait_log(Duration::from_secs(10), |v| {
        v["event"] == "checkpoint_store_forgot"
    });
    let store = f.checkpoints();
    let (owner_epoch, cp) = store.peek(0).expect("peek");
    assert!(owner_epoch > first_epoch, "re-seeded under a newer epoch");
    let owner_offset = cp.expect("owner checkpoint").next_offset;

    signal("-CONT");
    zombie.wait_log(Duration::from_secs(60), |v| {
        v["event"] == "checkpoint_fenced"
    });
    // The zombie, back in the group, may legitimately be given the
    // partition again (under a newer epoch still); it never went back.
    let (epoch, cp) = store.peek(0).expect("peek");
    assert!(epoch >= owner_epoch);
    assert!(cp.expect("checkpoint").next_offset >= owner_offset);
    assert_eq!(
        metric(&zombie, "quotaflow_checkpoint_store_reseeds_total"),
        0.0
    );
    drop(owner);
}

/// Events of 120 users (`user-0` …), drawn with a fixed seed, 100 ms of
/// event time apart: the traffic of the crash and store-loss tests.
struct Users {
    rng: StdRng,
    t0: i64,
}

impl Users {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            t0: base(),
        }
    }

    async fn produce(&mut self, f: &Fixture, range: std::ops::Range<usize>, sent: &mut Vec<Sent>) {
        for n in range {
            let user = format!("user-{}", self.rng.random_range(0..120));
            let ts = self.t0 + n as i64 * 100;
            sent.push(f.send(event(&user, ts, n), ts).await);
        }
    }
}

/// The zombie-to-be of the zombie tests: the only processor of `f`'s
/// single partition, checkpointing rarely, so it holds unsaved work when
/// paused, once it has consumed `n` events of seven users.
async fn zombie_with_unsaved_work(f: &Fixture, n: usize) -> (Server, Vec<Sent>) {
    let t0 = base();
    let zombie = Server::start(
        Some(&f.config(
            PER_USER_5_PER_10S,
            "[stream]\ncheckpoint_interval = \"60s\"\n",
        )),
        &[],
    );
    wait_for("zombie owns the partition", Duration::from_secs(30), || {
        metric(&zombie, "quotaflow_partitions_owned") == 1.0
    });
    let mut sent = Vec::new();
    for i in 0..n {
        let ts = t0 + i as i64;
        sent.push(f.send(event(&format!("u{}", i % 7), ts, i), ts).await);
    }
    wait_for("zombie to consume", Duration::from_secs(30), || {
        metric(&zombie, "quotaflow_events_consumed_total") == n as f64
    });
    (zombie, sent)
}

/// Delete the records of `f`'s partition 0 before `offset`, as retention
/// would.
async fn delete_head(f: &Fixture, offset: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::{Offset, TopicPartitionList};

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", common::services::kafka())
        .create()
        .expect("admin client");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&f.requests, 0, Offset::Offset(offset))
        .expect("offset");
    admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete records");
}

/// `server` reported the offsets `from..to` as skipped (log and metric)
/// and then processed the `left` events still in the topic.
fn assert_skipped(server: &Server, from: i64, to: i64, left: usize) {
    let logged = server.wait_log(Duration::from_secs(60), |v| v["event"] == "offsets_skipped");
    assert_eq!(logged["from"], from);
    assert_eq!(logged["to"], to);
    assert_eq!(logged["skipped"], to - from);
    wait_for("the events left", Duration::from_secs(30), || {
        metric(server, "quotaflow_events_consumed_total") == left as f64
    });
    assert_eq!(
        metric(server, "quotaflow_offsets_skipped_total"),
        (to - from) as f64
    );
}
