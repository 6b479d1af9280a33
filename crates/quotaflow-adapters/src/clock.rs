//! Wall-clock time, read only at the edges: the sidecar stamps `/check`
//! calls with it and the embedded bus stamps records with it as a broker
//! would. The core never reads a clock (algorithms take `now_ms`), which is
//! what makes a replay give the same state.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Shifts this process's clock by a signed number of milliseconds, for
/// tests of clock skew between instances (libfaketime cannot run a binary
/// whose allocator overrides malloc). Read once; never set in production.
pub const TEST_OFFSET_ENV: &str = "QUOTAFLOW_TEST_CLOCK_OFFSET_MS";

fn offset_ms() -> i64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var(TEST_OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// Milliseconds since the Unix epoch (0 for a clock set before 1970).
pub fn now_ms() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    real.saturating_add_signed(offset_ms())
}
