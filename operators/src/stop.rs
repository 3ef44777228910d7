//! Cooperative stopping of a run, in two steps, as schedulers ask for it.
//!
//! Kubernetes, systemd and Slurm send SIGTERM and kill some seconds later; a person at a
//! terminal presses Ctrl-C and, if that is slow, presses it again. So a stop first
//! *drains* (no more input is read; rows already inside the stages finish and are
//! published) and, on a second request or when the grace period is over, *aborts* (the
//! file being written is abandoned; what was published stays). Nothing is cancelled by
//! dropping a future: every owner of work (the sink's writer thread above all) looks at
//! the signal and ends its work itself, so that when the run returns nothing is still
//! writing.

use std::sync::Arc;

use tokio::sync::watch;

/// How far a stop has gone; later levels include the earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopLevel {
    /// Nothing asked the run to stop.
    Running,
    /// Read no more input; finish and publish the rows in flight.
    Drain,
    /// Publish nothing more; end as soon as the writer is joined.
    Abort,
}

#[derive(Debug, Clone)]
struct State {
    level: StopLevel,
    /// The signal number of the first request, when a signal made it.
    signal: Option<i32>,
    /// Why the run was stopped at once, when it was not a signal (it lost its lock).
    reason: Option<String>,
}

/// A shared stop request: cheap to clone, every clone sees the same state.
#[derive(Debug, Clone)]
pub struct StopSignal(Arc<watch::Sender<State>>);

impl Default for StopSignal {
    fn default() -> Self {
        let (sender, _) = watch::channel(State {
            level: StopLevel::Running,
            signal: None,
            reason: None,
        });
        Self(Arc::new(sender))
    }
}

impl StopSignal {
    /// A request to stop, e.g. from `signal` (its number, as SIGTERM = 15): the first
    /// drains, any later one aborts. Returns the level reached.
    pub fn request(&self, signal: Option<i32>) -> StopLevel {
        let mut reached = StopLevel::Running;
        self.0.send_modify(|state| {
            if state.level == StopLevel::Running {
                state.level = StopLevel::Drain;
                state.signal = signal;
            } else {
                state.level = StopLevel::Abort;
            }
            reached = state.level;
        });
        reached
    }

    /// Stops at once (the grace period is over).
    pub fn abort(&self) {
        self.0.send_modify(|state| state.level = StopLevel::Abort);
    }

    /// Stops at once for `reason` (the run lost its lock), unless a signal stopped it first.
    pub fn abort_because(&self, reason: String) {
        self.0.send_modify(|state| {
            if state.level == StopLevel::Running {
                state.reason = Some(reason);
            }
            state.level = StopLevel::Abort;
        });
    }

    /// Why [`StopSignal::abort_because`] stopped the run.
    pub fn reason(&self) -> Option<String> {
        self.0.borrow().reason.clone()
    }

    /// How far a stop has gone.
    pub fn level(&self) -> StopLevel {
        self.0.borrow().level
    }

    /// The signal that first asked to stop, if a signal did.
    pub fn signal(&self) -> Option<i32> {
        self.0.borrow().signal
    }

    /// Waits until the stop has reached `level` (at once if it has).
    pub async fn reached(&self, level: StopLevel) {
        let mut receiver = self.0.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = receiver.wait_for(|state| state.level >= level).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_request_drains_and_a_second_aborts() {
        let stop = StopSignal::default();
        assert_eq!(stop.level(), StopLevel::Running);
        let waiter = {
            let stop = stop.clone();
            tokio::spawn(async move { stop.reached(StopLevel::Abort).await })
        };
        assert_eq!(stop.request(Some(15)), StopLevel::Drain);
        stop.reached(StopLevel::Drain).await;
        assert!(!waiter.is_finished());
        assert_eq!(stop.request(Some(2)), StopLevel::Abort);
        waiter.await.expect("the waiter sees the abort");
        // The first signal is the one the run reports.
        assert_eq!(stop.signal(), Some(15));
        stop.abort();
        assert_eq!(stop.level(), StopLevel::Abort);

        // A stop for a reason is told apart from a signal's.
        let lost = StopSignal::default();
        lost.abort_because("lost the lock".into());
        assert_eq!(
            (lost.level(), lost.signal(), lost.reason().as_deref()),
            (StopLevel::Abort, None, Some("lost the lock"))
        );
    }
}
