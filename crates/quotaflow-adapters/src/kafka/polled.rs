//! A producer whose delivery reports are served by a thread of its own, as
//! rdkafka's `ThreadedProducer` does, in one-second turns instead of its
//! 100 ms ones.
//!
//! rdkafka's `poll` rounds the time left down to whole milliseconds, so a
//! turn ends with up to a millisecond of polling that never waits: about
//! 1% of a core for every idle producer at 100 ms turns (measured in
//! docs/benchmarks.md, section 9). The turn's length costs nothing else: a
//! turn serves every delivery report as it comes, and only the stop flag
//! waits for its end, which is why dropping does the producer's own
//! clean-up at once instead of joining the thread.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext, PurgeConfig};

/// How long each of the polling thread's turns lasts.
const TURN: Duration = Duration::from_secs(1);

/// How long a drop waits for the reports of what it purged, as
/// `BaseProducer`'s own drop does.
const DROP_FLUSH: Duration = Duration::from_millis(500);

pub struct PolledProducer<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    stop: Arc<AtomicBool>,
}

impl<C: ProducerContext + 'static> PolledProducer<C> {
    /// A producer of `config` with `context`, polled on a thread named `name`.
    pub fn new(config: &ClientConfig, context: C, name: &str) -> KafkaResult<Self> {
        let producer: Arc<BaseProducer<C>> = Arc::new(config.create_with_context(context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    polled.poll(TURN);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("polling thread: {e}")))?;
        Ok(Self { producer, stop })
    }
}

impl<C: ProducerContext + 'static> Deref for PolledProducer<C> {
    type Target = BaseProducer<C>;

    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

impl<C: ProducerContext + 'static> Drop for PolledProducer<C> {
    /// What dropping the last `BaseProducer` handle does (purge what is
    /// queued or in flight, serve the reports that gives), now rather than
    /// when the polling thread's turn ends and it drops its handle.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let _ = self.producer.flush(DROP_FLUSH);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseRecord, DeliveryResult};
    use rdkafka::ClientContext;

    use super::*;

    /// Sends whether each delivery succeeded.
    struct Reports(mpsc::Sender<bool>);

    impl ClientContext for Reports {}

    impl ProducerContext for Reports {
        type DeliveryOpaque = ();

        fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
            let _ = self.0.send(result.is_ok());
        }
    }

    fn producer(servers: &str) -> (PolledProducer<Reports>, mpsc::Receiver<bool>) {
        let (tx, rx) = mpsc::channel();
        let p = PolledProducer::new(
            ClientConfig::new()
                .set("bootstrap.servers", servers)
                .set("linger.ms", "0")
                .set("message.timeout.ms", "0"),
            Reports(tx),
            "test-polled",
        )
        .expect("producer");
        (p, rx)
    }

    #[test]
    fn a_delivery_report_is_served_as_it_comes_not_at_the_end_of_a_turn() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let (p, reports) = producer(&cluster.bootstrap_servers());
        // The first send also connects; the next ones are timed.
        for i in 0..5 {
            let sent = Instant::now();
            p.send(BaseRecord::to("t").payload("x").key("k"))
                .map_err(|(e, _)| e)
                .expect("send");
            let ok = reports
                .recv_timeout(Duration::from_secs(10))
                .expect("a report");
            assert!(ok);
            if i > 0 {
                assert!(
                    sent.elapsed() < TURN / 2,
                    "report after {:?}",
                    sent.elapsed()
                );
            }
        }
    }

    #[test]
    fn dropping_purges_and_reports_at_once_without_waiting_for_the_turn() {
        // Nothing listens there: the record stays queued.
        let (p, reports) = producer("127.0.0.1:1");
        p.send(BaseRecord::to("t").payload("x").key("k"))
            .map_err(|(e, _)| e)
            .expect("send");
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(p);
        assert!(t.elapsed() < TURN, "drop took {:?}", t.elapsed());
        assert_eq!(
            reports.recv_timeout(Duration::from_millis(100)),
            Ok(false),
            "the purged record is reported failed by the time drop returns"
        );
    }
}
