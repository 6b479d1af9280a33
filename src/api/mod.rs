//! The HTTP sidecar (axum): synchronous checks, forward-auth for reverse
//! proxies, the rate-limit config API, metrics and health.

mod admin;
pub(crate) mod check;
pub mod client_ip;
pub mod decide;
mod events;
pub mod headers;
pub mod tokens;
mod ui;

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ipnet::IpNet;
use serde_json::json;

use quotaflow_adapters::coordinator::Coordinator;
use quotaflow_adapters::embedded::Embedded;
use quotaflow_adapters::kafka::config::ConfigLog;
use quotaflow_adapters::metrics::Metrics;
use quotaflow_adapters::redis_state::config::SharedConfig;
use quotaflow_adapters::redis_state::RedisState;
use quotaflow_core::limiter::Limiter;
use quotaflow_core::rules::FailureMode;

/// Where the forward-auth endpoint finds identity, and whom it trusts.
#[derive(Debug, Clone)]
pub struct Identity {
    pub api_key_header: String,
    pub user_id_header: String,
    pub uri_header: String,
    pub method_header: String,
    pub cost_header: String,
    pub trusted_proxies: Vec<IpNet>,
    pub deny_status: StatusCode,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub limiter: Arc<Limiter>,
    pub metrics: Arc<Metrics>,
    /// Admin tokens, one of which config writes and `/events` need when
    /// any is configured (see `tokens`).
    pub admin_tokens: Arc<tokens::AdminTokens>,
    pub identity: Arc<Identity>,
    /// The in-process bus and its outputs (embedded mode only).
    pub embedded: Option<Arc<Embedded>>,
    /// The stream processor's partition ownership (either mode), for the
    /// live page.
    pub coordinator: Option<Arc<Coordinator>>,
    /// Whether the stream processor is up (the embedded bus, or the Kafka
    /// consumer polling its group).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The group's shared state and config (`[state] backend = "redis"`).
    pub redis_mode: Option<Arc<RedisMode>>,
    /// The group's config log (Kafka mode): where config writes go, and
    /// from which every instance runs the group's versions.
    pub config_log: Option<Arc<ConfigLog>>,
    /// Kafka mode: checks counted on each limit key's partition owner.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The live page's latest snapshot, served again for a second.
    pub ui_snapshot: Arc<ui::SnapshotCache>,
}

/// The Redis state mode's parts, as the handlers use them.
pub struct RedisMode {
    pub state: RedisState,
    /// The config shared in Redis; `None` in Kafka mode, where the config
    /// topic is the group's config store.
    pub config: Option<Arc<SharedConfig>>,
    /// For limits without their own `failure_mode`.
    pub failure_mode: FailureMode,
}

/// Every route of the sidecar.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/check", post(check::check))
        .route("/forward-auth", forward_auth_methods())
        .route("/forward-auth/{*rest}", forward_auth_methods())
        .route(
            "/rate_limit/config",
            get(admin::get_config).post(admin::post_config),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/events", post(events::publish))
        .route("/stream/decisions", get(events::decisions))
        .route("/stream/alerts", get(events::alerts))
        .route("/stream/dead-letters", get(events::dead_letters))
        .route("/openapi.json", get(openapi))
        .route("/ui", get(ui::page))
        .route("/ui/state.json", get(ui::state))
        .route("/ui/{asset}", get(ui::asset))
        .fallback(|| async {
            problem(
                StatusCode::NOT_FOUND,
                "about:blank",
                "Not Found",
                "no such endpoint",
                json!({}),
            )
        })
        .layer(axum::middleware::map_response(errors_as_problems))
        .with_state(state)
}

/// Forward-auth answers whatever method the proxy forwards, among the
/// standard ones (an unknown one, such as `QUERY`, gets `405`).
fn forward_auth_methods() -> axum::routing::MethodRouter<AppState> {
    use axum::routing::MethodFilter;
    let standard = [
        MethodFilter::GET,
        MethodFilter::POST,
        MethodFilter::PUT,
        MethodFilter::DELETE,
        MethodFilter::PATCH,
        MethodFilter::HEAD,
        MethodFilter::OPTIONS,
        MethodFilter::TRACE,
    ];
    standard
        .into_iter()
        .fold(axum::routing::MethodRouter::new(), |r, m| {
            r.on(m, check::forward_auth)
        })
}

/// The OpenAPI document of every endpoint (`tests/openapi.rs` drives the
/// running server from it, so it stays true).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Errors axum answers by itself (a wrong method, a body over the limit)
/// come as plain text; every error of this API is problem+json.
async fn errors_as_problems(response: Response) -> Response {
    let status = response.status();
    let plain = !response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    let title = match status {
        StatusCode::BAD_REQUEST => "Bad Request",
        StatusCode::METHOD_NOT_ALLOWED => "Method Not Allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "Payload Too Large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "Unsupported Media Type",
        _ => return response,
    };
    if !plain {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut problem = problem(
        status,
        "about:blank",
        title,
        title.to_lowercase(),
        json!({}),
    );
    if let Some(allow) = allow {
        problem.headers_mut().insert(header::ALLOW, allow);
    }
    problem
}

/// Why the instance is not ready, or `None` when it is.
pub(crate) fn not_ready(app: &AppState) -> Option<&'static str> {
    if app
        .redis_mode
        .as_ref()
        .is_some_and(|s| !s.state.is_available())
    {
        Some("state backend (Redis) not answering\n")
    } else if app.ready.load(std::sync::atomic::Ordering::SeqCst) {
        None
    } else {
        Some("starting\n")
    }
}

async fn readyz(axum::extract::State(app): axum::extract::State<AppState>) -> Response {
    match not_ready(&app) {
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
        None => (StatusCode::OK, "ready\n").into_response(),
    }
}

async fn metrics(axum::extract::State(app): axum::extract::State<AppState>) -> Response {
    app.metrics
        .keys_tracked
        .set(app.limiter.store().len() as i64);
    app.metrics.ready.set(i64::from(not_ready(&app).is_none()));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics
            .render(app.metrics.episode_now(quotaflow_adapters::clock::now_ms())),
    )
        .into_response()
}

/// An `application/problem+json` response (RFC 9457).
pub(crate) fn problem(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: impl Into<String>,
    extra: serde_json::Value,
) -> Response {
    let mut body = json!({
        "type": kind,
        "title": title,
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}
