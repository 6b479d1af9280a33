//! The compiled rule sets of the last few versions, by version number.
//!
//! A stream partition decides with the version *pinned* in its checkpoint
//! (docs/stream.md, "Config versions and replays"): the instance taking a
//! partition over after a crash must decide the records it replays with
//! the version their first owner used, which may no longer be the running
//! one. Every version a process runs passes through here, so it can hand
//! out any recent one without compiling a document again.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Rules;

/// How many versions a [`RulesHistory`] keeps by default: config changes
/// are rare, so sixteen cover far more than the few seconds between a
/// partition's checkpoint and its takeover.
pub const KEPT_VERSIONS: usize = 16;

/// The last few rule sets run, oldest first, versions strictly increasing.
#[derive(Debug)]
pub struct RulesHistory {
    kept: VecDeque<Arc<Rules>>,
    cap: usize,
}

impl Default for RulesHistory {
    fn default() -> Self {
        Self::with_capacity(KEPT_VERSIONS)
    }
}

impl RulesHistory {
    /// A history of at most `cap` versions (at least one).
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            kept: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// `rules` now run. A version at or below the newest kept means the
    /// process adopted another lineage of versions (the file config's
    /// version 1 replaced by a group's version 1, say): the kept versions
    /// from that number on are another config's, and go.
    pub fn record(&mut self, rules: Arc<Rules>) {
        while self
            .kept
            .back()
            .is_some_and(|newest| newest.version >= rules.version)
        {
            self.kept.pop_back();
        }
        self.kept.push_back(rules);
        while self.kept.len() > self.cap {
            self.kept.pop_front();
        }
    }

    /// The rule set of `version`, if it is still kept.
    pub fn get(&self, version: u64) -> Option<Arc<Rules>> {
        self.kept.iter().find(|r| r.version == version).cloned()
    }

    /// The oldest version kept.
    pub fn oldest(&self) -> Option<u64> {
        self.kept.front().map(|r| r.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprinter;
    use crate::rules::RulesDoc;

    fn rules(version: u64, limit: u64) -> Arc<Rules> {
        let json = format!(
            r#"{{"limits": [{{"name": "x", "key": ["user_id"], "algorithm": "fixed_window", "limit": {limit}, "window": "1m"}}]}}"#
        );
        let doc = RulesDoc::from_json(json.as_bytes()).unwrap();
        Arc::new(Rules::compile(doc, version, &Fingerprinter::from_secret("t")).unwrap())
    }

    #[test]
    fn keeps_the_last_versions_and_forgets_a_replaced_lineage() {
        let mut h = RulesHistory::with_capacity(3);
        for v in 1..=5 {
            h.record(rules(v, v));
        }
        assert_eq!(h.oldest(), Some(3));
        assert!(h.get(2).is_none());
        assert_eq!(h.get(4).unwrap().version, 4);
        // Adopting version 4 of another config: 4 and 5 were another's.
        h.record(rules(4, 40));
        assert!(h.get(5).is_none());
        assert_eq!(h.get(4).unwrap().doc(), rules(4, 40).doc());
        assert_eq!(h.get(3).unwrap().version, 3);
    }
}
