//! The limiter: the running rule set, the per-key state, and the decision for
//! one request across every limit that applies to it.

use std::cell::RefCell;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::algorithms::Verdict;
use crate::fingerprint::Fingerprinter;
use crate::rules::history::RulesHistory;
use crate::rules::{InvalidConfig, Limit, Request, Rules, RulesDoc};
use crate::state::{KeyCap, KeyId, KeyedStore, Probe, Probed};

/// Something worth one log line and one metric: the edges of a breach, and
/// clients that keep knocking after being told to back off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreachEvent {
    /// The key was refused after being allowed (or for the first time).
    Started,
    /// The key is allowed again after `refused` consecutive refusals.
    Ended { refused: u32 },
    /// The key has been refused `refused` times in a row without one
    /// success: a client ignoring `Retry-After`. Reported at 100, 1 000,
    /// 10 000, … refusals so an attack yields a handful of lines, not a flood.
    IgnoresRetryAfter { refused: u32 },
}

/// One limit's part in a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitOutcome {
    /// Index into [`Rules::limits`] of the rule set the decision was made with.
    pub limit: usize,
    /// The state key this limit was decided on, for callers that keep
    /// something per key (the stream processor's alert windows). Being a
    /// keyed hash, it is also the key's fingerprint: logs name keys only
    /// through it.
    pub key: KeyId,
    pub verdict: Verdict,
    pub shadow: bool,
    pub event: Option<BreachEvent>,
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub whitelisted: bool,
    /// Version of the rule set the decision was made with.
    pub version: u64,
    /// Every limit that applied, shadow ones included.
    pub outcomes: SmallVec<[LimitOutcome; 4]>,
}

impl Decision {
    /// The enforced limit a response should describe: on refusal the violated
    /// limit that frees up last; otherwise the one closest to refusing.
    pub fn binding(&self) -> Option<&LimitOutcome> {
        if self.allowed {
            self.outcomes
                .iter()
                .filter(|o| !o.shadow)
                .min_by_key(|o| (o.verdict.remaining, std::cmp::Reverse(o.verdict.reset_ms)))
        } else {
            self.violated().max_by_key(|o| o.verdict.retry_after_ms)
        }
    }

    /// Enforced limits that refused the request.
    pub fn violated(&self) -> impl Iterator<Item = &LimitOutcome> {
        self.outcomes
            .iter()
            .filter(|o| !o.shadow && !o.verdict.allowed)
    }
}

/// Why a config replacement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplaceError {
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
    #[error("config version {expected} was expected but {current} is running")]
    Conflict { expected: u64, current: u64 },
}

/// The limits a request falls under, each with its state key: what any
/// state backend needs to decide it, whether the in-process store or one
/// shared with other instances.
pub struct Matched<'r> {
    pub whitelisted: bool,
    /// Index into [`Rules::limits`] of each probe's limit.
    pub limits: SmallVec<[usize; 4]>,
    pub probes: SmallVec<[Probe<'r>; 4]>,
}

impl Matched<'_> {
    /// The decision for these probes' outcomes (in the same order): allowed
    /// only if every enforced limit allowed it.
    pub fn decision(&self, version: u64, probed: &[Probed]) -> Decision {
        let mut decision = Decision {
            allowed: true,
            whitelisted: self.whitelisted,
            version,
            outcomes: SmallVec::new(),
        };
        decision.allowed = probed
            .iter()
            .zip(&self.probes)
            .all(|(p, probe)| p.outcome.verdict.allowed || !probe.enforce);
        for ((&i, p), probe) in self.limits.iter().zip(probed).zip(&self.probes) {
            decision.outcomes.push(LimitOutcome {
                limit: i,
                key: probe.key,
                verdict: p.outcome.verdict,
                shadow: !probe.enforce,
                event: breach_event(p, decision.allowed),
            });
        }
        decision
    }
}

/// A further condition on rule sets, for a backend that cannot run every
/// valid one (the Redis scripts compute in doubles): checked at start and
/// on every replacement, so an unsupported config is refused like an
/// invalid one and the running rules stay.
pub type RulesCheck = Box<dyn Fn(&Rules) -> Result<(), InvalidConfig> + Send + Sync>;

/// The rule set, the state, and the fingerprint key, shared by every request.
pub struct Limiter {
    rules: ArcSwap<Rules>,
    store: KeyedStore,
    fingerprinter: Fingerprinter,
    /// Serialises config writes so versions increase without gaps or races,
    /// and holds the last versions run: a stream partition decides with the
    /// version pinned in its checkpoint, not always the running one.
    writer: Mutex<RulesHistory>,
    check: Option<RulesCheck>,
}

thread_local! {
    /// Reused buffer for the text of a state key (no allocation per check).
    static KEYS: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Limiter {
    /// A limiter running `doc` as version 1, with no cap on its keys.
    pub fn new(
        doc: RulesDoc,
        fingerprinter: Fingerprinter,
        shards: usize,
    ) -> Result<Self, InvalidConfig> {
        Self::with_key_cap(doc, fingerprinter, shards, KeyCap::UNLIMITED)
    }

    /// A limiter whose own store holds at most `cap.max_keys` keys.
    pub fn with_key_cap(
        doc: RulesDoc,
        fingerprinter: Fingerprinter,
        shards: usize,
        cap: KeyCap,
    ) -> Result<Self, InvalidConfig> {
        let rules = Arc::new(Rules::compile(doc, 1, &fingerprinter)?);
        let mut history = RulesHistory::default();
        history.record(rules.clone());
        Ok(Self {
            rules: ArcSwap::new(rules),
            store: KeyedStore::with_cap(shards, cap),
            fingerprinter,
            writer: Mutex::new(history),
            check: None,
        })
    }

    /// This limiter, refusing from now on any rule set `check` refuses;
    /// an error if the running one already fails it.
    pub fn with_rules_check(mut self, check: RulesCheck) -> Result<Self, InvalidConfig> {
        check(&self.rules.load())?;
        self.check = Some(check);
        Ok(self)
    }

    /// The running rule set.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// The rule set of `version`, if it is one of the last versions this
    /// limiter ran ([`crate::rules::history::KEPT_VERSIONS`]): what a stream
    /// partition restored from a checkpoint of that version decides with.
    pub fn rules_at(&self, version: u64) -> Option<Arc<Rules>> {
        let running = self.rules.load_full();
        if running.version == version {
            return Some(running);
        }
        self.writer.lock().get(version)
    }

    /// The oldest version [`Limiter::rules_at`] still knows.
    pub fn oldest_kept_version(&self) -> Option<u64> {
        self.writer.lock().oldest()
    }

    /// Bring `req`'s path to canonical form under the running rules, as
    /// their limits match it (a guard, not an `Arc`: no reference count
    /// moves on the per-request path).
    pub fn canonicalize_path(&self, req: &mut Request) {
        req.canonicalize_path(self.rules.load().path_case_sensitive);
    }

    pub fn store(&self) -> &KeyedStore {
        &self.store
    }

    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    /// Validate `doc` and make it the running rule set, returning its
    /// version. On error the running rules stay untouched. Checks in flight
    /// finish with the rule set they started with: never a mix.
    pub fn replace_rules(&self, doc: RulesDoc) -> Result<u64, ReplaceError> {
        self.replace_rules_if(None, doc)
    }

    /// As [`Limiter::replace_rules`], but only if the running version is
    /// `expected` (when given): two operators editing the config at once
    /// cannot silently overwrite each other.
    pub fn replace_rules_if(
        &self,
        expected: Option<u64>,
        doc: RulesDoc,
    ) -> Result<u64, ReplaceError> {
        let mut history = self.writer.lock();
        let current = self.rules.load().version;
        if let Some(expected) = expected.filter(|&e| e != current) {
            return Err(ReplaceError::Conflict { expected, current });
        }
        let rules = Rules::compile(doc, current + 1, &self.fingerprinter)?;
        if let Some(check) = &self.check {
            check(&rules)?;
        }
        let rules = Arc::new(rules);
        history.record(rules.clone());
        self.rules.store(rules);
        Ok(current + 1)
    }

    /// `doc` as it would run (API keys of the whitelist as fingerprints),
    /// if it would be accepted as the running rule set, without running it:
    /// what a shared config store keeps.
    pub fn normalize(&self, doc: RulesDoc) -> Result<RulesDoc, InvalidConfig> {
        let rules = Rules::compile(doc, 0, &self.fingerprinter)?;
        if let Some(check) = &self.check {
            check(&rules)?;
        }
        Ok(rules.doc().clone())
    }

    /// Run `doc` as `version`, decided elsewhere (the group's shared config
    /// store), if that is newer than the running version: `Ok(false)` when
    /// it is not. Versions only move forward, so a late notice of an old
    /// version changes nothing.
    pub fn install(&self, version: u64, doc: RulesDoc) -> Result<bool, InvalidConfig> {
        self.install_if(version, doc, |running| version > running)
    }

    /// Run `doc` as `version` whatever runs now: an instance joining a
    /// group adopts the group's config, even at the version it started at.
    pub fn adopt(&self, version: u64, doc: RulesDoc) -> Result<(), InvalidConfig> {
        self.install_if(version, doc, |_| true).map(|_| ())
    }

    fn install_if(
        &self,
        version: u64,
        doc: RulesDoc,
        wanted: impl FnOnce(u64) -> bool,
    ) -> Result<bool, InvalidConfig> {
        let mut history = self.writer.lock();
        if !wanted(self.rules.load().version) {
            return Ok(false);
        }
        let rules = Rules::compile(doc, version, &self.fingerprinter)?;
        if let Some(check) = &self.check {
            check(&rules)?;
        }
        let rules = Arc::new(rules);
        history.record(rules.clone());
        self.rules.store(rules);
        Ok(true)
    }

    /// Decide `req` at `now_ms`, and hand the decision with the rule set it was
    /// made with to `f` (for headers that need the limits' names and shapes).
    ///
    /// `req` must have passed [`Request::validate`].
    pub fn check_then<R>(
        &self,
        req: &Request,
        now_ms: u64,
        f: impl FnOnce(&Rules, &Decision) -> R,
    ) -> R {
        self.check_against(&self.store, req, now_ms, f)
    }

    /// As [`Limiter::check_then`], against `store` instead of the limiter's
    /// own: the stream processor keeps one store per partition it owns,
    /// under the same rules.
    pub fn check_against<R>(
        &self,
        store: &KeyedStore,
        req: &Request,
        now_ms: u64,
        f: impl FnOnce(&Rules, &Decision) -> R,
    ) -> R {
        let rules = self.rules.load();
        let decision = self.decide(store, &rules, req, now_ms);
        f(&rules, &decision)
    }

    /// As [`Limiter::check_against`], over only the limits `only` selects
    /// (decided together: all pass or none is charged). The stream
    /// processor counts each limit where its key lives: the limits aligned
    /// with the partition key where the event arrives, the others by key
    /// shape at their home partition.
    pub fn check_against_only<R>(
        &self,
        store: &KeyedStore,
        req: &Request,
        now_ms: u64,
        only: impl Fn(&Limit) -> bool,
        f: impl FnOnce(&Rules, &Decision) -> R,
    ) -> R {
        let rules = self.rules.load();
        self.check_with_only(store, &rules, req, now_ms, only, f)
    }

    /// As [`Limiter::check_against_only`], under `rules` instead of the
    /// running rule set: a stream partition decides with the version pinned
    /// in its checkpoint, so that a replay decides as its first run did.
    pub fn check_with_only<R>(
        &self,
        store: &KeyedStore,
        rules: &Rules,
        req: &Request,
        now_ms: u64,
        only: impl Fn(&Limit) -> bool,
        f: impl FnOnce(&Rules, &Decision) -> R,
    ) -> R {
        let matched = self.matched_only(rules, req, only);
        let mut probed: SmallVec<[Probed; 4]> = SmallVec::new();
        store.apply(&matched.probes, now_ms, req.cost, &mut probed);
        let decision = matched.decision(rules.version, &probed);
        f(rules, &decision)
    }

    /// Decide `req` at `now_ms`.
    pub fn check(&self, req: &Request, now_ms: u64) -> Decision {
        self.check_then(req, now_ms, |_, d| d.clone())
    }

    /// The limits `req` falls under in `rules`, or none if whitelisted.
    pub fn matched<'r>(&self, rules: &'r Rules, req: &Request) -> Matched<'r> {
        self.matched_only(rules, req, |_| true)
    }

    /// As [`Limiter::matched`], among the limits `only` selects.
    pub fn matched_only<'r>(
        &self,
        rules: &'r Rules,
        req: &Request,
        only: impl Fn(&Limit) -> bool,
    ) -> Matched<'r> {
        let mut m = Matched {
            whitelisted: false,
            limits: SmallVec::new(),
            probes: SmallVec::new(),
        };
        if rules.is_whitelisted(req, &self.fingerprinter) {
            m.whitelisted = true;
            return m;
        }
        KEYS.with_borrow_mut(|buf| {
            for (i, limit) in rules.limits.iter().enumerate() {
                if !only(limit) {
                    continue;
                }
                if let Some(key) = limit.key_id(req, buf) {
                    m.limits.push(i);
                    m.probes.push(Probe {
                        key,
                        algorithm: &*limit.algorithm,
                        enforce: !limit.shadow,
                    });
                }
            }
        });
        m
    }

    fn decide(&self, store: &KeyedStore, rules: &Rules, req: &Request, now_ms: u64) -> Decision {
        let matched = self.matched(rules, req);
        let mut probed: SmallVec<[Probed; 4]> = SmallVec::new();
        store.apply(&matched.probes, now_ms, req.cost, &mut probed);
        matched.decision(rules.version, &probed)
    }
}

fn breach_event(p: &Probed, admitted: bool) -> Option<BreachEvent> {
    if p.outcome.verdict.allowed {
        (admitted && p.refused_before > 0).then_some(BreachEvent::Ended {
            refused: p.refused_before,
        })
    } else if p.refused_before == 0 {
        Some(BreachEvent::Started)
    } else {
        let refused = p.refused_before.saturating_add(1);
        let notable = refused >= 100
            && refused
                .checked_ilog10()
                .is_some_and(|e| 10u32.pow(e) == refused);
        notable.then_some(BreachEvent::IgnoresRetryAfter { refused })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limiter(v: serde_json::Value) -> Limiter {
        let doc = RulesDoc::from_json(v.to_string().as_bytes()).unwrap();
        Limiter::new(doc, Fingerprinter::from_secret("t"), 4).unwrap()
    }

    fn user(u: &str) -> Request {
        Request {
            user_id: Some(u.into()),
            path: Some("/orders".into()),
            ..Request::default()
        }
    }

    #[test]
    fn stacked_limits_all_must_pass_and_refusal_consumes_none() {
        let l = limiter(json!({"limits": [
            {"name": "per_user", "key": ["user_id"], "capacity": 2, "refill_per_sec": 0.001},
            {"name": "global", "algorithm": "fixed_window", "limit": 3, "window": "1h"},
        ]}));
        assert!(l.check(&user("a"), 0).allowed);
        assert!(l.check(&user("a"), 0).allowed);
        let d = l.check(&user("a"), 0);
        assert!(!d.allowed);
        assert_eq!(d.violated().map(|o| o.limit).collect::<Vec<_>>(), vec![0]);
        // The refused request did not consume from `global`: one slot is left.
        assert!(l.check(&user("b"), 0).allowed);
        let d = l.check(&user("c"), 0);
        assert!(!d.allowed);
        assert_eq!(d.violated().map(|o| o.limit).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn breach_edges_and_persistence_are_reported_once() {
        let l = limiter(json!({"limits": [
            {"name": "one", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1s"},
        ]}));
        assert_eq!(l.check(&user("a"), 0).outcomes[0].event, None);
        let events: Vec<_> = (0..1_000)
            .map(|_| l.check(&user("a"), 10).outcomes[0].event)
            .collect();
        assert_eq!(events[0], Some(BreachEvent::Started));
        assert_eq!(l.check(&user("a"), 20).outcomes[0].event, None);
        let notable: Vec<_> = events.iter().flatten().skip(1).collect();
        assert_eq!(
            notable,
            vec![
                &BreachEvent::IgnoresRetryAfter { refused: 100 },
                &BreachEvent::IgnoresRetryAfter { refused: 1000 }
            ]
        );
        let d = l.check(&user("a"), 1_000);
        assert_eq!(
            d.outcomes[0].event,
            Some(BreachEvent::Ended { refused: 1001 })
        );
        assert_eq!(d.outcomes[0].key.to_string().len(), 32);
    }

    #[test]
    fn state_and_breach_fingerprints_never_hold_an_api_key() {
        let l = limiter(json!({"limits": [
            {"name": "per_key", "key": ["api_key"], "algorithm": "fixed_window", "limit": 1, "window": "1m"},
        ]}));
        let req = Request {
            api_key: Some("sk_live_secret".into()),
            ..Request::default()
        };
        assert!(l.check(&req, 0).allowed);
        let d = l.check(&req, 1);
        assert_eq!(d.outcomes[0].event, Some(BreachEvent::Started));
        let text = format!("{d:?} {:?}", l.store().export());
        assert!(!text.contains("sk_live_secret"), "{text}");
        assert_eq!(l.store().export()[0].key, d.outcomes[0].key);
    }

    #[test]
    fn shadow_limits_count_but_never_block() {
        let l = limiter(json!({"limits": [
            {"name": "trial", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1m", "shadow": true},
        ]}));
        assert!(l.check(&user("a"), 0).allowed);
        let d = l.check(&user("a"), 0);
        assert!(d.allowed);
        assert!(!d.outcomes[0].verdict.allowed);
        assert!(d.outcomes[0].shadow);
        assert_eq!(d.violated().count(), 0);
    }

    #[test]
    fn whitelist_bypasses_and_invalid_replacement_keeps_old_rules() {
        let l = limiter(json!({
            "limits": [{"name": "x", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1m"}],
            "whitelist": {"user_ids": ["ops"]}
        }));
        for _ in 0..5 {
            let d = l.check(&user("ops"), 0);
            assert!(d.allowed && d.whitelisted && d.outcomes.is_empty());
        }
        let bad = RulesDoc::from_json(
            br#"{"limits": [{"name": "x", "capacity": 0, "refill_per_sec": 1}]}"#,
        )
        .unwrap();
        assert!(l.replace_rules(bad).is_err());
        assert_eq!(l.rules().version, 1);
        let good = RulesDoc::from_json(br#"{"limits": [{"name": "x", "key": ["user_id"], "algorithm": "fixed_window", "limit": 3, "window": "1m"}]}"#).unwrap();
        assert_eq!(l.replace_rules(good).unwrap(), 2);
        // Same name and algorithm: the count so far is kept, the new limit applies.
        assert!(l.check(&user("u"), 0).allowed);
        assert!(l.check(&user("u"), 0).allowed);
        assert!(l.check(&user("u"), 0).allowed);
        assert!(!l.check(&user("u"), 0).allowed);
        assert!(!l.check(&user("ops"), 0).whitelisted);
    }

    #[test]
    fn recent_versions_stay_at_hand_by_number() {
        let l = limiter(json!({"limits": [
            {"name": "x", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1m"}]}));
        let two = RulesDoc::from_json(br#"{"limits": [{"name": "x", "key": ["user_id"], "algorithm": "fixed_window", "limit": 2, "window": "1m"}]}"#).unwrap();
        assert_eq!(l.replace_rules(two.clone()).unwrap(), 2);
        let one = l.rules_at(1).expect("version 1 is kept");
        assert_eq!(one.version, 1);
        // Version 1 still decides as version 1, whatever runs now.
        let store = KeyedStore::new(1);
        let admitted = (0..3)
            .filter(|_| l.check_with_only(&store, &one, &user("a"), 0, |_| true, |_, d| d.allowed))
            .count();
        assert_eq!(admitted, 1);
        assert_eq!(l.rules_at(2).unwrap().version, 2);
        assert!(l.rules_at(3).is_none());
        for _ in 0..crate::rules::history::KEPT_VERSIONS {
            l.replace_rules(two.clone()).unwrap();
        }
        assert!(l.rules_at(1).is_none());
        assert_eq!(l.oldest_kept_version(), Some(3));
    }

    #[test]
    fn checks_during_config_swaps_see_old_or_new_never_a_mix() {
        let one = r#"{"limits": [{"name": "a", "key": ["user_id"], "capacity": 1000000, "refill_per_sec": 1}]}"#;
        let two = r#"{"limits": [
            {"name": "b1", "key": ["user_id"], "capacity": 1000000, "refill_per_sec": 1},
            {"name": "b2", "algorithm": "fixed_window", "limit": 1000000, "window": "1h"}]}"#;
        let l = Limiter::new(
            RulesDoc::from_json(one.as_bytes()).unwrap(),
            Fingerprinter::random(),
            4,
        )
        .unwrap();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        l.check_then(&user("u"), 0, |rules, d| {
                            assert_eq!(rules.version, d.version);
                            let names: Vec<&str> = d
                                .outcomes
                                .iter()
                                .map(|o| rules.limits[o.limit].name.as_str())
                                .collect();
                            let expected: &[&str] = if d.version % 2 == 1 {
                                &["a"]
                            } else {
                                &["b1", "b2"]
                            };
                            assert_eq!(names, expected, "version {}", d.version);
                        });
                    }
                });
            }
            s.spawn(|| {
                for i in 0..200 {
                    let doc = if i % 2 == 0 { two } else { one };
                    l.replace_rules(RulesDoc::from_json(doc.as_bytes()).unwrap())
                        .unwrap();
                }
            });
        });
        assert_eq!(l.rules().version, 201);
    }
}
