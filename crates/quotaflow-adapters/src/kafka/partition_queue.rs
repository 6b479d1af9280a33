//! A partition's own librdkafka queue, drained in batches.
//!
//! rust-rdkafka's `PartitionQueue::poll` hands out one record per call, and
//! each call reads the clock twice, wraps the record in a reference-counted
//! event and takes the queue's lock: 18% of the processor's CPU in a profile
//! (docs/benchmarks.md, run H2). rust-rdkafka has no batch API, so this is
//! the same split queue (`rd_kafka_queue_get_partition` without forwarding,
//! exactly what `BaseConsumer::split_partition_queue` does) read with
//! `rd_kafka_consume_batch_queue`, which takes the records already queued,
//! up to a batch, in one call. The unsafe code is confined here; records are lent to the
//! caller and destroyed as soon as it returns.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;

use quotaflow_core::pipeline::partition::InputRecord;

/// One record as librdkafka handed it over; destroyed on drop, so records
/// are freed even if the caller panics halfway through a batch.
struct Owned(NonNull<rd::rd_kafka_message_t>);

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: librdkafka gave us this message and nothing else frees it.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}

/// What one record turned out to be.
pub(super) enum Fetched<'a> {
    Ok(InputRecord<'a>),
    /// An error librdkafka delivers in place of a record (its text).
    Err(String),
}

/// A partition's queue, split off the consumer's main queue.
pub(super) struct BatchQueue<C: ConsumerContext + 'static> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// librdkafka requires a queue to be destroyed before its client; fields
    /// drop after `Drop::drop`, so the client outlives the queue.
    _consumer: Arc<BaseConsumer<C>>,
    slots: Vec<*mut rd::rd_kafka_message_t>,
    taken: Vec<Owned>,
}

// SAFETY: librdkafka queues and messages may be used from any thread; the
// handle and the messages it holds are owned by one worker at a time.
unsafe impl<C: ConsumerContext + 'static> Send for BatchQueue<C> {}

impl<C: ConsumerContext + 'static> BatchQueue<C> {
    /// Split `topic`/`partition`'s queue off `consumer`'s, before the
    /// partition is assigned (so no record goes to the main queue first).
    /// `batch` is the most records taken per call.
    pub(super) fn split(
        consumer: &Arc<BaseConsumer<C>>,
        topic: &str,
        partition: i32,
        batch: usize,
    ) -> Option<Self> {
        let topic = CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` lives, and the
        // returned queue holds its own reference (null for no such partition).
        let queue = NonNull::new(unsafe {
            rd::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
            )
        })?;
        // SAFETY: a valid queue; a null destination stops forwarding, so the
        // partition's records stay in this queue.
        unsafe { rd::rd_kafka_queue_forward(queue.as_ptr(), ptr::null_mut()) };
        Some(Self {
            queue,
            _consumer: consumer.clone(),
            slots: vec![ptr::null_mut(); batch.max(1)],
            taken: Vec::with_capacity(batch.max(1)),
        })
    }

    /// Lend every record already queued (up to the batch size) to `f`, in
    /// offset order; if there is none, wait up to `wait` for one. Returns
    /// how many were lent (errors included).
    pub(super) fn drain(&mut self, wait: Duration, f: &mut dyn FnMut(Fetched<'_>)) -> usize {
        // SAFETY: a valid queue and `slots.len()` writable slots; librdkafka
        // fills the first `n` with messages we then own.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                0,
                self.slots.as_mut_ptr(),
                self.slots.len(),
            )
        };
        let n = usize::try_from(n).unwrap_or(0).min(self.slots.len());
        self.taken.extend(
            self.slots[..n]
                .iter()
                .filter_map(|&m| NonNull::new(m))
                .map(Owned),
        );
        if self.taken.is_empty() && !wait.is_zero() {
            // Nothing queued: wait for the first record alone (a batch call
            // would wait for a whole batch), so a quiet partition's records
            // are not held back.
            let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: a valid queue; a non-null result is a message we own.
            let m = unsafe { rd::rd_kafka_consume_queue(self.queue.as_ptr(), ms) };
            self.taken.extend(NonNull::new(m).map(Owned));
        }
        let lent = self.taken.len();
        for m in self.taken.drain(..) {
            f(read(&m));
        }
        lent
    }
}

impl<C: ConsumerContext + 'static> Drop for BatchQueue<C> {
    fn drop(&mut self) {
        // Records still held (none once `drain` returns) go before the queue.
        self.taken.clear();
        // SAFETY: our own reference, released once, while the client lives.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// `len` bytes at `at`, or none for a null pointer.
///
/// # Safety
/// A non-null `at` must point to `len` readable bytes that outlive `'a`.
unsafe fn bytes<'a>(at: *const c_void, len: usize) -> &'a [u8] {
    if at.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts(at.cast::<u8>(), len) }
    }
}

fn read(m: &Owned) -> Fetched<'_> {
    let p = m.0.as_ptr();
    // SAFETY: a message we own, valid until `m` is dropped; its payload and
    // key (when not null) are `len`/`key_len` bytes that live as long.
    unsafe {
        let msg = &*p;
        if msg.err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            let text = rd::rd_kafka_message_errstr(p);
            let text = if text.is_null() {
                format!("{:?}", msg.err)
            } else {
                CStr::from_ptr(text).to_string_lossy().into_owned()
            };
            return Fetched::Err(text);
        }
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        let ts = rd::rd_kafka_message_timestamp(p, &mut kind);
        let available = kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        Fetched::Ok(InputRecord {
            offset: msg.offset,
            broker_ts_ms: (available && ts >= 0).then_some(ts),
            key: (!msg.key.is_null()).then(|| bytes(msg.key, msg.key_len)),
            payload: bytes(msg.payload, msg.len),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Against librdkafka's in-process mock broker: the queue's own logic
    //! (batches, order, the wait for a first record), not Kafka's; the
    //! processor's integration tests run it against the real broker.
    use std::time::Instant;

    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::DefaultConsumerContext;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;

    const TOPIC: &str = "requests";

    fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 2, 1).unwrap();
        cluster
    }

    fn produce(servers: &str, partition: i32, n: usize) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .create()
            .unwrap();
        for i in 0..n {
            let payload = format!("event-{i}");
            let key = format!("key-{i}");
            producer
                .send(
                    BaseRecord::to(TOPIC)
                        .partition(partition)
                        .payload(&payload)
                        .key(&key),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    fn consumer(servers: &str) -> Arc<BaseConsumer<DefaultConsumerContext>> {
        Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", servers)
                .set("group.id", "partition-queue-test")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap(),
        )
    }

    fn assign(consumer: &BaseConsumer<DefaultConsumerContext>, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(TOPIC, partition, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
    }

    #[test]
    fn lends_every_record_in_order_in_batches_of_at_most_the_batch_size() {
        let cluster = cluster();
        let servers = cluster.bootstrap_servers();
        produce(&servers, 1, 1000);
        let consumer = consumer(&servers);
        let mut queue = BatchQueue::split(&consumer, TOPIC, 1, 64).unwrap();
        assign(&consumer, 1);

        let mut seen = Vec::new();
        let mut largest = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < 1000 && Instant::now() < deadline {
            let _ = consumer.poll(Duration::ZERO);
            let n = queue.drain(Duration::from_millis(100), &mut |r| match r {
                Fetched::Ok(r) => seen.push((
                    r.offset,
                    r.key.map(<[u8]>::to_vec),
                    r.payload.to_vec(),
                    r.broker_ts_ms.is_some(),
                )),
                Fetched::Err(e) => panic!("unexpected error record: {e}"),
            });
            largest = largest.max(n);
        }
        assert_eq!(seen.len(), 1000);
        assert!(largest <= 64, "a drain lent {largest} records");
        assert!(largest > 1, "records were never taken in batches");
        for (i, (offset, key, payload, timestamped)) in seen.iter().enumerate() {
            assert_eq!(*offset, i as i64);
            assert_eq!(key.as_deref(), Some(format!("key-{i}").as_bytes()));
            assert_eq!(payload, format!("event-{i}").as_bytes());
            assert!(timestamped);
        }
    }

    #[test]
    fn a_quiet_queue_waits_only_as_long_as_asked_and_lends_the_first_record_at_once() {
        let cluster = cluster();
        let servers = cluster.bootstrap_servers();
        let consumer = consumer(&servers);
        let mut queue = BatchQueue::split(&consumer, TOPIC, 0, 64).unwrap();
        assign(&consumer, 0);

        let started = Instant::now();
        let n = queue.drain(Duration::from_millis(200), &mut |_| {});
        let waited = started.elapsed();
        assert_eq!(n, 0);
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");

        // One record on a quiet partition comes out as soon as it arrives,
        // not once a batch is full.
        produce(&servers, 0, 1);
        let started = Instant::now();
        let mut got = 0;
        while got == 0 && started.elapsed() < Duration::from_secs(30) {
            let _ = consumer.poll(Duration::ZERO);
            got = queue.drain(Duration::from_secs(10), &mut |_| {});
        }
        assert_eq!(got, 1);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
