//! Which config version a stream partition decides with, and when it may
//! move to the running one.
//!
//! A partition replayed after a crash must decide each record with the
//! version its first owner used, or the copies of its outputs would differ
//! from the originals (another action, another `config_version`). So a
//! partition does not follow the running version record by record: it
//! decides with a *pinned* version, and moves to a newer one only at a
//! checkpoint that records the new version at its offsets, saved before
//! any record is decided with it. For every saved checkpoint, the version
//! in force from its offsets to the next checkpoint is then the one it
//! names. A partition resumed from a checkpoint keeps that checkpoint's
//! version until it has passed every offset its previous owner may have
//! decided (the partition's high watermarks when it was taken).
//!
//! This type holds the policy, with no I/O: the worker (adapters) saves
//! the switch checkpoint and waits for it; the tests here replay it.

use std::sync::Arc;

use crate::limiter::Limiter;
use crate::rules::Rules;

/// The offsets a previous owner may have decided, which the restored
/// version must be kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Nothing to wait for: no previous owner in another process (the
    /// embedded bus), or the offsets are passed.
    Nothing,
    /// Keep the version until the arrival side's next offset reaches
    /// `requests` and the home side's reaches `repartition`: the high
    /// watermarks (log end offsets) of the two topics' partitions when the
    /// partition was taken.
    Until { requests: i64, repartition: i64 },
    /// The watermarks could not be read yet: keep the version (asked again).
    Unknown,
}

/// How the restored version was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// No checkpoint: the running version.
    Fresh,
    /// The checkpoint's version, known here.
    Pinned { version: u64 },
    /// The checkpoint's version is not among those this process keeps
    /// (older than its history, or another process's own numbering): the
    /// running version decides instead, and a replay may differ.
    Unknown { version: u64, running: u64 },
}

/// A partition's pinned config version.
#[derive(Debug, Clone)]
pub struct ConfigPin {
    rules: Arc<Rules>,
    hold: Hold,
}

impl ConfigPin {
    /// The pin of a partition resumed from a checkpoint of
    /// `restored_version` (none: a fresh partition), holding it for `hold`.
    pub fn restore(
        restored_version: Option<u64>,
        limiter: &Limiter,
        hold: Hold,
    ) -> (Self, Restored) {
        let running = limiter.rules();
        let (rules, how) = match restored_version {
            None => (running, Restored::Fresh),
            Some(version) => match limiter.rules_at(version) {
                Some(rules) => (rules, Restored::Pinned { version }),
                None => {
                    let how = Restored::Unknown {
                        version,
                        running: running.version,
                    };
                    (running, how)
                }
            },
        };
        (Self { rules, hold }, how)
    }

    /// The rules to decide with.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    pub fn version(&self) -> u64 {
        self.rules.version
    }

    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// The watermarks are known now (or are not needed).
    pub fn set_hold(&mut self, hold: Hold) {
        self.hold = hold;
    }

    /// Whether the partition should move to `running` now, its sides'
    /// next offsets being `requests_next` and `repartition_next`: only when
    /// it differs from the pinned version and every offset a previous
    /// owner may have decided is passed. The caller then saves a
    /// checkpoint recording `running.version` at these offsets, and calls
    /// [`ConfigPin::switch`] once it is saved.
    pub fn due(&mut self, running: &Rules, requests_next: i64, repartition_next: i64) -> bool {
        if running.version == self.rules.version {
            return false;
        }
        match self.hold {
            Hold::Nothing => true,
            Hold::Until {
                requests,
                repartition,
            } if requests_next >= requests && repartition_next >= repartition => {
                self.hold = Hold::Nothing;
                true
            }
            Hold::Until { .. } | Hold::Unknown => false,
        }
    }

    /// Decide with `rules` from now on: a checkpoint recording their
    /// version at the current offsets is saved.
    pub fn switch(&mut self, rules: Arc<Rules>) {
        self.rules = rules;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprinter;
    use crate::rules::RulesDoc;

    fn limiter() -> Limiter {
        let json = r#"{"limits": [{"name": "x", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1m"}]}"#;
        let doc = RulesDoc::from_json(json.as_bytes()).unwrap();
        Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap()
    }

    #[test]
    fn a_restored_version_is_held_until_both_marks_are_passed() {
        let l = limiter();
        let two = l.rules().doc().clone();
        l.replace_rules(two).unwrap();
        let (mut pin, how) = ConfigPin::restore(Some(1), &l, Hold::Unknown);
        assert_eq!((how, pin.version()), (Restored::Pinned { version: 1 }, 1));
        let running = l.rules();
        // Marks not read yet: the version stays, wherever the sides are.
        assert!(!pin.due(&running, 1_000, 1_000));
        pin.set_hold(Hold::Until {
            requests: 10,
            repartition: 4,
        });
        assert!(!pin.due(&running, 9, 4));
        assert!(!pin.due(&running, 10, 3));
        assert!(pin.due(&running, 10, 4));
        // Passed once, passed for good.
        assert_eq!(pin.hold(), Hold::Nothing);
        pin.switch(running.clone());
        assert!(!pin.due(&running, 10, 4));
    }

    #[test]
    fn an_unknown_or_missing_version_decides_with_the_running_one() {
        let l = limiter();
        let (pin, how) = ConfigPin::restore(Some(7), &l, Hold::Nothing);
        assert_eq!(
            how,
            Restored::Unknown {
                version: 7,
                running: 1
            }
        );
        assert_eq!(pin.version(), 1);
        let (pin, how) = ConfigPin::restore(None, &l, Hold::Nothing);
        assert_eq!((how, pin.version()), (Restored::Fresh, 1));
    }
}
