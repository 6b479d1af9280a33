//! `POST /check` and the forward-auth form of the same check.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::decide::{self, Answer};
use super::{client_ip, headers, problem, AppState};
use quotaflow_core::rules::Request;

/// `POST /check`: a JSON body of vocabulary fields.
pub(super) async fn check(State(app): State<AppState>, body: Bytes) -> Response {
    match parse_check(&body) {
        // Services calling /check read the status themselves: always 429.
        Ok(req) => decide(&app, "check", req, StatusCode::TOO_MANY_REQUESTS).await,
        Err(detail) => bad_request(&app, "check", detail),
    }
}

/// A `/check` body as a request, or why not (naming the field at fault).
fn parse_check(body: &[u8]) -> Result<Request, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: Request = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!(" at `{path}`")
        };
        format!("invalid check request{at}: {}", e.into_inner())
    })?;
    de.end()
        .map_err(|_| "invalid check request: data after the JSON object".to_owned())?;
    Ok(req)
}

/// Forward-auth for nginx `auth_request`, Traefik ForwardAuth and Envoy
/// `ext_authz` (HTTP): identity, cost and the original method and URI from
/// the configured headers, believed only from a trusted proxy (a client
/// must never pick its own identity or cost), else the path after
/// `/forward-auth` (Envoy's `path_prefix` mode) and the request's method.
pub(super) async fn forward_auth(State(app): State<AppState>, req: HttpRequest) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    match identity_from(
        &app,
        req.method().as_str(),
        req.uri().path(),
        req.headers(),
        peer,
    ) {
        Ok(r) => decide(&app, "forward_auth", r, app.identity.deny_status).await,
        Err(msg) => bad_request(&app, "forward_auth", msg),
    }
}

fn identity_from(
    app: &AppState,
    method: &str,
    path: &str,
    h: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<Request, String> {
    // An empty header is no value: proxies clear a header by sending it empty.
    let text = |name: &str| -> Result<Option<String>, String> {
        match h.get(name).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.to_owned()))
                .map_err(|_| format!("header {name} is not visible ASCII")),
        }
    };
    let id = &app.identity;
    // Headers only a trusted proxy may set; from anyone else they are not
    // read at all (as X-Forwarded-For is not).
    let trusted = peer.is_some_and(|p| client_ip::is_trusted(p, &id.trusted_proxies));
    let proxy_set = |name: &str| if trusted { text(name) } else { Ok(None) };
    let rest = path.strip_prefix("/forward-auth").filter(|r| !r.is_empty());
    let uri = proxy_set(&id.uri_header)?.or_else(|| rest.map(str::to_owned));
    let path = uri.as_deref().map(path_of_uri);
    let method = proxy_set(&id.method_header)?.unwrap_or_else(|| method.to_owned());
    let cost = match proxy_set(&id.cost_header)? {
        None => 1,
        Some(c) => c.trim().parse().map_err(|_| {
            format!(
                "header {} must be a non-negative integer, got `{c}`",
                id.cost_header
            )
        })?,
    };
    Ok(Request {
        user_id: proxy_set(&id.user_id_header)?,
        api_key: proxy_set(&id.api_key_header)?,
        client_ip: client_ip::resolve(peer, h, &id.trusted_proxies),
        method: Some(method),
        path,
        cost,
    })
}

/// The path of a request URI as a proxy passes it on: without query and
/// fragment; one that is all query or fragment (`?x=1`) asks for the root.
pub(crate) fn path_of_uri(uri: &str) -> String {
    match uri.split(['?', '#']).next().unwrap_or_default() {
        "" => "/".to_owned(),
        p => p.to_owned(),
    }
}

/// Decide `req` and answer over HTTP: `deny` on refusal, the rate-limit
/// headers, and `Quotaflow-Degraded` when the failure modes decided.
async fn decide(app: &AppState, endpoint: &str, req: Request, deny: StatusCode) -> Response {
    match decide::decide(app, endpoint, req, |a| respond(a, deny)).await {
        Ok(response) => response,
        Err(e) => bad_request(app, endpoint, e.to_string()),
    }
}

/// One limit's part in a `/check` answer.
#[derive(Serialize)]
struct LimitView<'a> {
    name: &'a str,
    allowed: bool,
    shadow: bool,
    limit: u64,
    remaining: u64,
    reset_ms: u64,
    retry_after_ms: u64,
}

/// The `200` body.
#[derive(Serialize)]
struct Allowed<'a> {
    allowed: bool,
    whitelisted: bool,
    config_version: u64,
    limits: Vec<LimitView<'a>>,
}

/// The `429` body: RFC 9457 problem of the draft's `quota-exceeded` type.
#[derive(Serialize)]
struct Exceeded<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: String,
    #[serde(rename = "violated-policies")]
    violated_policies: Vec<&'a str>,
    config_version: u64,
    limits: Vec<LimitView<'a>>,
}

// Typed bodies serialised straight to bytes: building them through
// `serde_json::Value` cost ~10% of the server's CPU per request.
fn respond(a: Answer<'_>, deny: StatusCode) -> Response {
    let (rules, d) = (a.rules, a.decision);
    let limits: Vec<LimitView<'_>> = d
        .outcomes
        .iter()
        .filter_map(|o| {
            let l = rules.limits.get(o.limit)?;
            Some(LimitView {
                name: &l.name,
                allowed: o.verdict.allowed,
                shadow: o.shadow,
                limit: o.verdict.limit,
                remaining: o.verdict.remaining,
                reset_ms: o.verdict.reset_ms,
                retry_after_ms: o.verdict.retry_after_ms,
            })
        })
        .collect();
    let (status, content_type, body) = if d.allowed {
        let body = Allowed {
            allowed: true,
            whitelisted: d.whitelisted,
            config_version: d.version,
            limits,
        };
        (
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&body),
        )
    } else {
        let violated: Vec<&str> = d
            .violated()
            .filter_map(|o| rules.limits.get(o.limit).map(|l| l.name.as_str()))
            .collect();
        let wait = headers::retry_after_secs(d);
        let body = Exceeded {
            kind: headers::QUOTA_EXCEEDED,
            title: "Request cannot be satisfied as assigned quota has been exceeded",
            status: deny.as_u16(),
            detail: format!(
                "over the limit of {}; retry in {wait} s",
                violated.join(", ")
            ),
            violated_policies: violated,
            config_version: d.version,
            limits,
        };
        (deny, "application/problem+json", serde_json::to_vec(&body))
    };
    // Serialising these plain structs cannot fail; an empty body would still
    // carry the status and headers that matter.
    let mut response = (
        status,
        [(header::CONTENT_TYPE, content_type)],
        body.unwrap_or_default(),
    )
        .into_response();
    headers::write_answer(&a, response.headers_mut());
    response
}

fn bad_request(app: &AppState, endpoint: &str, detail: String) -> Response {
    app.metrics.invalid_request(endpoint);
    problem(
        StatusCode::BAD_REQUEST,
        "about:blank",
        "Bad Request",
        detail,
        json!({}),
    )
}

#[cfg(test)]
mod fuzz {
    //! Bounded fuzzing of what clients send (run by the test command with
    //! the suite's `PROPTEST_CASES`; longer runs: docs/security.md).

    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn app() -> AppState {
        let settings = crate::settings::Settings::load_with_env(None, false).expect("defaults");
        crate::server::build_state(&settings, None).expect("state")
    }

    proptest! {
        /// Any bytes as a `/check` body: a request or a reason, never a
        /// panic; a request that parses validates or says why.
        #[test]
        fn check_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(req) = parse_check(&body) {
                let _ = req.validate();
            }
        }

        /// JSON-shaped bodies reach deeper than random bytes do.
        #[test]
        fn check_shaped_bodies_never_panic(
            fields in prop::collection::vec(
                (prop::sample::select(vec!["user_id", "api_key", "client_ip", "method", "path", "cost", "extra"]),
                 prop_oneof![
                    any::<String>().prop_map(serde_json::Value::String),
                    any::<i64>().prop_map(serde_json::Value::from),
                    any::<f64>().prop_map(serde_json::Value::from),
                    Just(serde_json::Value::Null),
                 ]),
                0..7,
            ),
            tail in ".{0,3}",
        ) {
            let map: serde_json::Map<String, serde_json::Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let body = format!("{}{tail}", serde_json::Value::Object(map));
            if let Ok(mut req) = parse_check(body.as_bytes()) {
                if req.validate().is_ok() {
                    req.canonicalize_path(false);
                }
            }
        }

        /// Any header values and path on forward-auth, from a trusted or an
        /// untrusted peer: a request or a reason, never a panic.
        #[test]
        fn forward_auth_headers_never_panic(
            values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 7),
            path in "/forward-auth(/[ -~]{0,30})?",
            trusted in any::<bool>(),
        ) {
            let app = app();
            let mut h = HeaderMap::new();
            let names = ["x-user-id", "x-api-key", "x-original-uri", "x-original-method",
                "x-quotaflow-cost", "x-forwarded-for", "x-forwarded-uri"];
            for (name, v) in names.iter().zip(&values) {
                if let Ok(v) = HeaderValue::from_bytes(v) {
                    h.insert(*name, v);
                }
            }
            let peer: IpAddr = if trusted { [127, 0, 0, 1].into() } else { [203, 0, 113, 9].into() };
            if let Ok(req) = identity_from(&app, "GET", &path, &h, Some(peer)) {
                let _ = req.validate();
            }
        }
    }
}
