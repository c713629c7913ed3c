//! Per-request observation: metrics and one access-log line, recorded when the response
//! body is finished (or dropped), so a streamed 1 GiB download is timed to its last byte.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Uri};
use http_body::{Frame, SizeHint};

use super::body::{Body, BoxError};
use super::respond::{CLIENT_CLOSED, ProxyError};
use crate::telemetry::RouteMetrics;
use crate::telemetry::access::{AccessLog, Entry, Names, RouteNames};
use crate::telemetry::metrics::method_index;

/// What the access log line needs; everything is a cheap clone of request data.
pub struct Record {
    pub start: Instant,
    pub metrics: Arc<RouteMetrics>,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    /// The client's IP as text.
    pub client: HeaderValue,
    pub request_id: Option<HeaderValue>,
    /// The route's and upstream's names, for routed requests.
    pub names: Option<Arc<RouteNames>>,
    /// Why opsgate answered itself, when it did.
    pub error: Option<&'static str>,
    /// Where the access line goes; `None`: no line (access log off, or a reserved path).
    pub access_log: Option<Arc<AccessLog>>,
    pub bytes: u64,
    /// The bulkhead slot, released with the record when the response is done.
    pub permit: Option<super::admission::BulkheadPermit>,
    /// Set by `close`, so `drop` reuses the caller's clock read instead of reading again.
    end: Option<Instant>,
}

impl Record {
    pub fn begin(
        start: Instant,
        metrics: Arc<RouteMetrics>,
        method: Method,
        uri: Uri,
        client: HeaderValue,
        access_log: Option<Arc<AccessLog>>,
    ) -> Self {
        metrics.start();
        Self {
            start,
            metrics,
            method,
            uri,
            status: 0,
            client,
            request_id: None,
            names: None,
            error: None,
            access_log,
            bytes: 0,
            permit: None,
            end: None,
        }
    }

    /// Ends the request at `end`: dropping the record writes its metrics and access line.
    fn close(mut self: Box<Self>, end: Instant) {
        self.end = Some(end);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // Dropped before any answer was decided: the client went away while we waited.
        if self.status == 0 {
            self.status = CLIENT_CLOSED;
            self.error = self.error.or(Some(ProxyError::ClientAbort.label()));
        }
        let elapsed = match self.end {
            Some(end) => end.saturating_duration_since(self.start),
            None => self.start.elapsed(),
        };
        self.metrics.finish(
            method_index(&self.method),
            self.status,
            elapsed.as_secs_f64(),
        );
        if let Some(log) = &self.access_log {
            log.write(&Entry {
                method: self.method.as_str(),
                path: self.uri.path(),
                status: self.status,
                duration: elapsed,
                bytes: self.bytes,
                names: match &self.names {
                    Some(n) => Names::Route(n),
                    None => Names::Unrouted(self.metrics.route()),
                },
                client: self.client.as_bytes(),
                request_id: self.request_id.as_ref().map(|v| v.as_bytes()),
                error: self.error,
            });
        }
    }
}

/// The response body with its record riding along until the last frame.
pub struct ObservedBody {
    inner: Body,
    record: Option<Box<Record>>,
    /// Keeps the connection counted busy until the response is done.
    in_flight: Option<super::listener::InFlight>,
}

impl ObservedBody {
    pub fn new(inner: Body, record: Option<Box<Record>>) -> Self {
        Self {
            inner,
            record,
            in_flight: None,
        }
    }

    pub fn set_in_flight(&mut self, f: super::listener::InFlight) {
        self.in_flight = Some(f);
    }

    /// Ends the record and the in-flight span with one clock read between them.
    fn finish(&mut self) {
        if self.record.is_none() && self.in_flight.is_none() {
            return;
        }
        let end = Instant::now();
        if let Some(r) = self.record.take() {
            r.close(end);
        }
        if let Some(f) = self.in_flight.take() {
            f.close(end);
        }
    }
}

/// hyper drops a body it knows is complete without polling it to the end.
impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(r), Some(d)) = (this.record.as_mut(), frame.data_ref()) {
                    r.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut r) = this.record.take() {
                    r.error = Some("response_body_error");
                    r.close(Instant::now());
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
