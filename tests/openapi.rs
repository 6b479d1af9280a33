//! The OpenAPI document (`GET /openapi.json`) is true: Schemathesis drives
//! the running server from it — every operation, generated valid inputs,
//! undeclared methods — and checks each answer's status, content type,
//! headers and body against the document, and that nothing answers 5xx.
//! Bounded: 25 examples an operation, a fixed seed, 5 s a request.
//! `scripts/services.sh up` installs Schemathesis and exports SCHEMATHESIS.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;

fn schemathesis() -> String {
    std::env::var("SCHEMATHESIS").unwrap_or_else(|_| {
        panic!(
            "SCHEMATHESIS is unset: run `eval \"$(scripts/services.sh up)\"` (which installs \
             Schemathesis into its cache and exports the path), or `scripts/test.sh`"
        )
    })
}

#[test]
fn the_server_answers_as_its_openapi_document_says() {
    let s = Server::start(None, &[]);
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let mut child = Command::new(schemathesis())
        .args(["--config-file", config, "run"])
        .arg(s.url("/openapi.json"))
        .args([
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--request-timeout",
            "5",
        ])
        .args(["--no-color"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run schemathesis");
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("schemathesis did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // It really exercised the API.
    let generated = text
        .lines()
        .find_map(|l| l.trim().split_once(" generated, "))
        .and_then(|(n, _)| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(generated >= 200, "only {generated} test cases:\n{text}");
}

#[test]
fn every_route_is_in_the_document() {
    let doc: serde_json::Value =
        serde_json::from_str(quotaflow::api::OPENAPI).expect("the document is JSON");
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    // The router's routes (src/api/mod.rs), with axum's `{*rest}` as `{path}`.
    for route in [
        "/check",
        "/forward-auth",
        "/forward-auth/{path}",
        "/rate_limit/config",
        "/metrics",
        "/healthz",
        "/readyz",
        "/events",
        "/stream/decisions",
        "/stream/alerts",
        "/stream/dead-letters",
        "/openapi.json",
        "/ui",
        "/ui/state.json",
        "/ui/{asset}",
    ] {
        assert!(paths.contains(&route), "{route} is not documented");
    }
    assert_eq!(paths.len(), 15, "a documented path has no route: {paths:?}");
}
