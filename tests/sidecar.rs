//! The sidecar over real HTTP against the real binary.

mod common;

use std::time::Duration;

use common::{client, get_text, header, Server};
use serde_json::{json, Value};

const TIGHT: &str = r#"
[log]
format = "json"

[state]
sweep_interval = "50ms"

[[limits]]
name = "per_user"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 3
refill_per_sec = 0.01

[[limits]]
name = "login"
algorithm = "fixed_window"
key = ["client_ip"]
limit = 2
window = "1h"
match = { method = "POST", path = "/login" }

[[limits]]
name = "per_key"
algorithm = "sliding_window"
key = ["api_key"]
limit = 2
window = "1h"

[whitelist]
user_ids = ["ops"]
"#;

async fn check(c: &reqwest::Client, s: &Server, body: Value) -> reqwest::Response {
    c.post(s.url("/check"))
        .json(&body)
        .send()
        .await
        .expect("POST /check")
}

#[tokio::test]
async fn embedded_default_turns_200s_into_429_with_headers() {
    let s = Server::start(None, &[]);
    let c = client();
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..12 {
        let r = check(&c, &s, json!({"user_id": "alice", "path": "/orders"})).await;
        statuses.push(r.status().as_u16());
        last = Some(r);
    }
    // per_user: 10 burst, 1/s refill. A slow machine may refill one token.
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    assert!((10..=11).contains(&allowed), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429));
    let r = last.expect("a response");
    assert_eq!(header(&r, "content-type"), "application/problem+json");
    assert!(header(&r, "ratelimit-policy").contains(r#""per_user";q=10;w=10"#));
    assert!(header(&r, "ratelimit").starts_with(r#""per_user";r=0;t="#));
    assert_eq!(header(&r, "x-ratelimit-limit"), "10");
    assert_eq!(header(&r, "x-ratelimit-remaining"), "0");
    let retry: u64 = header(&r, "retry-after")
        .parse()
        .expect("Retry-After is seconds");
    assert!((1..=1).contains(&retry), "retry-after {retry}");
    let body: Value = r.json().await.expect("problem body");
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], json!(["per_user"]));
}

#[tokio::test]
async fn stacked_limits_whitelist_and_match() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let login = json!({"client_ip": "198.51.100.4", "method": "post", "path": "/login"});
    assert_eq!(check(&c, &s, login.clone()).await.status(), 200);
    assert_eq!(check(&c, &s, login.clone()).await.status(), 200);
    let r = check(&c, &s, login).await;
    assert_eq!(r.status(), 429);
    // Another path from the same address is not a login.
    let other = json!({"client_ip": "198.51.100.4", "method": "POST", "path": "/orders"});
    assert_eq!(check(&c, &s, other).await.status(), 200);
    for _ in 0..10 {
        let r = check(&c, &s, json!({"user_id": "ops"})).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["whitelisted"], true);
    }
    // A request hitting two limits: refused by one, charged to neither.
    let both = json!({"user_id": "bob", "api_key": "sk_live_topsecret"});
    assert_eq!(check(&c, &s, both.clone()).await.status(), 200);
    assert_eq!(check(&c, &s, both.clone()).await.status(), 200);
    let r = check(&c, &s, both).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["violated-policies"], json!(["per_key"]));
    // bob still has one token of per_user left: the refusal did not take it.
    assert_eq!(check(&c, &s, json!({"user_id": "bob"})).await.status(), 200);
    assert_eq!(check(&c, &s, json!({"user_id": "bob"})).await.status(), 429);
}

#[tokio::test]
async fn malformed_checks_get_400_saying_what_is_wrong() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let cases = [
        ("{not json", "invalid check request"),
        (r#"{"usr_id": "a"}"#, "unknown field `usr_id`"),
        (r#"{"cost": 1}"#, "at least one of"),
        (r#"{"client_ip": "300.1.1.1"}"#, "client_ip"),
        (r#"{"user_id": "a", "cost": -1}"#, "cost"),
    ];
    for (body, expect) in cases {
        let r = c
            .post(s.url("/check"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(header(&r, "content-type"), "application/problem+json");
        let v: Value = r.json().await.expect("json");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(expect), "{body} -> {detail}");
    }
    let metrics = get_text(&c, &s.url("/metrics")).await;
    assert!(
        metrics.contains(r#"quotaflow_invalid_requests_total{endpoint="check"} 5"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn config_change_takes_effect_and_invalid_config_is_refused() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let got: Value = c
        .get(s.url("/rate_limit/config"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(got["version"], 1);
    assert_eq!(got["limits"][0]["name"], "per_user");

    let user = json!({"user_id": "carol"});
    for _ in 0..3 {
        assert_eq!(check(&c, &s, user.clone()).await.status(), 200);
    }
    assert_eq!(check(&c, &s, user.clone()).await.status(), 429);

    let invalid = json!({"limits": [
        {"name": "per_user", "key": ["user_id"], "capacity": 0, "refill_per_sec": 1},
        {"name": "dup", "algorithm": "fixed_window", "limit": 1, "window": "eventually"}
    ]});
    let r = c
        .post(s.url("/rate_limit/config"))
        .json(&invalid)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, vec!["limits[0].capacity", "limits[1].window"]);
    // The old config still runs.
    assert_eq!(check(&c, &s, user.clone()).await.status(), 429);

    let mut raised = got.clone();
    raised["limits"][0]["capacity"] = json!(100);
    let r = c
        .post(s.url("/rate_limit/config"))
        .json(&raised)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("json")["version"], 2);
    assert_eq!(check(&c, &s, user.clone()).await.status(), 200);
    // The same edit again is stale: version 1 is no longer running.
    let r = c
        .post(s.url("/rate_limit/config"))
        .json(&raised)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 409);
    let got: Value = c
        .get(s.url("/rate_limit/config"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(got["version"], 2);
    assert_eq!(got["limits"][0]["capacity"], 100);
    let metrics = get_text(&c, &s.url("/metrics")).await;
    assert!(metrics.contains("quotaflow_config_version 2"));
    assert!(
        metrics.contains(r#"quotaflow_config_updates_total{result="rejected"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn config_writes_need_the_admin_token_when_set() {
    let s = Server::start(
        Some(TIGHT),
        &[("QUOTAFLOW_ADMIN_TOKEN", "hunter2-long-token")],
    );
    let c = client();
    let doc = json!({"limits": []});
    let r = c
        .post(s.url("/rate_limit/config"))
        .json(&doc)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Bearer");
    let r = c
        .post(s.url("/rate_limit/config"))
        .bearer_auth("hunter2-long-tokeX")
        .json(&doc)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 401);
    let r = c
        .post(s.url("/rate_limit/config"))
        .bearer_auth("hunter2-long-token")
        .json(&doc)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    // Reads stay open, but the whitelist (who skips every limit) is shown
    // only to those who may change it.
    let r = c
        .get(s.url("/rate_limit/config"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    let anonymous: Value = r.json().await.expect("json");
    assert_eq!(anonymous["whitelist"], Value::Null);
    assert_eq!(anonymous["whitelist_redacted"], true);
    let admin: Value = c
        .get(s.url("/rate_limit/config"))
        .bearer_auth("hunter2-long-token")
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert!(admin["whitelist"].is_object(), "{admin}");
    assert_eq!(admin["whitelist_redacted"], Value::Null);
}

/// With no admin token, config writes come only from this machine, by a
/// loopback name, as JSON: a web page cannot post a config cross-site
/// (`text/plain` needs no preflight) or through a rebound DNS name.
#[tokio::test]
async fn config_writes_without_a_token_need_json_and_a_loopback_host() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let doc = json!({"limits": []}).to_string();
    let version = || async {
        let v: Value = c
            .get(s.url("/rate_limit/config"))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        v["version"].as_u64()
    };
    let r = c
        .post(s.url("/rate_limit/config"))
        .header("content-type", "text/plain")
        .body(doc.clone())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 415);
    assert_eq!(header(&r, "content-type"), "application/problem+json");
    let r = c
        .post(s.url("/rate_limit/config"))
        .header("content-type", "application/json")
        .header("host", "attacker.example:8080")
        .body(doc.clone())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["detail"].as_str().unwrap_or_default().contains("Host"),
        "{v}"
    );
    // A remote client behind a local proxy (trusted, so its
    // X-Forwarded-For is read) is not local.
    let r = c
        .post(s.url("/rate_limit/config"))
        .header("content-type", "application/json")
        .header("x-forwarded-for", "203.0.113.7")
        .body(doc.clone())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403);
    assert_eq!(version().await, Some(1), "refused writes changed nothing");
    // A loopback client by a loopback name may, and sees the whitelist.
    let full: Value = c
        .get(s.url("/rate_limit/config"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(full["whitelist"]["user_ids"], json!(["ops"]));
    let r = c
        .post(s.url("/rate_limit/config"))
        .header("content-type", "application/json; charset=utf-8")
        .body(doc)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    assert_eq!(version().await, Some(2));
    let applied = s.wait_log(Duration::from_secs(5), |v| v["event"] == "config_applied");
    assert_eq!(applied["peer"], "127.0.0.1");
    assert_eq!(applied["by"], "loopback");
}

/// Identity, cost, and the original method and URI count only when a
/// trusted proxy sent them: from any other peer a whitelisted user id, a
/// zero cost or another path in a header change nothing.
#[tokio::test]
async fn forward_auth_ignores_proxy_headers_from_untrusted_peers() {
    // No trusted proxies: the test client (127.0.0.1) is an ordinary client.
    let config = format!("{TIGHT}\n[server]\ntrusted_proxies = []\n");
    let s = Server::start(Some(&config), &[]);
    let c = client();
    // `login` allows 2 POST /login per client address an hour.
    let forged = [
        ("x-user-id", "ops"), // whitelisted, if it were believed
        ("x-quotaflow-cost", "0"),
        ("x-original-uri", "/elsewhere"),
        ("x-original-method", "GET"),
    ];
    let got = forward_auth_statuses(&c, &s, "POST", "/forward-auth/login", &forged, 4).await;
    assert_eq!(got, [200, 200, 429, 429]);
}

/// The statuses of `n` forward-auth calls in a row.
async fn forward_auth_statuses(
    c: &reqwest::Client,
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Vec<u16> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut statuses = Vec::new();
    for _ in 0..n {
        let mut r = c.request(method.clone(), s.url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        statuses.push(r.send().await.expect("auth").status().as_u16());
    }
    statuses
}

/// From a trusted proxy, only the configured URI and method headers count:
/// an `X-Forwarded-Uri` a client slipped past nginx does not replace the
/// `X-Original-URI` nginx set.
#[tokio::test]
async fn forward_auth_reads_only_the_configured_uri_header() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let nginx_and_a_client = [
        ("x-original-method", "POST"),
        ("x-original-uri", "/login"),
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/elsewhere"),
    ];
    let got = forward_auth_statuses(&c, &s, "GET", "/forward-auth", &nginx_and_a_client, 3).await;
    assert_eq!(got, [200, 200, 429]);
    // Traefik's pair, once configured, is read instead.
    let config = format!(
        "{TIGHT}\n[server]\nforward_auth_uri_header = \"x-forwarded-uri\"\nforward_auth_method_header = \"x-forwarded-method\"\n"
    );
    let s = Server::start(Some(&config), &[]);
    let traefik_and_a_client = [
        ("x-forwarded-method", "POST"),
        ("x-forwarded-uri", "/login"),
        ("x-original-uri", "/elsewhere"),
    ];
    let got = forward_auth_statuses(&c, &s, "GET", "/forward-auth", &traefik_and_a_client, 3).await;
    assert_eq!(got, [200, 200, 429]);
}

#[tokio::test]
async fn forward_auth_reads_identity_from_headers_and_trusted_proxies() {
    let config = format!(
        "{TIGHT}\n[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\nforward_auth_deny_status = 403\n"
    );
    let s = Server::start(Some(&config), &[]);
    let c = client();
    let login = |xff: &'static str| {
        c.get(s.url("/forward-auth"))
            .header("x-forwarded-for", xff)
            .header("x-original-method", "POST")
            .header("x-original-uri", "/login?next=/home")
            .send()
    };
    // The peer (127.0.0.1) is trusted, so the client is the right-most untrusted hop.
    assert_eq!(
        login("6.6.6.6, 203.0.113.8").await.expect("auth").status(),
        200
    );
    assert_eq!(
        login("1.1.1.1, 203.0.113.8").await.expect("auth").status(),
        200
    );
    let r = login("9.9.9.9, 203.0.113.8").await.expect("auth");
    assert_eq!(r.status(), 403);
    assert!(header(&r, "ratelimit").starts_with(r#""login";r=0"#));
    assert!(!header(&r, "retry-after").is_empty());
    // A different client behind the same proxy has its own budget.
    assert_eq!(login("203.0.113.9").await.expect("auth").status(), 200);

    // Envoy ext_authz style: the original path follows the prefix; identity headers.
    for expected in [200, 200, 200, 403] {
        let r = c
            .post(s.url("/forward-auth/api/orders"))
            .header("x-user-id", "dave")
            .send()
            .await
            .expect("auth");
        assert_eq!(r.status(), expected);
    }
    let r = c
        .get(s.url("/forward-auth"))
        .header("x-quotaflow-cost", "many")
        .send()
        .await
        .expect("auth");
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn api_keys_never_reach_logs_or_metrics_and_breaches_are_logged() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let secret = "sk_live_9f8e7d6c5b4a";
    for _ in 0..5 {
        check(&c, &s, json!({"api_key": secret})).await;
    }
    let breach = s.wait_log(Duration::from_secs(5), |v| v["event"] == "breach_started");
    assert_eq!(breach["limit"], "per_key");
    assert_eq!(breach["key_dimensions"], "api_key");
    assert_eq!(breach["key_fp"].as_str().map(str::len), Some(32));
    let metrics = get_text(&c, &s.url("/metrics")).await;
    assert!(metrics.contains(r#"quotaflow_breaches_total{limit="per_key",shadow="false"} 1"#));
    let config = get_text(&c, &s.url("/rate_limit/config")).await;
    for text in s.logs().iter().chain([&metrics, &config]) {
        assert!(!text.contains(secret), "secret leaked: {text}");
    }
    // No log line per allowed request at the default level.
    let per_request = s
        .logs()
        .iter()
        .filter(|l| l.contains("\"allowed\""))
        .count();
    assert_eq!(per_request, 0);
}

#[tokio::test]
async fn idle_keys_expire_and_keys_tracked_follows() {
    let config = r#"
[state]
sweep_interval = "50ms"

[[limits]]
name = "short"
algorithm = "fixed_window"
key = ["user_id"]
limit = 5
window = "200ms"
"#;
    let s = Server::start(Some(config), &[]);
    let c = client();
    for i in 0..50 {
        check(&c, &s, json!({"user_id": format!("u{i}")})).await;
    }
    let gauge = |text: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with("quotaflow_keys_tracked "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    let metrics = get_text(&c, &s.url("/metrics")).await;
    assert!(
        gauge(&metrics).is_some_and(|n| n > 0 && n <= 50),
        "{metrics}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = get_text(&c, &s.url("/metrics")).await;
        if gauge(&m) == Some(0) {
            assert!(m.contains("quotaflow_keys_expired_total"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "keys never expired:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_ready_and_graceful_sigterm() {
    let mut s = Server::start(Some(TIGHT), &[]);
    let c = client();
    assert_eq!(
        c.get(s.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
    assert_eq!(
        c.get(s.url("/readyz"))
            .send()
            .await
            .expect("readyz")
            .status(),
        200
    );
    let status = s.terminate();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn embedded_bus_turns_events_into_decisions_and_dead_letters() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let events: Vec<Value> = (0..5)
        .map(|_| json!({"user_id": "erin", "path": "/x"}))
        .collect();
    let r = c
        .post(s.url("/events"))
        .json(&events)
        .send()
        .await
        .expect("POST /events");
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.expect("json")["accepted"], 5);
    let r = c
        .post(s.url("/events"))
        .json(&json!({"user_id": "x", "client_ip": "999.0.0.1"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(
        r.status(),
        202,
        "content errors go to the dead letters, not a 400"
    );
    let r = c
        .post(s.url("/events"))
        .body("[{")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d: Value = c
            .get(s.url("/stream/decisions"))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        let dl: Value = c
            .get(s.url("/stream/dead-letters"))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        let blocks: Vec<&Value> = d
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["action"] == "BLOCK")
            .collect();
        if !blocks.is_empty() && dl.as_array().is_some_and(|a| !a.is_empty()) {
            assert_eq!(blocks.len(), 1);
            assert_eq!(blocks[0]["key"], "per_user/user_id=erin");
            assert!(dl[0]["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("client_ip"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no block decision: {d} / {dl}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = c.get(s.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
}

mod bounded_connections {
    //! Slow, silent and idle connections are closed on time, a request
    //! whose body stalls gets `408`, the connection cap keeps the server
    //! answering, and SIGTERM does not wait for a half-sent request.

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::common::Server;

    fn addr(s: &Server) -> String {
        s.base.trim_start_matches("http://").to_owned()
    }

    fn connect(s: &Server) -> TcpStream {
        let c = TcpStream::connect(addr(s)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c
    }

    /// Read until the server closes the connection; how long that took and
    /// what it sent.
    fn until_closed(mut c: TcpStream) -> (Duration, String) {
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the server kept the connection open: {e}"),
            }
        }
        (
            started.elapsed(),
            String::from_utf8_lossy(&got).into_owned(),
        )
    }

    fn healthz(s: &Server) -> String {
        let mut c = connect(s);
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .expect("write");
        until_closed(c).1
    }

    const SHORT: &str = r#"
[server]
header_timeout = "300ms"
request_timeout = "500ms"
"#;

    #[test]
    fn slow_silent_and_idle_connections_are_closed() {
        let s = Server::start(Some(SHORT), &[]);
        // Silent: never sends a byte.
        let (took, _) = until_closed(connect(&s));
        assert!(
            took < Duration::from_secs(2),
            "silent connection open {took:?}"
        );
        // Slow headers: half a request line and a header, then nothing.
        let mut c = connect(&s);
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
            .expect("write");
        let (took, _) = until_closed(c);
        assert!(took < Duration::from_secs(2), "slow headers open {took:?}");
        // Idle keep-alive: one request answered, then nothing.
        let mut c = connect(&s);
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("write");
        let (took, text) = until_closed(c);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            took < Duration::from_secs(2),
            "idle connection open {took:?}"
        );
        // A body that stalls: 408 within the request timeout.
        let mut c = connect(&s);
        c.write_all(
            b"POST /check HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user_id\":",
        )
        .expect("write");
        let (took, text) = until_closed(c);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(took < Duration::from_secs(2), "stalled body open {took:?}");
        assert!(healthz(&s).starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn past_the_connection_cap_new_connections_are_closed_and_health_recovers() {
        let config = "[server]\nheader_timeout = \"30s\"\nmax_connections = 4\n";
        let s = Server::start(Some(config), &[]);
        let held: Vec<TcpStream> = (0..4).map(|_| connect(&s)).collect();
        // Give the server a moment to accept all four.
        std::thread::sleep(Duration::from_millis(200));
        let (took, text) = until_closed(connect(&s));
        assert!(text.is_empty(), "{text}");
        assert!(
            took < Duration::from_secs(1),
            "refused connection open {took:?}"
        );
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = healthz(&s);
            if text.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "health did not recover: {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let refused = s.wait_log(Duration::from_secs(5), |v| {
            v["event"] == "connections_refused"
        });
        assert_eq!(refused["max_connections"], 4);
    }

    #[test]
    fn sigterm_does_not_wait_for_a_half_sent_request() {
        let config =
            "[server]\nheader_timeout = \"60s\"\nrequest_timeout = \"60s\"\nshutdown_grace = \"1s\"\n";
        let mut s = Server::start(Some(config), &[]);
        let mut c = connect(&s);
        c.write_all(
            b"POST /check HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .expect("write");
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let status = s.terminate();
        let took = started.elapsed();
        assert!(status.success(), "{status:?}");
        assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
        s.wait_log(Duration::from_secs(1), |v| {
            v["event"] == "http_drain_timeout"
        });
        s.wait_log(Duration::from_secs(1), |v| v["event"] == "stopped");
    }
}

/// Lowering a limit below a key's current count leaves the key refused
/// with nothing remaining — not a wrapped `remaining` (it was
/// 18446744073709550721 once) or a panic.
#[tokio::test]
async fn lowering_a_limit_below_a_keys_count_answers_zero_remaining() {
    let config = r#"
[[limits]]
name = "per_user"
algorithm = "fixed_window"
key = ["user_id"]
limit = 5
window = "1h"
"#;
    let s = Server::start(Some(config), &[]);
    let c = client();
    let user = json!({"user_id": "erin"});
    for _ in 0..5 {
        assert_eq!(check(&c, &s, user.clone()).await.status(), 200);
    }
    let lowered = json!({"limits": [{"name": "per_user", "algorithm": "fixed_window",
        "key": ["user_id"], "limit": 2, "window": "1h"}]});
    let r = c
        .post(s.url("/rate_limit/config"))
        .json(&lowered)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    let r = check(&c, &s, user).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-limit"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining"), "0");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["limits"][0]["remaining"], 0);
}

/// Every spelling a backend may serve as `/login` counts against the
/// `POST /login` limit: the path is canonical before it is matched.
#[tokio::test]
async fn path_spellings_cannot_dodge_a_path_limit() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let spellings = [
        "/login",
        "//login",
        "/login/",
        "/./login",
        "/x/../login",
        "/%6Cogin",
        "/LOGIN",
        "/login;jsessionid=1",
        "http://other.example/login",
    ];
    let mut statuses = Vec::new();
    for path in spellings {
        let r = check(
            &c,
            &s,
            json!({"client_ip": "198.51.100.4", "method": "POST", "path": path}),
        )
        .await;
        statuses.push(r.status().as_u16());
    }
    // `login` allows two an hour per address.
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429, 429, 429, 429]);
    // The same through forward-auth's original-URI header.
    let got = forward_auth_statuses(
        &c,
        &s,
        "GET",
        "/forward-auth",
        &[
            ("x-original-method", "POST"),
            ("x-original-uri", "/%6cOGIN/"),
            ("x-forwarded-for", "198.51.100.4"),
        ],
        1,
    )
    .await;
    assert_eq!(got, [429]);
}

#[tokio::test]
async fn a_pattern_that_could_never_match_is_refused() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let doc = json!({"limits": [{"name": "p", "algorithm": "fixed_window", "key": ["path"],
        "limit": 1, "window": "1s", "match": {"path_pattern": "/api/[v1"}}]});
    let r = c
        .post(s.url("/rate_limit/config"))
        .json(&doc)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["errors"][0]["field"], "limits[0].match.path_pattern");
}

/// Input the sidecar once took without a word: empty ids (every request
/// sending one shared a bucket), data after the JSON, and errors axum
/// answered in plain text.
#[tokio::test]
async fn empty_ids_trailing_data_and_routing_errors_get_clear_problems() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let r = check(&c, &s, json!({"user_id": ""})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("user_id must not be empty"),
        "{v}"
    );
    let r = c
        .post(s.url("/check"))
        .body(r#"{"user_id":"a"} {"user_id":"b"}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("after the JSON"),
        "{v}"
    );

    for (method, path, status) in [("GET", "/no-such-endpoint", 404), ("DELETE", "/check", 405)] {
        let r = c
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                s.url(path),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), status, "{method} {path}");
        assert_eq!(header(&r, "content-type"), "application/problem+json");
        let v: Value = r.json().await.expect("problem body");
        assert_eq!(v["status"], status);
    }
    let r = c
        .post(s.url("/check"))
        .body(vec![b' '; 3 * 1024 * 1024])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 413);
    assert_eq!(header(&r, "content-type"), "application/problem+json");
}

/// `POST /events` feeds the pipeline, so it is a write like a config
/// change, and one request cannot carry an unbounded batch.
#[tokio::test]
async fn events_are_a_bounded_write() {
    let s = Server::start(Some(TIGHT), &[("QUOTAFLOW_ADMIN_TOKEN", "events-token")]);
    let c = client();
    let one = json!([{"user_id": "frank"}]);
    let r = c
        .post(s.url("/events"))
        .json(&one)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 401);
    let r = c
        .post(s.url("/events"))
        .bearer_auth("events-token")
        .json(&one)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 202);
    let too_many: Vec<Value> = (0..10_001).map(|_| json!({"user_id": "f"})).collect();
    let r = c
        .post(s.url("/events"))
        .bearer_auth("events-token")
        .json(&too_many)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("at most 10000"),
        "{v}"
    );
}

/// Admin tokens from a file are rotated by editing it: the new token
/// works and the old one stops, with no restart; logs name the token's
/// id, never its value.
#[tokio::test]
async fn admin_tokens_rotate_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "deploy-2026-11:old-secret-value\n").expect("write");
    let config = format!(
        "{TIGHT}\n[server]\nadmin_tokens_file = \"{}\"\n",
        file.display()
    );
    let s = Server::start(
        Some(&config),
        &[("QUOTAFLOW_ADMIN_TOKEN", "env-secret-value")],
    );
    let c = client();
    let post = |token: &'static str| {
        c.post(s.url("/rate_limit/config"))
            .bearer_auth(token)
            .json(&json!({"limits": []}))
            .send()
    };
    assert_eq!(post("old-secret-value").await.expect("POST").status(), 200);
    assert_eq!(post("env-secret-value").await.expect("POST").status(), 200);
    std::fs::write(&file, "deploy-2026-12:new-secret-value\n").expect("rewrite");
    // Make the change visible even on a coarse file-time clock.
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_modified(later))
        .expect("mtime");
    assert_eq!(post("old-secret-value").await.expect("POST").status(), 401);
    assert_eq!(post("new-secret-value").await.expect("POST").status(), 200);
    let applied = s.wait_log(Duration::from_secs(5), |v| {
        v["event"] == "config_applied" && v["by"] == "token:deploy-2026-12"
    });
    assert_eq!(applied["peer"], "127.0.0.1");
    assert!(!s.logs().iter().any(|l| l.contains("secret-value")));
}

/// Distinct keys are what a client grows without bound (a new user id per
/// request): the store holds at most `state.max_keys`, says so in a metric
/// and a log line, and with `when_full = "refuse"` lets nobody new in.
#[tokio::test]
async fn a_full_key_store_refuses_new_keys_and_reports_it() {
    let config = r#"
[state]
shards = 1
max_keys = 8
when_full = "refuse"
sweep_interval = "100ms"

[[limits]]
name = "per_user"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 100
refill_per_sec = 0.001
"#;
    let s = Server::start(Some(config), &[]);
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..12 {
        let r = check(&c, &s, json!({"user_id": format!("spray-{i}")})).await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses[..8], [200; 8]);
    assert_eq!(statuses[8..], [429; 4]);
    // A key already held is still served.
    assert_eq!(
        check(&c, &s, json!({"user_id": "spray-0"})).await.status(),
        200
    );
    let logged = s.wait_log(Duration::from_secs(5), |v| {
        v["event"] == "key_capacity_reached"
    });
    assert_eq!(logged["new_keys"], 4);
    let metrics = get_text(&c, &s.url("/metrics")).await;
    assert!(
        metrics.contains("quotaflow_keys_over_capacity_total 4"),
        "{metrics}"
    );
    assert!(metrics.contains("quotaflow_keys_tracked 8"), "{metrics}");
}

/// Large `/events` batches are worked off the async threads: `/check`
/// keeps answering while they are encoded and queued (once, a few such
/// bodies held it up for 2.45 s).
#[tokio::test(flavor = "multi_thread")]
async fn large_event_batches_do_not_hold_up_checks() {
    let s = Server::start(Some(TIGHT), &[]);
    let c = client();
    let batch: Vec<Value> = (0..10_000)
        .map(|i| json!({"user_id": format!("batch-{i}"), "path": "/x"}))
        .collect();
    let body = serde_json::to_vec(&batch).expect("json");
    let posts: Vec<_> = (0..4)
        .map(|_| {
            let (c, url, body) = (c.clone(), s.url("/events"), body.clone());
            tokio::spawn(async move { c.post(url).body(body).send().await })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    while !posts.iter().all(|p| p.is_finished()) {
        let started = std::time::Instant::now();
        let r = check(&c, &s, json!({"user_id": "interactive"})).await;
        assert!(r.status().is_success() || r.status() == 429);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in posts {
        let r = p.await.expect("task").expect("POST /events");
        assert_eq!(r.status(), 202);
    }
    assert!(
        slowest < Duration::from_millis(1000),
        "a /check took {slowest:?}"
    );
}
