//! A group's rate-limit config as a log of proposals, and what every
//! instance computes from it with no coordination but the log's order.
//!
//! A write is a *proposal*: a document, the version it was edited from
//! (or none: "whatever runs"), and who wrote it. Every instance reads the
//! same log in the same order and rules on each proposal with the same
//! pure rule ([`Arbiter::rule`]), so every instance arrives at the same
//! versions, and a writer learns whether it won by reading its own
//! proposal back. Kafka (a one-partition config topic) keeps the log in
//! `quotaflow-adapters`; nothing here does I/O.
//!
//! [`summarize`] says what a change changed, for the log line every
//! instance writes: limits by name, whitelist entries only as counts (the
//! whitelist may hold API keys, which are never logged).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rules::{LimitDoc, RulesDoc};

/// One record of the config log, as written and read (JSON). The document
/// stays a JSON value here so that a record a newer binary wrote with
/// fields this one does not know is still read: it is refused by
/// validation (as every instance refuses it), not lost as unreadable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigProposal {
    /// Unique id of the proposal: the record's key, so that compaction
    /// keeps every proposal, and how the writer finds the ruling on it.
    pub proposal: String,
    /// The group version the document was edited from; `None`: any.
    pub base_version: Option<u64>,
    /// The rate-limit document (API keys already as fingerprints).
    pub doc: serde_json::Value,
    /// Who wrote it: `token:<id>`, `loopback`, or `startup` for an
    /// instance seeding an empty log with its file config. Never a token.
    pub by: String,
}

/// The ruling on one proposal, the same on every instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ruling {
    /// The proposal is the group's config from now on, as `version`.
    Accepted { version: u64 },
    /// It was edited from another version than `current`: refused.
    Conflict { current: u64 },
    /// Its document is not valid: refused, `current` stays.
    Invalid { current: u64 },
}

/// The rule applied to the log, in order. Version 0 means that no
/// proposal was accepted yet: a proposal with base version 0 ("only if the
/// group has none") is how instances seed an empty log, the first one in
/// the log winning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Arbiter {
    version: u64,
}

impl Arbiter {
    /// The version of the last accepted proposal (0: none yet).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Rule on the next proposal of the log: accepted iff it was edited
    /// from the current version (or from any) and its document is valid;
    /// an accepted proposal is the next version. Conflict is checked first,
    /// so a stale write is told to reload whatever it holds.
    pub fn rule(&mut self, base_version: Option<u64>, valid: bool) -> Ruling {
        let current = self.version;
        if base_version.is_some_and(|b| b != current) {
            return Ruling::Conflict { current };
        }
        match current.checked_add(1) {
            Some(next) if valid => {
                self.version = next;
                Ruling::Accepted { version: next }
            }
            _ => Ruling::Invalid { current },
        }
    }
}

/// What a change did to a document: limits by name, whitelist entries as
/// counts only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSummary {
    pub limits_added: Vec<String>,
    pub limits_removed: Vec<String>,
    /// Limits of both documents whose definition differs.
    pub limits_changed: Vec<String>,
    /// The limits both documents have, in another order (order decides
    /// which refusal a response reports first).
    pub limits_reordered: bool,
    /// Per whitelist list (`user_ids`, `api_keys`, `client_ips`): entries
    /// added and removed, counted, never named.
    pub whitelist: BTreeMap<&'static str, (usize, usize)>,
    /// `path_case_sensitive` from, to, when it changed.
    pub path_case_sensitive: Option<(bool, bool)>,
}

impl ChangeSummary {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What changed from `old` to `new`.
pub fn summarize(old: &RulesDoc, new: &RulesDoc) -> ChangeSummary {
    let by_name = |doc: &RulesDoc| -> BTreeMap<String, LimitDoc> {
        doc.limits
            .iter()
            .map(|l| (l.name.clone(), l.clone()))
            .collect()
    };
    let (before, after) = (by_name(old), by_name(new));
    let limits_added = new
        .limits
        .iter()
        .filter(|l| !before.contains_key(&l.name))
        .map(|l| l.name.clone())
        .collect();
    let limits_removed = old
        .limits
        .iter()
        .filter(|l| !after.contains_key(&l.name))
        .map(|l| l.name.clone())
        .collect();
    let limits_changed = new
        .limits
        .iter()
        .filter(|l| before.get(&l.name).is_some_and(|o| o != *l))
        .map(|l| l.name.clone())
        .collect();
    let common = |doc: &RulesDoc, other: &BTreeMap<String, LimitDoc>| -> Vec<String> {
        doc.limits
            .iter()
            .filter(|l| other.contains_key(&l.name))
            .map(|l| l.name.clone())
            .collect()
    };
    let limits_reordered = common(old, &after) != common(new, &before);
    let mut whitelist = BTreeMap::new();
    let lists: [(&'static str, &Vec<String>, &Vec<String>); 3] = [
        ("user_ids", &old.whitelist.user_ids, &new.whitelist.user_ids),
        ("api_keys", &old.whitelist.api_keys, &new.whitelist.api_keys),
        (
            "client_ips",
            &old.whitelist.client_ips,
            &new.whitelist.client_ips,
        ),
    ];
    for (name, o, n) in lists {
        let o: BTreeSet<&String> = o.iter().collect();
        let n: BTreeSet<&String> = n.iter().collect();
        let added = n.difference(&o).count();
        let removed = o.difference(&n).count();
        if added > 0 || removed > 0 {
            whitelist.insert(name, (added, removed));
        }
    }
    ChangeSummary {
        limits_added,
        limits_removed,
        limits_changed,
        limits_reordered,
        whitelist,
        path_case_sensitive: (old.path_case_sensitive != new.path_case_sensitive)
            .then_some((old.path_case_sensitive, new.path_case_sensitive)),
    }
}

/// One line: `limits added [a]; limits changed [b]; whitelist.api_keys +1 -0`,
/// or `no change`.
impl fmt::Display for ChangeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let mut parts = Vec::new();
        for (what, names) in [
            ("limits added", &self.limits_added),
            ("limits removed", &self.limits_removed),
            ("limits changed", &self.limits_changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what} [{}]", names.join(", ")));
            }
        }
        if self.limits_reordered {
            parts.push("limits reordered".to_owned());
        }
        for (list, (added, removed)) in &self.whitelist {
            parts.push(format!("whitelist.{list} +{added} -{removed}"));
        }
        if let Some((from, to)) = self.path_case_sensitive {
            parts.push(format!("path_case_sensitive {from} -> {to}"));
        }
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> RulesDoc {
        RulesDoc::from_json(v.to_string().as_bytes()).unwrap()
    }

    fn fw(name: &str, limit: u64) -> serde_json::Value {
        json!({"name": name, "algorithm": "fixed_window", "limit": limit, "window": "1m"})
    }

    #[test]
    fn the_first_proposal_from_nothing_wins_and_later_seeds_conflict() {
        let mut a = Arbiter::default();
        assert_eq!(a.rule(Some(0), true), Ruling::Accepted { version: 1 });
        assert_eq!(a.rule(Some(0), true), Ruling::Conflict { current: 1 });
        assert_eq!(a.rule(None, true), Ruling::Accepted { version: 2 });
        assert_eq!(a.rule(Some(2), false), Ruling::Invalid { current: 2 });
        assert_eq!(a.rule(None, false), Ruling::Invalid { current: 2 });
        assert_eq!(a.rule(Some(1), false), Ruling::Conflict { current: 2 });
        assert_eq!(a.rule(Some(2), true), Ruling::Accepted { version: 3 });
        assert_eq!(a.version(), 3);
    }

    #[test]
    fn two_writers_from_the_same_version_one_wins() {
        let mut a = Arbiter::default();
        a.rule(None, true);
        let first = a.rule(Some(1), true);
        let second = a.rule(Some(1), true);
        assert_eq!(first, Ruling::Accepted { version: 2 });
        assert_eq!(second, Ruling::Conflict { current: 2 });
    }

    #[test]
    fn the_version_never_wraps() {
        let mut a = Arbiter { version: u64::MAX };
        assert_eq!(a.rule(None, true), Ruling::Invalid { current: u64::MAX });
    }

    #[test]
    fn summary_names_limits_and_counts_whitelist_entries() {
        let old = doc(json!({
            "limits": [fw("a", 1), fw("b", 2), fw("c", 3)],
            "whitelist": {"user_ids": ["ops", "ci"], "api_keys": ["sk_live_old"]}
        }));
        let new = doc(json!({
            "limits": [fw("a", 1), fw("b", 20), fw("d", 4)],
            "whitelist": {"user_ids": ["ops"], "api_keys": ["sk_live_new", "sk_live_two"],
                "client_ips": ["10.0.0.0/8"]},
            "path_case_sensitive": true
        }));
        let s = summarize(&old, &new);
        assert_eq!(s.limits_added, ["d"]);
        assert_eq!(s.limits_removed, ["c"]);
        assert_eq!(s.limits_changed, ["b"]);
        assert!(!s.limits_reordered);
        assert_eq!(s.whitelist["user_ids"], (0, 1));
        assert_eq!(s.whitelist["api_keys"], (2, 1));
        assert_eq!(s.whitelist["client_ips"], (1, 0));
        let text = s.to_string();
        assert_eq!(
            text,
            "limits added [d]; limits removed [c]; limits changed [b]; \
             whitelist.api_keys +2 -1; whitelist.client_ips +1 -0; \
             whitelist.user_ids +0 -1; path_case_sensitive false -> true"
        );
        for secret in ["sk_live", "ops", "ci", "10.0.0.0"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn summary_of_the_same_document_is_no_change_and_order_is_noticed() {
        let a = doc(json!({"limits": [fw("a", 1), fw("b", 2)]}));
        assert!(summarize(&a, &a).is_empty());
        assert_eq!(summarize(&a, &a).to_string(), "no change");
        let swapped = doc(json!({"limits": [fw("b", 2), fw("a", 1)]}));
        let s = summarize(&a, &swapped);
        assert!(s.limits_reordered);
        assert!(s.limits_changed.is_empty());
        assert_eq!(s.to_string(), "limits reordered");
    }

    #[test]
    fn a_proposal_written_by_a_newer_binary_is_still_read() {
        let text = json!({"proposal": "p1", "base_version": null, "by": "loopback",
            "doc": {"limits": [], "from_the_future": 1}, "extra": true});
        let p: ConfigProposal = serde_json::from_value(text).unwrap();
        assert_eq!(p.base_version, None);
        assert!(RulesDoc::from_json(p.doc.to_string().as_bytes()).is_err());
    }

    /// A proposal as a writer makes it: from the version it saw (or any),
    /// valid or not.
    fn proposal() -> impl Strategy<Value = (Option<u64>, bool)> {
        (proptest::option::of(0u64..6), proptest::bool::weighted(0.8))
    }

    fn rule_all(log: &[(Option<u64>, bool)]) -> Vec<Ruling> {
        let mut a = Arbiter::default();
        log.iter().map(|&(b, v)| a.rule(b, v)).collect()
    }

    proptest! {
        /// Writers' proposals interleaved into one log in any order: every
        /// follower reading it (in one go, in two, or again from the start
        /// after a crash) rules the same way on every proposal, and the accepted ones are versions
        /// 1, 2, 3... each edited from its predecessor or from any.
        #[test]
        fn followers_of_one_log_agree_on_every_version(
            writers in proptest::collection::vec(proptest::collection::vec(proposal(), 0..8), 1..4),
            picks in proptest::collection::vec(0usize..4, 0..40),
            cut in 0usize..40,
        ) {
            let mut queues: Vec<std::collections::VecDeque<_>> =
                writers.into_iter().map(Into::into).collect();
            let mut log = Vec::new();
            for p in picks.iter().copied().chain(0..queues.len()).cycle() {
                if queues.iter().all(|q| q.is_empty()) {
                    break;
                }
                let i = p % queues.len();
                if let Some(x) = queues[i].pop_front() {
                    log.push(x);
                }
            }
            let one = rule_all(&log);
            // The other follower reads the log in two goes...
            let cut = cut.min(log.len());
            let mut b = Arbiter::default();
            let mut two: Vec<Ruling> = log[..cut].iter().map(|&(x, v)| b.rule(x, v)).collect();
            two.extend(log[cut..].iter().map(|&(x, v)| b.rule(x, v)));
            prop_assert_eq!(&one, &two);
            // ...and after a crash, from the start again.
            prop_assert_eq!(&one, &rule_all(&log));

            let mut expected = 1u64;
            for (ruling, (base, valid)) in one.iter().zip(&log) {
                if let Ruling::Accepted { version } = *ruling {
                    prop_assert_eq!(version, expected);
                    prop_assert!(*valid);
                    prop_assert!(base.is_none_or(|b| b + 1 == version));
                    expected += 1;
                }
            }
            // Two proposals from the same base: at most one is accepted.
            let mut winners = BTreeMap::new();
            for (ruling, (base, _)) in one.iter().zip(&log) {
                if let (Ruling::Accepted { .. }, Some(b)) = (ruling, base) {
                    prop_assert!(winners.insert(*b, ()).is_none());
                }
            }
        }
    }
}
