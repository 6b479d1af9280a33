//! Wall-clock time, read only at the edges: the sidecar stamps `/check`
//! calls with it and the embedded bus stamps records with it as a broker
//! would. The core never reads a clock (algorithms take `now_ms`), which is
//! what makes a replay give the same state.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock set before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
