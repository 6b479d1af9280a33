//! quotaflow: rate limiting and quota enforcement. This package is the
//! binary and what only it needs; the workspace's layout:
//!
//! - `crates/quotaflow-core` — algorithms, rules, keyed state, the limiter
//!   and the partition processor; no Kafka, Redis, HTTP or tokio (its
//!   manifest cannot name them);
//! - `crates/quotaflow-adapters` — Avro, Kafka, Redis checkpoints, the
//!   embedded bus, partition workers and their ownership coordinator,
//!   Prometheus metrics;
//! - this package — [`api`] (the axum sidecar: `/check`, `/forward-auth`,
//!   `/rate_limit/config`, `/events`, `/metrics`, health), [`cluster`] (a
//!   check counted on each limit key's partition owner, forwarded over the
//!   internal listener; failure modes), [`grpc`] (the Envoy rate limit
//!   service over gRPC, with health and reflection), [`http_server`]
//!   (the accept loop: timeouts, connection cap, bounded drain), [`settings`]
//!   (the settings file and environment), [`server`] (wiring and
//!   `quotaflow serve`), [`simulate`] (traffic for the embedded pipeline or
//!   Kafka), [`backtest`] (a recorded range decided again under a candidate
//!   config), [`import_envoy`] (envoy ratelimit configs to quotaflow's),
//!   [`logging`], and `main.rs`, the command line;
//! - `tools/stream-bench` — the stream benchmark tool behind
//!   `scripts/bench-stream.sh`.

pub mod api;
pub mod backtest;
pub mod cluster;
pub mod grpc;
pub mod http_server;
pub mod import_envoy;
pub mod logging;
pub mod server;
pub mod settings;
pub mod simulate;
