//! Adaptive concurrency per upstream: a limit on in-flight calls recomputed from
//! observed latency (Envoy's `adaptive_concurrency` gradient rule, see
//! docs/resilience.md). Sits in admission beside the bulkhead; both must admit.
//!
//! [`Gradient`] is the pure rule (clock injected, no atomics); [`AdaptiveLimiter`]
//! is the shared shell the hot path touches: one atomic for the limit, one for
//! in-flight calls, one packed accumulator for the current sample window.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `[upstreams.<name>.adaptive_concurrency]`, checked by the config layer
/// (`1 <= min_limit <= initial_limit <= max_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveSettings {
    pub min_limit: u32,
    pub max_limit: u32,
    pub initial_limit: u32,
    pub dry_run: bool,
}

/// A sample window closes after this long once it holds [`WINDOW_SAMPLES`] calls...
pub const WINDOW_MIN: Duration = Duration::from_millis(100);
/// ... or after this long with at least one call.
pub const WINDOW_MAX: Duration = Duration::from_secs(1);
pub const WINDOW_SAMPLES: u32 = 10;
/// How often the no-load latency is measured again (jittered by up to 15%).
pub const MIN_RTT_INTERVAL: Duration = Duration::from_secs(30);
/// A no-load measurement: this many calls at `min_limit`, or what `PROBE_MAX` gave.
pub const PROBE_SAMPLES: u32 = 25;
pub const PROBE_MAX: Duration = Duration::from_secs(1);
/// Latency up to `min_rtt x (1 + BUFFER)` counts as "not queueing" (Envoy's default 25%).
pub const BUFFER: f64 = 0.25;
/// One window moves the limit by at most x0.5 .. x2 (Envoy's bounds).
const GRADIENT_MIN: f64 = 0.5;
const GRADIENT_MAX: f64 = 2.0;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Measuring the no-load latency with concurrency pinned at `min_limit`
    /// (at startup too: a first measurement taken under load would make the
    /// queue look like the no-load latency until the next probe).
    Probe {
        until: Instant,
        sum_ns: u128,
        count: u32,
        resume: f64,
    },
    Gradient {
        next_probe: Instant,
    },
}

/// The gradient rule, pure: feed it sample windows, read the limit.
///
/// `limit' = limit x gradient + sqrt(limit x gradient)` with
/// `gradient = clamp(min_rtt x 1.25 / sample_rtt, 0.5, 2)`; like Gradient2 it
/// does not grow while the upstream is app-limited (fewer than half the limit
/// in flight), so an idle period does not ratchet the limit up to `max_limit`.
#[derive(Debug, Clone)]
pub struct Gradient {
    settings: AdaptiveSettings,
    limit: f64,
    min_rtt: Option<Duration>,
    phase: Phase,
}

impl Gradient {
    pub fn new(settings: AdaptiveSettings, now: Instant) -> Self {
        let limit = f64::from(
            settings
                .initial_limit
                .clamp(settings.min_limit.max(1), settings.max_limit.max(1)),
        );
        Self {
            settings,
            limit,
            min_rtt: None,
            phase: Phase::Probe {
                until: now + PROBE_MAX,
                sum_ns: 0,
                count: 0,
                resume: limit,
            },
        }
    }

    /// The concurrency allowed now.
    pub fn limit(&self) -> u32 {
        match self.phase {
            Phase::Probe { .. } => self.settings.min_limit.max(1),
            _ => self.limit.round() as u32,
        }
    }

    /// The no-load latency in use (none before the first measurement).
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    pub fn probing(&self) -> bool {
        matches!(self.phase, Phase::Probe { .. })
    }

    /// One closed window: `count` calls averaging `avg_rtt`, at most
    /// `max_in_flight` at once. `jitter` in [0, 1) spreads probes of a fleet.
    pub fn on_window(
        &mut self,
        now: Instant,
        avg_rtt: Duration,
        count: u32,
        max_in_flight: u32,
        jitter: f64,
    ) {
        if count == 0 {
            return;
        }
        match &mut self.phase {
            Phase::Probe {
                until,
                sum_ns,
                count: n,
                resume,
            } => {
                *sum_ns += avg_rtt.as_nanos() * u128::from(count);
                *n = n.saturating_add(count);
                if *n >= PROBE_SAMPLES || now >= *until {
                    let avg = (*sum_ns / u128::from((*n).max(1))) as u64;
                    self.min_rtt = Some(Duration::from_nanos(avg.max(1)));
                    self.limit = *resume;
                    self.phase = Phase::Gradient {
                        next_probe: now + MIN_RTT_INTERVAL.mul_f64(1.0 + 0.15 * jitter),
                    };
                }
            }
            Phase::Gradient { next_probe } => {
                if now >= *next_probe {
                    self.phase = Phase::Probe {
                        until: now + PROBE_MAX,
                        sum_ns: 0,
                        count: 0,
                        resume: self.limit,
                    };
                    return;
                }
                let Some(min_rtt) = self.min_rtt else { return };
                let sample = avg_rtt.as_secs_f64().max(1e-9);
                let gradient = (min_rtt.as_secs_f64() * (1.0 + BUFFER) / sample)
                    .clamp(GRADIENT_MIN, GRADIENT_MAX);
                let app_limited = f64::from(max_in_flight) < self.limit / 2.0;
                if gradient >= 1.0 && app_limited {
                    return;
                }
                let scaled = self.limit * gradient;
                let next = scaled + scaled.sqrt();
                self.limit = next.clamp(
                    f64::from(self.settings.min_limit.max(1)),
                    f64::from(self.settings.max_limit.max(1)),
                );
            }
        }
    }
}

/// Window accumulator packed in one word so a completion is one `fetch_add`:
/// the high 44 bits sum latencies in microseconds, the low 20 count calls.
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// A window closes early before the count could overflow into the sum.
const COUNT_CLOSE: u64 = 1 << 19;

/// One upstream's adaptive limit as the hot path sees it.
#[derive(Debug)]
pub struct AdaptiveLimiter {
    settings: AdaptiveSettings,
    base: Instant,
    /// The limit in force, published by whoever closes a window; read per request.
    limit: AtomicU32,
    /// Calls admitted and not finished (counted in dry run too).
    in_flight: AtomicU32,
    /// Highest `in_flight` seen in the current window (app-limited test).
    window_peak: AtomicU32,
    /// Packed (latency sum, count) of the current window; see [`COUNT_BITS`].
    window: AtomicU64,
    /// Nanoseconds since `base` when the current window opened.
    window_start: AtomicU64,
    /// Only the completion that closes a window takes this, with `try_lock`:
    /// nobody ever waits for it, a busy lock just means someone else is closing.
    rule: Mutex<Gradient>,
    /// `adaptive_concurrency_limit{upstream}`, set whenever the limit moves.
    gauge: Option<prometheus_client::metrics::gauge::Gauge>,
}

/// Why a call was not admitted (or, in dry run, would not have been).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit;

/// One admitted call; in-flight drops when this does.
#[derive(Debug)]
#[must_use = "the call leaves in-flight as soon as the permit is dropped"]
pub struct AdaptivePermit {
    limiter: Arc<AdaptiveLimiter>,
    start: Instant,
}

impl AdaptivePermit {
    /// The call's latency is known (response headers in): feed it to the rule.
    /// Calls that failed without an answer are not samples; just drop the permit.
    pub fn sample(&self, now: Instant) {
        self.limiter
            .record(now, now.saturating_duration_since(self.start));
    }
}

impl Drop for AdaptivePermit {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AdaptiveLimiter {
    pub fn new(settings: AdaptiveSettings, now: Instant) -> Self {
        let rule = Gradient::new(settings, now);
        Self {
            settings,
            base: now,
            limit: AtomicU32::new(rule.limit()),
            in_flight: AtomicU32::new(0),
            window_peak: AtomicU32::new(0),
            window: AtomicU64::new(0),
            window_start: AtomicU64::new(0),
            rule: Mutex::new(rule),
            gauge: None,
        }
    }

    /// Exports the limit through `gauge` from now on.
    pub fn with_gauge(mut self, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.set(i64::from(self.limit()));
        self.gauge = Some(gauge);
        self
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn dry_run(&self) -> bool {
        self.settings.dry_run
    }

    /// Critical calls may use the whole limit, others 90% of it, so shedding
    /// falls on non-critical traffic first. `Err` in dry run means "would
    /// have rejected": the call is admitted and counted all the same.
    pub fn try_acquire(
        self: &Arc<Self>,
        critical: bool,
        now: Instant,
    ) -> Result<AdaptivePermit, (OverLimit, Option<AdaptivePermit>)> {
        let limit = self.limit();
        let cap = if critical {
            limit
        } else {
            (limit * 9 / 10).max(1)
        };
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap || self.settings.dry_run).then_some(n + 1)
            });
        match admitted {
            Ok(n) => {
                self.window_peak.fetch_max(n + 1, Ordering::Relaxed);
                let permit = AdaptivePermit {
                    limiter: Arc::clone(self),
                    start: now,
                };
                if n >= cap {
                    Err((OverLimit, Some(permit)))
                } else {
                    Ok(permit)
                }
            }
            Err(_) => Err((OverLimit, None)),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        crate::proxy::clock::nanos_since(self.base, now)
    }

    /// One call's latency. Closes the window when it is due.
    pub fn record(&self, now: Instant, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 1 << 40);
        let packed = self
            .window
            .fetch_add((us << COUNT_BITS) | 1, Ordering::AcqRel)
            + ((us << COUNT_BITS) | 1);
        let count = packed & COUNT_MASK;
        let age = self
            .nanos(now)
            .saturating_sub(self.window_start.load(Ordering::Acquire));
        let due = (age >= WINDOW_MIN.as_nanos() as u64 && count >= u64::from(WINDOW_SAMPLES))
            || age >= WINDOW_MAX.as_nanos() as u64
            || count >= COUNT_CLOSE;
        if due {
            self.close_window(now, fastrand::f64());
        }
    }

    /// Closes the current window into the rule (if no one else is doing so).
    pub fn close_window(&self, now: Instant, jitter: f64) {
        let Ok(mut rule) = self.rule.try_lock() else {
            return;
        };
        self.window_start.store(self.nanos(now), Ordering::Release);
        let packed = self.window.swap(0, Ordering::AcqRel);
        let peak = self
            .window_peak
            .swap(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        let count = (packed & COUNT_MASK) as u32;
        if count == 0 {
            return;
        }
        let avg = Duration::from_micros((packed >> COUNT_BITS) / u64::from(count));
        rule.on_window(now, avg, count, peak, jitter);
        let limit = rule.limit();
        self.limit.store(limit, Ordering::Relaxed);
        if let Some(g) = &self.gauge {
            g.set(i64::from(limit));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settings(min: u32, max: u32, initial: u32) -> AdaptiveSettings {
        AdaptiveSettings {
            min_limit: min,
            max_limit: max,
            initial_limit: initial,
            dry_run: false,
        }
    }

    /// An upstream with `workers` workers each taking `service`: with `c` calls
    /// in flight, a call takes `service x max(1, c / workers)`.
    fn latency(service: Duration, workers: u32, c: u32) -> Duration {
        service.mul_f64((f64::from(c) / f64::from(workers)).max(1.0))
    }

    /// Drives the rule with 100 ms windows of a saturated upstream on the
    /// paused clock: the offered load always fills the limit. Returns the
    /// limit after `windows` windows.
    async fn drive(rule: &mut Gradient, workers: u32, windows: u32) -> u32 {
        for _ in 0..windows {
            advance(ms(100)).await;
            let c = rule.limit();
            rule.on_window(Instant::now(), latency(ms(10), workers, c), 50, c, 0.0);
        }
        rule.limit()
    }

    #[test]
    fn startup_measures_min_rtt_at_min_limit_then_uses_the_initial_limit() {
        let t0 = Instant::now();
        let mut rule = Gradient::new(settings(4, 1000, 20), t0);
        assert!(rule.probing());
        assert_eq!(rule.limit(), 4, "measured at min_limit, as every probe");
        rule.on_window(t0 + ms(100), ms(10), 30, 20, 0.0);
        assert!(!rule.probing());
        assert_eq!(rule.min_rtt(), Some(ms(10)));
        assert_eq!(rule.limit(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_trickle_still_ends_the_probe_after_probe_max() {
        let mut rule = Gradient::new(settings(4, 1000, 20), Instant::now());
        advance(PROBE_MAX / 2).await;
        rule.on_window(Instant::now(), ms(8), 2, 1, 0.0);
        assert!(rule.probing());
        advance(PROBE_MAX / 2 - ms(1)).await;
        rule.on_window(Instant::now(), ms(10), 1, 1, 0.0);
        assert!(rule.probing(), "not before PROBE_MAX");
        advance(ms(1)).await;
        rule.on_window(Instant::now(), ms(12), 2, 1, 0.0);
        assert!(!rule.probing());
        assert_eq!(rule.min_rtt(), Some(ms(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_converges_above_the_worker_count_and_keeps_latency_low() {
        let t0 = Instant::now();
        let mut rule = Gradient::new(settings(4, 1000, 20), t0);
        rule.on_window(t0, ms(10), 30, 20, 0.0);
        for workers in [10u32, 50, 200] {
            let l = drive(&mut rule, workers, 60).await;
            // Enough to keep every worker busy (goodput), not so much that
            // latency exceeds 3x no-load.
            assert!(l >= workers, "workers {workers}: limit {l}");
            let slowdown = latency(ms(10), workers, l).as_secs_f64() / 0.010;
            assert!(slowdown <= 2.0, "workers {workers}: limit {l}, {slowdown}x");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_follows_capacity_down_within_a_few_seconds() {
        let t0 = Instant::now();
        let mut rule = Gradient::new(settings(4, 1000, 20), t0);
        rule.on_window(t0, ms(10), 30, 20, 0.0);
        let before = drive(&mut rule, 40, 50).await;
        assert!(before >= 40);
        // Half the workers gone: 2 s of windows later the limit fits 20 workers.
        let halved = Instant::now();
        let after = drive(&mut rule, 20, 20).await;
        assert_eq!(Instant::now() - halved, Duration::from_secs(2));
        assert!((20..=30).contains(&after), "{before} -> {after}");
    }

    #[tokio::test(start_paused = true)]
    async fn min_and_max_bound_the_limit() {
        let t0 = Instant::now();
        let mut rule = Gradient::new(settings(4, 30, 20), t0);
        rule.on_window(t0, ms(10), 30, 20, 0.0);
        assert_eq!(drive(&mut rule, 1000, 30).await, 30, "capped by max_limit");
        assert_eq!(drive(&mut rule, 1, 30).await, 4, "floored at min_limit");
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_limited_upstream_does_not_ratchet_the_limit_up() {
        let t0 = Instant::now();
        let mut rule = Gradient::new(settings(4, 1000, 20), t0);
        rule.on_window(t0, ms(10), 30, 20, 0.0);
        for _ in 1..100 {
            advance(ms(100)).await;
            rule.on_window(Instant::now(), ms(10), 20, 3, 0.0);
        }
        assert_eq!(rule.limit(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn min_rtt_is_measured_again_at_min_limit_after_the_interval() {
        let t0 = Instant::now();
        let mut rule = Gradient::new(settings(4, 1000, 20), t0);
        rule.on_window(t0, ms(10), 30, 20, 0.0);
        let steady = drive(&mut rule, 50, 20).await;
        // The next window after the interval starts a probe pinned at min_limit.
        advance(MIN_RTT_INTERVAL - (Instant::now() - t0)).await;
        rule.on_window(Instant::now(), ms(12), 50, steady, 0.0);
        assert!(rule.probing());
        assert_eq!(rule.limit(), 4);
        // The upstream got slower at no load: the new reference is taken and
        // the limit before the probe is resumed.
        advance(ms(50)).await;
        rule.on_window(Instant::now(), ms(20), 25, 4, 0.0);
        assert!(!rule.probing());
        assert_eq!(rule.min_rtt(), Some(ms(20)));
        assert_eq!(rule.limit(), steady);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_interval_is_jittered() {
        let t0 = Instant::now();
        let mut rule = Gradient::new(settings(4, 1000, 20), t0);
        rule.on_window(t0, ms(10), 30, 20, 0.999);
        // Without jitter this would start a probe; with ~15% it does not yet.
        advance(MIN_RTT_INTERVAL + ms(100)).await;
        rule.on_window(Instant::now(), ms(10), 30, 20, 0.0);
        assert!(!rule.probing());
    }

    /// A limiter past its startup measurement (10 ms calls every 5 ms of
    /// paused time), and the time then.
    async fn measured(s: AdaptiveSettings) -> (Arc<AdaptiveLimiter>, Instant) {
        let l = Arc::new(AdaptiveLimiter::new(s, Instant::now()));
        for _ in 0..60 {
            advance(ms(5)).await;
            l.record(Instant::now(), ms(10));
        }
        assert!(!l.rule.lock().unwrap().probing());
        (l, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn critical_calls_use_the_whole_limit_others_ninety_percent() {
        let (l, now) = measured(settings(4, 1000, 20)).await;
        assert_eq!(l.limit(), 20);
        let mut held: Vec<_> = (0..18)
            .map(|_| l.try_acquire(false, now).unwrap())
            .collect();
        assert_eq!(l.in_flight(), 18);
        assert!(
            l.try_acquire(false, now).is_err(),
            "non-critical stops at 18"
        );
        held.push(l.try_acquire(true, now).unwrap());
        held.push(l.try_acquire(true, now).unwrap());
        assert!(l.try_acquire(true, now).is_err(), "critical stops at 20");
        held.truncate(10);
        assert_eq!(l.in_flight(), 10);
        assert!(l.try_acquire(false, now).is_ok());
    }

    #[test]
    fn dry_run_admits_everything_but_reports_the_excess() {
        let now = Instant::now();
        let mut s = settings(2, 10, 2);
        s.dry_run = true;
        let l = Arc::new(AdaptiveLimiter::new(s, now));
        let a = l.try_acquire(true, now).unwrap();
        let b = l.try_acquire(true, now).unwrap();
        let (OverLimit, Some(c)) = l.try_acquire(true, now).err().unwrap() else {
            panic!("dry run must hand out a permit");
        };
        assert_eq!(l.in_flight(), 3);
        drop((a, b, c));
        assert_eq!(l.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn samples_close_windows_and_publish_the_limit() {
        let l = Arc::new(AdaptiveLimiter::new(settings(4, 1000, 20), Instant::now()));
        assert_eq!(l.limit(), 4, "pinned at min_limit while measuring");
        // Probe windows: 10 ms calls until 25 samples are in.
        for _ in 0..60 {
            advance(ms(5)).await;
            l.record(Instant::now(), ms(10));
        }
        assert_eq!(l.limit(), 20, "then the initial limit");
        // Then a heavily queued upstream: latency 4x no-load with the limit full.
        let held: Vec<_> = (0..20)
            .map(|_| l.try_acquire(true, Instant::now()).unwrap())
            .collect();
        for _ in 0..30 {
            advance(ms(5)).await;
            l.record(Instant::now(), ms(40));
        }
        assert!(l.limit() < 20, "{}", l.limit());
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_does_not_close_before_its_minimum_length() {
        let t0 = Instant::now();
        let l = AdaptiveLimiter::new(settings(4, 1000, 20), t0);
        advance(ms(10)).await;
        for _ in 0..50 {
            l.record(Instant::now(), ms(10));
        }
        assert!(l.rule.lock().unwrap().probing(), "no window closed yet");
        advance(WINDOW_MIN - ms(10)).await;
        l.record(Instant::now(), ms(10));
        assert!(!l.rule.lock().unwrap().probing());
    }
}
