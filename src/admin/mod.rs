//! The admin listener: the ops API of SPEC §6 (status, maintenance, breakers, reload,
//! drain, config, events) plus `/metrics` and `/_health/*`. Loopback by default.

mod events;
mod page;
mod reload;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use arc_swap::ArcSwap;

use crate::endpoints::{Local, method_not_allowed};
use crate::health::Health;
use crate::ops::{FleetControl, Maintenance};
use crate::proxy::body::BoxError;
use crate::proxy::listener::{Limits, http_builder, stopped};
use crate::proxy::respond::json as json_response;
use crate::proxy::{Body, Runtime};
use crate::shutdown::Drain;
use crate::telemetry::events::Events;

pub use reload::{Reload, ReloadOutcome, ReloadStatus};

/// Largest request body the admin API reads (maintenance reason, token).
const MAX_BODY: usize = 64 * 1024;
pub const SESSION_COOKIE: &str = "opsgate_session";

/// What the admin API reads and the actions it may take; the app builds it.
pub struct Admin<R> {
    /// The proxy's snapshot: config (token, paths), breakers, limiters.
    pub live: Arc<ArcSwap<Runtime>>,
    /// `/metrics` and `/_health/*`, answered as on the proxy port.
    pub local: Arc<Local>,
    pub health: Health,
    pub maintenance: Maintenance,
    /// Replaced by reloads that change `[control]`; read here for its status only.
    pub fleet: Arc<Mutex<Option<FleetControl>>>,
    pub drain: Arc<Drain>,
    pub events: Arc<Events>,
    pub reload: R,
    pub started: Instant,
    /// Mixed into session cookies; new at every start.
    pub session_secret: [u8; 32],
}

pub async fn serve<R: Reload>(
    listener: TcpListener,
    admin: Arc<Admin<R>>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    // The proxy port's limits: a client that trickles its headers is cut off here too.
    let builder = http_builder(limits);
    loop {
        let (stream, _) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (admin, builder) = (admin.clone(), builder.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn ok_json(v: &Value) -> Response<Body> {
    json_response(StatusCode::OK, Bytes::from(v.to_string()))
}

fn error(status: StatusCode, detail: &str) -> Response<Body> {
    json_response(status, Bytes::from(json!({ "detail": detail }).to_string()))
}

/// Answers one admin request.
pub async fn handle<R, B>(admin: &Arc<Admin<R>>, req: Request<B>) -> Response<Body>
where
    R: Reload,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let local = &admin.local;
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let metrics_path = admin.live.load().config.file.metrics.path.clone();
    if path == metrics_path || path == "/metrics" {
        let (parts, _) = req.into_parts();
        return local.metrics_response(&parts);
    }
    let health_prefix = admin.live.load().health_prefix.clone();
    if crate::paths::segment_prefix(&path, &health_prefix) {
        let sub = path[health_prefix.len()..].to_owned();
        return local.health_response(req, &sub, true);
    }
    match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, "/_ops/" | "/_ops") => {
            return crate::endpoints::strip_body_for_head(page::shell(), method == Method::HEAD);
        }
        (&Method::POST, "/_ops/session") => return session(admin, req).await,
        _ => {}
    }
    if !path.starts_with("/_ops/") {
        return error(StatusCode::NOT_FOUND, "not found");
    }
    if !authorized(admin, req.headers()) {
        let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized");
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"opsgate\""),
        );
        return resp;
    }
    match (method, path.as_str()) {
        (Method::GET, "/_ops/status") => ok_json(&status_json(admin)),
        (Method::GET, "/_ops/maintenance") => ok_json(&maintenance_json(admin)),
        (Method::PUT, "/_ops/maintenance") => put_maintenance(admin, req).await,
        (Method::GET, "/_ops/breakers") => ok_json(&json!({ "breakers": breakers_json(admin) })),
        (Method::POST, "/_ops/reload") => match admin.reload.reload().await {
            ReloadOutcome::Applied { warnings } => {
                ok_json(&json!({"result": "success", "warnings": warnings}))
            }
            ReloadOutcome::Failed(e) => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                Bytes::from(json!({"result": "failure", "error": e}).to_string()),
            ),
        },
        (Method::POST, "/_ops/drain") => {
            if admin.drain.start() {
                admin.events.emit("drain", json!({"phase": "started"}));
                tracing::info!("drain started by the admin API: readiness is now 503");
            }
            ok_json(&json!({"draining": true}))
        }
        (Method::GET, "/_ops/config") => ok_json(&admin.live.load().config.redacted_json()),
        (Method::GET, "/_ops/events") => events::stream(admin.clone(), req.headers()),
        (Method::POST, p) if p.starts_with("/_ops/breakers/") => {
            breaker_action(admin, &p["/_ops/breakers/".len()..])
        }
        (
            _,
            "/_ops/status" | "/_ops/maintenance" | "/_ops/breakers" | "/_ops/reload"
            | "/_ops/drain" | "/_ops/config" | "/_ops/events",
        ) => method_not_allowed(),
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The session cookie carries a digest of the token and a secret drawn at startup, never
/// the token itself: a leaked cookie dies with the process and says nothing about the token.
fn session_value<R>(admin: &Admin<R>, token: &str) -> String {
    let mut input = Vec::with_capacity(32 + token.len());
    input.extend_from_slice(&admin.session_secret);
    input.extend_from_slice(token.as_bytes());
    crate::config::sha256_hex(&input)
}

fn authorized<R>(admin: &Admin<R>, headers: &http::HeaderMap) -> bool {
    let token = admin.live.load().config.file.admin.token.clone();
    if token.is_empty() {
        return true;
    }
    let want = crate::config::sha256_hex(token.as_bytes());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| crate::config::sha256_hex(t.trim().as_bytes()));
    // Digests make both sides the same length, so the comparison time says nothing.
    if bearer.is_some_and(|b| crate::ops::gate::constant_time_eq(b.as_bytes(), want.as_bytes())) {
        return true;
    }
    let session = session_value(admin, &token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| {
            kv.trim()
                .strip_prefix(SESSION_COOKIE)
                .and_then(|r| r.strip_prefix('='))
        })
        .any(|v| crate::ops::gate::constant_time_eq(v.as_bytes(), session.as_bytes()))
}

async fn read_body<B>(req: Request<B>) -> Result<Bytes, Response<Body>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))
}

async fn session<R, B>(admin: &Admin<R>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let token = admin.live.load().config.file.admin.token.clone();
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    if token.is_empty() {
        return resp;
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let given = crate::config::sha256_hex(String::from_utf8_lossy(&body).trim().as_bytes());
    let want = crate::config::sha256_hex(token.as_bytes());
    if !crate::ops::gate::constant_time_eq(given.as_bytes(), want.as_bytes()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/_ops; HttpOnly; SameSite=Strict",
        session_value(admin, &token)
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

pub fn maintenance_json<R>(admin: &Admin<R>) -> Value {
    let mut v = serde_json::to_value(admin.maintenance.status()).unwrap_or(Value::Null);
    if let Some(fleet) = admin
        .fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        v["fleet"] = serde_json::to_value(fleet.status()).unwrap_or(Value::Null);
    }
    v
}

async fn put_maintenance<R, B>(admin: &Admin<R>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Put {
        /// Required: `null` clears the override, so a missing key must not mean the same.
        #[serde(deserialize_with = "present")]
        enabled: Option<bool>,
        #[serde(default)]
        reason: Option<String>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    let put: Put = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"enabled\": true|false|null, \"reason\": text}}: {e}"),
            );
        }
    };
    tracing::info!(enabled = ?put.enabled, reason = put.reason.as_deref(), "maintenance override set by the admin API");
    admin.maintenance.set_override(put.enabled, put.reason);
    ok_json(&maintenance_json(admin))
}

pub fn breakers_json<R>(admin: &Admin<R>) -> Vec<Value> {
    let rt = admin.live.load_full();
    let now = tokio::time::Instant::now();
    rt.breakers()
        .into_iter()
        .map(|b| {
            let s = b.breaker.snapshot(now);
            json!({
                "name": &*b.name,
                "state": s.state.as_str(),
                "reason": s.reason.map(|r| r.as_str()),
                "remaining_timeout_s": s.remaining_timeout_s,
                "total_calls": s.total_calls,
                "successful_calls": s.successful_calls,
                "failed_calls": s.failed_calls,
                "rejected_calls": s.rejected_calls,
                "state_changes": s.state_changes,
                "dry_run": s.dry_run,
            })
        })
        .collect()
}

fn breaker_action<R>(admin: &Admin<R>, rest: &str) -> Response<Body> {
    let Some((name, action)) = rest.rsplit_once('/') else {
        return error(StatusCode::NOT_FOUND, "not found");
    };
    let name = percent_decode(name);
    let rt = admin.live.load_full();
    let Some(b) = rt.breaker(&name) else {
        return error(StatusCode::NOT_FOUND, "no such breaker");
    };
    let now = tokio::time::Instant::now();
    match action {
        "reset" => b.breaker.reset(now),
        "open" => b.breaker.force_open(now),
        "close" => b.breaker.disable(now),
        _ => return error(StatusCode::NOT_FOUND, "not found"),
    }
    tracing::info!(breaker = %name, action, "breaker changed by the admin API");
    let list = breakers_json(admin);
    let one = list
        .into_iter()
        .find(|v| v["name"] == name.as_str())
        .unwrap_or(Value::Null);
    ok_json(&one)
}

pub fn status_json<R: Reload>(admin: &Admin<R>) -> Value {
    let rt = admin.live.load_full();
    let snap = admin.health.snapshot();
    let view = crate::health::render::View {
        admin: true,
        ..Default::default()
    };
    let readiness = crate::health::render::Readiness {
        draining: admin.drain.is_draining(),
        maintenance_fail: admin.maintenance.is_on() && rt.maintenance.fail_readiness,
    };
    let reload = admin.reload.last();
    let (mut requests, mut errors, mut in_flight) = (0u64, 0u64, 0i64);
    for m in rt
        .ingress
        .iter()
        .chain(rt.egress.iter())
        .flat_map(|r| r.metrics.iter())
    {
        let (t, e) = m.totals();
        requests += t;
        errors += e;
        in_flight += m.active.load(std::sync::atomic::Ordering::Relaxed);
    }
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": admin.started.elapsed().as_secs_f64(),
        "config": {
            "path": rt.config.path.as_ref().map(|p| p.display().to_string()),
            "sha256": rt.config.sha256,
            "last_reload": &*reload,
        },
        "maintenance": maintenance_json(admin),
        "breakers": breakers_json(admin),
        "health": crate::health::render::ready_json(&snap, readiness, view),
        "draining": admin.drain.is_draining(),
        "traffic": {"requests_total": requests, "errors_5xx_total": errors, "in_flight": in_flight},
        "limits": limits_json(&rt),
    })
}

/// `limits` (SPEC §11): upstreams with adaptive concurrency, routes with a rate limit.
fn limits_json(rt: &crate::proxy::Runtime) -> Value {
    let mut upstreams = serde_json::Map::new();
    let mut names: Vec<_> = rt.upstreams.keys().collect();
    names.sort();
    for name in names {
        if let Some((limiter, _)) = &rt.upstreams[name].adaptive {
            upstreams.insert(
                name.clone(),
                json!({
                    "adaptive_limit": limiter.limit(),
                    "in_flight": limiter.in_flight(),
                    "dry_run": limiter.dry_run(),
                }),
            );
        }
    }
    let mut routes = serde_json::Map::new();
    for route in rt.ingress.iter().chain(rt.egress.iter()) {
        if let Some(rl) = &route.rate_limit {
            let l = &rl.limiter;
            routes.insert(
                route.name.to_string(),
                json!({
                    "scope": if l.is_fleet() { "fleet" } else { "local" },
                    "key": l.key().describe(),
                    "fallback": l.fallback(),
                }),
            );
        }
    }
    json!({"upstreams": upstreams, "routes": routes})
}

/// Decodes `%XX` escapes; invalid escapes are kept as written.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests;
