//! Kafka mode: a partition replayed after a crash decides each event with
//! the config version its first owner decided it with, even when the
//! group's config changed in between (docs/stream.md, "Config versions
//! and replays"). Real `quotaflow serve` processes, real Kafka and Redis.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::services::read_until;
use common::stream::{event, Fixture};
use common::{metric, wait_for, Server};
use quotaflow_core::pipeline::records::DecisionRecord;
use rdkafka::producer::FutureRecord;
use serde_json::json;

const HOUR: i64 = 3_600_000;

/// A base event time aligned to an hour, so the hour window holds the test.
fn base() -> i64 {
    (1_700_000_000_000 / HOUR + 1) * HOUR
}

/// Version 1: five per user and hour; one ALLOW/DENY decision per event,
/// each naming the version it was decided with.
const FIVE_PER_USER: &str = r#"
[decisions]
every_event = true

[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 5
window = "1h"
"#;

/// Five hundred users, event `n` of user `n % 500`: events 1000..2000 are
/// each user's third and fourth, allowed under version 1 (five) and
/// refused under version 2 (two). A replay of them under version 2 would
/// publish other actions.
const USERS: usize = 500;
/// Events decided before the first owner's checkpoint.
const CHECKPOINTED: usize = 500;
/// Events decided after it, by the owner that is killed: replayed. More
/// than one poll of a partition takes (512 records), so that a worker
/// that moved to the running version at its first look would decide most
/// of them with it.
const DECIDED: usize = 2000;
/// Events after the takeover.
const ALL: usize = 2100;

/// Produce the events `range`, event `n` at offset `n` (the partition's
/// only producer): all enqueued first, then their deliveries awaited.
async fn send(f: &Fixture, range: std::ops::Range<usize>) {
    let t0 = base();
    let mut pending = Vec::new();
    for n in range {
        let user = format!("u{}", n % USERS);
        let ts = t0 + n as i64;
        let payload = f
            .codec
            .encode_request(&event(&user, ts, n))
            .expect("encode");
        let record = FutureRecord::to(&f.requests)
            .key(user.as_bytes())
            .payload(&payload)
            .timestamp(ts);
        let delivery = f
            .producer
            .send_result(record)
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        pending.push((n, delivery));
    }
    for (n, delivery) in pending {
        let d = delivery
            .await
            .expect("delivery")
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        assert_eq!((d.partition, d.offset), (0, n as i64));
    }
}

/// Every decision record read, by id, with each copy's bytes, once at
/// least `min` are read and `done` holds (looked at only from `min` on:
/// it indexes every record read).
fn decisions(
    f: &Fixture,
    min: usize,
    done: impl Fn(&BTreeMap<String, Vec<Vec<u8>>>) -> bool,
) -> BTreeMap<String, Vec<Vec<u8>>> {
    let by_id = |records: &[common::services::Read]| {
        let mut m: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for r in records {
            let id = r.header("quotaflow.id").unwrap_or_default().to_owned();
            m.entry(id).or_default().push(r.payload.clone());
        }
        m
    };
    let records = read_until(&f.decisions, Duration::from_secs(60), |r| {
        r.len() >= min && done(&by_id(r))
    });
    let m = by_id(&records);
    assert!(done(&m), "decisions not all read: {} ids", m.len());
    m
}

/// Whether a decision was read for each of the events `range`.
fn decided(m: &BTreeMap<String, Vec<Vec<u8>>>, f: &Fixture, range: std::ops::Range<usize>) -> bool {
    range
        .into_iter()
        .all(|n| m.contains_key(&format!("{}:0:{n}:decision:0", f.requests)))
}

/// The owner decides events 500..2000 under version 1 after its
/// checkpoint at 500, is killed (`kill -9`), and the config changes to
/// version 2 (`POST /rate_limit/config` to a standby member) before the
/// standby takes the partition over: it replays 500..2000 under version 1
/// (each copy equal to its original), then moves to version 2 for what
/// follows.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_after_a_crash_and_a_config_change_decides_as_the_first_run() {
    let f = Fixture::new("config-replay", 1).await;
    // No periodic checkpoint during the test: the partition's only
    // checkpoint is the one its first owner writes as it stops, at 500.
    let config = f.config(FIVE_PER_USER, "[stream]\ncheckpoint_interval = \"1h\"\n");
    let mut first = Server::start(Some(&config), &[]);
    send(&f, 0..CHECKPOINTED).await;
    decisions(&f, CHECKPOINTED, |m| decided(m, &f, 0..CHECKPOINTED));
    assert!(first.terminate().success());
    let (_, cp) = f.checkpoints().peek(0).expect("peek");
    let cp = cp.expect("the first owner's final checkpoint");
    assert_eq!(
        (cp.next_offset, cp.config_version),
        (CHECKPOINTED as i64, 1)
    );

    let owner = Server::start(Some(&config), &[]);
    wait_for(
        "the owner to take the partition",
        Duration::from_secs(30),
        || metric(&owner, "quotaflow_partitions_owned") == 1.0,
    );
    let standby = Server::start(Some(&config), &[]);
    send(&f, CHECKPOINTED..DECIDED).await;
    decisions(&f, DECIDED, |m| decided(m, &f, 0..DECIDED));
    // The standby joined the group without taking the partition.
    assert_eq!(metric(&standby, "quotaflow_partitions_owned"), 0.0);
    drop(owner); // SIGKILL: no final checkpoint, no leaving the group

    // The group's config changes while the partition has no owner.
    let body = json!({"version": 1, "limits": [{"name": "per_user", "algorithm": "fixed_window",
        "key": ["user_id"], "limit": 2, "window": "1h"}]});
    let r = reqwest::Client::new()
        .post(standby.url("/rate_limit/config"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);

    // The standby takes the partition (after the session timeout), replays
    // 500..2000 under version 1, then moves to version 2.
    let switched = standby.wait_log(Duration::from_secs(60), |v| {
        v["event"] == "partition_config_switched"
    });
    assert_eq!(
        (
            switched["from"].as_u64(),
            switched["to"].as_u64(),
            switched["next_offset"].as_i64()
        ),
        (Some(1), Some(2), Some(DECIDED as i64)),
        "{switched}"
    );
    send(&f, DECIDED..ALL).await;
    let id = |n: usize| format!("{}:0:{n}:decision:0", f.requests);
    // One decision per event (ALLOW or DENY, every_event) at least, and
    // the replayed ones twice.
    let all = decisions(&f, ALL + DECIDED - CHECKPOINTED, |m| {
        decided(m, &f, 0..ALL)
            && (CHECKPOINTED..DECIDED).all(|n| m.get(&id(n)).is_some_and(|c| c.len() == 2))
    });

    let mut republished = 0;
    for (id, copies) in &all {
        assert!(
            copies.iter().all(|c| c == &copies[0]),
            "{id}: a copy differs from its original: {:?}",
            copies
                .iter()
                .map(|c| f.codec.decode_decision(c))
                .collect::<Vec<_>>()
        );
        republished += usize::from(copies.len() > 1);
        let d: DecisionRecord = f.codec.decode_decision(&copies[0]).expect("decision");
        let version = if d.source_offset < DECIDED as i64 {
            1
        } else {
            2
        };
        assert_eq!(d.config_version, version, "{id}: {d:?}");
    }
    // The events after the checkpoint were decided twice, one decision each.
    assert_eq!(republished, DECIDED - CHECKPOINTED);
    // Under version 1 each user's third and fourth events were allowed; a
    // replay under version 2 would have refused them: the copies prove
    // the pin.
    let last: DecisionRecord = f
        .codec
        .decode_decision(&all[&id(DECIDED - 1)][0])
        .expect("decision");
    assert_eq!(format!("{:?}", last.action), "Allow");
}
