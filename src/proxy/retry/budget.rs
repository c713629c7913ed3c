//! The retry budget of one upstream: retries over a sliding window stay within
//! a share of the requests plus a floor, checked lock-free on every retry.

use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::window::SlidingWindow;

/// Length of the retry budget's sliding window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUDGET_BUCKETS: usize = 10;

/// (requests, retries) per one-second bucket, 20 bits each: a bucket counts at
/// most ~1M requests per second; the tag keeps the other 24 bits.
type BudgetWindow = SlidingWindow<BUDGET_BUCKETS, 2, 20>;

/// Retry budget of one upstream: over a sliding 10 s window, retries stay at or
/// below `budget x requests + 10 x budget_min_per_second`.
///
/// Lock-free: every proxied request records itself here, so a lock would be
/// contended on the hot path. A withdrawal is checked and counted in the one CAS
/// on the current bucket, the other buckets being read just before it:
/// concurrent withdrawals can overshoot by at most the number of threads racing
/// (see [`SlidingWindow`]).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// Retries allowed over the window regardless of traffic.
    floor: f64,
    window: BudgetWindow,
}

impl RetryBudget {
    pub fn new(budget: f64, min_per_second: u32, now: Instant) -> Self {
        Self {
            ratio: if budget.is_finite() {
                budget.max(0.0)
            } else {
                0.0
            },
            floor: f64::from(min_per_second) * BUDGET_WINDOW.as_secs_f64(),
            window: BudgetWindow::new(now, BUDGET_WINDOW / BUDGET_BUCKETS as u32),
        }
    }

    /// Counts one request (not attempt) to the upstream.
    pub fn record_request(&self, now: Instant) {
        // Refused only when the bucket is full: the request goes unsampled.
        let _ = self.window.record(self.window.epoch(now), [1, 0]);
    }

    /// Takes one retry from the budget; `false` when it is exhausted.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let epoch = self.window.epoch(now);
        self.window
            .try_record(epoch, [0, 1], |&[requests, retries]| {
                (retries + 1) as f64 <= self.ratio * requests as f64 + self.floor
            })
    }

    /// (requests, retries) over the window ending at `now`.
    pub fn usage(&self, now: Instant) -> (u64, u64) {
        let [requests, retries] = self.window.sum(self.window.epoch(now));
        (requests, retries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_stream_retries_at_most_ratio_times_requests_plus_floor() {
        let t = Instant::now();
        let b = RetryBudget::new(0.2, 10, t);
        let mut granted = 0;
        for _ in 0..1000 {
            b.record_request(t);
            for _ in 0..2 {
                granted += u32::from(b.try_withdraw(t));
            }
        }
        // 0.2 x 1000 requests + 10/s x 10 s.
        assert_eq!(granted, 300);
        assert_eq!(b.usage(t), (1000, 300));
    }

    #[test]
    fn low_traffic_can_still_retry_up_to_the_floor() {
        let t = Instant::now();
        let b = RetryBudget::new(0.2, 1, t);
        b.record_request(t);
        let granted = (0..100).filter(|_| b.try_withdraw(t)).count();
        assert_eq!(granted, 10, "floor(0.2 x 1 + 1/s x 10 s)");
    }

    #[test]
    fn the_budget_window_slides() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.0, 1, t0);
        let granted = (0..20).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 10);
        let t = t0 + Duration::from_millis(9_999);
        assert!(!b.try_withdraw(t), "still inside the window");
        let t = t0 + Duration::from_secs(10);
        assert!(b.try_withdraw(t), "the first second has left the window");
        // An idle period longer than the window forgets everything.
        let t = t0 + Duration::from_secs(3600);
        assert_eq!(b.usage(t), (0, 0));
        assert_eq!((0..20).filter(|_| b.try_withdraw(t)).count(), 10);
    }

    #[test]
    fn concurrent_withdrawals_never_exceed_the_budget_within_one_bucket() {
        let t = Instant::now();
        let b = std::sync::Arc::new(RetryBudget::new(0.5, 0, t));
        for _ in 0..100 {
            b.record_request(t);
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..100).filter(|_| b.try_withdraw(t)).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 50);
    }
}
