//! Restoring a partition checkpoint of 1,000,000 keys from a real Redis.
//!
//! `REDIS_URL=redis://127.0.0.1:6379 cargo bench --bench restore`
//! (`scripts/services.sh up` starts a Redis). Measures what a new owner does
//! on assignment: bump the epoch and load the checkpoint (`acquire`), decode
//! it, and rebuild the partition's key store. Target: ≤ 3 s. Prints medians
//! of 5 runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quotaflow_adapters::redis_checkpoints::RedisCheckpoints;
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::pipeline::partition::PartitionProcessor;
use quotaflow_core::pipeline::{Checkpoint, CheckpointStore, ProcessorConfig};
use quotaflow_core::state::{KeyedStore, StoredKey};

const KEYS: usize = 1_000_000;
const RUNS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("restore bench: set REDIS_URL (scripts/services.sh up starts a Redis)");
        std::process::exit(2);
    };
    let prefix = format!("qfbench-{}", std::process::id());
    let store =
        match RedisCheckpoints::new(&url, &prefix, "bench", "requests", Duration::from_secs(30)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("restore bench: {e}");
                std::process::exit(2);
            }
        };
    let fp = Fingerprinter::from_secret("bench");
    let keys: Vec<StoredKey> = (0..KEYS)
        .map(|i| StoredKey {
            key: fp.key_id(format!("per_user\u{1f}token_bucket\u{1f}user-{i:08}").as_bytes()),
            state: [1_700_000_000_000_000_000 + i as u64, 1_700_000_000_000, 0],
            expires_at_ms: 1_700_000_100_000,
            refused: 0,
        })
        .collect();
    let cp = Checkpoint {
        next_offset: 123_456_789,
        config_version: 1,
        key_check: fp.check_value(),
        watermark_ms: 1_700_000_000_000,
        horizon_ms: 1_700_000_000_000,
        keys,
        alerts: Vec::new(),
        home: Default::default(),
        pending_hits: Vec::new(),
    };
    let cfg = Arc::new(ProcessorConfig {
        topic: "requests".into(),
        max_clock_skew_ms: 1000,
        alert_window_ms: 60_000,
        alert_min_refused: 10,
        alert_critical_refused: 1000,
        every_event: false,
        sweep_interval_ms: 5_000,
        key_check: fp.check_value(),
        routing: None,
    });
    let (epoch, _) = store.acquire(0).unwrap_or_else(|e| panic!("acquire: {e}"));
    let started = Instant::now();
    let blob = cp.encode().unwrap_or_else(|e| panic!("encode: {e}"));
    store
        .save(0, epoch, &cp)
        .unwrap_or_else(|e| panic!("save: {e}"));
    println!(
        "checkpoint: {KEYS} keys, {:.1} MB encoded, first save {:.2} s",
        blob.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let shards = quotaflow::settings::StateSettings::default().effective_shards();
    let (mut load, mut rebuild, mut total, mut saves, mut snapshots) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let t = Instant::now();
        let (epoch, restored) = store.acquire(0).unwrap_or_else(|e| panic!("acquire: {e}"));
        let loaded = t.elapsed();
        let restored = restored.unwrap_or_else(|| panic!("no checkpoint"));
        assert_eq!(restored.keys.len(), KEYS);
        let t2 = Instant::now();
        let p = PartitionProcessor::new(
            cfg.clone(),
            0,
            Arc::new(KeyedStore::new(shards)),
            Some(restored),
        );
        assert_eq!(p.store().len(), KEYS);
        rebuild.push(t2.elapsed());
        load.push(loaded);
        total.push(t.elapsed());
        // The copy a checkpoint takes of the state: synchronous hits on the
        // partition wait for it (docs/group.md).
        let t4 = Instant::now();
        let snapshot = p.checkpoint(1);
        snapshots.push(t4.elapsed());
        let t3 = Instant::now();
        store
            .save(0, epoch, &snapshot)
            .unwrap_or_else(|e| panic!("save: {e}"));
        saves.push(t3.elapsed());
    }
    println!(
        "restore of {KEYS} keys (median of {RUNS}): total {:.2} s = acquire+load+decode {:.2} s + rebuild store {:.2} s; snapshot {:.1} ms; checkpoint write {:.2} s",
        median(total).as_secs_f64(),
        median(load).as_secs_f64(),
        median(rebuild).as_secs_f64(),
        median(snapshots).as_secs_f64() * 1e3,
        median(saves).as_secs_f64(),
    );
}
