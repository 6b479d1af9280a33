//! The production rules file on a real Prometheus scraping the real
//! binary: a limit held over by `/check` load fires
//! `QuotaflowLimitRefusingMost` for that limit only, and every rule
//! evaluates without error on the series quotaflow really exports.
//! Needs the `prometheus` server (Debian's prometheus package, which
//! `scripts/services.sh up` installs).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, Server};
use serde_json::Value;

const CONFIG: &str = r#"
[log]
format = "json"

# Held over by the test: 5 at once, 1 a second after.
[[limits]]
name = "tight"
algorithm = "token_bucket"
key = ["user_id"]
capacity = 5
refill_per_sec = 1

# Sees the same checks and refuses none.
[[limits]]
name = "roomy"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1000000
window = "1h"
"#;

/// The alert the load must fire, and what may be active beside it: the
/// all-checks share is as high, but pends for 15 minutes.
const ALERT: &str = "QuotaflowLimitRefusingMost";
const MAY_BE_ACTIVE: [&str; 2] = [ALERT, "QuotaflowHighRefusalRate"];
/// Its `for` is 30 s; the rest is start-up, scrapes and evaluations.
const FIRING_WITHIN: Duration = Duration::from_secs(50);

/// A Prometheus server of this test's own: its config, data and log in a
/// temporary directory, on a free loopback port. Killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Prometheus {
    /// Scrape `target` (host:port) every second and evaluate `rules` every
    /// second.
    async fn start(c: &reqwest::Client, target: &str, rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: quotaflow\n    static_configs:\n      - targets: [\"{target}\"]\n",
            ),
        )
        .expect("write prometheus.yml");
        let log_path = dir.path().join("prometheus.log");
        // A port found free may be taken before Prometheus binds it: retry.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let log = std::fs::File::create(&log_path).expect("log file");
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run prometheus ({e}); install it with `scripts/services.sh up` \
                         (Debian's prometheus package), or run `scripts/test.sh`"
                    )
                });
            let mut p = Prometheus {
                child,
                base: format!("http://127.0.0.1:{port}"),
                log: log_path.clone(),
                _dir: None,
            };
            if p.wait_ready(c).await {
                p._dir = Some(dir);
                return p;
            }
            eprintln!("prometheus did not start on port {port}:\n{}", p.log());
        }
        panic!("prometheus did not start on any of 3 free ports (logs above)");
    }

    /// True once `/-/ready` answers 200; false if the process exits or
    /// 20 s pass.
    async fn wait_ready(&mut self, c: &reqwest::Client) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("{}/-/ready", self.base);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(r) = c.get(&url).send().await {
                if r.status() == 200 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn api(&self, c: &reqwest::Client, path: &str, query: &[(&str, &str)]) -> Value {
        let url = format!("{}/api/v1/{path}", self.base);
        let v: Value = c
            .get(&url)
            .query(query)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: body: {e}"));
        assert_eq!(v["status"], "success", "GET {url}: {v}");
        v["data"].clone()
    }

    /// Active alerts (pending or firing).
    async fn alerts(&self, c: &reqwest::Client) -> Vec<Value> {
        self.api(c, "alerts", &[]).await["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// What a failure should show: targets, rule health, the recorded
    /// shares, alerts and the server's log.
    async fn report(&self, c: &reqwest::Client) -> String {
        let targets = self.api(c, "targets", &[]).await;
        let health: Vec<String> = self.api(c, "rules", &[]).await["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        let mut shares = String::new();
        for q in [
            "job_limit:quotaflow_limit_refused:ratio_rate5m",
            "job_limit:quotaflow_limit_decisions:rate5m",
        ] {
            shares += &format!("{q} = {}\n", self.api(c, "query", &[("query", q)]).await);
        }
        format!(
            "targets: {}\nrules:\n{}\n{shares}alerts: {:?}\nprometheus log:\n{}",
            targets["activeTargets"],
            health.join("\n"),
            self.alerts(c).await,
            self.log()
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_addr(base: &str) -> &str {
    base.trim_start_matches("http://")
}

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/quotaflow-rules.yml")
}

fn label<'a>(alert: &'a Value, name: &str) -> &'a str {
    alert["labels"][name].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_limit_held_over_fires_its_alert_on_a_real_prometheus() {
    let started = Instant::now();
    let qf = Server::start(Some(CONFIG), &[]);
    let c = client();
    let prom = Prometheus::start(&c, url_addr(&qf.base), &rules_file()).await;

    // One client far over `tight`: about 100 checks a second, nearly all
    // refused by it; `roomy` allows every one.
    let load = {
        let c = c.clone();
        let url = qf.url("/check");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let r = c
                    .post(&url)
                    .json(&serde_json::json!({"user_id": "hammer"}))
                    .send()
                    .await
                    .expect("POST /check");
                assert!(matches!(r.status().as_u16(), 200 | 429), "{}", r.status());
            }
        })
    };

    let deadline = Instant::now() + FIRING_WITHIN;
    let firing = loop {
        let alerts = prom.alerts(&c).await;
        if let Some(a) = alerts
            .iter()
            .find(|a| label(a, "alertname") == ALERT && a["state"] == "firing")
        {
            break a.clone();
        }
        if Instant::now() >= deadline || load.is_finished() {
            load.abort();
            panic!(
                "{ALERT} did not fire within {FIRING_WITHIN:?} of load on limit `tight`\n{}",
                prom.report(&c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "{ALERT} firing {:.1} s after the test started",
        started.elapsed().as_secs_f64()
    );
    load.abort();

    assert_eq!(label(&firing, "limit"), "tight", "{firing}");
    assert_eq!(label(&firing, "job"), "quotaflow", "{firing}");
    assert_eq!(label(&firing, "severity"), "warning", "{firing}");
    let summary = firing["annotations"]["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(
        summary.starts_with("quotaflow limit tight refuses "),
        "{summary}"
    );
    assert_eq!(
        firing["annotations"]["runbook"],
        "docs/operations.md#quotaflowlimitrefusingmost"
    );

    // Nothing else: not the limit that refused none, no alert on the
    // quotaflow series that a healthy instance exports.
    let alerts = prom.alerts(&c).await;
    let unexpected: Vec<&Value> = alerts
        .iter()
        .filter(|a| !MAY_BE_ACTIVE.contains(&label(a, "alertname")) || label(a, "limit") == "roomy")
        .collect();
    assert!(unexpected.is_empty(), "unexpected alerts: {unexpected:?}");

    // Every rule evaluated on the real series without an error (vector
    // matching, types) — what promtool's synthetic series cannot show.
    let groups = prom.api(&c, "rules", &[]).await;
    let mut rules = 0;
    for group in groups["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            rules += 1;
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    }
    assert!(rules >= 24, "only {rules} rules loaded: {groups}");
}
