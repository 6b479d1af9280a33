//! The Redis state mode: every instance keeps its per-key state in one
//! Redis, so a group of sidecars behind a load balancer enforces one limit
//! (docs/redis-mode.md).
//!
//! - one Lua script ([`SCRIPT`]) decides all limits of a request atomically,
//!   on Redis's clock, with the same arithmetic as the core's algorithms;
//! - a few connection threads send the checks waiting at any moment as one
//!   pipeline: one round trip for many checks;
//! - [`DenyCache`] answers a key Redis refused until a known instant
//!   locally until then;
//! - [`config::SharedConfig`] keeps the group on one rate-limit config;
//! - [`Breaker`] stops paying the budget on every check while Redis is down,
//!   and probes for its return.
//!
//! The caller (the HTTP handler) bounds each check by the budget and, when
//! Redis cannot answer, applies each limit's failure mode.

mod breaker;
pub mod config;
mod deny_cache;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use smallvec::SmallVec;
use tokio::sync::oneshot;

use quotaflow_core::algorithms::{Spec, Verdict};
use quotaflow_core::rules::{FieldError, InvalidConfig, Rules};
use quotaflow_core::state::{KeyId, Probe, Probed};

use crate::metrics::Metrics;
use crate::settings::RedisSettings;
pub use breaker::Breaker;
pub use deny_cache::DenyCache;

/// The decision script (see its header for arguments and replies).
pub const SCRIPT: &str = include_str!("decide.lua");

/// The script's intermediates stay below 2^53 (a double's exact integers)
/// when the parameters keep these products within 2^51. State left by an
/// earlier config (a longer window reusing counts) can exceed it only where
/// the comparison is far from its threshold, so no verdict changes.
const EXACT: u128 = 1 << 51;

/// Checks waiting for one connection at most; past that a check is
/// answered by its failure mode at once (`overloaded`).
const QUEUE: usize = 65_536;

/// The rule sets the script can run exactly: token buckets that refill
/// within 2^51 ns (26 days) and sliding windows with `limit × window_ms`
/// within 2^51. Anything else is refused like an invalid config.
pub fn check_rules(rules: &Rules) -> Result<(), InvalidConfig> {
    let mut errors = Vec::new();
    for (i, limit) in rules.limits.iter().enumerate() {
        match limit.algorithm.spec() {
            Spec::TokenBucket { burst_ns, .. } if u128::from(burst_ns) > EXACT => {
                errors.push(FieldError::new(
                    format!("limits[{i}].refill_per_sec"),
                    "the Redis state mode needs a token bucket to refill completely within 26 days (capacity / refill_per_sec)",
                ))
            }
            Spec::SlidingWindow { limit, window_ms }
                if u128::from(limit) * u128::from(window_ms) > EXACT =>
            {
                errors.push(FieldError::new(
                    format!("limits[{i}].limit"),
                    "the Redis state mode needs a sliding window's limit × window (in ms) to be at most 2^51",
                ))
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(InvalidConfig(errors))
    }
}

/// Why Redis gave no answer; the label of `degraded_answers_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis did not answer within the budget")]
    Timeout,
    #[error("the Redis circuit breaker is open")]
    BreakerOpen,
    #[error("Redis cannot be reached")]
    Unreachable,
    #[error("the Redis script failed")]
    ScriptError,
    #[error("too many checks wait for Redis")]
    Overloaded,
}

impl Unavailable {
    pub fn reason(self) -> &'static str {
        match self {
            Unavailable::Timeout => "timeout",
            Unavailable::BreakerOpen => "breaker_open",
            Unavailable::Unreachable => "unreachable",
            Unavailable::ScriptError => "script_error",
            Unavailable::Overloaded => "overloaded",
        }
    }
}

/// Redis's answer to one check: one outcome per probe, in order.
#[derive(Debug, Clone)]
pub struct Answer {
    pub probed: SmallVec<[Probed; 4]>,
    /// When the check was sent: a refusal holds at least until this instant
    /// plus its `retry_after_ms` (Redis read its clock later).
    pub sent_at: Instant,
}

/// A check on its way to Redis.
pub type Pending = oneshot::Receiver<Result<Answer, Unavailable>>;

struct Job {
    keys: SmallVec<[String; 4]>,
    args: SmallVec<[u64; 24]>,
    deadline: Instant,
    reply: oneshot::Sender<Result<Answer, Unavailable>>,
}

/// The link to Redis that the connection threads and the prober share:
/// the client, the script, the breaker.
struct Link {
    client: redis::Client,
    sha: String,
    io_timeout: Duration,
    max_batch: usize,
    breaker: Breaker,
    /// Moves on every lost connection: refusals in the deny cache from
    /// before may be of state Redis no longer has (a restart, a failover).
    generation: AtomicU64,
    metrics: Arc<Metrics>,
}

/// The Redis state backend of one instance. Dropping it stops its threads.
pub struct RedisState {
    queues: Vec<SyncSender<Job>>,
    next: AtomicUsize,
    link: Arc<Link>,
    deny: Option<DenyCache>,
    prefix: String,
    budget: Duration,
}

impl RedisState {
    /// Start the connection threads and the prober. Redis need not be up:
    /// until it is, checks are answered by their failure modes.
    pub fn start(settings: &RedisSettings, metrics: Arc<Metrics>) -> redis::RedisResult<Self> {
        let client = redis::Client::open(settings.url.as_str())?;
        let budget = settings.budget;
        let link = Arc::new(Link {
            client,
            sha: redis::Script::new(SCRIPT).get_hash().to_owned(),
            // A connection outlives one slow answer; the check does not
            // wait for it (the caller's budget does).
            io_timeout: budget.saturating_mul(2).max(Duration::from_millis(100)),
            max_batch: settings.max_batch.max(1),
            breaker: Breaker::new(metrics.clone()),
            generation: AtomicU64::new(0),
            metrics,
        });
        // Not ready until Redis has answered once: an instance started with
        // Redis down reports it (and probes) before any check fails.
        if let Err(e) = link.connect() {
            link.breaker.open_now(&e.to_string());
        }
        let mut queues = Vec::new();
        for i in 0..settings.connections.max(1) {
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let s = link.clone();
            std::thread::Builder::new()
                .name(format!("redis-state-{i}"))
                .spawn(move || connection_loop(&rx, &s))
                .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
            queues.push(tx);
        }
        let weak = Arc::downgrade(&link);
        let every = settings.probe_interval;
        std::thread::Builder::new()
            .name("redis-state-probe".into())
            .spawn(move || breaker::probe_loop(&weak, every))
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
        Ok(Self {
            queues,
            next: AtomicUsize::new(0),
            link,
            deny: settings.deny_cache.then(DenyCache::new),
            prefix: settings.key_prefix.clone(),
            budget,
        })
    }

    /// The longest a check waits for Redis.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The Redis key of a state key (its keyed hash: no identity in clear).
    pub fn key_name(&self, key: KeyId) -> String {
        format!("{}:s:{key}", self.prefix)
    }

    /// Whether Redis is answering (the breaker is closed).
    pub fn is_available(&self) -> bool {
        !self.link.breaker.is_open()
    }

    /// A refusal known without asking Redis: the index of a probe whose key
    /// Redis refused for this cost (or less) until an instant not yet past,
    /// under the same rule set version.
    pub fn denied(&self, version: u64, probes: &[Probe<'_>], cost: u64) -> Option<(usize, Probed)> {
        let deny = self.deny.as_ref()?;
        let now = Instant::now();
        let hit = probes.iter().enumerate().find_map(|(i, p)| {
            p.enforce
                .then(|| deny.get(self.cache_epoch(version), p.key, cost, now))
                .flatten()
                .map(|v| (i, v))
        })?;
        self.link.metrics.redis.deny_cache_hits.inc();
        Some((
            hit.0,
            // Refused before: not the start of a breach.
            Probed::remote(hit.1, 1),
        ))
    }

    /// What a deny-cache entry belongs to: one rule set version over one
    /// unbroken run of connections to Redis.
    fn cache_epoch(&self, version: u64) -> (u64, u64) {
        (version, self.link.generation.load(Ordering::Relaxed))
    }

    /// Remember the enforced refusals of `answer` in the deny cache.
    pub fn remember(&self, version: u64, probes: &[Probe<'_>], cost: u64, answer: &Answer) {
        let Some(deny) = &self.deny else { return };
        for (p, o) in probes.iter().zip(&answer.probed) {
            let v = o.outcome.verdict;
            if p.enforce && !v.allowed && v.retry_after_ms > 0 {
                let until = answer.sent_at + Duration::from_millis(v.retry_after_ms);
                deny.put(self.cache_epoch(version), p.key, cost, until, v);
            }
        }
    }

    /// Send a check of `probes` at `cost` on Redis's clock.
    pub fn submit(&self, probes: &[Probe<'_>], cost: u64) -> Result<Pending, Unavailable> {
        self.submit_at(probes, cost, 0)
    }

    /// As [`RedisState::submit`], at `now_ms` instead of Redis's clock
    /// (0 = Redis's): for the tests that hold the script to the core's
    /// algorithms.
    pub fn submit_at(
        &self,
        probes: &[Probe<'_>],
        cost: u64,
        now_ms: u64,
    ) -> Result<Pending, Unavailable> {
        if self.link.breaker.is_open() {
            return Err(Unavailable::BreakerOpen);
        }
        let mut args: SmallVec<[u64; 24]> = SmallVec::new();
        args.push(now_ms);
        args.push(cost);
        let mut keys = SmallVec::new();
        for p in probes {
            keys.push(self.key_name(p.key));
            let (code, a, b, c) = match p.algorithm.spec() {
                Spec::TokenBucket {
                    capacity,
                    interval_ns,
                    burst_ns,
                } => (1, capacity, interval_ns, burst_ns),
                Spec::FixedWindow { limit, window_ms } => (2, limit, window_ms, 0),
                Spec::SlidingWindow { limit, window_ms } => (3, limit, window_ms, 0),
            };
            args.extend([code, a, b, c, u64::from(p.enforce)]);
        }
        let (reply, pending) = oneshot::channel();
        let job = Job {
            keys,
            args,
            deadline: Instant::now()
                .checked_add(self.budget)
                .unwrap_or_else(Instant::now),
            reply,
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        match self.queues[n].try_send(job) {
            Ok(()) => Ok(pending),
            Err(TrySendError::Full(_)) => Err(Unavailable::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(Unavailable::Unreachable),
        }
    }
}

fn connection_loop(rx: &Receiver<Job>, link: &Link) {
    let mut conn: Option<redis::Connection> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(link.max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < link.max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        drop_expired(&mut batch);
        if batch.is_empty() {
            continue;
        }
        if link.breaker.is_open() {
            fail_all(&mut batch, Unavailable::BreakerOpen);
            continue;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match link.connect() {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    link.lost(&e.to_string());
                    fail_all(&mut batch, Unavailable::Unreachable);
                    continue;
                }
            },
        };
        if let Err(e) = link.send(c, &mut batch) {
            // The connection's state is unknown (a half-read pipeline):
            // a new one for the next batch.
            conn = None;
            link.lost(&e.to_string());
            let why = if e.is_timeout() {
                Unavailable::Timeout
            } else {
                Unavailable::Unreachable
            };
            fail_all(&mut batch, why);
        }
    }
}

/// Answer, as timed out, the checks whose budget has passed (their callers
/// already answered by failure mode) and drop them: sent now, they would
/// be counted after a degraded answer.
fn drop_expired(batch: &mut Vec<Job>) {
    let now = Instant::now();
    let mut i = 0;
    while i < batch.len() {
        if batch[i].deadline > now && !batch[i].reply.is_closed() {
            i += 1;
        } else {
            let _ = batch.swap_remove(i).reply.send(Err(Unavailable::Timeout));
        }
    }
}

fn fail_all(batch: &mut Vec<Job>, why: Unavailable) {
    for j in batch.drain(..) {
        let _ = j.reply.send(Err(why));
    }
}

impl Link {
    /// A connection failed or broke.
    fn lost(&self, why: &str) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.breaker.failure(why);
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let mut c = self.client.get_connection_with_timeout(self.io_timeout)?;
        c.set_read_timeout(Some(self.io_timeout))?;
        c.set_write_timeout(Some(self.io_timeout))?;
        redis::Script::new(SCRIPT).load(&mut c)?;
        Ok(c)
    }

    /// One round trip for the whole batch; jobs are answered as their
    /// replies are read. A script Redis forgot (`NOSCRIPT`: a restart or
    /// `SCRIPT FLUSH`) is loaded again and only those jobs, which did not
    /// run, are sent again.
    fn send(&self, c: &mut redis::Connection, batch: &mut Vec<Job>) -> redis::RedisResult<()> {
        for attempt in 0..2 {
            // Connecting or reloading the script took time: checks past
            // their budget by now were answered by failure mode.
            drop_expired(batch);
            if batch.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for j in batch.iter() {
                pipe.cmd("EVALSHA")
                    .arg(&self.sha)
                    .arg(j.keys.len())
                    .arg(&j.keys[..])
                    .arg(&j.args[..]);
            }
            let sent_at = Instant::now();
            let replies: Vec<Value> = pipe.query(c)?;
            self.metrics
                .redis
                .round_trip
                .observe(sent_at.elapsed().as_secs_f64());
            self.metrics.redis.batch_size.observe(batch.len() as f64);
            self.breaker.success();
            let mut again = Vec::new();
            for (j, v) in batch.drain(..).zip(replies) {
                match v {
                    Value::ServerError(e) if e.code() == "NOSCRIPT" && attempt == 0 => {
                        again.push(j);
                    }
                    Value::ServerError(e) => {
                        self.metrics.redis.script_errors.inc();
                        tracing::warn!(
                            event = "redis_script_error",
                            error = %e.details().unwrap_or(e.code()),
                            "the Redis state script failed"
                        );
                        let _ = j.reply.send(Err(Unavailable::ScriptError));
                    }
                    v => {
                        let answer = parse(&v, j.keys.len(), sent_at);
                        if answer.is_err() {
                            self.metrics.redis.script_errors.inc();
                        }
                        let _ = j.reply.send(answer);
                    }
                }
            }
            if again.is_empty() {
                return Ok(());
            }
            redis::Script::new(SCRIPT).load(c)?;
            *batch = again;
        }
        fail_all(batch, Unavailable::ScriptError);
        Ok(())
    }
}

/// The script's reply: the admitted flag, then seven integers per limit.
fn parse(v: &Value, n: usize, sent_at: Instant) -> Result<Answer, Unavailable> {
    let Value::Array(items) = v else {
        return Err(Unavailable::ScriptError);
    };
    if items.len() != 1 + 7 * n {
        return Err(Unavailable::ScriptError);
    }
    let int = |v: &Value| match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| Unavailable::ScriptError),
        _ => Err(Unavailable::ScriptError),
    };
    let mut probed = SmallVec::new();
    for chunk in items[1..].chunks_exact(7) {
        let verdict = Verdict {
            allowed: int(&chunk[0])? == 1,
            limit: int(&chunk[1])?,
            remaining: int(&chunk[2])?,
            reset_ms: int(&chunk[3])?,
            retry_after_ms: int(&chunk[4])?,
            clock_ms: int(&chunk[5])?,
        };
        let refused_before = u32::try_from(int(&chunk[6])?).unwrap_or(u32::MAX);
        probed.push(Probed::remote(verdict, refused_before));
    }
    Ok(Answer { probed, sent_at })
}
