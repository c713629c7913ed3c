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
    let [calls, _, _] = b.window.as_ref().unwrap().sum(0);
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
