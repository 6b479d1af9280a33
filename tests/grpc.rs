//! The Envoy Rate Limit Service over gRPC against the real binary, with a
//! tonic client and grpcurl (a real external client, installed by
//! `scripts/tools.sh`): the same verdicts as `/check`, health,
//! reflection, bad input, the Redis state mode and its failure modes.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code as GrpcCode;

use common::services::{redis, unique, PrivateRedis};
use common::{client, get_text, Server};
use quotaflow::grpc::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use quotaflow::grpc::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use quotaflow::grpc::proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use quotaflow::grpc::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use quotaflow::grpc::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use quotaflow::grpc::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

const GRPC_ON: (&str, &str) = ("QUOTAFLOW__GRPC__LISTEN", "127.0.0.1:0");

/// The gRPC address a server announced.
fn grpc_addr(s: &Server) -> String {
    let line = s.wait_log(Duration::from_secs(10), |v| v["event"] == "grpc_listening");
    line["addr"].as_str().expect("addr").to_owned()
}

async fn rls(s: &Server) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(format!("http://{}", grpc_addr(s)))
        .await
        .expect("gRPC connection")
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|&(k, v)| Entry {
                key: k.into(),
                value: v.into(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

async fn should(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r)
        .await
        .expect("ShouldRateLimit")
        .into_inner()
}

fn headers_of(r: &RateLimitResponse) -> BTreeMap<String, String> {
    r.response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

/// `"name";r=N` of a `RateLimit` header, without `t` (two servers started
/// a moment apart may round a reset to different seconds).
fn name_and_remaining(ratelimit: &str) -> String {
    ratelimit.split(";t=").next().unwrap_or_default().to_owned()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const STACKED: &str = r#"
[log]
format = "json"

[grpc]
domain = "edge"

[grpc.descriptor_keys]
generic_key = "ignore"
x-user = "user_id"

[[limits]]
name = "per_user"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 6
refill_per_sec = 0.001

[[limits]]
name = "per_user_orders"
algorithm = "fixed_window"
key = ["user_id", "path"]
limit = 3
window = "1h"
match = { path_prefix = "/orders" }

[[limits]]
name = "per_ip"
algorithm = "sliding_window"
key = ["client_ip"]
limit = 4
window = "1h"

[[limits]]
name = "global"
algorithm = "fixed_window"
key = []
limit = 1000
window = "1h"

[[limits]]
name = "shadow_one"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1
window = "1h"
shadow = true

[whitelist]
user_ids = ["ops"]
"#;

/// One step of a sequence: user, client IP, method, path, cost.
type Step = (
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
    u32,
);

const SEQUENCE: [Step; 18] = [
    ("alice", None, "GET", "/orders/1", 1),
    ("alice", None, "GET", "/orders/1", 2),
    ("alice", Some("10.1.0.1"), "POST", "/orders/1", 1),
    ("alice", Some("10.1.0.1"), "GET", "/cart", 1),
    ("bob", Some("10.1.0.1"), "GET", "/cart", 1),
    ("bob", Some("10.1.0.1"), "GET", "/cart", 1),
    ("bob", Some("10.1.0.2"), "GET", "/orders/9", 3),
    ("alice", None, "GET", "/cart", 1),
    ("alice", None, "GET", "/cart", 1),
    ("ops", Some("10.1.0.1"), "GET", "/orders/1", 1),
    ("bob", None, "DELETE", "/orders/9", 1),
    ("carol", None, "GET", "/orders/2", 5),
    ("carol", None, "GET", "/orders/2", 1),
    ("carol", None, "GET", "/x", 1),
    ("carol", None, "GET", "/x", 3),
    ("dave", Some("10.1.0.3"), "GET", "/", 7),
    ("dave", Some("10.1.0.3"), "GET", "/", 4),
    ("dave", Some("10.1.0.3"), "GET", "/", 1),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_gives_the_verdicts_and_headers_of_check_for_the_same_sequence() {
    // Two fresh servers: one asked over gRPC, one over /check.
    let over_grpc = Server::start(Some(STACKED), &[GRPC_ON]);
    let over_http = Server::start(Some(STACKED), &[]);
    let mut g = rls(&over_grpc).await;
    let c = client();
    let mut refused = 0;
    for (i, &(user, ip, method, path, cost)) in SEQUENCE.iter().enumerate() {
        let mut entries = vec![("user_id", user), ("method", method), ("path", path)];
        let mut body = json!({"user_id": user, "method": method, "path": path, "cost": cost});
        if let Some(ip) = ip {
            entries.push(("remote_address", ip));
            body["client_ip"] = json!(ip);
        }
        let got = should(&mut g, request("edge", vec![descriptor(&entries)], cost)).await;
        let want = c
            .post(over_http.url("/check"))
            .json(&body)
            .send()
            .await
            .expect("/check");
        let want_status = want.status().as_u16();
        let want_headers: BTreeMap<String, String> = want
            .headers()
            .iter()
            .filter(|(k, _)| k.as_str().contains("ratelimit") || *k == "retry-after")
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let want_body: Value = want.json().await.expect("json");

        let over = got.overall_code == Code::OverLimit as i32;
        assert_eq!(over, want_status == 429, "step {i}: {got:?} vs {want_body}");
        refused += usize::from(over);
        assert_eq!(got.statuses.len(), 1, "step {i}");
        let st = &got.statuses[0];
        assert_eq!(st.code, got.overall_code, "step {i}");
        let got_headers = headers_of(&got);
        assert_eq!(
            got_headers.keys().collect::<Vec<_>>(),
            want_headers.keys().collect::<Vec<_>>(),
            "step {i}"
        );
        for (k, v) in &want_headers {
            let g = &got_headers[k];
            match k.as_str() {
                "ratelimit" => assert_eq!(name_and_remaining(g), name_and_remaining(v), "step {i}"),
                // Seconds to a reset: the servers started apart.
                "x-ratelimit-reset" | "retry-after" => {}
                _ => assert_eq!(g, v, "step {i}: {k}"),
            }
        }
        match want_headers.get("x-ratelimit-remaining") {
            Some(r) => {
                assert_eq!(st.limit_remaining.to_string(), *r, "step {i}");
                let name = want_headers["ratelimit"]
                    .split('"')
                    .nth(1)
                    .unwrap_or_default();
                let limit = st.current_limit.as_ref().expect("current_limit");
                assert_eq!(limit.name, name, "step {i}");
                assert!(st.duration_until_reset.is_some(), "step {i}");
            }
            // Whitelisted: no limit applies.
            None => assert!(st.current_limit.is_none(), "step {i}: {st:?}"),
        }
    }
    assert!(
        refused >= 5,
        "the sequence must reach limits: {refused} refused"
    );

    let metrics = get_text(&c, &over_grpc.url("/metrics")).await;
    assert_eq!(
        metric(
            &metrics,
            r#"quotaflow_checks_total{endpoint="grpc",verdict="refused"}"#
        ),
        refused as f64
    );
    assert_eq!(
        metric(
            &metrics,
            r#"quotaflow_checks_total{endpoint="grpc",verdict="whitelisted"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_are_each_a_check_with_their_own_status() {
    let s = Server::start(Some(STACKED), &[GRPC_ON]);
    let mut g = rls(&s).await;
    // The alias and an ignored key; hits_addend 0 counts as one.
    let alias = descriptor(&[("generic_key", "shop"), ("x-user", "erin")]);
    let r = should(&mut g, request("edge", vec![alias], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 5, "{r:?}");
    // A descriptor's own hits_addend wins over the request's.
    let mut heavy = descriptor(&[("user_id", "erin")]);
    heavy.hits_addend = Some(4);
    let r = should(&mut g, request("edge", vec![heavy], 1)).await;
    assert_eq!(r.statuses[0].limit_remaining, 1, "{r:?}");

    // erin has 1 left: refused for 2; frank and the IP are counted anyway.
    let r = should(
        &mut g,
        request(
            "edge",
            vec![
                descriptor(&[("user_id", "frank"), ("path", "/orders/5?page=2")]),
                descriptor(&[("user_id", "erin")]),
                descriptor(&[("remote_address", "2001:db8::7")]),
            ],
            2,
        ),
    )
    .await;
    let codes: Vec<i32> = r.statuses.iter().map(|s| s.code).collect();
    let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
    assert_eq!(codes, [ok, over, ok], "{r:?}");
    assert_eq!(r.overall_code, over);
    let limits: Vec<String> = r
        .statuses
        .iter()
        .map(|s| {
            s.current_limit
                .as_ref()
                .map(|l| l.name.clone())
                .unwrap_or_default()
        })
        .collect();
    // The query string is not part of the path.
    assert_eq!(limits, ["per_user_orders", "per_user", "per_ip"]);
    assert_eq!(
        [r.statuses[0].limit_remaining, r.statuses[2].limit_remaining],
        [1, 2]
    );
    // Without its query string, the same path: one left of 3, now none.
    let r2 = should(
        &mut g,
        request(
            "edge",
            vec![descriptor(&[("user_id", "frank"), ("path", "/orders/5")])],
            1,
        ),
    )
    .await;
    assert_eq!(r2.statuses[0].limit_remaining, 0, "{r2:?}");
    // The headers are those of the descriptor that binds: the refused one.
    let h = headers_of(&r);
    assert_eq!(
        h["ratelimit"].split(";t=").next(),
        Some(r#""per_user";r=1"#)
    );
    assert!(h.contains_key("retry-after"), "{h:?}");
    // per_user (6, refilling 0.001/s) is 6 per 6000 s: 86.4 a day, no
    // whole number per unit; per_user_orders is 3 an hour.
    let unit = |i: usize| {
        let l = r.statuses[i].current_limit.as_ref().expect("limit");
        (l.requests_per_unit, Unit::try_from(l.unit).expect("unit"))
    };
    assert_eq!(unit(1), (6, Unit::Unknown));
    assert_eq!(unit(0), (3, Unit::Hour));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_counts_nothing() {
    let s = Server::start(Some(STACKED), &[GRPC_ON]);
    let mut g = rls(&s).await;
    let secret = "sk_live_do_not_log_me";
    let mut overridden = descriptor(&[("user_id", "gus")]);
    overridden.limit = Some(RateLimitOverride {
        requests_per_unit: 1000,
        unit: 1,
    });
    let mut refund = descriptor(&[("user_id", "gus")]);
    refund.is_negative_hits = true;
    let gus = || descriptor(&[("user_id", "gus")]);
    let cases: Vec<(RateLimitRequest, &str)> = vec![
        (
            request("other", vec![gus()], 1),
            "domain `other` is not served here",
        ),
        (request("", vec![gus()], 1), "domain `` is not served here"),
        (request("edge", vec![], 1), "at least one descriptor"),
        (
            request("edge", vec![gus(), descriptor(&[("tenant", "t1")])], 1),
            "descriptor 1: unknown entry key `tenant`",
        ),
        (
            request(
                "edge",
                vec![descriptor(&[
                    ("user_id", "gus"),
                    ("remote_address", secret),
                ])],
                1,
            ),
            "the value of `remote_address` is not an IP address",
        ),
        (
            request(
                "edge",
                vec![descriptor(&[("api_key", secret), ("api_key", secret)])],
                1,
            ),
            "api_key is given twice",
        ),
        (
            request(
                "edge",
                vec![descriptor(&[("user_id", "gus"), ("x-user", "gus")])],
                1,
            ),
            "user_id is given twice",
        ),
        (
            request("edge", vec![descriptor(&[("user_id", "")])], 1),
            "user_id must not be empty",
        ),
        (
            request(
                "edge",
                vec![descriptor(&[("generic_key", "only-ignored")])],
                1,
            ),
            "a request needs at least one of",
        ),
        (
            request("edge", vec![overridden], 1),
            "limit overrides are not supported",
        ),
        (request("edge", vec![refund], 1), "negative hits"),
        (
            request("edge", vec![gus(); 65], 1),
            "at most 64 descriptors",
        ),
        (
            request(
                "edge",
                vec![gus(), descriptor(&[("api_key", secret)])],
                2_000_000_000,
            ),
            "cost must be at most",
        ),
    ];
    let n = cases.len();
    for (r, want) in cases {
        let status = g.should_rate_limit(r).await.expect_err("refused");
        assert_eq!(status.code(), GrpcCode::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(want),
            "{:?} lacks {want:?}",
            status.message()
        );
        assert!(!status.message().contains(secret), "{status:?}");
    }
    // Nothing was counted: gus still has all but one of 6.
    let r = should(&mut g, request("edge", vec![gus()], 1)).await;
    assert_eq!(r.statuses[0].limit_remaining, 5, "{r:?}");
    let metrics = get_text(&client(), &s.url("/metrics")).await;
    assert_eq!(
        metric(
            &metrics,
            r#"quotaflow_invalid_requests_total{endpoint="grpc"}"#
        ),
        n as f64
    );
    assert!(!metrics.contains(secret));
    assert!(s.logs().iter().all(|l| !l.contains(secret)));
}

/// grpcurl from scripts/tools.sh: on the PATH or in the cache.
fn grpcurl() -> PathBuf {
    let cached = std::env::var_os("QUOTAFLOW_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/quotaflow")))
        .map(|c| c.join("tools/bin/grpcurl"));
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("grpcurl"))
            .find(|f| f.is_file())
    });
    on_path
        .or(cached.filter(|f| f.is_file()))
        .expect("grpcurl not found: run `eval \"$(scripts/tools.sh grpc)\"` (scripts/test.sh runs scripts/tools.sh)")
}

/// grpcurl's status, stdout and stderr.
fn run_grpcurl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(grpcurl())
        .args(["-plaintext", "-max-time", "10"])
        .args(args)
        .output()
        .expect("running grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_finds_the_services_by_reflection_and_gets_over_limit() {
    let s = Server::start(Some(STACKED), &[GRPC_ON]);
    let addr = grpc_addr(&s);
    let (ok, services, err) = run_grpcurl(&[&addr, "list"]);
    assert!(ok, "{err}");
    for name in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == name),
            "{name} not in {services}"
        );
    }
    let (ok, described, err) = run_grpcurl(&[
        &addr,
        "describe",
        "envoy.service.ratelimit.v3.RateLimitService",
    ]);
    assert!(
        ok && described.contains("ShouldRateLimit"),
        "{described}{err}"
    );

    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let body = json!({ "service": service }).to_string();
        let (ok, out, err) = run_grpcurl(&["-d", &body, &addr, "grpc.health.v1.Health/Check"]);
        assert!(ok && out.contains("\"SERVING\""), "{out}{err}");
    }
    // The tonic health client agrees.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let call = json!({
        "domain": "edge",
        "descriptors": [{"entries": [{"key": "user_id", "value": "grpcurl-user"}]}],
    })
    .to_string();
    let rls = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
    let mut codes = Vec::new();
    for _ in 0..7 {
        let (ok, out, err) = run_grpcurl(&["-d", &call, &addr, rls]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
        codes.push(v["overallCode"].as_str().unwrap_or_default().to_owned());
        if codes.len() == 7 {
            assert_eq!(v["statuses"][0]["currentLimit"]["name"], "per_user", "{v}");
            assert!(
                v["responseHeadersToAdd"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|h| h["key"] == "retry-after")),
                "{v}"
            );
        }
    }
    assert_eq!(codes, ["OK", "OK", "OK", "OK", "OK", "OK", "OVER_LIMIT"]);

    let bad =
        json!({"domain": "edge", "descriptors": [{"entries": [{"key": "tenant", "value": "x"}]}]})
            .to_string();
    let (ok, _, err) = run_grpcurl(&["-d", &bad, &addr, rls]);
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("unknown entry key"),
        "{err}"
    );
}

const PER_USER_5: &str = r#"
[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 5
window = "1h"
"#;

/// A Redis state mode config; `budget` as tests/redis_mode.rs: long for a
/// test about exactness (a busy machine must not turn answers into
/// failure-mode ones), the default for one about the failure modes.
fn redis_config(prefix: &str, url: &str, limits: &str, budget: &str) -> String {
    format!(
        "[log]\nformat = \"json\"\n[state]\nbackend = \"redis\"\n[redis]\nurl = \"{url}\"\n\
         key_prefix = \"{prefix}\"\nbudget = \"{budget}\"\n[security]\nfingerprint_key = \"grpc-test\"\n{limits}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_redis_state_mode_two_instances_answer_from_one_count() {
    let config = redis_config(&unique("qftest-grpc"), &redis(), PER_USER_5, "2s");
    let a = Server::start(Some(&config), &[GRPC_ON]);
    // Three gRPC threads, each accepting some of the connections below.
    let b = Server::start(Some(&config), &[GRPC_ON, ("QUOTAFLOW__GRPC__THREADS", "3")]);
    let mut clients = [rls(&a).await, rls(&b).await, rls(&b).await, rls(&b).await];
    let mut seen = Vec::new();
    for i in 0..7 {
        let r = should(
            &mut clients[i % 4],
            request("any", vec![descriptor(&[("user_id", "shared")])], 1),
        )
        .await;
        let st = &r.statuses[0];
        seen.push((st.code == Code::Ok as i32, st.limit_remaining));
    }
    assert_eq!(
        seen,
        [
            (true, 4),
            (true, 3),
            (true, 2),
            (true, 1),
            (true, 0),
            (false, 0),
            (false, 0)
        ]
    );
    // /check on either instance sees the same count.
    let r = client()
        .post(b.url("/check"))
        .json(&json!({"user_id": "shared"}))
        .send()
        .await
        .expect("/check");
    assert_eq!(r.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_is_answered_over_grpc_by_failure_mode_and_says_so() {
    let redis = PrivateRedis::start();
    let s = Server::start(
        Some(&redis_config(
            &unique("qftest-grpc-stop"),
            &redis.url(),
            common::OPEN_AND_CLOSED,
            "50ms",
        )),
        &[GRPC_ON],
    );
    let mut g = rls(&s).await;
    let ask =
        |path: &'static str| request("", vec![descriptor(&[("user_id", "u"), ("path", path)])], 1);
    // Exact while Redis answers (a busy machine may stretch a first answer
    // past the 50 ms budget: a few tries).
    let mut exact = None;
    for _ in 0..10 {
        let r = g.should_rate_limit(ask("/open")).await.expect("rls");
        if r.metadata().get("quotaflow-degraded").is_none() {
            exact = Some(r.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let exact = exact.expect("an exact answer while Redis runs");
    assert!(
        (999_989..=999_999).contains(&exact.statuses[0].limit_remaining),
        "{exact:?}"
    );

    redis.signal("-STOP");
    let open = g.should_rate_limit(ask("/open")).await;
    let closed = g.should_rate_limit(ask("/closed")).await;
    redis.signal("-CONT");
    for (r, code) in [(open, Code::Ok), (closed, Code::OverLimit)] {
        let r = r.expect("answered by failure mode, not an error");
        let why = r
            .metadata()
            .get("quotaflow-degraded")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        assert!(why.is_some(), "{r:?}");
        let r = r.into_inner();
        assert_eq!(r.overall_code, code as i32, "{r:?}");
        let h = headers_of(&r);
        assert_eq!(h.get("quotaflow-degraded"), why.as_ref(), "{h:?}");
        // No remaining quota is stated: it is not known.
        assert!(
            !h.contains_key("x-ratelimit-remaining") && !h.contains_key("ratelimit"),
            "{h:?}"
        );
        assert_eq!(r.statuses[0].limit_remaining, 0);
        assert!(r.statuses[0].duration_until_reset.is_none());
        assert!(r.statuses[0].current_limit.is_some());
    }
}
