//! Rate-limit response headers: `RateLimit-Policy` and `RateLimit` as in
//! draft-ietf-httpapi-ratelimit-headers-10, the legacy `X-RateLimit-*`
//! trio most clients still read, and `Retry-After` on refusals.

use std::fmt::Write as _;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use quotaflow_core::limiter::Decision;
use quotaflow_core::rules::Rules;

/// Problem type for refusals, registered by the ratelimit-headers draft.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Whole seconds, rounded up, as HTTP headers count them.
pub fn secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// Seconds a refused client should wait: the longest wait among violated
/// limits (all must pass), at least one.
pub fn retry_after_secs(decision: &Decision) -> u64 {
    secs(
        decision
            .violated()
            .map(|o| o.verdict.retry_after_ms)
            .max()
            .unwrap_or(0),
    )
    .max(1)
}

/// Largest `RateLimit-Policy` value: proxies refuse responses whose
/// headers pass 8–16 KB, and a request matched by hundreds of limits must
/// not push its answer past them. Policies past this are left out, the
/// binding limit's first (the `RateLimit` header names it anyway).
pub const MAX_POLICY_HEADER_BYTES: usize = 2048;

/// On an answer given by the limits' failure modes instead of their state
/// (the state backend could not answer): why, as `degraded_answers_total`
/// labels it. Such answers carry no remaining quota: it is not known.
pub const DEGRADED: &str = "quotaflow-degraded";

/// The headers that state a remaining quota, removed from degraded answers.
pub const REMAINING: [&str; 4] = [
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

/// Add the rate-limit headers of an answer to `headers`, as every transport
/// states them: on a degraded answer, without the remaining quota (not
/// known) and with `Quotaflow-Degraded`.
pub fn write_answer(a: &super::decide::Answer<'_>, headers: &mut HeaderMap) {
    each_answer_header(a, |name, value| put(headers, name, value));
}

/// The headers of [`write_answer`], one `(name, value)` at a time, for a
/// transport without a `HeaderMap` (gRPC's `response_headers_to_add`).
pub fn each_answer_header(a: &super::decide::Answer<'_>, mut f: impl FnMut(&'static str, String)) {
    match a.degraded {
        None => each(a.rules, a.decision, f),
        Some(why) => {
            each(a.rules, a.decision, |name, value| {
                if !REMAINING.contains(&name) {
                    f(name, value);
                }
            });
            f(DEGRADED, why.to_owned());
        }
    }
}

/// Add every rate-limit header for `decision` to `headers`.
pub fn write(rules: &Rules, decision: &Decision, headers: &mut HeaderMap) {
    each(rules, decision, |name, value| put(headers, name, value));
}

/// Every rate-limit header for `decision`, in order.
fn each(rules: &Rules, decision: &Decision, mut put: impl FnMut(&'static str, String)) {
    let mut policy = String::new();
    let binding = decision.binding().map(|o| o.limit);
    let enforced = || decision.outcomes.iter().filter(|o| !o.shadow);
    // The binding limit first, then the others in order.
    let ordered = enforced()
        .filter(|o| Some(o.limit) == binding)
        .chain(enforced().filter(|o| Some(o.limit) != binding));
    for o in ordered {
        let Some(limit) = rules.limits.get(o.limit) else {
            continue;
        };
        let mark = policy.len();
        if !policy.is_empty() {
            policy.push_str(", ");
        }
        let _ = write!(
            policy,
            "\"{}\";q={};w={}",
            limit.name, limit.shape.quota, limit.shape.window_secs
        );
        if policy.len() > MAX_POLICY_HEADER_BYTES {
            policy.truncate(mark);
            break;
        }
    }
    if !policy.is_empty() {
        put("ratelimit-policy", policy);
    }
    if let Some(o) = decision.binding() {
        if let Some(limit) = rules.limits.get(o.limit) {
            let reset = secs(o.verdict.reset_ms);
            put(
                "ratelimit",
                format!("\"{}\";r={};t={}", limit.name, o.verdict.remaining, reset),
            );
            put("x-ratelimit-limit", o.verdict.limit.to_string());
            put("x-ratelimit-remaining", o.verdict.remaining.to_string());
            put("x-ratelimit-reset", reset.to_string());
        }
    }
    if !decision.allowed {
        put("retry-after", retry_after_secs(decision).to_string());
    }
}

fn put(headers: &mut HeaderMap, name: &'static str, value: String) {
    // Limit names are validated to a header-safe alphabet, so this holds.
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quotaflow_core::fingerprint::Fingerprinter;
    use quotaflow_core::limiter::Limiter;
    use quotaflow_core::rules::{Request, RulesDoc};

    fn limiter() -> Limiter {
        let doc = RulesDoc::from_json(
            br#"{"limits": [
                {"name": "burst", "key": ["user_id"], "capacity": 3, "refill_per_sec": 0.5},
                {"name": "hourly", "key": ["user_id"], "algorithm": "fixed_window", "limit": 100, "window": "1h"},
                {"name": "shadowy", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1h", "shadow": true}
            ]}"#,
        )
        .unwrap();
        Limiter::new(doc, Fingerprinter::random(), 1).unwrap()
    }

    fn headers_after(l: &Limiter, n: usize) -> HeaderMap {
        let req = Request {
            user_id: Some("u".into()),
            ..Request::default()
        };
        let mut last = HeaderMap::new();
        for _ in 0..n {
            last = l.check_then(&req, 3_600_000, |rules, d| {
                let mut h = HeaderMap::new();
                write(rules, d, &mut h);
                h
            });
        }
        last
    }

    fn get<'a>(h: &'a HeaderMap, n: &str) -> &'a str {
        h.get(n).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    #[test]
    fn allowed_request_describes_the_tightest_policy() {
        let h = headers_after(&limiter(), 1);
        assert_eq!(
            get(&h, "ratelimit-policy"),
            r#""burst";q=3;w=6, "hourly";q=100;w=3600"#
        );
        assert_eq!(get(&h, "ratelimit"), r#""burst";r=2;t=2"#);
        assert_eq!(get(&h, "x-ratelimit-limit"), "3");
        assert_eq!(get(&h, "x-ratelimit-remaining"), "2");
        assert_eq!(get(&h, "x-ratelimit-reset"), "2");
        assert!(h.get("retry-after").is_none());
    }

    #[test]
    fn the_policy_header_stays_bounded_with_the_binding_limit_first() {
        let limits: Vec<String> = (0..500)
            .map(|i| {
                let limit = if i == 377 { 1 } else { 1_000_000 };
                format!(
                    r#"{{"name": "limit-{i:03}", "key": ["user_id"], "algorithm": "fixed_window", "limit": {limit}, "window": "1h"}}"#
                )
            })
            .collect();
        let doc =
            RulesDoc::from_json(format!(r#"{{"limits": [{}]}}"#, limits.join(",")).as_bytes())
                .unwrap();
        let l = Limiter::new(doc, Fingerprinter::random(), 1).unwrap();
        let h = headers_after(&l, 2);
        let policy = get(&h, "ratelimit-policy");
        assert!(
            policy.len() <= MAX_POLICY_HEADER_BYTES,
            "{} bytes",
            policy.len()
        );
        assert!(
            policy.starts_with(r#""limit-377";q=1;w=3600, "limit-000""#),
            "{policy}"
        );
        assert_eq!(get(&h, "ratelimit"), r#""limit-377";r=0;t=3600"#);
    }

    #[test]
    fn refused_request_names_the_violated_policy_and_when_to_retry() {
        let h = headers_after(&limiter(), 4);
        assert_eq!(get(&h, "ratelimit"), r#""burst";r=0;t=6"#);
        assert_eq!(get(&h, "x-ratelimit-remaining"), "0");
        assert_eq!(get(&h, "retry-after"), "2");
    }
}
