//! `GET /_ops/events`: server-sent events. A `status` event at once and after every
//! change, typed events as they happen, `Last-Event-ID` resumes from recent history.
//! Every frame, `status` included, carries its own id, and ids only increase on a stream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response};
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::Value;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use super::{Admin, Reload};
use crate::health::render::sse_frame;
use crate::proxy::Body;
use crate::proxy::body::BoxError;
use crate::telemetry::events::{Event, Events, now_rfc3339};

/// With no event for this long a fresh `status` goes out anyway: counters and latencies
/// change without transitions, and the regular frame keeps idle proxies from closing.
pub(super) const STATUS_EVERY: Duration = Duration::from_secs(5);

pub fn stream<R: Reload>(admin: Arc<Admin<R>>, headers: &HeaderMap) -> Response<Body> {
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let events = admin.events.clone();
    let frames = event_frames(events, last_id, move || super::status_json(&admin));
    let mut resp = Response::new(Body::boxed(StreamBody::new(frames)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The frames of one stream: after `last_id` the events still in history, then a `status`
/// (built by `status`), then each event followed by a fresh `status`.
pub fn event_frames(
    events: Arc<Events>,
    last_id: Option<u64>,
    status: impl Fn() -> Value + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static {
    let (missed, rx) = events.subscribe(last_id);
    let mut feed = Feed {
        events,
        rx,
        status,
        pending: VecDeque::new(),
        held: None,
    };
    for e in &missed {
        feed.push_event(e);
    }
    feed.push_status();
    futures_util::stream::unfold(feed, |mut feed| async move {
        let frame = feed.next().await?;
        Some((Ok(Frame::data(frame)), feed))
    })
}

struct Feed<F> {
    events: Arc<Events>,
    rx: broadcast::Receiver<Arc<Event>>,
    status: F,
    /// Frames ready to go out, in id order.
    pending: VecDeque<Bytes>,
    /// An event taken off `rx` while reserving a `status` id, newer than that status: it
    /// goes out after it.
    held: Option<Arc<Event>>,
}

impl<F: Fn() -> Value> Feed<F> {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            let event = match self.held.take() {
                Some(e) => Some(e),
                None => match tokio::time::timeout(STATUS_EVERY, self.rx.recv()).await {
                    Ok(Ok(e)) => Some(e),
                    // Quiet for a while, or fell behind: the fresh status carries the
                    // whole picture.
                    Err(_) | Ok(Err(RecvError::Lagged(_))) => None,
                    Ok(Err(RecvError::Closed)) => return None,
                },
            };
            if let Some(e) = event {
                self.push_event(&e);
            }
            self.push_status();
        }
    }

    fn push_event(&mut self, e: &Event) {
        self.pending
            .push_back(sse_frame(Some(&e.id.to_string()), e.kind, &e.data));
    }

    /// Queues a `status` under an id of its own. Every event with a smaller id was sent
    /// before the id was reserved, so it already waits on `rx`: those go out first, and a
    /// client resuming from this status's id misses nothing and gets nothing twice.
    fn push_status(&mut self) {
        let id = self.events.reserve_id();
        loop {
            match self.rx.try_recv() {
                Ok(e) if e.id < id => self.push_event(&e),
                Ok(e) => {
                    self.held = Some(e);
                    break;
                }
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let mut v = (self.status)();
        v["type"] = "status".into();
        v["at"] = now_rfc3339().into();
        self.pending
            .push_back(sse_frame(Some(&id.to_string()), "status", &v.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use serde_json::json;

    /// `(id, event)` of each frame.
    async fn read(
        frames: &mut (impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Unpin),
        n: usize,
    ) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            let frame = tokio::time::timeout(Duration::from_secs(5), frames.next())
                .await
                .expect("a frame within 5s")
                .expect("stream open")
                .unwrap();
            let data = frame.into_data().unwrap();
            let text = std::str::from_utf8(&data).unwrap();
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {text:?}"))
                    .to_owned()
            };
            out.push((field("id: ").parse().unwrap(), field("event: ")));
        }
        out
    }

    fn status() -> Value {
        json!({"draining": false})
    }

    #[tokio::test]
    async fn the_status_after_a_change_has_an_id_of_its_own() {
        let events = Arc::new(Events::default());
        let mut frames = Box::pin(event_frames(events.clone(), None, status));
        let first = read(&mut frames, 1).await;
        events.emit("drain", json!({"phase": "started"}));
        let after = read(&mut frames, 2).await;
        assert_eq!(after[0].1, "drain");
        assert_eq!(after[1].1, "status");
        assert!(
            first[0].0 < after[0].0 && after[0].0 < after[1].0,
            "ids must increase: {first:?} {after:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ids_increase_and_resuming_neither_skips_nor_repeats() {
        const N: usize = 200;
        let events = Arc::new(Events::default());
        let mut frames = Box::pin(event_frames(events.clone(), None, status));
        // Events arrive while the stream is building its status frames.
        let emitter = {
            let events = events.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    events.emit("check", json!({ "n": i }));
                    if i % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let mut seen = Vec::new();
        while seen.iter().filter(|(_, kind)| kind == "check").count() < N {
            seen.extend(read(&mut frames, 1).await);
        }
        emitter.await.unwrap();
        for pair in seen.windows(2) {
            assert!(pair[0].0 < pair[1].0, "ids must increase: {pair:?}");
        }

        // Resume from a status in the middle: exactly the events sent after it come back.
        let statuses: Vec<u64> = seen
            .iter()
            .filter(|(_, kind)| kind == "status")
            .map(|(id, _)| *id)
            .collect();
        let resume_at = statuses[statuses.len() / 2];
        let want: Vec<u64> = seen
            .iter()
            .filter(|(id, kind)| kind == "check" && *id > resume_at)
            .map(|(id, _)| *id)
            .collect();
        let mut resumed = Box::pin(event_frames(events.clone(), Some(resume_at), status));
        let replay = read(&mut resumed, want.len() + 1).await;
        let (last, replayed) = replay.split_last().unwrap();
        assert_eq!(replayed.iter().map(|(id, _)| *id).collect::<Vec<_>>(), want);
        assert_eq!(
            last.1, "status",
            "a resumed stream ends its replay with a status"
        );
        assert!(last.0 > *want.last().unwrap_or(&resume_at));
    }
}
