//! Whether and when to retry an upstream attempt: retry conditions, backoff with
//! full jitter, a retry budget and `Retry-After` parsing. Pure, clock-injected.
//! The budget lives in `budget`, `Retry-After` parsing in `after`.
//! Runs inside the breaker: every attempt asks the breaker first, and a call the
//! breaker rejected is never retried (the caller never asks [`RetryPolicy::decide`]).

mod after;
mod budget;

use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::config::values::RetryCondition;

pub use after::parse_retry_after;
pub use budget::{BUDGET_WINDOW, RetryBudget};

/// Retry settings of one upstream. Built by the config layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (1 = never retry).
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Which attempt results are retried.
    pub on: RetryOn,
    /// Set: each attempt gets this and the route timeout bounds the whole request.
    pub per_try_timeout: Option<Duration>,
    /// Methods that may be retried (idempotent ones by default).
    pub methods: Vec<Method>,
    /// Retries allowed per request over the budget window.
    pub budget: f64,
    /// Retries per second allowed on top of the ratio (low traffic can still retry).
    pub budget_min_per_second: u32,
    /// Requests with larger bodies are never retried.
    pub max_body: usize,
}

impl Default for RetryPolicy {
    /// SPEC's `[upstreams.<name>.retry]` defaults, from the config's own.
    fn default() -> Self {
        Self::from_config(&crate::config::RetrySection::default())
    }
}

/// The result of one attempt, as seen by the retry logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Connecting failed or timed out; the request never reached the upstream.
    ConnectFailure,
    /// No response headers within the attempt's timeout.
    Timeout,
    /// The connection was reset after the request was sent, before response headers.
    Reset,
    /// The upstream answered.
    Status(StatusCode),
}

/// The set of `retry.on` entries: `connect-failure`, `timeout`, `reset`, a status
/// code (`"503"`) or a status class (`"5xx"`). A bitset: lookups allocate nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    connect_failure: bool,
    timeout: bool,
    reset: bool,
    /// Bit `code - 100` for every listed code in 100..=599.
    codes: [u64; 8],
    /// Bit `n` for every listed class `nxx`, n in 1..=5.
    classes: u8,
}

impl RetryOn {
    /// The set of `conditions`, as the config parsed them.
    pub fn new<'a>(conditions: impl IntoIterator<Item = &'a RetryCondition>) -> Self {
        let mut on = RetryOn::default();
        for condition in conditions {
            match *condition {
                RetryCondition::ConnectFailure => on.connect_failure = true,
                RetryCondition::Timeout => on.timeout = true,
                RetryCondition::Reset => on.reset = true,
                // The config only makes 400..=599 and classes 4 and 5; the guards keep the
                // bitsets in bounds for any value of the public enum.
                RetryCondition::Status(code) if (100..=599).contains(&code) => {
                    let bit = usize::from(code - 100);
                    on.codes[bit / 64] |= 1 << (bit % 64);
                }
                RetryCondition::Class(n @ 1..=5) => on.classes |= 1 << n,
                RetryCondition::Status(_) | RetryCondition::Class(_) => {}
            }
        }
        on
    }

    /// Every `reason` label [`RetryOn::classify`] can give, each once.
    pub fn labels(&self) -> Vec<&'static str> {
        let flags = [
            (self.connect_failure, "connect-failure"),
            (self.timeout, "timeout"),
            (self.reset, "reset"),
        ];
        let codes = (100..=599u16).filter(|code| {
            let bit = usize::from(code - 100);
            self.codes[bit / 64] & (1 << (bit % 64)) != 0
        });
        let classes = (1..=5).filter(|n| self.classes & (1 << n) != 0);
        flags
            .into_iter()
            .filter_map(|(on, label)| on.then_some(label))
            .chain(codes.map(status_label))
            .chain(classes.map(|n| CLASS_LABELS[n]))
            .collect()
    }

    /// The `on` entry that makes `attempt` retryable, as the `reason` label of
    /// `upstream_retries_total`; `None` when no entry matches. An exact code
    /// wins over its class.
    pub fn classify(&self, attempt: &Attempt) -> Option<&'static str> {
        match attempt {
            Attempt::ConnectFailure => self.connect_failure.then_some("connect-failure"),
            Attempt::Timeout => self.timeout.then_some("timeout"),
            Attempt::Reset => self.reset.then_some("reset"),
            Attempt::Status(status) => {
                let code = status.as_u16();
                if !(100..=599).contains(&code) {
                    return None;
                }
                let bit = usize::from(code - 100);
                if self.codes[bit / 64] & (1 << (bit % 64)) != 0 {
                    return Some(status_label(code));
                }
                let class = code / 100;
                (self.classes & (1 << class) != 0).then(|| CLASS_LABELS[usize::from(class)])
            }
        }
    }
}

const CLASS_LABELS: [&str; 6] = ["", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The three ASCII digits of every code in 100..=599, so a status label is a
/// `&'static str` without allocating or leaking per request.
static STATUS_DIGITS: [[u8; 3]; 500] = {
    let mut out = [[0u8; 3]; 500];
    let mut i = 0;
    while i < 500 {
        let code = i + 100;
        out[i] = [
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ];
        i += 1;
    }
    out
};

/// `"503"` for 503: a static label for any code in 100..=599, `"other"` outside.
pub fn status_label(code: u16) -> &'static str {
    match code
        .checked_sub(100)
        .and_then(|i| STATUS_DIGITS.get(usize::from(i)))
    {
        Some(digits) => std::str::from_utf8(digits).unwrap_or("other"),
        None => "other",
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Withdrawn from the budget already: wait `delay`, then try again (asking
    /// the breaker first). `reason` is the `upstream_retries_total` label.
    Retry {
        reason: &'static str,
        delay: Duration,
    },
    /// Return this attempt's answer (or its error) to the client.
    Stop(Stop),
}

/// Why no retry happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// No `on` entry matches the attempt.
    NotRetryable,
    /// `attempts` reached.
    Exhausted,
    /// The wait (backoff or `Retry-After`) does not fit the time left.
    Deadline,
    /// The retry budget is empty: count `upstream_retry_budget_exhausted_total`.
    BudgetExhausted { reason: &'static str },
}

impl RetryPolicy {
    /// From the config's typed values: nothing is parsed here, validation already did.
    pub fn from_config(r: &crate::config::RetrySection) -> Self {
        use crate::config::values::Spelled;
        RetryPolicy {
            attempts: r.attempts,
            base_delay: r.base_delay.get(),
            max_delay: r.max_delay.get(),
            on: RetryOn::new(r.on.iter().map(Spelled::get)),
            per_try_timeout: r.per_try_timeout.map(crate::config::Dur::get),
            methods: r.methods.iter().map(|m| m.get().clone()).collect(),
            budget: r.budget,
            budget_min_per_second: r.budget_min_per_second,
            max_body: usize::try_from(r.max_body.0).unwrap_or(usize::MAX),
        }
    }

    /// Whether requests with this method may be retried at all.
    pub fn allows_method(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// Whether a body of `len` bytes may be buffered for replay (`max_body`).
    pub fn fits_body(&self, len: u64) -> bool {
        u64::try_from(self.max_body).is_ok_and(|max| len <= max)
    }

    /// Full-jitter backoff before retry number `retry` (0 for the first retry):
    /// uniform in `[0, min(max_delay, base_delay * 2^retry)]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = self.backoff_cap(retry);
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=cap_ns))
    }

    /// The upper bound of [`RetryPolicy::backoff`].
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// Decides after attempt number `attempts_made` (1 after the first) ended
    /// with `attempt`. The caller has already checked [`RetryPolicy::allows_method`]
    /// and the body size once per request.
    ///
    /// `retry_after` is the upstream's `Retry-After` on a 429/503 (see
    /// [`parse_retry_after`]): the retry waits exactly that long. `time_left` is
    /// what remains of the whole-request deadline (`per_try_timeout` set); with
    /// none, a `Retry-After` longer than `max_delay` is not waited for.
    /// Checks run cheapest first; the budget is withdrawn from last, only when
    /// the retry will really happen.
    pub fn decide(
        &self,
        attempts_made: u32,
        attempt: &Attempt,
        retry_after: Option<Duration>,
        time_left: Option<Duration>,
        budget: &RetryBudget,
        now: Instant,
    ) -> Decision {
        let Some(reason) = self.on.classify(attempt) else {
            return Decision::Stop(Stop::NotRetryable);
        };
        if attempts_made >= self.attempts {
            return Decision::Stop(Stop::Exhausted);
        }
        let delay = match retry_after {
            Some(wait) => {
                if time_left.is_none() && wait > self.max_delay {
                    return Decision::Stop(Stop::Deadline);
                }
                wait
            }
            None => self.backoff(attempts_made.saturating_sub(1)),
        };
        if time_left.is_some_and(|left| delay >= left) {
            return Decision::Stop(Stop::Deadline);
        }
        if !budget.try_withdraw(now) {
            return Decision::Stop(Stop::BudgetExhausted { reason });
        }
        Decision::Retry { reason, delay }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn on(entries: &[&str]) -> RetryOn {
        use crate::config::values::FromConfig;
        let conditions: Vec<_> = entries
            .iter()
            .map(|e| RetryCondition::from_config(&e.to_string()).unwrap())
            .collect();
        RetryOn::new(&conditions)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    #[test]
    fn backoff_stays_within_the_capped_exponential() {
        let p = policy();
        let caps: Vec<_> = (0..8).map(|n| p.backoff_cap(n)).collect();
        assert_eq!(
            caps,
            [100, 200, 400, 800, 1600, 2000, 2000, 2000]
                .map(ms)
                .to_vec()
        );
        assert_eq!(p.backoff_cap(40), ms(2000), "no overflow on large retries");
        for (n, cap) in caps.iter().enumerate() {
            let samples: Vec<_> = (0..500).map(|_| p.backoff(n as u32)).collect();
            assert!(samples.iter().all(|d| d <= cap), "retry {n} above {cap:?}");
            // Full jitter: spread over the whole range, not clustered at the cap.
            assert!(
                samples.iter().any(|d| *d < *cap / 4),
                "retry {n}: no low sample"
            );
            assert!(
                samples.iter().any(|d| *d > *cap * 3 / 4),
                "retry {n}: no high sample"
            );
        }
    }

    #[test]
    fn zero_base_delay_means_no_wait() {
        let p = RetryPolicy {
            base_delay: Duration::ZERO,
            ..policy()
        };
        assert_eq!(p.backoff(3), Duration::ZERO);
    }

    #[test]
    fn retry_on_classifies_every_form() {
        let on = on(&["connect-failure", "timeout", "reset", "503", "4xx"]);
        assert_eq!(
            on.classify(&Attempt::ConnectFailure),
            Some("connect-failure")
        );
        assert_eq!(on.classify(&Attempt::Timeout), Some("timeout"));
        assert_eq!(on.classify(&Attempt::Reset), Some("reset"));
        assert_eq!(
            on.classify(&Attempt::Status(StatusCode::SERVICE_UNAVAILABLE)),
            Some("503")
        );
        assert_eq!(
            on.classify(&Attempt::Status(StatusCode::TOO_MANY_REQUESTS)),
            Some("4xx")
        );
        assert_eq!(on.classify(&Attempt::Status(StatusCode::BAD_GATEWAY)), None);
        assert_eq!(on.classify(&Attempt::Status(StatusCode::OK)), None);
        // Refusing other entries is the config's job (config::values).
    }

    #[test]
    fn every_entry_validation_accepts_is_retried() {
        // "5XX" passes validation, so the retry set must hold it too, not drop the list.
        let on = on(&["5XX", "429"]);
        assert_eq!(
            on.classify(&Attempt::Status(StatusCode::BAD_GATEWAY)),
            Some("5xx")
        );
        assert_eq!(
            on.classify(&Attempt::Status(StatusCode::TOO_MANY_REQUESTS)),
            Some("429")
        );
    }

    #[test]
    fn an_exact_code_wins_over_its_class() {
        let on = on(&["5xx", "503"]);
        assert_eq!(
            on.classify(&Attempt::Status(StatusCode::SERVICE_UNAVAILABLE)),
            Some("503")
        );
        assert_eq!(
            on.classify(&Attempt::Status(StatusCode::INTERNAL_SERVER_ERROR)),
            Some("5xx")
        );
    }

    #[test]
    fn the_default_retries_what_the_spec_lists() {
        let on = &policy().on;
        let retried: Vec<_> = (100..=599)
            .filter_map(|c| on.classify(&Attempt::Status(StatusCode::from_u16(c).unwrap())))
            .collect();
        assert_eq!(retried, ["502", "503", "504"]);
        assert!(on.classify(&Attempt::ConnectFailure).is_some());
        assert!(on.classify(&Attempt::Timeout).is_some());
        assert!(on.classify(&Attempt::Reset).is_none());
    }

    #[test]
    fn labels_are_every_reason_classify_gives() {
        let on = RetryOn::new(&[
            RetryCondition::Timeout,
            RetryCondition::Status(503),
            RetryCondition::Class(5),
            RetryCondition::Reset,
        ]);
        assert_eq!(on.labels(), ["timeout", "reset", "503", "5xx"]);
        let attempts = [
            Attempt::ConnectFailure,
            Attempt::Timeout,
            Attempt::Reset,
            Attempt::Status(StatusCode::SERVICE_UNAVAILABLE),
            Attempt::Status(StatusCode::BAD_GATEWAY),
            Attempt::Status(StatusCode::NOT_FOUND),
        ];
        for a in attempts {
            if let Some(reason) = on.classify(&a) {
                assert!(on.labels().contains(&reason), "{reason} not listed");
            }
        }
        assert!(RetryOn::default().labels().is_empty());
    }

    #[test]
    fn status_labels_are_static_and_exact() {
        for code in 100..=599u16 {
            assert_eq!(status_label(code).parse::<u16>().unwrap(), code);
        }
        assert_eq!(status_label(99), "other");
        assert_eq!(status_label(600), "other");
        assert_eq!(status_label(0), "other");
        assert!(std::ptr::eq(status_label(503), status_label(503)));
    }

    #[test]
    fn methods_and_body_size_gate_retries() {
        let p = policy();
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(p.allows_method(&m), "{m}");
        }
        assert!(!p.allows_method(&Method::POST));
        assert!(!p.allows_method(&Method::PATCH));
        assert!(p.fits_body(64 * 1024));
        assert!(!p.fits_body(64 * 1024 + 1));
    }

    fn budget(now: Instant) -> RetryBudget {
        RetryBudget::new(0.2, 10, now)
    }

    #[test]
    fn decide_retries_a_listed_failure_with_backoff() {
        let t = Instant::now();
        let p = policy();
        let b = budget(t);
        match p.decide(
            1,
            &Attempt::Status(StatusCode::BAD_GATEWAY),
            None,
            None,
            &b,
            t,
        ) {
            Decision::Retry { reason, delay } => {
                assert_eq!(reason, "502");
                assert!(delay <= ms(100));
            }
            other => panic!("{other:?}"),
        }
        match p.decide(2, &Attempt::Timeout, None, None, &b, t) {
            Decision::Retry { reason, delay } => {
                assert_eq!(reason, "timeout");
                assert!(delay <= ms(200));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.usage(t), (0, 2));
    }

    #[test]
    fn decide_stops_for_unlisted_results_and_exhausted_attempts() {
        let t = Instant::now();
        let p = policy();
        let b = budget(t);
        let not_found = Attempt::Status(StatusCode::NOT_FOUND);
        assert_eq!(
            p.decide(1, &not_found, None, None, &b, t),
            Decision::Stop(Stop::NotRetryable)
        );
        assert_eq!(
            p.decide(3, &Attempt::ConnectFailure, None, None, &b, t),
            Decision::Stop(Stop::Exhausted)
        );
        assert!(matches!(
            p.decide(2, &Attempt::ConnectFailure, None, None, &b, t),
            Decision::Retry { .. }
        ));
        let once = RetryPolicy {
            attempts: 1,
            ..policy()
        };
        assert_eq!(
            once.decide(1, &Attempt::ConnectFailure, None, None, &b, t),
            Decision::Stop(Stop::Exhausted)
        );
        assert_eq!(b.usage(t).1, 1, "only the real retry was withdrawn");
    }

    #[test]
    fn decide_waits_exactly_retry_after_when_it_fits() {
        let t = Instant::now();
        let p = policy();
        let b = budget(t);
        let busy = Attempt::Status(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            p.decide(1, &busy, Some(ms(1500)), Some(ms(5000)), &b, t),
            Decision::Retry {
                reason: "503",
                delay: ms(1500)
            }
        );
        // Does not fit the deadline: the answer goes back at once.
        assert_eq!(
            p.decide(1, &busy, Some(ms(5000)), Some(ms(5000)), &b, t),
            Decision::Stop(Stop::Deadline)
        );
        // No overall deadline: never wait longer than max_delay.
        assert_eq!(
            p.decide(1, &busy, Some(ms(2001)), None, &b, t),
            Decision::Stop(Stop::Deadline)
        );
        assert!(matches!(
            p.decide(1, &busy, Some(ms(2000)), None, &b, t),
            Decision::Retry { .. }
        ));
        assert_eq!(b.usage(t).1, 2);
    }

    #[test]
    fn decide_stops_when_backoff_does_not_fit() {
        let t = Instant::now();
        let p = RetryPolicy {
            base_delay: ms(100),
            max_delay: ms(100),
            ..policy()
        };
        let b = budget(t);
        assert_eq!(
            p.decide(1, &Attempt::Timeout, None, Some(Duration::ZERO), &b, t),
            Decision::Stop(Stop::Deadline)
        );
        assert!(matches!(
            p.decide(1, &Attempt::Timeout, None, Some(ms(101)), &b, t),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn decide_reports_an_empty_budget_with_its_reason() {
        let t = Instant::now();
        let p = policy();
        let b = RetryBudget::new(0.0, 0, t);
        b.record_request(t);
        assert_eq!(
            p.decide(1, &Attempt::ConnectFailure, None, None, &b, t),
            Decision::Stop(Stop::BudgetExhausted {
                reason: "connect-failure"
            })
        );
    }
}
