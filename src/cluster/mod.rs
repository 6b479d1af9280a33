//! The group in Kafka mode: a synchronous check is counted in the state
//! of each matching limit's *home partition* (`pipeline::routing`, the
//! same rule the stream counts by), by the instance that owns that
//! partition. The design and its guarantees are in docs/group.md.
//!
//! - a home this instance owns is decided in-process, on the partition's
//!   own state;
//! - another home is asked of its owner, found in the owner registry
//!   (`owners`), over the internal listener (`POST /internal/v1/decide`),
//!   authenticated by a token derived from `security.fingerprint_key`;
//! - a check whose homes all have one owner is decided there atomically
//!   (refused → nothing charged); one spread over several owners is
//!   probed on every owner first and applied only if all allow (see
//!   docs/group.md for the one race this leaves);
//! - a home that cannot answer within `cluster.budget` (no owner, moving,
//!   restoring, paused, dead) is answered by its limits' `failure_mode`:
//!   `open`, `closed`, or `local` (this instance's own state), and the
//!   answer is marked degraded.

mod link;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http_body_util::Full;
use smallvec::SmallVec;

use crate::api::AppState;
use link::Links;
use quotaflow_adapters::clock::now_ms;
use quotaflow_adapters::coordinator::Coordinator;
use quotaflow_adapters::owners::OwnerRegistry;
use quotaflow_adapters::worker::SyncTarget;
use quotaflow_core::algorithms::Verdict;
use quotaflow_core::limiter::Matched;
use quotaflow_core::pipeline::hits::{Charge, Side, SyncHit};
use quotaflow_core::pipeline::routing::Routing;
use quotaflow_core::rules::{FailureMode, Request, Rules};
use quotaflow_core::state::{apply_across, Probe, Probed};
pub use wire::{Ask, Phase, Reply, WireOutcome};

/// The header carrying the group token on internal calls.
pub const TOKEN_HEADER: &str = "x-quotaflow-group-token";

/// How long a connection to another instance is kept idle for reuse, at
/// most: half the listener's `server.header_timeout` when that is shorter,
/// since the other side closes idle connections after it.
const LINK_IDLE: Duration = Duration::from_secs(2);

/// Idle connections kept to each other instance.
const MAX_IDLE_LINKS: usize = 64;

/// The internal endpoint's path.
pub const DECIDE_PATH: &str = "/internal/v1/decide";

/// Why a home could not answer, as `degraded_answers_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerUnavailable {
    /// The registry names no owner for the partition.
    NoOwner,
    /// The named owner (this instance included) does not hold it now: a
    /// rebalance or a restore is under way.
    Moving,
    /// The owner did not answer within the budget (paused, overloaded).
    Timeout,
    /// The owner cannot be reached or answered with an error.
    Unreachable,
}

impl OwnerUnavailable {
    pub fn reason(self) -> &'static str {
        match self {
            OwnerUnavailable::NoOwner => "no_owner",
            OwnerUnavailable::Moving => "owner_moving",
            OwnerUnavailable::Timeout => "owner_timeout",
            OwnerUnavailable::Unreachable => "owner_unreachable",
        }
    }
}

/// When a synchronous hit counted on an owner is answered
/// (`cluster.sync_hits`, docs/group.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncHits {
    /// Once it is in the partition's log: a crash of the owner loses no
    /// answered hit. Costs one produce acknowledgement per hit.
    Logged,
    /// At once (the default): a crash of the owner loses the hits answered
    /// since its last checkpoint (at most `stream.checkpoint_interval` of
    /// them); none is counted twice.
    Checkpointed,
}

/// The group's parts a check needs.
pub struct Cluster {
    routing: Routing,
    coordinator: Arc<Coordinator>,
    registry: OwnerRegistry,
    links: Arc<Links>,
    token: HeaderValue,
    budget: Duration,
    /// For limits without their own `failure_mode`.
    failure_mode: FailureMode,
    /// This instance's advertised internal address.
    address: String,
    sync_hits: SyncHits,
}

/// An internal call within the budget: its answer, or `Elapsed`.
type Timed = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<Result<Reply, OwnerUnavailable>, tokio::time::error::Elapsed>,
            > + Send,
    >,
>;

/// An internal call of one round: awaited in place, or on a task of its own.
enum Call {
    Pending(Timed),
    Spawned(
        tokio::task::JoinHandle<
            Result<Result<Reply, OwnerUnavailable>, tokio::time::error::Elapsed>,
        >,
    ),
    Done,
}

/// Homes grouped by where they are decided.
type Owners = SmallVec<[(Via, SmallVec<[i32; 4]>); 4]>;

/// Per probe: its outcome, or why its home could not give one.
type Outcomes = SmallVec<[Result<Probed, OwnerUnavailable>; 4]>;

impl Cluster {
    pub fn new(
        routing: Routing,
        coordinator: Arc<Coordinator>,
        registry: OwnerRegistry,
        token: &str,
        budget: Duration,
        failure_mode: FailureMode,
        address: String,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            routing,
            coordinator,
            registry,
            links: Arc::new(Links::new(MAX_IDLE_LINKS, LINK_IDLE)),
            token: HeaderValue::from_str(token)?,
            budget,
            failure_mode,
            address,
            sync_hits: SyncHits::Checkpointed,
        })
    }

    /// Keep idle connections to the group's listeners, which close them
    /// after `header_timeout`, for half of that when under `LINK_IDLE`.
    pub fn with_header_timeout(mut self, header_timeout: Duration) -> Self {
        self.links = Arc::new(Links::new(
            MAX_IDLE_LINKS,
            LINK_IDLE.min(header_timeout / 2),
        ));
        self
    }

    pub fn with_sync_hits(mut self, sync_hits: SyncHits) -> Self {
        self.sync_hits = sync_hits;
        self
    }

    /// Per probe of `m`: whether its limit is aligned with the partition key.
    fn aligned(&self, rules: &Rules, m: &Matched<'_>) -> SmallVec<[bool; 4]> {
        m.limits
            .iter()
            .map(|&i| {
                rules
                    .limits
                    .get(i)
                    .is_some_and(|l| self.routing.is_aligned(l))
            })
            .collect()
    }

    pub fn registry(&self) -> &OwnerRegistry {
        &self.registry
    }

    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Decide `req` on its homes' owners: the decision and, if any home
    /// could not answer, why.
    pub async fn decide(
        &self,
        app: &AppState,
        rules: &Rules,
        req: &Request,
    ) -> (quotaflow_core::limiter::Decision, Option<&'static str>) {
        let m = app.limiter.matched(rules, req);
        if m.whitelisted || m.probes.is_empty() {
            return (m.decision(rules.version, &[]), None);
        }
        let fp = app.limiter.fingerprinter();
        let mut buf = Vec::new();
        let homes: SmallVec<[i32; 4]> = m
            .limits
            .iter()
            .map(|&i| self.routing.home(&rules.limits[i], req, fp, &mut buf))
            .collect();
        let mut distinct = homes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let deadline = Instant::now() + self.budget;
        let owners = self.owners_of(&distinct);
        let outcomes = if owners.len() > 1 {
            // Probe every home; apply only if none refuses.
            let mut outcomes = self
                .round(
                    app,
                    Phase::Peek,
                    owners.clone(),
                    &homes,
                    &m,
                    rules,
                    req,
                    deadline,
                )
                .await;
            let probed = settle(app, rules, &m, &outcomes, self.failure_mode, req, false);
            let refused = probed
                .iter()
                .zip(&m.probes)
                .any(|(p, probe)| probe.enforce && !p.outcome.verdict.allowed);
            if refused {
                return finish(app, rules, &m, &outcomes, probed);
            }
            let answering: SmallVec<[i32; 4]> = distinct
                .iter()
                .copied()
                .filter(|h| {
                    homes
                        .iter()
                        .zip(&outcomes)
                        .any(|(home, o)| home == h && o.is_ok())
                })
                .collect();
            let answering_owners = owners
                .into_iter()
                .filter_map(|(via, group)| {
                    let group: SmallVec<[i32; 4]> = group
                        .into_iter()
                        .filter(|h| answering.contains(h))
                        .collect();
                    (!group.is_empty()).then_some((via, group))
                })
                .collect();
            let applied = self
                .round(
                    app,
                    Phase::Apply,
                    answering_owners,
                    &homes,
                    &m,
                    rules,
                    req,
                    deadline,
                )
                .await;
            // Homes that did not answer the probe keep their failure mode's
            // verdict; those that answered it are replaced by the apply's.
            for (i, home) in homes.iter().enumerate() {
                if answering.contains(home) {
                    outcomes[i] = applied[i];
                }
            }
            outcomes
        } else {
            self.round(app, Phase::Apply, owners, &homes, &m, rules, req, deadline)
                .await
        };
        let probed = settle(app, rules, &m, &outcomes, self.failure_mode, req, true);
        finish(app, rules, &m, &outcomes, probed)
    }

    /// Where each of `homes` is decided: here, at an owner's address, or
    /// nowhere now (why). Homes with one owner are decided together.
    fn owners_of(&self, homes: &[i32]) -> Owners {
        let mut by = Owners::new();
        for &home in homes {
            let via = if self.coordinator.sync_target(home).is_some() {
                Via::Here
            } else {
                match self.registry.owner(home) {
                    None => Via::Nowhere(OwnerUnavailable::NoOwner),
                    Some(o) if o.address == self.address => Via::Nowhere(OwnerUnavailable::Moving),
                    Some(o) => Via::There(o.address),
                }
            };
            match by.iter_mut().find(|(v, _)| *v == via) {
                Some((_, hs)) => hs.push(home),
                None => by.push((via, smallvec::smallvec![home])),
            }
        }
        by
    }

    /// Ask `owners` for the outcomes of their homes' probes, one
    /// call per owner, all at once, within `deadline`; each owner decides
    /// its homes together (atomically for `apply`). Probes whose home is
    /// not in `owners` are `Err(Moving)` placeholders the caller overwrites.
    #[allow(clippy::too_many_arguments)]
    async fn round(
        &self,
        app: &AppState,
        phase: Phase,
        owners: Owners,
        homes: &[i32],
        m: &Matched<'_>,
        rules: &Rules,
        req: &Request,
        deadline: Instant,
    ) -> Outcomes {
        let mut outcomes: Outcomes = homes
            .iter()
            .map(|_| Err(OwnerUnavailable::Moving))
            .collect();
        let mut remote = Vec::new();
        let mut appending = Appending::new();
        for (via, group) in owners {
            let idx: SmallVec<[usize; 4]> = (0..homes.len())
                .filter(|&i| group.contains(&homes[i]))
                .collect();
            match via {
                Via::Nowhere(why) => idx.iter().for_each(|&i| outcomes[i] = Err(why)),
                Via::There(address) => remote.push((group, idx, address)),
                Via::Here => {
                    let (decided, appends) = decide_here(
                        &self.coordinator,
                        self.sync_hits,
                        rules,
                        &self.aligned(rules, m),
                        phase,
                        &group,
                        &idx,
                        homes,
                        m,
                        req.cost,
                    );
                    appending.extend(start_appends(appends));
                    for (&i, o) in idx.iter().zip(decided) {
                        outcomes[i] = o;
                    }
                }
            }
        }
        if remote.is_empty() {
            self.settle_appends(app, appending, homes, &mut outcomes, deadline)
                .await;
            return outcomes;
        }
        let mut calls: SmallVec<[Call; 2]> = remote
            .iter()
            .map(|(group, _, address)| {
                let body = serde_json::to_vec(&Ask {
                    phase,
                    homes: group.to_vec(),
                    request: req.clone(),
                })
                .unwrap_or_default();
                Call::Pending(Box::pin(tokio::time::timeout_at(
                    deadline.into(),
                    self.call(address, body),
                )))
            })
            .collect();
        // One owner (every check whose limits are all aligned): awaited in
        // place. Several: spawned, so they run at once.
        if calls.len() > 1 {
            for c in calls.iter_mut() {
                if let Call::Pending(f) = std::mem::replace(c, Call::Done) {
                    *c = Call::Spawned(tokio::spawn(f));
                }
            }
        }
        let phase_label = match phase {
            Phase::Apply => "apply",
            Phase::Peek => "peek",
        };
        for ((_, idx, _), call) in remote.iter().zip(calls) {
            let reply = match call {
                Call::Pending(f) => f.await.unwrap_or(Err(OwnerUnavailable::Timeout)),
                Call::Spawned(h) => match h.await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(OwnerUnavailable::Timeout),
                    Err(_) => Err(OwnerUnavailable::Unreachable),
                },
                Call::Done => Err(OwnerUnavailable::Unreachable),
            };
            let outcome = if reply.is_ok() {
                "answered"
            } else {
                "unavailable"
            };
            app.metrics
                .owner_calls
                .with_label_values(&[phase_label, outcome])
                .inc();
            match reply {
                Err(e) => idx.iter().for_each(|&i| outcomes[i] = Err(e)),
                Ok(reply) => {
                    for &i in idx {
                        let name = rules.limits.get(m.limits[i]).map(|l| l.name.as_str());
                        let found = reply
                            .outcomes
                            .iter()
                            .find(|o| Some(o.limit.as_str()) == name);
                        outcomes[i] = found
                            .map(WireOutcome::probed)
                            .ok_or(OwnerUnavailable::Moving);
                    }
                }
            }
        }
        self.settle_appends(app, appending, homes, &mut outcomes, deadline)
            .await;
        outcomes
    }

    /// Wait for the hits counted here to be in their partitions' logs; the
    /// probes of a partition whose append was not acknowledged in time
    /// follow the failure mode (`owner_timeout`).
    async fn settle_appends(
        &self,
        app: &AppState,
        appending: Appending,
        homes: &[i32],
        outcomes: &mut Outcomes,
        deadline: Instant,
    ) {
        if appending.is_empty() {
            return;
        }
        for p in unappended(app, appending, deadline).await {
            for (i, &home) in homes.iter().enumerate() {
                if home == p {
                    outcomes[i] = Err(OwnerUnavailable::Timeout);
                }
            }
        }
    }

    /// One internal call; 'static so the calls of one check run at once.
    fn call(
        &self,
        address: &str,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Reply, OwnerUnavailable>> + Send + 'static {
        let links = self.links.clone();
        let address = address.to_owned();
        let token = self.token.clone();
        async move {
            let req = hyper::Request::post(DECIDE_PATH)
                .header(header::HOST, &address)
                .header(header::CONTENT_TYPE, "application/json")
                .header(TOKEN_HEADER, token)
                .body(Full::new(Bytes::from(body)))
                .map_err(|_| OwnerUnavailable::Unreachable)?;
            let (status, bytes) = links
                .exchange(&address, req)
                .await
                .map_err(|_| OwnerUnavailable::Unreachable)?;
            if status != StatusCode::OK {
                return Err(OwnerUnavailable::Unreachable);
            }
            let reply: Reply =
                serde_json::from_slice(&bytes).map_err(|_| OwnerUnavailable::Unreachable)?;
            if reply.outcomes.is_empty() && !reply.not_owned.is_empty() {
                return Err(OwnerUnavailable::Moving);
            }
            Ok(reply)
        }
    }

    /// The owner's side of a forwarded check: decide the limits whose home
    /// is one of `ask.homes`, all together. An `apply` runs only if every
    /// one of those homes is owned here, so that it stays atomic; else the
    /// homes not owned come back and the caller follows the failure mode.
    async fn answer(&self, app: &AppState, mut ask: Ask) -> Option<Reply> {
        let deadline = Instant::now() + self.budget;
        let mut reply = Reply::default();
        if ask.request.validate().is_err() {
            return Some(reply);
        }
        app.limiter.canonicalize_path(&mut ask.request);
        let req = &ask.request;
        let rules = app.limiter.rules();
        let m = app.limiter.matched(&rules, req);
        if m.whitelisted {
            return Some(reply);
        }
        reply.not_owned = ask
            .homes
            .iter()
            .copied()
            .filter(|&h| self.coordinator.sync_target(h).is_none())
            .collect();
        if ask.phase == Phase::Apply && !reply.not_owned.is_empty() {
            return Some(reply);
        }
        let fp = app.limiter.fingerprinter();
        let mut buf = Vec::new();
        let homes: SmallVec<[i32; 4]> = m
            .limits
            .iter()
            .map(|&i| self.routing.home(&rules.limits[i], req, fp, &mut buf))
            .collect();
        let group: SmallVec<[i32; 4]> = ask
            .homes
            .iter()
            .copied()
            .filter(|h| !reply.not_owned.contains(h))
            .collect();
        let idx: SmallVec<[usize; 4]> = (0..homes.len())
            .filter(|&i| group.contains(&homes[i]))
            .collect();
        let (decided, appends) = decide_here(
            &self.coordinator,
            self.sync_hits,
            &rules,
            &self.aligned(&rules, &m),
            ask.phase,
            &group,
            &idx,
            &homes,
            &m,
            req.cost,
        );
        let outcomes: SmallVec<[(usize, Probed); 4]> = idx
            .iter()
            .zip(decided)
            .filter_map(|(&i, o)| Some((i, o.ok()?)))
            .collect();
        // Answered only once every hit is in its partition's log: the
        // caller's own budget runs out first otherwise, and it follows the
        // failure mode.
        if !unappended(app, start_appends(appends), deadline)
            .await
            .is_empty()
        {
            return None;
        }
        for (i, p) in outcomes {
            reply
                .outcomes
                .push(WireOutcome::of(&rules.limits[m.limits[i]].name, &p));
        }
        Some(reply)
    }
}

/// The state a probe is counted in on its home partition: the arrival
/// side's for a limit aligned with the partition key, the home side's
/// (fed by the repartition topic) for any other (docs/stream.md).
fn side(
    t: &quotaflow_adapters::worker::SyncTarget,
    aligned: bool,
) -> &quotaflow_core::state::KeyedStore {
    if aligned {
        t.store()
    } else {
        t.home_store()
    }
}

/// Where a home is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Via {
    Here,
    There(String),
    Nowhere(OwnerUnavailable),
}

/// Decide the probes `idx` (whose homes are in `group`, all owned here) on
/// their partitions' states: together and atomically for `apply`, each on
/// its own for `peek`. A home that stopped being owned meanwhile gives
/// `Moving` for its probes (and an `apply` then counts nothing).
#[allow(clippy::too_many_arguments)]
fn decide_here(
    coordinator: &Coordinator,
    sync_hits: SyncHits,
    rules: &Rules,
    aligned: &[bool],
    phase: Phase,
    group: &[i32],
    idx: &[usize],
    homes: &[i32],
    m: &Matched<'_>,
    cost: u64,
) -> (SmallVec<[Result<Probed, OwnerUnavailable>; 4]>, Appends) {
    let mut targets: SmallVec<[(i32, Option<SyncTarget>); 4]> = group
        .iter()
        .map(|&h| (h, coordinator.sync_target(h)))
        .collect();
    // Gates are taken in partition order, whatever order a caller sent.
    targets.sort_unstable_by_key(|(h, _)| *h);
    targets.dedup_by_key(|(h, _)| *h);
    let target_of = |home: i32| {
        targets
            .iter()
            .find(|(h, _)| *h == home)
            .and_then(|(_, t)| t.as_ref())
    };
    if idx.iter().any(|&i| target_of(homes[i]).is_none()) {
        let moving = idx.iter().map(|_| Err(OwnerUnavailable::Moving)).collect();
        return (moving, Appends::new());
    }
    let now = now_ms();
    let mut out: SmallVec<[Probed; 4]> = SmallVec::new();
    let mut appends = Appends::new();
    match phase {
        Phase::Apply => {
            let parts: SmallVec<[(&quotaflow_core::state::KeyedStore, Probe<'_>); 4]> = idx
                .iter()
                .filter_map(|&i| Some((side(target_of(homes[i])?, aligned[i]), m.probes[i])))
                .collect();
            // In partition order, so that two checks and a snapshot never
            // wait on each other's gates in a circle. Only logged hits
            // need them (a snapshot must hold a hit's count and its
            // pending id together); without, a check never waits for a
            // snapshot (41.6 ms for a million keys, benchmarks.md §4).
            let logged = sync_hits == SyncHits::Logged;
            let gates: SmallVec<[_; 4]> = if logged {
                targets
                    .iter()
                    .filter_map(|(_, t)| t.as_ref().map(|t| t.counting()))
                    .collect()
            } else {
                SmallVec::new()
            };
            if gates.iter().any(Option::is_none) {
                // A partition is being handed back: counted nowhere here.
                let moving = idx.iter().map(|_| Err(OwnerUnavailable::Moving)).collect();
                return (moving, Appends::new());
            }
            let admitted = apply_across(&parts, now, cost, &mut out);
            // A check of cost 0 counts nothing: there is nothing to log.
            if admitted && cost > 0 && logged {
                for (home, t) in &targets {
                    let Some(t) = t else { continue };
                    let charges: Vec<Charge> = idx
                        .iter()
                        .zip(&out)
                        .filter(|(&i, p)| homes[i] == *home && p.outcome.verdict.allowed)
                        .filter_map(|(&i, _)| {
                            Some(Charge {
                                side: if aligned[i] {
                                    Side::Arrival
                                } else {
                                    Side::Home
                                },
                                limit: rules.limits.get(m.limits[i])?.name.clone(),
                                key: m.probes[i].key,
                            })
                        })
                        .collect();
                    if !charges.is_empty() {
                        appends.push((t.clone(), t.log_hit(now, cost, charges)));
                    }
                }
            }
            drop(gates);
            for t in targets.iter().filter_map(|(_, t)| t.as_ref()) {
                t.counted();
            }
        }
        Phase::Peek => {
            let mut one = SmallVec::new();
            for &i in idx {
                if let Some(t) = target_of(homes[i]) {
                    side(t, aligned[i]).peek(&[m.probes[i]], now, cost, &mut one);
                    out.extend(one.drain(..));
                }
            }
        }
    }
    (out.into_iter().map(Ok).collect(), appends)
}

/// Hits counted on partitions owned here, with their records to append to
/// the partitions' logs before they are answered.
type Appends = SmallVec<[(SyncTarget, SyncHit); 2]>;

/// Appends under way: per partition, the broker's acknowledgement to come.
type Appending = SmallVec<[(i32, tokio::sync::oneshot::Receiver<bool>); 2]>;

/// Start appending `appends` to their partitions' logs.
fn start_appends(appends: Appends) -> Appending {
    appends
        .into_iter()
        .map(|(t, hit)| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            t.append(&hit, move |ok| {
                let _ = tx.send(ok);
            });
            (t.partition(), rx)
        })
        .collect()
}

/// The partitions whose appends were not acknowledged by `deadline`: a
/// hit is answered only once its record is in the log (docs/group.md), so
/// their probes follow the failure mode (the hits stay counted).
async fn unappended(app: &AppState, appending: Appending, deadline: Instant) -> SmallVec<[i32; 2]> {
    let mut failed = SmallVec::new();
    for (partition, ack) in appending {
        let ok = matches!(
            tokio::time::timeout_at(deadline.into(), ack).await,
            Ok(Ok(true))
        );
        let outcome = if ok { "appended" } else { "append_failed" };
        app.metrics.sync_hits.with_label_values(&[outcome]).inc();
        if !ok {
            failed.push(partition);
        }
    }
    failed
}

fn run_phase(
    phase: Phase,
    store: &quotaflow_core::state::KeyedStore,
    probes: &[Probe<'_>],
    cost: u64,
    out: &mut SmallVec<[Probed; 4]>,
) {
    let now = now_ms();
    match phase {
        Phase::Apply => {
            store.apply(probes, now, cost, out);
        }
        Phase::Peek => {
            store.peek(probes, now, cost, out);
        }
    }
}

/// Every probe's outcome: its state's, or its failure mode's. `local`
/// limits whose home failed are decided on this instance's own state,
/// applied when `apply` (else only probed).
/// Shared with the Redis state mode (`api::decide`), whose failures carry
/// its own reasons.
pub(crate) fn settle<E>(
    app: &AppState,
    rules: &Rules,
    m: &Matched<'_>,
    outcomes: &[Result<Probed, E>],
    default: FailureMode,
    req: &Request,
    apply: bool,
) -> SmallVec<[Probed; 4]> {
    let mode = |i: usize| {
        rules
            .limits
            .get(m.limits[i])
            .and_then(|l| l.failure_mode)
            .unwrap_or(default)
    };
    let local: SmallVec<[usize; 4]> = (0..outcomes.len())
        .filter(|&i| outcomes[i].is_err() && mode(i) == FailureMode::Local)
        .collect();
    let mut locally = SmallVec::new();
    if !local.is_empty() {
        let probes: SmallVec<[Probe<'_>; 4]> = local.iter().map(|&i| m.probes[i]).collect();
        let store = app.limiter.store();
        let phase = if apply { Phase::Apply } else { Phase::Peek };
        run_phase(phase, store, &probes, req.cost, &mut locally);
    }
    outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| match o {
            Ok(p) => *p,
            Err(_) => match local.iter().position(|&l| l == i) {
                Some(at) => locally[at],
                None => by_failure_mode(rules, m.limits[i], mode(i)),
            },
        })
        .collect()
}

fn finish(
    app: &AppState,
    rules: &Rules,
    m: &Matched<'_>,
    outcomes: &Outcomes,
    probed: SmallVec<[Probed; 4]>,
) -> (quotaflow_core::limiter::Decision, Option<&'static str>) {
    let why = outcomes.iter().find_map(|o| o.err());
    if let Some(why) = why {
        app.metrics
            .redis
            .degraded
            .with_label_values(&[why.reason()])
            .inc();
    }
    (
        m.decision(rules.version, &probed),
        why.map(OwnerUnavailable::reason),
    )
}

/// A limit's answer without its state: its failure mode's (`open` or
/// `closed`; `local` is decided on the instance's own state instead).
pub fn by_failure_mode(rules: &Rules, limit: usize, mode: FailureMode) -> Probed {
    let quota = rules.limits.get(limit).map_or(0, |l| l.shape.quota);
    let open = mode != FailureMode::Closed;
    let verdict = Verdict {
        allowed: open,
        limit: quota,
        // Unknown: nothing promised either way.
        remaining: 0,
        reset_ms: 0,
        retry_after_ms: if open { 0 } else { CLOSED_RETRY_MS },
        clock_ms: 0,
    };
    // Neither the start nor the end of a breach: no breach log lines for
    // answers the state did not give.
    Probed::remote(verdict, u32::from(!open))
}

/// What a limit refusing by `failure_mode = "closed"` asks clients to wait:
/// a guess at how long the owner takes to come back.
pub const CLOSED_RETRY_MS: u64 = 1_000;

/// The internal listener's routes.
pub fn router(app: AppState, cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route(DECIDE_PATH, post(decide_handler))
        .with_state((app, cluster))
}

async fn decide_handler(
    State((app, cluster)): State<(AppState, Arc<Cluster>)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorized = headers.get(TOKEN_HEADER).is_some_and(|t| {
        subtle::ConstantTimeEq::ct_eq(t.as_bytes(), cluster.token.as_bytes()).into()
    });
    if !authorized {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Ok(ask) = serde_json::from_slice::<Ask>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(reply) = cluster.answer(&app, ask).await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&reply).unwrap_or_default(),
    )
        .into_response()
}
