//! Prometheus metrics, and the one place where a decision becomes metrics
//! and structured log events.
//!
//! Label values are limit names from config and small fixed sets, never
//! request data: cardinality stays bounded and no key or API key can leak
//! into a label.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use quotaflow_core::limiter::{BreachEvent, Decision, LimitOutcome};
use quotaflow_core::pipeline::records::{Action, BreachAlert, DecisionRecord};
use quotaflow_core::pipeline::Output;
use quotaflow_core::rules::{Limit, Rules};
use quotaflow_core::state::KeyId;

/// Every metric quotaflow exports.
pub struct Metrics {
    registry: Registry,
    checks: IntCounterVec,
    limit_decisions: IntCounterVec,
    check_duration: Histogram,
    pub keys_tracked: IntGauge,
    pub keys_expired: IntCounter,
    /// New keys that found the store full (`state.max_keys`).
    pub keys_over_cap: IntCounter,
    pub config_version: IntGauge,
    config_updates: IntCounterVec,
    breaches: IntCounterVec,
    suspicious: IntCounterVec,
    invalid_requests: IntCounterVec,
    /// Breach episodes of the sync path, for one log line each way.
    episodes: Episodes,
    /// The latest breach starts and ends of the sync path, for the live
    /// page (`/ui`); taken only on an episode's edges, never per check.
    recent_edges: parking_lot::Mutex<VecDeque<BreachEdge>>,
    /// New breaches not logged because too many episodes were open.
    breach_logs_suppressed: IntCounter,
    /// HTTP connections open now.
    pub http_connections_open: IntGauge,
    /// Connections closed at once because `server.max_connections` were open.
    pub http_connections_refused: IntCounter,
    /// Errors accepting connections (e.g. out of file descriptors).
    pub http_accept_errors: IntCounter,
    /// The stream processor's metrics.
    pub stream: StreamMetrics,
    /// The Redis state backend's metrics.
    pub redis: RedisMetrics,
    /// 1 while `/readyz` answers 200; set when `/metrics` is scraped.
    pub ready: IntGauge,
    /// The key cap (`state.max_keys`), for an alert before it is reached.
    pub keys_max: IntGauge,
    /// Kafka mode: internal calls to partition owners, by phase and outcome.
    pub owner_calls: IntCounterVec,
    /// Kafka mode: synchronous hits in the partition log, by outcome.
    pub sync_hits: IntCounterVec,
    /// Seconds the longest ongoing breach episode of one key has lasted;
    /// set when `/metrics` is scraped (an abuse signal without a per-key label).
    breach_longest: IntGauge,
    catalog: Vec<MetricInfo>,
}

/// One exported metric: what `quotaflow metrics` prints, so docs and
/// dashboards are checked against the binary rather than against a list
/// kept by hand (a labelled metric is absent from `/metrics` until its
/// first sample).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricInfo {
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub help: String,
    pub labels: Vec<String>,
}

/// Registers metrics and notes each one in the catalog.
struct Registrar<'a> {
    registry: &'a Registry,
    catalog: Vec<MetricInfo>,
}

impl Registrar<'_> {
    fn add<C: Collector + Clone + Kind + 'static>(
        &mut self,
        c: &C,
    ) -> Result<(), prometheus::Error> {
        for d in c.desc() {
            self.catalog.push(MetricInfo {
                name: format!("quotaflow_{}", d.fq_name),
                kind: C::KIND,
                help: d.help.clone(),
                labels: d.variable_labels.clone(),
            });
        }
        self.registry.register(Box::new(c.clone()))
    }
}

/// The Prometheus type of a collector.
trait Kind {
    const KIND: &'static str;
}
impl Kind for IntCounter {
    const KIND: &'static str = "counter";
}
impl Kind for IntCounterVec {
    const KIND: &'static str = "counter";
}
impl Kind for IntGauge {
    const KIND: &'static str = "gauge";
}
impl Kind for IntGaugeVec {
    const KIND: &'static str = "gauge";
}
impl Kind for Histogram {
    const KIND: &'static str = "histogram";
}

/// Metrics of the Redis state backend (`[state] backend = "redis"`).
pub struct RedisMetrics {
    /// Time from sending a batch of checks to Redis to its last answer.
    pub round_trip: Histogram,
    /// Checks sent to Redis in one round trip.
    pub batch_size: Histogram,
    /// Script calls Redis answered with an error (other than `NOSCRIPT`,
    /// which reloads the script).
    pub script_errors: IntCounter,
    /// 1 while the circuit breaker is open (Redis deemed down).
    pub breaker_open: IntGauge,
    /// Checks answered by a limit's failure mode, by reason.
    pub degraded: IntCounterVec,
    /// Refusals answered from the deny cache without a round trip.
    pub deny_cache_hits: IntCounter,
}

impl RedisMetrics {
    fn new(reg: &mut Registrar) -> Result<Self, prometheus::Error> {
        let m = Self {
            round_trip: Histogram::with_opts(
                HistogramOpts::new(
                    "redis_round_trip_seconds",
                    "Time from sending a batch of checks to Redis to its answer.",
                )
                .buckets(vec![
                    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
                ]),
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "redis_batch_size",
                    "Checks sent to Redis in one round trip (pipelined).",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )?,
            script_errors: IntCounter::new(
                "redis_script_errors_total",
                "Script calls Redis answered with an error.",
            )?,
            breaker_open: IntGauge::new(
                "redis_breaker_open",
                "1 while the Redis circuit breaker is open: checks answer by their failure_mode without trying Redis.",
            )?,
            degraded: IntCounterVec::new(
                Opts::new(
                    "degraded_answers_total",
                    "Checks answered by their limits' failure_mode because the state could not answer, by reason: the Redis state mode's timeout, breaker_open, unreachable, script_error, overloaded; Kafka mode's no_owner, owner_moving, owner_timeout, owner_unreachable.",
                ),
                &["reason"],
            )?,
            deny_cache_hits: IntCounter::new(
                "deny_cache_hits_total",
                "Checks refused from the local deny cache: a key Redis refused until a known time.",
            )?,
        };
        reg.add(&m.round_trip)?;
        reg.add(&m.batch_size)?;
        reg.add(&m.script_errors)?;
        reg.add(&m.breaker_open)?;
        reg.add(&m.degraded)?;
        reg.add(&m.deny_cache_hits)?;
        Ok(m)
    }
}

/// Metrics of the stream processor (both modes).
pub struct StreamMetrics {
    pub events_consumed: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub partition_lag: IntGaugeVec,
    pub offsets_skipped: IntCounterVec,
    pub partitions_owned: IntGauge,
    pub decisions: IntCounterVec,
    pub alerts: IntCounterVec,
    pub checkpoint_duration: Histogram,
    pub checkpoint_failures: IntCounterVec,
    pub restore_duration: Histogram,
    pub rebalances: IntCounterVec,
    /// Checkpoints re-seeded under a new epoch after the store lost data.
    pub checkpoint_reseeds: IntCounter,
    /// Partitions whose worker stopped on its own and that this instance
    /// took over again, by why it stopped (fenced, checkpoints_stopped).
    pub partitions_retaken: IntCounterVec,
    /// Unix seconds of this instance's last successful checkpoint.
    pub checkpoint_last_success: IntGauge,
    /// Outputs published again by a restore that replayed events another
    /// owner had already decided (consumers drop them by `quotaflow.id`).
    pub outputs_republished: IntCounterVec,
    /// Decisions of the shadow config (`[shadow] config`), by action.
    pub shadow_decisions: IntCounterVec,
    /// Shadow decisions the shadow topic's producer could not take.
    pub shadow_decisions_dropped: IntCounter,
    /// Repartition records (unaligned limits' events on their way to their
    /// key's home partition), by outcome: routed (sent by an arrival side),
    /// applied, duplicate (a replayed source's copy, skipped), invalid.
    pub repartition_records: IntCounterVec,
    /// The latest block/unblock decisions and alerts, for the live page.
    pub recent: RecentOutputs,
}

/// Rows kept of each kind in [`RecentOutputs`].
const RECENT_OUTPUTS: usize = 32;

/// The latest BLOCK/UNBLOCK decisions and breach alerts this instance
/// published, in both stream modes: a bounded ring written only when a key
/// changes state or an alert closes, never per allowed event.
#[derive(Default)]
pub struct RecentOutputs {
    decisions: parking_lot::Mutex<VecDeque<DecisionRecord>>,
    alerts: parking_lot::Mutex<VecDeque<BreachAlert>>,
}

impl RecentOutputs {
    pub fn note(&self, output: &Output) {
        fn push<T: Clone>(ring: &parking_lot::Mutex<VecDeque<T>>, item: &T) {
            // Cloned before the lock: every partition worker shares it.
            let item = item.clone();
            let mut ring = ring.lock();
            if ring.len() == RECENT_OUTPUTS {
                ring.pop_front();
            }
            ring.push_back(item);
        }
        match output {
            Output::Decision(d) if matches!(d.action, Action::Block | Action::Unblock) => {
                push(&self.decisions, d)
            }
            Output::Alert(a) => push(&self.alerts, a),
            _ => {}
        }
    }

    /// Newest first.
    pub fn decisions(&self) -> Vec<DecisionRecord> {
        self.decisions.lock().iter().rev().cloned().collect()
    }

    /// Newest first.
    pub fn alerts(&self) -> Vec<BreachAlert> {
        self.alerts.lock().iter().rev().cloned().collect()
    }
}

impl StreamMetrics {
    fn new(reg: &mut Registrar) -> Result<Self, prometheus::Error> {
        let m = Self {
            events_consumed: IntCounterVec::new(
                Opts::new(
                    "events_consumed_total",
                    "Request events processed, by partition.",
                ),
                &["partition"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "dead_letters_total",
                    "Events sent to the dead-letter topic, by reason kind (decode, invalid).",
                ),
                &["reason"],
            )?,
            offsets_skipped: IntCounterVec::new(
                Opts::new(
                    "offsets_skipped_total",
                    "Offsets between a partition's checkpoint and the first record read after it, by partition: events deleted by retention before they were processed (or transaction markers).",
                ),
                &["partition"],
            )?,
            partition_lag: IntGaugeVec::new(
                Opts::new(
                    "partition_lag",
                    "Events in the partition not yet processed (high watermark - next offset).",
                ),
                &["partition"],
            )?,
            partitions_owned: IntGauge::new(
                "partitions_owned",
                "Partitions this instance owns now.",
            )?,
            decisions: IntCounterVec::new(
                Opts::new(
                    "decisions_emitted_total",
                    "Decision records published, by action.",
                ),
                &["action"],
            )?,
            alerts: IntCounterVec::new(
                Opts::new(
                    "alerts_emitted_total",
                    "Breach alerts published, by severity.",
                ),
                &["severity"],
            )?,
            checkpoint_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "checkpoint_duration_seconds",
                    "Time to flush outputs and write one partition checkpoint.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            checkpoint_failures: IntCounterVec::new(
                Opts::new(
                    "checkpoint_failures_total",
                    "Checkpoints not written, by reason (fenced, unavailable, flush, backwards, corrupt).",
                ),
                &["reason"],
            )?,
            restore_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "restore_duration_seconds",
                    "Time to take a partition: bump its epoch and load its checkpoint.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            rebalances: IntCounterVec::new(
                Opts::new(
                    "rebalances_total",
                    "Partition assignments and revocations, by kind (assign, revoke).",
                ),
                &["kind"],
            )?,
            checkpoint_reseeds: IntCounter::new(
                "checkpoint_store_reseeds_total",
                "Partition checkpoints written again under a new epoch because the checkpoint store had lost the partition's epoch (Redis restarted empty, flushed, or failed over to a replica behind).",
            )?,
            partitions_retaken: IntCounterVec::new(
                Opts::new(
                    "partitions_retaken_total",
                    "Partitions still assigned here whose worker had stopped on its own, taken over again from their last checkpoint, by why the worker stopped (fenced, checkpoints_stopped).",
                ),
                &["reason"],
            )?,
            checkpoint_last_success: IntGauge::new(
                "checkpoint_last_success_timestamp_seconds",
                "Unix time of this instance's last successful partition checkpoint (0 before the first; checkpoints are taken only when a partition has new events).",
            )?,
            recent: RecentOutputs::default(),
            outputs_republished: IntCounterVec::new(
                Opts::new(
                    "outputs_republished_total",
                    "Outputs published again after a restore replayed events a previous owner had already decided, by kind (decision, alert, dead_letter); consumers drop them by their quotaflow.id header.",
                ),
                &["kind"],
            )?,
            shadow_decisions: IntCounterVec::new(
                Opts::new(
                    "shadow_decisions_total",
                    "Decisions the shadow config ([shadow] config) made beside the real one, by action (block, unblock, allow, deny); published to kafka.shadow_decisions_topic in Kafka mode.",
                ),
                &["action"],
            )?,
            shadow_decisions_dropped: IntCounter::new(
                "shadow_decisions_dropped_total",
                "Shadow decisions not published because the shadow topic's producer could not take them (its queue full or the topic unreachable); the real outputs are not affected.",
            )?,
            repartition_records: IntCounterVec::new(
                Opts::new(
                    "repartition_records_total",
                    "Events of unaligned limits routed to their key's home partition, one per event and key shape, by outcome: routed (sent where the event arrived), applied (counted at the home), duplicate (a copy a replaying source sent again, skipped), invalid (unreadable, skipped).",
                ),
                &["outcome"],
            )?,
        };
        reg.add(&m.events_consumed)?;
        reg.add(&m.dead_letters)?;
        reg.add(&m.partition_lag)?;
        reg.add(&m.offsets_skipped)?;
        reg.add(&m.partitions_owned)?;
        reg.add(&m.decisions)?;
        reg.add(&m.alerts)?;
        reg.add(&m.checkpoint_duration)?;
        reg.add(&m.checkpoint_failures)?;
        reg.add(&m.restore_duration)?;
        reg.add(&m.rebalances)?;
        // Exported at 0 from the start, so that the first one is an
        // increase Prometheus can see.
        for why in ["fenced", "checkpoints_stopped"] {
            m.partitions_retaken.with_label_values(&[why]);
        }
        reg.add(&m.checkpoint_reseeds)?;
        reg.add(&m.partitions_retaken)?;
        for kind in ["decision", "alert", "dead_letter"] {
            m.outputs_republished.with_label_values(&[kind]);
        }
        reg.add(&m.checkpoint_last_success)?;
        reg.add(&m.outputs_republished)?;
        reg.add(&m.shadow_decisions)?;
        reg.add(&m.shadow_decisions_dropped)?;
        for outcome in ["routed", "applied", "duplicate", "invalid"] {
            m.repartition_records.with_label_values(&[outcome]);
        }
        reg.add(&m.repartition_records)?;
        Ok(m)
    }
}

impl StreamMetrics {
    /// The lag gauge per partition, as last set (Kafka mode, every second).
    pub fn lags(&self) -> BTreeMap<i32, i64> {
        samples(&self.partition_lag)
            .into_iter()
            .filter_map(|(labels, v)| Some((labels.get("partition")?.parse().ok()?, v as i64)))
            .collect()
    }
}

/// Outcome label of a config update attempt.
#[derive(Debug, Clone, Copy)]
pub enum ConfigUpdate {
    Applied,
    Rejected,
    Unauthorized,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("quotaflow".into()), None)?;
        let mut reg = Registrar {
            registry: &registry,
            catalog: Vec::new(),
        };
        let checks = IntCounterVec::new(
            Opts::new(
                "checks_total",
                "Checks answered, by endpoint and verdict (allowed, refused, whitelisted).",
            ),
            &["endpoint", "verdict"],
        )?;
        let limit_decisions = IntCounterVec::new(
            Opts::new(
                "limit_decisions_total",
                "Per-limit verdicts: allowed, refused, or shadow_refused (a shadow limit that would have refused).",
            ),
            &["limit", "verdict"],
        )?;
        let check_duration = Histogram::with_opts(
            HistogramOpts::new(
                "check_duration_seconds",
                "Time to decide one check, from parsed request to decision.",
            )
            .buckets(vec![
                1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3,
            ]),
        )?;
        let keys_tracked = IntGauge::new("keys_tracked", "Per-key states held in memory.")?;
        let keys_expired =
            IntCounter::new("keys_expired_total", "Idle keys dropped by the sweeper.")?;
        let keys_over_cap = IntCounter::new(
            "keys_over_capacity_total",
            "New keys that found the key store full (state.max_keys): decided but not stored, or refused (state.when_full).",
        )?;
        reg.add(&keys_over_cap)?;
        let config_version = IntGauge::new(
            "config_version",
            "Version of the running rate-limit config.",
        )?;
        let config_updates = IntCounterVec::new(
            Opts::new(
                "config_updates_total",
                "Config update attempts, by result (applied, rejected, unauthorized).",
            ),
            &["result"],
        )?;
        let breaches = IntCounterVec::new(
            Opts::new(
                "breaches_total",
                "Keys that crossed a limit (one per breach, not per refused request).",
            ),
            &["limit", "shadow"],
        )?;
        let suspicious = IntCounterVec::new(
            Opts::new(
                "suspicious_patterns_total",
                "Suspicious client behaviour detected, by pattern.",
            ),
            &["limit", "pattern"],
        )?;
        let invalid_requests = IntCounterVec::new(
            Opts::new(
                "invalid_requests_total",
                "Requests refused as malformed (400), by endpoint (check, forward_auth, events).",
            ),
            &["endpoint"],
        )?;
        let http_connections_open =
            IntGauge::new("http_connections_open", "HTTP connections open now.")?;
        let http_connections_refused = IntCounter::new(
            "http_connections_refused_total",
            "Connections closed at once because server.max_connections were open.",
        )?;
        let http_accept_errors = IntCounter::new(
            "http_accept_errors_total",
            "Errors accepting HTTP connections (for example, out of file descriptors).",
        )?;
        let breach_logs_suppressed = IntCounter::new(
            "breach_logs_suppressed_total",
            "Breaches not logged because 100,000 breach episodes were open at once (they are still counted in checks and limit_decisions).",
        )?;
        reg.add(&breach_logs_suppressed)?;
        reg.add(&http_connections_open)?;
        reg.add(&http_connections_refused)?;
        reg.add(&http_accept_errors)?;
        reg.add(&checks)?;
        reg.add(&limit_decisions)?;
        reg.add(&check_duration)?;
        reg.add(&keys_tracked)?;
        reg.add(&keys_expired)?;
        reg.add(&config_version)?;
        reg.add(&config_updates)?;
        reg.add(&breaches)?;
        reg.add(&suspicious)?;
        reg.add(&invalid_requests)?;
        let stream = StreamMetrics::new(&mut reg)?;
        let redis = RedisMetrics::new(&mut reg)?;
        let ready = IntGauge::new("ready", "1 while /readyz answers 200 (set at each scrape).")?;
        let keys_max = IntGauge::new(
            "keys_max",
            "Keys the store holds at most (state.max_keys); compare with keys_tracked.",
        )?;
        let breach_longest = IntGauge::new(
            "breach_longest_seconds",
            "How long the longest ongoing breach episode of one key (sync checks) has lasted, in seconds (set at each scrape).",
        )?;
        let owner_calls = IntCounterVec::new(
            Opts::new(
                "owner_calls_total",
                "Kafka mode: checks (or their first, probing phase) sent to the partition owner of a limit key on another instance, by phase (apply, peek) and outcome (answered, unavailable).",
            ),
            &["phase", "outcome"],
        )?;
        let sync_hits = IntCounterVec::new(
            Opts::new(
                "sync_hits_logged_total",
                "Kafka mode: synchronous hits appended to their partition's log, by outcome: appended (acknowledged, then answered), append_failed (not acknowledged within the budget: answered by the failure mode, still counted), read_back (the owner's worker read its own hit back: already counted), replayed (counted from the log after the owner that answered it crashed), fenced (logged by an owner that had lost the partition, after the take-over: not counted).",
            ),
            &["outcome"],
        )?;
        for outcome in [
            "appended",
            "append_failed",
            "read_back",
            "replayed",
            "fenced",
        ] {
            sync_hits.with_label_values(&[outcome]);
        }
        reg.add(&ready)?;
        reg.add(&keys_max)?;
        reg.add(&owner_calls)?;
        reg.add(&sync_hits)?;
        reg.add(&breach_longest)?;
        let mut catalog = reg.catalog;
        catalog.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            stream,
            redis,
            registry,
            checks,
            limit_decisions,
            check_duration,
            keys_tracked,
            keys_expired,
            keys_over_cap,
            config_version,
            config_updates,
            breaches,
            suspicious,
            invalid_requests,
            http_connections_open,
            http_connections_refused,
            http_accept_errors,
            episodes: Episodes::default(),
            recent_edges: parking_lot::Mutex::new(VecDeque::with_capacity(RECENT_EDGES)),
            breach_logs_suppressed,
            ready,
            keys_max,
            owner_calls,
            sync_hits,
            breach_longest,
            catalog,
        })
    }

    /// Every metric this binary exports, labelled or not.
    pub fn catalog(&self) -> &[MetricInfo] {
        &self.catalog
    }

    /// The Prometheus text exposition of every metric; `now_ms` (on the
    /// episodes' clock: [`Metrics::episode_now`]) dates the gauges computed
    /// at scrape time.
    pub fn render(&self, now_ms: u64) -> String {
        self.breach_longest
            .set((self.episodes.longest_ms(now_ms) / 1000) as i64);
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn config_update(&self, result: ConfigUpdate) {
        let label = match result {
            ConfigUpdate::Applied => "applied",
            ConfigUpdate::Rejected => "rejected",
            ConfigUpdate::Unauthorized => "unauthorized",
        };
        self.config_updates.with_label_values(&[label]).inc();
    }

    pub fn invalid_request(&self, endpoint: &str) {
        self.invalid_requests.with_label_values(&[endpoint]).inc();
    }

    fn push_edge(&self, o: &LimitOutcome, limit: &Limit, started: bool, refused: u64) {
        let edge = BreachEdge {
            at_ms: o.verdict.clock_ms,
            started,
            limit: Arc::from(limit.name.as_str()),
            key: o.key,
            shadow: o.shadow,
            refused,
        };
        let mut recent = self.recent_edges.lock();
        if recent.len() >= RECENT_EDGES {
            recent.pop_front();
        }
        recent.push_back(edge);
    }

    /// The latest breach starts and ends of the sync path, newest first.
    pub fn recent_breaches(&self) -> Vec<BreachEdge> {
        self.recent_edges.lock().iter().rev().cloned().collect()
    }

    /// Forget breach episodes idle for 10 minutes (by the sweeper): a
    /// client that left while refused leaves no episode behind for long.
    pub fn sweep_episodes(&self, wall_now_ms: u64) -> usize {
        self.episodes.drop_stale(self.episode_now(wall_now_ms))
    }

    /// `wall_now_ms` on the clock the episodes are dated by (the state's:
    /// Redis's in the Redis state mode), for [`Metrics::render`] and
    /// [`Metrics::top_refused`].
    pub fn episode_now(&self, wall_now_ms: u64) -> u64 {
        let offset = self
            .episodes
            .clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        wall_now_ms.saturating_add_signed(offset)
    }

    /// The `n` ongoing breach episodes of the sync path with the most
    /// refusals, most first (those whose last refusal is within their
    /// calm spell).
    pub fn top_refused(&self, now_ms: u64, n: usize) -> Vec<OpenBreach> {
        self.episodes.top(now_ms, n)
    }

    /// Verdicts per limit since start, read without creating a series for
    /// a limit that has none (which `with_label_values` would).
    pub fn limit_counts(&self) -> BTreeMap<String, LimitCounts> {
        let mut counts: BTreeMap<String, LimitCounts> = BTreeMap::new();
        for (labels, value) in samples(&self.limit_decisions) {
            let (Some(limit), Some(verdict)) = (labels.get("limit"), labels.get("verdict")) else {
                continue;
            };
            let c = counts.entry(limit.clone()).or_default();
            match verdict.as_str() {
                "allowed" => c.allowed = value as u64,
                "refused" => c.refused = value as u64,
                "shadow_refused" => c.shadow_refused = value as u64,
                _ => {}
            }
        }
        counts
    }

    /// Count a decision and log its breach events, one structured event each.
    /// Drop the series of limits that `new` no longer has (by name), so a
    /// config that churns limit names does not grow the exposition forever.
    pub fn forget_removed_limits(&self, old: &Rules, new: &Rules) {
        for limit in &old.limits {
            let name = limit.name.as_str();
            if new.limits.iter().any(|l| l.name == name) {
                continue;
            }
            for v in ["allowed", "refused", "shadow_refused"] {
                let _ = self.limit_decisions.remove_label_values(&[name, v]);
            }
            for shadow in ["true", "false"] {
                let _ = self.breaches.remove_label_values(&[name, shadow]);
            }
            let _ = self
                .suspicious
                .remove_label_values(&[name, "ignores_retry_after"]);
        }
    }

    pub fn record(&self, endpoint: &str, rules: &Rules, decision: &Decision, took: Duration) {
        self.check_duration.observe(took.as_secs_f64());
        let verdict = if decision.whitelisted {
            "whitelisted"
        } else if decision.allowed {
            "allowed"
        } else {
            "refused"
        };
        self.checks.with_label_values(&[endpoint, verdict]).inc();
        for o in &decision.outcomes {
            let Some(limit) = rules.limits.get(o.limit) else {
                continue;
            };
            let v = match (o.verdict.allowed, o.shadow) {
                (true, _) => "allowed",
                (false, false) => "refused",
                (false, true) => "shadow_refused",
            };
            self.limit_decisions
                .with_label_values(&[limit.name.as_str(), v])
                .inc();
            let episode = self.episodes.observe(o, limit, decision.whitelisted);
            if episode == Episode::Quiet && o.event.is_none() {
                continue;
            }
            let key_fp = o.key;
            let dims: Vec<&str> = limit.key.iter().map(|d| d.as_str()).collect();
            let dims = dims.join(",");
            match episode {
                Episode::Started => {
                    self.push_edge(o, limit, true, 1);
                    self.breaches
                        .with_label_values(&[
                            limit.name.as_str(),
                            if o.shadow { "true" } else { "false" },
                        ])
                        .inc();
                    tracing::warn!(
                        event = "breach_started",
                        limit = %limit.name,
                        key_fp = %key_fp,
                        key_dimensions = %dims,
                        shadow = o.shadow,
                        quota = o.verdict.limit,
                        remaining = o.verdict.remaining,
                        retry_after_ms = o.verdict.retry_after_ms,
                        config_version = decision.version,
                        "key crossed its limit"
                    );
                }
                Episode::Ended { refused } => {
                    self.push_edge(o, limit, false, refused);
                    tracing::info!(
                        event = "breach_ended",
                        limit = %limit.name,
                        key_fp = %key_fp,
                        key_dimensions = %dims,
                        shadow = o.shadow,
                        refused,
                        "key is within its limit again"
                    );
                }
                Episode::Suppressed => self.breach_logs_suppressed.inc(),
                Episode::Quiet => {}
            }
            if let Some(BreachEvent::IgnoresRetryAfter { refused }) = o.event {
                self.suspicious
                    .with_label_values(&[limit.name.as_str(), "ignores_retry_after"])
                    .inc();
                tracing::warn!(
                    event = "suspicious_pattern",
                    pattern = "ignores_retry_after",
                    limit = %limit.name,
                    key_fp = %key_fp,
                    key_dimensions = %dims,
                    shadow = o.shadow,
                    refused,
                    "client keeps sending while refused"
                );
            }
        }
    }
}

/// Breach edges kept for the live page.
const RECENT_EDGES: usize = 32;

/// A breach episode of the sync path starting or ending.
#[derive(Debug, Clone)]
pub struct BreachEdge {
    /// The check's clock (Unix ms).
    pub at_ms: u64,
    /// `true` at the first refusal, `false` once the key is allowed again.
    pub started: bool,
    pub limit: Arc<str>,
    /// A keyed hash: shown as a fingerprint, never the key's values.
    pub key: KeyId,
    pub shadow: bool,
    /// Refusals in the episode (1 at its start).
    pub refused: u64,
}

/// An ongoing breach episode of the sync path.
#[derive(Debug, Clone)]
pub struct OpenBreach {
    pub limit: Arc<str>,
    pub key: KeyId,
    pub shadow: bool,
    pub refused: u64,
    pub started_ms: u64,
}

/// One limit's verdicts since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitCounts {
    pub allowed: u64,
    pub refused: u64,
    pub shadow_refused: u64,
}

/// The samples of a counter or gauge family, with their labels, without
/// touching the family's series.
fn samples(c: &impl Collector) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for family in c.collect() {
        let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        for m in family.get_metric() {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            let value = if counter {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            };
            out.push((labels, value));
        }
    }
    out
}

/// What one outcome meant for its key's breach episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Episode {
    Started,
    Ended {
        refused: u64,
    },
    Quiet,
    /// A new breach while [`MAX_EPISODES`] are open: counted, not logged.
    Suppressed,
}

/// Breach episodes of the sync path, for the log: an episode starts at a
/// key's first refusal and ends only once the key is allowed after a calm
/// spell without refusals (its limit's window, at least 1 s, at most
/// 60 s). A key held at its limit — refused, allowed, refused — is one
/// episode and two log lines, not two lines per refill. Bounded: at most
/// [`MAX_EPISODES`] open at once; past that, stale ones are dropped, and
/// then new breaches are counted (`breach_logs_suppressed_total`) but not
/// logged.
struct Episodes {
    /// Sharded by key, so checks of different keys do not queue on one lock.
    shards: Box<[parking_lot::Mutex<hashbrown::HashMap<KeyId, OpenEpisode>>]>,
    /// Open episodes per bucket of key ids (a counting filter): an allowed
    /// outcome whose bucket counts none — nearly every check, even while
    /// some keys are in breach — takes no lock at all.
    maybe_open: Box<[std::sync::atomic::AtomicU32]>,
    /// The state's clock less the wall clock, at the latest refusal: the
    /// Redis state mode dates verdicts by Redis's clock, so "now" for an
    /// episode is the wall clock shifted by this ([`Metrics::episode_now`]).
    clock_offset_ms: std::sync::atomic::AtomicI64,
}

/// Shards of the episode map.
const EPISODE_SHARDS: usize = 64;
/// Buckets of the counting filter in front of the map.
const EPISODE_BUCKETS: usize = 8192;

impl Default for Episodes {
    fn default() -> Self {
        Self {
            shards: (0..EPISODE_SHARDS).map(|_| Default::default()).collect(),
            maybe_open: (0..EPISODE_BUCKETS).map(|_| Default::default()).collect(),
            clock_offset_ms: Default::default(),
        }
    }
}

/// The filter bucket of `key` (its id is a keyed hash: its bits are even).
fn bucket(key: KeyId) -> usize {
    ((key.0 >> 64) as usize) % EPISODE_BUCKETS
}

#[derive(Debug, Clone)]
struct OpenEpisode {
    started_ms: u64,
    last_refusal_ms: u64,
    refused: u64,
    calm_ms: u64,
    /// For the live page's top refused keys; allocated once per episode.
    limit: Arc<str>,
    shadow: bool,
}

/// Breach episodes tracked at once.
const MAX_EPISODES: usize = 100_000;
/// Episodes idle this long are dropped without an end line (their key
/// never came back to be allowed).
const STALE_EPISODE_MS: u64 = 10 * 60 * 1000;

impl Episodes {
    /// The age of the longest episode still refusing at `now_ms`: one whose
    /// last refusal is within its calm spell.
    fn longest_ms(&self, now_ms: u64) -> u64 {
        self.shards
            .iter()
            .flat_map(|shard| {
                let open = shard.lock();
                open.values()
                    .filter(|e| now_ms.saturating_sub(e.last_refusal_ms) < e.calm_ms)
                    .map(|e| now_ms.saturating_sub(e.started_ms))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }

    /// The `n` episodes still refusing with the most refusals, most first.
    /// Each shard's lock is held while it is scanned, as for `longest_ms`.
    fn top(&self, now_ms: u64, n: usize) -> Vec<OpenBreach> {
        let mut top: Vec<OpenBreach> = Vec::with_capacity(n + 1);
        if n == 0 {
            return top;
        }
        for shard in self.shards.iter() {
            let open = shard.lock();
            for (key, e) in open.iter() {
                if now_ms.saturating_sub(e.last_refusal_ms) >= e.calm_ms
                    || (top.len() == n && top.last().is_some_and(|t| t.refused >= e.refused))
                {
                    continue;
                }
                let at = top.partition_point(|t| t.refused >= e.refused);
                top.insert(
                    at,
                    OpenBreach {
                        limit: e.limit.clone(),
                        key: *key,
                        shadow: e.shadow,
                        refused: e.refused,
                        started_ms: e.started_ms,
                    },
                );
                top.truncate(n);
            }
        }
        top
    }

    /// Drop the episodes of keys that have not been refused for
    /// [`STALE_EPISODE_MS`] (clients that left while refused): they never
    /// end by an allowed check, and each keeps its filter bucket set, which
    /// sends allowed checks of that bucket through a lock.
    fn drop_stale(&self, now_ms: u64) -> usize {
        self.shards
            .iter()
            .map(|shard| self.drop_stale_in(&mut shard.lock(), now_ms))
            .sum()
    }

    fn drop_stale_in(
        &self,
        open: &mut hashbrown::HashMap<KeyId, OpenEpisode>,
        now_ms: u64,
    ) -> usize {
        let before = open.len();
        open.retain(|key, e| {
            let keep = now_ms.saturating_sub(e.last_refusal_ms) < STALE_EPISODE_MS;
            if !keep {
                self.maybe_open[bucket(*key)].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            keep
        });
        before - open.len()
    }

    fn observe(&self, o: &LimitOutcome, limit: &Limit, whitelisted: bool) -> Episode {
        if whitelisted {
            return Episode::Quiet;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let now = o.verdict.clock_ms;
        if o.verdict.allowed && self.maybe_open[bucket(o.key)].load(Relaxed) == 0 {
            return Episode::Quiet;
        }
        if !o.verdict.allowed {
            let wall = crate::clock::now_ms();
            let offset = i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(wall).unwrap_or(0);
            self.clock_offset_ms.store(offset, Relaxed);
        }
        // The key id is a keyed hash: its low bits spread keys evenly.
        let shard = (o.key.0 as usize) % EPISODE_SHARDS;
        let mut open = self.shards[shard].lock();
        if o.verdict.allowed {
            // An allowed key with no breach: one probe.
            let Some(e) = open.get(&o.key) else {
                return Episode::Quiet;
            };
            if now.saturating_sub(e.last_refusal_ms) < e.calm_ms {
                return Episode::Quiet;
            }
            let refused = e.refused;
            open.remove(&o.key);
            self.maybe_open[bucket(o.key)].fetch_sub(1, Relaxed);
            return Episode::Ended { refused };
        }
        if let Some(e) = open.get_mut(&o.key) {
            e.last_refusal_ms = e.last_refusal_ms.max(now);
            e.refused = e.refused.saturating_add(1);
            return Episode::Quiet;
        }
        if open.len() >= MAX_EPISODES / EPISODE_SHARDS {
            self.drop_stale_in(&mut open, now);
            if open.len() >= MAX_EPISODES / EPISODE_SHARDS {
                return Episode::Suppressed;
            }
        }
        let calm_ms = limit.shape.window_secs.clamp(1, 60) * 1000;
        open.insert(
            o.key,
            OpenEpisode {
                started_ms: now,
                last_refusal_ms: now,
                refused: 1,
                calm_ms,
                limit: Arc::from(limit.name.as_str()),
                shadow: o.shadow,
            },
        );
        self.maybe_open[bucket(o.key)].fetch_add(1, Relaxed);
        Episode::Started
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quotaflow_core::fingerprint::Fingerprinter;
    use quotaflow_core::limiter::Limiter;
    use quotaflow_core::rules::{Request, RulesDoc};

    #[test]
    fn the_catalog_lists_every_exported_metric() {
        let m = Metrics::new().unwrap();
        let text = m.render(0);
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let listed: std::collections::BTreeSet<&str> =
            m.catalog().iter().map(|i| i.name.as_str()).collect();
        // Labelled metrics without a sample are not exported yet: the
        // catalog is a superset, and lists each metric once.
        assert!(exported.is_subset(&listed), "{exported:?} vs {listed:?}");
        assert_eq!(listed.len(), m.catalog().len());
        assert!(listed.contains("quotaflow_limit_decisions_total"));
        assert!(!exported.contains("quotaflow_limit_decisions_total"));
    }

    #[test]
    fn decisions_become_counters_without_request_data() {
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "k", "key": ["api_key"], "algorithm": "fixed_window", "limit": 1, "window": "1m"}]}"#,
        )
        .unwrap();
        let limiter = Limiter::new(doc, Fingerprinter::random(), 1).unwrap();
        let m = Metrics::new().unwrap();
        let req = Request {
            api_key: Some("sk_secret_value".into()),
            ..Request::default()
        };
        for _ in 0..3 {
            limiter.check_then(&req, 0, |rules, d| {
                m.record("check", rules, d, Duration::from_micros(3))
            });
        }
        let text = m.render(0);
        assert!(
            text.contains(r#"quotaflow_checks_total{endpoint="check",verdict="refused"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"quotaflow_limit_decisions_total{limit="k",verdict="allowed"} 1"#));
        assert!(text.contains(r#"quotaflow_breaches_total{limit="k",shadow="false"} 1"#));
        assert!(!text.contains("sk_secret_value"));
    }

    #[test]
    fn series_of_a_removed_limit_go_with_it() {
        let doc = |names: &[&str]| {
            let limits: Vec<String> = names
                .iter()
                .map(|n| format!(r#"{{"name": "{n}", "key": ["user_id"], "algorithm": "fixed_window", "limit": 1, "window": "1m"}}"#))
                .collect();
            RulesDoc::from_json(format!(r#"{{"limits": [{}]}}"#, limits.join(",")).as_bytes())
                .unwrap()
        };
        let limiter = Limiter::new(doc(&["kept", "gone"]), Fingerprinter::random(), 1).unwrap();
        let m = Metrics::new().unwrap();
        let req = Request {
            user_id: Some("u".into()),
            ..Request::default()
        };
        for _ in 0..2 {
            limiter.check_then(&req, 0, |rules, d| {
                m.record("check", rules, d, Duration::ZERO)
            });
        }
        assert!(m.render(0).contains(r#"limit="gone""#));
        let old = limiter.rules();
        limiter.replace_rules(doc(&["kept"])).unwrap();
        m.forget_removed_limits(&old, &limiter.rules());
        let text = m.render(0);
        assert!(!text.contains(r#"limit="gone""#), "{text}");
        assert!(
            text.contains(r#"quotaflow_limit_decisions_total{limit="kept",verdict="allowed"} 1"#)
        );
    }

    /// What the live page reads: the ongoing episodes with the most
    /// refusals, the latest starts and ends (bounded), per-limit counts.
    #[test]
    fn top_refused_keys_breach_edges_and_counts_for_the_live_page() {
        let doc = RulesDoc::from_json(
            br#"{"limits": [
                {"name": "tb", "key": ["user_id"], "capacity": 1, "refill_per_sec": 1},
                {"name": "idle", "key": ["api_key"], "capacity": 1, "refill_per_sec": 1}]}"#,
        )
        .unwrap();
        let limiter = Limiter::new(doc, Fingerprinter::random(), 1).unwrap();
        let m = Metrics::new().unwrap();
        let now = 1_000_000;
        let mut ids = std::collections::HashMap::new();
        // 40 users refused 1..=40 times each: more edges than are kept.
        for i in 0..40u64 {
            let req = Request {
                user_id: Some(format!("user-{i}")),
                ..Request::default()
            };
            for _ in 0..=i + 1 {
                limiter.check_then(&req, now, |rules, d| {
                    ids.insert(i, d.outcomes[0].key);
                    m.record("check", rules, d, Duration::ZERO)
                });
            }
        }
        let top = m.top_refused(now + 10, 3);
        let got: Vec<(u64, KeyId)> = top.iter().map(|b| (b.refused, b.key)).collect();
        assert_eq!(got, vec![(40, ids[&39]), (39, ids[&38]), (38, ids[&37])]);
        assert!(top
            .iter()
            .all(|b| &*b.limit == "tb" && !b.shadow && b.started_ms == now));
        assert!(m.top_refused(now, 0).is_empty());
        // Past the calm spell (1 s) no episode is ongoing.
        assert!(m.top_refused(now + 1_000, 10).is_empty());

        let edges = m.recent_breaches();
        assert_eq!(edges.len(), RECENT_EDGES);
        assert!(edges[0].started && edges[0].key == ids[&39] && edges[0].refused == 1);
        // User 0 comes back after the calm spell: its episode ends.
        let req = Request {
            user_id: Some("user-0".into()),
            ..Request::default()
        };
        limiter.check_then(&req, now + 5_000, |rules, d| {
            m.record("check", rules, d, Duration::ZERO)
        });
        let last = &m.recent_breaches()[0];
        assert!(
            !last.started && last.key == ids[&0] && last.refused == 1,
            "{last:?}"
        );

        let counts = m.limit_counts();
        let refused: u64 = (1..=40).sum();
        assert_eq!(
            counts.get("tb"),
            Some(&LimitCounts {
                allowed: 41,
                refused,
                shadow_refused: 0
            })
        );
        // Reading the counts creates no series for a limit without any.
        assert!(!counts.contains_key("idle"));
        assert!(!m.render(now).contains(r#"limit="idle""#));
    }

    /// A key held at its limit (refused, allowed on each refill, refused)
    /// is one breach episode: one start, one end after a calm spell.
    #[test]
    fn a_key_held_at_its_limit_is_one_breach_episode() {
        let doc = RulesDoc::from_json(
            br#"{"limits": [{"name": "tb", "key": ["user_id"], "capacity": 1, "refill_per_sec": 2}]}"#,
        )
        .unwrap();
        let limiter = Limiter::new(doc, Fingerprinter::random(), 1).unwrap();
        let m = Metrics::new().unwrap();
        let req = Request {
            user_id: Some("held".into()),
            ..Request::default()
        };
        let mut episodes = Vec::new();
        // Ten seconds of a request every 200 ms: two in five pass.
        let mut now = 1_000_000;
        for _ in 0..50 {
            limiter.check_then(&req, now, |rules, d| {
                m.record("check", rules, d, Duration::ZERO);
                episodes.push(d.outcomes[0].verdict.allowed);
            });
            now += 200;
        }
        let allowed = episodes.iter().filter(|a| **a).count();
        assert!(
            allowed > 10 && allowed < 40,
            "{allowed} allowed: the key flapped"
        );
        let breaches = m.breaches.with_label_values(&["tb", "false"]);
        assert_eq!(breaches.get(), 1, "one episode while held at the limit");
        // The episode began at the second request and is still refusing.
        let longest = m.episodes.longest_ms(now);
        assert!((9_000..=10_000).contains(&longest), "{longest}");
        assert!(m.render(now).contains("quotaflow_breach_longest_seconds 9"));
        // The episodes' clock is this test's, not the wall clock: "now" on
        // it is the wall clock shifted by the offset seen at the refusals.
        let shifted = m.episode_now(crate::clock::now_ms());
        assert!(shifted.abs_diff(now - 200) < 1_000, "{shifted} vs {now}");
        // Past its calm spell the episode no longer counts as ongoing.
        assert_eq!(m.episodes.longest_ms(now + 5_000), 0);
        // A sweep keeps it until it has been idle for ten minutes.
        assert_eq!(m.episodes.drop_stale(now + 60_000), 0);
        // Quiet for longer than the calm spell (the bucket's 1 s), then allowed.
        now += 5_000;
        let ended = limiter.check_then(&req, now, |rules, d| {
            m.episodes.observe(&d.outcomes[0], &rules.limits[0], false)
        });
        assert!(
            matches!(ended, Episode::Ended { refused } if refused > 10),
            "{ended:?}"
        );
        let open: u32 = m
            .episodes
            .maybe_open
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        assert_eq!(open, 0);

        // A key refused, then gone: a sweep drops its episode once it has
        // been idle ten minutes, and its filter bucket with it.
        let gone = Request {
            user_id: Some("gone".into()),
            ..Request::default()
        };
        for _ in 0..3 {
            limiter.check_then(&gone, now, |rules, d| {
                m.record("check", rules, d, Duration::ZERO)
            });
        }
        assert_eq!(m.episodes.drop_stale(now + 60_000), 0);
        assert_eq!(m.episodes.drop_stale(now + STALE_EPISODE_MS + 1), 1);
        let open: u32 = m
            .episodes
            .maybe_open
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        assert_eq!(open, 0);
    }
}
