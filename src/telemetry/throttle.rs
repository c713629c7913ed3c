//! Lets a repeated log line through at most once per period, with how many were held back.
//! Request-rate events (dry-run rejections) must not turn into a log line per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One atomic word of "next time a line may go out" plus a count of suppressed ones.
#[derive(Debug)]
pub struct LogThrottle {
    origin: Instant,
    period_ms: u64,
    /// Milliseconds since `origin` before which lines are held back.
    next_ms: AtomicU64,
    held: AtomicU64,
}

impl LogThrottle {
    pub fn new(period: Duration) -> Self {
        Self {
            origin: Instant::now(),
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1),
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may go out now, `n` lines having been held back since the
    /// last one; `None` when this one should be dropped (it is counted).
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_then_the_count_of_held_ones() {
        let t = LogThrottle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(t.allow(), Some(2));
    }
}
