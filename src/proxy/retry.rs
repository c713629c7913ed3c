//! Whether and when to retry an upstream attempt: retry conditions, backoff with
//! full jitter, a retry budget and `Retry-After` parsing. Pure, clock-injected.
//! Runs inside the breaker: every attempt asks the breaker first, and a call the
//! breaker rejected is never retried (the caller never asks [`RetryPolicy::decide`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, StatusCode};
use tokio::time::Instant;

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
    fn default() -> Self {
        Self {
            attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            on: RetryOn::parse(["connect-failure", "timeout", "502", "503", "504"])
                .unwrap_or_default(),
            per_try_timeout: None,
            methods: vec![
                Method::GET,
                Method::HEAD,
                Method::OPTIONS,
                Method::PUT,
                Method::DELETE,
            ],
            budget: 0.2,
            budget_min_per_second: 10,
            max_body: 64 * 1024,
        }
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

/// A `retry.on` entry that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown retry condition {0:?}: expected \"connect-failure\", \"timeout\", \"reset\", a status code such as \"503\" or a class such as \"5xx\""
)]
pub struct InvalidRetryOn(pub String);

impl RetryOn {
    /// Parses the `on` list. Every entry must be valid.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, InvalidRetryOn> {
        let mut on = RetryOn::default();
        for entry in entries {
            match entry {
                "connect-failure" => on.connect_failure = true,
                "timeout" => on.timeout = true,
                "reset" => on.reset = true,
                _ => match entry.as_bytes() {
                    [c @ b'1'..=b'5', b'x', b'x'] => on.classes |= 1 << (c - b'0'),
                    [b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => {
                        let code = entry
                            .parse::<usize>()
                            .map_err(|_| InvalidRetryOn(entry.to_owned()))?;
                        let bit = code - 100;
                        on.codes[bit / 64] |= 1 << (bit % 64);
                    }
                    _ => return Err(InvalidRetryOn(entry.to_owned())),
                },
            }
        }
        Ok(on)
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

/// Length of the retry budget's sliding window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUDGET_BUCKETS: u64 = 10;
const TAG_BITS: u32 = 24;
const COUNT_BITS: u32 = 20;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

/// Retry budget of one upstream: over a sliding 10 s window, retries stay at or
/// below `budget x requests + 10 x budget_min_per_second`.
///
/// Lock-free: every proxied request records itself here, so a lock would be
/// contended on the hot path. Ten one-second buckets, each a single atomic word
/// `tag:24 | requests:20 | retries:20` updated by CAS, so a bucket is recycled
/// atomically. The check of a withdrawal reads the other buckets before the
/// CAS on the current one: concurrent withdrawals can overshoot by at most the
/// number of threads racing. A bucket counts at most ~1M requests per second.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// Retries allowed over the window regardless of traffic.
    floor: f64,
    base: Instant,
    buckets: [AtomicU64; BUDGET_BUCKETS as usize],
}

impl RetryBudget {
    pub fn new(budget: f64, min_per_second: u32, now: Instant) -> Self {
        Self {
            ratio: if budget.is_finite() {
                budget.max(0.0)
            } else {
                0.0
            },
            floor: f64::from(min_per_second) * BUDGET_WINDOW.as_secs_f64(),
            base: now,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts one request (not attempt) to the upstream.
    pub fn record_request(&self, now: Instant) {
        let epoch = self.epoch(now);
        let _ = self
            .bucket(epoch)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                let (requests, retries) = current(cur, epoch);
                Some(pack_budget(epoch, (requests + 1).min(COUNT_MAX), retries))
            });
    }

    /// Takes one retry from the budget; `false` when it is exhausted.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let epoch = self.epoch(now);
        let (older_requests, older_retries) = self.sum_older(epoch);
        self.bucket(epoch)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                let (requests, retries) = current(cur, epoch);
                let allowed = self.ratio * (older_requests + requests) as f64 + self.floor;
                let after = (older_retries + retries + 1) as f64;
                (after <= allowed && retries < COUNT_MAX)
                    .then(|| pack_budget(epoch, requests, retries + 1))
            })
            .is_ok()
    }

    /// (requests, retries) over the window ending at `now`.
    pub fn usage(&self, now: Instant) -> (u64, u64) {
        let epoch = self.epoch(now);
        let (r, t) = self.sum_older(epoch);
        let (cr, ct) = current(self.bucket(epoch).load(Ordering::Relaxed), epoch);
        (r + cr, t + ct)
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_secs()
    }

    fn bucket(&self, epoch: u64) -> &AtomicU64 {
        &self.buckets[(epoch % BUDGET_BUCKETS) as usize]
    }

    fn sum_older(&self, epoch: u64) -> (u64, u64) {
        let mut sum = (0, 0);
        for back in 1..BUDGET_BUCKETS {
            let Some(e) = epoch.checked_sub(back) else {
                break;
            };
            let (requests, retries) = current(self.bucket(e).load(Ordering::Relaxed), e);
            sum.0 += requests;
            sum.1 += retries;
        }
        sum
    }
}

fn pack_budget(epoch: u64, requests: u64, retries: u64) -> u64 {
    ((epoch & TAG_MASK) << (2 * COUNT_BITS)) | (requests << COUNT_BITS) | retries
}

/// The bucket's counts if it belongs to `epoch`, else zeros (a stale bucket).
fn current(word: u64, epoch: u64) -> (u64, u64) {
    if word >> (2 * COUNT_BITS) == epoch & TAG_MASK {
        ((word >> COUNT_BITS) & COUNT_MAX, word & COUNT_MAX)
    } else {
        (0, 0)
    }
}

/// Parses `Retry-After`: delta-seconds or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`); a date in the past is zero. The obsolete
/// RFC 850 and asctime date forms, which RFC 9110 forbids senders to generate,
/// are not accepted (`None`, as for any malformed value).
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly large values still mean "not soon": saturate, don't reject.
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let at = parse_imf_fixdate(text)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn parse_imf_fixdate(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 29 || &b[3..5] != b", " || &b[25..] != b" GMT" {
        return None;
    }
    if !matches!(
        &b[..3],
        b"Mon" | b"Tue" | b"Wed" | b"Thu" | b"Fri" | b"Sat" | b"Sun"
    ) {
        return None;
    }
    if b[7] != b' ' || b[11] != b' ' || b[16] != b' ' || b[19] != b':' || b[22] != b':' {
        return None;
    }
    let day = digits(&b[5..7])?;
    let month = match &b[8..11] {
        b"Jan" => 1,
        b"Feb" => 2,
        b"Mar" => 3,
        b"Apr" => 4,
        b"May" => 5,
        b"Jun" => 6,
        b"Jul" => 7,
        b"Aug" => 8,
        b"Sep" => 9,
        b"Oct" => 10,
        b"Nov" => 11,
        b"Dec" => 12,
        _ => return None,
    };
    let year = digits(&b[12..16])?;
    let (hour, min, sec) = (
        digits(&b[17..19])?,
        digits(&b[20..22])?,
        digits(&b[23..25])?,
    );
    if year < 1970
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || min > 59
        || sec > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn digits(b: &[u8]) -> Option<u64> {
    b.iter().try_fold(0u64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
    })
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date from 1970 on (Howard Hinnant's algorithm).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
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
    fn retry_on_parses_every_form_and_rejects_others() {
        let on = RetryOn::parse(["connect-failure", "timeout", "reset", "503", "4xx"]).unwrap();
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
        for bad in [
            "50x",
            "600",
            "099",
            "5XX",
            "Timeout",
            "",
            "5031",
            "connect_failure",
        ] {
            assert_eq!(
                RetryOn::parse([bad]),
                Err(InvalidRetryOn(bad.to_owned())),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn an_exact_code_wins_over_its_class() {
        let on = RetryOn::parse(["5xx", "503"]).unwrap();
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

    #[test]
    fn a_failing_stream_retries_at_most_ratio_times_requests_plus_floor() {
        let t = Instant::now();
        let b = budget(t);
        let mut granted = 0;
        for _ in 0..1000 {
            b.record_request(t);
            for _ in 0..2 {
                granted += u32::from(b.try_withdraw(t));
            }
        }
        // 0.2 x 1000 requests + 10/s x 10 s.
        assert_eq!(granted, 300);
        assert_eq!(b.usage(t), (1000, 300));
    }

    #[test]
    fn low_traffic_can_still_retry_up_to_the_floor() {
        let t = Instant::now();
        let b = RetryBudget::new(0.2, 1, t);
        b.record_request(t);
        let granted = (0..100).filter(|_| b.try_withdraw(t)).count();
        assert_eq!(granted, 10, "floor(0.2 x 1 + 1/s x 10 s)");
    }

    #[test]
    fn the_budget_window_slides() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.0, 1, t0);
        let granted = (0..20).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 10);
        let t = t0 + Duration::from_millis(9_999);
        assert!(!b.try_withdraw(t), "still inside the window");
        let t = t0 + Duration::from_secs(10);
        assert!(b.try_withdraw(t), "the first second has left the window");
        // An idle period longer than the window forgets everything.
        let t = t0 + Duration::from_secs(3600);
        assert_eq!(b.usage(t), (0, 0));
        assert_eq!((0..20).filter(|_| b.try_withdraw(t)).count(), 10);
    }

    #[test]
    fn concurrent_withdrawals_never_exceed_the_budget_within_one_bucket() {
        let t = Instant::now();
        let b = std::sync::Arc::new(RetryBudget::new(0.5, 0, t));
        for _ in 0..100 {
            b.record_request(t);
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..100).filter(|_| b.try_withdraw(t)).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 50);
    }

    /// Sun, 06 Nov 1994 08:49:37 GMT
    fn rfc_example() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    fn retry_after(text: &'static str) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_static(text), rfc_example())
    }

    #[test]
    fn retry_after_delta_seconds() {
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("0"), Some(Duration::ZERO));
        assert_eq!(retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(
            retry_after("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["-1", "1.5", "", "5s", "+3", "0x10"] {
            assert_eq!(retry_after(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_imf_fixdate() {
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:51:37 GMT"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after("Sat, 05 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(
            retry_after("Mon, 07 Nov 1994 08:49:37 GMT"),
            Some(Duration::from_secs(86_400))
        );
        let far = parse_retry_after(
            &HeaderValue::from_static("Sun, 22 Nov 2026 17:00:00 GMT"),
            UNIX_EPOCH,
        );
        assert_eq!(far, Some(Duration::from_secs(1_795_366_800)));
        let leap = parse_retry_after(
            &HeaderValue::from_static("Tue, 29 Feb 2000 23:59:59 GMT"),
            UNIX_EPOCH,
        );
        assert_eq!(leap, Some(Duration::from_secs(951_868_799)));
        for bad in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Thu, 29 Feb 2001 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:49:37 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(retry_after(bad), None, "{bad:?}");
        }
    }
}
