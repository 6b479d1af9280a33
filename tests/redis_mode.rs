//! The Redis state mode as a group: several `quotaflow serve` processes on
//! loopback sharing one real Redis, behaving as one limiter; a Redis that
//! stops, dies or comes back; a skewed clock; config written to any of them.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::services::{redis, unique, PrivateRedis};
use common::{client, Server};

/// A config for the group: `limits` (TOML) under a private key prefix.
fn config(prefix: &str, redis_url: &str, limits: &str, extra: &str) -> String {
    format!(
        r#"
[log]
format = "json"
[state]
backend = "redis"
[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
{extra}
[security]
fingerprint_key = "redis-mode-test"
{limits}
"#
    )
}

/// For tests about exactness, not the budget: a budget a busy machine does
/// not run out of, so no answer is a failure-mode one.
const EXACT: &str = "budget = \"2s\"";

fn group(n: usize, config: &str) -> Vec<Server> {
    (0..n).map(|_| Server::start(Some(config), &[])).collect()
}

async fn check(c: &reqwest::Client, s: &Server, body: Value) -> reqwest::Response {
    c.post(s.url("/check"))
        .json(&body)
        .send()
        .await
        .expect("check answered")
}

/// Status and each limit's (allowed, remaining), from a `/check` answer.
async fn verdicts(r: reqwest::Response) -> (u16, BTreeMap<String, (bool, u64)>) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json body");
    let limits = body["limits"]
        .as_array()
        .expect("limits")
        .iter()
        .map(|l| {
            (
                l["name"].as_str().expect("name").to_owned(),
                (
                    l["allowed"].as_bool().expect("allowed"),
                    l["remaining"].as_u64().expect("remaining"),
                ),
            )
        })
        .collect();
    (status, limits)
}

const STACKED: &str = r#"
[[limits]]
name = "per_user_fw"
algorithm = "fixed_window"
key = ["user_id"]
limit = 7
window = "1h"

[[limits]]
name = "per_user_tb"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 5
refill_per_sec = 0.001

[[limits]]
name = "per_user_sw"
algorithm = "sliding_window"
key = ["user_id"]
limit = 6
window = "1h"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_three_instances_answers_as_one_instance() {
    let prefix = unique("qftest-rr");
    let servers = group(3, &config(&prefix, &redis(), STACKED, EXACT));
    let memory = Server::start(
        Some(&format!(
            "[log]\nformat = \"json\"\n[security]\nfingerprint_key = \"m\"\n{STACKED}"
        )),
        &[],
    );
    let c = client();
    for i in 0..12 {
        let body = json!({"user_id": "rr-user", "path": "/orders", "cost": 1 + i % 2});
        let (got_status, got) = verdicts(check(&c, &servers[i % 3], body.clone()).await).await;
        let (want_status, want) = verdicts(check(&c, &memory, body).await).await;
        assert_eq!(got_status, want_status, "check {i}");
        // A refusal from an instance's deny cache names the refusing limit
        // only; every limit it names must match.
        for (name, v) in &got {
            assert_eq!(Some(v), want.get(name), "check {i}, limit {name}");
        }
        if got_status == 200 {
            assert_eq!(got, want, "check {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_is_admitted_under_64_concurrent_clients() {
    let prefix = unique("qftest-conc");
    let limits = r#"
[[limits]]
name = "fw"
algorithm = "fixed_window"
key = ["user_id"]
limit = 50
window = "1h"
match = { path = "/fw" }

[[limits]]
name = "tb"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 50
refill_per_sec = 0.0001
match = { path = "/tb" }

[[limits]]
name = "sw"
algorithm = "sliding_window"
key = ["user_id"]
limit = 50
window = "1h"
match = { path = "/sw" }
"#;
    // A budget no check reaches here: this test is about exactness.
    let servers = Arc::new(group(
        3,
        &config(&prefix, &redis(), limits, "budget = \"5s\""),
    ));
    let c = client();
    for path in ["/fw", "/tb", "/sw"] {
        let mut tasks = Vec::new();
        for client_no in 0..64usize {
            let (c, servers) = (c.clone(), servers.clone());
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0;
                for j in 0..5usize {
                    let s = &servers[(client_no + j) % 3];
                    let r = check(&c, s, json!({"user_id": "hammered", "path": path})).await;
                    match r.status().as_u16() {
                        200 => admitted += 1,
                        429 => {}
                        other => panic!("{path}: status {other}"),
                    }
                    assert!(r.headers().get("quotaflow-degraded").is_none());
                }
                admitted
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.expect("client task");
        }
        assert_eq!(admitted, 50, "{path}: 320 checks over 3 instances");
    }
}

/// The instance's clock, shifted this much (`QUOTAFLOW_TEST_CLOCK_OFFSET_MS`).
const SKEW: (&str, &str) = ("QUOTAFLOW_TEST_CLOCK_OFFSET_MS", "5400000");

/// `reset_ms` of the `fw` limit (a fixed window of an hour, aligned to the
/// clock that decides it) in a `/check` answer.
async fn reset_ms(r: reqwest::Response) -> u64 {
    let body: Value = r.json().await.expect("json");
    body["limits"][0]["reset_ms"].as_u64().expect("reset_ms")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_changes_no_answer() {
    let limits = r#"
[[limits]]
name = "fw"
algorithm = "fixed_window"
key = ["user_id"]
limit = 4
window = "1h"
"#;
    let c = client();
    // The offset works: in memory, an instance an hour and a half ahead is
    // half an hour apart in its hourly window.
    let memory = format!("[log]\nformat = \"json\"\n{limits}");
    let plain = Server::start(Some(&memory), &[]);
    let shifted = Server::start(Some(&memory), &[SKEW]);
    let a = reset_ms(check(&c, &plain, json!({"user_id": "m"})).await).await;
    let b = reset_ms(check(&c, &shifted, json!({"user_id": "m"})).await).await;
    let apart = (a as i64 - b as i64).rem_euclid(3_600_000);
    assert!((1_790_000..=1_810_000).contains(&apart), "{a} vs {b}");

    // In Redis mode the same two clocks give one count and one window.
    let cfg = config(&unique("qftest-skew"), &redis(), limits, EXACT);
    let on_time = Server::start(Some(&cfg), &[]);
    let ahead = Server::start(Some(&cfg), &[SKEW]);
    let mut seen = Vec::new();
    for i in 0..6 {
        let s = if i % 2 == 0 { &on_time } else { &ahead };
        let body: Value = check(&c, s, json!({"user_id": "skewed"}))
            .await
            .json()
            .await
            .expect("json");
        let l = &body["limits"][0];
        seen.push((
            l["allowed"].as_bool().expect("allowed"),
            l["remaining"].as_u64().expect("remaining"),
            l["reset_ms"].as_u64().expect("reset_ms"),
        ));
    }
    let counts: Vec<_> = seen.iter().map(|&(a, r, _)| (a, r)).collect();
    assert_eq!(
        counts,
        [
            (true, 3),
            (true, 2),
            (true, 1),
            (true, 0),
            (false, 0),
            (false, 0)
        ]
    );
    let resets: Vec<u64> = seen.iter().map(|s| s.2).collect();
    let spread = resets.iter().max().unwrap_or(&0) - resets.iter().min().unwrap_or(&0);
    assert!(spread < 5_000, "one window for both clocks: {resets:?}");
}

/// Send checks to both paths for `d`, answering the latest of each: the
/// slowest answer and the statuses and degraded reasons seen.
async fn load_for(
    c: &reqwest::Client,
    s: &Server,
    d: Duration,
) -> (Duration, Vec<(String, u16, Option<String>)>) {
    let mut slowest = Duration::ZERO;
    let mut seen = Vec::new();
    let until = Instant::now() + d;
    while Instant::now() < until {
        for path in ["/open", "/closed"] {
            let t = Instant::now();
            let r = check(c, s, json!({"user_id": "u", "path": path})).await;
            slowest = slowest.max(t.elapsed());
            let degraded = r
                .headers()
                .get("quotaflow-degraded")
                .map(|v| v.to_str().expect("ascii").to_owned());
            seen.push((path.to_owned(), r.status().as_u16(), degraded));
        }
    }
    (slowest, seen)
}

/// What the checks of one phase said, per path: (statuses, degraded reasons).
fn summary(seen: &[(String, u16, Option<String>)], path: &str) -> (Vec<u16>, Vec<Option<String>>) {
    let mut statuses: Vec<u16> = seen.iter().filter(|s| s.0 == path).map(|s| s.1).collect();
    let mut reasons: Vec<Option<String>> = seen
        .iter()
        .filter(|s| s.0 == path)
        .map(|s| s.2.clone())
        .collect();
    statuses.dedup();
    reasons.sort();
    reasons.dedup();
    (statuses, reasons)
}

/// Budget 50 ms, plus what a shared 2-core machine adds to one HTTP call.
const WITHIN_BUDGET: Duration = Duration::from_millis(150);

async fn wait_exact(c: &reqwest::Client, s: &Server, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let r = check(c, s, json!({"user_id": "u", "path": "/closed"})).await;
        if r.status() == 200 && r.headers().get("quotaflow-degraded").is_none() {
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "still degraded after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_is_answered_by_failure_mode_within_the_budget_then_exactly_again() {
    let redis = PrivateRedis::start();
    let s = Server::start(
        Some(&config(
            &unique("qftest-stop"),
            &redis.url(),
            common::OPEN_AND_CLOSED,
            "",
        )),
        &[],
    );
    let c = client();
    let (_, seen) = load_for(&c, &s, Duration::from_millis(300)).await;
    assert_eq!(summary(&seen, "/open"), (vec![200], vec![None]));
    assert_eq!(summary(&seen, "/closed"), (vec![200], vec![None]));

    redis.signal("-STOP");
    let (slowest, seen) = load_for(&c, &s, Duration::from_secs(2)).await;
    let ready = c
        .get(s.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .status();
    redis.signal("-CONT");
    assert!(slowest <= WITHIN_BUDGET, "slowest answer {slowest:?}");
    let (open_status, open_reasons) = summary(&seen, "/open");
    let (closed_status, closed_reasons) = summary(&seen, "/closed");
    assert_eq!(open_status, [200]);
    assert_eq!(closed_status, [429]);
    // First the budget runs out; then the breaker answers at once.
    for reasons in [open_reasons, closed_reasons] {
        assert!(reasons.iter().all(Option::is_some), "{reasons:?}");
        assert!(
            reasons.contains(&Some("breaker_open".into())),
            "{reasons:?}"
        );
    }
    assert_eq!(ready, 503, "/readyz while Redis does not answer");

    let back = wait_exact(&c, &s, Duration::from_secs(2)).await;
    eprintln!("slowest degraded answer {slowest:?}; exact again {back:?} after SIGCONT");
    let metrics = common::get_text(&c, &s.url("/metrics")).await;
    assert!(metrics.contains("quotaflow_degraded_answers_total{reason=\"breaker_open\"}"));
    let opened = s
        .logs()
        .iter()
        .filter(|l| l.contains("redis_state_unavailable"))
        .count();
    assert_eq!(opened, 1, "the outage is logged once, not per request");
    s.wait_log(Duration::from_secs(2), |v| {
        v["event"] == "redis_state_available"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_answered_by_failure_mode_and_a_new_one_is_used_without_a_restart() {
    let mut redis = PrivateRedis::start();
    let s = Server::start(
        Some(&config(
            &unique("qftest-kill"),
            &redis.url(),
            common::OPEN_AND_CLOSED,
            "",
        )),
        &[],
    );
    let c = client();
    let (_, seen) = load_for(&c, &s, Duration::from_millis(200)).await;
    assert_eq!(summary(&seen, "/closed"), (vec![200], vec![None]));
    redis.signal("-KILL");
    let (slowest, seen) = load_for(&c, &s, Duration::from_secs(1)).await;
    assert!(slowest <= WITHIN_BUDGET, "slowest answer {slowest:?}");
    assert_eq!(summary(&seen, "/open").0, [200]);
    assert_eq!(summary(&seen, "/closed").0, [429]);
    redis.restart_empty();
    wait_exact(&c, &s, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_at_start_starts_degraded_and_not_ready() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let s = Server::start(
        Some(&config(
            &unique("qftest-down"),
            &url,
            common::OPEN_AND_CLOSED,
            "",
        )),
        &[],
    );
    s.wait_log(Duration::from_secs(5), |v| {
        v["event"] == "config_store_unavailable"
    });
    let c = client();
    let (_, seen) = load_for(&c, &s, Duration::from_millis(500)).await;
    assert_eq!(summary(&seen, "/open").0, [200]);
    assert_eq!(summary(&seen, "/closed").0, [429]);
    let ready = c
        .get(s.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .status();
    assert_eq!(ready, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_gone_once_their_window_has_passed() {
    let prefix = unique("qftest-ttl");
    let limits = r#"
[[limits]]
name = "fw"
algorithm = "fixed_window"
key = ["user_id"]
limit = 5
window = "1s"

[[limits]]
name = "sw"
algorithm = "sliding_window"
key = ["client_ip"]
limit = 5
window = "1s"

[[limits]]
name = "tb"
algorithm = "token_bucket"
key = []
capacity = 100
refill_per_sec = 100
"#;
    let s = Server::start(Some(&config(&prefix, &redis(), limits, EXACT)), &[]);
    let c = client();
    for u in 0..20 {
        let body = json!({"user_id": format!("u{u}"), "client_ip": format!("10.0.0.{u}")});
        check(&c, &s, body).await;
    }
    let mut conn = connect(&redis());
    let count = |conn: &mut redis::Connection| -> usize {
        redis::cmd("KEYS")
            .arg(format!("{prefix}:s:*"))
            .query::<Vec<String>>(conn)
            .expect("keys")
            .len()
    };
    assert_eq!(count(&mut conn), 41, "20 users, 20 addresses, 1 global");
    // The longest state lives 2 windows (sliding), plus a second's grace.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    assert_eq!(count(&mut conn), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_configs_the_mode_cannot_run_get_400() {
    let prefix = unique("qftest-bad");
    let s = Server::start(Some(&config(&prefix, &redis(), STACKED, EXACT)), &[]);
    let c = client();
    let r = check(&c, &s, json!({"user_id": 5})).await;
    assert_eq!(r.status(), 400);
    let post = |body: Value| {
        c.post(s.url("/rate_limit/config"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let r = post(json!({"limits": [{"name": "x", "algorithm": "nope"}]}))
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let r = post(json!({"limits": [{"name": "slow", "capacity": 3_000_000, "refill_per_sec": 1}]}))
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert!(
        body.to_string().contains("limits[0].refill_per_sec"),
        "{body}"
    );
    let got: Value = c
        .get(s.url("/rate_limit/config"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(got["version"], 1, "the running config stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_posted_to_one_instance_runs_on_all_within_a_second_and_stale_writes_get_409() {
    let prefix = unique("qftest-cfg");
    let servers = group(3, &config(&prefix, &redis(), STACKED, EXACT));
    let c = client();
    for s in &servers {
        assert_eq!(running_version(&c, s).await, 1);
    }
    let t = Instant::now();
    assert_eq!(
        post_config(&c, &servers[0], one_limit(3, 1)).await.status(),
        200
    );
    for s in &servers[1..] {
        while running_version(&c, s).await != 2 {
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "not in force within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let spread = t.elapsed();
    // The new limit is counted as one: 3 checks over 3 instances, then no more.
    for (i, s) in servers.iter().enumerate() {
        let r = check(&c, s, json!({"user_id": "cfg"})).await;
        assert_eq!(r.status(), 200, "check {i}");
    }
    assert_eq!(
        check(&c, &servers[0], json!({"user_id": "cfg"}))
            .await
            .status(),
        429
    );

    // Two writers edited version 2 at once: one wins, the other gets 409.
    let (a, b) = tokio::join!(
        post_config(&c, &servers[1], one_limit(10, 2)),
        post_config(&c, &servers[2], one_limit(20, 2))
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409]);
    eprintln!("config in force on all three {spread:?} after the write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_keeps_one_count_when_an_instance_is_killed_or_paused() {
    let prefix = unique("qftest-members");
    let limits = r#"
[[limits]]
name = "fw"
algorithm = "fixed_window"
key = ["user_id"]
limit = 10
window = "1h"
"#;
    let servers = group(3, &config(&prefix, &redis(), limits, EXACT));
    let c = client();
    let remaining = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, verdicts(r).await.1["fw"].1)
    };
    let mut seen = Vec::new();
    for s in &servers {
        seen.push(remaining(check(&c, s, json!({"user_id": "member"})).await).await);
    }
    let kill = |signal: &str, s: &Server| {
        let ok = std::process::Command::new("kill")
            .args([signal, &s.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {signal}");
    };
    kill("-KILL", &servers[2]);
    kill("-STOP", &servers[1]);
    for _ in 0..8 {
        seen.push(remaining(check(&c, &servers[0], json!({"user_id": "member"})).await).await);
    }
    kill("-CONT", &servers[1]);
    seen.push(remaining(check(&c, &servers[1], json!({"user_id": "member"})).await).await);
    assert_eq!(
        seen,
        [
            (200, 9),
            (200, 8),
            (200, 7),
            (200, 6),
            (200, 5),
            (200, 4),
            (200, 3),
            (200, 2),
            (200, 1),
            (200, 0),
            (429, 0),
            (429, 0)
        ]
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn connect(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .expect("client")
        .get_connection()
        .expect("connection")
}

/// Wait until the group's config version stored in Redis is `want`.
async fn wait_stored_version(
    conn: &mut redis::Connection,
    prefix: &str,
    want: u64,
    within: Duration,
) {
    let t = Instant::now();
    loop {
        let v: Option<u64> = redis::cmd("GET")
            .arg(format!("{prefix}:config:version"))
            .query(conn)
            .unwrap_or(None);
        if v == Some(want) {
            return;
        }
        assert!(t.elapsed() < within, "stored version {v:?}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn running_version(c: &reqwest::Client, s: &Server) -> u64 {
    let v: Value = c
        .get(s.url("/rate_limit/config"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    v["version"].as_u64().expect("version")
}

async fn post_config(c: &reqwest::Client, s: &Server, body: Value) -> reqwest::Response {
    c.post(s.url("/rate_limit/config"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("post")
}

fn one_limit(limit: u64, version: u64) -> Value {
    json!({"version": version, "limits": [{"name": "fw", "algorithm": "fixed_window",
        "key": ["user_id"], "limit": limit, "window": "1h"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_before_its_redis_joins_it_when_it_comes() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = unique("qftest-late");
    let s = Server::start(
        Some(&config(&prefix, &url, common::OPEN_AND_CLOSED, "")),
        &[],
    );
    let c = client();
    let ready = c
        .get(s.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .status();
    assert_eq!(
        ready, 503,
        "no check has failed yet, but Redis never answered"
    );
    let redis = PrivateRedis::start_on(port);
    wait_exact(&c, &s, Duration::from_secs(2)).await;
    let ready = c
        .get(s.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .status();
    assert_eq!(ready, 200);
    // It stored its config for the group.
    let mut conn = connect(&redis.url());
    wait_stored_version(&mut conn, &prefix, 1, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_config_gets_the_running_one_back_and_versions_go_on() {
    let mut redis = PrivateRedis::start();
    let prefix = unique("qftest-refill");
    let cfg = config(&prefix, &redis.url(), STACKED, EXACT);
    let g = group(2, &cfg);
    let (a, b) = (&g[0], &g[1]);
    let c = client();
    assert_eq!(post_config(&c, a, one_limit(3, 1)).await.status(), 200);
    redis.restart_empty();
    let mut conn = connect(&redis.url());
    wait_stored_version(&mut conn, &prefix, 2, Duration::from_secs(3)).await;
    // Whichever instance stored its config first (`b` may not have run
    // version 2 yet), the newest wins and reaches every instance.
    wait_running_version(&c, b, 2, Duration::from_secs(1)).await;
    // The version a client reads is the one a write must name.
    let v = running_version(&c, b).await;
    let r = post_config(&c, b, one_limit(5, v)).await;
    assert_eq!(r.status(), 200);
    wait_running_version(&c, a, 3, Duration::from_secs(1)).await;
}

/// A Redis restored from an old copy holds an older version than the group
/// runs: the instances store their newest again, and no write can be made
/// against the old version (which would fork the group's version 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_old_copy_gets_the_newest_running_version_back() {
    let redis = PrivateRedis::start();
    let prefix = unique("qftest-behind");
    let cfg = config(&prefix, &redis.url(), STACKED, EXACT);
    let g = group(2, &cfg);
    let (a, b) = (&g[0], &g[1]);
    let c = client();
    let mut conn = connect(&redis.url());
    wait_stored_version(&mut conn, &prefix, 1, Duration::from_secs(3)).await;
    let old_doc: String = redis::cmd("GET")
        .arg(format!("{prefix}:config:doc"))
        .query(&mut conn)
        .expect("stored doc");
    assert_eq!(post_config(&c, a, one_limit(3, 1)).await.status(), 200);
    wait_running_version(&c, b, 2, Duration::from_secs(1)).await;
    // The old copy comes back.
    let () = redis::pipe()
        .cmd("SET")
        .arg(format!("{prefix}:config:doc"))
        .arg(&old_doc)
        .ignore()
        .cmd("SET")
        .arg(format!("{prefix}:config:version"))
        .arg(1)
        .ignore()
        .query(&mut conn)
        .expect("restore the old copy");
    wait_stored_version(&mut conn, &prefix, 2, Duration::from_secs(2)).await;
    for s in [a, b] {
        assert_eq!(running_version(&c, s).await, 2, "nobody went back");
    }
    let stale = post_config(&c, b, one_limit(5, 1)).await;
    assert_eq!(stale.status(), 409, "a write against the old copy is stale");
    let doc: Value = serde_json::from_str(
        &redis::cmd("GET")
            .arg(format!("{prefix}:config:doc"))
            .query::<String>(&mut conn)
            .expect("stored doc"),
    )
    .expect("json doc");
    assert_eq!(doc["limits"][0]["limit"], 3, "version 2's document is back");
}

async fn wait_running_version(c: &reqwest::Client, s: &Server, want: u64, within: Duration) {
    let t = Instant::now();
    loop {
        let v = running_version(c, s).await;
        if v == want {
            return;
        }
        assert!(t.elapsed() < within, "version {v} runs, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
