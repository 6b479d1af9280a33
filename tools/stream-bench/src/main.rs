//! Stream-processor benchmarks against a real Kafka and Redis; the tools
//! behind `scripts/bench-stream.sh` (which builds, runs and summarises them;
//! see docs/benchmarks.md (section 5)).
//!
//! A harness-less bench binary with subcommands, each printing one JSON
//! line on stdout (progress goes to stderr):
//!
//! - `topics`    create topics (optionally with LogAppendTime timestamps);
//! - `fill`      pre-fill a topic with exactly N Avro request events
//!   (`quotaflow::simulate`'s traffic mix, produced as `quotaflow simulate`
//!   does);
//! - `raw`       the baseline: a consumer-group member with quotaflow's
//!   consumer settings that reads and discards the topic until it has seen N
//!   records;
//! - `watch`     times a running `quotaflow serve` on the same topic through
//!   its `/metrics` (events consumed) and its Redis checkpoints, and samples
//!   per-thread CPU from /proc;
//! - `latency`   produces at a fixed rate to a topic a running quotaflow
//!   consumes, then matches every decision to its request: decision
//!   timestamp minus request timestamp;
//! - `breakdown` single-threaded CPU cost per event of each processing step,
//!   on records read from the topic;
//! - `summarize` medians, ratios and verdicts from the JSON lines.
//!
//! Services come from `KAFKA_BOOTSTRAP_SERVERS` and `REDIS_URL`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use serde_json::{json, Value};

use quotaflow::settings::{KafkaSettings, Settings};
use quotaflow::simulate::{Generated, Generator, Plan};
use quotaflow_adapters::avro::{Codec, Encoding};
use quotaflow_core::pipeline::partition::{InputRecord, PartitionProcessor};
use quotaflow_core::pipeline::records::Action;
use quotaflow_core::rules::Dimension;
use quotaflow_core::state::KeyedStore;

/// The allocator of the `quotaflow` binary (src/main.rs), so the in-process
/// what-if and breakdown measure what the binary would.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Linux USER_HZ: the unit of utime/stime in /proc/*/stat.
const CLK_TCK: f64 = 100.0;

#[derive(Parser)]
#[command(name = "stream", about = "quotaflow stream-processor benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create topics: NAME:PARTITIONS, or NAME:PARTITIONS:logappend for
    /// broker (LogAppendTime) timestamps; with --delete, delete topics NAME.
    Topics {
        #[arg(long)]
        delete: bool,
        specs: Vec<String>,
    },
    /// Produce exactly --count request events to --topic.
    Fill {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 100_000)]
        users: u32,
        #[arg(long, default_value_t = 20)]
        hot_users: u32,
        /// Event-time rate: event timestamps are spaced 1/rate apart and end
        /// now, so the traffic seen by the limits does not depend on how fast
        /// the fill ran (0: wall-clock time at production).
        #[arg(long, default_value_t = 40_000)]
        event_rate: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Read and discard --count records of --topic as a fresh group member.
    Raw {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        group: String,
        #[arg(long)]
        broker_pid: Option<u32>,
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        #[arg(long)]
        label: Option<String>,
        /// Work done per record besides reading it: nothing (the baseline),
        /// or the least any rate limiter must do, to show what a throughput
        /// ratio leaves for the limits themselves.
        #[arg(long, value_enum, default_value_t = RawWork::None)]
        work: RawWork,
        /// Settings for the codec and fingerprint key of `--work`.
        #[arg(long, default_value = "scripts/bench/stream/throughput.toml")]
        config: PathBuf,
    },
    /// Time a running `quotaflow serve` until it has processed --count events.
    Watch {
        /// host:port of its HTTP listener.
        #[arg(long)]
        metrics: String,
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        #[arg(long)]
        broker_pid: Option<u32>,
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        #[arg(long)]
        label: Option<String>,
    },
    /// Produce at --rate for --duration-secs to --topic (consumed by a running
    /// quotaflow at --metrics), then match decisions to requests.
    Latency {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        decisions: String,
        #[arg(long)]
        metrics: String,
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        duration_secs: u64,
        /// Seconds of load at the same rate before the measured window
        /// (connections, metadata, first fetches); reported separately.
        #[arg(long, default_value_t = 3)]
        warmup_secs: u64,
        #[arg(long, default_value_t = 100_000)]
        users: u32,
        #[arg(long, default_value_t = 200)]
        hot_users: u32,
        #[arg(long)]
        broker_pid: Option<u32>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long)]
        label: Option<String>,
        /// Recorded in the output (what the processor was started with).
        #[arg(long)]
        checkpoint_interval: Option<String>,
        /// The processor's JSON log, with debug `checkpoint` events
        /// (RUST_LOG=info,quotaflow_adapters::worker=debug), to tell the
        /// decisions delayed by a checkpoint from the others.
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// CPU cost per event of each step, one thread, on --count records of --topic.
    Breakdown {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 300_000)]
        count: u64,
        /// quotaflow settings whose limits to apply.
        #[arg(long)]
        config: PathBuf,
    },
    /// Medians, ratios and verdicts from the JSON lines of a run.
    Summarize {
        results: PathBuf,
        /// Print only half the median processor throughput (events/s).
        #[arg(long)]
        half_rate: bool,
        /// Print only half the live ceiling (the median rate the target
        /// latency runs achieved), or 0 if they achieved the rate asked.
        #[arg(long)]
        live_half_rate: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Topics { delete, specs } => topics(&specs, delete),
        Cmd::Fill {
            topic,
            count,
            users,
            hot_users,
            event_rate,
            seed,
        } => fill(&topic, count, users, hot_users, event_rate, seed),
        Cmd::Raw {
            topic,
            count,
            group,
            broker_pid,
            timeout_secs,
            label,
            work,
            config,
        } => raw(
            &topic,
            count,
            &group,
            broker_pid,
            timeout_secs,
            label,
            work,
            &config,
        ),
        Cmd::Watch {
            metrics,
            pid,
            count,
            prefix,
            group,
            topic,
            partitions,
            broker_pid,
            timeout_secs,
            label,
        } => watch(&WatchArgs {
            metrics,
            pid,
            count,
            prefix,
            group,
            topic,
            partitions,
            broker_pid,
            timeout: Duration::from_secs(timeout_secs),
            label,
        }),
        Cmd::Latency {
            topic,
            decisions,
            metrics,
            pid,
            rate,
            duration_secs,
            warmup_secs,
            users,
            hot_users,
            broker_pid,
            seed,
            label,
            checkpoint_interval,
            log,
        } => latency(&LatencyArgs {
            topic,
            decisions,
            metrics,
            pid,
            rate,
            duration: Duration::from_secs(duration_secs),
            warmup: Duration::from_secs(warmup_secs),
            users,
            hot_users,
            broker_pid,
            seed,
            label,
            checkpoint_interval,
            log,
        }),
        Cmd::Breakdown {
            topic,
            count,
            config,
        } => breakdown(&topic, count, &config),
        Cmd::Summarize {
            results,
            half_rate,
            live_half_rate,
        } => summarize(&results, half_rate, live_half_rate),
    };
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("stream bench: {e:#}");
            std::process::exit(1);
        }
    }
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set (eval \"$(scripts/services.sh up)\" exports it)")
    })
}

fn bootstrap() -> anyhow::Result<String> {
    env("KAFKA_BOOTSTRAP_SERVERS")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn progress(msg: &str) {
    eprintln!("  [stream bench] {msg}");
}

// ------------------------------------------------------------------ topics --

fn topics(specs: &[String], delete: bool) -> anyhow::Result<Value> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap()?)
        .create()
        .context("admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    if delete {
        let names: Vec<&str> = specs.iter().map(String::as_str).collect();
        let results = runtime.block_on(admin.delete_topics(&names, &options))?;
        let failed: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|(t, e)| format!("{t}: {e}")))
            .collect();
        return Ok(json!({"kind": "topics", "deleted": specs, "failed": failed}));
    }
    let mut new = Vec::new();
    for spec in specs {
        let parts: Vec<&str> = spec.split(':').collect();
        let (name, partitions, log_append) = match parts[..] {
            [n, p] => (n, p, false),
            [n, p, "logappend"] => (n, p, true),
            _ => bail!("topic spec `{spec}`: NAME:PARTITIONS[:logappend]"),
        };
        let partitions: i32 = partitions
            .parse()
            .with_context(|| format!("partitions in `{spec}`"))?;
        // Never let retention delete records of a run (event times may lie
        // in the past).
        let mut t =
            NewTopic::new(name, partitions, TopicReplication::Fixed(1)).set("retention.ms", "-1");
        if log_append {
            t = t.set("message.timestamp.type", "LogAppendTime");
        }
        new.push(t);
    }
    let results = runtime.block_on(admin.create_topics(new.iter(), &options))?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(json!({"kind": "topics", "created": specs}))
}

// -------------------------------------------------------------------- fill --

fn kafka_settings() -> anyhow::Result<KafkaSettings> {
    Ok(KafkaSettings {
        bootstrap_servers: bootstrap()?,
        ..KafkaSettings::default()
    })
}

/// Queue one record, waiting while the producer's local queue is full.
fn send_blocking<C: ProducerContext<DeliveryOpaque = ()> + 'static>(
    producer: &ThreadedProducer<C>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) if Instant::now() < deadline => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e).context("producing"),
        }
    }
}

fn encode(codec: &Codec, g: Generated) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    match g {
        Generated::Event(e) => Ok((
            e.partition_key(&[Dimension::UserId]),
            codec.encode_request(&e)?,
        )),
        Generated::Poison(bytes) => Ok((b"poison".to_vec(), bytes)),
    }
}

fn fill(
    topic: &str,
    count: u64,
    users: u32,
    hot_users: u32,
    event_rate: u64,
    seed: u64,
) -> anyhow::Result<Value> {
    let codec = Codec::new(Encoding::SingleObject)?;
    // The producer `quotaflow simulate --kafka` uses.
    let producer = quotaflow_adapters::kafka::request_producer(&kafka_settings()?)?;
    let mut gen = Generator::new(Plan {
        users,
        hot_users,
        rate: 0,
        duration: Duration::ZERO,
        skew_ms: 0,
        poison_every: 0,
        seed,
    });
    let started = Instant::now();
    let end_ms = now_ms();
    let span_ms = (count * 1000).checked_div(event_rate).unwrap_or(0) as i64;
    let mut bytes = 0u64;
    for i in 0..count {
        let ts = match (i * 1000).checked_div(event_rate) {
            Some(offset) => end_ms - span_ms + offset as i64,
            None => now_ms(),
        };
        let (key, payload) = encode(&codec, gen.next(ts))?;
        bytes += payload.len() as u64;
        send_blocking(&producer, topic, &key, &payload)?;
        if i > 0 && i % 500_000 == 0 {
            progress(&format!("fill: {i} of {count} queued"));
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the fill")?;
    let secs = started.elapsed().as_secs_f64();
    let consumer = reader()?;
    let per_partition = watermarks(&consumer, topic)?;
    let total: i64 = per_partition.values().map(|(lo, hi)| hi - lo).sum();
    ensure!(
        total == count as i64,
        "{topic} holds {total} records, expected {count} (was it fresh?)"
    );
    Ok(json!({
        "kind": "fill",
        "topic": topic,
        "count": count,
        "secs": secs,
        "events_per_s": count as f64 / secs,
        "avg_payload_bytes": bytes as f64 / count as f64,
        "per_partition": per_partition.iter().map(|(p, (lo, hi))| (p.to_string(), hi - lo)).collect::<BTreeMap<_, _>>(),
        "users": users,
        "hot_users": hot_users,
        "event_rate": event_rate,
    }))
}

fn reader() -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap()?)
        .set(
            "group.id",
            format!("stream-bench-reader-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("reader consumer")
}

/// partition -> (low, high) watermarks.
fn watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("metadata")?;
    let mut out = BTreeMap::new();
    for t in meta.topics() {
        for p in t.partitions() {
            let w = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .with_context(|| format!("watermarks of {topic}/{}", p.id()))?;
            out.insert(p.id(), w);
        }
    }
    ensure!(!out.is_empty(), "topic {topic} has no partitions");
    Ok(out)
}

/// One record read back: partition, offset, timestamp, payload.
type ReadRecord = (i32, i64, Timestamp, Vec<u8>);

/// Every record of `topic` up to its current high watermarks.
fn read_all(topic: &str, keep_payload: bool) -> anyhow::Result<Vec<ReadRecord>> {
    let consumer = reader()?;
    let marks = watermarks(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for (&p, &(lo, hi)) in &marks {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        remaining += hi - lo;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut out = Vec::with_capacity(remaining.max(0) as usize);
    while (out.len() as i64) < remaining {
        ensure!(
            Instant::now() < deadline,
            "reading {topic}: {} of {remaining} records after 300 s",
            out.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let high = marks.get(&m.partition()).map_or(0, |w| w.1);
                if m.offset() < high {
                    let payload = if keep_payload {
                        m.payload().unwrap_or_default().to_vec()
                    } else {
                        Vec::new()
                    };
                    out.push((m.partition(), m.offset(), m.timestamp(), payload));
                }
            }
            Some(Err(e)) => progress(&format!("reading {topic}: {e}")),
            None => {}
        }
    }
    Ok(out)
}

// --------------------------------------------------------------- CPU usage --

/// CPU ticks (utime + stime) per thread of a process: tid -> (name, ticks).
fn thread_ticks(pid: u32) -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((name, ticks)) = stat_ticks(&entry.path().join("stat")) {
            out.insert(tid, (name, ticks));
        }
    }
    out
}

fn stat_ticks(path: &std::path::Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn process_ticks(pid: u32) -> Option<u64> {
    stat_ticks(std::path::Path::new(&format!("/proc/{pid}/stat"))).map(|(_, t)| t)
}

/// Machine-wide jiffies: (total, idle + iowait, steal).
fn machine_ticks() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest counted in user)
    let total: u64 = (0..8).map(get).sum();
    (total, get(3) + get(4), get(7))
}

/// A CPU snapshot of one process (its threads), the broker and the machine.
struct CpuSnap {
    at: Instant,
    threads: HashMap<u32, (String, u64)>,
    broker: Option<u64>,
    /// This tool's own process (load generator, poller).
    me: Option<u64>,
    machine: (u64, u64, u64),
}

impl CpuSnap {
    fn take(pid: u32, broker: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            threads: thread_ticks(pid),
            broker: broker.and_then(process_ticks),
            me: (pid != std::process::id())
                .then(|| process_ticks(std::process::id()))
                .flatten(),
            machine: machine_ticks(),
        }
    }

    /// CPU between `self` and `later`, in % of one core: per thread group,
    /// whole process, broker, and machine busy/steal in % of all cores.
    fn until(&self, later: &CpuSnap) -> Value {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let pct = |ticks: u64| (ticks as f64 / CLK_TCK / secs * 1000.0).round() / 10.0;
        let mut groups: BTreeMap<String, u64> = BTreeMap::new();
        let mut total = 0;
        for (tid, (name, t)) in &later.threads {
            let before = self.threads.get(tid).map_or(0, |x| x.1);
            let d = t.saturating_sub(before);
            total += d;
            *groups.entry(name.clone()).or_default() += d;
        }
        let groups: BTreeMap<String, f64> = groups
            .into_iter()
            .filter(|(_, t)| *t > 0)
            .map(|(n, t)| (n, pct(t)))
            .collect();
        let (t0, i0, s0) = self.machine;
        let (t1, i1, s1) = later.machine;
        let dt = (t1.saturating_sub(t0)).max(1) as f64;
        let broker = match (self.broker, later.broker) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        // Busy jiffies of everything else on the machine (other work, Redis,
        // the kernel), summed over all cores, as % of one core.
        let busy = (t1.saturating_sub(t0)).saturating_sub(i1.saturating_sub(i0));
        let me = match (self.me, later.me) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let others = busy.saturating_sub(total + broker.unwrap_or(0) + me.unwrap_or(0));
        json!({
            "secs": secs,
            "process_pct_of_core": pct(total),
            "threads_pct_of_core": groups,
            "broker_pct_of_core": broker.map(pct),
            "bench_tool_pct_of_core": me.map(pct),
            "everything_else_pct_of_core": pct(others),
            "machine_busy_pct": ((1.0 - (i1.saturating_sub(i0)) as f64 / dt) * 1000.0).round() / 10.0,
            "machine_steal_pct": ((s1.saturating_sub(s0)) as f64 / dt * 1000.0).round() / 10.0,
        })
    }
}

// --------------------------------------------------------------------- raw --

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
enum RawWork {
    /// Read and discard.
    None,
    /// Decode each record with quotaflow's codec.
    Decode,
    /// Decode, then count the event against one key (its user) in a hash
    /// map of 128-bit keyed ids: one state lookup per event, where the
    /// default config makes three or four.
    DecodeLookup,
}

#[allow(clippy::too_many_arguments)]
fn raw(
    topic: &str,
    count: u64,
    group: &str,
    broker_pid: Option<u32>,
    timeout_secs: u64,
    label: Option<String>,
    work: RawWork,
    config: &std::path::Path,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let work_settings = Settings::load(Some(config))?;
    let codec = quotaflow::server::codec(&work_settings)?;
    let fp = quotaflow_core::fingerprint::Fingerprinter::from_secret(
        &work_settings.security.fingerprint_key,
    );
    let mut scratch = quotaflow_core::pipeline::records::RequestEvent::default();
    let mut counts: hashbrown::HashMap<quotaflow_core::state::KeyId, u64> =
        hashbrown::HashMap::new();
    let mut decoded = 0u64;
    // Exactly quotaflow's consumer settings, with the default session timeout.
    let settings = KafkaSettings {
        bootstrap_servers: bootstrap()?,
        group_id: group.to_owned(),
        ..KafkaSettings::default()
    };
    let consumer: BaseConsumer = quotaflow_adapters::kafka::consumer_config(&settings)
        .create()
        .context("raw consumer")?;
    consumer.subscribe(&[topic])?;
    let deadline = started + Duration::from_secs(timeout_secs);
    let me = std::process::id();
    let mut seen = 0u64;
    let mut bytes = 0u64;
    let mut first: Option<(Instant, CpuSnap)> = None;
    while seen < count {
        ensure!(
            Instant::now() < deadline,
            "raw consumer: {seen} of {count} records after {timeout_secs} s"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                seen += 1;
                let payload = m.payload().unwrap_or_default();
                bytes += payload.len() as u64;
                if work >= RawWork::Decode
                    && codec.decode_request_into(payload, &mut scratch).is_ok()
                {
                    decoded += 1;
                    if work >= RawWork::DecodeLookup {
                        let user = scratch.user_id.as_deref().unwrap_or_default();
                        *counts.entry(fp.key_id(user.as_bytes())).or_default() += 1;
                    }
                }
                if first.is_none() {
                    first = Some((Instant::now(), CpuSnap::take(me, broker_pid)));
                }
            }
            Some(Err(e)) => progress(&format!("raw consumer: {e}")),
            None => {}
        }
    }
    let last = Instant::now();
    let end = CpuSnap::take(me, broker_pid);
    let (t_first, snap) = first.context("no record seen")?;
    let secs = last.duration_since(t_first).as_secs_f64();
    Ok(json!({
        // Rounds with work are floors for the processor, not the baseline.
        "kind": if work == RawWork::None { "raw" } else { "floor" },
        "label": label,
        "work": format!("{work:?}"),
        "decoded": decoded,
        "keys": counts.len(),
        "count": count,
        "bytes": bytes,
        "secs": secs,
        "events_per_s": (count - 1) as f64 / secs,
        "wall_secs_from_start": last.duration_since(started).as_secs_f64(),
        "cpu": snap.until(&end),
    }))
}

// ------------------------------------------------------------------- watch --

struct WatchArgs {
    metrics: String,
    pid: u32,
    count: u64,
    prefix: String,
    group: String,
    topic: String,
    partitions: i32,
    broker_pid: Option<u32>,
    timeout: Duration,
    label: Option<String>,
}

fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Sum of a metric's samples (all label sets) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

fn consumed(addr: &str) -> anyhow::Result<u64> {
    let text = http_get(addr, "/metrics")?;
    Ok(metric_sum(&text, "quotaflow_events_consumed_total") as u64)
}

fn checkpointed(conn: &mut redis::Connection, a: &WatchArgs) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut out = BTreeMap::new();
    for p in 0..a.partitions {
        // Layout: src/stream/redis_store.rs.
        let key = format!("{}:{}:{}:{p}:checkpoint", a.prefix, a.group, a.topic);
        let v: Option<i64> = redis::cmd("HGET")
            .arg(&key)
            .arg("next_offset")
            .query(conn)?;
        out.insert(p, v.unwrap_or(0));
    }
    Ok(out)
}

/// Events processed per partition label, from /metrics.
fn consumed_by_partition(addr: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = http_get(addr, "/metrics")?;
    let prefix = "quotaflow_events_consumed_total{partition=\"";
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (p, v) = rest.split_once("\"}")?;
            Some((p.to_owned(), v.trim().parse::<f64>().ok()? as u64))
        })
        .collect())
}

/// Samples, every 5 ms until `stop`, how many of the process's partition
/// workers (threads `quotaflow-p*`) are running or runnable (state R), and
/// whether its consumer thread is.
fn sample_states(pid: u32, stop: &std::sync::atomic::AtomicBool) -> Value {
    use std::sync::atomic::Ordering;
    let state = |tid: u32| -> Option<char> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        text[text.rfind(')')? + 1..].trim_start().chars().next()
    };
    let mut workers: Vec<u32> = Vec::new();
    let mut consumer: Option<u32> = None;
    let mut hist = [0u64; 9];
    let (mut samples, mut consumer_running) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        if workers.is_empty() {
            for (tid, (name, _)) in thread_ticks(pid) {
                if name.starts_with("quotaflow-p") {
                    workers.push(tid);
                } else if name.starts_with("quotaflow-cons") {
                    consumer = Some(tid);
                }
            }
        }
        let running = workers.iter().filter(|&&t| state(t) == Some('R')).count();
        hist[running.min(8)] += 1;
        if consumer.and_then(state) == Some('R') {
            consumer_running += 1;
        }
        samples += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let frac = |n: u64| (n as f64 / samples.max(1) as f64 * 1000.0).round() / 1000.0;
    json!({
        "samples": samples,
        "workers": workers.len(),
        "fraction_of_samples_with_n_workers_running": hist[..=workers.len().min(8)].iter().map(|&n| frac(n)).collect::<Vec<_>>(),
        "consumer_thread_running_fraction": frac(consumer_running),
    })
}

fn watch(a: &WatchArgs) -> anyhow::Result<Value> {
    let started = Instant::now();
    let deadline = started + a.timeout;
    let client = redis::Client::open(env("REDIS_URL")?)?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    let poll = Duration::from_millis(50);
    // First sample with events processed: (time, count, CPU).
    let mut first: Option<(Instant, u64, CpuSnap)> = None;
    let mut trace = Vec::new();
    let mut last_trace = started;
    // How many partitions advanced in each 50-ms poll interval.
    let mut advancing = vec![0u64; a.partitions.max(1) as usize + 1];
    let mut previous: Option<BTreeMap<String, u64>> = None;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut sampler = None;
    let done = loop {
        ensure!(
            Instant::now() < deadline,
            "quotaflow processed {} of {} events within {:?}",
            consumed(&a.metrics).unwrap_or(0),
            a.count,
            a.timeout
        );
        ensure!(
            std::path::Path::new(&format!("/proc/{}", a.pid)).exists(),
            "quotaflow (pid {}) exited",
            a.pid
        );
        let by_partition = consumed_by_partition(&a.metrics).unwrap_or_default();
        let n: u64 = by_partition.values().sum();
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n, CpuSnap::take(a.pid, a.broker_pid)));
            let (pid, stop) = (a.pid, stop.clone());
            sampler = Some(std::thread::spawn(move || sample_states(pid, &stop)));
        }
        if let Some(prev) = &previous {
            let moved = by_partition
                .iter()
                .filter(|(p, v)| prev.get(*p).is_some_and(|old| *v > old))
                .count();
            if n < a.count {
                let last = advancing.len() - 1;
                advancing[moved.min(last)] += 1;
            }
        }
        if n > 0 {
            previous = Some(by_partition);
        }
        if now.duration_since(last_trace) >= Duration::from_secs(1) {
            last_trace = now;
            trace.push(json!([now.duration_since(started).as_secs_f64(), n]));
        }
        if n >= a.count {
            break (now, n);
        }
        std::thread::sleep(poll);
    };
    let end = CpuSnap::take(a.pid, a.broker_pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let states = sampler.and_then(|s| s.join().ok());
    let (t_first, n_first, snap) = first.context("no sample with events")?;
    let secs = done.0.duration_since(t_first).as_secs_f64();
    // Then until the checkpoints cover everything (one checkpoint interval later at most).
    let checkpoints = loop {
        let cp = checkpointed(&mut conn, a)?;
        if cp.values().sum::<i64>() >= a.count as i64 {
            break Some((Instant::now(), cp));
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let metrics = http_get(&a.metrics, "/metrics").unwrap_or_default();
    let decisions = metric_sum(&metrics, "quotaflow_decisions_emitted_total");
    let dead = metric_sum(&metrics, "quotaflow_dead_letters_total");
    Ok(json!({
        "kind": "processor",
        "label": a.label,
        "count": a.count,
        "consumed": done.1,
        "first_sample_consumed": n_first,
        "secs": secs,
        "events_per_s": (done.1 - n_first) as f64 / secs,
        "wall_secs_from_listening": done.0.duration_since(started).as_secs_f64(),
        "checkpoints_cover_all_after_secs": checkpoints.as_ref().map(|(t, _)| t.duration_since(started).as_secs_f64()),
        "checkpoint_next_offsets": checkpoints.map(|(_, cp)| cp),
        "decisions_emitted": decisions,
        "checkpoint_duration": histogram(&metrics, "quotaflow_checkpoint_duration_seconds"),
        "dead_letters": dead,
        "progress": trace,
        "partitions_advancing_per_50ms_interval": advancing,
        "thread_states": states,
        "cpu": snap.until(&end),
    }))
}

// ----------------------------------------------------------------- latency --

struct LatencyArgs {
    topic: String,
    decisions: String,
    metrics: String,
    pid: u32,
    rate: u64,
    duration: Duration,
    warmup: Duration,
    users: u32,
    hot_users: u32,
    broker_pid: Option<u32>,
    seed: u64,
    label: Option<String>,
    checkpoint_interval: Option<String>,
    log: Option<PathBuf>,
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp as tracing
/// writes it (`2026-11-26T22:38:45.923350Z`).
fn rfc3339_ms(t: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = t.get(19..)?.trim_end_matches('Z');
    let ms = match frac.strip_prefix('.') {
        Some(f) => format!("{f:0<3}").get(..3)?.parse::<i64>().ok()?,
        None => 0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

/// (partition, end ms) of every checkpoint the processor logged.
fn checkpoint_ends(log: &std::path::Path) -> anyhow::Result<Vec<(i32, i64)>> {
    let text = std::fs::read_to_string(log).with_context(|| format!("{}", log.display()))?;
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.contains("\"event\":\"checkpoint\""))
    {
        let v: Value = serde_json::from_str(line)?;
        if let (Some(p), Some(t)) = (
            v["partition"].as_i64(),
            v["timestamp"].as_str().and_then(rfc3339_ms),
        ) {
            out.push((p as i32, t));
        }
    }
    Ok(out)
}

fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn stats(mut v: Vec<i64>) -> Value {
    v.sort_unstable();
    json!({
        "count": v.len(),
        "p50_ms": percentile(&v, 0.50),
        "p90_ms": percentile(&v, 0.90),
        "p99_ms": percentile(&v, 0.99),
        "p999_ms": percentile(&v, 0.999),
        "max_ms": v.last(),
        "min_ms": v.first(),
    })
}

/// Request events for the latency run: `quotaflow simulate`'s mix (half of
/// the events from a few hot users, the rest spread over many), except that
/// hot user i starts sending i/K of a second into the run, so that each hot
/// user's once-a-second BLOCK falls at its own phase and BLOCK decisions are
/// spread evenly in time (with all hot users starting together they all
/// block in the same few milliseconds of every second, and whether those
/// meet a checkpoint decides the result).
struct StaggeredLoad {
    rng: rand::rngs::StdRng,
    users: u32,
    hot_users: u32,
    started: Instant,
    n: u64,
}

impl StaggeredLoad {
    fn new(users: u32, hot_users: u32, seed: u64) -> Self {
        use rand::SeedableRng as _;
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            users: users.max(1),
            hot_users,
            started: Instant::now(),
            n: 0,
        }
    }

    fn next(&mut self, now_ms: i64) -> quotaflow_core::pipeline::records::RequestEvent {
        use quotaflow::simulate::PATHS;
        use rand::Rng as _;
        self.n += 1;
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        let active =
            (u64::from(self.hot_users) * elapsed_ms / 1000 + 1).min(u64::from(self.hot_users));
        let user = if self.hot_users > 0 && self.rng.random_bool(0.5) {
            self.rng.random_range(0..active) as u32
        } else {
            self.hot_users + self.rng.random_range(0..self.users)
        };
        let path = PATHS[self.rng.random_range(0..PATHS.len())];
        quotaflow::simulate::user_event(
            format!("lat-{}", self.n),
            now_ms,
            user,
            path,
            "stream-bench",
        )
    }
}

/// Records when the broker acknowledged each request event.
struct AckClock {
    acks: parking_lot::Mutex<Vec<(i32, i64, i64)>>,
    failed: std::sync::atomic::AtomicU64,
}

impl ClientContext for AckClock {}

impl ProducerContext for AckClock {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => self.acks.lock().push((m.partition(), m.offset(), now_ms())),
            Err(_) => {
                self.failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// A Prometheus histogram of quotaflow's as {count, sum, buckets}.
fn histogram(text: &str, name: &str) -> Value {
    let mut buckets = BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix(&format!("{name}_bucket{{le=\"")) {
            if let Some((le, v)) = rest.split_once("\"}") {
                buckets.insert(le.to_owned(), v.trim().parse::<f64>().unwrap_or(0.0));
            }
        }
    }
    json!({
        "count": metric_sum(text, &format!("{name}_count")),
        "sum_secs": metric_sum(text, &format!("{name}_sum")),
        "cumulative_buckets": buckets,
    })
}

fn latency(a: &LatencyArgs) -> anyhow::Result<Value> {
    ensure!(a.rate > 0, "--rate must be positive");
    let codec = Codec::new(Encoding::SingleObject)?;
    // The settings of quotaflow_adapters::kafka::request_producer (what
    // `quotaflow simulate --kafka` uses), plus a delivery callback.
    let clock = AckClock {
        acks: parking_lot::Mutex::new(Vec::new()),
        failed: Default::default(),
    };
    let producer: ThreadedProducer<AckClock> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap()?)
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create_with_context(clock)
        .context("creating the producer")?;
    let mut gen = StaggeredLoad::new(a.users, a.hot_users, a.seed);
    let total = a.rate * (a.warmup + a.duration).as_secs();
    let base = consumed(&a.metrics)?;
    progress(&format!(
        "latency: producing {total} events at {} /s for {:?} + {:?} warm-up",
        a.rate, a.duration, a.warmup
    ));
    let start_snap = CpuSnap::take(a.pid, a.broker_pid);
    let started = Instant::now();
    let started_ms = now_ms();
    let mut sent = 0u64;
    let mut max_backlog = 0u64;
    let mut next_sample = started + Duration::from_secs(1);
    let mut late_ms_max = 0.0f64;
    while sent < total {
        let elapsed = started.elapsed();
        let due = ((elapsed.as_secs_f64() * a.rate as f64) as u64).min(total);
        if due > sent + a.rate / 100 {
            // More than 10 ms of events behind schedule: the generator is late.
            late_ms_max = late_ms_max.max((due - sent) as f64 * 1000.0 / a.rate as f64);
        }
        while sent < due {
            let event = gen.next(now_ms());
            let key = event.partition_key(&[Dimension::UserId]);
            let payload = codec.encode_request(&event)?;
            send_blocking(&producer, &a.topic, &key, &payload)?;
            sent += 1;
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            if let Ok(n) = consumed(&a.metrics) {
                max_backlog = max_backlog.max(sent.saturating_sub(n - base));
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let produce_secs = started.elapsed().as_secs_f64();
    producer
        .flush(Duration::from_secs(60))
        .context("flushing request events")?;
    // Wait until processed, then a little longer for the last decisions.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = consumed(&a.metrics)? - base;
        if n >= sent {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "quotaflow processed {n} of {sent} events 120 s after the end"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained_after = started.elapsed().as_secs_f64() - produce_secs;
    let end_snap = CpuSnap::take(a.pid, a.broker_pid);
    std::thread::sleep(Duration::from_secs(2));
    let metrics = http_get(&a.metrics, "/metrics").unwrap_or_default();
    let acks: HashMap<(i32, i64), i64> = producer
        .context()
        .acks
        .lock()
        .iter()
        .map(|&(p, o, t)| ((p, o), t))
        .collect();
    let failed = producer
        .context()
        .failed
        .load(std::sync::atomic::Ordering::Relaxed);

    let requests: HashMap<(i32, i64), i64> = read_all(&a.topic, false)?
        .into_iter()
        .filter_map(|(p, o, ts, _)| match ts {
            Timestamp::CreateTime(t) => Some(((p, o), t)),
            _ => None,
        })
        .collect();
    let measured_from = started_ms + a.warmup.as_millis() as i64;
    let mut by_action: BTreeMap<&'static str, Vec<i64>> = BTreeMap::new();
    let mut block_with_warmup = Vec::new();
    // BLOCK decisions only: produce -> broker ack, broker ack -> decision.
    let (mut to_ack, mut ack_to_decision) = (Vec::new(), Vec::new());
    // Per second of the measured window (by request time): BLOCK latencies.
    let mut per_second: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let checkpoints = match &a.log {
        Some(path) => checkpoint_ends(path)?,
        None => Vec::new(),
    };
    // BLOCK latencies of events during whose wait a checkpoint of their own
    // partition ended (they waited for it), and of the others.
    let (mut behind_checkpoint, mut clear_of_checkpoint) = (Vec::new(), Vec::new());
    let mut unmatched = 0u64;
    let mut ts_kinds = HashSet::new();
    let mut ids = HashSet::new();
    let mut duplicates = 0u64;
    for (_, _, ts, payload) in read_all(&a.decisions, true)? {
        let d = codec.decode_decision(&payload)?;
        if !ids.insert(d.decision_id.clone()) {
            duplicates += 1;
            continue;
        }
        let (kind, t) = match ts {
            Timestamp::CreateTime(t) => ("CreateTime", t),
            Timestamp::LogAppendTime(t) => ("LogAppendTime", t),
            Timestamp::NotAvailable => ("none", -1),
        };
        ts_kinds.insert(kind);
        let source = (d.source_partition, d.source_offset);
        let Some(&req_ts) = requests.get(&source) else {
            unmatched += 1;
            continue;
        };
        let action = match d.action {
            Action::Block => "BLOCK",
            Action::Unblock => "UNBLOCK",
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        };
        if d.action == Action::Block {
            block_with_warmup.push(t - req_ts);
        }
        if req_ts < measured_from {
            continue;
        }
        by_action.entry(action).or_default().push(t - req_ts);
        if d.action == Action::Block {
            per_second
                .entry((req_ts - measured_from).div_euclid(1000))
                .or_default()
                .push(t - req_ts);
            if let Some(&acked) = acks.get(&source) {
                to_ack.push(acked - req_ts);
                ack_to_decision.push(t - acked);
            }
            let waited = checkpoints
                .iter()
                .any(|&(p, end)| p == d.source_partition && (req_ts..=t).contains(&end));
            if waited {
                behind_checkpoint.push(t - req_ts);
            } else {
                clear_of_checkpoint.push(t - req_ts);
            }
        }
    }
    let all: Vec<i64> = by_action.values().flatten().copied().collect();
    let block = by_action.get("BLOCK").cloned().unwrap_or_default();
    let per_second: Vec<Value> = per_second
        .into_iter()
        .map(|(sec, mut v)| {
            v.sort_unstable();
            json!([
                sec,
                v.len(),
                percentile(&v, 0.5),
                percentile(&v, 0.99),
                v.last()
            ])
        })
        .collect();
    Ok(json!({
        "kind": "latency",
        "label": a.label,
        "rate": a.rate,
        "sent": sent,
        "produce_secs": produce_secs,
        "achieved_rate": sent as f64 / produce_secs,
        "generator_max_late_ms": late_ms_max,
        "max_backlog_events_at_1s_samples": max_backlog,
        "drained_secs_after_last_send": drained_after,
        "requests_read": requests.len(),
        "requests_acked": acks.len(),
        "requests_failed": failed,
        "decision_timestamp_type": ts_kinds.into_iter().collect::<Vec<_>>(),
        "unmatched_decisions": unmatched,
        "duplicate_decisions": duplicates,
        "warmup_secs": a.warmup.as_secs(),
        "measured_secs": a.duration.as_secs(),
        "block": stats(block),
        "block_including_warmup": stats(block_with_warmup),
        "all_decisions": stats(all),
        "block_produce_to_ack": stats(to_ack),
        "block_ack_to_decision": stats(ack_to_decision),
        "block_per_second_n_p50_p99_max": per_second,
        "checkpoints_logged": checkpoints.len(),
        "block_behind_a_checkpoint": a.log.as_ref().map(|_| stats(behind_checkpoint)),
        "block_clear_of_checkpoints": a.log.as_ref().map(|_| stats(clear_of_checkpoint)),
        "per_action_counts": by_action.iter().map(|(k, v)| (k.to_string(), v.len())).collect::<BTreeMap<_, _>>(),
        "checkpoint_duration": histogram(&metrics, "quotaflow_checkpoint_duration_seconds"),
        "checkpoint_interval": a.checkpoint_interval,
        "users": a.users,
        "hot_users": a.hot_users,
        "cpu": start_snap.until(&end_snap),
    }))
}

// --------------------------------------------------------------- breakdown --

fn ns_per(d: Duration, n: usize) -> f64 {
    (d.as_nanos() as f64 / n.max(1) as f64 * 10.0).round() / 10.0
}

fn breakdown(topic: &str, count: u64, config: &std::path::Path) -> anyhow::Result<Value> {
    let settings = Settings::load(Some(config))?;
    let mut records = read_all(topic, true)?;
    records.truncate(count as usize);
    let n = records.len();
    ensure!(n > 0, "{topic} is empty");
    let owned: Vec<(i32, i64, Option<i64>, Vec<u8>)> = records
        .into_iter()
        .map(|(p, o, ts, payload)| (p, o, ts.to_millis(), payload))
        .collect();

    let codec = quotaflow::server::codec(&settings)?;
    // Timed as the worker decodes: every record into the same event.
    let t = Instant::now();
    let mut scratch = quotaflow_core::pipeline::records::RequestEvent::default();
    for (_, _, _, payload) in &owned {
        let _ = std::hint::black_box(codec.decode_request_into(payload, &mut scratch));
    }
    let decode = t.elapsed();
    // The general path for comparison: apache-avro's `Value` tree, which the
    // codec falls back to for older writer schemas and damaged records.
    let schema = apache_avro::Schema::parse_str(quotaflow_adapters::avro::REQUEST_EVENT_SCHEMA)?;
    let header = match codec.encoding() {
        quotaflow_adapters::avro::Encoding::SingleObject => 10,
        quotaflow_adapters::avro::Encoding::Confluent { .. } => 5,
    };
    let generic = apache_avro::reader::datum::GenericDatumReader::builder(&schema).build()?;
    let t = Instant::now();
    let mut generic_ok = 0usize;
    for (_, _, _, payload) in &owned {
        let mut body = payload.get(header..).unwrap_or_default();
        if generic.read_value(&mut body).is_ok() {
            generic_ok += 1;
        }
    }
    let generic_decode = t.elapsed();

    let state = quotaflow::server::build_state(&settings, None)?;
    let cfg = Arc::new(quotaflow::server::processor_config(
        &settings,
        state.limiter.fingerprinter(),
    ));
    let shards = settings.state.effective_shards();
    let mut procs: BTreeMap<i32, PartitionProcessor> = BTreeMap::new();
    let mut out = Vec::new();
    let mut outputs = 0usize;
    // Decoded and processed one record at a time into the same scratch
    // event, as the worker does, so the processor reads an event that is
    // still in cache; its own cost is that minus the decode-only pass.
    let t = Instant::now();
    for (p, o, ts, payload) in &owned {
        let proc = procs.entry(*p).or_insert_with(|| {
            PartitionProcessor::new(cfg.clone(), *p, Arc::new(KeyedStore::new(shards)), None)
        });
        let input = InputRecord {
            offset: *o,
            broker_ts_ms: *ts,
            key: None,
            payload,
        };
        let event = codec
            .decode_request_into(payload, &mut scratch)
            .map(|()| &scratch)
            .map_err(|e| e.to_string());
        proc.process(&state.limiter, input, event, &mut out);
        outputs += out.len();
        out.clear();
    }
    let decode_and_process = t.elapsed();
    let process = decode_and_process.saturating_sub(decode);
    let t = Instant::now();
    let mut cp_bytes = 0;
    for proc in procs.values() {
        cp_bytes += proc.checkpoint(1).encode()?.len();
    }
    let checkpoint = t.elapsed();
    // What a worker's checkpoint costs besides the flush: export + encode
    // and the fenced save to Redis, per partition, one after the other (as
    // the shared connection serialises them).
    let mut saves = BTreeMap::new();
    if let Ok(url) = std::env::var("REDIS_URL") {
        use quotaflow_core::pipeline::CheckpointStore as _;
        let prefix = format!("stream-bench-breakdown-{}", std::process::id());
        let store = quotaflow_adapters::redis_checkpoints::RedisCheckpoints::new(
            &url,
            &prefix,
            "g",
            topic,
            Duration::from_secs(10),
        )?;
        for (p, proc) in &procs {
            let (epoch, _) = store.acquire(*p)?;
            let t = Instant::now();
            let cp = proc.checkpoint(1);
            let exported = t.elapsed();
            store.save(*p, epoch, &cp)?;
            saves.insert(
                p.to_string(),
                json!({
                    "keys": cp.keys.len(),
                    "export_ms": exported.as_secs_f64() * 1000.0,
                    "export_encode_save_ms": t.elapsed().as_secs_f64() * 1000.0,
                }),
            );
        }
        let mut conn =
            redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(5))?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL").arg(&keys).query(&mut conn)?;
        }
    }
    let per_event = ns_per(decode_and_process, n);
    Ok(json!({
        "kind": "breakdown",
        "config": config.display().to_string(),
        "events": n,
        "outputs": outputs,
        "ns_per_event": {
            "codec_decode": ns_per(decode, n),
            "apache_avro_value_tree_decode": ns_per(generic_decode, n),
            "process_limits": ns_per(process, n),
            "decode_and_process": per_event,
        },
        "apache_avro_decoded": generic_ok,
        "checkpoint_encode_all_partitions_ms": checkpoint.as_secs_f64() * 1000.0,
        "checkpoint_bytes": cp_bytes,
        "checkpoint_to_redis_per_partition": saves,
        "one_core_events_per_s_decode_plus_process": 1e9 / per_event,
    }))
}

// --------------------------------------------------------------- summarize --

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn summarize(
    path: &std::path::Path,
    half_rate: bool,
    live_half_rate: bool,
) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let of = |kind: &str| -> Vec<&Value> { lines.iter().filter(|v| v["kind"] == kind).collect() };
    let rates = |kind: &str| -> Vec<f64> {
        of(kind)
            .iter()
            .filter_map(|v| v["events_per_s"].as_f64())
            .collect()
    };
    let raw = rates("raw");
    let processor = rates("processor");
    let raw_median = median(raw.clone());
    let processor_median = median(processor.clone());
    if half_rate {
        let m = processor_median.context("no processor runs")?;
        return Ok(json!((m / 2.0).round() as u64));
    }
    // Per round: the runs with the same label (round number), paired.
    let mut pairs: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for v in of("raw") {
        pairs.entry(v["label"].to_string()).or_default().0 = v["events_per_s"].as_f64();
    }
    for v in of("processor") {
        pairs.entry(v["label"].to_string()).or_default().1 = v["events_per_s"].as_f64();
    }
    let round_ratios: Vec<f64> = pairs
        .values()
        .filter_map(|(r, q)| Some((*q)? / (*r)?))
        .collect();
    let ratio = match (processor_median, raw_median) {
        (Some(q), Some(r)) => Some(q / r),
        _ => None,
    };
    // What a consumer that only decodes (and looks up one key) reaches, as
    // a share of the raw consumer: the room the target leaves for limits.
    let mut floors = BTreeMap::new();
    for work in ["Decode", "DecodeLookup"] {
        let rates: Vec<f64> = of("floor")
            .iter()
            .filter(|v| v["work"] == work)
            .filter_map(|v| v["events_per_s"].as_f64())
            .collect();
        if let Some(m) = median(rates.clone()) {
            floors.insert(
                work,
                json!({
                    "events_per_s": rates,
                    "median": m,
                    "of_raw_median": raw_median.map(|r| m / r),
                }),
            );
        }
    }
    let latency = of("latency");
    let is_target = |v: &&&Value| v["label"].as_str().is_some_and(|l| l.starts_with("target"));
    let targets: Vec<&Value> = latency.iter().filter(is_target).copied().collect();
    // The machine's live ceiling: what the load generator achieved while
    // the broker and quotaflow ran beside it, when that fell short of the
    // rate asked (the 2 cores were saturated).
    let achieved = median(
        targets
            .iter()
            .filter_map(|v| v["achieved_rate"].as_f64())
            .collect(),
    );
    let asked = targets.first().and_then(|v| v["rate"].as_f64());
    let live_ceiling = match (achieved, asked) {
        (Some(a), Some(r)) if a < 0.95 * r => Some(a),
        _ => None,
    };
    if live_half_rate {
        return Ok(json!(live_ceiling.map_or(0, |c| (c / 2.0).round() as u64)));
    }
    let is_live = |v: &&&Value| {
        v["label"]
            .as_str()
            .is_some_and(|l| l.starts_with("live-half"))
    };
    let live: Vec<&Value> = latency.iter().filter(is_live).copied().collect();
    let live_p99 = median(
        live.iter()
            .filter_map(|v| v["block"]["p99_ms"].as_f64())
            .collect(),
    );
    let target_p99: Vec<f64> = targets
        .iter()
        .filter_map(|v| v["block"]["p99_ms"].as_f64())
        .collect();
    let p99 = median(target_p99.clone());
    let target_runs: Vec<Value> = targets
        .iter()
        .map(|v| {
            json!({
                "label": v["label"],
                "rate": v["rate"],
                "block": v["block"],
                "block_clear_of_checkpoints": v["block_clear_of_checkpoints"],
                "block_behind_a_checkpoint": v["block_behind_a_checkpoint"],
                "block_produce_to_ack": v["block_produce_to_ack"],
                "block_ack_to_decision": v["block_ack_to_decision"],
            })
        })
        .collect();
    let diagnostics: Vec<Value> = latency
        .iter()
        .filter(|v| !is_target(v) && !is_live(v))
        .map(|v| json!({"label": v["label"], "rate": v["rate"], "block": v["block"]}))
        .collect();
    Ok(json!({
        "kind": "summary",
        "raw_events_per_s": raw,
        "processor_events_per_s": processor,
        "raw_median": raw_median,
        "processor_median": processor_median,
        "ratio_of_medians": ratio,
        "round_ratios": round_ratios,
        "median_round_ratio": median(round_ratios.clone()),
        "floors": floors,
        "throughput_target_met": ratio.map(|r| r >= 0.70),
        "latency_rate": targets.first().map(|v| v["rate"].clone()),
        "latency_target_runs": target_runs,
        "block_p99_ms_per_target_run": target_p99,
        "median_block_p99_ms": p99,
        "median_block_p50_ms": median(targets.iter().filter_map(|v| v["block"]["p50_ms"].as_f64()).collect()),
        "latency_target_met": p99.map(|p| p <= 50.0),
        "latency_live_ceiling": live_ceiling,
        "latency_live_half_runs": live.iter().map(|v| json!({
            "label": v["label"],
            "rate": v["rate"],
            "block": v["block"],
            "block_produce_to_ack": v["block_produce_to_ack"],
            "block_ack_to_decision": v["block_ack_to_decision"],
        })).collect::<Vec<_>>(),
        "median_block_p99_ms_at_live_half": live_p99,
        "latency_diagnostics": diagnostics,
        "processor_cpu_pct_of_core": of("processor").iter().map(|v| v["cpu"]["process_pct_of_core"].clone()).collect::<Vec<_>>(),
        "processor_runs_everything_else_pct_of_core": of("processor").iter().map(|v| v["cpu"]["everything_else_pct_of_core"].clone()).collect::<Vec<_>>(),
        "raw_cpu_pct_of_core": of("raw").iter().map(|v| v["cpu"]["process_pct_of_core"].clone()).collect::<Vec<_>>(),
        "breakdown_ns_per_event": of("breakdown").iter().map(|v| json!({"config": v["config"], "ns_per_event": v["ns_per_event"]})).collect::<Vec<_>>(),
    }))
}
