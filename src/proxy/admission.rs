//! Admission control: a per-route token-bucket rate limiter and a per-upstream
//! bulkhead (in-flight limit). Runs after routing, before the breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Token bucket as GCRA: `per_second` sustained, `burst` at once.
///
/// The whole state is one theoretical arrival time in an atomic: a request is
/// one CAS, no lock, and no refill task. Dry run is the caller's: on `Err`
/// count and log, then let the request through (a refused request takes no
/// token, so the limiter's state is the same either way).
#[derive(Debug)]
pub struct RateLimiter {
    /// Nanoseconds between two tokens.
    interval_ns: u64,
    /// How far ahead of `now` the arrival time may run: `burst x interval`.
    tolerance_ns: u64,
    base: Instant,
    /// Theoretical arrival time of the next request, in nanos since `base`.
    /// One atomic word is the whole state, so admission is a single CAS.
    tat: AtomicU64,
}

impl RateLimiter {
    /// `per_second` must be positive (validated by the config layer; anything
    /// else admits the burst and then nothing). `burst` 0 is treated as 1.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self::new_at(per_second, burst, Instant::now())
    }

    /// As [`RateLimiter::new`] with an explicit clock origin.
    pub fn new_at(per_second: f64, burst: u32, now: Instant) -> Self {
        let interval_ns = if per_second.is_finite() && per_second > 0.0 {
            ((1e9 / per_second) as u64).max(1)
        } else {
            u64::MAX / 2
        };
        Self {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst.max(1))),
            base: now,
            tat: AtomicU64::new(0),
        }
    }

    /// Takes one token, or says how long until one is available (`Retry-After`).
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let at =
            u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        let mut wait = 0;
        let result = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let next = tat.max(at).saturating_add(self.interval_ns);
                let ahead = next - at;
                if ahead > self.tolerance_ns {
                    wait = ahead - self.tolerance_ns;
                    None
                } else {
                    Some(next)
                }
            });
        match result {
            Ok(_) => Ok(()),
            Err(_) => Err(Duration::from_nanos(wait)),
        }
    }
}

/// In-flight limit of one upstream (`max_in_flight`; 0 = unlimited).
#[derive(Debug, Clone)]
pub struct Bulkhead {
    /// Owned permits (`try_acquire_owned`) live in the request future and are
    /// released when it is dropped, completed or cancelled alike; never waits.
    /// `None` is unlimited: no atomic traffic at all.
    semaphore: Option<Arc<Semaphore>>,
    max: usize,
}

/// One slot of a [`Bulkhead`]; the slot frees when this is dropped.
#[derive(Debug)]
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct BulkheadPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Bulkhead {
    /// `max_in_flight` 0 means unlimited.
    pub fn new(max_in_flight: usize) -> Self {
        let max = max_in_flight.min(Semaphore::MAX_PERMITS);
        Self {
            semaphore: (max > 0).then(|| Arc::new(Semaphore::new(max))),
            max,
        }
    }

    /// A slot, or `None` when full (503 `overloaded`). Keep the permit alive
    /// for the whole request, response body included.
    pub fn try_acquire(&self) -> Option<BulkheadPermit> {
        match &self.semaphore {
            None => Some(BulkheadPermit { _permit: None }),
            Some(semaphore) => Arc::clone(semaphore)
                .try_acquire_owned()
                .ok()
                .map(|permit| BulkheadPermit {
                    _permit: Some(permit),
                }),
        }
    }

    /// Requests holding a slot now (0 when unlimited).
    pub fn in_flight(&self) -> usize {
        self.semaphore
            .as_ref()
            .map_or(0, |s| self.max - s.available_permits())
    }

    /// The limit, `None` when unlimited.
    pub fn limit(&self) -> Option<usize> {
        self.semaphore.as_ref().map(|_| self.max)
    }
}
