//! Monotonic time as nanoseconds since an origin: the unit every lock-free policy
//! state (breaker, budget, window, limiters) keeps in its atomics.

use tokio::time::Instant;

/// Nanoseconds from `base` to `now`; 0 before `base`, saturating far after it.
pub fn nanos_since(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}
