//! Admission control: a per-route token-bucket rate limiter and a per-upstream
//! bulkhead (in-flight limit). Runs after routing, before the breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::clock::nanos_since;

/// GCRA arithmetic (a token bucket as one theoretical arrival time, `tat`, in
/// nanoseconds since the limiter's origin): `per_second` sustained, `burst` at once.
/// Shared by the route limiter below and the keyed and fleet buckets.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    /// Nanoseconds between two tokens.
    interval_ns: u64,
    /// How far ahead of `now` the arrival time may run: `burst x interval`.
    tolerance_ns: u64,
}

impl Gcra {
    /// `per_second` must be positive (validated by the config layer; anything
    /// else admits the burst and then next to nothing). `burst` 0 is treated as 1.
    pub fn new(per_second: f64, burst: u32) -> Self {
        let burst = u64::from(burst.max(1));
        // Keeps `tat + interval` and `interval x burst` far from saturation (a
        // saturated arrival time would admit everything).
        let max_interval = u64::MAX / 4 / (burst + 1);
        let interval_ns = if per_second.is_finite() && per_second > 0.0 {
            ((1e9 / per_second) as u64).clamp(1, max_interval)
        } else {
            max_interval
        };
        Self {
            interval_ns,
            tolerance_ns: interval_ns * burst,
        }
    }

    /// Nanoseconds between two tokens.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// The state of a bucket with no token left at `at`.
    pub fn full_at(&self, at: u64) -> u64 {
        at.saturating_add(self.tolerance_ns)
    }

    /// Takes one token from the bucket whose state is `tat`, or says how long
    /// until one is available. A refusal leaves `tat` unchanged.
    pub fn acquire(&self, tat: &mut u64, at: u64) -> Result<(), Duration> {
        let next = (*tat).max(at).saturating_add(self.interval_ns);
        let ahead = next - at;
        if ahead > self.tolerance_ns {
            Err(Duration::from_nanos(ahead - self.tolerance_ns))
        } else {
            *tat = next;
            Ok(())
        }
    }
}

/// One route's token bucket ([`Gcra`]) in one atomic word.
///
/// A request is one CAS, no lock, and no refill task. Dry run is the caller's: on
/// `Err` count and log, then let the request through (a refused request takes no
/// token, so the limiter's state is the same either way).
#[derive(Debug)]
pub struct RateLimiter {
    gcra: Gcra,
    base: Instant,
    /// Theoretical arrival time of the next request, in nanos since `base`.
    /// One atomic word is the whole state, so admission is a single CAS.
    tat: AtomicU64,
}

impl RateLimiter {
    /// See [`Gcra::new`] for `per_second` and `burst`.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self::new_at(per_second, burst, Instant::now())
    }

    /// As [`RateLimiter::new`] with an explicit clock origin.
    pub fn new_at(per_second: f64, burst: u32, now: Instant) -> Self {
        Self {
            gcra: Gcra::new(per_second, burst),
            base: now,
            tat: AtomicU64::new(0),
        }
    }

    /// Takes one token, or says how long until one is available (`Retry-After`).
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let at = nanos_since(self.base, now);
        let mut wait = Duration::ZERO;
        let result =
            self.tat
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |mut tat| {
                    match self.gcra.acquire(&mut tat, at) {
                        Ok(()) => Some(tat),
                        Err(w) => {
                            wait = w;
                            None
                        }
                    }
                });
        result.map(drop).map_err(|_| wait)
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
    /// The adaptive concurrency slot, when the upstream has one: it rides (and is
    /// released) with the bulkhead slot.
    pub adaptive: Option<super::limits::adaptive::AdaptivePermit>,
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
            None => Some(BulkheadPermit {
                _permit: None,
                adaptive: None,
            }),
            Some(semaphore) => Arc::clone(semaphore)
                .try_acquire_owned()
                .ok()
                .map(|permit| BulkheadPermit {
                    _permit: Some(permit),
                    adaptive: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let rl = RateLimiter::new_at(10.0, 5, t0);
        for i in 0..5 {
            assert_eq!(rl.try_acquire(t0), Ok(()), "burst request {i}");
        }
        assert_eq!(rl.try_acquire(t0), Err(ms(100)));
        assert_eq!(rl.try_acquire(t0 + ms(40)), Err(ms(60)));
        assert_eq!(rl.try_acquire(t0 + ms(100)), Ok(()));
        assert_eq!(rl.try_acquire(t0 + ms(100)), Err(ms(100)));
        // Half a second refills the whole burst, never more.
        let t = t0 + ms(600);
        for _ in 0..5 {
            assert_eq!(rl.try_acquire(t), Ok(()));
        }
        assert!(rl.try_acquire(t).is_err());
    }

    #[test]
    fn a_long_idle_period_does_not_bank_more_than_the_burst() {
        let t0 = Instant::now();
        let rl = RateLimiter::new_at(100.0, 3, t0);
        let t = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| rl.try_acquire(t).is_ok()).count(), 3);
    }

    #[test]
    fn sustained_rate_matches_per_second_plus_burst() {
        let t0 = Instant::now();
        let rl = RateLimiter::new_at(50.0, 10, t0);
        let mut admitted = 0;
        // Offered 1000/s for 10 s.
        for step in 0..10_000 {
            admitted += usize::from(rl.try_acquire(t0 + ms(step)).is_ok());
        }
        assert!((509..=511).contains(&admitted), "{admitted}");
    }

    #[test]
    fn fractional_rates_and_zero_burst() {
        let t0 = Instant::now();
        let rl = RateLimiter::new_at(0.5, 0, t0);
        assert_eq!(rl.try_acquire(t0), Ok(()), "burst 0 behaves as 1");
        assert_eq!(rl.try_acquire(t0), Err(ms(2000)));
        assert_eq!(rl.try_acquire(t0 + ms(2000)), Ok(()));
    }

    #[test]
    fn a_non_positive_rate_admits_the_burst_then_nothing() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN] {
            let rl = RateLimiter::new_at(rate, 2, t0);
            assert!(rl.try_acquire(t0).is_ok());
            assert!(rl.try_acquire(t0).is_ok());
            assert!(rl.try_acquire(t0 + Duration::from_secs(86_400)).is_err());
        }
    }

    #[test]
    fn concurrent_callers_share_exactly_one_burst() {
        let t0 = Instant::now();
        let rl = Arc::new(RateLimiter::new_at(1.0, 100, t0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rl = rl.clone();
                std::thread::spawn(move || (0..1000).filter(|_| rl.try_acquire(t0).is_ok()).count())
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn bulkhead_limits_in_flight_and_releases_on_drop() {
        let bh = Bulkhead::new(2);
        assert_eq!(bh.limit(), Some(2));
        let a = bh.try_acquire().expect("first");
        let b = bh.try_acquire().expect("second");
        assert_eq!(bh.in_flight(), 2);
        assert!(bh.try_acquire().is_none(), "third must be refused");
        drop(a);
        assert_eq!(bh.in_flight(), 1);
        let c = bh.try_acquire().expect("slot released by drop");
        assert!(bh.try_acquire().is_none());
        drop((b, c));
        assert_eq!(bh.in_flight(), 0);
    }

    #[test]
    fn clones_share_the_same_slots() {
        let bh = Bulkhead::new(1);
        let other = bh.clone();
        let _held = bh.try_acquire().unwrap();
        assert!(other.try_acquire().is_none());
    }

    #[test]
    fn zero_means_unlimited() {
        let bh = Bulkhead::new(0);
        assert_eq!(bh.limit(), None);
        let held: Vec<_> = (0..10_000).map(|_| bh.try_acquire()).collect();
        assert!(held.iter().all(Option::is_some));
        assert_eq!(bh.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_request_future_frees_its_slot() {
        let bh = Bulkhead::new(1);
        let permit = bh.try_acquire().unwrap();
        let task = tokio::spawn(async move {
            let _permit = permit;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert!(bh.try_acquire().is_none());
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(bh.try_acquire().is_some());
    }
}
