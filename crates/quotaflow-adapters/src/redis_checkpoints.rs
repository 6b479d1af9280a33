//! Partition checkpoints in Redis, fenced by an epoch.
//!
//! Per partition two keys: `{prefix}:{group}:{topic}:{partition}:epoch`
//! (INCR on every assignment: the fencing token) and `…:checkpoint` (a hash
//! of `epoch`, `next_offset`, `config_version`, `state`). One Lua script
//! writes the checkpoint only if the stored epoch is still the writer's and
//! the offset does not move backwards, atomically, so a zombie instance that
//! lost the partition cannot overwrite the new owner's checkpoint.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use quotaflow_core::pipeline::{Checkpoint, CheckpointError, CheckpointStore};

const SAVE: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {'fenced', current}
end
local stored = redis.call('HGET', KEYS[2], 'next_offset')
if stored and tonumber(ARGV[2]) < tonumber(stored) then
  return {'backwards', tonumber(stored)}
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'next_offset', ARGV[2], 'config_version', ARGV[3], 'state', ARGV[4])
return {'ok', current}
"#;

/// Checkpoints of one consumer group's partitions of one topic.
pub struct RedisCheckpoints {
    client: redis::Client,
    /// One connection per partition, so that partitions drained together
    /// save together: a slow or unreachable Redis then costs a revoke one
    /// timeout, not one per partition.
    conns: Mutex<HashMap<i32, redis::Connection>>,
    base: String,
    timeout: Duration,
    script: redis::Script,
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
            base: format!("{prefix}:{group}:{topic}"),
            timeout,
            script: redis::Script::new(SAVE),
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

impl CheckpointStore for RedisCheckpoints {
    fn acquire(&self, partition: i32) -> Result<(u64, Option<Checkpoint>), CheckpointError> {
        let (epoch_key, cp_key) = self.keys(partition);
        let (epoch, blob): (u64, Option<Vec<u8>>) = self.with_conn(partition, |c| {
            redis::pipe()
                .atomic()
                .incr(&epoch_key, 1)
                .hget(&cp_key, "state")
                .query(c)
        })?;
        Ok((epoch, blob.as_deref().map(Checkpoint::decode).transpose()?))
    }

    fn save(&self, partition: i32, epoch: u64, cp: &Checkpoint) -> Result<(), CheckpointError> {
        let (epoch_key, cp_key) = self.keys(partition);
        let blob = cp.encode()?;
        let (status, value): (String, i64) = self.with_conn(partition, |c| {
            self.script
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
            "backwards" => Err(CheckpointError::Backwards {
                offered: cp.next_offset,
                stored: value,
            }),
            other => Err(CheckpointError::Unavailable(format!(
                "unexpected script answer {other}"
            ))),
        }
    }

    fn release(&self, partition: i32) {
        self.conns.lock().remove(&partition);
    }
}
