//! The repartition topic: where unaligned limits' events travel to their
//! key's home partition. It has exactly as many partitions as the requests
//! topic, because partition q of it is read by the owner of requests
//! partition q (see [`super::group`]), and the home of a key is computed
//! over the requests topic's partition count (`Routing`).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::client_config;
use crate::settings::KafkaSettings;

/// How long start-up waits for the requests topic to appear (and for the
/// broker to answer).
const REQUESTS_TOPIC_WAIT: Duration = Duration::from_secs(30);
/// Bound on one ask for the topics' metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// The requests topic's partition count, once the repartition topic
/// exists with the same count (created, if missing, with the broker's
/// default replication). An existing repartition topic of another count is
/// an error: keys would be homed where nobody reads them.
pub fn prepare(settings: &KafkaSettings) -> anyhow::Result<u32> {
    let client: BaseConsumer = client_config(settings)
        .create()
        .context("creating a Kafka client for topic metadata")?;
    let repartition = settings.repartition_topic();
    let started = std::time::Instant::now();
    let counts = loop {
        // A broker slow to answer (starting, overloaded) is asked again
        // until the wait is over, as a missing topic is.
        let md = match client.fetch_metadata(None, METADATA_TIMEOUT) {
            Ok(md) => md,
            Err(e) if started.elapsed() < REQUESTS_TOPIC_WAIT => {
                tracing::warn!(event = "consumer_error", error = %e);
                continue;
            }
            Err(e) => return Err(e).context("reading the topics' metadata"),
        };
        let count = |name: &str| {
            md.topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len())
                .filter(|&n| n > 0)
        };
        match (count(&settings.requests_topic), count(&repartition)) {
            (Some(r), rp) => break (r, rp),
            (None, _) if started.elapsed() < REQUESTS_TOPIC_WAIT => {
                std::thread::sleep(Duration::from_millis(500));
            }
            (None, _) => bail!(
                "the requests topic {} does not exist (waited {}s)",
                settings.requests_topic,
                REQUESTS_TOPIC_WAIT.as_secs()
            ),
        }
    };
    let (partitions, existing) = counts;
    match existing {
        Some(n) if n == partitions => {}
        Some(n) => bail!(
            "the repartition topic {repartition} has {n} partitions but {} has {partitions}: \
             they must match (delete it, or set kafka.repartition_topic to a new one)",
            settings.requests_topic
        ),
        None => create(settings, &repartition, partitions)?,
    }
    u32::try_from(partitions).context("partition count")
}

fn create(settings: &KafkaSettings, topic: &str, partitions: usize) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(settings)
        .create()
        .context("creating a Kafka admin client")?;
    let count = i32::try_from(partitions).context("partition count")?;
    // -1: the broker's default replication factor.
    let new = NewTopic::new(topic, count, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = block_on(admin.create_topics([&new], &options))
        .with_context(|| format!("creating the repartition topic {topic}"))?;
    for r in results {
        match r {
            Ok(_) => {}
            // Another instance created it first.
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("creating the repartition topic {t}: {e}"),
        }
    }
    tracing::info!(
        event = "repartition_topic_created",
        topic,
        partitions,
        "created the repartition topic (unaligned limits' events travel through it to their key's home partition)"
    );
    Ok(())
}

/// Runs one future to completion on this thread. The admin client's
/// futures are completed by librdkafka's own threads, so no runtime is
/// needed, and start-up (called from inside the server's runtime) must
/// not nest one.
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}
