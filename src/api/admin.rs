//! `GET/POST /rate_limit/config`: the running rate-limit document.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::{problem, AppState};
use quotaflow_adapters::metrics::ConfigUpdate;
use quotaflow_core::limiter::ReplaceError;
use quotaflow_core::rules::{FieldError, RulesDoc};

/// Problem type for a refused config, with per-field `errors`.
const INVALID_CONFIG: &str = "urn:quotaflow:problem:invalid-config";

pub(super) async fn get_config(State(app): State<AppState>) -> Response {
    let rules = app.limiter.rules();
    let mut body = serde_json::to_value(rules.doc()).unwrap_or_else(|_| json!({}));
    if let Some(obj) = body.as_object_mut() {
        obj.insert("version".into(), rules.version.into());
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Replace the document. A body may carry the `version` it was edited from
/// (as `GET` returns it): then the write applies only if that version is
/// still running, else `409`.
pub(super) async fn post_config(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(token) = &app.admin_token {
        if !bearer_matches(&headers, token) {
            app.metrics.config_update(ConfigUpdate::Unauthorized);
            tracing::warn!(
                event = "config_update_unauthorized",
                "config write without a valid bearer token"
            );
            let mut r = problem(
                StatusCode::UNAUTHORIZED,
                "about:blank",
                "Unauthorized",
                "config writes need `Authorization: Bearer <token>`",
                json!({}),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    let (expected, doc) = match parse(&body) {
        Ok(v) => v,
        Err(errors) => return refused(&app, errors),
    };
    match app.limiter.replace_rules_if(expected, doc) {
        Ok(version) => {
            app.metrics.config_update(ConfigUpdate::Applied);
            app.metrics.config_version.set(version as i64);
            tracing::info!(
                event = "config_applied",
                version,
                "rate-limit config replaced"
            );
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json!({ "version": version }).to_string(),
            )
                .into_response()
        }
        Err(ReplaceError::Invalid(e)) => refused(&app, e.0),
        Err(e @ ReplaceError::Conflict { current, .. }) => {
            app.metrics.config_update(ConfigUpdate::Rejected);
            problem(
                StatusCode::CONFLICT,
                "about:blank",
                "Conflict",
                e.to_string(),
                json!({ "current_version": current }),
            )
        }
    }
}

fn parse(body: &[u8]) -> Result<(Option<u64>, RulesDoc), Vec<FieldError>> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| vec![FieldError::new("", format!("body is not JSON: {e}"))])?;
    let expected =
        match value.as_object_mut().and_then(|o| o.remove("version")) {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                vec![FieldError::new("version", "must be a non-negative integer")]
            })?),
        };
    let doc = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        vec![FieldError::new(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )]
    })?;
    Ok((expected, doc))
}

fn refused(app: &AppState, errors: Vec<FieldError>) -> Response {
    app.metrics.config_update(ConfigUpdate::Rejected);
    let detail = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    tracing::warn!(event = "config_rejected", errors = %detail, "invalid rate-limit config refused; the running config stays");
    problem(
        StatusCode::BAD_REQUEST,
        INVALID_CONFIG,
        "Invalid rate-limit config",
        format!("the config was refused and the running one stays: {detail}"),
        json!({ "errors": errors }),
    )
}

/// Constant-time comparison of the bearer token, so response timing does not
/// reveal how much of a guess was right.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())))
}
