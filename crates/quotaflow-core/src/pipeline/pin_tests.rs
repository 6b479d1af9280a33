//! Pinned config versions across a crash: a partition whose config changes
//! mid-stream, killed at any point and resumed from its last checkpoint by
//! a new owner, publishes again exactly what it had published (same ids,
//! same actions, same `config_version`), and ends in the same state as a
//! run without the crash.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::checkpoint::Checkpoint;
use super::partition::{InputRecord, Output, PartitionProcessor, ProcessorConfig, RoutedEvent};
use super::pin::{ConfigPin, Hold};
use super::records::RequestEvent;
use super::repartition::{decode_batch, BodyRef};
use super::routing::Routing;
use crate::fingerprint::Fingerprinter;
use crate::limiter::Limiter;
use crate::rules::{Dimension, RulesDoc};
use crate::state::{KeyedStore, StoredKey};

/// Version 1, and version 2 with other quotas: per user (aligned, counted
/// where events arrive) and per IP (unaligned, counted at its home, here
/// the same partition's home side).
const V1: &str = r#"{"limits": [
    {"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 4, "window": "1h"},
    {"name": "per_ip", "key": ["client_ip"], "algorithm": "fixed_window", "limit": 6, "window": "1h"}
]}"#;
const V2: &str = r#"{"limits": [
    {"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 2, "window": "1h"},
    {"name": "per_ip", "key": ["client_ip"], "algorithm": "fixed_window", "limit": 3, "window": "1h"}
]}"#;

fn cfg() -> Arc<ProcessorConfig> {
    Arc::new(ProcessorConfig {
        topic: "requests".into(),
        max_clock_skew_ms: 1_000,
        alert_window_ms: 60_000,
        alert_min_refused: 1,
        alert_critical_refused: 5,
        // A decision per event: every output names the version it was
        // decided with, so a replay under another version shows.
        every_event: true,
        sweep_interval_ms: 3_600_000,
        key_check: 1,
        routing: Some(Routing::new(vec![Dimension::UserId], 1)),
    })
}

fn event(n: usize, user: usize, ip: usize) -> RequestEvent {
    RequestEvent {
        event_id: format!("e{n}"),
        timestamp_ms: 1_000 + n as i64,
        user_id: Some(format!("u{user}")),
        api_key: None,
        client_ip: Some(format!("192.0.2.{ip}")),
        method: Some("GET".into()),
        path: Some("/x".into()),
        cost: 1,
        gateway_id: None,
    }
}

/// One owner of partition 0: both sides, their pin, and what it published.
struct Owner {
    arrival: PartitionProcessor,
    home: PartitionProcessor,
    pin: ConfigPin,
}

impl Owner {
    fn start(limiter: &Limiter, restored: Option<&Checkpoint>, hold: Hold) -> Self {
        let (pin, _) = ConfigPin::restore(restored.map(|c| c.config_version), limiter, hold);
        let mut arrival = PartitionProcessor::new(cfg(), 0, store(), restored.cloned());
        let mut home = PartitionProcessor::home(cfg(), 0, store(), restored);
        arrival.pin(pin.rules().clone());
        home.pin(pin.rules().clone());
        Self { arrival, home, pin }
    }

    fn checkpoint(&self, version: u64) -> Checkpoint {
        let mut cp = self.arrival.checkpoint(version);
        cp.home = self.home.home_state();
        cp
    }

    fn state(&self) -> (Vec<StoredKey>, Vec<StoredKey>) {
        let sorted = |p: &PartitionProcessor| {
            let mut k = p.store().export();
            k.sort_by_key(|k| k.key);
            k
        };
        (sorted(&self.arrival), sorted(&self.home))
    }
}

fn store() -> Arc<KeyedStore> {
    Arc::new(KeyedStore::new(1))
}

/// The requests log, the repartition log, the saved checkpoint, what was
/// published, and the running config.
struct World {
    limiter: Limiter,
    events: Vec<RequestEvent>,
    /// Events produced so far (the requests topic's high watermark).
    produced: usize,
    rep_log: Vec<Vec<u8>>,
    saved: Option<Checkpoint>,
    published: Vec<Output>,
}

/// What each step does besides producing and deciding one event.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// The home side reads the records of source records below this
    /// (never decreasing from one step to the next: where it is at a step
    /// is the same in a run with a crash and without).
    home_below: usize,
    /// Take a periodic checkpoint after the step.
    checkpoint: bool,
}

impl World {
    fn new(events: Vec<RequestEvent>) -> Self {
        let doc = RulesDoc::from_json(V1.as_bytes()).unwrap();
        Self {
            limiter: Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap(),
            events,
            produced: 0,
            rep_log: Vec::new(),
            saved: None,
            published: Vec::new(),
        }
    }

    /// What a takeover now holds the restored version for: the two logs'
    /// ends (high watermarks).
    fn hold(&self) -> Hold {
        Hold::Until {
            requests: self.produced as i64,
            repartition: self.rep_log.len() as i64,
        }
    }

    fn change_config(&self) {
        let doc = RulesDoc::from_json(V2.as_bytes()).unwrap();
        assert_eq!(self.limiter.replace_rules(doc).unwrap(), 2);
    }

    fn publish(&mut self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Repartition { record, .. } => self.rep_log.push(record.encode()),
                other => self.published.push(other),
            }
        }
    }

    /// Decide requests records up to `produced` on the arrival side.
    fn arrive(&mut self, o: &mut Owner) {
        while (o.arrival.next_offset() as usize) < self.produced {
            let offset = o.arrival.next_offset() as usize;
            let e = self.events[offset].clone();
            let payload = serde_json::to_vec(&e).unwrap();
            let rec = InputRecord {
                offset: offset as i64,
                broker_ts_ms: Some(e.timestamp_ms),
                key: None,
                payload: &payload,
            };
            let mut out = Vec::new();
            o.arrival.process(&self.limiter, rec, Ok(&e), &mut out);
            self.publish(out);
        }
    }

    /// Read, on the home side, the repartition records in order while
    /// they are of source records below `below`. The home side lags by
    /// source records, not by repartition offsets: a replaying source
    /// publishes its records again, and a lag counted in offsets would
    /// make the crashed run's home side reach each source record later.
    fn settle(&mut self, o: &mut Owner, below: usize) {
        let from = o.home.next_offset() as usize;
        for offset in from..self.rep_log.len() {
            let bytes = self.rep_log[offset].clone();
            let records = decode_batch(&bytes).unwrap();
            let [r] = records.as_slice() else {
                panic!("one record a message here")
            };
            if r.source_offset >= i64::try_from(below).unwrap_or(i64::MAX) {
                return;
            }
            let decoded: RequestEvent;
            let event = match &r.body {
                BodyRef::Request(req) => RoutedEvent::Request(req),
                BodyRef::Payload(p) => {
                    decoded = serde_json::from_slice(p).unwrap();
                    RoutedEvent::Decoded(Ok(&decoded))
                }
            };
            let mut out = Vec::new();
            assert!(o.home.start_routed(offset as i64));
            let routed = o.home.process_routed(&self.limiter, r, event, &mut out);
            assert_eq!((routed.invalid, routed.reason), (0, None));
            self.publish(out);
        }
    }

    /// What the worker does between polls: a periodic checkpoint of the
    /// pinned version, and the switch to the running version once due (a
    /// checkpoint of the new version saved first; saves here never fail).
    fn between_polls(&mut self, o: &mut Owner, periodic: bool) {
        if periodic {
            self.saved = Some(o.checkpoint(o.pin.version()));
        }
        let running = self.limiter.rules();
        if o.pin
            .due(&running, o.arrival.next_offset(), o.home.next_offset())
        {
            self.saved = Some(o.checkpoint(running.version));
            o.arrival.pin(running.clone());
            o.home.pin(running.clone());
            o.pin.switch(running);
        }
    }

    /// Steps `range` of the run: produce event i, decide it, let the home
    /// side read, perhaps checkpoint; the config changes before step
    /// `change_at`.
    fn run(
        &mut self,
        o: &mut Owner,
        steps: &[Step],
        range: std::ops::Range<usize>,
        change_at: usize,
    ) {
        for i in range {
            if i == change_at {
                self.change_config();
            }
            self.produced = i + 1;
            self.arrive(o);
            self.settle(o, steps[i].home_below);
            self.between_polls(o, steps[i].checkpoint);
        }
    }

    /// After the last step: the home side reads everything, and every
    /// version change due is made.
    fn finish(&mut self, o: &mut Owner) {
        loop {
            self.settle(o, usize::MAX);
            self.between_polls(o, false);
            if o.home.next_offset() as usize == self.rep_log.len() {
                return;
            }
        }
    }
}

type Ids = BTreeMap<String, Output>;

fn id(o: &Output) -> String {
    match o {
        Output::Decision(d) => d.decision_id.clone(),
        Output::Alert(a) => a.alert_id.clone(),
        Output::DeadLetter { source_offset, .. } => format!("dead:{source_offset}"),
        Output::Repartition { .. } => unreachable!("kept apart"),
    }
}

/// Outputs by id; a copy must equal its original (same action, quota,
/// `config_version`, …): that is the guarantee.
fn dedup(out: &[Output]) -> Result<Ids, TestCaseError> {
    let mut by_id = Ids::new();
    for o in out {
        if let Some(first) = by_id.get(&id(o)) {
            prop_assert_eq!(first, o, "a copy differs from its original");
        } else {
            by_id.insert(id(o), o.clone());
        }
    }
    Ok(by_id)
}

/// The run without a crash. When the version may change is timing (a
/// new owner holds the restored version until it has passed the
/// watermarks at the takeover, the first owner did not): `held_from`
/// gives this run, from that step on, the hold a takeover there would
/// have, so that both runs change versions at the same offsets and their
/// outputs can be compared whole, not only the copies.
fn no_crash(
    events: &[RequestEvent],
    steps: &[Step],
    change_at: usize,
    held_from: usize,
) -> (Ids, Owner) {
    let mut w = World::new(events.to_vec());
    let mut o = Owner::start(&w.limiter, None, Hold::Nothing);
    w.run(&mut o, steps, 0..held_from, change_at);
    o.pin.set_hold(w.hold());
    w.run(&mut o, steps, held_from..events.len(), change_at);
    w.finish(&mut o);
    (dedup(&w.published).unwrap(), o)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Crash after step `crash_at`, the new owner resumes from the last
    /// saved checkpoint, holding its version up to the watermarks at the
    /// takeover: the copies equal their originals, and outputs by id and
    /// the final state equal the run without a crash.
    #[test]
    fn a_replay_across_a_config_change_decides_as_the_first_run(
        events in proptest::collection::vec((0usize..5, 0usize..3), 2..60),
        steps in proptest::collection::vec((0usize..4, proptest::bool::weighted(0.2)), 60),
        change_at in 0usize..60,
        crash_at in 0usize..60,
    ) {
        let events: Vec<RequestEvent> = events
            .iter()
            .enumerate()
            .map(|(n, &(u, ip))| event(n, u, ip))
            .collect();
        let n = events.len();
        // The home side lags 0 to 3 source records behind.
        let mut home_below = 0;
        let steps: Vec<Step> = steps
            .iter()
            .enumerate()
            .map(|(i, &(lag, checkpoint))| {
                home_below = home_below.max((i + 1).saturating_sub(lag));
                Step { home_below, checkpoint }
            })
            .collect();
        let (change_at, crash_at) = (change_at % n, crash_at % n);
        let (expected, reference) = no_crash(&events, &steps, change_at, crash_at);

        let mut w = World::new(events.clone());
        let mut first = Owner::start(&w.limiter, None, Hold::Nothing);
        w.run(&mut first, &steps, 0..crash_at, change_at);
        // kill -9: only the saved checkpoint and the logs are left.
        drop(first);
        let hold = w.hold();
        let restored = w.saved.clone();
        let mut second = Owner::start(&w.limiter, restored.as_ref(), hold);
        // The new owner first replays what is in the topics, then goes on.
        w.arrive(&mut second);
        w.between_polls(&mut second, false);
        w.run(&mut second, &steps, crash_at..n, change_at);
        w.finish(&mut second);

        let got = dedup(&w.published)?;
        let differing: Vec<(&String, Option<&Output>, Option<&Output>)> = got
            .keys()
            .chain(expected.keys())
            .filter(|k| got.get(*k) != expected.get(*k))
            .map(|k| (k, got.get(k), expected.get(k)))
            .collect();
        prop_assert!(differing.is_empty(), "n {} change {} crash {}: {:#?}", n, change_at, crash_at, differing.first());
        prop_assert_eq!(second.state(), reference.state());
        prop_assert_eq!(second.pin.version(), 2);
    }
}

/// Without the pin (each record under the running version), the same
/// crash publishes a copy that differs from its original: the property
/// above tests something.
#[test]
fn without_the_pin_a_replay_after_a_change_differs() {
    let events: Vec<RequestEvent> = (0..6).map(|n| event(n, 0, 0)).collect();
    let mut w = World::new(events);
    let mut o = Owner::start(&w.limiter, None, Hold::Nothing);
    w.saved = Some(o.checkpoint(1));
    for i in 0..4 {
        w.produced = i + 1;
        w.arrive(&mut o);
    }
    w.change_config();
    // The new owner decides with whatever runs: version 2.
    let cp = w.saved.clone().unwrap();
    let mut unpinned = PartitionProcessor::new(cfg(), 0, store(), Some(cp));
    let mut out = Vec::new();
    for offset in 0..4 {
        let e = w.events[offset].clone();
        let rec = InputRecord {
            offset: offset as i64,
            broker_ts_ms: Some(e.timestamp_ms),
            key: None,
            payload: b"",
        };
        unpinned.process(&w.limiter, rec, Ok(&e), &mut out);
    }
    w.publish(out);
    let mut by_id = Ids::new();
    let differs = w
        .published
        .iter()
        .any(|o| match by_id.insert(id(o), o.clone()) {
            Some(first) => first != *o,
            None => false,
        });
    assert!(differs);
}
