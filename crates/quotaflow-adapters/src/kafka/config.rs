//! The rate-limit config of a Kafka-mode group: a log of proposals in a
//! one-partition, compacted topic (`kafka.config_topic`), which every
//! instance reads from its beginning and rules on with the same pure rule
//! ([`quotaflow_core::config_log::Arbiter`]). The log is the arbiter: no
//! instance decides for another, yet all compute the same versions, and a
//! writer answers from the ruling on its own proposal once its follower
//! has read it back.
//!
//! Each accepted version carries the timestamp of its record (the
//! broker's: the topic is created with `LogAppendTime`), the same on every
//! instance since it is in the log: the event time from which it applies.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

use quotaflow_core::config_log::{summarize, Arbiter, ConfigProposal, Ruling};
use quotaflow_core::limiter::{Limiter, ReplaceError};
use quotaflow_core::rules::{InvalidConfig, RulesDoc};

use super::client_config;
use crate::metrics::Metrics;
use crate::settings::KafkaSettings;

/// How long a follower waits for a record before it looks whether it
/// should stop: also the worst delay it adds to a change reaching it.
const POLL: Duration = Duration::from_millis(100);
/// Longest a writer waits for the ruling on its proposal.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest an instance waits, at start, to read the log to its end and to
/// have the group's config (seeding it if the log has none).
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `by` of the proposal an instance makes of its file config when the log
/// has no config yet.
const SEED_BY: &str = "startup";

/// Why a config write did not run.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Invalid, or ruled out by the log (edited from another version).
    #[error(transparent)]
    Refused(#[from] ReplaceError),
    #[error("the group's config log (Kafka) cannot be written: {0}")]
    Unavailable(String),
    #[error(
        "no ruling on the config write within {0:?}: it may still apply; \
         read GET /rate_limit/config before writing again"
    )]
    NoRuling(Duration),
}

impl From<InvalidConfig> for ProposeError {
    fn from(e: InvalidConfig) -> Self {
        ProposeError::Refused(ReplaceError::Invalid(e))
    }
}

/// Why an instance could not join its group's config at start.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating the config topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("the config topic {0} was not read to its end within {JOIN_TIMEOUT:?}")]
    NotCaughtUp(String),
    #[error("this instance's config could not seed the group's: {0}")]
    Seed(#[from] ProposeError),
    #[error("starting the config follower: {0}")]
    Thread(#[from] std::io::Error),
}

/// What the follower tells a waiting writer.
enum Outcome {
    Ruled(Ruling, Option<InvalidConfig>),
    NotDelivered(String),
}

/// Writers waiting for the ruling on their proposal, by proposal id.
#[derive(Default)]
struct Pending(Mutex<HashMap<String, SyncSender<Outcome>>>);

impl Pending {
    fn answer(&self, id: &str, outcome: Outcome) {
        if let Some(tx) = self.0.lock().remove(id) {
            let _ = tx.try_send(outcome);
        }
    }
}

struct ProposalContext {
    pending: Arc<Pending>,
}

impl ClientContext for ProposalContext {}

impl ProducerContext for ProposalContext {
    type DeliveryOpaque = Box<String>;

    fn delivery(&self, result: &DeliveryResult<'_>, id: Box<String>) {
        if let Err((e, _)) = result {
            self.pending
                .answer(&id, Outcome::NotDelivered(e.to_string()));
        }
    }
}

/// One accepted version of the group's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedVersion {
    pub version: u64,
    /// Timestamp of its record in the log: the event time from which it
    /// applies.
    pub applies_from_ms: i64,
    pub by: String,
}

/// What the follower has read of the log.
#[derive(Default)]
struct LogState {
    arbiter: Arbiter,
    /// Every accepted version, in order (documents are not kept: the
    /// running one is the limiter's).
    history: Vec<AcceptedVersion>,
    /// Offset of the next record to read.
    next_offset: i64,
    /// Every proposal id ruled on: a proposal written twice (a retry whose
    /// first attempt landed) is ruled on once, by every instance alike.
    ruled: HashSet<String>,
    /// Whether the log was read to its end once: changes after that are
    /// logged one by one, those before in one `config_joined` line.
    live: bool,
}

/// The group's config in Kafka: followed from the log, written as proposals.
pub struct ConfigLog {
    topic: String,
    /// Settings of the producer each write creates and drops: writes are
    /// rare, and a librdkafka client kept for them would cost its threads
    /// and memory all the time.
    producer: ClientConfig,
    pending: Arc<Pending>,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    state: Mutex<LogState>,
    /// Prefix of this instance's proposal ids.
    instance: String,
}

impl ConfigLog {
    /// Create the config topic if missing, read it to its end, seed it with
    /// the running (file) config if it has none, and keep following it.
    /// Returns once this instance runs the group's config.
    pub fn start(
        settings: &KafkaSettings,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, JoinError> {
        let topic = settings.config_topic.clone();
        // The file config, before the log replaces it.
        let own = limiter.rules();
        ensure_topic(settings)?;
        let pending = Arc::new(Pending::default());
        let mut producer = client_config(settings);
        // No idempotence: a proposal written twice by a retry is ruled on
        // once (by its id), and a producer that is not idempotent starts
        // sending without first asking for a producer id.
        producer
            .set("linger.ms", "0")
            // A proposal not delivered by then is answered with 503.
            .set("message.timeout.ms", WRITE_TIMEOUT.as_millis().to_string());
        let consumer: BaseConsumer = client_config(settings)
            // librdkafka wants one to assign partitions; this consumer never
            // joins it (no subscribe) nor commits to it: every instance
            // reads the whole log, from the beginning.
            .set("group.id", format!("{}.config", settings.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let me = Arc::new(Self {
            instance: format!("{:016x}", rand::random::<u64>()),
            topic,
            producer,
            pending,
            limiter,
            metrics,
            state: Mutex::new(LogState::default()),
        });
        me.catch_up(&consumer)?;
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("kafka-config".into())
            .spawn(move || follow(&weak, &consumer))?;
        let seeded = if me.state.lock().arbiter.version() == 0 {
            // The log has no config: propose this instance's, "only if the
            // group has none". Instances starting together all do; the
            // first proposal in the log wins and the others adopt it.
            match me.propose(Some(0), own.doc().clone(), SEED_BY) {
                Ok(_) => true,
                Err(ProposeError::Refused(ReplaceError::Conflict { .. })) => false,
                Err(e) => return Err(e.into()),
            }
        } else {
            false
        };
        let st = me.state.lock();
        let latest = st.history.last().cloned();
        drop(st);
        let rules = me.limiter.rules();
        tracing::info!(
            event = "config_joined",
            version = rules.version,
            by = latest.as_ref().map(|v| v.by.as_str()),
            applies_from_ms = latest.as_ref().map(|v| v.applies_from_ms),
            seeded_by_this_instance = seeded,
            file_config_runs = own.doc() == rules.doc(),
            limits = rules.limits.len(),
            topic = %me.topic,
            "this instance runs the group's config (kafka.config_topic)"
        );
        Ok(me)
    }

    /// The timestamp from which `version` applies, if it is a version of
    /// the group's log.
    pub fn applies_from_ms(&self, version: u64) -> Option<i64> {
        let st = self.state.lock();
        let i = usize::try_from(version).ok()?.checked_sub(1)?;
        st.history
            .get(i)
            .filter(|v| v.version == version)
            .map(|v| v.applies_from_ms)
    }

    /// Every accepted version so far, oldest first.
    pub fn history(&self) -> Vec<AcceptedVersion> {
        self.state.lock().history.clone()
    }

    /// Propose `doc` as the group's next version, edited from `expected`
    /// (when given), and wait for the log's ruling on it: the new version,
    /// which by then runs here, or why not. Blocking.
    pub fn propose(
        &self,
        expected: Option<u64>,
        doc: RulesDoc,
        by: &str,
    ) -> Result<u64, ProposeError> {
        // Validated here first, so field errors come back at once and the
        // log never holds an API key in clear.
        let doc = self.limiter.normalize(doc)?;
        let id = format!("{}-{:016x}", self.instance, rand::random::<u64>());
        let record = ConfigProposal {
            proposal: id.clone(),
            base_version: expected,
            doc: serde_json::to_value(&doc)
                .map_err(|e| ProposeError::Unavailable(e.to_string()))?,
            by: by.to_owned(),
        };
        let payload =
            serde_json::to_vec(&record).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let started = Instant::now();
        let producer: BaseProducer<ProposalContext> = self
            .producer
            .create_with_context(ProposalContext {
                pending: self.pending.clone(),
            })
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let (tx, rx) = sync_channel(1);
        self.pending.0.lock().insert(id.clone(), tx);
        // Whatever happens below, the waiter goes.
        let _waiting = Waiting(&self.pending, &id);
        producer
            .send(
                BaseRecord::with_opaque_to(&self.topic, Box::new(id.clone()))
                    .partition(0)
                    .key(id.as_bytes())
                    .payload(&payload),
            )
            .map_err(|(e, _)| ProposeError::Unavailable(e.to_string()))?;
        // Delivered, or failed (which answers the waiter), or timed out.
        let _ = producer.flush(WRITE_TIMEOUT);
        match rx.recv_timeout(WRITE_TIMEOUT.saturating_sub(started.elapsed())) {
            Ok(Outcome::Ruled(Ruling::Accepted { version }, _)) => Ok(version),
            Ok(Outcome::Ruled(Ruling::Conflict { current }, _)) => Err(ReplaceError::Conflict {
                expected: expected.unwrap_or_default(),
                current,
            }
            .into()),
            Ok(Outcome::Ruled(Ruling::Invalid { .. }, why)) => Err(why
                .unwrap_or_else(|| {
                    InvalidConfig(vec![quotaflow_core::rules::FieldError::new(
                        "",
                        "refused by the group's config log",
                    )])
                })
                .into()),
            Ok(Outcome::NotDelivered(e)) => Err(ProposeError::Unavailable(e)),
            Err(_) => Err(ProposeError::NoRuling(WRITE_TIMEOUT)),
        }
    }

    /// Read the log up to its end as it is now (its high watermark).
    fn catch_up(&self, consumer: &BaseConsumer) -> Result<(), JoinError> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        // A topic just created may not be known to every broker yet.
        let (low, high) = loop {
            match consumer.fetch_watermarks(&self.topic, 0, Duration::from_secs(5)) {
                Ok(w) => break w,
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(POLL),
            }
        };
        if low > 0 {
            tracing::error!(
                event = "config_log_trimmed",
                topic = %self.topic,
                first_offset = low,
                "the config topic lost its first records (retention or deletion): versions are counted from what is left, and may differ from those of instances that read it whole"
            );
        }
        while self.state.lock().next_offset < high {
            if Instant::now() > deadline {
                return Err(JoinError::NotCaughtUp(self.topic.clone()));
            }
            match consumer.poll(POLL) {
                Some(Ok(m)) => self.read(&m),
                Some(Err(e)) => {
                    tracing::debug!(event = "config_log_poll_failed", error = %e, "reading the config topic");
                }
                None => {}
            }
        }
        self.state.lock().live = true;
        Ok(())
    }

    /// Rule on one record of the log, run the config if accepted, and
    /// answer its writer if it is waiting here.
    fn read(&self, m: &BorrowedMessage<'_>) {
        let mut st = self.state.lock();
        st.next_offset = m.offset().saturating_add(1);
        let live = st.live;
        let proposal = match serde_json::from_slice::<ConfigProposal>(
            m.payload().unwrap_or_default(),
        ) {
            Ok(p) => p,
            Err(e) => {
                // No proposal, no writer to answer: the version stays.
                tracing::warn!(
                    event = "config_record_unreadable",
                    offset = m.offset(),
                    error = %e,
                    "a record of the config topic is not a proposal: ignored, as every instance ignores it"
                );
                return;
            }
        };
        if !st.ruled.insert(proposal.proposal.clone()) {
            return;
        }
        let doc = RulesDoc::from_json(proposal.doc.to_string().as_bytes())
            .and_then(|doc| self.limiter.normalize(doc));
        let ruling = st.arbiter.rule(proposal.base_version, doc.is_ok());
        let mut why = None;
        match (ruling, doc) {
            (Ruling::Accepted { version }, Ok(doc)) => {
                let applies_from_ms = m.timestamp().to_millis().unwrap_or_default();
                st.history.push(AcceptedVersion {
                    version,
                    applies_from_ms,
                    by: proposal.by.clone(),
                });
                drop(st);
                self.run(version, doc, &proposal.by, applies_from_ms, live);
            }
            (Ruling::Accepted { version }, Err(e)) => {
                // Unreachable: the arbiter accepts valid documents only.
                tracing::error!(event = "config_not_applied", version, error = %e, "accepted config failed validation");
            }
            (Ruling::Invalid { current }, doc) => {
                let e = doc.err();
                tracing::warn!(
                    event = "config_proposal_refused",
                    proposal = %proposal.proposal,
                    by = %proposal.by,
                    version = current,
                    errors = %e.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "an invalid config reached the config topic: refused, as every instance refuses it; the running version stays"
                );
                why = e;
            }
            (Ruling::Conflict { current }, _) => {
                tracing::debug!(
                    event = "config_proposal_conflict",
                    proposal = %proposal.proposal,
                    by = %proposal.by,
                    base_version = proposal.base_version,
                    version = current,
                    "a config proposal edited from another version was refused"
                );
            }
        }
        self.pending
            .answer(&proposal.proposal, Outcome::Ruled(ruling, why));
    }

    /// Run the accepted `version` here.
    fn run(&self, version: u64, doc: RulesDoc, by: &str, applies_from_ms: i64, live: bool) {
        let old = self.limiter.rules();
        let summary = summarize(old.doc(), &doc);
        // Whatever runs here is replaced: the log, not this instance,
        // decides the versions (the file config ran as version 1 before).
        if let Err(e) = self.limiter.adopt(version, doc) {
            tracing::error!(event = "config_not_applied", version, error = %e, "the group's config cannot run here: the running one stays");
            return;
        }
        self.metrics
            .forget_removed_limits(&old, &self.limiter.rules());
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        if live {
            tracing::info!(
                event = "config_applied",
                version,
                by,
                applies_from_ms,
                summary = %summary,
                "rate-limit config of the group now runs here"
            );
        } else {
            tracing::debug!(event = "config_replayed", version, by, applies_from_ms, summary = %summary, "config log read at start");
        }
    }
}

/// Removes a writer's waiter when it stops waiting.
struct Waiting<'a>(&'a Pending, &'a str);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().remove(self.1);
    }
}

/// Read the log as it grows. Ends when the config log is dropped.
fn follow(weak: &Weak<ConfigLog>, consumer: &BaseConsumer) {
    let mut failing = false;
    loop {
        let polled = consumer.poll(POLL);
        let Some(me) = weak.upgrade() else { return };
        match polled {
            Some(Ok(m)) => {
                failing = false;
                me.read(&m);
            }
            Some(Err(e)) => {
                if !failing {
                    tracing::warn!(event = "config_log_unavailable", error = %e, topic = %me.topic, "cannot read the group's config topic: the running config stays until it can");
                }
                failing = true;
            }
            None => {}
        }
    }
}

/// Create the config topic (one partition, compacted, broker timestamps)
/// unless it exists.
fn ensure_topic(settings: &KafkaSettings) -> Result<(), JoinError> {
    let admin: AdminClient<DefaultClientContext> = client_config(settings).create()?;
    let topic = NewTopic::new(
        &settings.config_topic,
        1,
        TopicReplication::Fixed(settings.config_topic_replication),
    )
    // Every proposal has a key of its own: compaction removes none, and
    // no retention deletes the history the versions are counted from.
    .set("cleanup.policy", "compact")
    .set("message.timestamp.type", "LogAppendTime");
    let results = block_on(
        admin.create_topics(
            [&topic],
            &AdminOptions::new()
                .request_timeout(Some(Duration::from_secs(10)))
                .operation_timeout(Some(Duration::from_secs(10))),
        ),
    )?;
    for r in results {
        match r {
            Ok(_) => {
                tracing::info!(event = "config_topic_created", topic = %settings.config_topic, "created the config topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // Not allowed to create topics (ACLs) is fine if it exists.
            Err((topic, code)) if exists(&admin, &topic) => {
                tracing::debug!(event = "config_topic_not_created", topic = %topic, code = %code, "the config topic exists");
            }
            Err((topic, code)) => return Err(JoinError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Whether `topic` exists with a partition 0, as far as the cluster says.
fn exists(admin: &AdminClient<DefaultClientContext>, topic: &str) -> bool {
    admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .is_ok_and(|m| {
            m.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_none()
                    && t.partitions().iter().any(|p| p.id() == 0)
            })
        })
}

/// Run a future to completion on this thread: rdkafka's admin calls are
/// futures resolved by its own threads, and this crate has no runtime.
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_on_waits_for_a_future_woken_by_another_thread() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let _ = tx.send(7);
        });
        assert_eq!(block_on(rx).ok(), Some(7));
    }
}
