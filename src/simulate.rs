//! `quotaflow simulate`: a load generator of request events, feeding the
//! embedded pipeline in-process (so decisions and alerts can be watched with
//! nothing installed) or publishing Avro events to a real Kafka.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, Producer};

use crate::settings::Settings;
use quotaflow_core::pipeline::records::RequestEvent;

/// What traffic to generate (also the `simulate` command's options).
#[derive(Debug, Clone, clap::Args)]
pub struct Plan {
    /// Distinct users.
    #[arg(long, default_value_t = 1000)]
    pub users: u32,
    /// Users that send half of all events (and get limited).
    #[arg(long, default_value_t = 3)]
    pub hot_users: u32,
    /// Events per second (0: as fast as possible).
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// How long to run, e.g. 10s or 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Gateway clock offset added to every timestamp, in ms.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub skew_ms: i64,
    /// Make every n-th record random bytes (0: never), to watch dead letters.
    #[arg(long, default_value_t = 0)]
    pub poison_every: u32,
    /// Seed of the generator: the same seed gives the same traffic.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The paths simulated traffic spreads over (`/login` as `POST`).
pub const PATHS: &[&str] = &["/orders", "/search", "/login", "/items/42", "/cart"];

/// The event a simulated `user` sends on `path`. The one definition of what
/// simulated traffic looks like, so the stream benchmark's live load is the
/// same mix as `quotaflow simulate`'s.
pub fn user_event(
    event_id: String,
    timestamp_ms: i64,
    user: u32,
    path: &str,
    gateway_id: &str,
) -> RequestEvent {
    RequestEvent {
        event_id,
        timestamp_ms,
        user_id: Some(format!("user-{user}")),
        api_key: Some(format!("sk_sim_{user:06}")),
        client_ip: Some(format!("198.51.100.{}", user % 250 + 1)),
        method: Some(if path == "/login" { "POST" } else { "GET" }.into()),
        path: Some(path.into()),
        cost: 1,
        gateway_id: Some(gateway_id.into()),
    }
}

/// Deterministic traffic for a seed.
pub struct Generator {
    rng: StdRng,
    plan: Plan,
    n: u64,
}

/// One generated record: an event, or poison bytes.
pub enum Generated {
    Event(Box<RequestEvent>),
    Poison(Vec<u8>),
}

impl Generator {
    pub fn new(plan: Plan) -> Self {
        Self {
            rng: StdRng::seed_from_u64(plan.seed),
            plan,
            n: 0,
        }
    }

    pub fn next(&mut self, now_ms: i64) -> Generated {
        self.n += 1;
        if self.plan.poison_every > 0 && self.n.is_multiple_of(u64::from(self.plan.poison_every)) {
            let len = self.rng.random_range(0..64);
            return Generated::Poison((0..len).map(|_| self.rng.random()).collect());
        }
        let hot = self.plan.hot_users > 0 && self.rng.random_bool(0.5);
        let user = if hot {
            self.rng.random_range(0..self.plan.hot_users)
        } else {
            self.rng.random_range(0..self.plan.users.max(1))
        };
        let path = PATHS[self.rng.random_range(0..PATHS.len())];
        Generated::Event(Box::new(user_event(
            format!("sim-{}-{}", self.plan.seed, self.n),
            now_ms + self.plan.skew_ms,
            user,
            path,
            "simulator",
        )))
    }
}

/// Drive `emit` at the plan's rate for its duration. Returns records emitted.
pub fn pace(
    plan: &Plan,
    mut emit: impl FnMut(Generated) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut gen = Generator::new(plan.clone());
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < plan.duration {
        if plan.rate > 0 {
            let due = (start.elapsed().as_secs_f64() * f64::from(plan.rate)) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        emit(gen.next(quotaflow_adapters::clock::now_ms() as i64))?;
        sent += 1;
    }
    Ok(sent)
}

/// Publish the plan's traffic to Kafka (`settings.kafka`), Avro-encoded with
/// the configured encoding and keyed by the partition key.
pub fn to_kafka(settings: &Settings, plan: &Plan) -> anyhow::Result<u64> {
    let codec = crate::server::codec(settings)?;
    let producer = quotaflow_adapters::kafka::request_producer(&settings.kafka)?;
    let topic = &settings.kafka.requests_topic;
    let sent = pace(plan, |g| {
        let (key, payload) = match g {
            Generated::Event(e) => (
                e.partition_key(&settings.stream.partition_key),
                codec.encode_request(&e)?,
            ),
            Generated::Poison(bytes) => (b"poison".to_vec(), bytes),
        };
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((e, r)) => {
                    if !matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ) {
                        return Err(e).context("producing a request event");
                    }
                    record = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    })?;
    producer
        .flush(Duration::from_secs(30))
        .context("flushing request events")?;
    Ok(sent)
}
