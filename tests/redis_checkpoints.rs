//! The fenced checkpoint protocol against a real Redis.

mod common;

use std::time::Duration;

use common::services::{redis, unique};
use quotaflow_adapters::redis_checkpoints::RedisCheckpoints;
use quotaflow_core::pipeline::{Checkpoint, CheckpointError, CheckpointStore};
use quotaflow_core::state::{KeyId, StoredKey};

fn store(prefix: &str) -> RedisCheckpoints {
    RedisCheckpoints::new(
        &redis(),
        prefix,
        "group",
        "requests",
        Duration::from_secs(5),
    )
    .expect("store")
}

fn cp(next_offset: i64, keys: usize) -> Checkpoint {
    Checkpoint {
        next_offset,
        config_version: 7,
        key_check: 11,
        watermark_ms: 1_000,
        horizon_ms: 500,
        keys: (0..keys)
            .map(|i| StoredKey {
                key: KeyId(u128::MAX / 3 + i as u128),
                state: [i as u64, 2, 3],
                expires_at_ms: 9,
                refused: 0,
            })
            .collect(),
        alerts: Vec::new(),
        home: Default::default(),
        pending_hits: Vec::new(),
    }
}

#[test]
fn epochs_fence_zombies_and_offsets_only_move_forward() {
    let prefix = unique("qftest-fence");
    let owner1 = store(&prefix);
    let owner2 = store(&prefix);
    let (e1, none) = owner1.acquire(3).expect("acquire");
    assert!(none.is_none());
    owner1.save(3, e1, &cp(10, 5)).expect("save");

    let (e2, restored) = owner2.acquire(3).expect("acquire");
    assert!(e2 > e1, "{e2} > {e1}");
    assert_eq!(restored, Some(cp(10, 5)));

    // The old owner wakes up: refused, and the new owner's checkpoint stays.
    assert_eq!(
        owner1.save(3, e1, &cp(50, 1)),
        Err(CheckpointError::Fenced {
            ours: e1,
            current: e2
        })
    );
    assert_eq!(
        owner2.save(3, e2, &cp(9, 1)),
        Err(CheckpointError::Backwards {
            offered: 9,
            stored: 10
        })
    );
    owner2.save(3, e2, &cp(20, 2)).expect("save");
    let (epoch, stored) = owner1.peek(3).expect("peek");
    assert_eq!((epoch, stored), (e2, Some(cp(20, 2))));
    // Other partitions are independent.
    assert_eq!(owner1.peek(4).expect("peek"), (0, None));
}

#[test]
fn an_unreachable_redis_is_reported_within_the_timeout() {
    let store = RedisCheckpoints::new(
        "redis://127.0.0.1:1",
        "x",
        "g",
        "t",
        Duration::from_millis(500),
    )
    .expect("store");
    let started = std::time::Instant::now();
    let err = store.acquire(0).expect_err("nothing listens on port 1");
    assert!(matches!(err, CheckpointError::Unavailable(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A Redis that lost the partition's keys (restarted empty, flushed) or
/// went back to an older epoch (a replica behind): the owner's save says
/// `Forgotten`, its re-seed writes the live checkpoint under an epoch above
/// every earlier one, and a stale owner stays fenced.
#[test]
fn a_store_that_forgot_is_detected_and_reseeded_with_a_unique_epoch() {
    let prefix = unique("qftest-forgot");
    let zombie = store(&prefix);
    let owner = store(&prefix);
    let (stale, _) = zombie.acquire(2).expect("acquire");
    let (ours, _) = owner.acquire(2).expect("acquire");
    owner.save(2, ours, &cp(10, 3)).expect("save");
    let mut redis = redis::Client::open(redis())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let keys = |p: i32| {
        (
            format!("{prefix}:group:requests:{p}:epoch"),
            format!("{prefix}:group:requests:{p}:checkpoint"),
        )
    };
    let (epoch_key, cp_key) = keys(2);
    // Lost: no epoch, no checkpoint.
    let _: () = redis::cmd("DEL")
        .arg(&epoch_key)
        .arg(&cp_key)
        .query(&mut redis)
        .expect("DEL");
    assert_eq!(
        owner.save(2, ours, &cp(20, 4)),
        Err(CheckpointError::Forgotten { ours, current: 0 })
    );
    let reseeded = owner.reseed(2, ours, &cp(20, 4)).expect("reseed");
    assert!(reseeded > ours && reseeded > stale, "{reseeded}");
    // Its answer lost, the owner asks again: the same epoch, not a fence.
    assert_eq!(owner.reseed(2, ours, &cp(20, 4)), Ok(reseeded));
    assert_eq!(owner.peek(2).expect("peek"), (reseeded, Some(cp(20, 4))));
    assert_eq!(
        zombie.save(2, stale, &cp(99, 1)),
        Err(CheckpointError::Fenced {
            ours: stale,
            current: reseeded
        })
    );
    assert_eq!(
        zombie.reseed(2, stale, &cp(99, 1)),
        Err(CheckpointError::Fenced {
            ours: stale,
            current: reseeded
        })
    );
    owner
        .save(2, reseeded, &cp(30, 4))
        .expect("save under the new epoch");

    // Regressed: a failover brought back an older epoch and checkpoint.
    let _: () = redis::cmd("SET")
        .arg(&epoch_key)
        .arg(stale)
        .query(&mut redis)
        .expect("SET");
    assert_eq!(
        owner.save(2, reseeded, &cp(40, 4)),
        Err(CheckpointError::Forgotten {
            ours: reseeded,
            current: stale
        })
    );
    let again = owner.reseed(2, reseeded, &cp(40, 4)).expect("reseed");
    assert!(again > reseeded);
    // A re-seed never goes back over a checkpoint further ahead.
    let _: () = redis::cmd("SET")
        .arg(&epoch_key)
        .arg(stale)
        .query(&mut redis)
        .expect("SET");
    assert!(matches!(
        owner.reseed(2, again, &cp(35, 4)),
        Err(CheckpointError::Fenced { .. })
    ));
    let _: () = redis::cmd("SET")
        .arg(&epoch_key)
        .arg(again)
        .query(&mut redis)
        .expect("SET");
    // Epochs issued after a loss stay above every earlier one (epochs are
    // ordered by the millisecond they are issued in: let one pass).
    std::thread::sleep(std::time::Duration::from_millis(5));
    let _: () = redis::cmd("DEL")
        .arg(&epoch_key)
        .query(&mut redis)
        .expect("DEL");
    let (next, restored) = zombie.acquire(2).expect("acquire");
    assert!(next > again, "{next} > {again}");
    assert_eq!(restored, Some(cp(40, 4)));
}
