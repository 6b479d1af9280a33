//! The live page (`GET /ui`) in a real headless Chromium against the real
//! binary: it renders the running config, its numbers follow refused
//! traffic, keys appear only as their keyed fingerprints, and the page
//! runs without a console error or a Content-Security-Policy violation.
//!
//! The browser is driven by `tests/ui/driver.mjs` (Node, no packages: the
//! DevTools protocol over a pipe). `scripts/services.sh up` installs
//! Chromium and Node and exports CHROMIUM and NODEJS. The screenshot goes
//! to the test's temporary directory; with UPDATE_UI_SCREENSHOT=1 also to
//! docs/ui.png.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::limiter::Limiter;
use quotaflow_core::rules::{Request, RulesDoc};
use serde_json::{json, Value};

const SECRET: &str = "ui-test-fingerprint-key";

const CONFIG: &str = r#"
[log]
format = "json"

[security]
fingerprint_key = "ui-test-fingerprint-key"

[alerts]
window = "1s"
min_refused = 3

[[limits]]
name = "per_user"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 5
refill_per_sec = 1

[[limits]]
name = "per_api_key"
algorithm = "fixed_window"
key = ["api_key"]
limit = 3
window = "1m"

[whitelist]
user_ids = ["whitelisted-operator-7"]
"#;

fn env_tool(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is unset: run `eval \"$(scripts/services.sh up)\"` (which installs \
             Chromium and Node and exports their paths), or `scripts/test.sh`"
        )
    })
}

/// The browser, through tests/ui/driver.mjs.
struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ui/driver.mjs");
        let mut child = Command::new(env_tool("NODEJS"))
            .arg(driver)
            .arg(env_tool("CHROMIUM"))
            .arg(profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the browser driver");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("driver stdout"));
        let mut b = Browser {
            child,
            stdin,
            stdout,
            _profile: profile,
        };
        let ready = b.read();
        assert_eq!(ready["ready"], true, "{ready}");
        b
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("driver answer");
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("driver said `{line}`: {e}"));
        assert_eq!(v["ok"], true, "driver: {v}");
        v
    }

    fn call(&mut self, cmd: Value) -> Value {
        let stdin = self.stdin.as_mut().expect("driver stdin");
        writeln!(stdin, "{cmd}").expect("send to driver");
        stdin.flush().expect("flush");
        self.read()
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.call(json!({"cmd": "eval", "expr": expr}))["value"].take()
    }

    fn problems(&mut self) -> Vec<String> {
        serde_json::from_value(self.call(json!({"cmd": "problems"}))["value"].take())
            .expect("a list of problems")
    }

    /// Evaluate `expr` until `done` holds for its value, or panic after `timeout`.
    fn wait_for(
        &mut self,
        what: &str,
        expr: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr);
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; last value {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // End of input closes the browser; then the driver exits.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of every row of a table's body, one string per row.
fn rows_expr(table: &str) -> String {
    format!(
        "[...document.querySelectorAll('#{table} tbody tr')].map(r => [...r.cells].map(c => c.textContent).join(' | '))"
    )
}

/// A limit's cell (by class) in the limits table.
fn limit_cell(limit: &str, class: &str) -> String {
    format!("document.querySelector('#limits tr[data-limit=\"{limit}\"] td.{class}')?.textContent ?? null")
}

fn number(v: &Value) -> f64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(-1.0)
}

/// The fingerprint the page must show for a key: the keyed hash of the
/// limit's state key, under the server's `security.fingerprint_key`.
fn fingerprint_of(limit: usize, req: &Request) -> String {
    let doc = RulesDoc::from_json(
        serde_json::to_string(&json!({"limits": [
            {"name": "per_user", "algorithm": "token_bucket", "key": ["user_id"], "capacity": 5, "refill_per_sec": 1},
            {"name": "per_api_key", "algorithm": "fixed_window", "key": ["api_key"], "limit": 3, "window": "1m"},
        ]}))
        .expect("json")
        .as_bytes(),
    )
    .expect("doc");
    let limiter = Limiter::new(doc, Fingerprinter::from_secret(SECRET), 1).expect("limiter");
    limiter.rules().limits[limit]
        .key_id(req, &mut String::new())
        .expect("the limit applies")
        .to_string()
}

/// `/check` traffic until `stop`: one user and one API key, both far over
/// their limits (about 40 checks a second each).
async fn load(base: String, user: String, api_key: String, stop: Arc<AtomicBool>) {
    let c = common::client();
    while !stop.load(Ordering::SeqCst) {
        for body in [json!({"user_id": user}), json!({"api_key": api_key})] {
            let _ = c.post(format!("{base}/check")).json(&body).send().await;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn the_live_page_shows_config_rates_and_fingerprinted_keys_without_errors() {
    let s = Server::start(Some(CONFIG), &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let c = common::client();
    // Unique per run: a test that passed on a stale page cannot pass again.
    let tag = format!("{:08x}", rand::random::<u32>());
    let user = format!("user-alice-{tag}");
    let api_key = format!("sk_live_secret_{tag}");
    let stream_user = format!("user-bob-{tag}");

    let mut b = Browser::start();
    b.call(json!({"cmd": "open", "url": s.url("/ui")}));

    // It renders: title, config version, the limits table.
    b.wait_for(
        "two polls",
        "Number(document.body.dataset.polls || 0)",
        Duration::from_secs(10),
        |v| v.as_u64().unwrap_or(0) >= 2,
    );
    assert_eq!(b.eval("document.title"), "quotaflow");
    assert_eq!(
        b.eval("document.getElementById('version').textContent"),
        "config v1"
    );
    let limits = b.eval(&rows_expr("limits"));
    let limits: Vec<String> = serde_json::from_value(limits).expect("rows");
    assert_eq!(limits.len(), 2, "{limits:?}");
    assert!(
        limits[0].starts_with("per_user | token_bucket | user_id | 5 burst, 1/s | "),
        "{limits:?}"
    );
    assert!(
        limits[1].starts_with("per_api_key | fixed_window | api_key | 3 per 1m | "),
        "{limits:?}"
    );
    // Before any traffic: nothing refused, nobody in breach.
    assert_eq!(b.eval(&limit_cell("per_user", "rate-refused")), "0.0");
    assert_eq!(
        b.eval(&rows_expr("top")),
        json!(["no key is being refused"])
    );
    // Partition ownership of the embedded bus (4 partitions).
    let partitions: Vec<String> =
        serde_json::from_value(b.eval(&rows_expr("partitions"))).expect("rows");
    assert_eq!(partitions.len(), 4, "{partitions:?}");

    // Under load the refused rate and the top refused keys follow.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = rt.spawn(load(
        s.base.clone(),
        user.clone(),
        api_key.clone(),
        stop.clone(),
    ));
    b.wait_for(
        "a refused rate for per_user",
        &limit_cell("per_user", "rate-refused"),
        Duration::from_secs(15),
        |v| number(v) > 1.0,
    );
    b.wait_for(
        "a refused rate for per_api_key",
        &limit_cell("per_api_key", "rate-refused"),
        Duration::from_secs(15),
        |v| number(v) > 1.0,
    );
    let user_fp = fingerprint_of(
        0,
        &Request {
            user_id: Some(user.clone()),
            ..Request::default()
        },
    );
    let key_fp = fingerprint_of(
        1,
        &Request {
            api_key: Some(api_key.clone()),
            ..Request::default()
        },
    );
    let top_refused = |fp: &str| {
        format!("Number(document.querySelector('#top tr[data-key-fp=\"{fp}\"] td.refused')?.textContent ?? -1)")
    };
    let first = b.wait_for(
        "alice's key among the top refused",
        &top_refused(&user_fp),
        Duration::from_secs(10),
        |v| v.as_f64().unwrap_or(-1.0) > 0.0,
    );
    b.wait_for(
        "the API key among the top refused",
        &top_refused(&key_fp),
        Duration::from_secs(10),
        |v| v.as_f64().unwrap_or(-1.0) > 0.0,
    );
    let first = first.as_f64().unwrap_or(0.0);
    b.wait_for(
        "alice's refused count growing",
        &top_refused(&user_fp),
        Duration::from_secs(10),
        |v| v.as_f64().unwrap_or(-1.0) > first,
    );
    let top: Vec<String> = serde_json::from_value(b.eval(&rows_expr("top"))).expect("rows");
    assert!(
        top.iter()
            .any(|r| r.starts_with(&format!("per_user | {user_fp} | "))),
        "{top:?}"
    );
    assert!(
        top.iter()
            .any(|r| r.starts_with(&format!("per_api_key | {key_fp} | "))),
        "{top:?}"
    );
    let breaches: Vec<String> =
        serde_json::from_value(b.eval(&rows_expr("breaches"))).expect("rows");
    assert!(
        breaches
            .iter()
            .any(|r| r.contains("started") && r.contains(&user_fp)),
        "{breaches:?}"
    );

    // The embedded pipeline's outputs, fingerprinted: a key over its limit
    // in one event-time window, closed by a later event.
    let now = common_now_ms();
    let mut events: Vec<Value> = (0..10)
        .map(|i| json!({"user_id": stream_user, "timestamp_ms": now - 3000 + i * 10}))
        .collect();
    events.push(json!({"user_id": stream_user, "timestamp_ms": now}));
    let posted = rt.block_on(async {
        c.post(s.url("/events"))
            .json(&events)
            .send()
            .await
            .expect("POST /events")
            .status()
    });
    assert_eq!(posted, 202);
    b.wait_for(
        "a BLOCK decision",
        &rows_expr("decisions"),
        Duration::from_secs(10),
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|r| r.as_str().is_some_and(|r| r.contains("BLOCK")))
            })
        },
    );
    b.wait_for(
        "a breach alert",
        &rows_expr("alerts"),
        Duration::from_secs(10),
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|r| r.as_str().is_some_and(|r| r.contains("per_user")))
            })
        },
    );

    // Screenshot while under load, then stop it.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui.png");
    b.call(json!({"cmd": "screenshot", "path": shot}));
    stop.store(true, Ordering::SeqCst);
    rt.block_on(traffic).expect("load task");
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if std::env::var("UPDATE_UI_SCREENSHOT").is_ok_and(|v| v == "1") {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ui.png"), &png)
            .expect("docs/ui.png");
    }

    // No identity in clear, anywhere the page or its JSON could show one.
    let page = b
        .eval("document.documentElement.outerHTML")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let state = rt.block_on(common::get_text(&c, &s.url("/ui/state.json")));
    for secret in [
        &user,
        &api_key,
        &stream_user,
        &"whitelisted-operator-7".to_owned(),
    ] {
        assert!(!page.contains(secret.as_str()), "the page shows {secret}");
        assert!(
            !state.contains(secret.as_str()),
            "the state shows {secret}: {state}"
        );
    }
    assert!(page.contains(&user_fp) && page.contains(&key_fp));

    // No console error, exception or CSP violation all along ...
    let problems = b.problems();
    assert!(
        problems.is_empty(),
        "the page reported problems: {problems:#?}"
    );
    // ... and the check would see one: an inline script is refused.
    b.eval("(() => { const s = document.createElement('script'); s.textContent = 'window.inlineRan = 1'; document.body.append(s); })()");
    assert_eq!(
        b.eval("window.inlineRan ?? null"),
        Value::Null,
        "an inline script ran"
    );
    let problems = b.problems();
    assert!(
        problems.iter().any(|p| p.starts_with("csp: script-src")),
        "{problems:?}"
    );
}

fn common_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// In Kafka mode the state shows the partitions this instance owns, under
/// which epoch, where each stands and its lag (the gauge the consumer
/// refreshes every second), and the latest BLOCK decisions fingerprinted.
#[tokio::test(flavor = "multi_thread")]
async fn in_kafka_mode_the_state_shows_owned_partitions_and_their_lag() {
    use common::stream::{event, Fixture};
    let f = Fixture::new("ui", 2).await;
    let limits = "[[limits]]\nname = \"per_user\"\nalgorithm = \"fixed_window\"\nkey = [\"user_id\"]\nlimit = 2\nwindow = \"1m\"\n";
    let s = Server::start(Some(&f.config(limits, "")), &[]);
    let now = common_now_ms();
    let mut ends = std::collections::BTreeMap::new();
    for n in 0..20 {
        let sent = f
            .send(event(&format!("kafka-user-{}", n % 4), now, n), now)
            .await;
        let end = ends.entry(sent.partition).or_insert(0);
        *end = (*end).max(sent.offset + 1);
    }
    assert_eq!(ends.len(), 2, "both partitions got events: {ends:?}");
    let c = common::client();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let text = common::get_text(&c, &s.url("/ui/state.json")).await;
        let state: Value = serde_json::from_str(&text).expect("JSON");
        let stream = &state["stream"];
        assert_eq!(stream["mode"], "kafka", "{state}");
        assert!(!text.contains("kafka-user-"), "{text}");
        // Each of the four users sent five events against a limit of two.
        let blocked = stream["decisions"].as_array().map_or(0, |d| {
            d.iter()
                .filter(|x| x["action"] == "BLOCK" && x["limit"] == "per_user")
                .count()
        });
        let caught_up = stream["partitions"].as_array().is_some_and(|ps| {
            ps.len() == 2
                && ps.iter().all(|p| {
                    let end = p["partition"].as_i64().and_then(|n| ends.get(&(n as i32)));
                    p["epoch"].as_u64().is_some()
                        && end.is_some_and(|e| p["next_offset"].as_i64() == Some(*e))
                        && p["lag"] == 0
                })
        });
        if caught_up && blocked == 4 {
            break;
        }
        if Instant::now() >= deadline {
            let m = common::get_text(&c, &s.url("/metrics")).await;
            let m: Vec<&str> = m.lines().filter(|l| l.contains("partition")).collect();
            panic!("partitions never caught up to {ends:?} with a known lag, or not 4 blocks ({blocked}): {state}\n{m:#?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
