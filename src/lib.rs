//! quotaflow: rate limiting and quota enforcement.
//!
//! The core (`algorithms`, `rules`, `state`, `limiter`) knows nothing of
//! Kafka, Redis or HTTP; the adapters (`api`, `metrics`, the binary) depend on
//! it, never the other way round.

pub mod algorithms;
pub mod api;
pub mod fingerprint;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod rules;
pub mod server;
pub mod settings;
pub mod simulate;
pub mod state;
pub mod stream;
