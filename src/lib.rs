//! quotaflow: rate limiting and quota enforcement.
//!
//! The core (`algorithms`, `rules`, `state`, `limiter`) knows nothing of
//! Kafka, Redis or HTTP; the adapters (`api`, `metrics`, the binary) depend on
//! it, never the other way round.

pub mod algorithms;
pub mod fingerprint;
pub mod limiter;
pub mod rules;
pub mod state;
