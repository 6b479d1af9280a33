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
    on_settled: Mutex<OnSettled>,
}

/// Called once, when every output queued so far is acknowledged (`true`)
/// or one was given up on (`false`).
#[derive(Default)]
struct OnSettled(Option<Box<dyn FnOnce(bool) + Send>>);

impl std::fmt::Debug for OnSettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
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
    /// A delivery that calls `f` when it settles, for a caller that cannot
    /// block on [`Delivery::wait`] (an async handler awaiting one record).
    pub fn notifying(f: impl FnOnce(bool) + Send + 'static) -> Self {
        Self {
            on_settled: Mutex::new(OnSettled(Some(Box::new(f)))),
            ..Self::default()
        }
    }

    /// One output queued (call before handing it to the transport, so its
    /// acknowledgement can never arrive first).
    pub fn queued(&self) {
        self.counts.lock().pending += 1;
    }

    /// An output counted by [`Delivery::queued`] was not queued after all
    /// (the caller reports the error). A notifying delivery does not call
    /// back for it: its callback is dropped with the delivery unless
    /// another output settles it.
    pub fn cancelled(&self) {
        let mut c = self.counts.lock();
        c.pending = c.pending.saturating_sub(1);
        if c.pending == 0 {
            self.settled.notify_all();
        }
    }

    /// One queued output was acknowledged (`true`) or given up on.
    pub fn done(&self, delivered: bool) {
        let mut c = self.counts.lock();
        c.pending = c.pending.saturating_sub(1);
        if !delivered {
            c.failed += 1;
        }
        let settled = c.pending == 0 || c.failed > 0;
        let ok = c.failed == 0;
        if c.pending == 0 {
            self.settled.notify_all();
        }
        drop(c);
        if settled {
            if let Some(f) = self.on_settled.lock().0.take() {
                f(ok);
            }
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
    fn a_notifying_delivery_calls_back_once_settled() {
        let (tx, rx) = std::sync::mpsc::channel();
        let d = Delivery::notifying(move |ok| tx.send(ok).unwrap());
        d.queued();
        d.queued();
        d.done(true);
        assert!(rx.try_recv().is_err(), "one output is still in flight");
        d.done(true);
        assert_eq!(rx.try_recv(), Ok(true));
        let (tx, rx) = std::sync::mpsc::channel();
        let d = Delivery::notifying(move |ok| tx.send(ok).unwrap());
        d.queued();
        d.queued();
        d.done(false);
        assert_eq!(rx.try_recv(), Ok(false), "a failure settles at once");
        d.done(true);
        assert!(rx.try_recv().is_err(), "called once");
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
