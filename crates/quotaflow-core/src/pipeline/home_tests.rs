//! The arrival and home sides together: several partitions, their requests
//! topic and repartition topic simulated in memory, against an oracle that
//! counts each limit alone over the merged sequence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::checkpoint::Checkpoint;
use super::partition::{InputRecord, Output, PartitionProcessor, ProcessorConfig, RoutedEvent};
use super::records::RequestEvent;
use super::repartition::{append_to_batch, decode_batch, Body, BodyRef, Repartitioned};
use super::routing::Routing;
use crate::fingerprint::Fingerprinter;
use crate::limiter::Limiter;
use crate::rules::{Dimension, Request, RulesDoc};
use crate::state::{KeyId, KeyedStore};

/// A per-user limit (aligned), and per-IP, per-API-key and global limits
/// (unaligned), fixed windows of one hour: each one's final count is the
/// number of events it admitted, whatever their order.
const LIMITS: &str = r#"{"limits": [
    {"name": "per_user", "key": ["user_id"], "algorithm": "fixed_window", "limit": 6, "window": "1h"},
    {"name": "per_ip", "key": ["client_ip"], "algorithm": "fixed_window", "limit": 9, "window": "1h"},
    {"name": "per_key", "key": ["api_key"], "algorithm": "fixed_window", "limit": 11, "window": "1h"},
    {"name": "global", "algorithm": "fixed_window", "limit": 40, "window": "1h"}
]}"#;

fn limiter(json: &str) -> Limiter {
    let doc = RulesDoc::from_json(json.as_bytes()).unwrap();
    Limiter::new(doc, Fingerprinter::from_secret("t"), 1).unwrap()
}

fn cfg(routing: Option<Routing>) -> Arc<ProcessorConfig> {
    Arc::new(ProcessorConfig {
        topic: "requests".into(),
        max_clock_skew_ms: 1_000,
        alert_window_ms: 60_000,
        alert_min_refused: 1,
        alert_critical_refused: 5,
        every_event: false,
        sweep_interval_ms: 3_600_000,
        key_check: 1,
        routing,
    })
}

fn event(n: usize, user: usize, ip: usize, key: usize) -> RequestEvent {
    RequestEvent {
        event_id: format!("e{n}"),
        timestamp_ms: 1_000 + n as i64,
        user_id: Some(format!("u{user}")),
        api_key: Some(format!("sk_{key}")),
        client_ip: Some(format!("192.0.2.{ip}")),
        method: Some("GET".into()),
        path: Some("/x".into()),
        cost: 1,
        gateway_id: None,
    }
}

/// One partition: its requests log, its repartition log, both sides.
struct Part {
    log: Vec<RequestEvent>,
    rep_log: Vec<Vec<u8>>,
    arrival: PartitionProcessor,
    home: PartitionProcessor,
}

struct Group {
    limiter: Limiter,
    cfg: Arc<ProcessorConfig>,
    parts: Vec<Part>,
    /// Every output except repartition records, in emission order.
    outputs: Vec<Output>,
    duplicates: u64,
    /// Write repartition records as a version before format 4 did: one
    /// per key shape, with the original payload.
    legacy: bool,
}

impl Group {
    fn new(partitions: u32, limits: &str) -> Self {
        let cfg = cfg(Some(Routing::new(vec![Dimension::UserId], partitions)));
        let parts = (0..partitions as i32)
            .map(|p| Part {
                log: Vec::new(),
                rep_log: Vec::new(),
                arrival: PartitionProcessor::new(cfg.clone(), p, store(), None),
                home: PartitionProcessor::home(cfg.clone(), p, store(), None),
            })
            .collect();
        Self {
            limiter: limiter(limits),
            cfg,
            parts,
            outputs: Vec::new(),
            duplicates: 0,
            legacy: false,
        }
    }

    fn routing(&self) -> &Routing {
        self.cfg.routing.as_ref().unwrap()
    }

    /// Append `e` to its arrival partition's log.
    fn produce(&mut self, e: RequestEvent) -> usize {
        let req = Request {
            user_id: e.user_id.clone(),
            ..Request::default()
        };
        let p = self.routing().arrival(&req, &mut Vec::new()) as usize;
        self.parts[p].log.push(e);
        p
    }

    /// Process arrival partition `p`'s records `range`, delivering its
    /// repartition records to their homes' logs.
    fn arrive(&mut self, p: usize, range: std::ops::Range<usize>) {
        for offset in range {
            let e = self.parts[p].log[offset].clone();
            let payload = serde_json::to_vec(&e).unwrap();
            let rec = InputRecord {
                offset: offset as i64,
                broker_ts_ms: Some(e.timestamp_ms),
                key: None,
                payload: &payload,
            };
            let mut out = Vec::new();
            self.parts[p]
                .arrival
                .process(&self.limiter, rec, Ok(&e), &mut out);
            if self.legacy {
                for o in &mut out {
                    if let Output::Repartition { record, .. } = o {
                        record.body = Body::Payload(payload.clone());
                    }
                }
            }
            self.deliver(out);
        }
    }

    fn deliver(&mut self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Repartition { home, record } => {
                    let mut batch = Vec::new();
                    append_to_batch(&mut batch, &record);
                    self.parts[home as usize].rep_log.push(batch)
                }
                other => self.outputs.push(other),
            }
        }
    }

    /// Process home `q`'s repartition records from its position to the end.
    fn settle(&mut self, q: usize) {
        let from = self.parts[q].home.next_offset() as usize;
        for offset in from..self.parts[q].rep_log.len() {
            let bytes = self.parts[q].rep_log[offset].clone();
            let records = decode_batch(&bytes).unwrap();
            assert!(self.parts[q].home.start_routed(offset as i64));
            for r in &records {
                let decoded: RequestEvent;
                let event = match &r.body {
                    BodyRef::Request(req) => RoutedEvent::Request(req),
                    BodyRef::Payload(p) => {
                        decoded = serde_json::from_slice(p).unwrap();
                        RoutedEvent::Decoded(Ok(&decoded))
                    }
                };
                let mut out = Vec::new();
                let outcome = self.parts[q]
                    .home
                    .process_routed(&self.limiter, r, event, &mut out);
                assert_eq!((outcome.invalid, outcome.reason), (0, None));
                self.duplicates += outcome.duplicate;
                self.deliver(out);
            }
        }
    }

    fn run_all(&mut self) {
        for p in 0..self.parts.len() {
            let n = self.parts[p].log.len();
            let from = self.parts[p].arrival.next_offset() as usize;
            self.arrive(p, from..n);
        }
        for q in 0..self.parts.len() {
            self.settle(q);
        }
    }

    /// Every key's (window, count) over both sides of every partition.
    fn state(&self) -> BTreeMap<KeyId, (u64, u64)> {
        let mut all = BTreeMap::new();
        for part in &self.parts {
            for side in [&part.arrival, &part.home] {
                for k in side.store().export() {
                    assert!(
                        all.insert(k.key, (k.state[0], k.state[1])).is_none(),
                        "a key counted in two places"
                    );
                }
            }
        }
        all
    }

    fn checkpoint(&self, p: usize) -> Checkpoint {
        let mut cp = self.parts[p].arrival.checkpoint(1);
        cp.home = self.parts[p].home.home_state();
        cp
    }

    fn restore(&mut self, p: usize, cp: &Checkpoint) {
        let part = &mut self.parts[p];
        part.arrival =
            PartitionProcessor::new(self.cfg.clone(), p as i32, store(), Some(cp.clone()));
        part.home = PartitionProcessor::home(self.cfg.clone(), p as i32, store(), Some(cp));
    }
}

fn store() -> Arc<KeyedStore> {
    Arc::new(KeyedStore::new(1))
}

/// Each limit alone, over the merged sequence in one partition: what
/// counting every key in one place must give for fixed-window totals.
fn oracle(events: &[RequestEvent]) -> BTreeMap<KeyId, (u64, u64)> {
    let doc: serde_json::Value = serde_json::from_str(LIMITS).unwrap();
    let mut all = BTreeMap::new();
    for limit in doc["limits"].as_array().unwrap() {
        let one = serde_json::json!({ "limits": [limit] }).to_string();
        let l = limiter(&one);
        let mut p = PartitionProcessor::new(cfg(None), 0, store(), None);
        for (offset, e) in events.iter().enumerate() {
            let rec = InputRecord {
                offset: offset as i64,
                broker_ts_ms: Some(e.timestamp_ms),
                key: None,
                payload: b"",
            };
            p.process(&l, rec, Ok(e), &mut Vec::new());
        }
        for k in p.store().export() {
            all.insert(k.key, (k.state[0], k.state[1]));
        }
    }
    all
}

fn ids(out: &[Output]) -> BTreeSet<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Decision(d) => Some(d.decision_id.clone()),
            Output::Alert(a) => Some(a.alert_id.clone()),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the partitions and the events, every key is counted in one
    /// place, and counts what one limiter over all events counts.
    #[test]
    fn unaligned_limits_count_once_across_partitions(
        partitions in 1u32..6,
        events in proptest::collection::vec((0usize..8, 0usize..4, 0usize..3), 1..120),
    ) {
        let events: Vec<RequestEvent> = events
            .iter()
            .enumerate()
            .map(|(n, &(u, ip, k))| event(n, u, ip, k))
            .collect();
        let mut g = Group::new(partitions, LIMITS);
        for e in &events {
            g.produce(e.clone());
        }
        g.run_all();
        prop_assert_eq!(g.state(), oracle(&events));
        prop_assert_eq!(g.duplicates, 0);
    }
}

/// The global limit of 40 admits exactly 40 of 100 events spread over four
/// partitions (per partition it would admit up to 160).
#[test]
fn a_global_limit_admits_its_limit_once_across_partitions() {
    let mut g = Group::new(4, LIMITS);
    for n in 0..100 {
        g.produce(event(n, n % 40, n % 200, n));
    }
    assert!(g.parts.iter().filter(|p| !p.log.is_empty()).count() > 1);
    g.run_all();
    let blocks: Vec<_> = g
        .outputs
        .iter()
        .filter_map(|o| match o {
            Output::Decision(d) => Some((d.key.clone(), d.decision_id.clone())),
            _ => None,
        })
        .collect();
    let [(key, id)] = &blocks[..] else {
        panic!("{blocks:?}")
    };
    assert_eq!(key, "global");
    assert!(id.contains(":decision/global:0"), "{id}");
    let global: Vec<(u64, u64)> = g
        .parts
        .iter()
        .flat_map(|p| p.home.store().export())
        .filter(|k| k.state[1] == 40)
        .map(|k| (k.state[0], k.state[1]))
        .collect();
    assert_eq!(global.len(), 1);
}

/// A source that crashes after delivering repartition records replays
/// them (same coordinates): the home skips the copies, and every output
/// id and final count is that of a run without the crash. `legacy`: the
/// source wrote the first format (one record per key shape, the payload)
/// before the crash and the current one after it, as in a rolling upgrade.
fn replayed_source(partitions: u32, legacy: bool) -> Group {
    let events: Vec<RequestEvent> = (0..90).map(|n| event(n, n % 5, n % 4, n % 3)).collect();
    let mut g = Group::new(partitions, LIMITS);
    for e in &events {
        g.produce(e.clone());
    }
    let p = partitions as usize;
    let busiest = (0..p).max_by_key(|&q| g.parts[q].log.len()).unwrap();
    let n = g.parts[busiest].log.len();
    // The same records in the same order, without the crash: which event
    // crosses a limit depends on the order, so that order is kept.
    let mut whole = Group::new(partitions, LIMITS);
    for e in &events {
        whole.produce(e.clone());
    }
    whole.arrive(busiest, 0..2 * n / 3);
    for q in 0..p {
        whole.settle(q);
    }
    whole.run_all();

    g.legacy = legacy;
    g.arrive(busiest, 0..n / 3);
    let cp = g.checkpoint(busiest);
    // Processed further, its outputs delivered, then a crash before the
    // next checkpoint; the homes applied part of what it routed.
    g.arrive(busiest, n / 3..2 * n / 3);
    for q in 0..p {
        g.settle(q);
    }
    g.legacy = false;
    g.restore(busiest, &cp);
    g.run_all();
    assert!(g.duplicates > 0, "the replay routed copies");
    assert_eq!(g.state(), whole.state());
    assert_eq!(g.state(), oracle(&events));
    assert_eq!(ids(&g.outputs), ids(&whole.outputs));
    g
}

#[test]
fn a_replayed_source_is_counted_once() {
    replayed_source(3, false);
}

/// With one partition every key shape of an event is homed alike and
/// travels in one record; its copies are recognised shape by shape.
#[test]
fn a_replayed_source_of_merged_records_is_counted_once() {
    let g = replayed_source(1, false);
    let merged = decode_batch(&g.parts[0].rep_log[0]).unwrap();
    assert_eq!(merged.len(), 1);
    assert_eq!(merged[0].shapes.len(), 3, "per_ip, per_key and global");
}

/// Records of the first format before the crash, of the current one in
/// the replay: each shape is still counted once.
#[test]
fn a_source_upgraded_between_crash_and_replay_is_counted_once() {
    for partitions in [1, 3] {
        replayed_source(partitions, true);
    }
}

/// A merged record some of whose shapes a first-format record already
/// applied (its writer upgraded mid-event's replay): only the rest count.
#[test]
fn a_merged_record_skips_only_the_shapes_already_applied() {
    let mut g = Group::new(1, LIMITS);
    g.produce(event(0, 0, 0, 0));
    g.legacy = true;
    g.arrive(0, 0..1);
    let legacy = decode_batch(&g.parts[0].rep_log[0]).unwrap();
    assert_eq!(legacy.len(), 3, "one first-format record per shape");
    // The home applies the first of them only.
    let first_only = {
        let mut b = vec![2u8];
        let whole = &g.parts[0].rep_log[0];
        let len = u32::from_be_bytes(whole[1..5].try_into().unwrap()) as usize;
        b.extend_from_slice(&whole[1..5 + len]);
        b
    };
    g.parts[0].rep_log[0] = first_only;
    g.settle(0);
    // The source replays, upgraded: one record of three shapes.
    g.parts[0].arrival = PartitionProcessor::new(g.cfg.clone(), 0, store(), None);
    g.legacy = false;
    g.arrive(0, 0..1);
    assert_eq!(
        decode_batch(&g.parts[0].rep_log[1]).unwrap()[0]
            .shapes
            .len(),
        3
    );
    g.settle(0);
    assert_eq!(g.duplicates, 1);
    let counted: Vec<(u64, u64)> = g.parts[0]
        .home
        .store()
        .export()
        .iter()
        .map(|k| (k.state[0], k.state[1]))
        .collect();
    assert_eq!(counted.len(), 3);
    assert!(counted.iter().all(|&(_, n)| n == 1), "{counted:?}");
}

/// A home restored from a checkpoint taken mid-stream replays its
/// repartition records from there to the same outputs, same ids.
#[test]
fn a_home_restored_mid_stream_replays_to_the_same_outputs() {
    let events: Vec<RequestEvent> = (0..120).map(|n| event(n, n % 7, n % 3, n % 2)).collect();
    let mut whole = Group::new(3, LIMITS);
    for e in &events {
        whole.produce(e.clone());
    }
    whole.run_all();

    let mut g = Group::new(3, LIMITS);
    for e in &events {
        g.produce(e.clone());
    }
    for p in 0..3 {
        let n = g.parts[p].log.len();
        g.arrive(p, 0..n);
    }
    // The global limit's home: its block comes after the 40th event.
    let q = g.routing().shape_home(
        &[],
        &Request::default(),
        g.limiter.fingerprinter(),
        &mut Vec::new(),
    ) as usize;
    let len = g.parts[q].rep_log.len();
    assert!(len > 10);
    for other in (0..3).filter(|&o| o != q) {
        g.settle(other);
    }
    // Home q applies half, is checkpointed, applies the rest, crashes.
    let full = std::mem::take(&mut g.parts[q].rep_log);
    g.parts[q].rep_log = full[..10].to_vec();
    g.settle(q);
    let cp = g.checkpoint(q);
    let before = g.outputs.len();
    g.parts[q].rep_log = full;
    g.settle(q);
    let first: Vec<Output> = g.outputs[before..].to_vec();
    assert!(!first.is_empty(), "outputs after the checkpoint");
    g.restore(q, &cp);
    let before = g.outputs.len();
    g.run_all();
    assert_eq!(&g.outputs[before..], &first[..], "the same outputs again");
    assert_eq!(g.state(), whole.state());
    assert_eq!(ids(&g.outputs), ids(&whole.outputs));
}

/// With every limit aligned, nothing is routed.
#[test]
fn aligned_limits_route_nothing() {
    let only_user = r#"{"limits": [{"name": "per_user", "key": ["user_id", "path"], "algorithm": "fixed_window", "limit": 2, "window": "1h"}]}"#;
    let mut g = Group::new(4, only_user);
    for n in 0..50 {
        g.produce(event(n, n % 3, 1, 1));
    }
    g.run_all();
    assert!(g.parts.iter().all(|p| p.rep_log.is_empty()));
    assert!(!g.outputs.is_empty());
}

/// One event routes one record per key shape: two limits keyed by the IP
/// share one; their ids name the source event and the shape.
#[test]
fn one_record_per_shape() {
    let limits = r#"{"limits": [
        {"name": "a", "key": ["client_ip"], "algorithm": "fixed_window", "limit": 1, "window": "1h"},
        {"name": "b", "key": ["client_ip"], "capacity": 1, "refill_per_sec": 0.001},
        {"name": "g", "algorithm": "fixed_window", "limit": 1, "window": "1h"}
    ]}"#;
    let mut g = Group::new(2, limits);
    let p = g.produce(event(0, 0, 1, 1));
    g.produce(event(1, 0, 1, 1));
    g.arrive(p, 0..2);
    let batches: Vec<Vec<u8>> = g.parts.iter().flat_map(|p| p.rep_log.clone()).collect();
    let mut shapes: Vec<(i64, u16, String)> = batches
        .iter()
        .flat_map(|b| decode_batch(b).unwrap())
        .flat_map(|r| {
            r.shapes
                .iter()
                .map(|s| (r.source_offset, s.seq, Repartitioned::shape_name(&s.dims)))
                .collect::<Vec<_>>()
        })
        .collect();
    shapes.sort();
    assert_eq!(
        shapes,
        vec![
            (0, 0, "client_ip".into()),
            (0, 1, "global".into()),
            (1, 0, "client_ip".into()),
            (1, 1, "global".into())
        ]
    );
    g.run_all();
    let mut got = ids(&g.outputs).into_iter().collect::<Vec<_>>();
    got.sort();
    let want = [
        format!("requests:{p}:1:decision/client_ip:0"),
        format!("requests:{p}:1:decision/client_ip:1"),
        format!("requests:{p}:1:decision/global:0"),
    ];
    assert_eq!(got, want);
}
