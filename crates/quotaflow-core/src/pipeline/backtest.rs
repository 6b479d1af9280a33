//! Backtest: the records of a requests topic decided under two configs —
//! the running one and a candidate — by the same [`PartitionProcessor`],
//! each partition from empty state, and compared event by event.
//!
//! Nothing here reads a topic: the caller hands over each partition's
//! records in offset order (the adapters read them from Kafka).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use hashbrown::{HashMap, HashSet};
use serde::{Deserialize, Serialize};

use super::partition::{InputRecord, Output, PartitionProcessor, ProcessorConfig};
use super::records::{Action, RequestEvent};
use crate::limiter::{Decision, Limiter};
use crate::rules::Rules;
use crate::state::{KeyId, KeyedStore};

/// One partition's two processors, each with its own state.
struct Pair {
    running: PartitionProcessor,
    candidate: PartitionProcessor,
}

/// What one config did over the records.
#[derive(Default)]
struct Tally {
    decided: u64,
    whitelisted: u64,
    blocked: u64,
    first_block_ms: Option<u64>,
    /// State keys of enforced limits that refused at least once.
    blocked_keys: HashSet<KeyId>,
    /// By index into the config's limits.
    limits: Vec<LimitTally>,
    decisions: Decisions,
    alerts: u64,
}

#[derive(Default, Clone)]
struct LimitTally {
    refused: u64,
    keys: HashSet<KeyId>,
    first_trip_ms: Option<u64>,
}

/// The candidate's refusals of one key.
struct KeyTally {
    limit: usize,
    blocked: u64,
    newly_blocked: u64,
    first_trip_ms: u64,
}

impl Tally {
    fn new(rules: &Rules) -> Self {
        Self {
            limits: vec![LimitTally::default(); rules.limits.len()],
            ..Self::default()
        }
    }

    fn observe(&mut self, d: &Decision, now: u64) {
        self.decided += 1;
        self.whitelisted += u64::from(d.whitelisted);
        if !d.allowed {
            self.blocked += 1;
            self.first_block_ms = Some(self.first_block_ms.map_or(now, |t| t.min(now)));
        }
        for o in d.outcomes.iter().filter(|o| !o.verdict.allowed) {
            if !o.shadow {
                self.blocked_keys.insert(o.key);
            }
            if let Some(l) = self.limits.get_mut(o.limit) {
                l.refused += 1;
                l.keys.insert(o.key);
                l.first_trip_ms = Some(l.first_trip_ms.map_or(now, |t| t.min(now)));
            }
        }
    }

    fn count(&mut self, outputs: &[Output]) {
        for o in outputs {
            match o {
                Output::Decision(d) => {
                    let n = match d.action {
                        Action::Block => &mut self.decisions.block,
                        Action::Unblock => &mut self.decisions.unblock,
                        Action::Allow => &mut self.decisions.allow,
                        Action::Deny => &mut self.decisions.deny,
                    };
                    *n += 1;
                }
                Output::Alert(_) => self.alerts += 1,
                // A backtest decides every limit in one place (no routing).
                Output::DeadLetter { .. } | Output::Repartition { .. } => {}
            }
        }
    }

    fn side(&self, rules: &Rules) -> SideReport {
        SideReport {
            config_version: rules.version,
            limits: rules.limits.len(),
            decided_requests: self.decided,
            whitelisted_requests: self.whitelisted,
            blocked_requests: self.blocked,
            blocked_keys: self.blocked_keys.len() as u64,
            first_block_ms: self.first_block_ms,
            first_block: self.first_block_ms.map(rfc3339),
            decisions: self.decisions,
            alerts: self.alerts,
        }
    }
}

/// Replays records under the running config and a candidate.
pub struct Backtest {
    cfg: Arc<ProcessorConfig>,
    shards: usize,
    running: Arc<Limiter>,
    candidate: Arc<Limiter>,
    /// The rule sets the tallies index into: a backtest's limiters never
    /// change config.
    running_rules: Arc<Rules>,
    candidate_rules: Arc<Rules>,
    partitions: BTreeMap<i32, Pair>,
    running_tally: Tally,
    candidate_tally: Tally,
    keys: HashMap<KeyId, KeyTally>,
    newly_blocked: u64,
    newly_allowed: u64,
    records: u64,
    dead_letters: u64,
    scratch: Vec<Output>,
}

impl Backtest {
    /// `cfg` is the running processors' (topic, clock skew, alerts, sweeps,
    /// key check); both configs run under it.
    pub fn new(
        cfg: Arc<ProcessorConfig>,
        running: Arc<Limiter>,
        candidate: Arc<Limiter>,
        shards: usize,
    ) -> Self {
        let (running_rules, candidate_rules) = (running.rules(), candidate.rules());
        Self {
            cfg,
            shards: shards.max(1),
            running_tally: Tally::new(&running_rules),
            candidate_tally: Tally::new(&candidate_rules),
            running,
            candidate,
            running_rules,
            candidate_rules,
            partitions: BTreeMap::new(),
            keys: HashMap::new(),
            newly_blocked: 0,
            newly_allowed: 0,
            records: 0,
            dead_letters: 0,
            scratch: Vec::new(),
        }
    }

    /// Decide one record of `partition` under both configs (records of a
    /// partition in offset order; its first one starts the partition from
    /// empty state). The candidate's outputs are appended to `out`.
    pub fn record(
        &mut self,
        partition: i32,
        rec: InputRecord<'_>,
        event: Result<&RequestEvent, String>,
        out: &mut Vec<Output>,
    ) {
        let Self {
            cfg,
            shards,
            running,
            candidate,
            partitions,
            running_tally,
            candidate_tally,
            keys,
            newly_blocked,
            newly_allowed,
            scratch,
            ..
        } = self;
        // Empty state at the partition's first record read: what came
        // before it is not known.
        let pair = partitions.entry(partition).or_insert_with(|| {
            let fresh = || {
                PartitionProcessor::new(
                    cfg.clone(),
                    partition,
                    Arc::new(KeyedStore::new(*shards)),
                    None,
                )
            };
            Pair {
                running: fresh(),
                candidate: fresh(),
            }
        });
        self.records += 1;
        let mut running_allowed = None;
        scratch.clear();
        pair.running
            .process_observed(running, rec, event.clone(), scratch, |_, d, now| {
                running_tally.observe(d, now);
                running_allowed = Some(d.allowed);
            });
        running_tally.count(scratch);
        self.dead_letters += scratch
            .iter()
            .filter(|o| matches!(o, Output::DeadLetter { .. }))
            .count() as u64;
        let from = out.len();
        pair.candidate
            .process_observed(candidate, rec, event, out, |_, d, now| {
                candidate_tally.observe(d, now);
                let was_allowed = running_allowed.unwrap_or(true);
                let newly = !d.allowed && was_allowed;
                *newly_blocked += u64::from(newly);
                *newly_allowed += u64::from(d.allowed && !was_allowed);
                for o in d.violated() {
                    let k = keys.entry(o.key).or_insert(KeyTally {
                        limit: o.limit,
                        blocked: 0,
                        newly_blocked: 0,
                        first_trip_ms: now,
                    });
                    k.blocked += 1;
                    k.newly_blocked += u64::from(newly);
                    k.first_trip_ms = k.first_trip_ms.min(now);
                }
            });
        candidate_tally.count(&out[from..]);
    }

    /// The comparison so far, with the `top` keys the candidate blocks most
    /// (those it blocks that the running config allowed first).
    pub fn report(&self, top: usize) -> Report {
        let mut limits: BTreeMap<&str, LimitComparison> = BTreeMap::new();
        let sides = [
            (&self.running_rules, &self.running_tally, false),
            (&self.candidate_rules, &self.candidate_tally, true),
        ];
        for (rules, tally, is_candidate) in sides {
            for (limit, t) in rules.limits.iter().zip(&tally.limits) {
                let row = limits
                    .entry(limit.name.as_str())
                    .or_insert_with(|| LimitComparison {
                        name: limit.name.clone(),
                        running: None,
                        candidate: None,
                    });
                let report = LimitReport {
                    algorithm: limit.algorithm.name().to_owned(),
                    key: limit.key.iter().map(|d| d.as_str().to_owned()).collect(),
                    quota: limit.shape.quota,
                    window_secs: limit.shape.window_secs,
                    shadow: limit.shadow,
                    refused_requests: t.refused,
                    refused_keys: t.keys.len() as u64,
                    first_trip_ms: t.first_trip_ms,
                    first_trip: t.first_trip_ms.map(rfc3339),
                };
                if is_candidate {
                    row.candidate = Some(report);
                } else {
                    row.running = Some(report);
                }
            }
        }
        let mut keys: Vec<(&KeyId, &KeyTally)> = self.keys.iter().collect();
        keys.sort_unstable_by(|a, b| {
            (b.1.newly_blocked, b.1.blocked)
                .cmp(&(a.1.newly_blocked, a.1.blocked))
                .then(a.1.first_trip_ms.cmp(&b.1.first_trip_ms))
                .then(a.0.cmp(b.0))
        });
        let top_keys = keys
            .into_iter()
            .take(top)
            .filter_map(|(id, k)| {
                let limit = self.candidate_rules.limits.get(k.limit)?;
                Some(TopKey {
                    limit: limit.name.clone(),
                    key: limit.key.iter().map(|d| d.as_str().to_owned()).collect(),
                    key_fp: id.to_string(),
                    blocked_requests: k.blocked,
                    newly_blocked_requests: k.newly_blocked,
                    first_trip_ms: k.first_trip_ms,
                    first_trip: rfc3339(k.first_trip_ms),
                })
            })
            .collect();
        Report {
            records: self.records,
            dead_letters: self.dead_letters,
            running: self.running_tally.side(&self.running_rules),
            candidate: self.candidate_tally.side(&self.candidate_rules),
            newly_blocked_requests: self.newly_blocked,
            newly_allowed_requests: self.newly_allowed,
            limits: limits.into_values().collect(),
            top_keys,
        }
    }
}

/// `ms` since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The comparison of the two configs over the records read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Records read (decided, dead-lettered or both).
    pub records: u64,
    /// Records neither config could decide (undecodable or invalid): the
    /// same under both.
    pub dead_letters: u64,
    pub running: SideReport,
    pub candidate: SideReport,
    /// Requests the candidate refuses that the running config allowed.
    pub newly_blocked_requests: u64,
    /// Requests the running config refused that the candidate allows.
    pub newly_allowed_requests: u64,
    /// Every limit of either config, by name.
    pub limits: Vec<LimitComparison>,
    /// The candidate's most blocked keys, most newly blocked first.
    pub top_keys: Vec<TopKey>,
}

/// What one config would have done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideReport {
    pub config_version: u64,
    pub limits: usize,
    /// Requests decided (records less dead letters).
    pub decided_requests: u64,
    pub whitelisted_requests: u64,
    /// Requests refused by an enforced limit.
    pub blocked_requests: u64,
    /// Distinct keys of enforced limits refused at least once.
    pub blocked_keys: u64,
    /// Event time of the first refused request.
    pub first_block_ms: Option<u64>,
    pub first_block: Option<String>,
    /// The decision records it would have published.
    pub decisions: Decisions,
    /// The breach alerts it would have published.
    pub alerts: u64,
}

/// Decision records by action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decisions {
    pub block: u64,
    pub unblock: u64,
    pub allow: u64,
    pub deny: u64,
}

/// One limit name under both configs (`None` where a config lacks it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitComparison {
    pub name: String,
    pub running: Option<LimitReport>,
    pub candidate: Option<LimitReport>,
}

/// One limit of one config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitReport {
    pub algorithm: String,
    /// The dimensions it is keyed by.
    pub key: Vec<String>,
    pub quota: u64,
    pub window_secs: u64,
    /// A shadow limit refuses nothing: its refusals are what it would refuse.
    pub shadow: bool,
    /// Requests this limit refused (a request refused by several limits
    /// counts under each).
    pub refused_requests: u64,
    /// Distinct keys it refused at least once.
    pub refused_keys: u64,
    /// Event time of its first refusal.
    pub first_trip_ms: Option<u64>,
    pub first_trip: Option<String>,
}

/// One key the candidate blocks, named only by its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopKey {
    pub limit: String,
    /// The dimensions of the key (names only, never values).
    pub key: Vec<String>,
    /// The state key's id: a keyed hash under `security.fingerprint_key`,
    /// as logs name keys (`key_fp`).
    pub key_fp: String,
    pub blocked_requests: u64,
    /// Of those, requests the running config allowed.
    pub newly_blocked_requests: u64,
    pub first_trip_ms: u64,
    pub first_trip: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprinter;
    use crate::rules::RulesDoc;

    fn limiter(limit: u64) -> Arc<Limiter> {
        let doc = RulesDoc::from_json(
            format!(
                r#"{{"limits": [{{"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": {limit}, "window": "10s"}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        Arc::new(Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap())
    }

    fn cfg() -> Arc<ProcessorConfig> {
        Arc::new(ProcessorConfig {
            topic: "requests".into(),
            max_clock_skew_ms: 1_000,
            alert_window_ms: 60_000,
            alert_min_refused: 1,
            alert_critical_refused: 100,
            every_event: false,
            sweep_interval_ms: 5_000,
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
            cost: 1,
            ..RequestEvent::default()
        }
    }

    /// Alice sends 5 in one window, Bob 2, on partitions 0 and 1; a later
    /// event closes the alert windows.
    fn feed(bt: &mut Backtest) -> Vec<Output> {
        let mut out = Vec::new();
        let events = [("alice", 0), ("bob", 1)]
            .into_iter()
            .flat_map(|(u, p)| {
                let n = if u == "alice" { 5 } else { 2 };
                (0..n).map(move |i| (p, u, 1_000 + i))
            })
            .chain([(0, "carol", 70_000)]);
        let mut offsets = BTreeMap::new();
        for (p, user, ts) in events {
            let offset = offsets.entry(p).or_insert(100i64);
            let rec = InputRecord {
                offset: *offset,
                broker_ts_ms: Some(ts),
                key: None,
                payload: b"",
            };
            *offset += 1;
            bt.record(p, rec, Ok(&event(user, ts)), &mut out);
        }
        out
    }

    #[test]
    fn the_running_config_against_itself_changes_nothing_and_decides_as_the_processor() {
        let l = limiter(3);
        let mut bt = Backtest::new(cfg(), l.clone(), l.clone(), 1);
        let out = feed(&mut bt);
        let r = bt.report(10);
        assert_eq!(r.running, r.candidate);
        assert_eq!((r.newly_blocked_requests, r.newly_allowed_requests), (0, 0));
        assert_eq!((r.records, r.running.blocked_requests), (8, 2));
        assert_eq!(r.running.decisions.block, 1);
        assert_eq!(r.running.alerts, 1);
        // The same outputs as one processor per partition, ids included.
        let mut alone = PartitionProcessor::new(cfg(), 0, Arc::new(KeyedStore::new(1)), None);
        let mut expected = Vec::new();
        for (i, ts) in (1_000..1_005).enumerate() {
            let rec = InputRecord {
                offset: 100 + i as i64,
                broker_ts_ms: Some(ts),
                key: None,
                payload: b"",
            };
            alone.process(&l, rec, Ok(&event("alice", ts)), &mut expected);
        }
        let rec = InputRecord {
            offset: 105,
            broker_ts_ms: Some(70_000),
            key: None,
            payload: b"",
        };
        alone.process(&l, rec, Ok(&event("carol", 70_000)), &mut expected);
        assert_eq!(out, expected);
        assert!(
            matches!(&out[0], Output::Decision(d) if d.decision_id == "requests:0:103:decision:0")
        );
    }

    #[test]
    fn a_stricter_candidate_is_counted_per_limit_and_key() {
        let mut bt = Backtest::new(cfg(), limiter(3), limiter(1), 1);
        feed(&mut bt);
        let r = bt.report(10);
        // Alice: 2 refused before, 4 now; Bob: 1 now.
        assert_eq!(r.running.blocked_requests, 2);
        assert_eq!(
            (r.candidate.blocked_requests, r.candidate.blocked_keys),
            (5, 2)
        );
        assert_eq!((r.newly_blocked_requests, r.newly_allowed_requests), (3, 0));
        let per_user = &r.limits[0];
        let c = per_user.candidate.as_ref().unwrap();
        assert_eq!(
            (c.refused_requests, c.refused_keys, c.first_trip_ms),
            (5, 2, Some(1_001))
        );
        assert_eq!(
            per_user.running.as_ref().unwrap().first_trip_ms,
            Some(1_003)
        );
        let top: Vec<_> = r
            .top_keys
            .iter()
            .map(|k| {
                (
                    k.blocked_requests,
                    k.newly_blocked_requests,
                    k.first_trip_ms,
                )
            })
            .collect();
        assert_eq!(top, vec![(4, 2, 1_001), (1, 1, 1_001)]);
        assert_eq!(r.top_keys[0].key_fp.len(), 32);
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            !json.contains("alice") && !json.contains("sk_secret"),
            "{json}"
        );
    }
}
