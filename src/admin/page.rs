//! `GET /_ops/`: the status page shell. It holds no data; the page asks the API (and for
//! the token when the API answers 401), then follows `/_ops/events`.

use http::Response;
use http::header::{self, HeaderValue};

use crate::proxy::Body;

const PAGE: &str = include_str!("page.html");

pub fn shell() -> Response<Body> {
    let mut resp = Response::new(Body::full(PAGE));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
        ),
    );
    resp
}
