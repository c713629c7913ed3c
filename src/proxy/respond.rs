//! Every response opsgate answers with itself: errors (one type, with whose fault and
//! whether a retry may follow), a route's fallback and the maintenance refusal. Error
//! bodies are static JSON, so an error answer allocates nothing but its headers.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{Body, BodyFault};
use super::headers::X_OPSGATE_CIRCUIT;
use super::retry::Attempt;
use super::route::Fallback;
use crate::ops::{MaintenanceBody, MaintenanceReject};

/// What the access log and metrics say when the client left before its answer (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// Why opsgate answered instead of the upstream. Carries what the response needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    NoRoute,
    BadPath,
    NotFound,
    Starting {
        retry_after: Duration,
    },
    CircuitForced,
    CircuitOpen {
        retry_after: Duration,
    },
    Overloaded,
    RateLimited {
        retry_after: Duration,
    },
    UpstreamConnect,
    UpstreamReset,
    UpstreamTimeout,
    /// The client's request body was malformed (bad chunk framing) or, buffered for
    /// replay, broke off.
    BadRequestBody,
    /// The client hung up or reset its stream in the middle of its request body. Nobody is
    /// left to answer: logged as 499, and the 400 body reaches a half-closed client only.
    ClientAbort,
}

/// Whose failure an error is: what the breaker may count and who a retry could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something opsgate cannot serve, or left.
    Client,
    /// The upstream could not be reached or did not answer in time.
    Upstream,
    /// opsgate declined on its own: not ready yet, or a protection refused the call.
    Proxy,
}

impl From<BodyFault> for ProxyError {
    fn from(f: BodyFault) -> Self {
        match f {
            BodyFault::Malformed => ProxyError::BadRequestBody,
            BodyFault::Aborted => ProxyError::ClientAbort,
        }
    }
}

impl ProxyError {
    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::NoRoute
            | ProxyError::BadPath
            | ProxyError::NotFound
            | ProxyError::BadRequestBody
            | ProxyError::ClientAbort => Fault::Client,
            ProxyError::UpstreamConnect
            | ProxyError::UpstreamReset
            | ProxyError::UpstreamTimeout => Fault::Upstream,
            ProxyError::Starting { .. }
            | ProxyError::CircuitForced
            | ProxyError::CircuitOpen { .. }
            | ProxyError::Overloaded
            | ProxyError::RateLimited { .. } => Fault::Proxy,
        }
    }

    /// The `retry.on` condition this failure meets. `None`: sending again cannot help
    /// (the client broke its side, or opsgate itself refused), whatever the policy says.
    pub fn retry_condition(&self) -> Option<Attempt> {
        match self {
            ProxyError::UpstreamConnect => Some(Attempt::ConnectFailure),
            ProxyError::UpstreamTimeout => Some(Attempt::Timeout),
            ProxyError::UpstreamReset => Some(Attempt::Reset),
            _ => None,
        }
    }

    /// The status the access log and metrics record when `sent` answered this error: a
    /// client that left gets nothing, and is recorded as nginx's 499.
    pub fn logged_status(&self, sent: StatusCode) -> u16 {
        match self {
            ProxyError::ClientAbort => CLIENT_CLOSED,
            _ => sent.as_u16(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute | ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::BadPath | ProxyError::BadRequestBody | ProxyError::ClientAbort => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Starting { .. }
            | ProxyError::CircuitForced
            | ProxyError::CircuitOpen { .. }
            | ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpstreamConnect | ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable name for logs.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadPath => "bad_path",
            ProxyError::NotFound => "not_found",
            ProxyError::Starting { .. } => "starting",
            ProxyError::CircuitForced => "circuit_forced_open",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::Overloaded => "overloaded",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::UpstreamConnect => "upstream_connect",
            ProxyError::UpstreamReset => "upstream_reset",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::BadRequestBody => "bad_request_body",
            ProxyError::ClientAbort => "client_abort",
        }
    }

    fn body(&self) -> &'static [u8] {
        match self {
            ProxyError::NoRoute => br#"{"detail":"no route"}"#,
            ProxyError::BadPath => br#"{"detail":"bad path"}"#,
            ProxyError::NotFound => br#"{"detail":"not found"}"#,
            ProxyError::Starting { .. } => br#"{"detail":"starting"}"#,
            ProxyError::CircuitForced | ProxyError::CircuitOpen { .. } => {
                br#"{"detail":"circuit open"}"#
            }
            ProxyError::Overloaded => br#"{"detail":"overloaded"}"#,
            ProxyError::RateLimited { .. } => br#"{"detail":"rate limited"}"#,
            ProxyError::UpstreamConnect | ProxyError::UpstreamReset => {
                br#"{"detail":"upstream unavailable"}"#
            }
            ProxyError::UpstreamTimeout => br#"{"detail":"upstream timeout"}"#,
            ProxyError::BadRequestBody | ProxyError::ClientAbort => {
                br#"{"detail":"bad request body"}"#
            }
        }
    }

    /// Whether a route's fallback answer replaces this one (SPEC §4: breaker open or bulkhead full).
    fn takes_fallback(&self) -> bool {
        matches!(
            self,
            ProxyError::CircuitForced | ProxyError::CircuitOpen { .. } | ProxyError::Overloaded
        )
    }

    /// The answer for this error on a route with `fallback`: the fallback when it replaces
    /// this error, else the error's own.
    pub fn respond(&self, fallback: Option<&Fallback>) -> Response<Body> {
        match fallback {
            Some(fb) if self.takes_fallback() => {
                let mut r = Response::new(Body::Full(Some(fb.body.clone())));
                *r.status_mut() = fb.status;
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, fb.content_type.clone());
                r
            }
            _ => self.clone().into_response(),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = json(self.status(), Bytes::from_static(self.body()));
        let h = resp.headers_mut();
        match self {
            ProxyError::CircuitOpen { retry_after } => {
                h.insert(header::RETRY_AFTER, retry_after_value(retry_after));
                h.insert(X_OPSGATE_CIRCUIT.clone(), HeaderValue::from_static("open"));
            }
            ProxyError::Starting { retry_after } | ProxyError::RateLimited { retry_after } => {
                h.insert(header::RETRY_AFTER, retry_after_value(retry_after));
            }
            _ => {}
        }
        resp
    }
}

/// The maintenance gate's refusal: its page or configured body, and when to come back.
pub fn maintenance(r: MaintenanceReject) -> Response<Body> {
    let (ctype, body) = match r.body {
        MaintenanceBody::Page(b) => (HeaderValue::from_static("text/html; charset=utf-8"), b),
        MaintenanceBody::Body { content_type, body } => (content_type, body),
    };
    let mut resp = Response::new(Body::Full(Some(body)));
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(header::CONTENT_TYPE, ctype);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, retry_after_header(r.retry_after_secs));
    resp
}

/// `Retry-After: secs`, for every answer that carries one. Within a burst of rejections
/// the value rarely changes (a configured `retry_after`, a window's end or an open
/// breaker's recovery counting down a second at a time, a rate limit's refill), so each
/// thread keeps the last one and clones it instead of formatting and allocating one per
/// answer.
fn retry_after_header(secs: u64) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((s, v)) if *s == secs => v.clone(),
        _ => {
            let v = HeaderValue::from(secs);
            *last = Some((secs, v.clone()));
            v
        }
    })
}

pub fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Body::Full(Some(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Whole seconds, rounded up, at least 1 (a `Retry-After: 0` invites a hot loop).
pub fn retry_after_value(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    retry_after_header(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_retry_after_follows_the_seconds_asked_for() {
        for secs in [120, 120, 7, 120, 0, u64::MAX] {
            assert_eq!(retry_after_header(secs).to_str().unwrap(), secs.to_string());
        }
        // Rejections of other kinds share the kept value, rounding their own way.
        assert_eq!(retry_after_value(Duration::from_millis(119_001)), "120");
        assert_eq!(retry_after_header(0), "0");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_value(Duration::from_secs(3)), "3");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }

    #[test]
    fn circuit_open_has_headers() {
        let r = ProxyError::CircuitOpen {
            retry_after: Duration::from_millis(200),
        }
        .into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["x-opsgate-circuit"], "open");
    }

    #[test]
    fn fallback_replaces_only_protection_refusals() {
        let fb = Fallback {
            status: StatusCode::OK,
            content_type: HeaderValue::from_static("text/plain"),
            body: Bytes::from_static(b"cached"),
        };
        let r = ProxyError::Overloaded.respond(Some(&fb));
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(r.headers().len(), 1);
        let r = ProxyError::UpstreamTimeout.respond(Some(&fb));
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[test]
    fn only_upstream_failures_are_retryable() {
        let all = [
            ProxyError::NoRoute,
            ProxyError::BadPath,
            ProxyError::NotFound,
            ProxyError::Starting {
                retry_after: Duration::ZERO,
            },
            ProxyError::CircuitForced,
            ProxyError::CircuitOpen {
                retry_after: Duration::ZERO,
            },
            ProxyError::Overloaded,
            ProxyError::RateLimited {
                retry_after: Duration::ZERO,
            },
            ProxyError::UpstreamConnect,
            ProxyError::UpstreamReset,
            ProxyError::UpstreamTimeout,
            ProxyError::BadRequestBody,
            ProxyError::ClientAbort,
        ];
        for e in all {
            assert_eq!(
                e.retry_condition().is_some(),
                e.fault() == Fault::Upstream,
                "{e:?}"
            );
        }
        assert_eq!(ProxyError::from(BodyFault::Aborted).fault(), Fault::Client);
    }
}
