//! Reading a time range of the requests topic again, for a backtest: its
//! own consumer outside the processors' group (partitions assigned, never
//! subscribed), so it joins no group, commits nothing, moves no processor's
//! partitions and produces nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::client_config;
use crate::settings::KafkaSettings;
use quotaflow_core::pipeline::partition::InputRecord;

/// The offsets of one partition a backtest reads: `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PartitionRange {
    pub partition: i32,
    pub start_offset: i64,
    /// Exclusive.
    pub end_offset: i64,
}

/// A consumer positioned on a time range of the requests topic.
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
    ranges: Vec<PartitionRange>,
    timeout: Duration,
}

impl TopicReader {
    /// The records of `settings.requests_topic` whose (broker) timestamps
    /// are in `from_ms..to_ms`, found with the broker's timestamp index:
    /// from the first offset at or after `from_ms` (the earliest record
    /// left without one) to the first at or after `to_ms` (the high
    /// watermark now without one). `timeout` bounds each broker call and
    /// any stall while reading.
    pub fn open(
        settings: &KafkaSettings,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let topic = settings.requests_topic.clone();
        // librdkafka's consumer wants a group id even to be assigned
        // partitions; the group never exists on the broker, as this
        // consumer neither subscribes (joins) nor commits.
        let group = format!("quotaflow-backtest-{:016x}", rand::random::<u64>());
        let consumer: BaseConsumer = client_config(settings)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("creating the Kafka consumer")?;
        let meta = consumer
            .fetch_metadata(Some(&topic), timeout)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let partitions: Vec<i32> = meta
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            bail!("topic {topic} does not exist or has no partitions");
        }
        let at = |ms: Option<i64>| -> anyhow::Result<BTreeMap<i32, Offset>> {
            let Some(ms) = ms else {
                return Ok(BTreeMap::new());
            };
            let mut tpl = TopicPartitionList::new();
            for &p in &partitions {
                tpl.add_partition_offset(&topic, p, Offset::Offset(ms))?;
            }
            let found = consumer
                .offsets_for_times(tpl, timeout)
                .with_context(|| format!("finding the offsets of {topic} at {ms} ms"))?;
            Ok(found
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect())
        };
        let (starts, ends) = (at(from_ms)?, at(to_ms)?);
        let mut ranges = Vec::with_capacity(partitions.len());
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, timeout)
                .with_context(|| format!("reading the watermarks of {topic} partition {p}"))?;
            let offset = |o: Option<&Offset>, none: i64| match o {
                Some(Offset::Offset(o)) => *o,
                // No record at or after the time.
                Some(_) => high,
                None => none,
            };
            let start = offset(starts.get(&p), low).clamp(low, high);
            let end = offset(ends.get(&p), high).clamp(start, high);
            ranges.push(PartitionRange {
                partition: p,
                start_offset: start,
                end_offset: end,
            });
        }
        Ok(Self {
            consumer,
            topic,
            ranges,
            timeout,
        })
    }

    pub fn ranges(&self) -> &[PartitionRange] {
        &self.ranges
    }

    /// Hand every record of the ranges to `f`, each partition's in offset
    /// order, then return. An error if no record arrives for the timeout
    /// while some are still due.
    pub fn read(self, mut f: impl FnMut(i32, InputRecord<'_>)) -> anyhow::Result<()> {
        let topic = &self.topic;
        let mut due: BTreeMap<i32, i64> = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for r in self.ranges.iter().filter(|r| r.start_offset < r.end_offset) {
            due.insert(r.partition, r.end_offset);
            tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.start_offset))?;
        }
        if due.is_empty() {
            return Ok(());
        }
        self.consumer
            .assign(&tpl)
            .context("assigning the partitions")?;
        let mut progress = Instant::now();
        while !due.is_empty() {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let p = m.partition();
                    let Some(&end) = due.get(&p) else { continue };
                    if m.offset() < end {
                        f(
                            p,
                            InputRecord {
                                offset: m.offset(),
                                broker_ts_ms: m.timestamp().to_millis().filter(|&t| t >= 0),
                                key: m.key(),
                                payload: m.payload().unwrap_or_default(),
                            },
                        );
                        progress = Instant::now();
                    }
                    if m.offset() + 1 >= end {
                        self.finish(&mut due, p);
                    }
                }
                Some(Err(e)) => tracing::warn!(event = "consumer_error", error = %e),
                None => {
                    // The last offsets may hold no record (transaction
                    // markers, compaction): the position says it is done.
                    if let Ok(positions) = self.consumer.position() {
                        for e in positions.elements() {
                            if let (Offset::Offset(at), Some(&end)) =
                                (e.offset(), due.get(&e.partition()))
                            {
                                if at >= end {
                                    self.finish(&mut due, e.partition());
                                }
                            }
                        }
                    }
                }
            }
            if !due.is_empty() && progress.elapsed() > self.timeout {
                bail!(
                    "no record of {topic} arrived for {:?}; partitions still due (partition: end offset): {due:?}",
                    self.timeout
                );
            }
        }
        Ok(())
    }

    /// Stop fetching a partition read to its end.
    fn finish(&self, due: &mut BTreeMap<i32, i64>, partition: i32) {
        if due.remove(&partition).is_some() {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, partition);
            let _ = self.consumer.pause(&tpl);
        }
    }
}
