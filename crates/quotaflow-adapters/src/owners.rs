//! Who owns each partition, and where to ask it: the small registry the
//! sidecar forwards `/check` by (docs/group.md).
//!
//! One Redis hash per group and topic, `{prefix}:{group}:{topic}:owners`,
//! field = partition, value = `epoch address`. Each instance announces the
//! partitions it owns with the fencing epoch it holds them under; an entry
//! is replaced only by an equal or newer epoch, so a paused instance that
//! wakes up cannot point the group back at itself once a newer owner has
//! announced. Every instance re-reads the whole hash on a short period and
//! keeps it in memory: a lookup is a map read, never a Redis call.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;

/// KEYS: the hash. ARGV: address, then (partition, epoch) pairs. Writes
/// each pair unless a newer epoch is stored.
const ANNOUNCE: &str = r#"
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local stored = cur and tonumber(string.match(cur, '^(%d+)')) or -1
  if tonumber(ARGV[i + 1]) >= stored then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[1])
  end
end
return 1
"#;

/// KEYS: the hash. ARGV: (partition, exact value) pairs. Removes an entry
/// only while it is still ours.
const WITHDRAW: &str = r#"
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 1
"#;

/// One partition's owner as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub epoch: u64,
    /// `host:port` of its internal listener.
    pub address: String,
}

/// What this instance owns now: (partition, epoch) pairs.
pub type Owned = Box<dyn Fn() -> Vec<(i32, u64)> + Send + Sync>;

pub struct OwnerRegistry {
    owners: Arc<ArcSwap<HashMap<i32, Owner>>>,
    stop: Arc<AtomicBool>,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
    /// Closed when the thread ends: a stop waits for it a bounded time.
    ended: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long a stop waits for the last round (withdrawing this instance's
/// entries): a stalled Redis must not hold up a shutdown's drain.
const STOP_WAIT: Duration = Duration::from_millis(500);

impl OwnerRegistry {
    /// Announce `owned()` under `address` and follow everyone's entries,
    /// every `period`. Redis being down is not fatal: lookups keep the
    /// last known owners and the thread retries.
    pub fn start(
        url: &str,
        key: String,
        address: String,
        period: Duration,
        timeout: Duration,
        owned: Owned,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let owners = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (theirs, stopping) = (owners.clone(), stop.clone());
        let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("quotaflow-owners".into())
            .spawn(move || {
                let _ended = ended_tx;
                let mut follower = Follower {
                    client,
                    conn: None,
                    key,
                    address,
                    timeout,
                    announced: BTreeMap::new(),
                    announce: redis::Script::new(ANNOUNCE),
                    withdraw: redis::Script::new(WITHDRAW),
                    failing: false,
                };
                while !stopping.load(Ordering::Acquire) {
                    match follower.round(&owned()) {
                        Ok(map) => theirs.store(Arc::new(map)),
                        Err(e) => follower.failed(&e),
                    }
                    std::thread::park_timeout(period);
                }
                // Hand the partitions back at once: callers stop forwarding
                // to an instance that is going away.
                let _ = follower.round(&[]);
            })
            .map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Io, "spawning", e.to_string()))
            })?;
        Ok(Self {
            owners,
            stop,
            thread: parking_lot::Mutex::new(Some(thread)),
            ended: parking_lot::Mutex::new(ended),
        })
    }

    /// The owner of `partition` as last read.
    pub fn owner(&self, partition: i32) -> Option<Owner> {
        self.owners.load().get(&partition).cloned()
    }

    /// Every known owner, for the live page and tests.
    pub fn all(&self) -> Arc<HashMap<i32, Owner>> {
        self.owners.load_full()
    }

    /// Withdraw this instance's entries and stop following. Waits at most
    /// [`STOP_WAIT`]: with Redis stalled the thread is left to finish (or
    /// die with the process) and the entries to be replaced by the next
    /// owners.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().take() {
            t.thread().unpark();
            let ended = self.ended.lock().recv_timeout(STOP_WAIT);
            if matches!(ended, Err(std::sync::mpsc::RecvTimeoutError::Disconnected)) {
                let _ = t.join();
            }
        }
    }
}

impl Drop for OwnerRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Follower {
    client: redis::Client,
    conn: Option<redis::Connection>,
    key: String,
    address: String,
    timeout: Duration,
    /// What this instance last wrote: partition -> the exact value.
    announced: BTreeMap<i32, String>,
    announce: redis::Script,
    withdraw: redis::Script,
    failing: bool,
}

impl Follower {
    fn conn(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.conn.is_none() {
            let c = self.client.get_connection_with_timeout(self.timeout)?;
            c.set_read_timeout(Some(self.timeout))?;
            c.set_write_timeout(Some(self.timeout))?;
            self.conn = Some(c);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no connection")))
    }

    /// Announce what is owned, withdraw what no longer is, read everyone's.
    fn round(&mut self, owned: &[(i32, u64)]) -> redis::RedisResult<HashMap<i32, Owner>> {
        let result = self.exchange(owned);
        if result.is_err() {
            self.conn = None;
        } else if self.failing {
            self.failing = false;
            tracing::info!(
                event = "owners_registry_back",
                "the owner registry in Redis answers again"
            );
        }
        result
    }

    fn exchange(&mut self, owned: &[(i32, u64)]) -> redis::RedisResult<HashMap<i32, Owner>> {
        let now: BTreeMap<i32, String> = owned
            .iter()
            .map(|&(p, e)| (p, format!("{e} {}", self.address)))
            .collect();
        let gone: Vec<(i32, String)> = self
            .announced
            .iter()
            .filter(|(p, _)| !now.contains_key(p))
            .map(|(p, v)| (*p, v.clone()))
            .collect();
        let (key, address) = (self.key.clone(), self.address.clone());
        let (announce, withdraw) = (self.announce.clone(), self.withdraw.clone());
        let conn = self.conn()?;
        if !gone.is_empty() {
            let mut inv = withdraw.key(&key);
            for (p, v) in &gone {
                inv.arg(*p).arg(v);
            }
            inv.invoke::<i64>(conn)?;
        }
        if !owned.is_empty() {
            let mut inv = announce.key(&key);
            inv.arg(&address);
            for &(p, e) in owned {
                inv.arg(p).arg(e);
            }
            inv.invoke::<i64>(conn)?;
        }
        let raw: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(conn)?;
        self.announced = now;
        Ok(parse(raw))
    }

    fn failed(&mut self, e: &redis::RedisError) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(event = "owners_registry_unreachable", error = %e, "the owner registry in Redis cannot be read: forwarding uses the owners last seen");
        }
    }
}

/// Entries as stored; malformed ones (not written by this version) are
/// left out rather than trusted.
fn parse(raw: HashMap<String, String>) -> HashMap<i32, Owner> {
    raw.into_iter()
        .filter_map(|(p, v)| {
            let (epoch, address) = v.split_once(' ')?;
            Some((
                p.parse().ok()?,
                Owner {
                    epoch: epoch.parse().ok()?,
                    address: address.to_owned(),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_entries_are_left_out() {
        let raw = HashMap::from([
            ("0".to_owned(), "7 127.0.0.1:9000".to_owned()),
            ("1".to_owned(), "x 127.0.0.1:9000".to_owned()),
            ("two".to_owned(), "7 127.0.0.1:9000".to_owned()),
            ("3".to_owned(), "9".to_owned()),
        ]);
        let parsed = parse(raw);
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            parsed[&0],
            Owner {
                epoch: 7,
                address: "127.0.0.1:9000".into()
            }
        );
    }
}
