//! `quotaflow backtest` and the shadow config against a real Kafka and a
//! real Redis: the running config reproduces the processor's decisions,
//! a candidate's report equals an independent oracle's, `--from/--to`
//! select by timestamp, a backtest touches nothing, and a shadow config
//! publishes apart without changing anything real.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::services::{end_offsets, kafka, read_until};
use common::stream::{event, ExpectedDecision, Fixture, Oracle, Sent, FINGERPRINT_KEY};
use common::{wait_for, Server};
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::pipeline::records::{DecisionRecord, RequestEvent};
use quotaflow_core::pipeline::Checkpoint;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;

const HOUR: i64 = 3_600_000;

/// A base event time aligned to an hour.
fn base() -> i64 {
    (1_700_000_000_000 / HOUR + 2) * HOUR
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// What a backtest run printed.
struct Run {
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "the report is JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Run `quotaflow backtest ARGS`, which must succeed.
fn backtest(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .arg("backtest")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("QUOTAFLOW_ADMIN_TOKEN")
        .output()
        .expect("run quotaflow backtest");
    let run = Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        out.status.success(),
        "quotaflow backtest {args:?} failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    run
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a config");
    path
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn read_decisions_file(path: &Path) -> Vec<DecisionRecord> {
    std::fs::read_to_string(path)
        .expect("--decisions-out was written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a decision record per line"))
        .collect()
}

/// Every record of a one-partition output topic, decoded, one per id.
fn topic_decisions(f: &Fixture, topic: &str) -> BTreeMap<String, DecisionRecord> {
    let want: i64 = end_offsets(topic).values().sum();
    let records = read_until(topic, Duration::from_secs(30), |r| r.len() as i64 >= want);
    assert_eq!(records.len() as i64, want, "read all of {topic}");
    records
        .iter()
        .map(|r| {
            let d = f.codec.decode_decision(&r.payload).expect("a decision");
            assert_eq!(r.header("quotaflow.id"), Some(d.decision_id.as_str()));
            (d.decision_id.clone(), d)
        })
        .collect()
}

fn by_id(records: Vec<DecisionRecord>) -> BTreeMap<String, DecisionRecord> {
    records
        .into_iter()
        .map(|d| (d.decision_id.clone(), d))
        .collect()
}

/// Every key under `prefix` in Redis with its serialized value.
fn redis_snapshot(url: &str, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut c = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("redis");
    let keys: Vec<String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg(format!("{prefix}:*"))
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(&mut c)
        .expect("scan")
        .collect::<Result<_, _>>()
        .expect("scan");
    keys.into_iter()
        .map(|k| {
            let v: Vec<u8> = redis::cmd("DUMP").arg(&k).query(&mut c).expect("dump");
            (k, v)
        })
        .collect()
}

fn groups() -> BTreeSet<String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("admin consumer");
    c.fetch_group_list(None, Duration::from_secs(10))
        .expect("group list")
        .groups()
        .iter()
        .map(|g| g.name().to_owned())
        .collect()
}

/// Groups holding a committed offset of one of `topic`'s partitions.
fn groups_with_offsets_on(names: &BTreeSet<String>, topic: &str, partitions: i32) -> Vec<String> {
    names
        .iter()
        .filter(|g| {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", kafka())
                .set("group.id", g.as_str())
                .create()
                .expect("offset reader");
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(topic, p);
            }
            let committed = c
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed offsets");
            committed
                .elements()
                .iter()
                .any(|e| matches!(e.offset(), Offset::Offset(_)))
        })
        .cloned()
        .collect()
}

/// Every limit aligned with the partition key (`user_id`): the backtest
/// counts every limit where the event arrives, as the processor does only
/// for aligned limits (it routes the others to their key's home partition,
/// an order the backtest cannot replay: docs/backtest.md).
const RUNNING_LIMITS: &str = r#"
[alerts]
window = "10s"
min_refused = 3
critical_refused = 20

[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 5
window = "10s"

[[limits]]
name = "per_ip"
algorithm = "token_bucket"
key = ["user_id", "client_ip"]
capacity = 8
refill_per_sec = 0.5

[[limits]]
name = "per_api_key"
algorithm = "sliding_window"
key = ["user_id", "api_key"]
limit = 6
window = "10s"
"#;

/// Users, IPs and API keys over several partitions, some hot, some
/// gateways running fast (clamped to broker time), and poison.
async fn record_traffic(f: &Fixture, n: usize) -> Vec<Sent> {
    let t0 = base();
    let mut sent = Vec::new();
    for i in 0..n {
        let user = if i % 3 == 0 {
            format!("cust_hot_{}", i % 2)
        } else {
            format!("cust_{}", i % 17)
        };
        let broker = t0 + i as i64 * 40;
        let mut e = event(&user, broker, i);
        e.client_ip = Some(format!("198.51.100.{}", i % 5));
        e.api_key = (i % 4 == 0).then(|| format!("sk_live_SECRET{}", i % 3));
        if i % 50 == 7 {
            // Ten minutes fast: applied at broker time + max_clock_skew.
            e.timestamp_ms += 600_000;
        }
        sent.push(f.send(e, broker).await);
        if i % 200 == 100 {
            sent.push(f.send_raw(b"cust_1", b"not avro", broker).await);
        }
    }
    sent
}

/// The proof of the issue: the running config, replayed over the whole
/// recorded topic, publishes exactly the decisions the processor did; and
/// the backtest leaves topics, Redis and consumer groups as they were.
#[tokio::test(flavor = "multi_thread")]
async fn backtest_of_the_running_config_reproduces_the_published_decisions_and_touches_nothing() {
    let f = Fixture::new("bt-exact", 4).await;
    let config = f.config(
        RUNNING_LIMITS,
        "[stream]\ncheckpoint_interval = \"200ms\"\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = write(dir.path(), "running.toml", &config);
    let mut server = Server::start(Some(&config), &[]);
    let sent = record_traffic(&f, 900).await;
    let poison = sent.iter().filter(|s| s.event.is_none()).count();
    f.wait_checkpointed(&sent, Duration::from_secs(90));
    assert!(server.terminate().success());

    let published = topic_decisions(&f, &f.decisions);
    let blocks = published
        .values()
        .filter(|d| d.action == quotaflow_core::pipeline::records::Action::Block)
        .count();
    assert!(blocks > 20, "the traffic must trip limits: {blocks} blocks");
    assert!(
        published.values().any(|d| d.key.contains("api_key=fp:")),
        "an API-key limit decided"
    );
    let outputs = [&f.decisions, &f.alerts, &f.dlq, &f.shadow];
    let ends_before: Vec<_> = outputs.iter().map(|t| end_offsets(t)).collect();
    let redis_before = redis_snapshot(&f.redis_url, &f.prefix);
    assert!(!redis_before.is_empty(), "the processor checkpointed");
    let groups_before = groups();

    let out = dir.path().join("decisions.jsonl");
    let run = backtest(&[
        "--settings",
        path_str(&settings),
        "--config",
        path_str(&settings),
        "--json",
        "--decisions-out",
        path_str(&out),
    ]);
    let replayed = by_id(read_decisions_file(&out));
    let missing: Vec<_> = published
        .keys()
        .filter(|k| !replayed.contains_key(*k))
        .collect();
    let extra: Vec<_> = replayed
        .keys()
        .filter(|k| !published.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "ids published but not replayed: {missing:?}; replayed but not published: {extra:?}"
    );
    assert_eq!(replayed, published, "every field of every decision");

    let report = run.json();
    assert_eq!(report["records"], sent.len() as u64);
    assert_eq!(report["dead_letters"], poison as u64);
    assert_eq!(report["newly_blocked_requests"], 0);
    assert_eq!(report["newly_allowed_requests"], 0);
    assert_eq!(report["running"], report["candidate"]);
    assert_eq!(report["running"]["decisions"]["block"], blocks as u64);
    let alerts_held: i64 = end_offsets(&f.alerts).values().sum();
    assert!(alerts_held > 0, "the traffic must raise alerts");
    let alerts: BTreeSet<String> = read_until(&f.alerts, Duration::from_secs(10), |r| {
        r.len() as i64 >= alerts_held
    })
    .iter()
    .filter_map(|r| r.header("quotaflow.id").map(str::to_owned))
    .collect();
    assert_eq!(report["running"]["alerts"], alerts.len() as u64);
    assert_eq!(report["running_config"]["kind"], "settings");

    // Nothing written anywhere.
    let ends_after: Vec<_> = outputs.iter().map(|t| end_offsets(t)).collect();
    assert_eq!(ends_after, ends_before, "no record in any output topic");
    assert_eq!(
        redis_snapshot(&f.redis_url, &f.prefix),
        redis_before,
        "no Redis key written"
    );
    let new_groups: BTreeSet<String> = groups().difference(&groups_before).cloned().collect();
    assert!(
        new_groups
            .iter()
            .all(|g| !g.starts_with("quotaflow-backtest")),
        "the backtest joined no group: {new_groups:?}"
    );
    let mut candidates = new_groups;
    candidates.insert(f.group.clone());
    assert_eq!(
        groups_with_offsets_on(&candidates, &f.requests, f.partitions),
        Vec::<String>::new(),
        "no consumer-group offsets committed on the requests topic"
    );
}

/// One fixed-window limit of the oracle.
#[derive(Clone, Copy)]
struct Fw {
    name: &'static str,
    /// `true`: keyed by client_ip, else by user_id.
    by_ip: bool,
    limit: u64,
    window_ms: i64,
}

#[derive(Default, Debug, PartialEq)]
struct LimitCount {
    refused: u64,
    keys: BTreeSet<String>,
    first: Option<i64>,
}

#[derive(Default)]
struct SideCount {
    blocked: u64,
    keys: BTreeSet<(String, String)>,
    first: Option<i64>,
    limits: BTreeMap<&'static str, LimitCount>,
}

/// Per event, per partition, from the documented semantics: a fixed
/// window admits `limit` per aligned window; a request refused by any
/// limit is charged to none; event time is the gateway's, clamped to the
/// broker's + 1 s.
struct FwOracle {
    limits: Vec<Fw>,
    state: HashMap<(i32, usize, String), (i64, u64)>,
    count: SideCount,
}

impl FwOracle {
    fn new(limits: Vec<Fw>) -> Self {
        Self {
            limits,
            state: HashMap::new(),
            count: SideCount::default(),
        }
    }

    /// Whether `e` is allowed, and the refusing limits with their key values.
    fn decide(&mut self, p: i32, e: &RequestEvent, now: i64) -> (bool, Vec<(usize, String)>) {
        let mut refused = Vec::new();
        let mut next = Vec::new();
        for (i, l) in self.limits.iter().enumerate() {
            let value = if l.by_ip {
                e.client_ip.clone()
            } else {
                e.user_id.clone()
            }
            .unwrap_or_default();
            let (ws, count) = self
                .state
                .get(&(p, i, value.clone()))
                .copied()
                .unwrap_or((0, 0));
            let clock = now.max(ws);
            let start = clock - clock % l.window_ms;
            let count = if start == ws { count } else { 0 };
            if count + 1 > l.limit {
                refused.push((i, value));
            } else {
                next.push(((p, i, value), (start, count + 1)));
            }
        }
        if refused.is_empty() {
            self.state.extend(next);
        } else {
            let c = &mut self.count;
            c.blocked += 1;
            c.first = Some(c.first.map_or(now, |t| t.min(now)));
            for (i, v) in &refused {
                let name = self.limits[*i].name;
                c.keys.insert((name.to_owned(), v.clone()));
                let l = c.limits.entry(name).or_default();
                l.refused += 1;
                l.keys.insert(v.clone());
                l.first = Some(l.first.map_or(now, |t| t.min(now)));
            }
        }
        (refused.is_empty(), refused)
    }
}

fn key_fp(limit: &str, algorithm: &str, value: &str) -> String {
    let text = format!("{limit}\u{1f}{algorithm}\u{1f}{value}");
    format!(
        "{:032x}",
        Fingerprinter::from_secret(FINGERPRINT_KEY)
            .key_id(text.as_bytes())
            .0
    )
}

fn fw_limits(limits: &[Fw]) -> String {
    limits
        .iter()
        .map(|l| {
            format!(
                "[[limits]]\nname = \"{}\"\nalgorithm = \"fixed_window\"\nkey = [\"{}\"]\nlimit = {}\nwindow = \"{}ms\"\n",
                l.name,
                if l.by_ip { "client_ip" } else { "user_id" },
                l.limit,
                l.window_ms
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A stricter candidate against the running config, the running one read
/// from a live instance's `GET /rate_limit/config`: per limit and in total,
/// requests and keys blocked, first trips and the top keys all equal an
/// independent oracle's; no user, IP or API key appears in either output.
#[tokio::test(flavor = "multi_thread")]
async fn a_stricter_candidate_is_reported_as_an_independent_oracle_counts() {
    let f = Fixture::new("bt-oracle", 3).await;
    let running = vec![Fw {
        name: "per_user",
        by_ip: false,
        limit: 5,
        window_ms: 10_000,
    }];
    let candidate = vec![
        Fw {
            name: "per_user",
            by_ip: false,
            limit: 3,
            window_ms: 10_000,
        },
        Fw {
            name: "per_ip",
            by_ip: true,
            limit: 6,
            window_ms: 5_000,
        },
    ];
    let t0 = base();
    let mut sent = Vec::new();
    let mut secrets = BTreeSet::new();
    for i in 0..700usize {
        let user = if i % 4 == 0 {
            format!("cust_hot_{}", i % 3)
        } else {
            format!("cust_{}", i % 23)
        };
        let broker = t0 + i as i64 * 50;
        let mut e = event(&user, broker, i);
        e.client_ip = Some(format!("198.51.100.{}", 10 + i % 7));
        e.api_key = Some(format!("sk_live_SECRET{}", i % 5));
        secrets.extend([user, e.client_ip.clone().unwrap_or_default()]);
        secrets.extend(e.api_key.clone());
        sent.push(f.send(e, broker).await);
    }

    // The oracle, per partition in offset order.
    let mut by_partition: BTreeMap<i32, Vec<&Sent>> = BTreeMap::new();
    for s in &sent {
        by_partition.entry(s.partition).or_default().push(s);
    }
    let (mut run_o, mut cand_o) = (
        FwOracle::new(running.clone()),
        FwOracle::new(candidate.clone()),
    );
    let (mut newly_blocked, mut newly_allowed) = (0u64, 0u64);
    // key_fp -> (limit, blocked, newly blocked, first trip)
    let mut keys: BTreeMap<String, (&str, u64, u64, i64)> = BTreeMap::new();
    for (p, mut records) in by_partition {
        records.sort_by_key(|s| s.offset);
        for s in records {
            let e = s.event.as_ref().expect("an event");
            let now = e.timestamp_ms.min(s.broker_ts + 1_000);
            let (r_ok, _) = run_o.decide(p, e, now);
            let (c_ok, refused) = cand_o.decide(p, e, now);
            let newly = !c_ok && r_ok;
            newly_blocked += u64::from(newly);
            newly_allowed += u64::from(c_ok && !r_ok);
            for (i, v) in refused {
                let l = candidate[i];
                let k = keys
                    .entry(key_fp(l.name, "fixed_window", &v))
                    .or_insert((l.name, 0, 0, now));
                k.1 += 1;
                k.2 += u64::from(newly);
                k.3 = k.3.min(now);
            }
        }
    }
    assert!(
        newly_blocked > 50 && cand_o.count.limits.len() == 2,
        "the candidate bites"
    );

    // The running config as a live instance serves it.
    let instance = Server::start(Some(&fw_limits(&running)), &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = write(dir.path(), "settings.toml", &f.config("", ""));
    let cand = write(dir.path(), "candidate.toml", &fw_limits(&candidate));
    let args = |json: bool| {
        let mut a = vec![
            "--settings".to_owned(),
            path_str(&settings).to_owned(),
            "--config".to_owned(),
            path_str(&cand).to_owned(),
            "--running-url".to_owned(),
            instance.base.clone(),
            "--top".to_owned(),
            "1000".to_owned(),
        ];
        if json {
            a.push("--json".to_owned());
        }
        a
    };
    let json_args = args(true);
    let run = backtest(&json_args.iter().map(String::as_str).collect::<Vec<_>>());
    let r = run.json();
    assert_eq!(r["running_config"]["kind"], "url");

    let side = |v: &Value, o: &SideCount| {
        assert_eq!(v["blocked_requests"], o.blocked);
        assert_eq!(v["blocked_keys"], o.keys.len() as u64);
        assert_eq!(v["first_block_ms"].as_i64(), o.first);
        assert_eq!(v["decided_requests"], sent.len() as u64);
    };
    side(&r["running"], &run_o.count);
    side(&r["candidate"], &cand_o.count);
    assert_eq!(r["newly_blocked_requests"], newly_blocked);
    assert_eq!(r["newly_allowed_requests"], newly_allowed);
    let limits: BTreeMap<String, &Value> = r["limits"]
        .as_array()
        .expect("limits")
        .iter()
        .map(|l| (l["name"].as_str().unwrap_or_default().to_owned(), l))
        .collect();
    assert_eq!(limits.len(), 2);
    for (which, o) in [("running", &run_o.count), ("candidate", &cand_o.count)] {
        for (name, row) in &limits {
            let got = &row[which];
            let Some(want) = o.limits.get(name.as_str()) else {
                assert!(
                    got.is_null() || got["refused_requests"] == 0,
                    "{which} {name}: {got}"
                );
                continue;
            };
            assert_eq!(got["refused_requests"], want.refused, "{which} {name}");
            assert_eq!(
                got["refused_keys"],
                want.keys.len() as u64,
                "{which} {name}"
            );
            assert_eq!(got["first_trip_ms"].as_i64(), want.first, "{which} {name}");
        }
    }
    assert!(
        limits["per_ip"]["running"].is_null(),
        "per_ip is the candidate's only"
    );

    let mut want_top: Vec<(String, &str, u64, u64, i64)> = keys
        .into_iter()
        .map(|(fp, (l, b, n, t))| (fp, l, b, n, t))
        .collect();
    want_top.sort_by(|a, b| (b.3, b.2, a.4, &a.0).cmp(&(a.3, a.2, b.4, &b.0)));
    let got_top: Vec<(String, &str, u64, u64, i64)> = r["top_keys"]
        .as_array()
        .expect("top keys")
        .iter()
        .map(|k| {
            (
                k["key_fp"].as_str().unwrap_or_default().to_owned(),
                k["limit"].as_str().unwrap_or_default(),
                k["blocked_requests"].as_u64().unwrap_or_default(),
                k["newly_blocked_requests"].as_u64().unwrap_or_default(),
                k["first_trip_ms"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(got_top, want_top);

    // Neither the JSON nor the tables name a user, an IP or an API key.
    let table_args = args(false);
    let table = backtest(&table_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(table.stdout.contains(&want_top[0].0), "{}", table.stdout);
    for out in [&run.stdout, &table.stdout] {
        let leaked: Vec<_> = secrets
            .iter()
            .filter(|s| out.contains(s.as_str()))
            .collect();
        assert!(leaked.is_empty(), "{leaked:?} in:\n{out}");
    }
}

/// `--from/--to` read only the records whose broker timestamps are in the
/// range, found by the broker's timestamp index: as RFC 3339 and relative
/// to now.
#[tokio::test(flavor = "multi_thread")]
async fn from_and_to_restrict_the_backtest_to_their_time_range() {
    let f = Fixture::new("bt-range", 2).await;
    // Sixty events three minutes apart over the last three hours, none
    // within 90 s of an hour boundary before now.
    let t0 = now_ms() - 3 * HOUR + 90_000;
    let mut sent = Vec::new();
    for i in 0..60usize {
        let ts = t0 + i as i64 * 180_000;
        sent.push(f.send(event(&format!("cust_{}", i % 6), ts, i), ts).await);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let per_user = fw_limits(&[Fw {
        name: "per_user",
        by_ip: false,
        limit: 1,
        window_ms: HOUR,
    }]);
    let settings = write(dir.path(), "settings.toml", &f.config(&per_user, ""));
    let out = dir.path().join("decisions.jsonl");
    let check = |from: i64, to: i64, args: &[&str]| {
        let mut all = vec![
            "--settings",
            path_str(&settings),
            "--config",
            path_str(&settings),
            "--json",
            "--decisions-out",
            path_str(&out),
        ];
        all.extend_from_slice(args);
        let r = backtest(&all).json();
        let inside: Vec<&Sent> = sent
            .iter()
            .filter(|s| (from..to).contains(&s.broker_ts))
            .collect();
        assert!(!inside.is_empty() && inside.len() < sent.len());
        assert_eq!(r["records"], inside.len() as u64, "{args:?}");
        for p in r["partitions"].as_array().expect("partitions") {
            let part = p["partition"].as_i64().unwrap_or(-1) as i32;
            let offsets: Vec<i64> = inside
                .iter()
                .filter(|s| s.partition == part)
                .map(|s| s.offset)
                .collect();
            let first_after = sent
                .iter()
                .filter(|s| s.partition == part && s.broker_ts >= to)
                .map(|s| s.offset)
                .min();
            let end = end_offsets(&f.requests)[&part];
            let want_start = offsets.first().copied().or(first_after).unwrap_or(end);
            assert_eq!(p["start_offset"], want_start, "{args:?} partition {part}");
            assert_eq!(
                p["end_offset"],
                first_after.unwrap_or(end),
                "{args:?} partition {part}"
            );
        }
        // Only records in the range are decided.
        let decisions = read_decisions_file(&out);
        let in_range: BTreeSet<(i32, i64)> =
            inside.iter().map(|s| (s.partition, s.offset)).collect();
        assert!(!decisions.is_empty());
        for d in &decisions {
            assert!(
                in_range.contains(&(d.source_partition, d.source_offset)),
                "{d:?}"
            );
        }
    };
    let rfc = |ms: i64| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
    };
    let (from, to) = (sent[10].broker_ts, sent[40].broker_ts);
    check(from, to, &["--from", &rfc(from), "--to", &rfc(to)]);
    let now = now_ms();
    check(
        now - 2 * HOUR,
        now - HOUR,
        &["--from", "-2h", "--to", "-1h"],
    );
}

/// A shadow config decides every event beside the real one and publishes
/// its decisions, ids `…:shadow-decision:n`, to its own topic, as an
/// oracle of that config says; the real decisions and checkpoints are
/// those of the same run without a shadow; and a backtest of the shadow
/// config gives the same decisions (one engine).
#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_config_publishes_apart_and_changes_nothing_real() {
    let (with, without) = (
        Fixture::new("shadow-on", 2).await,
        Fixture::new("shadow-off", 2).await,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let running = fw_limits(&[Fw {
        name: "per_user",
        by_ip: false,
        limit: 5,
        window_ms: 10_000,
    }]);
    let shadow_limits = fw_limits(&[Fw {
        name: "per_user",
        by_ip: false,
        limit: 3,
        window_ms: 10_000,
    }]);
    let shadow_file = write(dir.path(), "shadow.toml", &shadow_limits);
    let extra = "[stream]\ncheckpoint_interval = \"200ms\"\n";
    let shadow_section = format!("[shadow]\nconfig = \"{}\"\n", path_str(&shadow_file));
    let with_config = with.config(&running, &format!("{extra}\n{shadow_section}"));
    let mut on = Server::start(Some(&with_config), &[]);
    let mut off = Server::start(Some(&without.config(&running, extra)), &[]);
    on.wait_log(Duration::from_secs(10), |v| {
        v["event"] == "shadow_config_loaded"
    });

    let t0 = base();
    let (mut sent_on, mut sent_off) = (Vec::new(), Vec::new());
    for i in 0..600usize {
        let user = format!("cust_{}", i % 9);
        let ts = t0 + i as i64 * 60;
        sent_on.push(with.send(event(&user, ts, i), ts).await);
        sent_off.push(without.send(event(&user, ts, i), ts).await);
    }
    with.wait_checkpointed(&sent_on, Duration::from_secs(90));
    without.wait_checkpointed(&sent_off, Duration::from_secs(90));

    let oracle = |topic: &str, limit: u64| Oracle {
        topic: topic.to_owned(),
        limit_name: "per_user".into(),
        limit,
        window_ms: 10_000,
        max_skew_ms: 1_000,
        alert_window_ms: 60_000,
        min_refused: 10,
        critical_refused: 1000,
        sweep_ms: 5_000,
    };
    let expected_shadow: Vec<ExpectedDecision> = oracle(&with.requests, 3)
        .run(&sent_on)
        .decisions
        .into_iter()
        .map(|d| ExpectedDecision {
            id: d.id.replace(":decision:", ":shadow-decision:"),
            ..d
        })
        .collect();
    assert!(expected_shadow.len() > 10);
    let want = expected_shadow.len();
    wait_for("the shadow decisions", Duration::from_secs(30), || {
        end_offsets(&with.shadow).values().sum::<i64>() >= want as i64
    });
    let shadow = topic_decisions(&with, &with.shadow);
    let mut got: Vec<ExpectedDecision> = shadow
        .values()
        .map(|d| ExpectedDecision {
            id: d.decision_id.clone(),
            action: serde_json::to_value(d.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            key: d.key.clone(),
            until_ms: d.until_ms,
        })
        .collect();
    got.sort();
    assert_eq!(got, expected_shadow);
    let blocks = expected_shadow
        .iter()
        .filter(|d| d.action == "BLOCK")
        .count();
    let scraped = std::process::Command::new("curl")
        .args(["-s", &on.url("/metrics")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        scraped.contains(&format!(
            "quotaflow_shadow_decisions_total{{action=\"block\"}} {blocks}"
        )),
        "{scraped}"
    );
    assert!(on.terminate().success());
    assert!(off.terminate().success());

    // The real side: the same decisions and checkpoints as without a shadow.
    let rename = |d: &DecisionRecord| DecisionRecord {
        decision_id: d.decision_id.replace(&with.requests, &without.requests),
        source_topic: without.requests.clone(),
        ..d.clone()
    };
    let real_on: BTreeMap<String, DecisionRecord> = topic_decisions(&with, &with.decisions)
        .values()
        .map(|d| {
            (
                d.decision_id.replace(&with.requests, &without.requests),
                rename(d),
            )
        })
        .collect();
    let real_off = topic_decisions(&without, &without.decisions);
    assert!(!real_off.is_empty());
    assert_eq!(real_on, real_off);
    assert!(real_on.keys().all(|id| id.contains(":decision:")));
    assert_eq!(end_offsets(&without.shadow).values().sum::<i64>(), 0);
    let sorted = |mut cp: Checkpoint| {
        cp.keys.sort_by_key(|k| k.key);
        cp
    };
    for p in 0..2 {
        let a = with.checkpoints().peek(p).expect("peek").1.map(sorted);
        let b = without.checkpoints().peek(p).expect("peek").1.map(sorted);
        assert!(a.is_some());
        assert_eq!(a, b, "partition {p}'s checkpoint");
    }

    // One engine: a backtest of the shadow config decides as the shadow did.
    let settings = write(dir.path(), "settings.toml", &with_config);
    let out = dir.path().join("decisions.jsonl");
    backtest(&[
        "--settings",
        path_str(&settings),
        "--config",
        path_str(&shadow_file),
        "--decisions-out",
        path_str(&out),
    ]);
    let replayed: BTreeMap<String, DecisionRecord> = read_decisions_file(&out)
        .into_iter()
        .map(|d| {
            let id = d.decision_id.replace(":decision:", ":shadow-decision:");
            (
                id.clone(),
                DecisionRecord {
                    decision_id: id,
                    ..d
                },
            )
        })
        .collect();
    assert_eq!(replayed, shadow);
}
