//! quotaflow-core: what a rate limiter decides, with no I/O. Its manifest
//! depends on none of Kafka, Redis, HTTP or an async runtime, so the
//! compiler keeps that promise; `quotaflow-adapters` connects it to them.
//!
//! - [`algorithms`]: pure `(policy, state, now_ms, cost) -> (verdict, state')`
//!   functions, one file each (token bucket, fixed and sliding window);
//! - [`rules`]: the config document, its validation, matching, whitelists
//!   and the request vocabulary;
//! - [`state`]: sharded per-key state with expiry, keyed by 128-bit ids;
//! - [`fingerprint`]: keyed hashes (state key ids, API key fingerprints);
//! - [`config_log`]: a group's config as a log of proposals, the rule
//!   every instance applies to it, and the summary of a change;
//! - [`limiter`]: a request against every matching limit, atomically;
//! - [`pipeline`]: the stream processor's core — what one partition does
//!   with one record, alert windows, checkpoints, output records, delivery
//!   tracking, the partitioner, and the sink and checkpoint-store traits.

pub mod algorithms;
pub mod config_log;
pub mod fingerprint;
pub mod limiter;
pub mod pipeline;
pub mod rules;
pub mod state;
