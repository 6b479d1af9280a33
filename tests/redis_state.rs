//! The Redis state mode's script against a real Redis: it must give the
//! in-memory limiter's decisions, to the unit, for every algorithm, stacked
//! limits, shadow limits, late requests and any cost.

mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};

use common::services::{redis, unique};
use quotaflow_adapters::metrics::Metrics;
use quotaflow_adapters::redis_state::{self, RedisState};
use quotaflow_adapters::settings::RedisSettings;
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::limiter::{BreachEvent, Decision, Limiter};
use quotaflow_core::rules::{Request, RulesDoc};

/// Wall-clock-sized instants, so the script's arithmetic runs at the
/// magnitudes it meets in production.
const EPOCH: u64 = 1_764_000_000_000;

fn backend(prefix: &str) -> RedisState {
    let settings = RedisSettings {
        url: redis(),
        key_prefix: prefix.to_owned(),
        deny_cache: false,
        budget: Duration::from_secs(5),
        ..RedisSettings::default()
    };
    RedisState::start(&settings, Arc::new(Metrics::new().expect("metrics"))).expect("start")
}

fn limiter(limits: &[Value]) -> Limiter {
    let doc = RulesDoc::from_json(json!({ "limits": limits }).to_string().as_bytes())
        .expect("valid rules");
    let l = Limiter::new(doc, Fingerprinter::from_secret("redis-state-test"), 1).expect("limiter");
    l.with_rules_check(Box::new(redis_state::check_rules))
        .expect("runs in Redis mode")
}

fn request(user: &str, cost: u64) -> Request {
    Request {
        user_id: Some(user.to_owned()),
        path: Some("/orders".to_owned()),
        cost,
        ..Request::default()
    }
}

/// Decide `req` at `now` in Redis with `l`'s rules.
fn in_redis(l: &Limiter, rs: &RedisState, req: &Request, now: u64) -> Decision {
    let rules = l.rules();
    let m = l.matched(&rules, req);
    if m.whitelisted || m.probes.is_empty() {
        return m.decision(rules.version, &[]);
    }
    let answer = rs
        .submit_at(&m.probes, req.cost, now)
        .expect("queued")
        .blocking_recv()
        .expect("answered")
        .expect("Redis answered");
    m.decision(rules.version, &answer.probed)
}

fn limit_strategy(i: usize) -> impl Strategy<Value = Value> {
    let name = format!("l{i}");
    let key = prop_oneof![Just(json!(["user_id"])), Just(json!([]))];
    let algo =
        prop_oneof![
        (1u64..6, prop_oneof![Just(0.5f64), Just(1.0), Just(3.0), Just(20.0)]).prop_map(
            |(c, r)| json!({"algorithm": "token_bucket", "capacity": c, "refill_per_sec": r})
        ),
        (1u64..6, prop_oneof![Just("100ms"), Just("1s"), Just("3s")])
            .prop_map(|(n, w)| json!({"algorithm": "fixed_window", "limit": n, "window": w})),
        (1u64..6, prop_oneof![Just("100ms"), Just("1s"), Just("3s")])
            .prop_map(|(n, w)| json!({"algorithm": "sliding_window", "limit": n, "window": w})),
    ];
    (algo, key, prop::bool::weighted(0.2)).prop_map(move |(mut a, key, shadow)| {
        a["name"] = json!(name);
        a["key"] = key;
        a["shadow"] = json!(shadow);
        a
    })
}

fn limits_strategy() -> impl Strategy<Value = Vec<Value>> {
    (1usize..4).prop_flat_map(|n| (0..n).map(limit_strategy).collect::<Vec<_>>())
}

/// (user, time step in ms, possibly back in time, cost)
fn steps() -> impl Strategy<Value = Vec<(u8, i64, u64)>> {
    prop::collection::vec(
        (
            0u8..2,
            prop_oneof![8 => 0i64..400, 1 => -500i64..0, 1 => 400i64..4_000],
            prop_oneof![8 => Just(1u64), 2 => 0u64..8],
        ),
        1..40,
    )
}

/// A decision without its breach edges: those follow a key's refusal
/// streak, which Redis forgets when the key expires and memory when its
/// sweeper passes, so they may differ after an expiry (checked apart, in
/// `refusal_streaks_end_with_their_length`).
fn without_events(mut d: Decision) -> Decision {
    for o in &mut d.outcomes {
        o.event = None;
    }
    d
}

fn same_decisions(limits: &[Value], steps: &[(u8, i64, u64)]) {
    let l = limiter(limits);
    let rs = backend(&unique("qftest-rs-eq"));
    let mut now = EPOCH as i64;
    for (n, &(user, dt, cost)) in steps.iter().enumerate() {
        now += dt;
        let req = request(["alice", "bob"][usize::from(user)], cost);
        let want = without_events(l.check(&req, now as u64));
        let got = without_events(in_redis(&l, &rs, &req, now as u64));
        assert_eq!(got, want, "step {n} at +{} ms", now - EPOCH as i64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_script_decides_as_the_core(limits in limits_strategy(), steps in steps()) {
        same_decisions(&limits, &steps);
    }
}

#[test]
fn large_parameters_within_the_exact_range_agree() {
    // A token bucket refilling over ~23 days and a sliding window of a
    // million a day: products near 2^51, where doubles would first lose units.
    let limits = [
        json!({"name": "tb", "key": ["user_id"], "capacity": 1_000_000, "refill_per_sec": 0.5}),
        json!({"name": "sw", "key": ["user_id"], "algorithm": "sliding_window", "limit": 1_000_000, "window": "1d"}),
        json!({"name": "fw", "key": [], "algorithm": "fixed_window", "limit": 1_000_000_000_000u64, "window": "366d"}),
    ];
    let steps: Vec<(u8, i64, u64)> = (0..30)
        .map(|i| {
            (
                0,
                [0, 1, 999, 86_399_000][i % 4],
                [1, 400_000, 999_999, 7][i % 4],
            )
        })
        .collect();
    same_decisions(&limits, &steps);
}

#[test]
fn rule_sets_beyond_the_exact_range_are_refused() {
    let doc = RulesDoc::from_json(
        json!({"limits": [
            {"name": "slow", "capacity": 3_000_000, "refill_per_sec": 1},
            {"name": "huge", "algorithm": "sliding_window", "limit": 1_000_000_000, "window": "7d"},
        ]})
        .to_string()
        .as_bytes(),
    )
    .expect("valid in memory");
    let err = Limiter::new(doc, Fingerprinter::from_secret("t"), 1)
        .expect("memory limiter")
        .with_rules_check(Box::new(redis_state::check_rules))
        .err()
        .expect("refused in Redis mode");
    let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["limits[0].refill_per_sec", "limits[1].limit"]);
}

#[test]
fn keys_carry_a_ttl_and_no_identity_in_clear() {
    let prefix = unique("qftest-rs-ttl");
    let rs = backend(&prefix);
    let l = limiter(&[
        json!({"name": "fw", "key": ["user_id"], "algorithm": "fixed_window", "limit": 5, "window": "2s"}),
    ]);
    let now = EPOCH;
    let d = in_redis(&l, &rs, &request("carol-secret", 1), now);
    assert!(d.allowed);
    let mut c = redis::Client::open(redis().as_str())
        .expect("client")
        .get_connection()
        .expect("connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut c)
        .expect("keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(!keys[0].contains("carol"), "{}", keys[0]);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut c)
        .expect("pttl");
    // The window ends at most 2 s after `now`: the key lives until then,
    // and one second more (for late requests).
    assert!((1_001..=3_000).contains(&ttl), "ttl {ttl}");
}

#[test]
fn refusal_streaks_end_with_their_length() {
    let rs = backend(&unique("qftest-rs-streak"));
    let l = limiter(&[
        json!({"name": "fw", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1s"}),
    ]);
    let events: Vec<_> = [0, 1, 2, 3, 1_000]
        .iter()
        .map(|dt| {
            let d = in_redis(&l, &rs, &request("dave", 1), EPOCH + dt);
            (d.allowed, d.outcomes[0].event)
        })
        .collect();
    assert_eq!(
        events,
        [
            (true, None),
            (false, Some(BreachEvent::Started)),
            (false, None),
            (false, None),
            (true, Some(BreachEvent::Ended { refused: 3 })),
        ]
    );
}
