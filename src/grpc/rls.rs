//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: each
//! descriptor is one check through [`crate::api::decide::decide`], the
//! function `/check` answers from, so both transports give the same verdicts
//! from the same state.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;

use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

use super::proto::envoy::config::core::v3::HeaderValue;
use super::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use super::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use super::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use super::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::api::check::path_of_uri;
use crate::api::decide::{decide, Answer};
use crate::api::{headers, AppState};
use crate::settings::{DescriptorKey, GrpcSettings};
use quotaflow_core::algorithms::PolicyShape;
use quotaflow_core::rules::{Dimension, Request, RequestError};

/// The metrics' `endpoint` label of checks that came over gRPC.
pub const ENDPOINT: &str = "grpc";
/// Descriptors in one request at most: each is a check.
pub const MAX_DESCRIPTORS: usize = 64;
/// Entries in one descriptor at most (ignored ones included).
pub const MAX_ENTRIES: usize = 32;
/// Keys every instance understands, before `[grpc.descriptor_keys]`.
/// `remote_address` is what Envoy's `remote_address` action sends.
pub const BUILT_IN_KEYS: [(&str, DescriptorKey); 6] = [
    ("user_id", DescriptorKey::UserId),
    ("api_key", DescriptorKey::ApiKey),
    ("client_ip", DescriptorKey::ClientIp),
    ("remote_address", DescriptorKey::ClientIp),
    ("method", DescriptorKey::Method),
    ("path", DescriptorKey::Path),
];

/// Why a `ShouldRateLimit` request is refused (`INVALID_ARGUMENT`) before
/// anything is counted. Messages name keys and positions, never values: a
/// value may be an API key.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("domain `{got}` is not served here ([grpc] domain = `{want}`)")]
    Domain { got: String, want: String },
    #[error("a request needs at least one descriptor")]
    NoDescriptors,
    #[error("at most {MAX_DESCRIPTORS} descriptors in one request, got {0}")]
    TooManyDescriptors(usize),
    #[error("descriptor {index}: at most {MAX_ENTRIES} entries, got {count}")]
    TooManyEntries { index: usize, count: usize },
    #[error(
        "descriptor {index}: unknown entry key `{key}` (known: user_id, api_key, client_ip, \
         remote_address, method, path, and those of [grpc.descriptor_keys])"
    )]
    UnknownKey { index: usize, key: String },
    #[error("descriptor {index}: {dimension} is given twice")]
    Repeated {
        index: usize,
        dimension: &'static str,
    },
    #[error("descriptor {index}: the value of `{key}` is not an IP address")]
    NotAnIp { index: usize, key: String },
    #[error(
        "descriptor {index}: limit overrides are not supported (limits come from quotaflow's config)"
    )]
    LimitOverride { index: usize },
    #[error("descriptor {index}: negative hits (refunds) are not supported")]
    NegativeHits { index: usize },
    #[error("descriptor {index}: {source}")]
    Invalid { index: usize, source: RequestError },
}

/// The service, on the sidecar's state.
pub struct Rls {
    app: AppState,
    domain: String,
    keys: HashMap<String, DescriptorKey>,
}

impl Rls {
    pub fn new(app: AppState, settings: &GrpcSettings) -> Self {
        let mut keys: HashMap<String, DescriptorKey> = BUILT_IN_KEYS
            .iter()
            .map(|&(k, v)| (k.to_owned(), v))
            .collect();
        // Aliases may also redefine a built-in key (`path = "ignore"`).
        keys.extend(
            settings
                .descriptor_keys
                .iter()
                .map(|(k, &v)| (k.clone(), v)),
        );
        Self {
            app,
            domain: settings.domain.clone(),
            keys,
        }
    }

    /// Every descriptor as a validated request, or the first problem.
    fn requests(&self, r: &RateLimitRequest) -> Result<Vec<Request>, BadRequest> {
        if !self.domain.is_empty() && r.domain != self.domain {
            return Err(BadRequest::Domain {
                got: shorten(&r.domain),
                want: self.domain.clone(),
            });
        }
        if r.descriptors.is_empty() {
            return Err(BadRequest::NoDescriptors);
        }
        if r.descriptors.len() > MAX_DESCRIPTORS {
            return Err(BadRequest::TooManyDescriptors(r.descriptors.len()));
        }
        r.descriptors
            .iter()
            .enumerate()
            .map(|(index, d)| self.request(index, d, r.hits_addend))
            .collect()
    }

    fn request(
        &self,
        index: usize,
        d: &RateLimitDescriptor,
        hits_addend: u32,
    ) -> Result<Request, BadRequest> {
        if d.entries.len() > MAX_ENTRIES {
            return Err(BadRequest::TooManyEntries {
                index,
                count: d.entries.len(),
            });
        }
        if d.limit.is_some() {
            return Err(BadRequest::LimitOverride { index });
        }
        if d.is_negative_hits {
            return Err(BadRequest::NegativeHits { index });
        }
        // As Envoy's own service: no hits (0) counts as one.
        let cost = d.hits_addend.unwrap_or(u64::from(hits_addend)).max(1);
        let mut req = Request {
            cost,
            ..Request::default()
        };
        for e in &d.entries {
            let Some(&target) = self.keys.get(e.key.as_str()) else {
                return Err(BadRequest::UnknownKey {
                    index,
                    key: shorten(&e.key),
                });
            };
            let (dimension, slot) = match target {
                DescriptorKey::Ignore => continue,
                DescriptorKey::UserId => (Dimension::UserId, &mut req.user_id),
                DescriptorKey::ApiKey => (Dimension::ApiKey, &mut req.api_key),
                DescriptorKey::Method => (Dimension::Method, &mut req.method),
                DescriptorKey::Path => (Dimension::Path, &mut req.path),
                DescriptorKey::ClientIp => {
                    if req.client_ip.is_some() {
                        return Err(BadRequest::Repeated {
                            index,
                            dimension: Dimension::ClientIp.as_str(),
                        });
                    }
                    let ip: IpAddr = e.value.trim().parse().map_err(|_| BadRequest::NotAnIp {
                        index,
                        key: shorten(&e.key),
                    })?;
                    req.client_ip = Some(ip);
                    continue;
                }
            };
            if slot.is_some() {
                return Err(BadRequest::Repeated {
                    index,
                    dimension: dimension.as_str(),
                });
            }
            *slot = Some(if dimension == Dimension::Path {
                // Envoy's `:path` carries the query string; limits match paths.
                path_of_uri(&e.value)
            } else {
                e.value.clone()
            });
        }
        req.validate()
            .map_err(|source| BadRequest::Invalid { index, source })?;
        Ok(req)
    }
}

/// At most 64 characters of a client's text, printable, for an error message.
fn shorten(text: &str) -> String {
    text.chars().take(64).flat_map(char::escape_debug).collect()
}

/// One descriptor's answer: its status, how binding it is (the headers
/// sent are those of the most binding descriptor) and its headers.
struct Described {
    status: DescriptorStatus,
    allowed: bool,
    rank: (bool, u64, Reverse<u64>, u64),
    headers: Vec<HeaderValue>,
    degraded: Option<&'static str>,
}

fn describe(a: Answer<'_>) -> Described {
    let d = a.decision;
    let mut status = DescriptorStatus {
        code: if d.allowed { Code::Ok } else { Code::OverLimit } as i32,
        ..DescriptorStatus::default()
    };
    // The weakest rank: a descriptor no enforced limit applied to.
    let mut rank = (false, 0, Reverse(u64::MAX), 0);
    if let Some(o) = d.binding() {
        if let Some(limit) = a.rules.limits.get(o.limit) {
            status.current_limit = Some(current_limit(&limit.name, limit.shape));
        }
        let v = &o.verdict;
        if a.degraded.is_none() {
            status.limit_remaining = u32::try_from(v.remaining).unwrap_or(u32::MAX);
            status.duration_until_reset = Some(duration(v.reset_ms));
        }
        rank = (
            !d.allowed,
            v.retry_after_ms,
            Reverse(v.remaining),
            v.reset_ms,
        );
    }
    let mut headers = Vec::with_capacity(6);
    headers::each_answer_header(&a, |key, value| {
        headers.push(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        })
    });
    Described {
        status,
        allowed: d.allowed,
        rank,
        headers,
        degraded: a.degraded,
    }
}

fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        // Below 1e9: fits.
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A limit's quota as Envoy states limits, `requests_per_unit` per `unit`:
/// exact when the window is one unit, or when the rate is a whole number
/// per second, minute, hour or day (a token bucket of 10 refilling 1/s is 1
/// per second); otherwise `UNKNOWN` with the quota per window (the name
/// says which limit it is).
pub fn current_limit(name: &str, shape: PolicyShape) -> RateLimit {
    const UNITS: [(Unit, u64); 4] = [
        (Unit::Second, 1),
        (Unit::Minute, 60),
        (Unit::Hour, 3_600),
        (Unit::Day, 86_400),
    ];
    let per_unit = UNITS.iter().find_map(|&(unit, secs)| {
        if shape.window_secs == secs {
            return Some((shape.quota, unit));
        }
        let over = shape.quota.checked_mul(secs)?;
        (shape.window_secs > 0 && over.is_multiple_of(shape.window_secs))
            .then(|| (over / shape.window_secs, unit))
    });
    let (n, unit) = per_unit.unwrap_or((shape.quota, Unit::Unknown));
    RateLimit {
        name: name.to_owned(),
        requests_per_unit: u32::try_from(n).unwrap_or(u32::MAX),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: GrpcRequest<RateLimitRequest>,
    ) -> Result<GrpcResponse<RateLimitResponse>, Status> {
        let app = &self.app;
        let reqs = self.requests(request.get_ref()).map_err(|e| {
            app.metrics.invalid_request(ENDPOINT);
            Status::invalid_argument(e.to_string())
        })?;
        let mut response = RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: Vec::with_capacity(reqs.len()),
            ..RateLimitResponse::default()
        };
        let mut binding: Option<Described> = None;
        let mut degraded = None;
        // One after the other, each counted on its own, as Envoy's service
        // does: a refused descriptor does not undo the others' hits.
        for req in reqs {
            let mut d = decide(app, ENDPOINT, req, describe)
                .await
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if !d.allowed {
                response.overall_code = Code::OverLimit as i32;
            }
            degraded = degraded.or(d.degraded);
            response.statuses.push(std::mem::take(&mut d.status));
            if binding.as_ref().is_none_or(|b| d.rank > b.rank) {
                binding = Some(d);
            }
        }
        if let Some(b) = binding {
            response.response_headers_to_add = b.headers;
        }
        let mut reply = GrpcResponse::new(response);
        if let Some(why) = degraded {
            reply.metadata_mut().insert(
                headers::DEGRADED,
                tonic::metadata::MetadataValue::from_static(why),
            );
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(quota: u64, window_secs: u64) -> PolicyShape {
        PolicyShape { quota, window_secs }
    }

    #[test]
    fn limits_are_stated_per_unit_exactly_or_as_unknown() {
        let per = |q, w| {
            let r = current_limit("l", shape(q, w));
            (r.requests_per_unit, Unit::try_from(r.unit).unwrap())
        };
        assert_eq!(per(20, 1), (20, Unit::Second));
        assert_eq!(per(100, 3_600), (100, Unit::Hour));
        // Token bucket of 10 refilling 1/s: q=10, w=10.
        assert_eq!(per(10, 10), (1, Unit::Second));
        assert_eq!(per(5, 2), (150, Unit::Minute));
        assert_eq!(per(7, 86_401), (7, Unit::Unknown));
        assert_eq!(per(u64::MAX, 7), (u32::MAX, Unit::Unknown));
        assert_eq!(per(u64::MAX, 1), (u32::MAX, Unit::Second));
    }

    #[test]
    fn durations_keep_milliseconds() {
        let d = duration(2_345);
        assert_eq!((d.seconds, d.nanos), (2, 345_000_000));
        assert_eq!(duration(u64::MAX).nanos, 615_000_000);
    }
}
