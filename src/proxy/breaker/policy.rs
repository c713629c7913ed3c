//! What opens, probes and closes a breaker: the policy the config layer builds,
//! and the rate rule's verdict over its sliding window.

use std::time::Duration;

use tokio::time::Instant;

use super::state::Reason;
use crate::proxy::window::SlidingWindow;

/// What opens, probes and closes a breaker. Built by the config layer.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerPolicy {
    /// Consecutive failures in CLOSED that open the circuit (0 is treated as 1).
    pub failure_threshold: u32,
    /// How long OPEN lasts before HALF_OPEN admits trial calls.
    pub recovery_timeout: Duration,
    /// Concurrent trial calls admitted in HALF_OPEN (0 is treated as 1).
    pub half_open_max_calls: u32,
    /// Successful trials that close the circuit (0 is treated as 1).
    pub success_threshold: u32,
    /// Optional rate-based opening, OR-ed with the consecutive rule.
    pub rate: Option<RateRule>,
    /// A HALF_OPEN whose trials have been outstanding this long goes back to OPEN.
    pub max_half_open_wait: Duration,
    /// Set: each consecutive re-open doubles the OPEN period (±10% jitter) up to this.
    pub max_recovery_timeout: Option<Duration>,
    /// Go through every transition and count would-be rejections, but admit every call.
    pub dry_run: bool,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(30),
            half_open_max_calls: 3,
            success_threshold: 2,
            rate: None,
            max_half_open_wait: Duration::from_secs(10),
            max_recovery_timeout: None,
            dry_run: false,
        }
    }
}

/// resilience4j-style rate rule: open when, over a sliding `window`, at least
/// `minimum_calls` calls finished and the share of failed (or slow) ones reached
/// `failure_rate`.
#[derive(Clone, Debug, PartialEq)]
pub struct RateRule {
    /// In `(0, 1]`: 0.5 opens at 50% failures.
    pub failure_rate: f64,
    /// Sliding window, kept as [`WINDOW_BUCKETS`] buckets of `window / 10` each.
    pub window: Duration,
    /// Fewer calls than this in the window never open the circuit.
    pub minimum_calls: u32,
    /// Successful calls slower than this count as failures for this rule only.
    pub slow_call_duration: Option<Duration>,
}

/// Number of buckets of the rate rule's sliding window.
pub const WINDOW_BUCKETS: usize = 10;

/// The rate rule's window: (calls, failed, slow) per bucket, 16 bits each, so
/// a bucket counts at most 65535 calls (later ones are not sampled, which keeps
/// the ratio).
pub(super) type RateWindow = SlidingWindow<WINDOW_BUCKETS, 3, 16>;

impl RateRule {
    /// An empty window for this rule, buckets of `window / 10` (at least 1 ms).
    pub(super) fn new_window(&self, now: Instant) -> RateWindow {
        let width = (self.window / WINDOW_BUCKETS as u32).max(Duration::from_millis(1));
        RateWindow::new(now, width)
    }

    /// Whether the window's `[calls, failed, slow]` open the circuit, and why.
    pub(super) fn evaluate(&self, [calls, failed, slow]: [u64; 3]) -> Option<Reason> {
        if calls == 0 || calls < u64::from(self.minimum_calls) {
            return None;
        }
        let calls = calls as f64;
        if failed as f64 >= self.failure_rate * calls {
            Some(Reason::FailureRate)
        } else if (failed + slow) as f64 >= self.failure_rate * calls {
            Some(Reason::SlowCalls)
        } else {
            None
        }
    }
}
