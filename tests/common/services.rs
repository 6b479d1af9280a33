//! Real Kafka and Redis for integration tests.
//!
//! Services come from `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` first (what
//! `scripts/test.sh` exports after `scripts/services.sh up`), else from
//! testcontainers when a Docker engine answers, else the test fails saying
//! how to start them. Every test uses its own topics, group and Redis key
//! prefix, so tests run in parallel against the same broker.

#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

const HOW: &str = "start them with `scripts/services.sh up` (or run `scripts/test.sh`), \
    which exports KAFKA_BOOTSTRAP_SERVERS and REDIS_URL";

fn docker_answers() -> bool {
    std::env::var_os("DOCKER_HOST").is_some()
        || std::path::Path::new("/var/run/docker.sock").exists()
}

static KAFKA: OnceLock<(String, Option<Container<GenericImage>>)> = OnceLock::new();
static REDIS: OnceLock<(String, Option<Container<GenericImage>>)> = OnceLock::new();

pub fn kafka() -> String {
    KAFKA
        .get_or_init(|| {
            if let Ok(v) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
                return (v, None);
            }
            assert!(
                docker_answers(),
                "no Kafka: KAFKA_BOOTSTRAP_SERVERS is unset and no Docker engine answers; {HOW}"
            );
            let c = GenericImage::new("apache/kafka", "4.0.0")
                .with_exposed_port(9092.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Kafka Server started"))
                .with_mapped_port(19092, 9092.tcp())
                .with_env_var(
                    "KAFKA_ADVERTISED_LISTENERS",
                    "PLAINTEXT://127.0.0.1:19092,CONTROLLER://localhost:9093",
                )
                .start()
                .unwrap_or_else(|e| panic!("starting a Kafka container failed ({e}); {HOW}"));
            ("127.0.0.1:19092".to_owned(), Some(c))
        })
        .0
        .clone()
}

pub fn redis() -> String {
    REDIS
        .get_or_init(|| {
            if let Ok(v) = std::env::var("REDIS_URL") {
                return (v, None);
            }
            assert!(
                docker_answers(),
                "no Redis: REDIS_URL is unset and no Docker engine answers; {HOW}"
            );
            let c = GenericImage::new("redis", "7")
                .with_exposed_port(6379.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
                .start()
                .unwrap_or_else(|e| panic!("starting a Redis container failed ({e}); {HOW}"));
            let port = c
                .get_host_port_ipv4(6379)
                .unwrap_or_else(|e| panic!("redis port: {e}"));
            (format!("redis://127.0.0.1:{port}"), Some(c))
        })
        .0
        .clone()
}

/// A name no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    format!("{name}-{:012x}", rand::random::<u64>() >> 16)
}

pub async fn create_topics(topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        // Test events carry fixed timestamps from 2023: without this the
        // broker's retention check (30 s after it starts, then every 5 min)
        // deletes them under the test's feet.
        .map(|(name, parts)| {
            NewTopic::new(name, *parts, TopicReplication::Fixed(1)).set("retention.ms", "-1")
        })
        .collect();
    let results = admin
        .create_topics(
            new.iter(),
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Each partition's high watermark: what a topic holds (its records'
/// offsets run below it).
pub fn end_offsets(topic: &str) -> std::collections::BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("watermark reader");
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    meta.topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, high)
        })
        .collect()
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Read {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Read every record of `topic` until `done(records)` holds or `timeout`.
pub fn read_until(topic: &str, timeout: Duration, done: impl Fn(&[Read]) -> bool) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline && !done(&out) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_owned(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// A Redis of one test's own, on a free loopback port, that the test may
/// stop or pause without touching the shared one. Killed on drop. Needs
/// `redis-server` on the PATH, which `scripts/services.sh up` installs.
pub struct PrivateRedis {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port)
    }

    /// Kill the server (`kill -9`: no persistence, so all its data goes)
    /// and start an empty one on the same port.
    pub fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Self::start_on(self.port);
        // Swap in the new process; the old (dead) one is dropped.
        *self = fresh;
    }

    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting redis-server ({e}); {HOW}"));
        let r = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The server answering must be ours: another test may have taken
        // the port while it was free.
        let pid_line = format!("process_id:{}", r.child.id());
        loop {
            let info = redis::Client::open(r.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c));
            if info.is_ok_and(|text| text.lines().any(|l| l.trim() == pid_line)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "private redis-server did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Send `signal` (`-STOP`, `-CONT`, `-KILL`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
