//! Partition checkpoints in Redis, fenced by an epoch.
//!
//! Per partition two keys: `{prefix}:{group}:{topic}:{partition}:epoch`
//! (raised on every assignment: the fencing token) and `…:checkpoint` (a
//! hash of `epoch`, `next_offset`, `config_version`, `state`). One Lua
//! script writes the checkpoint only if the stored epoch is still the
//! writer's and the offset does not move backwards, atomically, so a zombie
//! instance that lost the partition cannot overwrite the new owner's
//! checkpoint.
//!
//! A Redis that lost data (restarted without persistence, flushed, failed
//! over to a replica behind) holds no epoch or an older one than the owner:
//! saves say `Forgotten`, and the owner re-seeds its checkpoint under a new
//! epoch. Epochs are therefore never plain counters: every new epoch is at
//! least `now_ms × 1024 + random(0..1024)` — the time it was issued, with
//! room for 1,024 per millisecond — so epochs issued after a loss are above
//! every epoch issued before it (given instance clocks closer than the time
//! between the two takeovers), and two instances never share one.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use quotaflow_core::pipeline::{Checkpoint, CheckpointError, CheckpointStore};

/// KEYS: epoch, checkpoint. ARGV: the epoch floor. Returns the new epoch
/// and the stored state (or nil). Lua numbers are doubles: exact up to
/// 2^53, far above `now_ms × 1024` (about 2^51), and written with `%d`.
const ACQUIRE: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = math.max(current + 1, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], string.format('%d', epoch))
return {epoch, redis.call('HGET', KEYS[2], 'state')}
"#;

/// KEYS: epoch, checkpoint. ARGV: epoch, next_offset, config_version, state.
const SAVE: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local ours = tonumber(ARGV[1])
if current > ours then
  return {'fenced', current}
end
if current < ours then
  return {'forgotten', current}
end
local stored = redis.call('HGET', KEYS[2], 'next_offset')
if stored and tonumber(ARGV[2]) < tonumber(stored) then
  return {'backwards', tonumber(stored)}
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'next_offset', ARGV[2], 'config_version', ARGV[3], 'state', ARGV[4])
return {'ok', current}
"#;

/// KEYS: epoch, checkpoint. ARGV: our (forgotten) epoch, the proposed new
/// epoch (above ours), next_offset, config_version, state. Writes the
/// checkpoint under the proposed epoch unless a newer owner holds the
/// partition or a checkpoint further ahead is stored. Idempotent: when the
/// proposed epoch is already stored, an earlier call landed and only its
/// reply was lost.
const RESEED: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local ours = tonumber(ARGV[1])
local proposed = tonumber(ARGV[2])
if current ~= proposed then
  if current > ours then
    return {'fenced', current}
  end
  local stored = redis.call('HGET', KEYS[2], 'next_offset')
  if stored and tonumber(stored) > tonumber(ARGV[3]) then
    return {'ahead', tonumber(stored)}
  end
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[2], 'next_offset', ARGV[3], 'config_version', ARGV[4], 'state', ARGV[5])
return {'ok', proposed}
"#;

/// The least epoch issued now: the time in ms, times 1,024, plus a random
/// spread, so that two instances taking over in the same millisecond after
/// a loss do not share a token.
fn epoch_floor() -> u64 {
    crate::clock::now_ms()
        .saturating_mul(1024)
        .saturating_add(u64::from(rand::random::<u16>() % 1024))
}

/// Checkpoints of one consumer group's partitions of one topic.
pub struct RedisCheckpoints {
    client: redis::Client,
    /// One connection per partition, so that partitions drained together
    /// save together: a slow or unreachable Redis then costs a revoke one
    /// timeout, not one per partition.
    conns: Mutex<HashMap<i32, redis::Connection>>,
    /// Per partition, the epoch a re-seed proposed for the forgotten one:
    /// proposed again on a retry, so a re-seed whose reply was lost is
    /// recognised instead of fencing its own owner.
    proposals: Mutex<HashMap<i32, (u64, u64)>>,
    base: String,
    timeout: Duration,
    acquire: redis::Script,
    save: redis::Script,
    reseed: redis::Script,
    mark: redis::Script,
}

impl RedisCheckpoints {
    pub fn new(
        url: &str,
        prefix: &str,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, CheckpointError> {
        let client = redis::Client::open(url)
            .map_err(|e| CheckpointError::Unavailable(format!("redis url {url}: {e}")))?;
        Ok(Self {
            client,
            conns: Mutex::new(HashMap::new()),
            proposals: Mutex::new(HashMap::new()),
            base: format!("{prefix}:{group}:{topic}"),
            timeout,
            acquire: redis::Script::new(ACQUIRE),
            save: redis::Script::new(SAVE),
            reseed: redis::Script::new(RESEED),
            mark: redis::Script::new(MARK),
        })
    }

    fn keys(&self, partition: i32) -> (String, String) {
        (
            format!("{}:{partition}:epoch", self.base),
            format!("{}:{partition}:checkpoint", self.base),
        )
    }

    /// Run `f` on `partition`'s connection. The connection is taken out of
    /// the map while in use, so partitions never wait on each other's
    /// calls. A cached connection that broke while idle is replaced once; a
    /// timeout is not retried (it would double the wait on a stalled Redis).
    fn with_conn<T>(
        &self,
        partition: i32,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, CheckpointError> {
        let unavailable = |e: redis::RedisError| CheckpointError::Unavailable(e.to_string());
        let cached = self.conns.lock().remove(&partition);
        let was_cached = cached.is_some();
        let mut conn = match cached {
            Some(c) => c,
            None => self.connect().map_err(unavailable)?,
        };
        let value = match f(&mut conn) {
            Ok(v) => v,
            Err(e)
                if was_cached
                    && !e.is_timeout()
                    && (e.is_io_error() || e.is_connection_dropped()) =>
            {
                conn = self.connect().map_err(unavailable)?;
                f(&mut conn).map_err(unavailable)?
            }
            Err(e) => return Err(unavailable(e)),
        };
        self.conns.lock().insert(partition, conn);
        Ok(value)
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let c = self.client.get_connection_with_timeout(self.timeout)?;
        c.set_read_timeout(Some(self.timeout))?;
        c.set_write_timeout(Some(self.timeout))?;
        Ok(c)
    }

    /// The stored checkpoint of `partition` without taking ownership (tests, tooling).
    pub fn peek(&self, partition: i32) -> Result<(u64, Option<Checkpoint>), CheckpointError> {
        let (epoch_key, cp_key) = self.keys(partition);
        let (epoch, blob): (Option<u64>, Option<Vec<u8>>) = self.with_conn(partition, |c| {
            redis::pipe()
                .get(&epoch_key)
                .hget(&cp_key, "state")
                .query(c)
        })?;
        Ok((
            epoch.unwrap_or(0),
            blob.as_deref().map(Checkpoint::decode).transpose()?,
        ))
    }
}

/// Raise a partition's progress mark, never lower it (a paused former
/// owner's late mark must not undo a newer one). It lives an hour past its
/// last raise: a takeover reads it within minutes, and a mark left from a
/// deleted and recreated topic must not count its new events as replays.
const MARK: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1], 'PX', 3600000) end
return 1
";

impl CheckpointStore for RedisCheckpoints {
    fn mark_progress(&self, partition: i32, next_offset: i64) -> Result<(), CheckpointError> {
        let key = format!("{}:{partition}:progress", self.base);
        self.with_conn(partition, |c| {
            self.mark
                .key(&key)
                .arg(next_offset)
                .invoke::<i64>(c)
                .map(|_| ())
        })
    }

    fn progress(&self, partition: i32) -> Result<Option<i64>, CheckpointError> {
        let key = format!("{}:{partition}:progress", self.base);
        self.with_conn(partition, |c| redis::cmd("GET").arg(&key).query(c))
    }

    fn acquire(&self, partition: i32) -> Result<(u64, Option<Checkpoint>), CheckpointError> {
        let (epoch_key, cp_key) = self.keys(partition);
        let floor = epoch_floor();
        let (epoch, blob): (u64, Option<Vec<u8>>) = self.with_conn(partition, |c| {
            self.acquire
                .key(&epoch_key)
                .key(&cp_key)
                .arg(floor)
                .invoke(c)
        })?;
        Ok((epoch, blob.as_deref().map(Checkpoint::decode).transpose()?))
    }

    fn save(&self, partition: i32, epoch: u64, cp: &Checkpoint) -> Result<(), CheckpointError> {
        let (epoch_key, cp_key) = self.keys(partition);
        let blob = cp.encode()?;
        let (status, value): (String, i64) = self.with_conn(partition, |c| {
            self.save
                .key(&epoch_key)
                .key(&cp_key)
                .arg(epoch)
                .arg(cp.next_offset)
                .arg(cp.config_version)
                .arg(&blob[..])
                .invoke(c)
        })?;
        match status.as_str() {
            "ok" => Ok(()),
            "fenced" => Err(CheckpointError::Fenced {
                ours: epoch,
                current: value.max(0) as u64,
            }),
            "forgotten" => Err(CheckpointError::Forgotten {
                ours: epoch,
                current: value.max(0) as u64,
            }),
            "backwards" => Err(CheckpointError::Backwards {
                offered: cp.next_offset,
                stored: value,
            }),
            other => Err(CheckpointError::Unavailable(format!(
                "unexpected script answer {other}"
            ))),
        }
    }

    fn reseed(&self, partition: i32, ours: u64, cp: &Checkpoint) -> Result<u64, CheckpointError> {
        let (epoch_key, cp_key) = self.keys(partition);
        let blob = cp.encode()?;
        let proposed = {
            let mut proposals = self.proposals.lock();
            match proposals.get(&partition) {
                Some(&(forgotten, proposed)) if forgotten == ours => proposed,
                _ => {
                    let proposed = epoch_floor().max(ours.saturating_add(1));
                    proposals.insert(partition, (ours, proposed));
                    proposed
                }
            }
        };
        let (status, value): (String, i64) = self.with_conn(partition, |c| {
            self.reseed
                .key(&epoch_key)
                .key(&cp_key)
                .arg(ours)
                .arg(proposed)
                .arg(cp.next_offset)
                .arg(cp.config_version)
                .arg(&blob[..])
                .invoke(c)
        })?;
        let value = u64::try_from(value).unwrap_or(0);
        // Kept after success too (one per partition, until it leaves): a
        // caller that never heard the answer asks again with the same epoch.
        if status != "ok" {
            self.proposals.lock().remove(&partition);
        }
        match status.as_str() {
            "ok" => Ok(value),
            "fenced" => Err(CheckpointError::Fenced {
                ours,
                current: value,
            }),
            // A checkpoint further ahead than this owner's state is stored:
            // another owner got there; never go back over it.
            "ahead" => Err(CheckpointError::Fenced {
                ours,
                current: ours,
            }),
            other => Err(CheckpointError::Unavailable(format!(
                "unexpected script answer {other}"
            ))),
        }
    }

    fn release(&self, partition: i32) {
        self.conns.lock().remove(&partition);
        self.proposals.lock().remove(&partition);
    }
}
