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

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

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

/// The breaker's state as shown in `/_ops/breakers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
    /// Manual `open`: rejects until `reset` or `close`.
    ForcedOpen,
    /// Manual `close`: admits everything, still counts, never transitions by itself.
    Disabled,
}

impl State {
    /// The `state` value of the admin JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }

    /// The `state` label of `circuit_breaker_state`: `forced_open` shows as open,
    /// `disabled` as closed.
    pub fn metric_label(self) -> &'static str {
        match self {
            State::Closed | State::Disabled => "closed",
            State::Open | State::ForcedOpen => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// The three values of the `state` label, for pre-resolving gauge handles.
    pub const METRIC_LABELS: [&'static str; 3] = ["closed", "open", "half_open"];

    fn to_bits(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    fn from_bits(bits: u64) -> State {
        match bits & STATE_MASK {
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            4 => State::Disabled,
            _ => State::Closed,
        }
    }
}

/// Why a transition happened: the `reason` of the admin API, logs and events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    ConsecutiveFailures,
    FailureRate,
    SlowCalls,
    TrialFailed,
    HalfOpenTimeout,
    RecoveryTimeout,
    CheckPassed,
    Recovered,
    Manual,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures => "consecutive_failures",
            Reason::FailureRate => "failure_rate",
            Reason::SlowCalls => "slow_calls",
            Reason::TrialFailed => "trial_failed",
            Reason::HalfOpenTimeout => "half_open_timeout",
            Reason::RecoveryTimeout => "recovery_timeout",
            Reason::CheckPassed => "check_passed",
            Reason::Recovered => "recovered",
            Reason::Manual => "manual",
        }
    }
}

/// One state change, reported once to the [`BreakerObserver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: Reason,
    /// Length of the OPEN period just started (`to == Open` only).
    pub open_for: Option<Duration>,
}

impl Transition {
    /// Whether the breaker semantics allow this (from, to, reason) triple.
    pub fn is_legal(&self) -> bool {
        use Reason as R;
        use State as S;
        match (self.from, self.to, self.reason) {
            (from, to, _) if from == to => false,
            (_, S::Closed | S::ForcedOpen | S::Disabled, R::Manual) => true,
            (S::Closed, S::Open, R::ConsecutiveFailures | R::FailureRate | R::SlowCalls) => true,
            (S::Open, S::HalfOpen, R::RecoveryTimeout | R::CheckPassed) => true,
            (S::HalfOpen, S::Open, R::TrialFailed | R::HalfOpenTimeout) => true,
            (S::HalfOpen, S::Closed, R::Recovered) => true,
            _ => false,
        }
    }
}

/// Receives every transition exactly once, in order.
///
/// Called while the breaker's transition lock is held, which is what keeps the
/// order: keep it short (log, bump a counter, send to a channel) and never call
/// back into the same breaker from it.
pub trait BreakerObserver: Send + Sync {
    fn on_transition(&self, transition: &Transition);
}

impl<F: Fn(&Transition) + Send + Sync> BreakerObserver for F {
    fn on_transition(&self, transition: &Transition) {
        self(transition)
    }
}

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
    fn minus(self, base: Counts) -> Counts {
        Counts {
            total: self.total.saturating_sub(base.total),
            success: self.success.saturating_sub(base.success),
            failure: self.failure.saturating_sub(base.failure),
            rejected: self.rejected.saturating_sub(base.rejected),
            cancelled: self.cancelled.saturating_sub(base.cancelled),
            state_changes: self.state_changes.saturating_sub(base.state_changes),
        }
    }

    fn finished(&self) -> u64 {
        self.success + self.failure + self.rejected + self.cancelled
    }
}

const STATE_MASK: u64 = 0xff;
const GEN_SHIFT: u32 = 8;

fn state_of(word: u64) -> State {
    State::from_bits(word)
}

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
    window: Option<Window>,
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
        let window = policy.rate.as_ref().map(|r| Window::new(r.window));
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
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
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
            let epoch = window.epoch(self.offset(now));
            window.add(epoch, failed, slow);
            if open.is_none() {
                open = window.evaluate(epoch, rule);
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

/// Sliding window of the rate rule: [`WINDOW_BUCKETS`] buckets, each one atomic
/// word `tag:16 | calls:16 | failed:16 | slow:16`, so recording is one CAS with
/// no lock and a bucket is recycled atomically when its epoch comes round again.
///
/// A bucket holds at most 65535 calls (later ones in the same bucket are not
/// sampled, which keeps the ratio). Tags are epochs mod 2^16: a bucket left
/// untouched for exactly a multiple of 327 680 bucket widths could be misread as
/// current, which at worst adds one stale bucket's counts.
struct Window {
    width_ns: u64,
    buckets: [AtomicU64; WINDOW_BUCKETS],
}

const FIELD: u64 = 0xffff;

impl Window {
    fn new(window: Duration) -> Self {
        let width = (window / WINDOW_BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            width_ns: u64::try_from(width.as_nanos()).unwrap_or(u64::MAX),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn epoch(&self, offset_ns: u64) -> u64 {
        offset_ns / self.width_ns
    }

    fn add(&self, epoch: u64, failed: bool, slow: bool) {
        let bucket = &self.buckets[(epoch % WINDOW_BUCKETS as u64) as usize];
        let tag = epoch & FIELD;
        let _ = bucket.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
            let (t, calls, f, s) = unpack(cur);
            let (calls, f, s) = if t == tag { (calls, f, s) } else { (0, 0, 0) };
            if calls == FIELD {
                return None;
            }
            Some(pack(
                tag,
                calls + 1,
                f + u64::from(failed),
                s + u64::from(slow),
            ))
        });
    }

    /// (calls, failed, slow) over the window ending at `epoch`.
    fn sum(&self, epoch: u64) -> (u64, u64, u64) {
        let mut total = (0, 0, 0);
        for back in 0..WINDOW_BUCKETS as u64 {
            let Some(e) = epoch.checked_sub(back) else {
                break;
            };
            let (t, calls, f, s) =
                unpack(self.buckets[(e % WINDOW_BUCKETS as u64) as usize].load(Ordering::Relaxed));
            if t == e & FIELD {
                total.0 += calls;
                total.1 += f;
                total.2 += s;
            }
        }
        total
    }

    fn evaluate(&self, epoch: u64, rule: &RateRule) -> Option<Reason> {
        let (calls, failed, slow) = self.sum(epoch);
        if calls == 0 || calls < u64::from(rule.minimum_calls) {
            return None;
        }
        let calls = calls as f64;
        if failed as f64 >= rule.failure_rate * calls {
            Some(Reason::FailureRate)
        } else if (failed + slow) as f64 >= rule.failure_rate * calls {
            Some(Reason::SlowCalls)
        } else {
            None
        }
    }

    fn clear(&self) {
        for bucket in &self.buckets {
            bucket.store(0, Ordering::Relaxed);
        }
    }
}

fn pack(tag: u64, calls: u64, failed: u64, slow: u64) -> u64 {
    (tag << 48) | (calls << 32) | (failed << 16) | slow
}

fn unpack(word: u64) -> (u64, u64, u64, u64) {
    (
        word >> 48,
        (word >> 32) & FIELD,
        (word >> 16) & FIELD,
        word & FIELD,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Records every transition, in order.
    #[derive(Default)]
    struct Log(Mutex<Vec<Transition>>);

    impl BreakerObserver for Log {
        fn on_transition(&self, t: &Transition) {
            self.0.lock().unwrap().push(*t);
        }
    }

    impl Log {
        fn all(&self) -> Vec<Transition> {
            self.0.lock().unwrap().clone()
        }
        fn pairs(&self) -> Vec<(State, State, Reason)> {
            self.all()
                .iter()
                .map(|t| (t.from, t.to, t.reason))
                .collect()
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 3,
            recovery_timeout: secs(30),
            half_open_max_calls: 2,
            success_threshold: 2,
            rate: None,
            max_half_open_wait: secs(10),
            max_recovery_timeout: None,
            dry_run: false,
        }
    }

    fn setup(policy: BreakerPolicy) -> (Arc<Breaker>, Arc<Log>, Instant) {
        let log = Arc::new(Log::default());
        let t0 = Instant::now();
        let breaker = Arc::new(Breaker::new(policy, log.clone(), t0));
        (breaker, log, t0)
    }

    fn call(b: &Arc<Breaker>, now: Instant, outcome: Outcome) {
        b.try_acquire(now).expect("admitted").record(now, outcome);
    }

    fn fail(b: &Arc<Breaker>, now: Instant) {
        call(b, now, Outcome::Failure);
    }

    fn succeed(b: &Arc<Breaker>, now: Instant) {
        call(b, now, Outcome::Success);
    }

    /// Opens the breaker at `at` with consecutive failures.
    fn open(b: &Arc<Breaker>, at: Instant) {
        for _ in 0..b.policy().failure_threshold {
            fail(b, at);
        }
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn opens_after_consecutive_failures() {
        let (b, log, t0) = setup(policy());
        fail(&b, t0);
        fail(&b, t0);
        assert_eq!(b.state(), State::Closed);
        fail(&b, t0);
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            log.pairs(),
            vec![(State::Closed, State::Open, Reason::ConsecutiveFailures)]
        );
        assert_eq!(log.all()[0].open_for, Some(secs(30)));
        let s = b.snapshot(t0);
        assert_eq!(s.reason, Some(Reason::ConsecutiveFailures));
        assert_eq!(s.failed_calls, 3);
        assert_eq!(s.state_changes, 1);
    }

    #[test]
    fn success_resets_the_consecutive_count() {
        let (b, _, t0) = setup(policy());
        fail(&b, t0);
        fail(&b, t0);
        succeed(&b, t0);
        fail(&b, t0);
        fail(&b, t0);
        assert_eq!(b.state(), State::Closed);
        fail(&b, t0);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn open_rejects_until_recovery_timeout_with_time_left() {
        let (b, log, t0) = setup(policy());
        open(&b, t0);
        let r = b.try_acquire(t0 + secs(10)).unwrap_err();
        assert_eq!(r.state, State::Open);
        assert_eq!(r.retry_after, secs(20));
        assert_eq!(r.retry_after_secs(), 20);
        let r = b.try_acquire(t0 + ms(29_500)).unwrap_err();
        assert_eq!(r.retry_after, ms(500));
        assert_eq!(r.retry_after_secs(), 1);
        assert_eq!(b.snapshot(t0 + ms(29_999)).state, State::Open);
        let s = b.snapshot(t0 + secs(20));
        assert_eq!(s.state, State::Open);
        assert!((s.remaining_timeout_s - 10.0).abs() < 1e-9);
        assert_eq!(s.rejected_calls, 2);
        assert_eq!(s.total_calls, 5);

        let trial = b
            .try_acquire(t0 + secs(30))
            .expect("trial admitted at the timeout");
        assert!(trial.is_trial());
        assert_eq!(
            log.pairs()[1],
            (State::Open, State::HalfOpen, Reason::RecoveryTimeout)
        );
        assert_eq!(b.snapshot(t0 + secs(30)).remaining_timeout_s, 0.0);
    }

    #[test]
    fn retry_after_seconds_round_up_and_are_at_least_one() {
        let r = |d| Rejected {
            state: State::Open,
            retry_after: d,
        };
        assert_eq!(r(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(r(ms(1)).retry_after_secs(), 1);
        assert_eq!(r(secs(3)).retry_after_secs(), 3);
        assert_eq!(r(secs(3) + Duration::from_nanos(1)).retry_after_secs(), 4);
    }

    #[test]
    fn snapshot_moves_open_to_half_open_when_due() {
        let (b, _, t0) = setup(policy());
        open(&b, t0);
        let s = b.snapshot(t0 + secs(31));
        assert_eq!(s.state, State::HalfOpen);
        assert_eq!(s.reason, Some(Reason::RecoveryTimeout));
        assert_eq!(s.remaining_timeout_s, 0.0);
    }

    #[test]
    fn half_open_admits_at_most_max_calls_concurrently() {
        let (b, _, t0) = setup(policy());
        open(&b, t0);
        let t = t0 + secs(30);
        let p1 = b.try_acquire(t).unwrap();
        let p2 = b.try_acquire(t).unwrap();
        assert!(p1.is_trial() && p2.is_trial());
        let r = b.try_acquire(t).unwrap_err();
        assert_eq!(r.state, State::HalfOpen);
        assert_eq!(r.retry_after, secs(1));
        // A finished trial frees its slot.
        p1.record(t, Outcome::Success);
        let p3 = b.try_acquire(t).unwrap();
        assert!(p3.is_trial());
        assert!(b.try_acquire(t).is_err());
        drop((p2, p3));
    }

    #[test]
    fn success_threshold_trials_close_the_circuit() {
        let (b, log, t0) = setup(policy());
        open(&b, t0);
        let t = t0 + secs(30);
        succeed(&b, t);
        assert_eq!(b.state(), State::HalfOpen);
        succeed(&b, t);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(
            log.pairs()[2],
            (State::HalfOpen, State::Closed, Reason::Recovered)
        );
        // Closed again with a fresh failure count.
        fail(&b, t);
        fail(&b, t);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failed_trial_reopens_with_a_fresh_timeout() {
        let (b, log, t0) = setup(policy());
        open(&b, t0);
        let trial = b.try_acquire(t0 + secs(30)).unwrap();
        trial.record(t0 + secs(35), Outcome::Failure);
        assert_eq!(
            log.pairs()[2],
            (State::HalfOpen, State::Open, Reason::TrialFailed)
        );
        let r = b.try_acquire(t0 + secs(35)).unwrap_err();
        assert_eq!(r.retry_after, secs(30));
        assert!(b.try_acquire(t0 + secs(64)).is_err());
        assert!(b.try_acquire(t0 + secs(65)).is_ok());
    }

    #[test]
    fn one_failure_among_trials_reopens_even_after_successes() {
        let (b, _, t0) = setup(BreakerPolicy {
            success_threshold: 3,
            half_open_max_calls: 3,
            ..policy()
        });
        open(&b, t0);
        let t = t0 + secs(30);
        succeed(&b, t);
        succeed(&b, t);
        fail(&b, t);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn calls_finishing_while_open_do_not_extend_it() {
        let (b, log, t0) = setup(policy());
        let late: Vec<_> = (0..3).map(|_| b.try_acquire(t0).unwrap()).collect();
        open(&b, t0);
        for p in late {
            p.record(t0 + secs(20), Outcome::Failure);
        }
        let s = b.snapshot(t0 + secs(20));
        assert_eq!(s.state, State::Open);
        assert!((s.remaining_timeout_s - 10.0).abs() < 1e-9);
        assert_eq!(s.failed_calls, 6);
        assert_eq!(log.all().len(), 1);
    }

    #[test]
    fn a_call_from_an_earlier_state_is_not_a_trial() {
        let (b, _, t0) = setup(BreakerPolicy {
            success_threshold: 1,
            ..policy()
        });
        let old = b.try_acquire(t0).unwrap();
        open(&b, t0);
        let t = t0 + secs(30);
        assert_eq!(b.snapshot(t).state, State::HalfOpen);
        old.record(t, Outcome::Success);
        assert_eq!(b.state(), State::HalfOpen, "a stale success must not close");
        let old = {
            let p = b.try_acquire(t).unwrap();
            succeed(&b, t); // closes: success_threshold 1
            p
        };
        assert_eq!(b.state(), State::Closed);
        // A stale trial failing after the circuit closed changes nothing.
        old.record(t, Outcome::Failure);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failure_from_a_previous_closed_period_is_ignored() {
        let (b, _, t0) = setup(BreakerPolicy {
            success_threshold: 1,
            ..policy()
        });
        let old = b.try_acquire(t0).unwrap();
        open(&b, t0);
        succeed(&b, t0 + secs(30));
        assert_eq!(b.state(), State::Closed);
        fail(&b, t0 + secs(30));
        fail(&b, t0 + secs(30));
        old.record(t0 + secs(30), Outcome::Failure);
        assert_eq!(b.state(), State::Closed, "a stale failure must not open");
        assert_eq!(b.snapshot(t0 + secs(30)).failed_calls, 6);
    }

    #[test]
    fn a_cancelled_trial_frees_its_slot_without_counting() {
        let (b, _, t0) = setup(BreakerPolicy {
            half_open_max_calls: 1,
            success_threshold: 1,
            ..policy()
        });
        open(&b, t0);
        let t = t0 + secs(30);
        let trial = b.try_acquire(t).unwrap();
        assert!(b.try_acquire(t).is_err());
        drop(trial);
        let s = b.snapshot(t);
        assert_eq!(s.state, State::HalfOpen, "cancel is not a success");
        assert_eq!(s.cancelled_calls, 1);
        assert_eq!(s.in_flight, 0);
        let trial = b.try_acquire(t).expect("slot released");
        trial.record(t, Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_cancelled_closed_call_is_neither_success_nor_failure() {
        let (b, _, t0) = setup(BreakerPolicy {
            failure_threshold: 2,
            ..policy()
        });
        fail(&b, t0);
        drop(b.try_acquire(t0).unwrap());
        fail(&b, t0);
        assert_eq!(b.state(), State::Open, "cancel did not reset the count");
        let s = b.snapshot(t0);
        assert_eq!(
            (s.successful_calls, s.failed_calls, s.cancelled_calls),
            (0, 2, 1)
        );
    }

    #[test]
    fn hung_trials_return_to_open_after_max_half_open_wait() {
        let (b, log, t0) = setup(policy());
        open(&b, t0);
        let hung = b.try_acquire(t0 + secs(30)).unwrap();
        assert_eq!(b.snapshot(t0 + secs(39)).state, State::HalfOpen);
        let s = b.snapshot(t0 + secs(40));
        assert_eq!(s.state, State::Open);
        assert_eq!(s.reason, Some(Reason::HalfOpenTimeout));
        assert_eq!(
            log.pairs()[2],
            (State::HalfOpen, State::Open, Reason::HalfOpenTimeout)
        );
        assert!((s.remaining_timeout_s - 30.0).abs() < 1e-9);
        // The hung trial finishing late changes nothing.
        hung.record(t0 + secs(45), Outcome::Success);
        assert_eq!(b.snapshot(t0 + secs(45)).state, State::Open);
        assert_eq!(log.all().len(), 3);
    }

    #[test]
    fn half_open_timeout_is_applied_by_try_acquire_and_record() {
        let (b, _, t0) = setup(policy());
        open(&b, t0);
        let _hung = b.try_acquire(t0 + secs(30)).unwrap();
        let r = b.try_acquire(t0 + secs(41)).unwrap_err();
        assert_eq!(r.state, State::Open);

        let (b, log, t0) = setup(policy());
        open(&b, t0);
        let slow = b.try_acquire(t0 + secs(30)).unwrap();
        slow.record(t0 + secs(41), Outcome::Success);
        assert_eq!(log.all().last().unwrap().reason, Reason::HalfOpenTimeout);
    }

    #[test]
    fn half_open_wait_counts_only_while_a_trial_is_outstanding() {
        let (b, _, t0) = setup(BreakerPolicy {
            half_open_max_calls: 1,
            success_threshold: 2,
            ..policy()
        });
        open(&b, t0);
        let t = t0 + secs(30);
        succeed(&b, t); // one of two successes; nothing outstanding now
        assert_eq!(b.snapshot(t + secs(3600)).state, State::HalfOpen);
        let late = b.try_acquire(t + secs(3600)).unwrap();
        assert_eq!(b.snapshot(t + secs(3609)).state, State::HalfOpen);
        late.record(t + secs(3609), Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn an_idle_half_open_does_not_time_out() {
        let (b, _, t0) = setup(policy());
        open(&b, t0);
        assert_eq!(b.snapshot(t0 + secs(30)).state, State::HalfOpen);
        assert_eq!(b.snapshot(t0 + secs(3600)).state, State::HalfOpen);
        assert!(b.try_acquire(t0 + secs(3600)).unwrap().is_trial());
    }

    #[test]
    fn reopen_periods_double_with_jitter_up_to_the_cap() {
        let (b, log, t0) = setup(BreakerPolicy {
            recovery_timeout: secs(10),
            max_recovery_timeout: Some(secs(60)),
            max_half_open_wait: secs(1000),
            ..policy()
        });
        open(&b, t0);
        let mut now = t0;
        let mut periods = vec![log.all()[0].open_for.unwrap()];
        for _ in 0..4 {
            now += *periods.last().unwrap();
            fail(&b, now); // trial fails
            periods.push(log.all().last().unwrap().open_for.unwrap());
        }
        assert_eq!(periods[0], secs(10), "the first open is not jittered");
        let within = |d: Duration, lo: u64, hi: u64| d >= secs(lo) && d <= secs(hi);
        assert!(within(periods[1], 18, 22), "{periods:?}");
        assert!(within(periods[2], 36, 44), "{periods:?}");
        assert_eq!(periods[3], secs(60), "{periods:?}");
        assert_eq!(periods[4], secs(60), "{periods:?}");
        let s = b.snapshot(now);
        assert!((s.remaining_timeout_s - 60.0).abs() < 1e-9);

        // Closing resets the doubling.
        now += secs(60);
        succeed(&b, now);
        succeed(&b, now);
        assert_eq!(b.state(), State::Closed);
        open(&b, now);
        now += secs(10);
        fail(&b, now);
        assert!(within(log.all().last().unwrap().open_for.unwrap(), 18, 22));
    }

    #[test]
    fn without_max_recovery_timeout_reopen_period_is_constant() {
        let (b, log, t0) = setup(policy());
        open(&b, t0);
        let mut now = t0;
        for _ in 0..3 {
            now += secs(30);
            fail(&b, now);
            assert_eq!(log.all().last().unwrap().open_for, Some(secs(30)));
        }
    }

    fn rate_policy(min_calls: u32, slow: Option<Duration>) -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 100,
            rate: Some(RateRule {
                failure_rate: 0.5,
                window: secs(10),
                minimum_calls: min_calls,
                slow_call_duration: slow,
            }),
            ..policy()
        }
    }

    #[test]
    fn failure_rate_opens_once_minimum_calls_are_seen() {
        let (b, log, t0) = setup(rate_policy(4, None));
        fail(&b, t0);
        fail(&b, t0);
        succeed(&b, t0);
        assert_eq!(b.state(), State::Closed, "3 calls < minimum_calls");
        succeed(&b, t0);
        assert_eq!(b.state(), State::Open, "2 of 4 failed = 50%");
        assert_eq!(log.pairs()[0].2, Reason::FailureRate);
    }

    #[test]
    fn failure_rate_below_threshold_stays_closed() {
        let (b, _, t0) = setup(rate_policy(4, None));
        for _ in 0..10 {
            succeed(&b, t0);
            succeed(&b, t0);
            fail(&b, t0);
        }
        assert_eq!(b.state(), State::Closed, "33% < 50%");
    }

    #[test]
    fn slow_successes_count_toward_the_rate_as_slow_calls() {
        let (b, log, t0) = setup(rate_policy(2, Some(secs(2))));
        let p = b.try_acquire(t0).unwrap();
        p.record(t0 + secs(2), Outcome::Success); // not slower than 2s
        let p = b.try_acquire(t0).unwrap();
        p.record(t0 + secs(2), Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        let p = b.try_acquire(t0).unwrap();
        p.record(t0 + secs(3), Outcome::Success);
        let p = b.try_acquire(t0).unwrap();
        p.record(t0 + secs(3), Outcome::Success);
        assert_eq!(b.state(), State::Open, "2 slow of 4 = 50%");
        assert_eq!(log.pairs()[0].2, Reason::SlowCalls);
        assert_eq!(b.snapshot(t0 + secs(3)).failed_calls, 0);
    }

    #[test]
    fn slow_calls_do_not_feed_the_consecutive_rule() {
        let (b, _, t0) = setup(BreakerPolicy {
            failure_threshold: 1,
            rate: None,
            ..rate_policy(1, Some(ms(1)))
        });
        let p = b.try_acquire(t0).unwrap();
        p.record(t0 + secs(5), Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn the_rate_window_slides() {
        let (b, _, t0) = setup(rate_policy(4, None));
        for _ in 0..3 {
            fail(&b, t0);
        }
        // Without sliding, 3 failures of 4 calls would open it here.
        let later = t0 + secs(11);
        for _ in 0..3 {
            succeed(&b, later);
        }
        fail(&b, later);
        assert_eq!(b.state(), State::Closed);
        // Inside the window the old failures still count.
        let (b, _, t0) = setup(rate_policy(4, None));
        for _ in 0..3 {
            fail(&b, t0);
        }
        succeed(&b, t0 + secs(5));
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn closing_clears_the_rate_window() {
        let (b, _, t0) = setup(BreakerPolicy {
            success_threshold: 1,
            ..rate_policy(4, None)
        });
        for _ in 0..4 {
            fail(&b, t0);
        }
        assert_eq!(b.state(), State::Open);
        let t = t0 + secs(1); // still inside the window
        b.reset(t);
        fail(&b, t);
        assert_eq!(b.state(), State::Closed, "old failures were cleared");
    }

    #[test]
    fn force_open_rejects_until_reset_and_ignores_time() {
        let (b, log, t0) = setup(policy());
        b.force_open(t0);
        let r = b.try_acquire(t0 + secs(3600)).unwrap_err();
        assert_eq!(r.state, State::ForcedOpen);
        assert_eq!(r.retry_after, secs(30));
        let s = b.snapshot(t0 + secs(3600));
        assert_eq!(s.state, State::ForcedOpen);
        assert_eq!(s.reason, Some(Reason::Manual));
        assert_eq!(s.remaining_timeout_s, 0.0);
        b.check_passed(t0);
        assert_eq!(
            b.state(),
            State::ForcedOpen,
            "check_passed only acts on OPEN"
        );
        b.force_open(t0);
        assert_eq!(log.all().len(), 1, "no transition to the same state");
        b.reset(t0);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(
            log.pairs(),
            vec![
                (State::Closed, State::ForcedOpen, Reason::Manual),
                (State::ForcedOpen, State::Closed, Reason::Manual)
            ]
        );
    }

    #[test]
    fn disabled_admits_and_counts_but_never_opens() {
        let (b, log, t0) = setup(policy());
        open(&b, t0);
        b.disable(t0);
        for _ in 0..10 {
            fail(&b, t0);
        }
        let s = b.snapshot(t0 + secs(100));
        assert_eq!(s.state, State::Disabled);
        assert_eq!(s.failed_calls, 13);
        assert_eq!(log.all().len(), 2);
        b.reset(t0);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn reset_clears_snapshot_counters_but_not_monotonic_counts() {
        let (b, log, t0) = setup(policy());
        open(&b, t0);
        assert!(b.try_acquire(t0).is_err());
        let in_flight = b.try_acquire(t0 + secs(30)).unwrap();
        b.reset(t0 + secs(30));
        assert_eq!(log.all().last().unwrap().reason, Reason::Manual);
        let s = b.snapshot(t0 + secs(30));
        assert_eq!(s.state, State::Closed);
        assert_eq!(
            (
                s.total_calls,
                s.successful_calls,
                s.failed_calls,
                s.rejected_calls
            ),
            (1, 0, 0, 0),
            "only the call still in flight remains"
        );
        assert_eq!(s.in_flight, 1);
        assert_eq!(s.state_changes, 0);
        in_flight.record(t0 + secs(31), Outcome::Success);
        let s = b.snapshot(t0 + secs(31));
        assert_eq!((s.total_calls, s.successful_calls, s.in_flight), (1, 1, 0));
        let c = b.counts();
        assert_eq!((c.total, c.failure, c.rejected, c.success), (5, 3, 1, 1));
        assert_eq!(c.state_changes, 3);
    }

    #[test]
    fn reset_while_closed_clears_counters_without_a_transition() {
        let (b, log, t0) = setup(policy());
        fail(&b, t0);
        fail(&b, t0);
        b.reset(t0);
        assert!(log.all().is_empty());
        assert_eq!(b.snapshot(t0).failed_calls, 0);
        fail(&b, t0);
        fail(&b, t0);
        assert_eq!(b.state(), State::Closed, "consecutive count was reset");
    }

    #[test]
    fn check_passed_moves_open_to_half_open_early() {
        let (b, log, t0) = setup(policy());
        b.check_passed(t0);
        assert!(log.all().is_empty(), "no effect while closed");
        open(&b, t0);
        b.check_passed(t0 + secs(1));
        assert_eq!(
            log.pairs()[1],
            (State::Open, State::HalfOpen, Reason::CheckPassed)
        );
        assert!(b.try_acquire(t0 + secs(1)).unwrap().is_trial());
    }

    #[test]
    fn dry_run_transitions_and_counts_but_never_rejects() {
        let (b, log, t0) = setup(BreakerPolicy {
            dry_run: true,
            half_open_max_calls: 1,
            success_threshold: 1,
            ..policy()
        });
        open(&b, t0);
        let p = b.try_acquire(t0 + secs(10)).expect("dry run admits");
        let would = *p.would_have_rejected().expect("would have rejected");
        assert_eq!(would.state, State::Open);
        assert_eq!(would.retry_after, secs(20));
        p.record(t0 + secs(10), Outcome::Failure);
        let s = b.snapshot(t0 + secs(10));
        assert_eq!(s.rejected_calls, 1);
        assert_eq!(s.failed_calls, 3, "a would-be rejection has no outcome");
        assert!((s.remaining_timeout_s - 20.0).abs() < 1e-9, "not extended");
        assert!(s.dry_run);

        let t = t0 + secs(30);
        let trial = b.try_acquire(t).unwrap();
        assert!(trial.is_trial() && trial.would_have_rejected().is_none());
        let extra = b.try_acquire(t).unwrap();
        assert_eq!(extra.would_have_rejected().unwrap().state, State::HalfOpen);
        drop(extra);
        trial.record(t, Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(log.all().len(), 3);
        let s = b.snapshot(t);
        assert_eq!((s.rejected_calls, s.cancelled_calls), (2, 0));

        b.force_open(t);
        let p = b
            .try_acquire(t)
            .expect("dry run admits even when forced open");
        assert_eq!(p.would_have_rejected().unwrap().state, State::ForcedOpen);
    }

    #[test]
    fn live_breaker_never_hands_out_shadow_permits() {
        let (b, _, t0) = setup(policy());
        assert!(b.try_acquire(t0).unwrap().would_have_rejected().is_none());
        open(&b, t0);
        assert!(b.try_acquire(t0).is_err());
    }

    #[test]
    fn labels_match_the_spec() {
        let names: Vec<_> = [
            State::Closed,
            State::Open,
            State::HalfOpen,
            State::ForcedOpen,
            State::Disabled,
        ]
        .iter()
        .map(|s| (s.as_str(), s.metric_label()))
        .collect();
        assert_eq!(
            names,
            vec![
                ("closed", "closed"),
                ("open", "open"),
                ("half_open", "half_open"),
                ("forced_open", "open"),
                ("disabled", "closed")
            ]
        );
        let reasons: Vec<_> = [
            Reason::ConsecutiveFailures,
            Reason::FailureRate,
            Reason::SlowCalls,
            Reason::TrialFailed,
            Reason::HalfOpenTimeout,
            Reason::RecoveryTimeout,
            Reason::CheckPassed,
            Reason::Recovered,
            Reason::Manual,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(
            reasons,
            [
                "consecutive_failures",
                "failure_rate",
                "slow_calls",
                "trial_failed",
                "half_open_timeout",
                "recovery_timeout",
                "check_passed",
                "recovered",
                "manual"
            ]
        );
    }

    #[test]
    fn legality_table_rejects_what_spec_forbids() {
        let t = |from, to, reason| Transition {
            from,
            to,
            reason,
            open_for: None,
        };
        assert!(t(State::Closed, State::Open, Reason::FailureRate).is_legal());
        assert!(t(State::Open, State::Closed, Reason::Manual).is_legal());
        assert!(!t(State::Closed, State::HalfOpen, Reason::RecoveryTimeout).is_legal());
        assert!(!t(State::Open, State::Closed, Reason::Recovered).is_legal());
        assert!(!t(State::HalfOpen, State::Open, Reason::ConsecutiveFailures).is_legal());
        assert!(!t(State::Closed, State::Closed, Reason::Manual).is_legal());
        assert!(!t(State::Open, State::HalfOpen, Reason::Manual).is_legal());
    }

    #[test]
    fn closure_observers_work() {
        let count = Arc::new(AtomicU64::new(0));
        let seen = count.clone();
        let t0 = Instant::now();
        let b = Arc::new(Breaker::new(
            BreakerPolicy {
                failure_threshold: 1,
                ..policy()
            },
            Arc::new(move |_: &Transition| {
                seen.fetch_add(1, Ordering::Relaxed);
            }),
            t0,
        ));
        fail(&b, t0);
        assert_eq!(count.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn concurrent_closed_calls_keep_counters_consistent() {
        let (b, log, t0) = setup(BreakerPolicy {
            failure_threshold: 1_000_000,
            ..rate_policy(1_000_000, None)
        });
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for n in 0..5_000u32 {
                        let p = b.try_acquire(t0).unwrap();
                        match (n + i) % 3 {
                            0 => p.record(t0, Outcome::Success),
                            1 => p.record(t0, Outcome::Failure),
                            _ => drop(p),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = b.snapshot(t0);
        assert_eq!(s.total_calls, 20_000);
        assert_eq!(
            s.successful_calls + s.failed_calls + s.cancelled_calls,
            20_000
        );
        assert_eq!(s.in_flight, 0);
        assert!(log.all().is_empty());
        let (calls, _, _) = b.window.as_ref().unwrap().sum(0);
        assert_eq!(calls, s.successful_calls + s.failed_calls);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire,
        Record(usize, bool),
        Cancel(usize),
        Advance(u64),
        Reset,
        ForceOpen,
        Disable,
        CheckPassed,
        Snapshot,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Acquire),
            6 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Record(i, ok)),
            1 => any::<usize>().prop_map(Op::Cancel),
            4 => (0u64..25_000).prop_map(Op::Advance),
            1 => Just(Op::Reset),
            1 => Just(Op::ForceOpen),
            1 => Just(Op::Disable),
            1 => Just(Op::CheckPassed),
            1 => Just(Op::Snapshot),
        ]
    }

    fn arb_policy() -> impl Strategy<Value = BreakerPolicy> {
        (
            1u32..4,
            1u64..20,
            1u32..4,
            1u32..4,
            1u64..15,
            prop::option::of(20u64..120),
            prop::option::of((1u32..6, prop::option::of(1u64..3_000))),
            any::<bool>(),
        )
            .prop_map(
                |(threshold, recovery, max_calls, successes, wait, max_rec, rate, dry_run)| {
                    BreakerPolicy {
                        failure_threshold: threshold,
                        recovery_timeout: secs(recovery),
                        half_open_max_calls: max_calls,
                        success_threshold: successes,
                        rate: rate.map(|(min, slow)| RateRule {
                            failure_rate: 0.5,
                            window: secs(10),
                            minimum_calls: min,
                            slow_call_duration: slow.map(ms),
                        }),
                        max_half_open_wait: secs(wait),
                        max_recovery_timeout: max_rec.map(secs),
                        dry_run,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn state_machine_invariants(policy in arb_policy(), ops in prop::collection::vec(op(), 1..120)) {
            let dry_run = policy.dry_run;
            let max_calls = policy.half_open_max_calls;
            let longest_open = policy.max_recovery_timeout.unwrap_or(policy.recovery_timeout)
                .max(policy.recovery_timeout);
            let (b, log, t0) = setup(policy);
            let mut now = t0;
            let mut held: Vec<Permit> = Vec::new();
            // Independent record of the current OPEN period, from the observed transitions.
            let mut seen = 0;
            let mut open_until: Option<Instant> = None;

            for op in ops {
                match op {
                    Op::Acquire => {
                        // Closed and disabled have no timeouts: they cannot change on the way in.
                        let state_before = b.state();
                        let must_reject = state_before == State::ForcedOpen
                            || open_until.is_some_and(|until| now < until);
                        match b.try_acquire(now) {
                            Ok(p) => {
                                let shadow = p.would_have_rejected().is_some();
                                prop_assert!(dry_run || !shadow, "live breaker gave a shadow permit");
                                prop_assert!(!must_reject || shadow, "admitted while open before the timeout");
                                held.push(p);
                            }
                            Err(r) => {
                                prop_assert!(!dry_run, "dry run rejected");
                                prop_assert!(matches!(r.state, State::Open | State::HalfOpen | State::ForcedOpen));
                                prop_assert!(!matches!(state_before, State::Closed | State::Disabled));
                            }
                        }
                    }
                    Op::Record(i, ok) => {
                        if !held.is_empty() {
                            let p = held.swap_remove(i % held.len());
                            p.record(now, if ok { Outcome::Success } else { Outcome::Failure });
                        }
                    }
                    Op::Cancel(i) => {
                        if !held.is_empty() {
                            drop(held.swap_remove(i % held.len()));
                        }
                    }
                    Op::Advance(d) => now += ms(d),
                    Op::Reset => b.reset(now),
                    Op::ForceOpen => b.force_open(now),
                    Op::Disable => b.disable(now),
                    Op::CheckPassed => b.check_passed(now),
                    Op::Snapshot => {
                        let s = b.snapshot(now);
                        if s.state == State::Open {
                            prop_assert!(s.remaining_timeout_s > 0.0);
                            prop_assert!(s.remaining_timeout_s <= longest_open.as_secs_f64() * 1.1 + 1e-9);
                        } else {
                            prop_assert_eq!(s.remaining_timeout_s, 0.0);
                        }
                        prop_assert_eq!(s.in_flight as usize, held.iter().filter(|p| p.would_have_rejected().is_none()).count());
                    }
                }

                // Every transition legal, reported once, in a chain ending at the current state.
                let transitions = log.all();
                let mut state = State::Closed;
                for t in &transitions[seen..] {
                    if t.from == State::Open && t.reason == Reason::RecoveryTimeout {
                        prop_assert!(open_until.is_some_and(|until| now >= until), "half-open before the timeout");
                    }
                    open_until = (t.to == State::Open).then(|| now + t.open_for.unwrap_or_default());
                }
                seen = transitions.len();
                for t in &transitions {
                    prop_assert!(t.is_legal(), "illegal transition {:?}", t);
                    prop_assert_eq!(t.from, state);
                    prop_assert_eq!(t.open_for.is_some(), t.to == State::Open);
                    state = t.to;
                }
                prop_assert_eq!(state, b.state());
                let c = b.counts();
                prop_assert_eq!(c.state_changes, transitions.len() as u64);

                // Counters: every offered call is finished, rejected or held.
                let live_held = held.iter().filter(|p| p.would_have_rejected().is_none()).count() as u64;
                prop_assert_eq!(c.total, c.success + c.failure + c.rejected + c.cancelled + live_held);

                // Never more trials in flight than half_open_max_calls.
                let word = b.word.load(Ordering::Acquire);
                let trials = held.iter().filter(|p| p.is_trial() && p.word == word).count() as u32;
                prop_assert!(trials <= max_calls);
                if b.state() == State::HalfOpen {
                    prop_assert_eq!(b.lock().trials_in_flight, trials);
                }
            }
        }
    }
}
