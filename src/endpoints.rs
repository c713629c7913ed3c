//! Endpoints opsgate answers itself: `/_health/*` and `/metrics`, on the proxy and admin ports.
//! Reads the health cache and the metrics registry; never touches a dependency.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::proxy::Body;
use crate::proxy::respond::json;
use crate::shutdown::Drain;
use crate::telemetry::MetricsRegistry;

pub struct Local {
    pub metrics: Arc<MetricsRegistry>,
    pub drain: Arc<Drain>,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Local {
    pub fn metrics_response(&self, parts: &http::request::Parts) -> Response<Body> {
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            return method_not_allowed();
        }
        let wants_om = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/openmetrics-text"));
        let (text, ctype) = if wants_om {
            (self.metrics.encode_openmetrics(), OPENMETRICS)
        } else {
            (self.metrics.encode_prometheus(), PROMETHEUS)
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

    pub fn health_response(&self, req: Request<Incoming>, sub: &str) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return method_not_allowed();
        }
        let resp = match sub {
            "/live" => json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#)),
            "/ready" if self.drain.is_draining() => json(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(br#"{"status":"unhealthy","reason":"draining","checks":[]}"#),
            ),
            "/ready" | "/startup" => json(
                StatusCode::OK,
                Bytes::from_static(br#"{"status":"healthy","checks":[]}"#),
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                Bytes::from_static(br#"{"detail":"not found"}"#),
            ),
        };
        strip_body_for_head(resp, head)
    }
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
        self.health_response(req, sub)
    }
    fn metrics(&self, parts: &http::request::Parts) -> Response<Body> {
        self.metrics_response(parts)
    }
}
