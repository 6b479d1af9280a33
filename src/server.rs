//! `quotaflow serve`: the limiter, its sweeper and the HTTP sidecar wired
//! together, with graceful shutdown.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use axum::http::StatusCode;
use tokio::net::TcpListener;

use crate::api::tokens::AdminTokens;
use crate::api::{self, AppState, Identity, RedisMode};
use crate::http_server;
use crate::settings::{load_rules, Backend, EncodingName, Settings};
use quotaflow_adapters::avro::{Codec, Encoding};
use quotaflow_adapters::coordinator::Coordinator;
use quotaflow_adapters::embedded::{Embedded, EmbeddedBus, EmbeddedSink, Routes};
use quotaflow_adapters::kafka::config::ConfigLog;
use quotaflow_adapters::kafka::{KafkaProcessor, KafkaSink};
use quotaflow_adapters::metrics::Metrics;
use quotaflow_adapters::redis_checkpoints::RedisCheckpoints;
use quotaflow_adapters::redis_state::config::SharedConfig;
use quotaflow_adapters::redis_state::{self, RedisState};
use quotaflow_adapters::worker::{Checkpointing, Processing, Shadow, WorkerContext};
use quotaflow_core::fingerprint::Fingerprinter;
use quotaflow_core::limiter::Limiter;
use quotaflow_core::pipeline::routing::Routing;
use quotaflow_core::pipeline::{CheckpointStore, MemoryCheckpoints, OutputSink, ProcessorConfig};
use quotaflow_core::state::KeyCap;

/// Environment variable holding the bearer token for config writes.
pub const ADMIN_TOKEN_ENV: &str = "QUOTAFLOW_ADMIN_TOKEN";

/// Build the limiter and metrics from `settings`.
pub fn build_state(settings: &Settings, admin_token: Option<String>) -> anyhow::Result<AppState> {
    let fingerprinter = if settings.security.fingerprint_key.is_empty() {
        tracing::info!(
            event = "fingerprint_key_random",
            "security.fingerprint_key is empty: fingerprints are stable for this process only"
        );
        Fingerprinter::random()
    } else {
        Fingerprinter::from_secret(&settings.security.fingerprint_key)
    };
    let limiter = Limiter::with_key_cap(
        settings.rules(),
        fingerprinter,
        settings.state.effective_shards(),
        KeyCap {
            max_keys: settings.state.max_keys.max(1),
            when_full: settings.state.when_full,
        },
    )
    .context("the rate-limit config is invalid")?;
    let limiter = match settings.state.backend {
        Backend::Memory => limiter,
        Backend::Redis => limiter
            .with_rules_check(Box::new(redis_state::check_rules))
            .context("the rate-limit config cannot run in the Redis state mode")?,
    };
    let limiter = Arc::new(limiter);
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    metrics
        .keys_max
        .set(i64::try_from(settings.state.max_keys).unwrap_or(i64::MAX));
    let redis_mode = match settings.state.backend {
        Backend::Memory => None,
        Backend::Redis => {
            let r = &settings.redis;
            // The URL may hold a password: not repeated in the error.
            let state = RedisState::start(r, metrics.clone())
                .context("starting the Redis state backend (is redis.url a Redis URL?)")?;
            // In Kafka mode the config topic holds the group's config
            // (`start_pipeline`): one store, not two that could disagree.
            let config = if settings.kafka.bootstrap_servers.is_empty() {
                Some(
                    SharedConfig::start(r, limiter.clone(), metrics.clone())
                        .context("following the group's config in Redis")?,
                )
            } else {
                None
            };
            Some(Arc::new(RedisMode {
                state,
                config,
                failure_mode: settings.state.failure_mode,
            }))
        }
    };
    metrics.config_version.set(limiter.rules().version as i64);
    let deny_status = StatusCode::from_u16(settings.server.forward_auth_deny_status)
        .ok()
        .filter(|s| s.is_client_error())
        .context("server.forward_auth_deny_status must be a 4xx status")?;
    Ok(AppState {
        limiter,
        metrics,
        redis_mode,
        config_log: None,
        ui_snapshot: Default::default(),
        // Trimmed there: mounted secrets often end in a newline.
        admin_tokens: Arc::new(AdminTokens::new(
            admin_token.as_deref(),
            settings.server.admin_tokens_file.clone(),
        )),
        identity: Arc::new(Identity {
            api_key_header: settings.server.api_key_header.to_ascii_lowercase(),
            user_id_header: settings.server.user_id_header.to_ascii_lowercase(),
            uri_header: settings.server.forward_auth_uri_header.to_ascii_lowercase(),
            method_header: settings
                .server
                .forward_auth_method_header
                .to_ascii_lowercase(),
            cost_header: settings.server.cost_header.to_ascii_lowercase(),
            trusted_proxies: settings.server.trusted_proxies.clone(),
            deny_status,
        }),
        embedded: None,
        coordinator: None,
        cluster: None,
        ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    })
}

/// The running stream processor, in either mode.
pub enum Pipeline {
    Embedded(Arc<Embedded>),
    Kafka {
        processor: KafkaProcessor,
        /// The requests topic's partitions at start: what checks are
        /// routed by, as producers key events by it.
        partitions: u32,
    },
}

impl Pipeline {
    /// Drain every partition, write final checkpoints, leave the group.
    pub fn stop(self) {
        match self {
            Pipeline::Embedded(e) => {
                e.bus.stop();
            }
            Pipeline::Kafka { processor, .. } => processor.stop(),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Pipeline::Embedded(_) => "embedded",
            Pipeline::Kafka { .. } => "kafka",
        }
    }
}

/// The Avro codec the settings ask for.
pub fn codec(settings: &Settings) -> anyhow::Result<Arc<Codec>> {
    let ids = settings.stream.schema_ids;
    let encoding = match settings.stream.encoding {
        EncodingName::SingleObject => Encoding::SingleObject,
        EncodingName::Confluent => Encoding::Confluent {
            request_event_id: ids.request_event,
            decision_id: ids.decision,
            breach_alert_id: ids.breach_alert,
        },
    };
    Ok(Arc::new(
        Codec::new(encoding).context("loading the Avro schemas")?,
    ))
}

/// What each partition processor needs from the settings.
pub fn processor_config(settings: &Settings, fingerprinter: &Fingerprinter) -> ProcessorConfig {
    ProcessorConfig {
        topic: settings.kafka.requests_topic.clone(),
        max_clock_skew_ms: settings.stream.max_clock_skew.as_millis() as u64,
        alert_window_ms: settings.alerts.window.as_millis().max(1) as u64,
        alert_min_refused: settings.alerts.min_refused,
        alert_critical_refused: settings.alerts.critical_refused,
        every_event: settings.decisions.every_event,
        sweep_interval_ms: settings.state.sweep_interval.as_millis().max(1) as u64,
        key_check: fingerprinter.check_value(),
        // Set by `start_pipeline`, which knows the partition count; a
        // backtest decides every limit in one place.
        routing: None,
    }
}

/// Start the stream processor: on Kafka with Redis checkpoints when
/// `kafka.bootstrap_servers` is set, else on the in-process bus.
pub fn start_pipeline(settings: &Settings, state: &mut AppState) -> anyhow::Result<Pipeline> {
    let codec = codec(settings)?;
    let k = &settings.kafka;
    let kafka_mode = !k.bootstrap_servers.is_empty();
    if kafka_mode {
        settings.check_mode()?;
        // The group's config before any event is decided: read to the end
        // of the config topic (seeded with the file config if empty).
        let log = ConfigLog::start(k, state.limiter.clone(), state.metrics.clone()).with_context(
            || {
                format!(
                    "joining the group's config (kafka.config_topic = {:?})",
                    k.config_topic
                )
            },
        )?;
        state.config_log = Some(log);
    }
    let mut shadow = shadow(settings, &state.limiter, kafka_mode, &codec)?;
    let mut coordinator =
        |sink: Arc<dyn OutputSink>, store: Arc<dyn CheckpointStore>, partitions: u32| {
            // Every limit is counted at its key's home partition: aligned ones
            // where the event arrives, the others through the repartition
            // topic (docs/stream.md, "Where a key is counted").
            let mut processor = processor_config(settings, state.limiter.fingerprinter());
            processor.routing = Some(Routing::new(
                settings.stream.partition_key.clone(),
                partitions,
            ));
            let ctx = WorkerContext {
                processing: Processing {
                    limiter: state.limiter.clone(),
                    codec: codec.clone(),
                    processor: Arc::new(processor),
                    shards: settings.state.effective_shards(),
                    key_cap: KeyCap {
                        max_keys: settings.state.max_keys.max(1),
                        when_full: settings.state.when_full,
                    },
                },
                sink,
                checkpoints: Checkpointing {
                    store,
                    interval: settings.stream.checkpoint_interval,
                },
                metrics: state.metrics.clone(),
                shadow: shadow.take(),
            };
            Arc::new(Coordinator::new(
                Arc::new(ctx),
                settings.stream.drain_timeout,
            ))
        };
    if !kafka_mode {
        let partitions = settings.stream.partitions.max(1);
        let routes = Arc::new(Routes::new(partitions));
        let sink = Arc::new(EmbeddedSink::new(&k.requests_topic, 1000).with_routes(routes.clone()));
        let coordinator = coordinator(
            sink.clone(),
            Arc::new(MemoryCheckpoints::default()),
            partitions,
        );
        state.coordinator = Some(coordinator.clone());
        let bus = EmbeddedBus::start(
            coordinator,
            partitions,
            settings.stream.partition_key.clone(),
            routes,
        )
        .context("starting the embedded bus")?;
        let embedded = Arc::new(Embedded { bus, sink });
        state.embedded = Some(embedded.clone());
        state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Pipeline::Embedded(embedded))
    } else {
        let r = &settings.redis;
        let checkpoints = RedisCheckpoints::new(
            &r.url,
            &r.key_prefix,
            &k.group_id,
            &k.requests_topic,
            r.timeout,
        )
        .context("configuring Redis checkpoints")?;
        let partitions = quotaflow_adapters::kafka::repartition::prepare(k)
            .context("preparing the repartition topic")?;
        let sink = KafkaSink::new(k, codec.clone())?;
        let coordinator = coordinator(Arc::new(sink), Arc::new(checkpoints), partitions);
        state.coordinator = Some(coordinator.clone());
        Ok(Pipeline::Kafka {
            processor: KafkaProcessor::start(coordinator, k, state.ready.clone())?,
            partitions,
        })
    }
}

/// The shadow config of `[shadow] config`, if any: the same fingerprint
/// key and shards as the real rules, its decisions to
/// `kafka.shadow_decisions_topic` (counted only, in the embedded mode).
fn shadow(
    settings: &Settings,
    limiter: &Limiter,
    kafka_mode: bool,
    codec: &Arc<Codec>,
) -> anyhow::Result<Option<Shadow>> {
    let Some(path) = &settings.shadow.config else {
        return Ok(None);
    };
    let file = load_rules(path)
        .with_context(|| format!("reading the shadow config {}", path.display()))?;
    let shadow = Limiter::new(
        file.doc,
        limiter.fingerprinter().clone(),
        settings.state.effective_shards(),
    )
    .with_context(|| format!("the shadow config {} is invalid", path.display()))?;
    let sink: Option<Arc<dyn OutputSink>> = if kafka_mode {
        Some(Arc::new(KafkaSink::shadow(&settings.kafka, codec.clone())?))
    } else {
        None
    };
    tracing::info!(
        event = "shadow_config_loaded",
        file = %path.display(),
        limits = shadow.rules().limits.len(),
        topic = kafka_mode.then_some(settings.kafka.shadow_decisions_topic.as_str()),
        "a shadow config decides every event beside the real one; its decisions go to their own topic and metrics"
    );
    Ok(Some(Shadow {
        limiter: Arc::new(shadow),
        sink,
    }))
}

/// Kafka mode with the in-memory state: bind the internal listener,
/// announce this instance's partitions in the owner registry, and route
/// `/check` to each limit key's owner (`crate::cluster`).
async fn start_cluster<F, Fut>(
    settings: &Settings,
    state: &mut AppState,
    partitions: u32,
    stopped: &F,
) -> anyhow::Result<Option<Arc<crate::cluster::Cluster>>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let k = &settings.kafka;
    let Some(coordinator) = state.coordinator.clone() else {
        return Ok(None);
    };
    if k.bootstrap_servers.is_empty() || state.redis_mode.is_some() {
        return Ok(None);
    }
    let c = &settings.cluster;
    let listener = TcpListener::bind(c.listen)
        .await
        .with_context(|| format!("cannot listen on cluster.listen {}", c.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let address = if !c.advertise.is_empty() {
        c.advertise.clone()
    } else if bound.ip().is_unspecified() {
        // Listening on every interface: other instances find this one by
        // its host name (a Compose service's `hostname`).
        format!("{}:{}", host_name(), bound.port())
    } else {
        bound.to_string()
    };
    let routing = quotaflow_core::pipeline::routing::Routing::new(
        settings.stream.partition_key.clone(),
        partitions,
    );
    let r = &settings.redis;
    let owned_by = coordinator.clone();
    let registry = quotaflow_adapters::owners::OwnerRegistry::start(
        &r.url,
        format!(
            "{}:{}:{}:owners",
            r.key_prefix, k.group_id, k.requests_topic
        ),
        address.clone(),
        c.registry_interval,
        r.timeout,
        // Only partitions that answer checks now: one still restoring or
        // replaying is left to its previous entry (whose owner answers
        // "not owned") until it can.
        Box::new(move || {
            owned_by
                .owned()
                .into_iter()
                .filter(|&p| owned_by.sync_target(p).is_some())
                .filter_map(|p| owned_by.owner_epoch(p).map(|e| (p, e)))
                .collect()
        }),
    )
    .context("starting the owner registry (redis.url)")?;
    // Derived from the group's secret, so it is the same on every
    // instance and reveals nothing about the secret.
    let token = state
        .limiter
        .fingerprinter()
        .hex(b"quotaflow internal group token v1");
    let cluster = Arc::new(
        crate::cluster::Cluster::new(
            routing,
            coordinator,
            registry,
            &token,
            c.budget,
            settings.state.failure_mode,
            address.clone(),
        )?
        .with_header_timeout(settings.server.header_timeout)
        .with_sync_hits(c.sync_hits),
    );
    state.cluster = Some(cluster.clone());
    if bound.ip().is_loopback() {
        tracing::warn!(
            event = "cluster_loopback",
            address = %address,
            "cluster.listen is a loopback address: only instances on this machine can forward checks here"
        );
    }
    tracing::info!(
        event = "cluster_listening",
        address = %address,
        partitions,
        "internal listener for checks forwarded by the group"
    );
    let limits = http_server::Limits {
        header_timeout: settings.server.header_timeout,
        request_timeout: settings.server.request_timeout,
        max_connections: settings.server.max_connections,
        shutdown_grace: settings.server.shutdown_grace,
    };
    let router = crate::cluster::router(state.clone(), cluster.clone());
    tokio::spawn(http_server::serve(
        listener,
        router,
        limits,
        state.metrics.clone(),
        stopped(),
    ));
    Ok(Some(cluster))
}

/// This machine's host name, as other instances on the network resolve it.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "localhost".into())
}

/// Serve until `shutdown` completes, then drain in-flight requests.
pub async fn serve(
    settings: Settings,
    admin_token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut state = build_state(&settings, admin_token)?;
    let pipeline = start_pipeline(&settings, &mut state)?;
    let listener = TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // One shutdown for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|&stop| stop).await;
        }
    };
    // Bound (and announced) before `listening`, so a client that saw the
    // HTTP listener finds the gRPC one too.
    let cluster = match &pipeline {
        Pipeline::Kafka { partitions, .. } => {
            start_cluster(&settings, &mut state, *partitions, &stopped).await?
        }
        Pipeline::Embedded(_) => None,
    };
    let grpc = crate::grpc::start(&settings, &state, &stopped).await?;
    let sweeper = tokio::spawn(sweep(state.clone(), settings.state.sweep_interval));
    if !state.admin_tokens.any() && !addr.ip().is_loopback() {
        tracing::warn!(
            event = "config_writes_local_only",
            addr = %addr,
            "no admin token (QUOTAFLOW_ADMIN_TOKEN): config writes are accepted only from this machine, and the whitelist is shown only to it"
        );
    }
    let rules = state.limiter.rules();
    tracing::info!(
        event = "listening",
        addr = %addr,
        limits = rules.limits.len(),
        config_version = rules.version,
        admin_token = state.admin_tokens.any(),
        mode = pipeline.mode(),
        "quotaflow listening on http://{addr} ({} mode)",
        pipeline.mode()
    );
    let limits = http_server::Limits {
        header_timeout: settings.server.header_timeout,
        request_timeout: settings.server.request_timeout,
        max_connections: settings.server.max_connections,
        shutdown_grace: settings.server.shutdown_grace,
    };
    let metrics = state.metrics.clone();
    http_server::serve(listener, api::router(state), limits, metrics, stopped()).await;
    if let Some(c) = &cluster {
        // Off the runtime: it waits for the registry's last Redis call.
        let c = c.clone();
        let _ = tokio::task::spawn_blocking(move || c.registry().stop()).await;
    }
    if let Some(g) = grpc {
        // Calls in flight finish first; a failure was logged by its thread.
        let _ = tokio::task::spawn_blocking(move || g.join()).await;
    }
    sweeper.abort();
    tokio::task::spawn_blocking(move || pipeline.stop())
        .await
        .context("stopping the stream processor")?;
    tracing::info!(event = "stopped", "quotaflow stopped");
    Ok(())
}

/// Drop idle keys periodically so memory follows the active key set.
async fn sweep(state: AppState, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = quotaflow_adapters::clock::now_ms();
        let removed = state.limiter.store().sweep(now);
        let mut keys = state.limiter.store().len();
        let mut over = state.limiter.store().take_over_cap();
        // Kafka mode: checks count in the partitions' states too (capped by
        // state.max_keys each). They are swept by their own event time, not
        // by this clock: events may run far behind it (a replay, a backfill),
        // and a key expired by the wall clock can still be live in event time.
        if let (Some(_), Some(coordinator)) = (&state.cluster, &state.coordinator) {
            for p in coordinator.owned() {
                for store in [coordinator.store(p), coordinator.home_store(p)]
                    .into_iter()
                    .flatten()
                {
                    keys += store.len();
                    over += store.take_over_cap();
                }
            }
        }
        state.metrics.keys_expired.inc_by(removed as u64);
        state.metrics.sweep_episodes(now);
        state.metrics.keys_tracked.set(keys as i64);
        if over > 0 {
            state.metrics.keys_over_cap.inc_by(over);
            tracing::warn!(
                event = "key_capacity_reached",
                new_keys = over,
                keys,
                "the key store is full (state.max_keys): new keys were not stored since the last sweep"
            );
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!(event = "shutdown", "shutdown requested; draining");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_mode_without_a_fingerprint_key_is_refused_before_connecting() {
        let mut settings = Settings::load_with_env(None, false).expect("the embedded default");
        // Nothing listens here: the refusal must come before any connection.
        settings.kafka.bootstrap_servers = "127.0.0.1:1".into();
        let mut state = build_state(&settings, None).expect("state");
        let err = match start_pipeline(&settings, &mut state) {
            Ok(_) => panic!("started without a fingerprint key"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("security.fingerprint_key"), "{err}");
    }
}
