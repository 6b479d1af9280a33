//! `GET /ui`: a live page of what this instance does, and the JSON it polls
//! (`/ui/state.json`). The page, its script and its style are compiled into
//! the binary; the Content-Security-Policy allows nothing but them and the
//! JSON, so no inline script or style runs.
//!
//! Who may read: anyone who may read `GET /rate_limit/config` and
//! `/metrics` (no token). So the state shows nothing they do not already
//! show, except fingerprints: the config without its whitelist, counters,
//! and keys only as keyed hashes (never a user id, address or API key).

use axum::extract::{Path, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{problem, AppState};
use quotaflow_adapters::clock::now_ms;
use quotaflow_core::fingerprint::Fingerprinter;

const PAGE: &str = include_str!("ui/index.html");

/// The page's script, style and icon, by name.
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("ui/app.css"),
    ),
    ("icon.svg", "image/svg+xml", include_str!("ui/icon.svg")),
];

/// Only this server's own script, style and JSON; no framing, no forms.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Rows of each list in the state: a page, not an export.
const ROWS: usize = 10;

fn headers(content_type: &'static str, cache: &'static str) -> [(HeaderName, HeaderValue); 6] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
    ]
}

pub(super) async fn page() -> Response {
    (headers("text/html; charset=utf-8", "no-cache"), PAGE).into_response()
}

/// `GET /ui/{asset}`: the page's script, style or icon.
pub(super) async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (headers(content_type, "no-cache"), *body).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "about:blank",
            "Not Found",
            "no such asset of the live page",
            json!({}),
        ),
    }
}

/// How long one snapshot is served: the page polls every second, and a
/// snapshot scans every open breach episode under the locks refused checks
/// take, so callers looping on the endpoint must not multiply that work.
const SNAPSHOT_TTL: std::time::Duration = std::time::Duration::from_millis(900);

/// The latest `/ui/state.json` body and when it was taken.
#[derive(Default)]
pub struct SnapshotCache(parking_lot::Mutex<Option<(std::time::Instant, axum::body::Bytes)>>);

/// `GET /ui/state.json`: one snapshot; the page derives rates from two.
pub(super) async fn state(State(app): State<AppState>) -> Response {
    let fresh = |c: &Option<(std::time::Instant, axum::body::Bytes)>| {
        c.as_ref()
            .filter(|(at, _)| at.elapsed() < SNAPSHOT_TTL)
            .map(|(_, body)| body.clone())
    };
    let cached = fresh(&app.ui_snapshot.0.lock());
    let body = match cached {
        Some(body) => body,
        None => {
            // Off the async workers: the scan takes shard locks in turn.
            let taken = app.clone();
            let body = tokio::task::spawn_blocking(move || {
                axum::body::Bytes::from(snapshot(&taken, now_ms()).to_string())
            })
            .await
            .unwrap_or_else(|_| axum::body::Bytes::from_static(b"{}"));
            *app.ui_snapshot.0.lock() = Some((std::time::Instant::now(), body.clone()));
            body
        }
    };
    (headers("application/json", "no-store"), body).into_response()
}

fn snapshot(app: &AppState, now: u64) -> Value {
    let rules = app.limiter.rules();
    let fp = app.limiter.fingerprinter();
    let mut config = serde_json::to_value(rules.doc()).unwrap_or_else(|_| json!({}));
    if let Some(obj) = config.as_object_mut() {
        // Who skips every limit is for config writers only (admin.rs).
        obj.remove("whitelist");
        obj.insert("version".into(), rules.version.into());
    }
    let counts = app.metrics.limit_counts();
    let limits: Vec<Value> = rules
        .limits
        .iter()
        .map(|l| {
            let c = counts.get(&l.name).copied().unwrap_or_default();
            json!({
                "name": l.name,
                "allowed": c.allowed,
                "refused": c.refused,
                "shadow_refused": c.shadow_refused,
            })
        })
        .collect();
    // Episodes are dated by the state's clock (Redis's in the Redis mode).
    let episode_now = app.metrics.episode_now(now);
    let top: Vec<Value> = app
        .metrics
        .top_refused(episode_now, ROWS)
        .into_iter()
        .map(|b| {
            json!({
                "limit": &*b.limit,
                "key_fp": b.key.to_string(),
                "shadow": b.shadow,
                "refused": b.refused,
                "age_ms": episode_now.saturating_sub(b.started_ms),
            })
        })
        .collect();
    let breaches: Vec<Value> = app
        .metrics
        .recent_breaches()
        .into_iter()
        .take(ROWS)
        .map(|e| {
            json!({
                "at_ms": e.at_ms,
                "kind": if e.started { "started" } else { "ended" },
                "limit": &*e.limit,
                "key_fp": e.key.to_string(),
                "shadow": e.shadow,
                "refused": e.refused,
            })
        })
        .collect();
    json!({
        "now_ms": now,
        "ready": super::not_ready(app).is_none(),
        "state_backend": if app.redis_mode.is_some() { "redis" } else { "memory" },
        "config": config,
        "limits": limits,
        "top_refused": top,
        "breaches": breaches,
        "stream": stream(app, fp),
    })
}

/// Partition ownership and lag, and the latest BLOCK/UNBLOCK decisions and
/// alerts this instance published, with their keys fingerprinted (the
/// outputs name user ids and addresses in clear).
fn stream(app: &AppState, fp: &Fingerprinter) -> Value {
    let Some(coordinator) = &app.coordinator else {
        return json!({"mode": "none", "partitions": [], "decisions": null, "alerts": null});
    };
    let ends: std::collections::BTreeMap<i32, i64> = match &app.embedded {
        Some(e) => e.bus.end_offsets().into_iter().collect(),
        None => Default::default(),
    };
    let lags = app.metrics.stream.lags();
    let partitions: Vec<Value> = coordinator
        .positions()
        .into_iter()
        .map(|(p, next)| {
            let lag = match ends.get(&p) {
                Some(end) => Some((end - next).max(0)),
                None => lags.get(&p).copied(),
            };
            json!({
                "partition": p,
                "epoch": coordinator.owner_epoch(p),
                "next_offset": next,
                "lag": lag,
            })
        })
        .collect();
    let recent = &app.metrics.stream.recent;
    let decisions: Vec<Value> = recent
        .decisions()
        .iter()
        .take(ROWS)
        .map(|d| {
            json!({
                "at_ms": d.event_time_ms,
                "action": d.action,
                "limit": d.limit,
                "key_fp": fp.hex(d.key.as_bytes()),
                "until_ms": d.until_ms,
                "partition": d.source_partition,
            })
        })
        .collect();
    let alerts: Vec<Value> = recent
        .alerts()
        .iter()
        .take(ROWS)
        .map(|a| {
            json!({
                "at_ms": a.window_end_ms,
                "severity": a.severity,
                "limit": a.limit,
                "key_fp": fp.hex(a.key.as_bytes()),
                "shadow": a.shadow,
                "refused": a.refused,
            })
        })
        .collect();
    let mode = if app.embedded.is_some() {
        "embedded"
    } else {
        "kafka"
    };
    json!({"mode": mode, "partitions": partitions, "decisions": decisions, "alerts": alerts})
}
