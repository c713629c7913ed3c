//! `GET /_ops/events`: server-sent events. A `status` event at once and after every
//! change, typed events as they happen, `Last-Event-ID` resumes from recent history.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response};
use http_body::Frame;
use http_body_util::StreamBody;
use tokio::sync::broadcast::error::RecvError;

use crate::app::Shared;
use crate::health::render::sse_frame;
use crate::proxy::Body;
use crate::proxy::body::BoxError;

/// With no event for this long a fresh `status` goes out anyway: counters and latencies
/// change without transitions, and the regular frame keeps idle proxies from closing.
const STATUS_EVERY: Duration = Duration::from_secs(5);

pub fn stream(shared: Arc<Shared>, headers: &HeaderMap) -> Response<Body> {
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (missed, rx) = shared.events.subscribe(last_id);
    let mut initial: Vec<Bytes> = missed
        .iter()
        .map(|e| sse_frame(Some(&e.id.to_string()), e.kind, &e.data))
        .collect();
    initial.push(status_frame(&shared));
    let state = (shared, rx, initial.into_iter());
    let s = futures_util::stream::unfold(state, |(shared, mut rx, mut pending)| async move {
        if let Some(frame) = pending.next() {
            return Some((Ok::<_, BoxError>(Frame::data(frame)), (shared, rx, pending)));
        }
        let frames = match tokio::time::timeout(STATUS_EVERY, rx.recv()).await {
            Err(_) => vec![status_frame(&shared)],
            Ok(Ok(e)) => vec![
                sse_frame(Some(&e.id.to_string()), e.kind, &e.data),
                status_frame(&shared),
            ],
            // Fell behind: skip to the present; the fresh status carries the whole picture.
            Ok(Err(RecvError::Lagged(_))) => vec![status_frame(&shared)],
            Ok(Err(RecvError::Closed)) => return None,
        };
        let mut pending = frames.into_iter();
        let first = pending.next()?;
        Some((Ok(Frame::data(first)), (shared, rx, pending)))
    });
    let mut resp = Response::new(Body::boxed(StreamBody::new(s)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn status_frame(shared: &Shared) -> Bytes {
    let mut v = super::status_json(shared);
    v["type"] = "status".into();
    v["at"] = crate::telemetry::events::now_rfc3339().into();
    sse_frame(
        Some(&shared.events.last_id().to_string()),
        "status",
        &v.to_string(),
    )
}
