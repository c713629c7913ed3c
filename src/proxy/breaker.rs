//! Circuit breaker for upstream calls: a clock-injected state machine with no I/O.
//! Runs after admission, before retry: every attempt of a request is one call.
//!
//! States and reasons follow SPEC §5 and §10. The caller classifies each call as
//! an [`Outcome`] (`failure_status` lives in the config layer), supplies `now` to
//! every method, and receives each transition exactly once through a
//! [`BreakerObserver`] so it can log, count and publish it in one place.
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
    /// `disabled` as closed (SPEC §7).
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

/// Why a transition happened (SPEC §10).
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
    /// Whether SPEC §5 allows this (from, to, reason) triple.
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

/// An observer that ignores transitions.
pub struct NoopObserver;

impl BreakerObserver for NoopObserver {
    fn on_transition(&self, _: &Transition) {}
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
        let breaker = Arc::clone(&self.breaker);
        breaker.finish(&self, now, Some(outcome));
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
