//! Counting a checkpoint's outputs until the sink has delivered them.
//!
//! A checkpoint at offset N promises that every output of the events before
//! N is delivered; otherwise a crash after the checkpoint would lose those
//! outputs for good (the events are not replayed). Waiting for the whole
//! producer to drain would stall on the other partitions' traffic, so each
//! partition counts its own outputs per checkpoint generation instead: the
//! worker starts a new [`Delivery`] with every snapshot, and the snapshot is
//! saved once its generation (and every earlier one) has settled.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
struct Counts {
    pending: u64,
    failed: u64,
}

/// The outputs of one checkpoint generation still in flight.
#[derive(Debug, Default)]
pub struct Delivery {
    counts: Mutex<Counts>,
    settled: Condvar,
}

/// How a generation ended, as far as the checkpoint is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Every output was acknowledged.
    Delivered,
    /// Some outputs are still in flight after the wait.
    Pending(u64),
    /// The sink gave up on some outputs: no checkpoint may ever cover them.
    Failed(u64),
}

impl Delivery {
    /// One output queued (call before handing it to the transport, so its
    /// acknowledgement can never arrive first).
    pub fn queued(&self) {
        self.counts.lock().pending += 1;
    }

    /// An output counted by [`Delivery::queued`] was not queued after all.
    pub fn cancelled(&self) {
        self.done(true);
    }

    /// One queued output was acknowledged (`true`) or given up on.
    pub fn done(&self, delivered: bool) {
        let mut c = self.counts.lock();
        c.pending = c.pending.saturating_sub(1);
        if !delivered {
            c.failed += 1;
        }
        if c.pending == 0 {
            self.settled.notify_all();
        }
    }

    /// Wait up to `timeout` for every queued output to be acknowledged.
    pub fn wait(&self, timeout: Duration) -> Settled {
        let deadline = Instant::now() + timeout;
        let mut c = self.counts.lock();
        while c.pending > 0 && c.failed == 0 {
            if self.settled.wait_until(&mut c, deadline).timed_out() {
                break;
            }
        }
        match (c.failed, c.pending) {
            (0, 0) => Settled::Delivered,
            (0, n) => Settled::Pending(n),
            (f, _) => Settled::Failed(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn settles_when_every_output_is_acknowledged() {
        let d = Arc::new(Delivery::default());
        assert_eq!(d.wait(Duration::ZERO), Settled::Delivered);
        d.queued();
        d.queued();
        assert_eq!(d.wait(Duration::from_millis(1)), Settled::Pending(2));
        let acker = {
            let d = d.clone();
            std::thread::spawn(move || {
                d.done(true);
                d.done(true);
            })
        };
        assert_eq!(d.wait(Duration::from_secs(10)), Settled::Delivered);
        acker.join().unwrap();
    }

    #[test]
    fn a_failed_output_never_settles_as_delivered() {
        let d = Delivery::default();
        d.queued();
        d.queued();
        d.done(false);
        assert_eq!(d.wait(Duration::ZERO), Settled::Failed(1));
        d.done(true);
        assert_eq!(d.wait(Duration::ZERO), Settled::Failed(1));
    }
}
