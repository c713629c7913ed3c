//! Endpoints opsgate answers itself: `/_health/*` and `/metrics`, on the proxy and admin ports.
//! Reads the health cache and the metrics registry; never touches a dependency.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use hyper::body::Incoming;

use arc_swap::ArcSwap;

use crate::health::Health;
use crate::health::render::{self, Format, Readiness, Rendered, View};
use crate::ops::Maintenance;
use crate::proxy::body::BoxError;
use crate::proxy::respond::json;
use crate::proxy::{Body, Runtime};
use crate::shutdown::Drain;
use crate::telemetry::MetricsRegistry;

/// What the endpoints read: the live runtime (config and maintenance settings), the
/// metrics registry, the health cache, and the two switches that fail readiness.
#[derive(Clone)]
pub struct Handles {
    pub live: Arc<ArcSwap<Runtime>>,
    pub metrics: Arc<MetricsRegistry>,
    pub health: Health,
    pub maintenance: Maintenance,
    pub drain: Arc<Drain>,
}

pub struct Local {
    handles: Handles,
    /// The last ready body rendered, with what it was rendered from. Probes arrive far
    /// more often than checks change, and 200 checks take ~100 µs to render; held only
    /// to compare and clone, never across an await.
    ready_cache: std::sync::Mutex<Option<ReadyCache>>,
}

struct ReadyCache {
    snapshot: Arc<crate::health::Snapshot>,
    readiness: Readiness,
    view: View,
    rendered: Rendered,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Local {
    pub fn new(handles: Handles) -> Self {
        Self {
            handles,
            ready_cache: std::sync::Mutex::new(None),
        }
    }

    pub fn metrics_response(&self, parts: &http::request::Parts) -> Response<Body> {
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            return method_not_allowed();
        }
        let wants_om = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/openmetrics-text"));
        let m = &self.handles.metrics;
        let (text, ctype) = if wants_om {
            (m.encode_openmetrics(), OPENMETRICS)
        } else {
            (m.encode_prometheus(), PROMETHEUS)
        };
        let mut resp = Response::new(if parts.method == Method::HEAD {
            Body::Empty
        } else {
            Body::full(text)
        });
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        resp
    }

    pub fn readiness(&self) -> Readiness {
        let m = &self.handles.maintenance;
        Readiness {
            draining: self.handles.drain.is_draining(),
            maintenance_fail: m.is_on() && self.handles.live.load().maintenance.fail_readiness,
        }
    }

    fn view(&self, accept: Option<&HeaderValue>, admin: bool) -> View {
        View {
            format: Format::from_accept(accept.and_then(|v| v.to_str().ok())),
            details: details(&self.handles.live.load().config),
            admin,
        }
    }

    fn ready_cached(&self, snapshot: Arc<crate::health::Snapshot>, view: View) -> Rendered {
        let readiness = self.readiness();
        let mut cache = self.ready_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| {
            Arc::ptr_eq(&c.snapshot, &snapshot) && c.readiness == readiness && c.view == view
        }) {
            return c.rendered.clone();
        }
        let rendered = render::ready(&snapshot, readiness, view);
        *cache = Some(ReadyCache {
            snapshot,
            readiness,
            view,
            rendered: rendered.clone(),
        });
        rendered
    }

    /// `sub` is the path after the health prefix, e.g. `/ready`.
    pub fn health_response<B>(&self, req: Request<B>, sub: &str, admin: bool) -> Response<Body> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return method_not_allowed();
        }
        let head = req.method() == Method::HEAD;
        let view = self.view(req.headers().get(header::ACCEPT), admin);
        let snap = self.handles.health.snapshot();
        let rendered = match sub {
            "/live" => render::live(),
            "/ready" => self.ready_cached(snap, view),
            "/startup" => render::startup(&snap, view),
            "/stream" => return self.stream(req.uri().query(), view, head),
            _ => match sub.strip_prefix("/checks/") {
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    render::check(&snap, name, view)
                }
                _ => render::not_found(),
            },
        };
        strip_body_for_head(from_rendered(rendered), head)
    }

    /// `/_health/stream`: the ready body at once, then on every change and every interval.
    fn stream(&self, query: Option<&str>, view: View, head: bool) -> Response<Body> {
        let interval = match render::stream_interval(query) {
            Ok(i) => i,
            Err(msg) => {
                let body = serde_json::json!({ "detail": msg }).to_string();
                return json(StatusCode::BAD_REQUEST, Bytes::from(body));
            }
        };
        let mut resp = Response::new(if head {
            Body::Empty
        } else {
            Body::boxed(self.ready_events(interval, view))
        });
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    fn ready_events(
        &self,
        interval: Duration,
        view: View,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + use<>> {
        let local = Local::new(self.handles.clone());
        // Any of health, maintenance or draining changing alters the ready body.
        let health = self.handles.health.subscribe();
        let mut maintenance = self.handles.maintenance.subscribe();
        maintenance.mark_unchanged();
        let mut drain = self.handles.drain.subscribe();
        drain.mark_unchanged();
        let watches = (health, maintenance, drain);
        let state = (local, watches, true, tokio::time::interval(interval));
        let stream = futures_util::stream::unfold(
            state,
            move |(local, mut w, first, mut tick)| async move {
                if first {
                    tick.reset();
                } else {
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = w.0.changed() => { r.ok()?; }
                        r = w.1.changed() => { r.ok()?; }
                        r = w.2.changed() => { r.ok()?; }
                    }
                }
                let body =
                    render::ready(&local.handles.health.snapshot(), local.readiness(), view).body;
                let text = std::str::from_utf8(&body).unwrap_or("{}");
                let frame = render::sse_frame(None, "health", text);
                Some((Ok(Frame::data(frame)), (local, w, false, tick)))
            },
        );
        StreamBody::new(stream)
    }
}

fn details(c: &crate::config::Config) -> render::Details {
    match c.file.health.details {
        crate::config::Details::Always => render::Details::Always,
        crate::config::Details::OnFailure => render::Details::OnFailure,
        crate::config::Details::Never => render::Details::Never,
    }
}

pub fn from_rendered(r: Rendered) -> Response<Body> {
    let mut resp = Response::new(Body::Full(Some(r.body)));
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(r.content_type),
    );
    resp
}

pub fn strip_body_for_head(resp: Response<Body>, head: bool) -> Response<Body> {
    if !head {
        return resp;
    }
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Body::Empty)
}

pub fn method_not_allowed() -> Response<Body> {
    let mut r = json(
        StatusCode::METHOD_NOT_ALLOWED,
        Bytes::from_static(br#"{"detail":"method not allowed"}"#),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

impl crate::proxy::LocalEndpoints for Local {
    fn health(&self, req: Request<Incoming>, sub: &str) -> Response<Body> {
        self.health_response(req, sub, false)
    }
    fn metrics(&self, parts: &http::request::Parts) -> Response<Body> {
        self.metrics_response(parts)
    }
}
