//! Process settings: `config/default.toml` (or `--config FILE`), overridden
//! by `QUOTAFLOW__SECTION__KEY` environment variables, via the `config` crate.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use ipnet::IpNet;
use serde::Deserialize;

use quotaflow_adapters::settings::duration;
pub use quotaflow_adapters::settings::{KafkaSettings, RedisSettings};
use quotaflow_core::rules::{LimitDoc, RulesDoc, WhitelistDoc};

/// The embedded default, so the binary runs anywhere with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Everything `quotaflow serve` reads at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub state: StateSettings,
    #[serde(default)]
    pub security: SecuritySettings,
    #[serde(default)]
    pub stream: StreamSettings,
    #[serde(default)]
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub alerts: AlertSettings,
    #[serde(default)]
    pub decisions: DecisionSettings,
    #[serde(default)]
    pub grpc: GrpcSettings,
    #[serde(default)]
    pub cluster: ClusterSettings,
    #[serde(default)]
    pub shadow: ShadowSettings,
    #[serde(default)]
    pub limits: Vec<LimitDoc>,
    #[serde(default)]
    pub whitelist: WhitelistDoc,
    /// Whether request paths are case-sensitive when limits match them
    /// (`rules::path`); off by default.
    #[serde(default)]
    pub path_case_sensitive: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub trusted_proxies: Vec<IpNet>,
    pub api_key_header: String,
    pub user_id_header: String,
    /// Forward-auth: the header a trusted proxy puts the original request's
    /// URI in, and its method. Only these are read, so a client cannot slip
    /// in another one the proxy passes through untouched.
    pub forward_auth_uri_header: String,
    pub forward_auth_method_header: String,
    /// Forward-auth: the header carrying a request's cost.
    pub cost_header: String,
    pub forward_auth_deny_status: u16,
    /// A request's headers must arrive within this; it also closes idle
    /// keep-alive connections and connections that never send a byte.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// A request, body included, must be read and answered within this (`408`).
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// Connections open at once; past this new ones are closed at once.
    pub max_connections: usize,
    /// A file of admin tokens (one a line, `id:token`), read again when it
    /// changes: rotation without a restart (`api::tokens`).
    pub admin_tokens_file: Option<std::path::PathBuf>,
    /// On shutdown, how long requests in flight may take to finish before
    /// their connections are closed (the stream's final checkpoints follow).
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            trusted_proxies: vec![
                IpNet::from(IpAddr::from(Ipv4Addr::LOCALHOST)),
                IpNet::from(IpAddr::from(Ipv6Addr::LOCALHOST)),
            ],
            api_key_header: "x-api-key".into(),
            user_id_header: "x-user-id".into(),
            forward_auth_uri_header: "x-original-uri".into(),
            forward_auth_method_header: "x-original-method".into(),
            cost_header: "x-quotaflow-cost".into(),
            forward_auth_deny_status: 429,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(10),
            admin_tokens_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Human,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

/// Where the sidecar's checks are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In this instance's memory: exact for this instance alone.
    #[default]
    Memory,
    /// In one Redis shared by every instance (`[redis] url`): one limit
    /// for the whole group (docs/redis-mode.md).
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    pub backend: Backend,
    /// What a limit without its own `failure_mode` answers when the shared
    /// backend cannot answer within `[redis] budget`.
    pub failure_mode: quotaflow_core::rules::FailureMode,
    /// Shards of the key store; 0 picks 16 per core.
    pub shards: usize,
    /// Keys the sidecar's store holds at most (about 113 bytes each).
    pub max_keys: usize,
    /// A new key past `max_keys`: decided but not stored (`allow`), or
    /// refused (`refuse`); see `quotaflow_core::state::WhenFull`.
    pub when_full: quotaflow_core::state::WhenFull,
    #[serde(deserialize_with = "duration")]
    pub sweep_interval: Duration,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            failure_mode: quotaflow_core::rules::FailureMode::Open,
            shards: 0,
            max_keys: 2_000_000,
            when_full: quotaflow_core::state::WhenFull::Allow,
            sweep_interval: Duration::from_secs(5),
        }
    }
}

impl StateSettings {
    pub fn effective_shards(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            16 * std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    pub fingerprint_key: String,
}

/// The stream processor, in either mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Partitions of the in-process bus (embedded mode only; Kafka has its own).
    pub partitions: u32,
    /// Dimensions the message key is made of (what gateways key events by).
    pub partition_key: Vec<quotaflow_core::rules::Dimension>,
    /// How far a gateway's timestamp may run ahead of the broker's.
    #[serde(deserialize_with = "duration")]
    pub max_clock_skew: Duration,
    /// How often each partition writes its checkpoint.
    #[serde(deserialize_with = "duration")]
    pub checkpoint_interval: Duration,
    /// Bound on a revoke or shutdown: every handed-back partition drains and
    /// writes its final checkpoint within it, in parallel. Must be shorter
    /// than the consumer's `max.poll.interval.ms`.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// `single_object` (no registry) or `confluent` (registry ids below).
    pub encoding: EncodingName,
    pub schema_ids: SchemaIds,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            partitions: 4,
            partition_key: vec![quotaflow_core::rules::Dimension::UserId],
            max_clock_skew: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            encoding: EncodingName::SingleObject,
            schema_ids: SchemaIds::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncodingName {
    #[default]
    SingleObject,
    Confluent,
}

/// Schema ids the shop's registry assigned (Confluent wire format only).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaIds {
    pub request_event: u32,
    pub decision: u32,
    pub breach_alert: u32,
}

/// Breach alerts for security teams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// Alerts aggregate refusals per key over windows of this length (event time).
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// No alert for fewer refusals of a key in a window.
    pub min_refused: u64,
    /// From this many refusals on, the alert is CRITICAL (else WARNING).
    pub critical_refused: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            min_refused: 10,
            critical_refused: 1000,
        }
    }
}

/// The decisions topic.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionSettings {
    /// One ALLOW/DENY record per event, besides BLOCK/UNBLOCK.
    pub every_event: bool,
}

/// The group in Kafka mode: how instances reach the owner of a key's
/// partition (`src/cluster`, docs/group.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// The internal listener other instances forward checks to.
    pub listen: SocketAddr,
    /// The address other instances reach the internal listener at; empty
    /// means the bound `listen` address (fine on one machine only).
    pub advertise: String,
    /// A check forwarded to an owner is answered within this, else by
    /// its limits' `failure_mode`.
    #[serde(deserialize_with = "duration")]
    pub budget: Duration,
    /// How often owners are announced and the registry re-read.
    #[serde(deserialize_with = "duration")]
    pub registry_interval: Duration,
    /// Whether a counted synchronous hit is in the partition's log before
    /// it is answered (docs/group.md).
    pub sync_hits: crate::cluster::SyncHits,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            advertise: String::new(),
            budget: Duration::from_millis(50),
            registry_interval: Duration::from_millis(200),
            sync_hits: crate::cluster::SyncHits::Checkpointed,
        }
    }
}

/// The Envoy Rate Limit Service over gRPC (`src/grpc`, docs/envoy.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcSettings {
    /// Address of the gRPC listener; empty (the default) means none.
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// The RLS `domain` requests must name; empty accepts any domain.
    pub domain: String,
    /// Threads serving gRPC, each a single-threaded runtime owning the
    /// connections it accepts (`grpc::Running`); 0 is taken as 1.
    pub threads: usize,
    /// Descriptor entry keys, besides the built-in ones, and what each
    /// means: a dimension (`user_id`, `api_key`, `client_ip`, `method`,
    /// `path`) or `ignore` (accepted and not used).
    pub descriptor_keys: std::collections::BTreeMap<String, DescriptorKey>,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            listen: None,
            domain: String::new(),
            threads: 1,
            descriptor_keys: std::collections::BTreeMap::new(),
        }
    }
}

/// What a descriptor entry key stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DescriptorKey {
    UserId,
    ApiKey,
    ClientIp,
    Method,
    Path,
    /// An entry the gateway sends that no limit keys on (`generic_key`).
    Ignore,
}

/// `""` as `None`, anything else as a socket address.
fn optional_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}` is not an address such as 127.0.0.1:8081 (or empty: no listener)"
        ))
    })
}

/// A candidate config decided beside the real one in every partition
/// worker, its decisions published apart (docs/backtest.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowSettings {
    /// The file of its rules, as [`load_rules`] reads it; none: no shadow.
    pub config: Option<std::path::PathBuf>,
}

/// A rate-limit document read from a file or an instance, with the version
/// it ran as when it says so.
#[derive(Debug, Clone)]
pub struct RulesFile {
    pub doc: RulesDoc,
    pub version: Option<u64>,
}

/// The rules in `path`: a settings file (TOML or JSON; its `limits`,
/// `whitelist` and `path_case_sensitive`, the rest ignored) or the JSON
/// document `GET /rate_limit/config` returns.
pub fn load_rules(path: &Path) -> Result<RulesFile, SettingsError> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        let bytes = std::fs::read(path)
            .map_err(|e| SettingsError(format!("reading {}: {e}", path.display())))?;
        if let Ok(Some(rules)) = config_document(&bytes) {
            return Ok(rules);
        }
    }
    let settings = Settings::load_with_env(Some(path), false)?;
    Ok(RulesFile {
        doc: settings.rules(),
        version: None,
    })
}

/// The document of `GET /rate_limit/config` (`limits`, `whitelist`,
/// `path_case_sensitive`, `version`): `Ok(None)` if `bytes` is JSON with
/// other fields (a settings file), an error if its whitelist was redacted.
pub fn config_document(bytes: &[u8]) -> Result<Option<RulesFile>, SettingsError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| SettingsError(format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(SettingsError("not a JSON object".into()));
    };
    if obj.remove("whitelist_redacted") == Some(serde_json::Value::Bool(true)) {
        return Err(SettingsError(
            "the config's whitelist was redacted: read it with an admin token \
             (QUOTAFLOW_ADMIN_TOKEN), or from this machine without one"
                .into(),
        ));
    }
    let version = match obj.remove("version") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| SettingsError(format!("version {v} is not a version")))?,
        ),
    };
    const FIELDS: [&str; 3] = ["limits", "whitelist", "path_case_sensitive"];
    if obj.keys().any(|k| !FIELDS.contains(&k.as_str())) {
        return Ok(None);
    }
    let doc: RulesDoc = serde_json::from_value(value)
        .map_err(|e| SettingsError(format!("not a rate-limit config: {e}")))?;
    Ok(Some(RulesFile { doc, version }))
}

/// A settings file or environment that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(String);

impl Settings {
    /// Read `path` (or the embedded default when `None`), then environment
    /// overrides. Rule validation is separate: see [`Settings::rules`].
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_with_env(path, true)
    }

    /// As [`Settings::load`], optionally ignoring the environment (for
    /// `check-config`, which judges a file on its own).
    pub fn load_with_env(path: Option<&Path>, env: bool) -> Result<Self, SettingsError> {
        let mut builder = Config::builder();
        builder = match path {
            Some(p) => {
                if !p.is_file() {
                    return Err(SettingsError(format!(
                        "config file {} does not exist",
                        p.display()
                    )));
                }
                builder.add_source(File::from(p))
            }
            None => builder.add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml)),
        };
        if env {
            builder = builder.add_source(
                Environment::with_prefix("QUOTAFLOW")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("server.trusted_proxies"),
            );
        }
        let config = builder.build().map_err(|e| SettingsError(e.to_string()))?;
        config
            .try_deserialize()
            .map_err(|e| SettingsError(e.to_string()))
    }

    /// Settings that are each valid but cannot run together. Checked when
    /// serving, after environment overrides (a file alone may leave the
    /// secret to the environment, so `check-config` does not check this).
    pub fn check_mode(&self) -> Result<(), SettingsError> {
        if self.state.backend == Backend::Redis && self.security.fingerprint_key.is_empty() {
            return Err(SettingsError(
                "security.fingerprint_key must be set when state.backend = \"redis\": state \
                 keys in Redis are ids hashed under it, and every instance of the group must \
                 find the same keys (for example QUOTAFLOW__SECURITY__FINGERPRINT_KEY)"
                    .into(),
            ));
        }
        let r = &self.redis;
        let sane = !r.budget.is_zero()
            && r.budget <= Duration::from_secs(10)
            && r.max_batch > 0
            && (1..=256).contains(&r.connections)
            && r.probe_interval >= Duration::from_millis(10);
        if self.state.backend == Backend::Redis && !sane {
            return Err(SettingsError(
                "redis.budget must be above zero and at most 10s, redis.max_batch above zero, \
                 redis.connections between 1 and 256, and redis.probe_interval at least 10ms"
                    .into(),
            ));
        }
        if !self.kafka.bootstrap_servers.is_empty() && self.security.fingerprint_key.is_empty() {
            return Err(SettingsError(
                "security.fingerprint_key must be set in Kafka mode: state keys are kept as \
                 ids hashed under it, and a partition's state moves to other instances and \
                 across restarts, so every instance needs the same secret (for example \
                 QUOTAFLOW__SECURITY__FINGERPRINT_KEY)"
                    .into(),
            ));
        }
        let c = &self.cluster;
        if !self.kafka.bootstrap_servers.is_empty()
            && (c.budget.is_zero()
                || c.budget > Duration::from_secs(10)
                || c.registry_interval < Duration::from_millis(10))
        {
            return Err(SettingsError(
                "cluster.budget must be above zero and at most 10s, and \
                 cluster.registry_interval at least 10ms"
                    .into(),
            ));
        }
        let k = &self.kafka;
        if self.shadow.config.is_some()
            && !k.bootstrap_servers.is_empty()
            && (k.shadow_decisions_topic.is_empty()
                || [
                    &k.requests_topic,
                    &k.decisions_topic,
                    &k.alerts_topic,
                    &k.dead_letter_topic,
                ]
                .contains(&&k.shadow_decisions_topic))
        {
            // Gateways would act on the shadow's blocks.
            return Err(SettingsError(format!(
                "kafka.shadow_decisions_topic (\"{}\") must be a topic of its own when \
                 [shadow] config is set: gateways act on what the decisions topic says",
                k.shadow_decisions_topic
            )));
        }
        if !k.bootstrap_servers.is_empty()
            && (k.config_topic.is_empty()
                || [
                    &k.requests_topic,
                    &k.decisions_topic,
                    &k.alerts_topic,
                    &k.dead_letter_topic,
                    &k.shadow_decisions_topic,
                ]
                .contains(&&k.config_topic))
        {
            // Its records are config proposals, read from the beginning.
            return Err(SettingsError(format!(
                "kafka.config_topic (\"{}\") must be a topic of its own in Kafka mode: \
                 it holds the group's config proposals",
                k.config_topic
            )));
        }
        if !self.kafka.bootstrap_servers.is_empty() {
            let poll_ms = self
                .kafka
                .properties
                .get("max.poll.interval.ms")
                .map_or(Ok(300_000), |v| v.parse::<u64>())
                .map_err(|e| {
                    SettingsError(format!("kafka.properties.max.poll.interval.ms: {e}"))
                })?;
            let drain_ms = u64::try_from(self.stream.drain_timeout.as_millis()).unwrap_or(u64::MAX);
            if drain_ms == 0 || drain_ms >= poll_ms {
                return Err(SettingsError(format!(
                    "stream.drain_timeout ({drain_ms} ms) must be above zero and shorter than \
                     the consumer's max.poll.interval.ms ({poll_ms} ms): a revoke runs on the \
                     consumer's thread, and a member that polls no more is removed from the group"
                )));
            }
        }
        Ok(())
    }

    /// The rate-limit document within these settings.
    pub fn rules(&self) -> RulesDoc {
        RulesDoc {
            limits: self.limits.clone(),
            whitelist: self.whitelist.clone(),
            path_case_sensitive: self.path_case_sensitive,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quotaflow_core::fingerprint::Fingerprinter;
    use quotaflow_core::rules::Rules;

    #[test]
    fn embedded_default_is_valid() {
        let s = Settings::load_with_env(None, false).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        let rules = Rules::compile(s.rules(), 1, &Fingerprinter::random()).unwrap();
        assert_eq!(rules.limits.len(), 5);
        assert_eq!(s.state.sweep_interval, Duration::from_secs(5));
    }

    #[test]
    fn kafka_mode_needs_a_fingerprint_key_and_the_embedded_mode_does_not() {
        let mut s = Settings::load_with_env(None, false).unwrap();
        assert!(s.security.fingerprint_key.is_empty());
        assert!(s.check_mode().is_ok());
        s.kafka.bootstrap_servers = "127.0.0.1:9092".into();
        let err = s.check_mode().unwrap_err().to_string();
        assert!(err.contains("security.fingerprint_key"), "{err}");
        s.security.fingerprint_key = "k".into();
        assert!(s.check_mode().is_ok());
    }

    #[test]
    fn sync_hits_are_checkpointed_by_default_and_may_be_logged() {
        let s = Settings::load_with_env(None, false).unwrap();
        assert_eq!(s.cluster.sync_hits, crate::cluster::SyncHits::Checkpointed);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[cluster]\nsync_hits = \"logged\"\n").unwrap();
        let s = Settings::load_with_env(Some(&path), false).unwrap();
        assert_eq!(s.cluster.sync_hits, crate::cluster::SyncHits::Logged);
        std::fs::write(&path, "[cluster]\nsync_hits = \"sometimes\"\n").unwrap();
        let err = Settings::load_with_env(Some(&path), false).unwrap_err();
        assert!(format!("{err:#}").contains("sync_hits"), "{err:#}");
    }

    #[test]
    fn grpc_is_off_by_default_and_takes_an_address_and_key_aliases() {
        let s = Settings::load_with_env(None, false).unwrap();
        assert!(s.grpc.listen.is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "[grpc]\nlisten = \"127.0.0.1:8081\"\ndomain = \"edge\"\n\
             [grpc.descriptor_keys]\nx-user = \"user_id\"\ngeneric_key = \"ignore\"\n",
        )
        .unwrap();
        let s = Settings::load_with_env(Some(&path), false).unwrap();
        assert_eq!(
            s.grpc.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 8081)))
        );
        assert_eq!(s.grpc.descriptor_keys["x-user"], DescriptorKey::UserId);
        assert_eq!(s.grpc.descriptor_keys["generic_key"], DescriptorKey::Ignore);
        std::fs::write(&path, "[grpc]\nlisten = \"localhost\"\n").unwrap();
        let err = Settings::load_with_env(Some(&path), false).unwrap_err();
        assert!(err.to_string().contains("is not an address"), "{err}");
        std::fs::write(&path, "[grpc.descriptor_keys]\nx = \"cost\"\n").unwrap();
        assert!(Settings::load_with_env(Some(&path), false).is_err());
    }

    #[test]
    fn a_shadow_config_needs_a_decisions_topic_of_its_own() {
        let mut s = Settings::load_with_env(None, false).unwrap();
        s.kafka.bootstrap_servers = "127.0.0.1:9092".into();
        s.security.fingerprint_key = "k".into();
        s.kafka.shadow_decisions_topic = s.kafka.decisions_topic.clone();
        assert!(s.check_mode().is_ok(), "no shadow, no constraint");
        s.shadow.config = Some("candidate.toml".into());
        let err = s.check_mode().unwrap_err().to_string();
        assert!(err.contains("shadow_decisions_topic"), "{err}");
        s.kafka.shadow_decisions_topic = "shadow-decisions".into();
        assert!(s.check_mode().is_ok());
    }

    #[test]
    fn the_config_topic_is_a_topic_of_its_own_in_kafka_mode() {
        let mut s = Settings::load_with_env(None, false).unwrap();
        s.kafka.config_topic = s.kafka.requests_topic.clone();
        assert!(s.check_mode().is_ok(), "embedded: no constraint");
        s.kafka.bootstrap_servers = "127.0.0.1:9092".into();
        s.security.fingerprint_key = "k".into();
        let err = s.check_mode().unwrap_err().to_string();
        assert!(err.contains("config_topic"), "{err}");
        s.kafka.config_topic = String::new();
        assert!(s.check_mode().is_err());
        s.kafka.config_topic = "quotaflow-config".into();
        assert!(s.check_mode().is_ok());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:1\"\nlistn = 3\n").unwrap();
        let err = Settings::load_with_env(Some(&path), false).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn rules_files_are_settings_files_or_config_documents() {
        let dir = tempfile::tempdir().unwrap();
        let limit = r#"{"name": "a", "algorithm": "fixed_window", "limit": 1, "window": "1s"}"#;
        // What GET /rate_limit/config answers, version included.
        let doc = dir.path().join("doc.json");
        std::fs::write(&doc, format!(r#"{{"version": 7, "limits": [{limit}]}}"#)).unwrap();
        let f = load_rules(&doc).unwrap();
        assert_eq!((f.version, f.doc.limits.len()), (Some(7), 1));
        // A JSON settings file: other sections, no version.
        let json = dir.path().join("settings.json");
        let text = format!(r#"{{"log": {{"level": "warn"}}, "limits": [{limit}]}}"#);
        std::fs::write(&json, text).unwrap();
        let f = load_rules(&json).unwrap();
        assert_eq!((f.version, f.doc.limits.len()), (None, 1));
        let toml = dir.path().join("settings.toml");
        std::fs::write(
            &toml,
            "[[limits]]\nname = \"a\"\nlimit = 1\nwindow = \"1s\"\nalgorithm = \"fixed_window\"\n",
        )
        .unwrap();
        assert_eq!(load_rules(&toml).unwrap().doc.limits.len(), 1);
        // A redacted whitelist would silently let through what it lists.
        let redacted =
            format!(r#"{{"version": 1, "whitelist_redacted": true, "limits": [{limit}]}}"#);
        let err = config_document(redacted.as_bytes()).err().unwrap();
        assert!(err.to_string().contains("redacted"), "{err}");
        assert!(config_document(br#"{"version": "x", "limits": []}"#).is_err());
    }
}
