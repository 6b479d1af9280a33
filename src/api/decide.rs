//! The decision for one check, whatever it came over: `/check`,
//! forward-auth and the Envoy RLS over gRPC all call [`decide`], so every
//! way to reach the state (in memory, the Redis state mode with its
//! failure modes, and later the partition owner) serves them all alike.

use std::time::Instant;

use smallvec::SmallVec;

use super::{AppState, RedisMode};
use quotaflow_adapters::clock::now_ms;
use quotaflow_adapters::redis_state::Unavailable;
use quotaflow_core::limiter::{Decision, Matched};
use quotaflow_core::rules::{Request, RequestError, Rules};
use quotaflow_core::state::Probed;

/// A decision with what a transport needs to state it.
pub struct Answer<'a> {
    /// The rule set the decision was made with (names and shapes of limits).
    pub rules: &'a Rules,
    pub decision: &'a Decision,
    /// Set when the state could not answer and each limit's failure mode
    /// did instead: why, as `degraded_answers_total` labels it. Such a
    /// decision states no remaining quota.
    pub degraded: Option<&'static str>,
}

/// Validate `req`, decide it, count it under `endpoint` in the metrics,
/// and hand the answer to `f` (which turns it into the transport's reply
/// without copying the decision).
pub async fn decide<R>(
    app: &AppState,
    endpoint: &str,
    mut req: Request,
    f: impl FnOnce(Answer<'_>) -> R,
) -> Result<R, RequestError> {
    req.validate()?;
    let started = Instant::now();
    app.limiter.canonicalize_path(&mut req);
    if let (None, Some(cluster)) = (&app.redis_mode, &app.cluster) {
        let rules = app.limiter.rules();
        let (decision, degraded) = cluster.decide(app, &rules, &req).await;
        app.metrics
            .record(endpoint, &rules, &decision, started.elapsed());
        return Ok(f(Answer {
            rules: &rules,
            decision: &decision,
            degraded,
        }));
    }
    let Some(mode) = &app.redis_mode else {
        return Ok(app.limiter.check_then(&req, now_ms(), |rules, decision| {
            app.metrics
                .record(endpoint, rules, decision, started.elapsed());
            f(Answer {
                rules,
                decision,
                degraded: None,
            })
        }));
    };
    let rules = app.limiter.rules();
    let (decision, degraded) = decide_in_redis(app, mode, &rules, &req).await;
    app.metrics
        .record(endpoint, &rules, &decision, started.elapsed());
    Ok(f(Answer {
        rules: &rules,
        decision: &decision,
        degraded,
    }))
}

/// The Redis state mode: the group's state decides, within the budget;
/// past it (or with Redis down) each limit's failure mode does, and the
/// reason comes back with the decision.
async fn decide_in_redis(
    app: &AppState,
    mode: &RedisMode,
    rules: &Rules,
    req: &Request,
) -> (Decision, Option<&'static str>) {
    let m = app.limiter.matched(rules, req);
    if m.whitelisted || m.probes.is_empty() {
        return (m.decision(rules.version, &[]), None);
    }
    let rs = &mode.state;
    if let Some((i, probed)) = rs.denied(rules.version, &m.probes, req.cost) {
        // Refused by one limit: the others are neither consulted nor charged.
        let one = Matched {
            whitelisted: false,
            limits: smallvec::smallvec![m.limits[i]],
            probes: smallvec::smallvec![m.probes[i]],
        };
        return (one.decision(rules.version, &[probed]), None);
    }
    let result = match rs.submit(&m.probes, req.cost) {
        Err(why) => Err(why),
        Ok(pending) => match tokio::time::timeout(rs.budget(), pending).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Unavailable::Unreachable),
            Err(_) => Err(Unavailable::Timeout),
        },
    };
    match result {
        Ok(a) => {
            rs.remember(rules.version, &m.probes, req.cost, &a);
            (m.decision(rules.version, &a.probed), None)
        }
        Err(why) => {
            app.metrics
                .redis
                .degraded
                .with_label_values(&[why.reason()])
                .inc();
            // Redis answered none of the probes.
            let failed: SmallVec<[Result<Probed, ()>; 4]> =
                m.probes.iter().map(|_| Err(())).collect();
            let probed =
                crate::cluster::settle(app, rules, &m, &failed, mode.failure_mode, req, true);
            (m.decision(rules.version, &probed), Some(why.reason()))
        }
    }
}
