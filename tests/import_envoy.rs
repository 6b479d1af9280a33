//! `quotaflow import-envoy` end to end: the real binary converts envoy
//! ratelimit files (tests/data/envoy/), a real `quotaflow serve` runs the
//! result, and the same recorded sequence of requests goes to it and to the
//! real envoyproxy/ratelimit (its HTTP /json endpoint, on a private Redis).
//! Every verdict must agree, except the one the sequence marks as differing
//! by design.
//!
//! envoy ratelimit comes from `ENVOY_RATELIMIT_BIN` (exported by
//! `scripts/tools.sh`, which scripts/test.sh evaluates), else from
//! `scripts/tools.sh envoy-ratelimit`, which builds it once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::services::PrivateRedis;
use common::Server;
use serde_json::{json, Map, Value};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/envoy");

fn data(name: &str) -> PathBuf {
    Path::new(DATA).join(name)
}

/// Runs `quotaflow import-envoy ARGS`: (exit status, stdout, stderr).
fn import(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .arg("import-envoy")
        .args(args)
        .output()
        .expect("run import-envoy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_config(text: &str, ext: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("imported.{ext}"));
    std::fs::write(&path, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_quotaflow"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_RATELIMIT_BIN") {
        return PathBuf::from(p);
    }
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tools.sh"))
        .arg("envoy-ratelimit")
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/tools.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("export ENVOY_RATELIMIT_BIN="));
    match path {
        Some(p) if out.status.success() => PathBuf::from(p.trim()),
        _ => panic!("scripts/tools.sh envoy-ratelimit failed: cannot run envoyproxy/ratelimit"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// envoyproxy/ratelimit with `files` as its config, on its own Redis.
struct Envoy {
    child: Child,
    base: String,
    _redis: PrivateRedis,
    _dir: tempfile::TempDir,
}

impl Envoy {
    fn start(files: &[&str]) -> Envoy {
        let redis = PrivateRedis::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("ratelimit/config");
        std::fs::create_dir_all(&config).expect("runtime dir");
        for f in files {
            std::fs::copy(data(f), config.join(f)).expect("copy config");
        }
        let (http, grpc, debug) = (free_port(), free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("envoy.log")).expect("log file");
        // Only these settings (its defaults otherwise): no local cache of
        // over-limit keys, no stats sink.
        let child = Command::new(envoy_binary())
            .env_clear()
            .envs([
                ("HOST", "127.0.0.1".to_owned()),
                ("PORT", http.to_string()),
                ("GRPC_HOST", "127.0.0.1".to_owned()),
                ("GRPC_PORT", grpc.to_string()),
                ("DEBUG_HOST", "127.0.0.1".to_owned()),
                ("DEBUG_PORT", debug.to_string()),
                ("USE_STATSD", "false".to_owned()),
                ("LOG_LEVEL", "warn".to_owned()),
                ("CONFIG_TYPE", "FILE".to_owned()),
                ("RUNTIME_ROOT", dir.path().display().to_string()),
                ("RUNTIME_SUBDIRECTORY", "ratelimit".to_owned()),
                ("RUNTIME_APPDIRECTORY", "config".to_owned()),
                ("RUNTIME_WATCH_ROOT", "false".to_owned()),
                ("RUNTIME_IGNOREDOTFILES", "true".to_owned()),
                ("BACKEND_TYPE", "redis".to_owned()),
                ("REDIS_SOCKET_TYPE", "tcp".to_owned()),
                ("REDIS_TYPE", "SINGLE".to_owned()),
                ("REDIS_URL", format!("127.0.0.1:{}", redis.port)),
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start envoy ratelimit");
        let envoy = Envoy {
            child,
            base: format!("http://127.0.0.1:{http}"),
            _redis: redis,
            _dir: dir,
        };
        envoy.wait_healthy();
        envoy
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.healthy() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "envoy ratelimit did not become healthy within 20 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /healthcheck` answers 200 once the config is loaded and Redis answers.
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut conn) = std::net::TcpStream::connect(self.base.trim_start_matches("http://"))
        else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = String::new();
        conn.write_all(b"GET /healthcheck HTTP/1.0\r\n\r\n").is_ok()
            && conn.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.0 200")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- envoy ratelimit log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn sleep_until(ms: u64) {
    let now = now_ms();
    if ms > now {
        tokio::time::sleep(Duration::from_millis(ms - now)).await;
    }
}

/// One request of the sequence.
struct Sent {
    line: usize,
    fields: Map<String, Value>,
    envoy_ok: bool,
    quotaflow_ok: bool,
    second: u64,
    slot_second: u64,
    differs: Option<String>,
}

/// Envoy's descriptors for a request of `fields`: one per route action
/// whose every entry the request has (envoy skips the others).
fn descriptors(
    routes: &[Value],
    keys: &Map<String, Value>,
    fields: &Map<String, Value>,
) -> Vec<Value> {
    routes
        .iter()
        .filter_map(|route| {
            let entries: Option<Vec<Value>> = route
                .as_array()
                .expect("a route is a list of keys")
                .iter()
                .map(|k| {
                    let key = k.as_str().expect("key");
                    let field = keys[key].as_str().expect("field");
                    fields.get(field).map(|v| json!({"key": key, "value": v}))
                })
                .collect();
            entries.map(|e| json!({"entries": e}))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_config_decides_like_envoy_ratelimit_on_a_recorded_sequence() {
    let files = ["edge_proxy.yaml", "api.yaml"];
    let paths: Vec<String> = files
        .iter()
        .map(|f| data(f).display().to_string())
        .collect();
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (code, toml, stderr) = import(&args);
    assert_eq!(code, 0, "not everything was expressed:\n{stderr}");
    assert!(
        stderr.contains("6 limit(s); everything expressed"),
        "{stderr}"
    );
    let (ok, out) = check_config(&toml, "toml");
    assert!(ok && out.contains("ok (6 limits)"), "{out}\n{toml}");

    let client = common::client();
    // A stall that splits one request's two checks across a second boundary
    // puts them in different windows: the run says nothing then, and starts
    // again on fresh servers (at most three times).
    let mut attempt = 0;
    let sent = 'attempt: loop {
        attempt += 1;
        let envoy = Envoy::start(&files);
        let quotaflow = Server::start(Some(&toml), &[]);

        let seq: Value = serde_json::from_str(
            &std::fs::read_to_string(data("sequence.json")).expect("sequence"),
        )
        .expect("sequence.json");
        let keys = seq["keys"].as_object().expect("keys");
        let routes = seq["routes"].as_object().expect("routes");

        // Both count in windows aligned to the epoch second (and minute): start
        // a little after a boundary, and send each request to both within one
        // second, never near its end.
        let t0 = (now_ms() / 1000 + 1) * 1000;
        let mut sent: Vec<Sent> = Vec::new();
        for (line, r) in seq["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .enumerate()
        {
            let slot = r["slot"].as_u64().expect("slot");
            let fields: Map<String, Value> = ["client_ip", "user_id", "api_key", "method", "path"]
                .iter()
                .filter_map(|f| r.get(*f).map(|v| ((*f).to_owned(), v.clone())))
                .collect();
            for _ in 0..r.get("repeat").and_then(Value::as_u64).unwrap_or(1) {
                sleep_until(t0 + slot * 1000 + 50).await;
                if now_ms() % 1000 > 850 {
                    sleep_until(now_ms() / 1000 * 1000 + 1050).await;
                }
                let before = now_ms();
                let mut envoy_ok = true;
                for (domain, domain_routes) in routes {
                    let ds = descriptors(domain_routes.as_array().expect("routes"), keys, &fields);
                    if ds.is_empty() {
                        continue;
                    }
                    let resp = client
                        .post(format!("{}/json", envoy.base))
                        .json(&json!({"domain": domain, "descriptors": ds}))
                        .send()
                        .await
                        .expect("envoy /json");
                    let status = resp.status().as_u16();
                    assert!(
                        status == 200 || status == 429,
                        "envoy answered {status}: {}",
                        resp.text().await.unwrap_or_default()
                    );
                    envoy_ok &= status == 200;
                }
                let resp = client
                    .post(quotaflow.url("/check"))
                    .json(&fields)
                    .send()
                    .await
                    .expect("quotaflow /check");
                let status = resp.status().as_u16();
                assert!(
                    status == 200 || status == 429,
                    "quotaflow answered {status}"
                );
                let after = now_ms();
                if before / 1000 != after / 1000 {
                    assert!(
                    attempt < 3,
                    "three runs in a row had a request whose checks straddled a second boundary (the last a stall of {} ms)",
                    after - before
                );
                    eprintln!(
                    "attempt {attempt}: request {line}'s checks straddled a second boundary (a stall of {} ms); starting again",
                    after - before
                );
                    continue 'attempt;
                }
                sent.push(Sent {
                    line,
                    fields: fields.clone(),
                    envoy_ok,
                    quotaflow_ok: status == 200,
                    second: before / 1000,
                    slot_second: t0 / 1000 + slot,
                    differs: r.get("differs").and_then(Value::as_str).map(str::to_owned),
                });
            }
        }
        break 'attempt sent;
    };

    let mut mismatches = Vec::new();
    for s in &sent {
        let on_time = s.second == s.slot_second;
        match &s.differs {
            // envoy counted refused requests against this one's API key too.
            Some(_) if on_time && (s.envoy_ok || !s.quotaflow_ok) => mismatches.push(format!(
                "request {} {}: expected envoy OVER_LIMIT and quotaflow OK, got envoy OK={} \
                     quotaflow OK={}",
                s.line,
                Value::Object(s.fields.clone()),
                s.envoy_ok,
                s.quotaflow_ok
            )),
            Some(_) if on_time => {}
            _ if s.envoy_ok != s.quotaflow_ok => mismatches.push(format!(
                "request {} {}: envoy {} quotaflow {}",
                s.line,
                Value::Object(s.fields.clone()),
                if s.envoy_ok { "OK" } else { "OVER_LIMIT" },
                if s.quotaflow_ok { "OK" } else { "OVER_LIMIT" }
            )),
            _ => {}
        }
    }
    assert!(
        mismatches.is_empty(),
        "verdicts differ:\n{}",
        mismatches.join("\n")
    );
    // Not a vacuous agreement: both refused and admitted plenty, and the
    // sequence kept to its slots.
    let refused = sent.iter().filter(|s| !s.envoy_ok).count();
    let allowed = sent.len() - refused;
    assert!(
        refused >= 10 && allowed >= 50,
        "{refused} refused, {allowed} allowed"
    );
    let late = sent.iter().filter(|s| s.second != s.slot_second).count();
    assert!(
        late <= sent.len() / 10,
        "{late} of {} requests missed their second",
        sent.len()
    );
}

#[test]
fn a_partial_import_exits_2_reports_on_stderr_and_prints_a_valid_config() {
    let path = data("partial.yaml").display().to_string();
    let (code, toml, stderr) = import(&[&path]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("partial.yaml:5:5: not expressed: `partial: database=users` left out: descriptor key `database` has no quotaflow dimension"),
        "{stderr}"
    );
    assert!(stderr.contains("replaces `specific_limit`"), "{stderr}");
    assert!(
        stderr.contains("2 part(s) not expressed (exit status 2)"),
        "{stderr}"
    );
    assert!(toml.contains("# NOT EXPRESSED"), "{toml}");
    let (ok, out) = check_config(&toml, "toml");
    assert!(ok && out.contains("ok (2 limits)"), "{out}");
    // Mapping the generic key to a field expresses it (its values are no
    // paths, though: still reported, now for that reason).
    let (code, _, stderr) = import(&["--map", "database=path", &path]);
    assert_eq!(code, 2);
    assert!(stderr.contains("a path must start with `/`"), "{stderr}");
}

#[test]
fn an_invalid_file_exits_1_with_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "domain: d\ndescriptors:\n  - key: user_id\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 1\n",
    )
    .expect("write");
    let (code, out, stderr) = import(&[bad.to_str().expect("path")]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(
        stderr.contains("bad.yaml:5:13: invalid unit `fortnight`"),
        "{stderr}"
    );
    let (code, _, stderr) = import(&["--map", "x=tenant", bad.to_str().expect("path")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown dimension `tenant`"), "{stderr}");
    let (code, _, stderr) = import(&[dir.path().join("none.yaml").to_str().expect("path")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("none.yaml"), "{stderr}");
}

#[tokio::test]
async fn the_json_output_is_accepted_by_post_rate_limit_config() {
    // A directory is read like envoy's runtime directory.
    let (code, body, stderr) = import(&["--format", "json", DATA]);
    // partial.yaml is in the directory too.
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("3 domains (api, edge_proxy, partial)"),
        "{stderr}"
    );
    let server = Server::start(None, &[]);
    let resp = common::client()
        .post(server.url("/rate_limit/config"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST config");
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let running: Value = serde_json::from_str(
        &common::get_text(&common::client(), &server.url("/rate_limit/config")).await,
    )
    .expect("config json");
    let names: Vec<&str> = running["limits"]
        .as_array()
        .expect("limits")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert!(
        names.contains(&"edge_proxy.path__login.method_POST.remote_address"),
        "{names:?}"
    );
    assert!(names.contains(&"specific_limit"), "{names:?}");
}
