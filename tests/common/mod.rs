//! Runs the real `quotaflow` binary on a free loopback port and captures its
//! JSON log lines, so the integration tests exercise exactly what users run.

#![allow(dead_code)]

pub mod services;
pub mod stream;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub base: String,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Start `quotaflow serve` with `config` (TOML text; `None` = embedded
    /// default) and extra environment variables.
    pub fn start(config: Option<&str>, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotaflow"));
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0");
        if let Some(text) = config {
            let path: PathBuf = dir.path().join("quotaflow.toml");
            std::fs::write(&path, text).expect("write config");
            cmd.arg("--config").arg(path);
        }
        cmd.env_remove("RUST_LOG")
            .env_remove("QUOTAFLOW_ADMIN_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn quotaflow");
        let stdout = child.stdout.take().expect("stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["event"] == "listening" {
                        let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                    }
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("quotaflow did not log a `listening` event within 20 s");
        Server {
            child,
            base: format!("http://{addr}"),
            logs,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    /// Wait until a log line satisfies `pred`, or panic after `timeout`.
    pub fn wait_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            for line in self.logs() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if pred(&v) {
                        return v;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no matching log line; logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send SIGTERM and wait for the exit status (the logs stay readable).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "quotaflow did not exit within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // QF_DEBUG_LOG_DIR=DIR keeps every process's whole log, for
        // debugging a test (add `[log] level = "debug"` to its config).
        if let Ok(dir) = std::env::var("QF_DEBUG_LOG_DIR") {
            let path = format!("{dir}/{}.log", self.base.replace([':', '/'], "_"));
            let _ = std::fs::write(path, self.logs().join("\n"));
        }
        if std::thread::panicking() {
            // A failing test shows what the process said (its last lines).
            let logs = self.logs();
            let from = logs.len().saturating_sub(200);
            eprintln!(
                "--- quotaflow {} log (last {} lines) ---",
                self.base,
                logs.len() - from
            );
            for line in &logs[from..] {
                eprintln!("{line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// GET `url` and return the body as text.
pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    c.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body: {e}"))
}

pub fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Two limits that differ only in their failure mode: `/open` fails open
/// (the default), `/closed` fails closed.
pub const OPEN_AND_CLOSED: &str = r#"
[[limits]]
name = "open"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1000000
window = "1h"
match = { path = "/open" }

[[limits]]
name = "closed"
algorithm = "fixed_window"
key = ["user_id"]
limit = 1000000
window = "1h"
failure_mode = "closed"
match = { path = "/closed" }
"#;

/// The server's `/metrics` text (empty if it cannot be read).
pub fn scrape(server: &Server) -> String {
    std::process::Command::new("curl")
        .args(["-s", &server.url("/metrics")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The sum of every sample of `name` (all its label sets), 0 if none.
pub fn metric(server: &Server, name: &str) -> f64 {
    scrape(server)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Poll `cond` every 100 ms until it holds, or panic naming `what`.
pub fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
