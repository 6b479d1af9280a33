//! One partition of the requests topic: per-key state, clock-skew rule,
//! block/unblock decisions, breach-alert windows and dead letters.
//!
//! Everything here is a deterministic function of the partition's records
//! (payload, offset, broker timestamp) in order, so replaying from a
//! checkpoint yields the same state and the same outputs with the same ids.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::HashMap;

use super::alerts::{
    dim_value, AlertAgg, DimValues, OpenAlert, MAX_OFFENDERS, OFFENDER_DIMENSIONS, TOP_OFFENDERS,
};
use super::checkpoint::{Applied, Checkpoint, HomeState};
use super::records::{
    Action, BreachAlert, DecisionRecord, KeyPart, Offender, RequestEvent, Severity,
};
use super::repartition::{
    Body, EncodedRequest, Repartitioned, RequestRef, RoutedRecord, RoutedShape,
};
use super::routing::Routing;
use crate::fingerprint::Fingerprinter;
use crate::limiter::{BreachEvent, Decision, Limiter};
use crate::rules::{Dimension, Limit, Request, Rules};
use crate::state::{KeyId, KeyedStore};

/// What a partition processor needs to know beyond the rules.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Name of the input topic, part of every output id.
    pub topic: String,
    /// How far ahead of the broker's timestamp a gateway's clock may run.
    pub max_clock_skew_ms: u64,
    /// Length of breach-alert windows.
    pub alert_window_ms: u64,
    /// Refusals of one key in one window below which no alert is sent.
    pub alert_min_refused: u64,
    /// Refusals at or above which an alert is `CRITICAL`.
    pub alert_critical_refused: u64,
    /// Emit an ALLOW/DENY decision for every event, not only block/unblock.
    pub every_event: bool,
    /// Event time between expiry sweeps of idle keys.
    pub sweep_interval_ms: u64,
    /// [`Fingerprinter::check_value`] of the secret the state's key ids are
    /// made with: written into checkpoints, compared on restore.
    pub key_check: u64,
    /// Where each limit's key is counted. `None`: every limit is counted
    /// where the event arrives (the backtest, a shadow config). `Some`:
    /// unaligned limits are routed to their key's home partition as
    /// [`Output::Repartition`] records, and counted there by the home side
    /// ([`PartitionProcessor::home`]).
    pub routing: Option<Routing>,
}

/// One input record as the processor sees it.
#[derive(Debug, Clone, Copy)]
pub struct InputRecord<'a> {
    pub offset: i64,
    /// The broker's (log-append or create) timestamp, if the record has one.
    pub broker_ts_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// Something to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Decision(DecisionRecord),
    Alert(BreachAlert),
    /// An input that could not be processed, with the reason.
    DeadLetter {
        source_offset: i64,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        reason: String,
    },
    /// An event for the home partition `home` of its unaligned key shapes
    /// homed there (to the repartition topic's partition `home`).
    Repartition {
        home: i32,
        record: Repartitioned,
    },
}

/// What the home side did with the key shapes of one repartition record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routed {
    /// Shapes counted.
    pub applied: u64,
    /// Shapes already applied (their source replayed): skipped.
    pub duplicate: u64,
    /// Shapes whose event could not be read, skipped, and why (the arrival
    /// partition read it, so only a foreign writer to the repartition topic
    /// gets here).
    pub invalid: u64,
    pub reason: Option<String>,
}

/// The request of a repartition record, as the home's caller has it.
#[derive(Debug, Clone, Copy)]
pub enum RoutedEvent<'a> {
    /// A record carrying the validated request ([`super::repartition::BodyRef::Request`]).
    Request(&'a RequestRef<'a>),
    /// A record carrying the payload ([`super::repartition::BodyRef::Payload`], the first
    /// format): the payload decoded, or why it could not be.
    Decoded(Result<&'a RequestEvent, &'a str>),
}

/// Where an output comes from, for its id and source fields: the arrival
/// record, or, on the home side, the source event of the repartition
/// record and its key shape (so a replay, on either side, yields the same
/// ids: they never depend on repartition-topic offsets).
struct Origin<'a> {
    partition: i32,
    offset: i64,
    shape: Option<&'a [Dimension]>,
}

/// The state and logic of one owned partition.
pub struct PartitionProcessor {
    cfg: Arc<ProcessorConfig>,
    partition: i32,
    store: Arc<KeyedStore>,
    /// window start -> state key -> aggregate; windows close in order,
    /// and a window's alerts are emitted sorted by rendered key, so emission
    /// order is deterministic. Keyed by the state key's id, which the
    /// decision carries, so counting a refusal of a known key renders nothing.
    alerts: BTreeMap<u64, HashMap<KeyId, OpenAlert>>,
    /// Hashes offenders for [`OpenAlert::offender_hashes`].
    offender_hasher: hashbrown::DefaultHashBuilder,
    /// The offender values of the record being processed, each made once
    /// however many limits the record breaks.
    dims: DimValues,
    /// The request of the record being processed, reused for every record.
    scratch_req: Request,
    watermark_ms: u64,
    /// Watermark of the last expiry sweep: every key whose state expired by
    /// then was dropped, so no event is applied earlier than this (a late
    /// event for a dropped key must not reopen its old window).
    horizon_ms: u64,
    next_offset: i64,
    expired: u64,
    /// Keys of the restored checkpoint left out because their ids were made
    /// under another secret.
    foreign_keys: usize,
    /// The kind part of decision ids: `decision`, or `shadow-decision` for
    /// a shadow config's processor, so the two are never taken for each other.
    decision_kind: &'static str,
    /// On a home side, per source partition, the last (offset, seq)
    /// applied; `None` on an arrival side.
    applied: Option<BTreeMap<i32, (i64, u16)>>,
    /// Scratch for home partitions' keys.
    route_buf: Vec<u8>,
    /// The rule set this processor decides with, when pinned (a stream
    /// partition: see [`PartitionProcessor::pin`]); `None`: the limiter's
    /// running rules at each record (the backtest, a shadow config).
    pinned: Option<Arc<Rules>>,
}

impl PartitionProcessor {
    /// A processor starting from `restored` (or empty at offset 0).
    pub fn new(
        cfg: Arc<ProcessorConfig>,
        partition: i32,
        store: Arc<KeyedStore>,
        restored: Option<Checkpoint>,
    ) -> Self {
        let mut p = Self {
            cfg,
            partition,
            store,
            alerts: BTreeMap::new(),
            offender_hasher: hashbrown::DefaultHashBuilder::default(),
            dims: DimValues::default(),
            scratch_req: Request::default(),
            watermark_ms: 0,
            horizon_ms: 0,
            next_offset: 0,
            expired: 0,
            foreign_keys: 0,
            decision_kind: "decision",
            applied: None,
            route_buf: Vec::new(),
            pinned: None,
        };
        if let Some(cp) = restored {
            p.next_offset = cp.next_offset;
            p.watermark_ms = cp.watermark_ms;
            p.horizon_ms = cp.horizon_ms;
            if cp.key_check == p.cfg.key_check {
                p.store.import(cp.keys);
            } else {
                // Ids made under another secret would never match a key
                // again: importing them would only hold memory until expiry.
                p.foreign_keys = cp.keys.len();
                p.store.import(Vec::new());
            }
            for (start, key, agg) in cp.alerts {
                let open = OpenAlert::new(agg, &p.offender_hasher);
                p.alerts.entry(start).or_default().insert(key, open);
            }
        } else {
            p.store.import(Vec::new());
        }
        p
    }

    /// The home side of `partition`: it counts the repartition records
    /// other partitions (and this one) route here, against the unaligned
    /// limits, with its own state and position, restored from `restored`'s
    /// home part. Only the arrival side's records move the arrival side and
    /// only repartition records move this one, so each is a deterministic
    /// function of its own input whatever the two inputs' interleaving.
    pub fn home(
        cfg: Arc<ProcessorConfig>,
        partition: i32,
        store: Arc<KeyedStore>,
        restored: Option<&Checkpoint>,
    ) -> Self {
        let as_checkpoint = restored.map(|cp| Checkpoint {
            next_offset: cp.home.next_offset,
            config_version: cp.config_version,
            key_check: cp.key_check,
            watermark_ms: cp.home.watermark_ms,
            horizon_ms: cp.home.horizon_ms,
            keys: cp.home.keys.clone(),
            alerts: cp.home.alerts.clone(),
            home: HomeState::default(),
            pending_hits: Vec::new(),
        });
        let mut p = Self::new(cfg, partition, store, as_checkpoint);
        p.applied = Some(
            restored
                .map(|cp| {
                    cp.home
                        .applied
                        .iter()
                        .map(|a| (a.source_partition, (a.source_offset, a.seq)))
                        .collect()
                })
                .unwrap_or_default(),
        );
        p
    }

    /// The home side's part of a checkpoint.
    pub fn home_state(&self) -> HomeState {
        let cp = self.checkpoint(0);
        HomeState {
            next_offset: cp.next_offset,
            applied: self
                .applied
                .iter()
                .flatten()
                .map(|(&source_partition, &(source_offset, seq))| Applied {
                    source_partition,
                    source_offset,
                    seq,
                })
                .collect(),
            watermark_ms: cp.watermark_ms,
            horizon_ms: cp.horizon_ms,
            keys: cp.keys,
            alerts: cp.alerts,
        }
    }

    /// This processor as a shadow config's: its decision ids read
    /// `topic:partition:offset:shadow-decision:n`.
    pub fn shadow(mut self) -> Self {
        self.decision_kind = "shadow-decision";
        self
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Decide every record from now on with `rules`, whatever the limiter
    /// runs. A replay decides exactly as the first run only if it uses the
    /// same version for the same records: the stream worker pins the
    /// version of the checkpoint it resumed from, and moves to a newer one
    /// only at a checkpoint that records it (docs/stream.md, "Config
    /// versions and replays").
    pub fn pin(&mut self, rules: Arc<Rules>) {
        self.pinned = Some(rules);
    }

    /// The version pinned, if any.
    pub fn pinned_version(&self) -> Option<u64> {
        self.pinned.as_ref().map(|r| r.version)
    }

    /// The rules the next record is decided with.
    fn deciding_rules(&self, limiter: &Limiter) -> Arc<Rules> {
        match &self.pinned {
            Some(rules) => rules.clone(),
            None => limiter.rules(),
        }
    }

    /// The offset of the next event to process (where a restart resumes).
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    pub fn store(&self) -> &Arc<KeyedStore> {
        &self.store
    }

    pub fn watermark_ms(&self) -> u64 {
        self.watermark_ms
    }

    /// Everything needed to resume here.
    pub fn checkpoint(&self, config_version: u64) -> Checkpoint {
        let mut alerts: Vec<(u64, KeyId, AlertAgg)> = self
            .alerts
            .iter()
            .flat_map(|(&start, m)| m.iter().map(move |(&k, a)| (start, k, a.agg.clone())))
            .collect();
        alerts.sort_unstable_by(|a, b| (a.0, &a.2.key, a.1).cmp(&(b.0, &b.2.key, b.1)));
        Checkpoint {
            next_offset: self.next_offset,
            config_version,
            key_check: self.cfg.key_check,
            watermark_ms: self.watermark_ms,
            horizon_ms: self.horizon_ms,
            keys: self.store.export(),
            alerts,
            home: HomeState::default(),
            pending_hits: Vec::new(),
        }
    }

    /// How many keys of the restored checkpoint were left out because it was
    /// written under another `security.fingerprint_key`: their counts restart
    /// from zero.
    pub fn foreign_keys(&self) -> usize {
        self.foreign_keys
    }

    /// Keys dropped by expiry sweeps since the last call (for metrics).
    pub fn take_expired(&mut self) -> u64 {
        std::mem::take(&mut self.expired)
    }

    /// Process one record: `event` is its decoded payload or why it could not
    /// be decoded. Outputs are appended to `out` in publication order.
    pub fn process(
        &mut self,
        limiter: &Limiter,
        rec: InputRecord<'_>,
        event: Result<&RequestEvent, String>,
        out: &mut Vec<Output>,
    ) {
        self.process_observed(limiter, rec, event, out, |_, _, _| {});
    }

    /// As [`PartitionProcessor::process`], also handing `observe` the
    /// decision of a decided event, with the rules it was made under and
    /// the event time it was applied at: the backtest compares two configs
    /// event by event. Dead letters and skipped records are not decided.
    pub fn process_observed(
        &mut self,
        limiter: &Limiter,
        rec: InputRecord<'_>,
        event: Result<&RequestEvent, String>,
        out: &mut Vec<Output>,
        observe: impl FnOnce(&Rules, &Decision, u64),
    ) {
        if rec.offset < self.next_offset {
            // Already reflected in the state (a replayed record): skip it.
            return;
        }
        self.next_offset = rec.offset + 1;
        let dead = |reason: String| Output::DeadLetter {
            source_offset: rec.offset,
            key: rec.key.map(<[u8]>::to_vec),
            payload: rec.payload.to_vec(),
            reason,
        };
        let event = match event {
            Ok(e) => e,
            Err(reason) => return out.push(dead(reason)),
        };
        let timestamp_ms = event.timestamp_ms;
        let mut req = std::mem::take(&mut self.scratch_req);
        let invalid = match event.request_into(&mut req) {
            Err(reason) => Some(format!("invalid event: {reason}")),
            Ok(()) if timestamp_ms < 0 => Some(format!("timestamp_ms {timestamp_ms} is negative")),
            Ok(()) => None,
        };
        if let Some(reason) = invalid {
            self.scratch_req = req;
            return out.push(dead(reason));
        }
        let rules = self.deciding_rules(limiter);
        req.canonicalize_path(rules.path_case_sensitive);
        let now = self
            .event_time(timestamp_ms, rec.broker_ts_ms)
            .max(self.horizon_ms);
        self.watermark_ms = self.watermark_ms.max(now);
        let origin = Origin {
            partition: self.partition,
            offset: rec.offset,
            shape: None,
        };
        self.close_alert_windows(&origin, out);
        self.sweep_if_due();

        let store = self.store.clone();
        let fp = limiter.fingerprinter();
        let cfg = self.cfg.clone();
        match &cfg.routing {
            None => limiter.check_with_only(
                &store,
                &rules,
                &req,
                now,
                |_| true,
                |rules, d| {
                    self.decisions(rules, d, &req, fp, now, &origin, out);
                    self.count_refusals(rules, d, &req, fp, now);
                    observe(rules, d, now);
                },
            ),
            Some(routing) => limiter.check_with_only(
                &store,
                &rules,
                &req,
                now,
                |l| routing.is_aligned(l),
                |rules, d| {
                    self.decisions(rules, d, &req, fp, now, &origin, out);
                    self.count_refusals(rules, d, &req, fp, now);
                    observe(rules, d, now);
                    if !d.whitelisted {
                        let path = event.path.as_deref();
                        self.route(rules, routing, &req, path, fp, rec, now, out);
                    }
                },
            ),
        }
        self.scratch_req = req;
    }

    /// Send the event to the home partition of each key shape of the
    /// unaligned limits it falls under, numbered in the rules' order (every
    /// limit of a shape shares its home), at the event time applied here:
    /// one record per home, holding every shape homed there and the
    /// validated request (`path` as the event sent it), so the home
    /// neither decodes nor validates the event again.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &mut self,
        rules: &Rules,
        routing: &Routing,
        req: &Request,
        path: Option<&str>,
        fp: &Fingerprinter,
        rec: InputRecord<'_>,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        let mut shapes: smallvec::SmallVec<[&[Dimension]; 4]> = smallvec::SmallVec::new();
        for limit in &rules.limits {
            if !routing.is_aligned(limit)
                && limit.applies(req)
                && !shapes.contains(&limit.key.as_slice())
            {
                shapes.push(&limit.key);
            }
        }
        if shapes.is_empty() {
            return;
        }
        let mut homes: smallvec::SmallVec<[(i32, smallvec::SmallVec<[RoutedShape; 2]>); 4]> =
            smallvec::SmallVec::new();
        for (seq, shape) in shapes.into_iter().enumerate() {
            let home = routing.shape_home(shape, req, fp, &mut self.route_buf);
            let shape = RoutedShape {
                // At most one per distinct key shape: far below u16::MAX.
                seq: u16::try_from(seq).unwrap_or(u16::MAX),
                dims: shape.iter().copied().collect(),
            };
            match homes.iter_mut().find(|(h, _)| *h == home) {
                Some((_, of_home)) => of_home.push(shape),
                None => homes.push((home, smallvec::smallvec![shape])),
            }
        }
        let body = EncodedRequest::new(req, path);
        for (home, shapes) in homes {
            out.push(Output::Repartition {
                home,
                record: Repartitioned {
                    source_partition: self.partition,
                    source_offset: rec.offset,
                    event_time_ms: now,
                    shapes,
                    body: Body::Request(body.clone()),
                },
            });
        }
    }

    /// Take the repartition-topic message at `offset` (one record or a
    /// batch): `false` if it is below the position restored, already in the
    /// state (skip its records); else the position moves past it and each
    /// of its records goes to [`PartitionProcessor::process_routed`].
    pub fn start_routed(&mut self, offset: i64) -> bool {
        if offset < self.next_offset {
            return false;
        }
        self.next_offset = offset.saturating_add(1);
        true
    }

    /// Count one repartition record on this home side: each of its key
    /// shapes not applied yet, in order, against the unaligned limits of
    /// that shape, at the event time the arrival partition applied (never
    /// before this side's sweep horizon), exactly as if each shape had come
    /// in a record of its own (the first format): same order, same outputs,
    /// same ids. `event` is its request.
    pub fn process_routed(
        &mut self,
        limiter: &Limiter,
        r: &RoutedRecord<'_>,
        event: RoutedEvent<'_>,
        out: &mut Vec<Output>,
    ) -> Routed {
        let mut outcome = Routed::default();
        let applied = self.applied.get_or_insert_with(BTreeMap::new);
        let last = applied.get(&r.source_partition).copied();
        let mut fresh: smallvec::SmallVec<[&RoutedShape; 2]> = smallvec::SmallVec::new();
        for s in &r.shapes {
            if last.is_some_and(|m| (r.source_offset, s.seq) <= m) {
                outcome.duplicate += 1;
            } else {
                fresh.push(s);
            }
        }
        let Some(mark) = fresh.iter().map(|s| (r.source_offset, s.seq)).max() else {
            return outcome;
        };
        applied.insert(r.source_partition, mark);
        let mut req = std::mem::take(&mut self.scratch_req);
        let read = match event {
            RoutedEvent::Request(q) => {
                q.fill(&mut req);
                Ok(())
            }
            RoutedEvent::Decoded(Ok(e)) => e
                .request_into(&mut req)
                .map_err(|reason| format!("invalid event: {reason}")),
            RoutedEvent::Decoded(Err(reason)) => Err(reason.to_owned()),
        };
        if let Err(reason) = read {
            self.scratch_req = req;
            outcome.invalid = fresh.len() as u64;
            outcome.reason = Some(reason);
            return outcome;
        }
        let rules = self.deciding_rules(limiter);
        req.canonicalize_path(rules.path_case_sensitive);
        let store = self.store.clone();
        let fp = limiter.fingerprinter();
        let cfg = self.cfg.clone();
        for s in fresh {
            let now = r.event_time_ms.max(self.horizon_ms);
            self.watermark_ms = self.watermark_ms.max(now);
            let origin = Origin {
                partition: r.source_partition,
                offset: r.source_offset,
                shape: Some(&s.dims),
            };
            self.close_alert_windows(&origin, out);
            self.sweep_if_due();
            let unaligned = |l: &Limit| {
                l.key[..] == s.dims[..] && cfg.routing.as_ref().is_none_or(|rt| !rt.is_aligned(l))
            };
            limiter.check_with_only(&store, &rules, &req, now, unaligned, |rules, d| {
                self.decisions(rules, d, &req, fp, now, &origin, out);
                self.count_refusals(rules, d, &req, fp, now);
            });
            outcome.applied += 1;
        }
        self.scratch_req = req;
        outcome
    }

    /// Expiry runs at event-time boundaries, not on a wall-clock timer, so
    /// which keys exist at each record (and so every breach edge) is a
    /// function of the records alone and replays identically.
    fn sweep_if_due(&mut self) {
        let every = self.cfg.sweep_interval_ms.max(1);
        if self.watermark_ms / every > self.horizon_ms / every {
            self.horizon_ms = self.watermark_ms;
            self.expired += self.store.sweep(self.horizon_ms) as u64;
        }
    }

    /// Clock-skew rule: a gateway's timestamp may not run more than
    /// `max_clock_skew` ahead of the broker's, so a fast clock cannot mint
    /// tokens; late timestamps are applied at the key's own time by the
    /// algorithms.
    fn event_time(&self, timestamp_ms: i64, broker_ts_ms: Option<i64>) -> u64 {
        let ts = timestamp_ms.max(0) as u64;
        match broker_ts_ms {
            Some(b) if b >= 0 => ts.min((b as u64).saturating_add(self.cfg.max_clock_skew_ms)),
            _ => ts,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn decisions(
        &self,
        rules: &Rules,
        d: &Decision,
        req: &Request,
        fp: &Fingerprinter,
        now: u64,
        origin: &Origin<'_>,
        out: &mut Vec<Output>,
    ) {
        let mut n = 0;
        let offset = origin.offset;
        let mut push = |action: Action, limit: &Limit, until: Option<u64>, reason: String| {
            let dims = dimensions(limit, req, fp);
            out.push(Output::Decision(DecisionRecord {
                decision_id: output_id(&self.cfg.topic, origin, self.decision_kind, n),
                action,
                limit: limit.name.clone(),
                key: render_key(&limit.name, &dims),
                dimensions: dims,
                until_ms: until.map(|u| u as i64),
                reason,
                quota: limit.shape.quota as i64,
                event_time_ms: now as i64,
                source_topic: self.cfg.topic.clone(),
                source_partition: origin.partition,
                source_offset: offset,
                config_version: d.version as i64,
            }));
            n += 1;
        };
        for o in d.outcomes.iter().filter(|o| !o.shadow) {
            let Some(limit) = rules.limits.get(o.limit) else {
                continue;
            };
            match o.event {
                Some(BreachEvent::Started) => push(
                    Action::Block,
                    limit,
                    Some(o.verdict.clock_ms + o.verdict.retry_after_ms),
                    format!(
                        "over limit `{}`: {} per {}s",
                        limit.name, limit.shape.quota, limit.shape.window_secs
                    ),
                ),
                Some(BreachEvent::Ended { refused }) => push(
                    Action::Unblock,
                    limit,
                    None,
                    format!(
                        "within limit `{}` again after {refused} refused",
                        limit.name
                    ),
                ),
                _ => {}
            }
        }
        if self.cfg.every_event {
            if let Some(o) = d.binding() {
                if let Some(limit) = rules.limits.get(o.limit) {
                    if d.allowed {
                        push(Action::Allow, limit, None, "allowed".into());
                    } else {
                        push(
                            Action::Deny,
                            limit,
                            Some(o.verdict.clock_ms + o.verdict.retry_after_ms),
                            format!("over limit `{}`", limit.name),
                        );
                    }
                }
            }
        }
    }

    fn count_refusals(
        &mut self,
        rules: &Rules,
        d: &Decision,
        req: &Request,
        fp: &Fingerprinter,
        now: u64,
    ) {
        let w = self.cfg.alert_window_ms.max(1);
        let start = self.watermark_ms - self.watermark_ms % w;
        self.dims.clear();
        for o in d.outcomes.iter().filter(|o| !o.verdict.allowed) {
            let Some(limit) = rules.limits.get(o.limit) else {
                continue;
            };
            let open = self
                .alerts
                .entry(start)
                .or_default()
                .entry(o.key)
                .or_insert_with(|| {
                    let dimensions = dimensions(limit, req, fp);
                    OpenAlert {
                        agg: AlertAgg {
                            key: render_key(&limit.name, &dimensions),
                            limit: limit.name.clone(),
                            shadow: o.shadow,
                            dimensions,
                            refused: 0,
                            refused_cost: 0,
                            first_seen_ms: now,
                            last_seen_ms: now,
                            offenders: Vec::new(),
                        },
                        offender_hashes: Vec::new(),
                    }
                });
            let agg = &mut open.agg;
            agg.refused += 1;
            agg.refused_cost += req.cost;
            agg.first_seen_ms = agg.first_seen_ms.min(now);
            agg.last_seen_ms = agg.last_seen_ms.max(now);
            for (i, dim) in OFFENDER_DIMENSIONS.into_iter().enumerate() {
                if limit.key.contains(&dim) || !req.has(dim) {
                    continue;
                }
                let (value, h) = self.dims.get(i, req, fp, &self.offender_hasher);
                // The hash is the offender's identity: the stored value sits
                // elsewhere on the heap, and comparing it cost a cache miss
                // per refusal and dimension. Two of an alert's at most
                // `MAX_OFFENDERS` values share a hash of (dimension, value)
                // with odds of about 2⁻⁵⁵, under a seed that is random per
                // processor and never shown, so nobody can aim for it; the
                // cost would be two offenders counted as one.
                let known = open.offender_hashes.iter().position(|&oh| oh == h);
                match known {
                    Some(i) => agg.offenders[i].2 += 1,
                    None if agg.offenders.len() < MAX_OFFENDERS => {
                        agg.offenders.push((dim, value.to_owned(), 1));
                        open.offender_hashes.push(h);
                    }
                    None => {}
                }
            }
        }
    }

    /// Emit the alerts of every window that ended at or before the watermark.
    fn close_alert_windows(&mut self, origin: &Origin<'_>, out: &mut Vec<Output>) {
        let w = self.cfg.alert_window_ms.max(1);
        let mut n = 0;
        while let Some(entry) = self.alerts.first_entry() {
            let start = *entry.key();
            if start + w > self.watermark_ms {
                break;
            }
            let mut window: Vec<(KeyId, AlertAgg)> = entry
                .remove()
                .into_iter()
                .map(|(id, o)| (id, o.agg))
                .collect();
            // By id within a rendered key, so that merging below (and so
            // which offenders fit) does not depend on hash-map order.
            window.sort_unstable_by(|a, b| (&a.1.key, a.0).cmp(&(&b.1.key, b.0)));
            // Two state keys render alike when a limit's algorithm changed
            // within the window, or after a restore under another secret:
            // one key, one alert.
            window.dedup_by(|later, kept| {
                let same = later.1.key == kept.1.key;
                if same {
                    kept.1.absorb(std::mem::take(&mut later.1));
                }
                same
            });
            for (_, agg) in window {
                let key = agg.key;
                if agg.refused < self.cfg.alert_min_refused {
                    continue;
                }
                let mut offenders = agg.offenders;
                offenders.sort_by(|a, b| {
                    b.2.cmp(&a.2)
                        .then_with(|| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)))
                });
                out.push(Output::Alert(BreachAlert {
                    alert_id: output_id(&self.cfg.topic, origin, "alert", n),
                    limit: agg.limit,
                    key,
                    dimensions: agg.dimensions,
                    shadow: agg.shadow,
                    window_start_ms: start as i64,
                    window_end_ms: (start + w) as i64,
                    refused: agg.refused as i64,
                    refused_cost: agg.refused_cost as i64,
                    first_seen_ms: agg.first_seen_ms as i64,
                    last_seen_ms: agg.last_seen_ms as i64,
                    severity: if agg.refused >= self.cfg.alert_critical_refused {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                    top_offenders: offenders
                        .into_iter()
                        .take(TOP_OFFENDERS)
                        .map(|(dimension, value, count)| Offender {
                            dimension: dimension.as_str().to_owned(),
                            value,
                            count: count as i64,
                        })
                        .collect(),
                    source_topic: self.cfg.topic.clone(),
                    source_partition: origin.partition,
                    source_offset: origin.offset,
                }));
                n += 1;
            }
        }
    }
}

/// An output's deterministic id: `topic:partition:offset:kind:n` for the
/// arrival side; on the home side `topic:partition:offset:kind/shape:n`,
/// named by the source event and the shape it was routed for.
fn output_id(topic: &str, origin: &Origin<'_>, kind: &str, n: usize) -> String {
    match origin.shape {
        None => format!("{topic}:{}:{}:{kind}:{n}", origin.partition, origin.offset),
        Some(shape) => format!(
            "{topic}:{}:{}:{kind}/{}:{n}",
            origin.partition,
            origin.offset,
            Repartitioned::shape_name(shape)
        ),
    }
}

/// The limit's key dimensions for `req`, API keys as fingerprints.
pub fn dimensions(limit: &Limit, req: &Request, fp: &Fingerprinter) -> Vec<KeyPart> {
    limit
        .key
        .iter()
        .map(|&d| KeyPart {
            name: d.as_str().to_owned(),
            value: dim_value(req, d, fp),
        })
        .collect()
}

/// `limit/dim=value/...`: the record key of decisions and alerts.
pub fn render_key(limit: &str, dims: &[KeyPart]) -> String {
    let mut key = limit.to_owned();
    for d in dims {
        key.push('/');
        key.push_str(&d.name);
        key.push('=');
        key.push_str(&d.value);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::checkpoint::{CheckpointStore, MemoryCheckpoints};
    use crate::rules::RulesDoc;

    fn limiter() -> Limiter {
        let doc = RulesDoc::from_json(
            br#"{"limits": [
                {"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 2, "window": "10s"},
                {"name": "per_key", "key": ["api_key"], "capacity": 100, "refill_per_sec": 1, "shadow": true}
            ]}"#,
        )
        .unwrap();
        Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap()
    }

    fn cfg() -> Arc<ProcessorConfig> {
        Arc::new(ProcessorConfig {
            topic: "requests".into(),
            max_clock_skew_ms: 1_000,
            alert_window_ms: 60_000,
            alert_min_refused: 2,
            alert_critical_refused: 3,
            every_event: false,
            sweep_interval_ms: 3_600_000,
            key_check: 1,
            routing: None,
        })
    }

    fn event(user: &str, ts: i64) -> RequestEvent {
        RequestEvent {
            event_id: format!("{user}-{ts}"),
            timestamp_ms: ts,
            user_id: Some(user.into()),
            api_key: Some("sk_secret".into()),
            client_ip: Some("192.0.2.1".into()),
            method: Some("GET".into()),
            path: Some("/x".into()),
            cost: 1,
            gateway_id: Some("gw".into()),
        }
    }

    fn feed(
        p: &mut PartitionProcessor,
        l: &Limiter,
        offset: i64,
        ts: i64,
        broker: i64,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let rec = InputRecord {
            offset,
            broker_ts_ms: Some(broker),
            key: None,
            payload: b"",
        };
        p.process(l, rec, Ok(&event("alice", ts)), &mut out);
        out
    }

    fn alerts(out: &[Output]) -> Vec<&BreachAlert> {
        out.iter()
            .filter_map(|o| match o {
                Output::Alert(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn block_then_unblock_with_deterministic_ids() {
        let l = limiter();
        let mut p = PartitionProcessor::new(cfg(), 3, Arc::new(KeyedStore::new(1)), None);
        assert!(feed(&mut p, &l, 0, 1_000, 1_000).is_empty());
        assert!(feed(&mut p, &l, 1, 1_001, 1_001).is_empty());
        let out = feed(&mut p, &l, 2, 1_002, 1_002);
        let Some(Output::Decision(block)) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(block.action, Action::Block);
        assert_eq!(block.decision_id, "requests:3:2:decision:0");
        assert_eq!(block.key, "per_user/user_id=alice");
        assert_eq!(block.until_ms, Some(10_000));
        // Still blocked: no new decision per refused event.
        assert!(feed(&mut p, &l, 3, 5_000, 5_000).is_empty());
        let out = feed(&mut p, &l, 4, 10_000, 10_000);
        let Some(Output::Decision(unblock)) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(unblock.action, Action::Unblock);
        assert_eq!(unblock.source_offset, 4);
    }

    /// A shadow config's processor decides the same way; only its ids say
    /// what it is.
    #[test]
    fn a_shadow_processor_names_its_decisions_apart() {
        let l = limiter();
        let mut p = PartitionProcessor::new(cfg(), 3, Arc::new(KeyedStore::new(1)), None).shadow();
        let out: Vec<Output> = (0..3)
            .flat_map(|i| feed(&mut p, &l, i, 1_000 + i, 1_000 + i))
            .collect();
        let [Output::Decision(block)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(block.decision_id, "requests:3:2:shadow-decision:0");
        assert_eq!(block.action, Action::Block);
    }

    /// The stream matches and keys canonical paths as `/check` does: two
    /// spellings of one endpoint are one key.
    #[test]
    fn events_count_against_their_canonical_path() {
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_path", "key": ["path"], "algorithm": "fixed_window", "limit": 1, "window": "10s", "match": {"path": "/Login/"}}]}"#,
        )
        .unwrap();
        let l = Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap();
        let mut p = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let mut out = Vec::new();
        for (offset, path) in ["/LOGIN", "//login/"].into_iter().enumerate() {
            let e = RequestEvent {
                path: Some(path.into()),
                ..event("alice", 1_000)
            };
            let rec = InputRecord {
                offset: offset as i64,
                broker_ts_ms: Some(1_000),
                key: None,
                payload: b"",
            };
            p.process(&l, rec, Ok(&e), &mut out);
        }
        let Some(Output::Decision(block)) = out.first() else {
            panic!("the second spelling is refused: {out:?}")
        };
        assert_eq!(block.key, "per_path/path=/login");
    }

    #[test]
    fn a_fast_gateway_clock_cannot_refill_early() {
        let l = limiter();
        let mut p = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        feed(&mut p, &l, 0, 1_000, 1_000);
        feed(&mut p, &l, 1, 1_000, 1_000);
        // Ten minutes fast: clamped to broker time + 1 s, still the same window.
        let out = feed(&mut p, &l, 2, 601_000, 1_100);
        assert!(
            matches!(out.first(), Some(Output::Decision(d)) if d.action == Action::Block),
            "{out:?}"
        );
    }

    #[test]
    fn malformed_events_become_dead_letters_and_processing_continues() {
        let l = limiter();
        let mut p = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let mut out = Vec::new();
        let rec = InputRecord {
            offset: 7,
            broker_ts_ms: Some(1),
            key: Some(b"k"),
            payload: b"\x00garbage",
        };
        p.process(&l, rec, Err("truncated record".into()), &mut out);
        let mut bad = event("bob", 5);
        bad.client_ip = Some("not-an-ip".into());
        p.process(&l, InputRecord { offset: 8, ..rec }, Ok(&bad), &mut out);
        match &out[..] {
            [Output::DeadLetter {
                source_offset: 7,
                reason: r1,
                payload,
                ..
            }, Output::DeadLetter {
                source_offset: 8,
                reason: r2,
                ..
            }] => {
                assert_eq!(r1, "truncated record");
                assert_eq!(payload, b"\x00garbage");
                assert!(r2.contains("client_ip"), "{r2}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.next_offset(), 9);
    }

    /// An event with only `method` and `path` counts against endpoint and
    /// global limits as a `/check` would; only one with none of the five
    /// request fields is a dead letter (docs/stream.md, "Dead letters").
    #[test]
    fn an_event_without_identity_counts_and_one_without_any_field_is_a_dead_letter() {
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_path", "key": ["path"], "algorithm": "fixed_window", "limit": 1, "window": "10s"}]}"#,
        )
        .unwrap();
        let l = Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap();
        let mut p = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let anonymous = RequestEvent {
            user_id: None,
            api_key: None,
            client_ip: None,
            ..event("-", 1_000)
        };
        let rec = |offset| InputRecord {
            offset,
            broker_ts_ms: Some(1_000),
            key: None,
            payload: b"",
        };
        let mut out = Vec::new();
        p.process(&l, rec(0), Ok(&anonymous), &mut out);
        p.process(&l, rec(1), Ok(&anonymous), &mut out);
        let Some(Output::Decision(block)) = out.first() else {
            panic!("the second anonymous event is refused by its path: {out:?}")
        };
        assert_eq!(block.key, "per_path/path=/x");
        out.clear();
        let empty = RequestEvent {
            method: None,
            path: None,
            ..anonymous
        };
        p.process(&l, rec(2), Ok(&empty), &mut out);
        assert!(
            matches!(&out[..], [Output::DeadLetter { source_offset: 2, reason, .. }] if reason.contains("at least one of")),
            "{out:?}"
        );
    }

    #[test]
    fn alerts_aggregate_per_key_and_window_with_offenders() {
        let l = limiter();
        let mut p = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        for i in 0..6 {
            feed(&mut p, &l, i, 1_000 + i, 1_000 + i);
        }
        // The next window's first event closes the first one.
        let out = feed(&mut p, &l, 6, 61_000, 61_000);
        let alerts = alerts(&out);
        assert_eq!(alerts.len(), 1, "{out:?}");
        let a = alerts[0];
        assert_eq!(a.alert_id, "requests:0:6:alert:0");
        assert_eq!(
            (a.refused, a.first_seen_ms, a.last_seen_ms),
            (4, 1_002, 1_005)
        );
        assert_eq!(a.severity, Severity::Critical);
        assert_eq!(a.window_end_ms, 60_000);
        let dims: Vec<_> = a
            .top_offenders
            .iter()
            .map(|o| (o.dimension.as_str(), o.count))
            .collect();
        assert_eq!(dims, vec![("api_key", 4), ("client_ip", 4), ("path", 4)]);
        assert!(a.top_offenders[0].value.starts_with("fp:"));
        assert!(!format!("{out:?}").contains("sk_secret"));
    }

    #[test]
    fn an_alert_window_open_across_a_restore_counts_its_offenders_once() {
        let l = limiter();
        let run = |p: &mut PartitionProcessor, range: std::ops::Range<i64>| -> Vec<Output> {
            range
                .flat_map(|i| feed(p, &l, i, 1_000 + i, 1_000 + i))
                .collect()
        };
        let mut whole = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let mut expected = run(&mut whole, 0..6);
        expected.extend(feed(&mut whole, &l, 6, 61_000, 61_000));

        // Two refusals before the checkpoint, two after the restore.
        let mut first = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let mut got = run(&mut first, 0..4);
        let cp = first.checkpoint(1);
        assert_eq!(cp.alerts.len(), 1);
        let mut second = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), Some(cp));
        got.extend(run(&mut second, 4..6));
        got.extend(feed(&mut second, &l, 6, 61_000, 61_000));
        assert_eq!(got, expected);
        let offenders: Vec<i64> = got
            .iter()
            .filter_map(|o| match o {
                Output::Alert(a) => Some(a.top_offenders.iter().map(|o| o.count)),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(offenders, vec![4, 4, 4]);
    }

    #[test]
    fn a_checkpoint_made_under_another_secret_keeps_its_offset_but_not_its_keys() {
        let l = limiter();
        let mut first = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        for i in 0..4 {
            feed(&mut first, &l, i, 1_000 + i, 1_000 + i);
        }
        let cp = first.checkpoint(1);
        assert!(!cp.keys.is_empty());
        let same =
            PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), Some(cp.clone()));
        assert_eq!(
            (same.foreign_keys(), same.store().len()),
            (0, cp.keys.len())
        );
        let other = Arc::new(ProcessorConfig {
            key_check: 2,
            routing: None,
            ..(*cfg()).clone()
        });
        let moved =
            PartitionProcessor::new(other, 0, Arc::new(KeyedStore::new(1)), Some(cp.clone()));
        assert_eq!(moved.foreign_keys(), cp.keys.len());
        assert!(moved.store().is_empty());
        assert_eq!(moved.next_offset(), cp.next_offset);
        assert_eq!(moved.checkpoint(1).alerts, cp.alerts);
    }

    #[test]
    fn restore_from_checkpoint_replays_to_the_same_outputs() {
        let l = limiter();
        let ckpts = MemoryCheckpoints::default();
        let run = |p: &mut PartitionProcessor, range: std::ops::Range<i64>| -> Vec<Output> {
            range
                .flat_map(|i| feed(p, &l, i, 1_000 + i * 7_000, 1_000 + i * 7_000))
                .collect()
        };
        let mut whole = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let expected = run(&mut whole, 0..40);

        let mut first = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let (epoch, _) = ckpts.acquire(0).unwrap();
        let mut got = run(&mut first, 0..15);
        ckpts.save(0, epoch, &first.checkpoint(1)).unwrap();
        // Crash after processing up to 22 without checkpointing: outputs 15..22
        // were published, and will be published again with the same ids.
        let dup = run(&mut first, 15..22);
        let (_, cp) = ckpts.acquire(0).unwrap();
        let mut second = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), cp);
        let replayed = run(&mut second, 15..40);
        assert_eq!(&replayed[..dup.len()], &dup[..]);
        got.extend(replayed);
        assert_eq!(got, expected);
        let sorted = |mut cp: Checkpoint| {
            cp.keys.sort_by_key(|k| k.key);
            cp
        };
        assert_eq!(sorted(second.checkpoint(1)), sorted(whole.checkpoint(1)));
    }

    #[test]
    fn one_key_gets_one_alert_per_window_even_when_its_limit_changed_algorithm() {
        let l = limiter();
        let mut p = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        // per_user allows 2 per 10 s: offsets 2 and 3 are refused.
        for i in 0..4 {
            assert!(alerts(&feed(&mut p, &l, i, 1_000 + i, 1_000 + i)).is_empty());
        }
        // Same limit name, another algorithm: another state key, same alert key.
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "per_user", "key": ["user_id"], "capacity": 1, "refill_per_sec": 0.001}]}"#,
        )
        .unwrap();
        l.replace_rules(doc).unwrap();
        for i in 4..7 {
            feed(&mut p, &l, i, 1_000 + i, 1_000 + i);
        }
        let out = feed(&mut p, &l, 7, 61_000, 61_000);
        let alerts = alerts(&out);
        assert_eq!(alerts.len(), 1, "{out:?}");
        // 2 refusals under the fixed window, 2 under the bucket (the first
        // of 4..7 is allowed by the fresh bucket).
        assert_eq!(alerts[0].refused, 4);
        assert_eq!(alerts[0].key, "per_user/user_id=alice");
        assert_eq!(
            (alerts[0].first_seen_ms, alerts[0].last_seen_ms),
            (1_002, 1_006)
        );
        let offenders: Vec<i64> = alerts[0].top_offenders.iter().map(|o| o.count).collect();
        assert_eq!(offenders, vec![4, 4, 4]);
    }
}
