//! Every limit counted in one place: limits not keyed by the partition key
//! (per IP, per API key, global) are routed to their key's home partition
//! and counted there, in the embedded default and on Kafka, also across a
//! `kill -9`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::services::read_until;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::stream::{event, group_of_three, Fixture, Sent, FINGERPRINT_KEY};
use common::{client, header, metric, wait_for, Server};
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::pipeline::hits::{SyncHit, HIT_FORMAT};
use quotaflow_core::pipeline::routing::Routing;
use quotaflow_core::rules::{Dimension, Request, Rules, RulesDoc};
use quotaflow_core::state::KeyId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const GLOBAL_25: &str = r#"
[stream]
partitions = 4

[decisions]
every_event = true

[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1000
window = "1h"

[[limits]]
name = "global"
algorithm = "fixed_window"
limit = 25
window = "1h"
"#;

/// The embedded default's four partitions count a global limit once: of
/// 100 events of 40 users (all four partitions), exactly 25 are admitted.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_global_limit_admits_exactly_its_limit_across_partitions() {
    let s = Server::start(Some(GLOBAL_25), &[]);
    let c = client();
    let t0 = 1_800_000_000_000i64;
    let events: Vec<Value> = (0..100)
        .map(|n| json!({"user_id": format!("u{}", n % 40), "path": "/x", "timestamp_ms": t0 + n}))
        .collect();
    let r = c
        .post(s.url("/events"))
        .json(&events)
        .send()
        .await
        .expect("POST /events");
    assert_eq!(r.status(), 202);
    wait_for(
        "every event counted at the global limit's home",
        Duration::from_secs(20),
        || {
            metric(
                &s,
                "quotaflow_repartition_records_total{outcome=\"applied\"}",
            ) >= 100.0
        },
    );
    let d: Value = c
        .get(s.url("/stream/decisions?limit=1000"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    let global: Vec<&Value> = d
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["key"] == "global")
        .collect();
    let allowed = global.iter().filter(|x| x["action"] == "ALLOW").count();
    let denied = global.iter().filter(|x| x["action"] == "DENY").count();
    assert_eq!((allowed, denied), (25, 75), "{global:?}");
    // Every event was counted by its user's partition too, and the users
    // sit on every partition.
    let partitions: BTreeSet<i64> = d
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["limit"] == "per_user")
        .filter_map(|x| x["source_partition"].as_i64())
        .collect();
    assert_eq!(partitions.len(), 4);
    assert_eq!(
        metric(
            &s,
            "quotaflow_repartition_records_total{outcome=\"duplicate\"}"
        ),
        0.0
    );
    assert!(
        !s.logs()
            .iter()
            .any(|l| l.contains("limit_not_partition_aligned")),
        "the warning is gone: the case is handled"
    );
}

/// With every limit aligned nothing is routed.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_aligned_limits_route_nothing() {
    let config = GLOBAL_25.replace(
        "[[limits]]\nname = \"global\"\nalgorithm = \"fixed_window\"\nlimit = 25\nwindow = \"1h\"\n",
        "",
    );
    let s = Server::start(Some(&config), &[]);
    let c = client();
    let events: Vec<Value> = (0..50)
        .map(|n| json!({"user_id": format!("u{}", n % 40), "path": "/x"}))
        .collect();
    let r = c
        .post(s.url("/events"))
        .json(&events)
        .send()
        .await
        .expect("POST /events");
    assert_eq!(r.status(), 202);
    wait_for("the events", Duration::from_secs(20), || {
        metric(&s, "quotaflow_events_consumed_total") >= 50.0
    });
    assert_eq!(metric(&s, "quotaflow_repartition_records_total"), 0.0);
}

/// A per-user limit (aligned) and per-IP, per-API-key and global limits
/// (unaligned), none ever refusing, so every event gets one ALLOW per
/// limit shape, under an id named by the event.
const FOUR_SHAPES: &str = r#"
[decisions]
every_event = true

[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1000000
window = "1h"

[[limits]]
name = "per_ip"
algorithm = "fixed_window"
key = ["client_ip"]
limit = 1000000
window = "1h"

[[limits]]
name = "per_key"
algorithm = "fixed_window"
key = ["api_key"]
limit = 1000000
window = "1h"

[[limits]]
name = "global"
algorithm = "fixed_window"
limit = 1000000
window = "1h"
"#;

const LIMITS_JSON: &str = r#"{"limits": [
    {"name": "per_user", "algorithm": "fixed_window", "key": ["user_id"], "limit": 1000000, "window": "1h"},
    {"name": "per_ip", "algorithm": "fixed_window", "key": ["client_ip"], "limit": 1000000, "window": "1h"},
    {"name": "per_key", "algorithm": "fixed_window", "key": ["api_key"], "limit": 1000000, "window": "1h"},
    {"name": "global", "algorithm": "fixed_window", "limit": 1000000, "window": "1h"}
]}"#;

const HOUR: i64 = 3_600_000;

/// Each key of each limit: (limit index, the key's id) -> events counted,
/// and where it must be counted.
struct Expected {
    counts: BTreeMap<KeyId, (String, u64)>,
    homes: BTreeMap<KeyId, i32>,
}

fn expected(sent: &[Sent], partitions: u32) -> Expected {
    let fp = Fingerprinter::from_secret(FINGERPRINT_KEY);
    let rules = Rules::compile(RulesDoc::from_json(LIMITS_JSON.as_bytes()).unwrap(), 1, &fp)
        .expect("the test's limits");
    let routing = Routing::new(vec![Dimension::UserId], partitions);
    let mut out = Expected {
        counts: BTreeMap::new(),
        homes: BTreeMap::new(),
    };
    for s in sent {
        let e = s.event.as_ref().expect("events only");
        let req = Request {
            user_id: e.user_id.clone(),
            api_key: e.api_key.clone(),
            client_ip: e.client_ip.as_deref().map(|ip| ip.parse().expect("ip")),
            method: e.method.clone(),
            path: e.path.clone(),
            ..Request::default()
        };
        for limit in &rules.limits {
            let Some(id) = limit.key_id(&req, &mut String::new()) else {
                continue;
            };
            let name = format!("{}:{:?}", limit.name, limit.key);
            out.counts.entry(id).or_insert((name, 0)).1 += 1;
            out.homes
                .insert(id, routing.home(limit, &req, &fp, &mut Vec::new()));
        }
    }
    out
}

/// Every key's count in the checkpoints, with the partition (and side)
/// holding it; a key held twice is reported as such.
fn checkpointed(f: &Fixture) -> BTreeMap<KeyId, Vec<(i32, u64)>> {
    let store = f.checkpoints();
    let mut state: BTreeMap<KeyId, Vec<(i32, u64)>> = BTreeMap::new();
    for p in 0..f.partitions {
        let Ok((_, Some(cp))) = store.peek(p) else {
            continue;
        };
        for k in cp.keys.iter().chain(&cp.home.keys) {
            state.entry(k.key).or_default().push((p, k.state[1]));
        }
    }
    state
}

/// Differences between the checkpointed counts and the oracle, empty when
/// every key is counted once, in its home, by every event.
fn differences(f: &Fixture, want: &Expected) -> Vec<String> {
    let got = checkpointed(f);
    let mut diffs = Vec::new();
    for (id, (name, count)) in &want.counts {
        let home = want.homes[id];
        match got.get(id).map(Vec::as_slice) {
            Some([(p, c)]) if *p == home && c == count => {}
            other => diffs.push(format!(
                "{name} {id:?}: want {count} at partition {home}, have {other:?}"
            )),
        }
    }
    diffs
}

/// Wait until the checkpoints count every key as the oracle does.
fn until_as_the_oracle(f: &Fixture, want: &Expected) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let diffs = differences(f, want);
        if diffs.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} keys differ from the oracle, first {:?}",
            diffs.len(),
            &diffs[..diffs.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

async fn produce(
    f: &Fixture,
    rng: &mut StdRng,
    range: std::ops::Range<usize>,
    sent: &mut Vec<Sent>,
) {
    let t0 = (1_700_000_000_000 / HOUR + 1) * HOUR;
    for n in range {
        let user = format!("user-{}", rng.random_range(0..90));
        let mut e = event(&user, t0 + n as i64 * 100, n);
        e.api_key = Some(format!("sk_test_{}", rng.random_range(0..7)));
        let ts = e.timestamp_ms;
        sent.push(f.send(e, ts).await);
    }
}

/// Per-user, per-IP, per-API-key and global limits through three real
/// processors, one killed with `kill -9` mid-stream: every key's final
/// count equals the oracle's, counted once at its home partition, and the
/// decisions (deduplicated by id) are exactly one per event and limit
/// shape, as a run without the kill gives, copies agreeing byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_kill_9_counts_every_unaligned_key_once_at_its_home() {
    let f = Fixture::new("repart", 6).await;
    let config = f.config(FOUR_SHAPES, "[stream]\ncheckpoint_interval = \"300ms\"\n");
    let [mut a, b, mut c] = group_of_three(&f, &config);
    let mut rng = StdRng::seed_from_u64(23);
    let mut sent = Vec::new();
    produce(&f, &mut rng, 0..1500, &mut sent).await;
    wait_for("b to route some events", Duration::from_secs(60), || {
        metric(
            &b,
            "quotaflow_repartition_records_total{outcome=\"applied\"}",
        ) > 100.0
    });
    drop(b); // SIGKILL: no final checkpoint, no leaving the group
    produce(&f, &mut rng, 1500..3000, &mut sent).await;
    f.wait_checkpointed(&sent, Duration::from_secs(120));
    let want = expected(&sent, 6);
    until_as_the_oracle(&f, &want);
    let duplicates: f64 = [&a, &c]
        .iter()
        .map(|s| {
            metric(
                s,
                "quotaflow_repartition_records_total{outcome=\"duplicate\"}",
            )
        })
        .sum();
    let unexpected: Vec<String> = [&a, &c]
        .iter()
        .flat_map(|s| s.logs())
        .filter(|l| l.contains("unexpected_record") || l.contains("repartition_record_invalid"))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    eprintln!("repartition copies skipped after the kill: {duplicates}");
    assert!(a.terminate().success());
    assert!(c.terminate().success());
    // Still true after the final checkpoints.
    assert_eq!(differences(&f, &want), Vec::<String>::new());
    assert_decisions_once(&f, &sent).await;
}

/// The decisions topic, deduplicated by id, holds exactly one decision per
/// event and limit shape (every limit allows: `every_event` ALLOWs), and
/// copies of one id agree byte for byte: what a run without a crash gives.
async fn assert_decisions_once(f: &Fixture, sent: &[Sent]) {
    let ids: BTreeSet<String> = sent
        .iter()
        .flat_map(|s| {
            let at = format!("{}:{}:{}", f.requests, s.partition, s.offset);
            [
                format!("{at}:decision:0"),
                format!("{at}:decision/client_ip:0"),
                format!("{at}:decision/api_key:0"),
                format!("{at}:decision/global:0"),
            ]
        })
        .collect();
    let records = read_until(&f.decisions, Duration::from_secs(90), |r| {
        r.len() >= ids.len()
            && r.iter()
                .map(|x| x.header("quotaflow.id").unwrap_or_default())
                .collect::<BTreeSet<_>>()
                .len()
                >= ids.len()
    });
    let mut by_id: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for r in &records {
        let d = f
            .codec
            .decode_decision(&r.payload)
            .expect("decision decodes");
        assert_eq!(r.header("quotaflow.id"), Some(d.decision_id.as_str()));
        if let Some(prev) = by_id.insert(d.decision_id.clone(), r.payload.clone()) {
            assert_eq!(
                prev, r.payload,
                "two outputs with id {} disagree",
                d.decision_id
            );
        }
    }
    let got: BTreeSet<String> = by_id.keys().cloned().collect();
    let missing: Vec<_> = ids.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&ids).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?} ({} read)",
        records.len()
    );
}

/// With every limit aligned, the repartition topic stays empty.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_aligned_limits_leave_the_repartition_topic_empty() {
    let f = Fixture::new("repart-aligned", 2).await;
    let only_user = "[decisions]\nevery_event = true\n\n[[limits]]\nname = \"per_user\"\nalgorithm = \"fixed_window\"\nkey = [\"user_id\"]\nlimit = 1000000\nwindow = \"1h\"\n";
    let config = f.config(only_user, "[stream]\ncheckpoint_interval = \"300ms\"\n");
    let mut s = Server::start(Some(&config), &[]);
    let mut rng = StdRng::seed_from_u64(5);
    let mut sent = Vec::new();
    produce(&f, &mut rng, 0..200, &mut sent).await;
    f.wait_checkpointed(&sent, Duration::from_secs(60));
    assert_eq!(metric(&s, "quotaflow_repartition_records_total"), 0.0);
    assert!(s.terminate().success());
    let topic = format!("{}-repartition", f.requests);
    let records = read_until(&topic, Duration::from_secs(3), |_| false);
    assert!(records.is_empty(), "{} repartition records", records.len());
}

/// The partitions' synchronous hits as their logs hold them: each hit once
/// (by partition and id), every charge's key with the units it counts.
fn logged_hits(f: &Fixture) -> (usize, BTreeMap<KeyId, u64>) {
    let topic = format!("{}-repartition", f.requests);
    let records = read_until(&topic, Duration::from_secs(5), |_| false);
    let mut seen = BTreeSet::new();
    let mut counts: BTreeMap<KeyId, u64> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.payload.first() == Some(&HIT_FORMAT))
    {
        let hit = SyncHit::decode(&r.payload).expect("a hit record decodes");
        // Ids are unique per partition (an epoch is a partition's).
        if !seen.insert((r.partition, hit.id)) {
            continue;
        }
        for c in &hit.charges {
            *counts.entry(c.key).or_default() += hit.cost;
        }
    }
    (seen.len(), counts)
}

/// The proof that a group keeps one state (issue 11): a stream whose
/// limits are per user, per IP, per API key and global, plus concurrent
/// synchronous checks of the same keys through every instance, with one
/// instance killed by `kill -9` mid-run and later replaced. Every key's
/// final state equals an oracle that counts each event once and each hit
/// of the partition logs once; every hit answered (200, not degraded) is
/// in those logs; and the decisions, deduplicated by id, are exactly
/// those of a run without the kill.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_kill_9_with_sync_checks_counts_every_event_and_answered_hit_once() {
    let f = Fixture::new("proof", 6).await;
    // Windows of a year: events (stamped now) and hits share one window.
    let limits = FOUR_SHAPES.replace("window = \"1h\"", "window = \"366d\"");
    let config = f.config(
        &limits,
        "[stream]\ncheckpoint_interval = \"300ms\"\n\
         [cluster]\nbudget = \"1s\"\nregistry_interval = \"100ms\"\nsync_hits = \"logged\"\n",
    );
    let [mut a, b, mut c] = group_of_three(&f, &config);
    let up: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
        [&a, &b, &c].iter().map(|s| s.url("/check")).collect(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<Vec<Request>>> = Arc::default();
    let checkers: Vec<_> = (0..4u64)
        .map(|t| {
            let (up, stop, answered) = (up.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let http = client();
                let mut rng = StdRng::seed_from_u64(100 + t);
                let mut n = t as usize;
                while !stop.load(Ordering::Relaxed) {
                    let url = {
                        let up = up.lock().unwrap();
                        up[n % up.len()].clone()
                    };
                    n += 1;
                    let req = Request {
                        user_id: Some(format!("user-{}", rng.random_range(0..90))),
                        api_key: Some(format!("sk_test_{}", rng.random_range(0..7))),
                        client_ip: Some(
                            format!("203.0.113.{}", rng.random_range(1..=200))
                                .parse()
                                .expect("ip"),
                        ),
                        method: Some("GET".into()),
                        path: Some("/a".into()),
                        ..Request::default()
                    };
                    let body = json!({
                        "user_id": req.user_id, "api_key": req.api_key,
                        "client_ip": req.client_ip.map(|ip| ip.to_string()),
                        "method": "GET", "path": "/a",
                    });
                    // The killed instance refuses connections: not answered.
                    if let Ok(r) = http.post(&url).json(&body).send().await {
                        if r.status() == 200 && header(&r, "quotaflow-degraded").is_empty() {
                            answered.lock().unwrap().push(req);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(29);
    let mut sent = Vec::new();
    produce_now(&f, &mut rng, 0..1500, &mut sent).await;
    wait_for(
        "b to route events and log hits",
        Duration::from_secs(60),
        || {
            metric(
                &b,
                "quotaflow_repartition_records_total{outcome=\"applied\"}",
            ) > 100.0
                && metric(&b, "quotaflow_sync_hits_logged_total{outcome=\"appended\"}") > 20.0
        },
    );
    up.lock().unwrap().retain(|u| *u != b.url("/check"));
    drop(b); // SIGKILL: no final checkpoint, no leaving the group
    produce_now(&f, &mut rng, 1500..2200, &mut sent).await;
    let mut d = Server::start(Some(&config), &[]);
    wait_for(
        "the replacement to own partitions",
        Duration::from_secs(60),
        || metric(&d, "quotaflow_partitions_owned") >= 1.0,
    );
    up.lock().unwrap().push(d.url("/check"));
    produce_now(&f, &mut rng, 2200..3000, &mut sent).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in checkers {
        t.await.expect("checker");
    }
    f.wait_checkpointed(&sent, Duration::from_secs(120));

    let fp = Fingerprinter::from_secret(FINGERPRINT_KEY);
    let rules = Rules::compile(RulesDoc::from_json(LIMITS_JSON.as_bytes()).unwrap(), 1, &fp)
        .expect("the test's limits");
    let answered = std::mem::take(&mut *answered.lock().unwrap());
    let mut want = expected(&sent, 6);
    let (hits, logged) = logged_hits(&f);
    for (id, units) in &logged {
        want.counts
            .get_mut(id)
            .expect("a hit on a key events also touch")
            .1 += units;
    }
    // Answered hits are a subset of the logged ones, key by key.
    let mut answered_by_key: BTreeMap<KeyId, u64> = BTreeMap::new();
    for req in &answered {
        for limit in &rules.limits {
            if let Some(id) = limit.key_id(req, &mut String::new()) {
                *answered_by_key.entry(id).or_default() += 1;
            }
        }
    }
    let unlogged: Vec<_> = answered_by_key
        .iter()
        .filter(|(id, n)| logged.get(id).copied().unwrap_or(0) < **n)
        .take(5)
        .collect();
    assert!(
        unlogged.is_empty(),
        "answered hits missing from the log: {unlogged:?}"
    );
    let replayed: f64 = [&a, &c, &d]
        .iter()
        .map(|s| metric(s, "quotaflow_sync_hits_logged_total{outcome=\"replayed\"}"))
        .sum();
    eprintln!(
        "{} sync hits answered, {hits} logged, {replayed} replayed from the log after the kill",
        answered.len()
    );
    assert!(
        answered.len() > 100,
        "too few hits answered: {}",
        answered.len()
    );
    until_as_the_oracle(&f, &want);
    assert!(a.terminate().success());
    assert!(c.terminate().success());
    assert!(d.terminate().success());
    assert_eq!(differences(&f, &want), Vec::<String>::new());
    assert_decisions_once(&f, &sent).await;
}

/// Events stamped with the wall clock now, as gateways publish them.
async fn produce_now(
    f: &Fixture,
    rng: &mut StdRng,
    range: std::ops::Range<usize>,
    sent: &mut Vec<Sent>,
) {
    for n in range {
        let user = format!("user-{}", rng.random_range(0..90));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        let mut e = event(&user, now, n);
        e.api_key = Some(format!("sk_test_{}", rng.random_range(0..7)));
        sent.push(f.send(e, now).await);
    }
}
