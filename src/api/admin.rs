//! `GET/POST /rate_limit/config`: the running rate-limit document.
//!
//! Who may write (and read the whitelist): with an admin token configured,
//! whoever presents it; with none, only a client on this machine, and only
//! through a loopback `Host` (a web page cannot rebind its own name to
//! 127.0.0.1 and post from the victim's browser). Writes must say they are
//! JSON, which a cross-site form or `text/plain` fetch cannot do without a
//! preflight that this server never grants.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{client_ip, problem, AppState};
use quotaflow_adapters::kafka::config::ProposeError;
use quotaflow_adapters::metrics::ConfigUpdate;
use quotaflow_adapters::redis_state::config::PublishError;
use quotaflow_core::config_log::summarize;
use quotaflow_core::limiter::ReplaceError;
use quotaflow_core::rules::{FieldError, RulesDoc};

/// Problem type for a refused config, with per-field `errors`.
const INVALID_CONFIG: &str = "urn:quotaflow:problem:invalid-config";

/// Largest config document accepted.
const MAX_CONFIG_BYTES: usize = 2 * 1024 * 1024;

/// Who is asking, as far as the config API cares.
struct Caller {
    peer: Option<IpAddr>,
    /// The client behind trusted proxies (`X-Forwarded-For`), else the peer:
    /// a proxy on this machine must not make its remote clients local.
    client: Option<IpAddr>,
    /// The id of the admin token presented, when it is a valid one.
    token: Option<String>,
    loopback_host: bool,
}

impl Caller {
    fn of(app: &AppState, req: &HttpRequest) -> Self {
        let headers = req.headers();
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_canonical());
        Self {
            peer,
            client: client_ip::resolve(peer, headers, &app.identity.trusted_proxies),
            token: bearer(headers).and_then(|t| app.admin_tokens.check(t)),
            loopback_host: headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .is_some_and(is_loopback_host),
        }
    }

    /// May change the config (and so see all of it).
    fn may_write(&self, app: &AppState) -> Result<(), Refusal> {
        if self.token.is_some() {
            return Ok(());
        }
        if app.admin_tokens.any() {
            return Err(Refusal::Token);
        }
        if !self.client.is_some_and(|c| c.is_loopback()) {
            return Err(Refusal::NotLocal);
        }
        if !self.loopback_host {
            return Err(Refusal::Host);
        }
        Ok(())
    }
}

enum Refusal {
    Token,
    NotLocal,
    Host,
}

/// `localhost`, `*.localhost`, a loopback address, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

pub(super) async fn get_config(State(app): State<AppState>, req: HttpRequest) -> Response {
    let caller = Caller::of(&app, &req);
    let rules = app.limiter.rules();
    let mut body = serde_json::to_value(rules.doc()).unwrap_or_else(|_| json!({}));
    if let Some(obj) = body.as_object_mut() {
        obj.insert("version".into(), rules.version.into());
        // Kafka mode: the event time from which this version applies (its
        // record's timestamp in the config topic, the same on every
        // instance).
        if let Some(from) = app
            .config_log
            .as_ref()
            .and_then(|log| log.applies_from_ms(rules.version))
        {
            obj.insert("applies_from_ms".into(), from.into());
        }
        // The whitelist says which identities skip every limit: only for
        // those who may change it.
        if caller.may_write(&app).is_err() {
            obj.remove("whitelist");
            obj.insert("whitelist_redacted".into(), true.into());
        }
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
/// Who wrote, for the log: the peer, and how it was allowed.
pub(super) struct Writer {
    pub peer: String,
    /// `token:<id>` (the admin token's name, never its value) or `loopback`.
    pub by: String,
}

/// The caller, when it may write (change the config, feed events); else
/// the refusal to answer with, logged as `write_unauthorized`.
pub(super) fn writer(
    app: &AppState,
    req: &HttpRequest,
    what: &str,
) -> Result<Writer, Box<Response>> {
    let caller = Caller::of(app, req);
    let peer = caller.peer.map(|p| p.to_string()).unwrap_or_default();
    let Err(refusal) = caller.may_write(app) else {
        let by = caller
            .token
            .map_or_else(|| "loopback".to_owned(), |id| format!("token:{id}"));
        return Ok(Writer { peer, by });
    };
    let (status, detail) = match refusal {
        Refusal::Token => (
            StatusCode::UNAUTHORIZED,
            format!("{what} need `Authorization: Bearer <token>`"),
        ),
        Refusal::NotLocal => (
            StatusCode::FORBIDDEN,
            format!(
                "no admin token is configured (QUOTAFLOW_ADMIN_TOKEN), so {what} are accepted \
                 only from this machine"
            ),
        ),
        Refusal::Host => (
            StatusCode::FORBIDDEN,
            format!(
                "no admin token is configured, so {what} must name this machine (Host: \
                 localhost or a loopback address)"
            ),
        ),
    };
    tracing::warn!(event = "write_unauthorized", what, peer = %peer, reason = %detail, "write refused");
    let mut r = problem(status, "about:blank", "Not allowed", detail, json!({}));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    Err(Box::new(r))
}

pub(super) async fn post_config(State(app): State<AppState>, req: HttpRequest) -> Response {
    let who = match writer(&app, &req, "config writes") {
        Ok(who) => who,
        Err(refused) => {
            app.metrics.config_update(ConfigUpdate::Unauthorized);
            return *refused;
        }
    };
    if !is_json(req.headers()) {
        app.metrics.config_update(ConfigUpdate::Rejected);
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "about:blank",
            "Unsupported Media Type",
            "a config write must be sent as `Content-Type: application/json`",
            json!({}),
        );
    }
    let body: Bytes = match axum::body::to_bytes(req.into_body(), MAX_CONFIG_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return refused(
                &app,
                vec![FieldError::new("", format!("body unreadable: {e}"))],
            )
        }
    };
    let (expected, doc) = match parse(&body) {
        Ok(v) => v,
        Err(errors) => return refused(&app, errors),
    };
    let old = app.limiter.rules();
    let unavailable = |e: &dyn std::fmt::Display| {
        app.metrics.config_update(ConfigUpdate::Rejected);
        tracing::warn!(event = "config_not_stored", error = %e, by = %who.by, "config write failed");
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "about:blank",
            "Service Unavailable",
            e.to_string(),
            json!({}),
        )
    };
    let unfinished = |e: tokio::task::JoinError| {
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "about:blank",
            "Internal Server Error",
            format!("config write did not finish: {e}"),
            json!({}),
        )
    };
    // Kafka mode: the log rules on the write, and every instance (this one
    // too) logs the change as it runs it.
    let logged_by_the_group = app.config_log.is_some();
    let shared = app.redis_mode.as_ref().and_then(|m| m.config.clone());
    let result = if let Some(log) = app.config_log.clone() {
        let by = who.by.clone();
        match tokio::task::spawn_blocking(move || log.propose(expected, doc, &by)).await {
            Ok(Ok(version)) => Ok(version),
            Ok(Err(ProposeError::Refused(e))) => Err(e),
            Ok(Err(e)) => return unavailable(&e),
            Err(e) => return unfinished(e),
        }
    } else if let Some(config) = shared {
        match tokio::task::spawn_blocking(move || config.publish(expected, doc)).await {
            Ok(Ok(version)) => Ok(version),
            Ok(Err(PublishError::Refused(e))) => Err(e),
            Ok(Err(e @ PublishError::Unavailable(_))) => return unavailable(&e),
            Err(e) => return unfinished(e),
        }
    } else {
        app.limiter.replace_rules_if(expected, doc)
    };
    match result {
        Ok(version) => {
            app.metrics
                .forget_removed_limits(&old, &app.limiter.rules());
            app.metrics.config_update(ConfigUpdate::Applied);
            app.metrics
                .config_version
                .set(i64::try_from(app.limiter.rules().version).unwrap_or(i64::MAX));
            if logged_by_the_group {
                tracing::info!(
                    event = "config_written",
                    version,
                    peer = %who.peer,
                    by = %who.by,
                    "config write accepted by the group's config log"
                );
            } else {
                let summary = summarize(old.doc(), app.limiter.rules().doc());
                tracing::info!(
                    event = "config_applied",
                    version,
                    peer = %who.peer,
                    by = %who.by,
                    summary = %summary,
                    "rate-limit config replaced"
                );
            }
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

/// `application/json`, parameters (a charset) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Constant-time comparison of the bearer token, so response timing does not
/// reveal how much of a guess was right. The scheme is case-insensitive
/// (RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, given)| given.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised_and_others_are_not() {
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "api.localhost:80",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.8.9.10:1",
            "[::1]:8080",
            "[::1]",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[2001:db8::1]:80",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn json_content_types() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(v));
            h
        };
        assert!(is_json(&with("application/json")));
        assert!(is_json(&with("Application/JSON; charset=utf-8")));
        assert!(!is_json(&with("text/plain")));
        assert!(!is_json(&with("application/x-www-form-urlencoded")));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_the_token_is_not() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, header::HeaderValue::from_static(v));
            h
        };
        let tokens = super::super::tokens::AdminTokens::new(Some("s3cret"), None);
        let matches = |h: &HeaderMap| bearer(h).and_then(|t| tokens.check(t)).is_some();
        assert!(matches(&with("Bearer s3cret")));
        assert!(matches(&with("bearer s3cret")));
        assert!(!matches(&with("Bearer S3CRET")));
        assert!(!matches(&with("Basic s3cret")));
        assert!(!matches(&HeaderMap::new()));
    }
}
