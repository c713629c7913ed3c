//! What the breaker takes and hands back per call and for the admin API: a
//! call's outcome, a rejection, the snapshot and the monotonic counts.

use std::time::Duration;

use super::state::{Reason, State};

/// How a call ended, as classified by the caller (`failure_status`, connect
/// errors and timeouts are failures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// A call the breaker refused (or, in dry run, would have refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// `Open`, `HalfOpen` (no trial slot left) or `ForcedOpen`.
    pub state: State,
    /// Time left in OPEN; 1 s in HALF_OPEN; `recovery_timeout` when forced open.
    pub retry_after: Duration,
}

impl Rejected {
    /// The `Retry-After` value: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// The breaker's counters and state for `/_ops/breakers`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    pub state: State,
    /// Reason of the last transition; `None` until the first one.
    pub reason: Option<Reason>,
    /// Seconds left in OPEN; 0 in every other state.
    pub remaining_timeout_s: f64,
    /// Every call offered, rejected ones included.
    pub total_calls: u64,
    pub successful_calls: u64,
    pub failed_calls: u64,
    /// Rejections, and would-be rejections in dry run.
    pub rejected_calls: u64,
    /// Calls admitted whose permit was dropped without an outcome.
    pub cancelled_calls: u64,
    /// Admitted calls not finished yet.
    pub in_flight: u64,
    pub state_changes: u64,
    pub dry_run: bool,
}

/// Monotonic totals since the breaker was built, for Prometheus counters
/// (unlike [`Snapshot`], never cleared by `reset`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub success: u64,
    pub failure: u64,
    pub rejected: u64,
    pub cancelled: u64,
    pub state_changes: u64,
}

impl Counts {
    pub(super) fn minus(self, base: Counts) -> Counts {
        Counts {
            total: self.total.saturating_sub(base.total),
            success: self.success.saturating_sub(base.success),
            failure: self.failure.saturating_sub(base.failure),
            rejected: self.rejected.saturating_sub(base.rejected),
            cancelled: self.cancelled.saturating_sub(base.cancelled),
            state_changes: self.state_changes.saturating_sub(base.state_changes),
        }
    }

    pub(super) fn finished(&self) -> u64 {
        self.success + self.failure + self.rejected + self.cancelled
    }
}
