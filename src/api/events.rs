//! The embedded bus over HTTP: `POST /events` feeds request events in, and
//! `GET /stream/{decisions,alerts,dead-letters}` shows what came out.

use std::collections::VecDeque;

use axum::body::Bytes;
use axum::extract::{Query, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{problem, AppState};
use quotaflow_adapters::clock::now_ms;
use quotaflow_adapters::embedded::Embedded;
use quotaflow_core::pipeline::records::RequestEvent;

/// A request event as posted: `event_id` and `timestamp_ms` may be left out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    event_id: Option<String>,
    timestamp_ms: Option<i64>,
    user_id: Option<String>,
    api_key: Option<String>,
    client_ip: Option<String>,
    method: Option<String>,
    path: Option<String>,
    cost: Option<i64>,
    gateway_id: Option<String>,
}

impl EventIn {
    fn into_event(self) -> RequestEvent {
        RequestEvent {
            event_id: self
                .event_id
                .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>())),
            timestamp_ms: self.timestamp_ms.unwrap_or_else(|| now_ms() as i64),
            user_id: self.user_id,
            api_key: self.api_key,
            client_ip: self.client_ip,
            method: self.method,
            path: self.path,
            cost: self.cost.unwrap_or(1),
            gateway_id: self.gateway_id,
        }
    }
}

/// Events one `POST /events` may carry.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;
/// Largest `POST /events` body.
const MAX_EVENTS_BYTES: usize = 2 * 1024 * 1024;

/// `POST /events`: one event object or an array of them. Feeding the
/// pipeline is a write: the same rule as config writes applies (the admin
/// token, or this machine). Parsing, encoding and the bus (which blocks
/// while a partition's queue is full) run off the async threads, so a few
/// large bodies cannot stall `/check`.
pub(super) async fn publish(State(app): State<AppState>, req: HttpRequest) -> Response {
    if let Err(refused) = super::admin::writer(&app, &req, "event writes") {
        return *refused;
    }
    let body = match axum::body::to_bytes(req.into_body(), MAX_EVENTS_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            app.metrics.invalid_request("events");
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "about:blank",
                "Payload Too Large",
                format!("event body unreadable or over {MAX_EVENTS_BYTES} bytes: {e}"),
                json!({}),
            );
        }
    };
    let worker = app.clone();
    tokio::task::spawn_blocking(move || publish_blocking(&worker, &body))
        .await
        .unwrap_or_else(|e| {
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "about:blank",
                "Internal Server Error",
                format!("publishing failed: {e}"),
                json!({}),
            )
        })
}

fn publish_blocking(app: &AppState, body: &Bytes) -> Response {
    let Some(embedded) = &app.embedded else {
        return problem(
            StatusCode::CONFLICT,
            "about:blank",
            "Not in embedded mode",
            "this instance consumes from Kafka: publish request events to the requests topic",
            json!({}),
        );
    };
    let parsed: Result<Vec<EventIn>, _> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) if items.len() > MAX_EVENTS_PER_REQUEST => {
            app.metrics.invalid_request("events");
            return problem(
                StatusCode::BAD_REQUEST,
                "about:blank",
                "Bad Request",
                format!(
                    "at most {MAX_EVENTS_PER_REQUEST} events per request, got {}",
                    items.len()
                ),
                json!({}),
            );
        }
        Ok(Value::Array(items)) => items.into_iter().map(serde_json::from_value).collect(),
        Ok(one) => serde_json::from_value(one).map(|e| vec![e]),
        Err(e) => Err(e),
    };
    let events = match parsed {
        Ok(v) => v,
        Err(e) => {
            app.metrics.invalid_request("events");
            return problem(
                StatusCode::BAD_REQUEST,
                "about:blank",
                "Bad Request",
                format!("invalid event: {e}"),
                json!({}),
            );
        }
    };
    let mut offsets = Vec::with_capacity(events.len());
    for e in events {
        match embedded.bus.publish(&e.into_event()) {
            Ok((partition, offset)) => {
                offsets.push(json!({"partition": partition, "offset": offset}))
            }
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "about:blank",
                    "Bad Request",
                    format!("cannot encode event: {e}"),
                    json!({}),
                )
            }
        }
    }
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"accepted": offsets.len(), "offsets": offsets}).to_string(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct Recent {
    limit: Option<usize>,
}

fn recent<T: Serialize + Clone>(
    app: &AppState,
    q: &Recent,
    pick: impl Fn(&Embedded) -> &Mutex<VecDeque<T>>,
) -> Response {
    let Some(embedded) = &app.embedded else {
        return problem(
            StatusCode::CONFLICT,
            "about:blank",
            "Not in embedded mode",
            "this instance publishes to Kafka topics: consume them there",
            json!({}),
        );
    };
    let items: Vec<T> = {
        let q2 = pick(embedded).lock();
        let n = q.limit.unwrap_or(100).min(q2.len());
        q2.iter().skip(q2.len() - n).cloned().collect()
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&items).unwrap_or_default(),
    )
        .into_response()
}

pub(super) async fn decisions(State(app): State<AppState>, Query(q): Query<Recent>) -> Response {
    recent(&app, &q, |e| &e.sink.decisions)
}

pub(super) async fn alerts(State(app): State<AppState>, Query(q): Query<Recent>) -> Response {
    recent(&app, &q, |e| &e.sink.alerts)
}

pub(super) async fn dead_letters(State(app): State<AppState>, Query(q): Query<Recent>) -> Response {
    recent(&app, &q, |e| &e.sink.dead_letters)
}
