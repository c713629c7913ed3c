//! The breaker's state machine vocabulary: states, transition reasons, the
//! transitions an observer receives, and the one-word encoding of state and
//! generation the hot path loads.

use std::time::Duration;

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

    pub(super) fn to_bits(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    pub(super) fn from_bits(bits: u64) -> State {
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

pub(super) const STATE_MASK: u64 = 0xff;
pub(super) const GEN_SHIFT: u32 = 8;

pub(super) fn state_of(word: u64) -> State {
    State::from_bits(word)
}
