//! Circuit breaker for upstream calls: a clock-injected state machine with no I/O.
//! Runs after admission, before retry: every attempt of a request is one call.
//!
//! States and transition reasons are the ones the admin API and events show. The caller classifies each call as
//! an [`Outcome`] (`failure_status` lives in the config layer), supplies `now` to
//! every method, and receives each transition exactly once through a
//! [`BreakerObserver`] so it can log, count and publish it in one place.
//!
//! Per attempt: `try_acquire(now)`; on `Err` answer 503 `circuit open` with
//! `Retry-After: retry_after_secs()` and do not retry; on `Ok` check
//! `would_have_rejected()` (dry run: log and count, then go on), make the call,
//! and `record(now, outcome)` once the response headers (or the error) arrive.
//! Dropping the permit instead cancels the call.
//!
//! Cost: in CLOSED (and `disabled`) `try_acquire` + `record` is a handful of atomic
//! operations and takes no lock; a rejection while OPEN takes no lock either. The
//! mutex is taken only on transitions, in HALF_OPEN, and by manual/admin calls.
//!
//! Files: this one holds the [`Breaker`] and its [`Permit`]; `policy` what opens
//! and closes it (and the rate rule's verdict), `state` its states, reasons and
//! transitions, `report` what it takes and hands back per call and for the admin
//! API. The rate rule counts in a [`crate::proxy::window::SlidingWindow`].

mod policy;
mod report;
mod state;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

pub use policy::{BreakerPolicy, RateRule, WINDOW_BUCKETS};
pub use report::{Counts, Outcome, Rejected, Snapshot};
pub use state::{BreakerObserver, Reason, State, Transition};

use policy::RateWindow;
use state::{GEN_SHIFT, state_of};

/// A circuit breaker shared by every route to one upstream.
pub struct Breaker {
    policy: BreakerPolicy,
    observer: Arc<dyn BreakerObserver>,
    /// Origin of the nanosecond offsets kept in atomics.
    base: Instant,
    /// State in the low byte, generation (bumped on every transition) above it:
    /// one word so the hot path reads both with one load and a permit can tell
    /// whether the state it was admitted in still holds. Written only under `inner`.
    word: AtomicU64,
    /// End of the current OPEN period, in nanos since `base`. An atomic so that
    /// rejections while OPEN take no lock; stored under `inner` before `word`
    /// publishes the OPEN state (Release/Acquire pair).
    open_until: AtomicU64,
    /// Consecutive failures in CLOSED. An atomic so CLOSED calls take no lock;
    /// zeroed under `inner` whenever CLOSED is entered.
    consecutive: AtomicU32,
    /// Sliding window of the rate rule, when configured.
    window: Option<RateWindow>,
    /// Monotonic counters. Atomics so the hot path and scrapes never lock.
    total: AtomicU64,
    success: AtomicU64,
    failure: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
    state_changes: AtomicU64,
    /// Transitions and HALF_OPEN bookkeeping: rare or bounded by
    /// `half_open_max_calls`, so a std Mutex (never held across `.await`) is
    /// simpler and cheaper than lock-free machinery.
    inner: Mutex<Inner>,
}

struct Inner {
    reason: Option<Reason>,
    /// Re-opens since the circuit was last CLOSED (exponential recovery).
    reopens: u32,
    trials_in_flight: u32,
    trial_successes: u32,
    /// When the current run of outstanding trials began (`max_half_open_wait`).
    trials_busy_since: Option<Instant>,
    /// Counter values subtracted in snapshots since the last `reset`.
    baseline: Counts,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A CLOSED breaker. `now` is the origin of its internal clock.
    pub fn new(policy: BreakerPolicy, observer: Arc<dyn BreakerObserver>, now: Instant) -> Self {
        let window = policy.rate.as_ref().map(|r| r.new_window(now));
        Self {
            policy,
            observer,
            base: now,
            word: AtomicU64::new(State::Closed.to_bits()),
            open_until: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            window,
            total: AtomicU64::new(0),
            success: AtomicU64::new(0),
            failure: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            state_changes: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                reason: None,
                reopens: 0,
                trials_in_flight: 0,
                trial_successes: 0,
                trials_busy_since: None,
                baseline: Counts::default(),
            }),
        }
    }

    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    /// The current state without applying due timeouts (cheap: one load).
    pub fn state(&self) -> State {
        state_of(self.word.load(Ordering::Acquire))
    }

    /// Asks to make one call. `Ok` carries a [`Permit`] to `record` the outcome
    /// on; in dry run it is always `Ok`, and [`Permit::would_have_rejected`] says
    /// whether a live breaker would have refused.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Result<Permit, Rejected> {
        self.total.fetch_add(1, Ordering::Relaxed);
        let word = self.word.load(Ordering::Acquire);
        match state_of(word) {
            State::Closed | State::Disabled => return Ok(self.permit(word, Kind::Normal, now)),
            State::Open => {
                let until = self.open_until.load(Ordering::Acquire);
                let at = self.offset(now);
                if at < until {
                    let retry_after = Duration::from_nanos(until - at);
                    return self.reject(word, now, State::Open, retry_after);
                }
            }
            State::ForcedOpen => {
                let retry_after = self.policy.recovery_timeout;
                return self.reject(word, now, State::ForcedOpen, retry_after);
            }
            State::HalfOpen => {}
        }

        let mut inner = self.lock();
        let word = self.advance(&mut inner, now);
        match state_of(word) {
            State::Closed | State::Disabled => Ok(self.permit(word, Kind::Normal, now)),
            State::Open => {
                let retry_after = self.remaining(now);
                self.reject(word, now, State::Open, retry_after)
            }
            State::ForcedOpen => {
                let retry_after = self.policy.recovery_timeout;
                self.reject(word, now, State::ForcedOpen, retry_after)
            }
            State::HalfOpen => {
                if inner.trials_in_flight < self.policy.half_open_max_calls.max(1) {
                    inner.trials_in_flight += 1;
                    inner.trials_busy_since.get_or_insert(now);
                    Ok(self.permit(word, Kind::Trial, now))
                } else {
                    self.reject(word, now, State::HalfOpen, Duration::from_secs(1))
                }
            }
        }
    }

    /// OPEN -> HALF_OPEN (`check_passed`) when the `recover_on_check` health
    /// check succeeds; no effect in any other state.
    pub fn check_passed(&self, now: Instant) {
        let mut inner = self.lock();
        let word = self.advance(&mut inner, now);
        if state_of(word) == State::Open {
            self.transition(&mut inner, now, State::HalfOpen, Reason::CheckPassed);
        }
    }

    /// Admin `reset`: -> CLOSED (`manual`) and the snapshot counters start over.
    /// Calls in flight stay counted and report their outcome after the reset.
    pub fn reset(&self, now: Instant) {
        let mut inner = self.lock();
        if self.state() != State::Closed {
            self.transition(&mut inner, now, State::Closed, Reason::Manual);
        } else {
            self.clear_closed_stats();
        }
        let raw = self.counts();
        let in_flight = raw.total.saturating_sub(raw.finished());
        inner.baseline = Counts {
            total: raw.total - in_flight,
            ..raw
        };
    }

    /// Admin `open`: -> `forced_open` (`manual`), rejecting until reset or close.
    pub fn force_open(&self, now: Instant) {
        let mut inner = self.lock();
        if self.state() != State::ForcedOpen {
            self.transition(&mut inner, now, State::ForcedOpen, Reason::Manual);
        }
    }

    /// Admin `close`: -> `disabled` (`manual`), admitting everything, still counting.
    pub fn disable(&self, now: Instant) {
        let mut inner = self.lock();
        if self.state() != State::Disabled {
            self.transition(&mut inner, now, State::Disabled, Reason::Manual);
        }
    }

    /// State and counters, after applying any timeout that is due at `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut inner = self.lock();
        let word = self.advance(&mut inner, now);
        let state = state_of(word);
        let c = self.counts().minus(inner.baseline);
        let remaining_timeout_s = if state == State::Open {
            self.remaining(now).as_secs_f64()
        } else {
            0.0
        };
        Snapshot {
            state,
            reason: inner.reason,
            remaining_timeout_s,
            total_calls: c.total,
            successful_calls: c.success,
            failed_calls: c.failure,
            rejected_calls: c.rejected,
            cancelled_calls: c.cancelled,
            in_flight: c.total.saturating_sub(c.finished()),
            state_changes: c.state_changes,
            dry_run: self.policy.dry_run,
        }
    }

    /// Monotonic totals for the metrics layer; read at scrape time, no lock.
    pub fn counts(&self) -> Counts {
        // Outcomes before `total`: a call is counted in `total` before its
        // outcome, so reading in this order rarely shows more outcomes than calls.
        let success = self.success.load(Ordering::Relaxed);
        let failure = self.failure.load(Ordering::Relaxed);
        let rejected = self.rejected.load(Ordering::Relaxed);
        let cancelled = self.cancelled.load(Ordering::Relaxed);
        let state_changes = self.state_changes.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        Counts {
            total,
            success,
            failure,
            rejected,
            cancelled,
            state_changes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough bookkeeping;
        // refusing every later call would be worse.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offset(&self, now: Instant) -> u64 {
        crate::proxy::clock::nanos_since(self.base, now)
    }

    fn remaining(&self, now: Instant) -> Duration {
        let until = self.open_until.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(self.offset(now)))
    }

    fn permit(self: &Arc<Self>, word: u64, kind: Kind, now: Instant) -> Permit {
        Permit {
            breaker: Arc::clone(self),
            word,
            kind,
            started: now,
            done: false,
        }
    }

    fn reject(
        self: &Arc<Self>,
        word: u64,
        now: Instant,
        state: State,
        retry_after: Duration,
    ) -> Result<Permit, Rejected> {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let rejected = Rejected { state, retry_after };
        if self.policy.dry_run {
            Ok(self.permit(word, Kind::Shadow(rejected), now))
        } else {
            Err(rejected)
        }
    }

    /// Applies the timeouts due at `now` (HALF_OPEN -> OPEN on
    /// `max_half_open_wait`, OPEN -> HALF_OPEN on `recovery_timeout`) and returns
    /// the resulting word. Lazy: no timer task is needed.
    fn advance(&self, inner: &mut Inner, now: Instant) -> u64 {
        if self.state() == State::HalfOpen
            && inner.trials_busy_since.is_some_and(|since| {
                now.saturating_duration_since(since) >= self.policy.max_half_open_wait
            })
        {
            self.transition(inner, now, State::Open, Reason::HalfOpenTimeout);
        }
        if self.state() == State::Open
            && self.offset(now) >= self.open_until.load(Ordering::Acquire)
        {
            self.transition(inner, now, State::HalfOpen, Reason::RecoveryTimeout);
        }
        self.word.load(Ordering::Acquire)
    }

    /// The one place a state changes. Caller holds `inner`.
    fn transition(&self, inner: &mut Inner, now: Instant, to: State, reason: Reason) {
        let word = self.word.load(Ordering::Acquire);
        let from = state_of(word);
        let mut open_for = None;
        match to {
            State::Open => {
                let period = if from == State::HalfOpen {
                    inner.reopens = inner.reopens.saturating_add(1);
                    self.reopen_period(inner.reopens)
                } else {
                    inner.reopens = 0;
                    self.policy.recovery_timeout
                };
                let period_ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
                self.open_until.store(
                    self.offset(now).saturating_add(period_ns),
                    Ordering::Release,
                );
                open_for = Some(period);
            }
            State::HalfOpen => {
                inner.trials_in_flight = 0;
                inner.trial_successes = 0;
                inner.trials_busy_since = None;
            }
            State::Closed => {
                inner.reopens = 0;
                self.clear_closed_stats();
            }
            State::ForcedOpen | State::Disabled => {}
        }
        let generation = (word >> GEN_SHIFT).wrapping_add(1);
        self.word
            .store((generation << GEN_SHIFT) | to.to_bits(), Ordering::Release);
        self.state_changes.fetch_add(1, Ordering::Relaxed);
        inner.reason = Some(reason);
        self.observer.on_transition(&Transition {
            from,
            to,
            reason,
            open_for,
        });
    }

    fn clear_closed_stats(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(window) = &self.window {
            window.clear();
        }
    }

    /// `recovery_timeout * 2^reopens`, jittered by ±10%, capped at
    /// `max_recovery_timeout`; plain `recovery_timeout` when that is unset.
    fn reopen_period(&self, reopens: u32) -> Duration {
        let base = self.policy.recovery_timeout;
        let Some(max) = self.policy.max_recovery_timeout else {
            return base;
        };
        let doubled = base.saturating_mul(1u32 << reopens.min(31));
        let jittered = doubled.mul_f64(0.9 + 0.2 * fastrand::f64());
        jittered.min(max)
    }

    /// Outcome of a call admitted in CLOSED, while CLOSED still holds (`word`).
    fn on_closed_outcome(&self, word: u64, now: Instant, outcome: Outcome, elapsed: Duration) {
        let mut open = None;
        match outcome {
            Outcome::Failure => {
                let n = self
                    .consecutive
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                if n >= self.policy.failure_threshold.max(1) {
                    open = Some(Reason::ConsecutiveFailures);
                }
            }
            Outcome::Success => {
                // Skip the store when already 0: keeps the cache line shared.
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
            }
        }
        if let (Some(window), Some(rule)) = (&self.window, &self.policy.rate) {
            let failed = outcome == Outcome::Failure;
            let slow = !failed && rule.slow_call_duration.is_some_and(|slow| elapsed > slow);
            let epoch = window.epoch(now);
            window.record(epoch, [1, u64::from(failed), u64::from(slow)]);
            if open.is_none() {
                open = rule.evaluate(window.sum(epoch));
            }
        }
        if let Some(reason) = open {
            let mut inner = self.lock();
            if self.word.load(Ordering::Acquire) == word {
                self.transition(&mut inner, now, State::Open, reason);
            }
        }
    }

    fn finish(&self, permit: &Permit, now: Instant, outcome: Option<Outcome>) {
        if let Kind::Shadow(_) = permit.kind {
            // Already counted as rejected: its outcome is not the breaker's business.
            return;
        }
        match outcome {
            Some(Outcome::Success) => self.success.fetch_add(1, Ordering::Relaxed),
            Some(Outcome::Failure) => self.failure.fetch_add(1, Ordering::Relaxed),
            None => self.cancelled.fetch_add(1, Ordering::Relaxed),
        };
        match permit.kind {
            Kind::Shadow(_) => {}
            Kind::Normal => {
                let Some(outcome) = outcome else { return };
                let word = self.word.load(Ordering::Acquire);
                if word == permit.word && state_of(word) == State::Closed {
                    let elapsed = now.saturating_duration_since(permit.started);
                    self.on_closed_outcome(word, now, outcome, elapsed);
                } else if matches!(state_of(word), State::Open | State::HalfOpen) {
                    // A late call is a chance to apply due timeouts; its outcome
                    // never touches the current period.
                    let mut inner = self.lock();
                    self.advance(&mut inner, now);
                }
            }
            Kind::Trial => {
                let mut inner = self.lock();
                // A cancelled trial (no `now`) applies no timeout: it only frees its slot.
                let word = match outcome {
                    Some(_) => self.advance(&mut inner, now),
                    None => self.word.load(Ordering::Acquire),
                };
                if word != permit.word {
                    return;
                }
                inner.trials_in_flight = inner.trials_in_flight.saturating_sub(1);
                if inner.trials_in_flight == 0 {
                    inner.trials_busy_since = None;
                }
                match outcome {
                    Some(Outcome::Failure) => {
                        self.transition(&mut inner, now, State::Open, Reason::TrialFailed);
                    }
                    Some(Outcome::Success) => {
                        inner.trial_successes += 1;
                        if inner.trial_successes >= self.policy.success_threshold.max(1) {
                            self.transition(&mut inner, now, State::Closed, Reason::Recovered);
                        }
                    }
                    None => {}
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Admitted in CLOSED or `disabled`.
    Normal,
    /// One of HALF_OPEN's trial slots.
    Trial,
    /// Dry run: would have been rejected, already counted as such.
    Shadow(Rejected),
}

/// One admitted call. Record its outcome with [`Permit::record`].
///
/// Dropped without `record` (the client went away, the request future was
/// cancelled) the call counts as `cancelled`: neither success nor failure, and a
/// HALF_OPEN trial slot is released without counting toward recovery.
#[must_use = "record the outcome, or drop the permit to cancel the call"]
pub struct Permit {
    breaker: Arc<Breaker>,
    /// The breaker's word when admitted: a later transition makes this call stale.
    word: u64,
    kind: Kind,
    started: Instant,
    done: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("kind", &self.kind)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// Dry run only: the rejection a live breaker would have answered. The
    /// call is already counted in `rejected_calls`; log it and go on.
    pub fn would_have_rejected(&self) -> Option<&Rejected> {
        match &self.kind {
            Kind::Shadow(r) => Some(r),
            _ => None,
        }
    }

    /// Whether this call is a HALF_OPEN trial.
    pub fn is_trial(&self) -> bool {
        matches!(self.kind, Kind::Trial)
    }

    /// Reports how the call ended. The call's duration (for `slow_call_duration`)
    /// is `now` minus the `now` given to `try_acquire`.
    pub fn record(mut self, now: Instant, outcome: Outcome) {
        self.done = true;
        self.breaker.finish(&self, now, Some(outcome));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let now = self.started;
            self.breaker.finish(self, now, None);
        }
    }
}
