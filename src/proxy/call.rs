//! One upstream call under its protections: breaker admission per attempt, retries with
//! backoff under the budget, per-attempt and whole-request deadlines.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use super::body::{Body, ClientFault, classify};
use super::breaker::{Breaker, Outcome, State, Transition};
use super::replay::Replay;
use super::respond::{Fault, ProxyError};
use super::retry::{Attempt, Decision, RetryBudget, RetryPolicy, Stop, parse_retry_after};
use super::upstream::{Target, UpstreamBody};
use crate::config::status::StatusRanges;
use crate::telemetry::metrics::{
    BreakerCallLabels, BreakerStateLabels, BreakerToLabels, ResilienceMetrics, RetryLabels,
    UpstreamLabel,
};

/// Told of every breaker transition, with the breaker's name (logging, events).
pub type TransitionHook = Arc<dyn Fn(&str, &Transition) + Send + Sync>;

/// A breaker with its name, what counts as failure, and its metric handles.
pub struct GuardedBreaker {
    pub name: Arc<str>,
    pub breaker: Arc<Breaker>,
    /// Inclusive status ranges that count as failures (`failure_status`).
    pub failure_status: StatusRanges,
    /// The health check whose success moves OPEN to HALF_OPEN early.
    pub recover_on_check: Option<String>,
    calls: [Counter; 3],
    /// Dry-run would-be rejections happen at request rate: one log line a second at most.
    dry_run_log: crate::telemetry::throttle::LogThrottle,
}

impl GuardedBreaker {
    pub fn new(
        name: Arc<str>,
        policy: super::breaker::BreakerPolicy,
        failure_status: StatusRanges,
        recover_on_check: Option<String>,
        metrics: &ResilienceMetrics,
        on_transition: TransitionHook,
    ) -> Self {
        let states: [Gauge; 3] = State::METRIC_LABELS.map(|state| {
            metrics
                .breaker_state
                .get_or_create(&BreakerStateLabels {
                    breaker: name.clone(),
                    state,
                })
                .clone()
        });
        // A rebuilt breaker starts closed: clear what an earlier one with this name showed.
        for (g, v) in states.iter().zip([1, 0, 0]) {
            g.set(v);
        }
        let changes = metrics.breaker_state_changes.clone();
        let observer_name = name.clone();
        let observer = move |t: &Transition| {
            let to = t.to.metric_label();
            for (label, g) in State::METRIC_LABELS.iter().zip(&states) {
                g.set(i64::from(*label == to));
            }
            changes
                .get_or_create(&BreakerToLabels {
                    breaker: observer_name.clone(),
                    to,
                })
                .inc();
            on_transition(&observer_name, t);
        };
        let calls = ["success", "failure", "rejected"].map(|result| {
            metrics
                .breaker_calls
                .get_or_create(&BreakerCallLabels {
                    breaker: name.clone(),
                    result,
                })
                .clone()
        });
        Self {
            breaker: Arc::new(Breaker::new(policy, Arc::new(observer), Instant::now())),
            name,
            failure_status,
            recover_on_check,
            calls,
            dry_run_log: crate::telemetry::throttle::LogThrottle::new(Duration::from_secs(1)),
        }
    }

    fn is_failure(&self, status: StatusCode) -> bool {
        self.failure_status.contains(status.as_u16())
    }
}

/// Retries of one upstream: policy, budget and metric handles.
pub struct Retries {
    pub policy: RetryPolicy,
    pub budget: RetryBudget,
    exhausted: Counter,
    /// `upstream_retries_total` per reason the policy can give. A series is created on
    /// the first retry with its reason, as before; later retries take no lock and hash
    /// no labels.
    retried: Vec<(&'static str, std::sync::OnceLock<Counter>)>,
    upstream: Arc<str>,
}

impl Retries {
    pub fn new(policy: RetryPolicy, metrics: &ResilienceMetrics, upstream: &Arc<str>) -> Self {
        Self {
            budget: RetryBudget::new(policy.budget, policy.budget_min_per_second, Instant::now()),
            retried: policy
                .on
                .labels()
                .into_iter()
                .map(|reason| (reason, std::sync::OnceLock::new()))
                .collect(),
            policy,
            exhausted: metrics
                .retry_budget_exhausted
                .get_or_create(&UpstreamLabel {
                    upstream: upstream.clone(),
                })
                .clone(),
            upstream: upstream.clone(),
        }
    }

    /// Counts a retry for `reason` (one of the policy's `on` entries).
    fn count(&self, reason: &'static str, metrics: &ResilienceMetrics) {
        let create = || {
            metrics
                .retries
                .get_or_create(&RetryLabels {
                    upstream: self.upstream.clone(),
                    reason,
                })
                .clone()
        };
        match self.retried.iter().find(|(r, _)| *r == reason) {
            Some((_, counter)) => counter.get_or_init(create).inc(),
            None => create().inc(),
        };
    }
}

/// Sends `req` to `target` under `breaker` and `retries`. `req` carries the client's body
/// as it arrives (`Body::Incoming`); a request that may be retried has its (small) body
/// buffered first and its head kept as sent (see [`Replay`]). The request is changed where
/// it lies and taken only by the connection that sends it: at a few hundred bytes, each
/// move costs.
/// `start` is when the request was first handled; `timeout` is the route's: per attempt
/// (the first counted from `start`), and with `per_try_timeout` also the whole call's,
/// counted from `start`.
pub async fn call(
    target: &Target,
    breaker: Option<&GuardedBreaker>,
    retries: Option<&Retries>,
    metrics: &ResilienceMetrics,
    req: &mut Option<Request<Body>>,
    start: Instant,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let Some(request) = req.as_mut() else {
        unreachable!("a request to call with");
    };
    let retry = match retries {
        Some(r) if r.policy.attempts > 1 && r.policy.allows_method(request.method()) => {
            r.budget.record_request(start);
            Some(r)
        }
        _ => None,
    };
    let body_ends = http_body::Body::is_end_stream(request.body());
    // Only small, complete bodies are buffered for replay; others stream once.
    let retry = match retry {
        Some(r) if body_ends || announced_within(request, r.policy.max_body) => r,
        _ => {
            // Only a body the client still sends can break on its side; a GET's cannot.
            let fault = (!body_ends).then(|| {
                let fault = Arc::new(ClientFault::default());
                if let Body::Incoming(body) = std::mem::replace(request.body_mut(), Body::Empty) {
                    *request.body_mut() = Body::Watched(body, fault.clone());
                }
                fault
            });
            return attempt(
                target,
                breaker,
                req,
                None,
                start,
                start + timeout,
                fault.as_deref(),
            )
            .await
            .0;
        }
    };
    // A client that cannot deliver its (small, announced) body is the client's fault.
    // Each attempt's own timeout starts with it: the first once the body is in (so the
    // upload does not eat it), a retry after its backoff. The whole call's deadline, which
    // applies with `per_try_timeout`, still counts the upload, as it always has.
    let (bytes, mut attempt_start) = match std::mem::replace(request.body_mut(), Body::Empty) {
        Body::Incoming(body) if !body_ends => {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ProxyError::from(classify(&e)))?
                .to_bytes();
            (bytes, Instant::now())
        }
        _ => (bytes::Bytes::new(), start),
    };
    // No body stays no body: the non-retry path sends none either.
    let body = || {
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes.clone()))
        }
    };
    *request.body_mut() = body();
    // The first attempt sends the head itself and keeps it as sent; a retry sends that
    // copy, unless the attempt before left the request unsent (a failed connect), as it was.
    let mut replay = Replay::default();
    let per_try = retry.policy.per_try_timeout;
    let overall_deadline = start + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        // Without a per-try timeout each attempt gets the route's whole timeout.
        let attempt_deadline = match per_try {
            Some(p) => (attempt_start + p).min(overall_deadline),
            None => attempt_start + timeout,
        };
        let (result, kind) = attempt(
            target,
            breaker,
            req,
            Some(&mut replay),
            attempt_start,
            attempt_deadline,
            None,
        )
        .await;
        let Some(kind) = kind else { return result };
        let retry_after = match &result {
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => r
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            _ => None,
        };
        let now = Instant::now();
        let time_left = per_try.map(|_| overall_deadline.saturating_duration_since(now));
        match retry
            .policy
            .decide(attempts, &kind, retry_after, time_left, &retry.budget, now)
        {
            Decision::Retry { reason, delay } => {
                if req.is_none() {
                    let Some(head) = replay.head() else {
                        return result;
                    };
                    *req = Some(Request::from_parts(head, body()));
                }
                retry.count(reason, metrics);
                tracing::debug!(upstream = %target.name, reason, attempt = attempts, "retrying");
                drop(result);
                tokio::time::sleep(delay).await;
                attempt_start = Instant::now();
            }
            Decision::Stop(Stop::BudgetExhausted { .. }) => {
                retry.exhausted.inc();
                return result;
            }
            Decision::Stop(_) => return result,
        }
    }
}

/// Whether `req` announces a body of at most `max_body` bytes.
fn announced_within(req: &Request<Body>, max_body: usize) -> bool {
    req.headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len <= max_body as u64)
}

/// One attempt, started at `started`, waiting for response headers until `deadline`.
/// `req` stays with the caller until the connection takes it: a request moves once, into
/// hyper, not through every future on the way (it is over 300 bytes). `keep`, while
/// empty, keeps the head this attempt sends.
/// Returns the result and, when it failed in a way retries may care about, what kind of
/// failure it was (`None`: success, breaker rejection or client fault, final).
async fn attempt(
    target: &Target,
    breaker: Option<&GuardedBreaker>,
    req: &mut Option<Request<Body>>,
    keep: Option<&mut Replay>,
    started: Instant,
    deadline: Instant,
    client_fault: Option<&ClientFault>,
) -> (Result<Response<UpstreamBody>, ProxyError>, Option<Attempt>) {
    let permit = match breaker {
        None => None,
        Some(b) => match b.breaker.try_acquire(started) {
            Ok(p) => {
                if p.would_have_rejected().is_some() {
                    b.calls[2].inc();
                    if let Some(held) = b.dry_run_log.allow() {
                        tracing::info!(breaker = %b.name, more = held, "dry run: breaker would have rejected calls");
                    }
                }
                Some((b, p))
            }
            Err(r) => {
                b.calls[2].inc();
                return (
                    Err(ProxyError::CircuitOpen {
                        retry_after: Duration::from_secs(r.retry_after_secs()),
                    }),
                    None,
                );
            }
        },
    };
    let mut result = target.send(req, deadline, keep).await;
    // The client broke its own body: the upstream did nothing wrong.
    if result.is_err()
        && let Some(f) = client_fault.and_then(ClientFault::get)
    {
        result = Err(f.into());
    }
    if let Some((b, permit)) = permit {
        let outcome = match &result {
            Ok(r) if b.is_failure(r.status()) => Some(Outcome::Failure),
            Ok(_) => Some(Outcome::Success),
            Err(e) if e.fault() == Fault::Upstream => Some(Outcome::Failure),
            // Not the upstream's doing: the permit drops as "neither".
            Err(_) => None,
        };
        if let Some(outcome) = outcome {
            b.calls[usize::from(outcome == Outcome::Failure)].inc();
            permit.record(Instant::now(), outcome);
        }
    }
    let retryable = match &result {
        Ok(r)
            if r.status().is_success()
                || r.status().is_redirection()
                || r.status().is_informational() =>
        {
            None
        }
        Ok(r) => Some(Attempt::Status(r.status())),
        Err(e) => e.retry_condition(),
    };
    (result, retryable)
}
