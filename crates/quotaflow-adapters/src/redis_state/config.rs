//! The rate-limit config of a Redis-mode group: one document and its
//! version in Redis, written with a compare-and-set, announced on a
//! channel and also polled, so a write to any instance runs on all within
//! a second even if a notice is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use quotaflow_core::limiter::{Limiter, ReplaceError};
use quotaflow_core::rules::{InvalidConfig, RulesDoc};

use crate::metrics::Metrics;
use crate::settings::RedisSettings;

/// KEYS: version, document. ARGV: the version the write was edited from
/// (-1: any), the document, the channel. Returns {1, new} or {0, current}.
const PUBLISH: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local expected = tonumber(ARGV[1])
if expected >= 0 and expected ~= cur then return {0, cur} end
local new = cur + 1
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], new)
redis.call('PUBLISH', ARGV[3], new)
return {1, new}
";

/// KEYS: version, document. ARGV: this instance's document and version,
/// whether to refill, the channel. Returns the group's version and document.
///
/// Joining seeds the group with this instance's config only when the group
/// has none (its first instance). Refilling (a Redis that lost its data, or
/// holds an older version than this instance runs) also replaces an older
/// stored version, so whichever instance gets there first, the newest
/// running version wins and versions never go back.
const JOIN: &str = r"
local v = redis.call('GET', KEYS[1])
if not v or (ARGV[3] == '1' and tonumber(v) < tonumber(ARGV[2])) then
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('PUBLISH', ARGV[4], ARGV[2])
  return {tonumber(ARGV[2]), ARGV[1]}
end
return {tonumber(v), redis.call('GET', KEYS[2])}
";

/// How often the stored version is read, beside the channel's notices.
const POLL: Duration = Duration::from_millis(500);

/// Why a config write did not run.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Refused(#[from] ReplaceError),
    #[error("the group's config store (Redis) cannot be written: {0}")]
    Unavailable(#[from] redis::RedisError),
}

impl From<InvalidConfig> for PublishError {
    fn from(e: InvalidConfig) -> Self {
        PublishError::Refused(ReplaceError::Invalid(e))
    }
}

pub struct SharedConfig {
    client: redis::Client,
    version_key: String,
    doc_key: String,
    channel: String,
    timeout: Duration,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    /// Whether this instance runs the group's config yet (false while Redis
    /// was down since start).
    joined: AtomicBool,
    /// The last group version that could not run here, logged once.
    refused: AtomicU64,
}

impl SharedConfig {
    /// Join the group's config (adopting it, or seeding it with the running
    /// one) and keep following it. Redis down at start is not fatal: the
    /// instance runs its own config and adopts the group's once it can.
    pub fn start(
        settings: &RedisSettings,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
    ) -> redis::RedisResult<Arc<Self>> {
        let p = &settings.key_prefix;
        let me = Arc::new(Self {
            client: redis::Client::open(settings.url.as_str())?,
            version_key: format!("{p}:config:version"),
            doc_key: format!("{p}:config:doc"),
            channel: format!("{p}:config"),
            timeout: settings.timeout,
            limiter,
            metrics,
            joined: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        });
        if let Err(e) = me.join() {
            tracing::warn!(
                event = "config_store_unavailable",
                error = %e,
                "cannot read the group's config from Redis: running this instance's own until it can"
            );
        }
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("redis-config".into())
            .spawn(move || follow(&weak))
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
        Ok(me)
    }

    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let c = self.client.get_connection_with_timeout(self.timeout)?;
        c.set_read_timeout(Some(self.timeout))?;
        c.set_write_timeout(Some(self.timeout))?;
        Ok(c)
    }

    fn join(&self) -> redis::RedisResult<()> {
        let mut c = self.connection()?;
        self.join_on(&mut c, Seed::IfEmpty)
    }

    fn join_on(&self, c: &mut redis::Connection, seed: Seed) -> redis::RedisResult<()> {
        let running = self.limiter.rules();
        let own = serde_json::to_string(running.doc())
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
        let (version, text): (u64, String) = redis::Script::new(JOIN)
            .key(&self.version_key)
            .key(&self.doc_key)
            .arg(own)
            .arg(running.version)
            .arg(u8::from(seed == Seed::IfOlder))
            .arg(&self.channel)
            .invoke(c)?;
        // A first join adopts the group's config whatever its version; a
        // refill only ever moves forward.
        self.run(version, &text, seed == Seed::IfEmpty);
        self.joined.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Store `doc` as the group's next version if the group runs
    /// `expected` (when given), and run it here at once.
    pub fn publish(&self, expected: Option<u64>, doc: RulesDoc) -> Result<u64, PublishError> {
        let doc = self.limiter.normalize(doc)?;
        let text = serde_json::to_string(&doc)
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
        let mut c = self.connection()?;
        let (ok, version): (u8, u64) = redis::Script::new(PUBLISH)
            .key(&self.version_key)
            .key(&self.doc_key)
            .arg(expected.map_or(-1, i128::from))
            .arg(text)
            .arg(&self.channel)
            .invoke(&mut c)?;
        if ok == 0 {
            return Err(ReplaceError::Conflict {
                expected: expected.unwrap_or_default(),
                current: version,
            }
            .into());
        }
        // The caller reports the change (metrics, log) as for any write.
        self.limiter.install(version, doc)?;
        Ok(version)
    }

    /// Run the stored version if it is newer than the running one; join
    /// the group if this instance has not yet, or if the store is empty.
    fn sync(&self, c: &mut redis::Connection) -> redis::RedisResult<()> {
        if !self.joined.load(Ordering::Relaxed) {
            return self.join_on(c, Seed::IfEmpty);
        }
        let (version, text): (Option<u64>, Option<String>) = redis::cmd("MGET")
            .arg(&self.version_key)
            .arg(&self.doc_key)
            .query(c)?;
        let running = self.limiter.rules().version;
        match (version, text) {
            (Some(v), Some(text)) if v >= running => {
                if v > running {
                    self.run(v, &text, false);
                }
            }
            (Some(v), Some(_)) => {
                tracing::warn!(
                    event = "config_store_behind",
                    stored = v,
                    running,
                    "the group's config in Redis is older than the one running here (restored from an old copy?): storing the running one again"
                );
                self.join_on(c, Seed::IfOlder)?;
            }
            _ => {
                tracing::warn!(
                    event = "config_store_empty",
                    "the group's config is gone from Redis (restarted without data?): storing the running one again"
                );
                self.join_on(c, Seed::IfOlder)?;
            }
        }
        Ok(())
    }

    fn run(&self, version: u64, text: &str, adopt: bool) {
        let old = self.limiter.rules();
        let result = RulesDoc::from_json(text.as_bytes()).and_then(|doc| {
            if adopt {
                self.limiter.adopt(version, doc).map(|()| true)
            } else {
                self.limiter.install(version, doc)
            }
        });
        match result {
            Ok(true) => {
                let summary =
                    quotaflow_core::config_log::summarize(old.doc(), self.limiter.rules().doc());
                self.metrics
                    .forget_removed_limits(&old, &self.limiter.rules());
                self.metrics
                    .config_version
                    .set(i64::try_from(version).unwrap_or(i64::MAX));
                tracing::info!(
                    event = "config_applied",
                    version,
                    by = "group",
                    summary = %summary,
                    "rate-limit config of the group now runs here"
                );
            }
            Ok(false) => {}
            Err(e) => {
                if self.refused.swap(version, Ordering::Relaxed) != version {
                    tracing::error!(
                        event = "config_not_applied",
                        version,
                        error = %e,
                        "the group's config cannot run here: the running one stays"
                    );
                }
            }
        }
    }
}

/// When `JOIN` stores this instance's config as the group's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seed {
    /// Only into an empty store: the group's config wins at a first join.
    IfEmpty,
    /// Also over an older stored version: a store that lost data is refilled
    /// with the newest version any instance still runs.
    IfOlder,
}

/// Follow the channel, and read the stored version whenever a notice comes
/// or `POLL` passes without one. Ends when the config store is dropped.
fn follow(weak: &Weak<SharedConfig>) {
    loop {
        let Some(me) = weak.upgrade() else { return };
        let subscribed = me.connection().and_then(|mut sync_conn| {
            let mut listen = me.connection()?;
            listen.set_read_timeout(Some(POLL))?;
            let mut sub = listen.as_pubsub();
            sub.subscribe(&me.channel)?;
            // Notices sent before the subscription are covered by this read.
            me.sync(&mut sync_conn)?;
            loop {
                match sub.get_message() {
                    Ok(_) => {}
                    Err(e) if e.is_timeout() => {}
                    Err(e) => return Err(e),
                }
                me.sync(&mut sync_conn)?;
                if weak.strong_count() <= 1 {
                    return Ok(());
                }
            }
        });
        match subscribed {
            Ok(()) => return,
            Err(_) => {
                drop(me);
                std::thread::sleep(POLL);
            }
        }
    }
}
