//! The request's path through the proxy, stage by stage, in two functions.
//! `admit`, synchronous: normalize -> reserved paths -> route -> gates -> admission ->
//! the upstream request; `forward`, the one that waits: upstream call -> respond.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;

use super::body::Body;
use super::call;
use super::headers::{self, Upgrade, X_REQUEST_ID};
use super::normalize::{Normalized, normalize};
use super::observe::{ObservedBody, Record};
use super::respond::{self, ProxyError};
use super::route::Route;
use super::runtime::Runtime;
use crate::paths::segment_prefix;

/// Endpoints opsgate answers itself on the proxy port. Implemented by the app, which owns
/// health and metrics; the proxy only decides when a path is theirs.
pub trait LocalEndpoints: Send + Sync + 'static {
    /// A request under the health prefix; `sub` is the rest of the normalized path (`/ready`).
    fn health(&self, req: Request<Incoming>, sub: &str) -> Response<Body>;
    fn metrics(&self, req: &http::request::Parts) -> Response<Body>;
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ingress,
    /// The app's outbound calls: egress routes only, no health, metrics or maintenance.
    Egress,
}

#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    /// The peer's IP as text, written once per connection: every request puts it in
    /// X-Forwarded-For and its access line.
    pub peer_text: HeaderValue,
    pub tls: bool,
    pub side: Side,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool, side: Side) -> Self {
        Self {
            peer,
            peer_text: headers::ip_header_value(peer.ip()),
            tls,
            side,
        }
    }
}

/// Process-wide switches the gates read: each is one atomic load per request.
pub struct Gates {
    /// Set while `wait_for_critical` holds traffic at startup.
    pub starting: AtomicBool,
    /// Whether maintenance is on: one atomic load; its settings come from the runtime.
    pub maintenance: crate::ops::Maintenance,
}

/// What the pipeline needs from the rest of the daemon, built once in `app`.
pub struct Proxy {
    /// One snapshot per request; a reload swaps it whole.
    pub live: Arc<ArcSwap<Runtime>>,
    pub local: Arc<dyn LocalEndpoints>,
    pub gates: Arc<Gates>,
    pub resilience: crate::telemetry::metrics::ResilienceMetrics,
}

/// How long a client is asked to wait while critical checks hold traffic at startup.
const STARTING_RETRY_AFTER: Duration = Duration::from_secs(5);

/// What the synchronous stages made of a request.
// An answer goes to hyper as it is: boxing it would add an allocation to every rejection.
#[allow(clippy::large_enum_variant)]
pub enum Admitted {
    /// Answered without the upstream: a probe, a scrape, a rejection, a bad path.
    Answered(Response<ObservedBody>),
    /// Cleared for the upstream; [`Proxy::forward`] sends it. Boxed where it is built: at
    /// ~500 bytes it would otherwise be copied out of `admit`, out of the match and into
    /// the forward future, each time whole.
    Forward(Box<Forward>),
}

/// A request cleared for the upstream, with all that answering it needs.
pub struct Forward {
    /// Keeps the snapshot the route belongs to (a reload may swap `live` meanwhile).
    rt: Arc<Runtime>,
    /// When the request was first handled: the upstream call's deadlines count from it.
    start: Instant,
    side: Side,
    /// The route's place in its table (see `RouteTable::get`).
    route: usize,
    rec: Box<Record>,
    permit: super::admission::BulkheadPermit,
    /// Taken by the connection that sends it: see [`call::call`].
    outgoing: Option<Request<Body>>,
    request_id: HeaderValue,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl Proxy {
    /// Everything up to the upstream call, without waiting. Split from [`Self::forward`]
    /// so a request answered here never builds the upstream call's state (a few KiB),
    /// which is what makes a rejection cheap.
    /// `start` is when the request was first handled: the record, admission and the
    /// upstream call's first deadline count from it.
    pub fn admit(&self, req: Request<Incoming>, conn: &Conn, start: Instant) -> Admitted {
        use Admitted::Answered;
        let rt = self.live.load_full();
        let client = conn.peer.ip();

        // 1. normalize, once; every later decision reads `path`. The Uri clone is a refcount
        // bump, and lets the (usually borrowed) normalized path outlive `req`'s parts.
        let uri = req.uri().clone();
        let path = match normalize(uri.path(), rt.reject_encoded_slashes) {
            Normalized::Path(p) => p,
            Normalized::EncodedSlash => {
                let m = rt.unmatched_metrics[rt.class_of("/")].clone();
                return Answered(unrouted(&rt, m, &req, conn, start, ProxyError::BadPath));
            }
        };
        let path: &str = &path;

        // 2. reserved paths: never proxied.
        if conn.side == Side::Ingress {
            if let Some(sub) = reserved_sub(path, &rt.health_prefix) {
                // Probes and scrapes are counted (route "system") but not access-logged.
                let rec = record(&req, start, rt.system_metrics.clone(), conn, None);
                let resp = self.local.health(req, sub);
                return Answered(with_record(resp, rec));
            }
            if rt.metrics_path.as_deref() == Some(path) {
                let rec = record(&req, start, rt.system_metrics.clone(), conn, None);
                let (parts, _) = req.into_parts();
                return Answered(with_record(self.local.metrics(&parts), rec));
            }
        }

        // 3. route. The Host header is looked up once: routing reads it only when a route
        // matches on host; the upstream request always carries it on.
        let host_value = req.headers().get(header::HOST);
        let table = match conn.side {
            Side::Ingress => &rt.ingress,
            Side::Egress => &rt.egress,
        };
        let host = if table.by_host() {
            host_value
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
        } else {
            None
        };
        let Some((route_index, route)) = table.find(host, path) else {
            let m = rt.unmatched_metrics[rt.class_of(path)].clone();
            return Answered(unrouted(&rt, m, &req, conn, start, ProxyError::NoRoute));
        };
        let metrics = route.metrics_for(rt.class_of(path)).clone();
        let critical = metrics.class() == CRITICAL;
        let mut rec = record(&req, start, metrics, conn, rt.access_log.clone());
        rec.names = Some(route.log_names.clone());

        // 4. gates.
        if conn.side == Side::Ingress && self.gates.starting.load(Ordering::Relaxed) {
            return Answered(respond_err(
                rec,
                route,
                ProxyError::Starting {
                    retry_after: STARTING_RETRY_AFTER,
                },
                None,
            ));
        }
        if conn.side == Side::Ingress && self.gates.maintenance.is_on() {
            let ip = crate::ops::client_ip(
                client,
                req.headers().get(&headers::X_FORWARDED_FOR),
                &rt.trusted_proxies,
            );
            if let Some(reject) =
                crate::ops::decide(&rt.maintenance, true, req.method(), path, ip, req.headers())
            {
                route.maintenance_rejected.inc();
                rec.error = Some("maintenance");
                return Answered(with_record(respond::maintenance(reject), rec));
            }
        }
        if rt.force_open {
            return Answered(respond_err(rec, route, ProxyError::CircuitForced, None));
        }

        // 5. admission: rate limit, then the bulkhead and adaptive concurrency, whose
        // permits ride with the response until its last byte.
        let now = start;
        if let Some(rl) = &route.rate_limit
            && let Err(wait) = rl.limiter.check(now, req.headers(), || {
                crate::ops::client_ip(
                    client,
                    req.headers().get(&headers::X_FORWARDED_FOR),
                    &rt.trusted_proxies,
                )
            })
        {
            rl.rejected.inc();
            if !rl.dry_run {
                return Answered(respond_err(
                    rec,
                    route,
                    ProxyError::RateLimited { retry_after: wait },
                    None,
                ));
            }
            if let Some(held) = rl.dry_run_log.allow() {
                tracing::info!(route = %route.name, more = held, "dry run: rate limit would have rejected requests");
            }
        }
        let upstream = &route.upstream;
        let Some(mut permit) = upstream.bulkhead.try_acquire() else {
            upstream.bulkhead_rejected.inc();
            return Answered(respond_err(rec, route, ProxyError::Overloaded, None));
        };
        if let Some((limiter, rejected)) = &upstream.adaptive {
            match limiter.try_acquire(critical, now) {
                Ok(p) => permit.adaptive = Some(p),
                // Dry run: counted, let through.
                Err((_, Some(p))) => {
                    rejected.inc();
                    permit.adaptive = Some(p);
                }
                Err((_, None)) => {
                    rejected.inc();
                    return Answered(respond_err(rec, route, ProxyError::Overloaded, None));
                }
            }
        }

        // 6. upstream.
        let host_header = host_value.cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let (mut parts, body) = req.into_parts();
        // Room for what is added below (request id, X-Forwarded-*, Host): the map grows
        // once, not once per insert.
        parts.headers.reserve(5);
        let request_id = headers::ensure_request_id(&mut parts.headers);
        rec.request_id = Some(request_id.clone());
        let upgrade = headers::upgrade_kind(&parts.headers, parts.version);
        // The client connection's extensions stay here: none of them is the upstream's.
        let mut client_extensions = std::mem::take(&mut parts.extensions);
        let client_upgrade = if upgrade == Upgrade::Tunnel {
            client_extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let uri = match route
            .upstream
            .target
            .uri_for(route.forward_path(path), parts.uri.path_and_query())
        {
            Ok(u) => u,
            Err(e) => return Answered(respond_err(rec, route, e, Some(request_id))),
        };
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        let peer_trusted = rt.trusted_proxies.iter().any(|n| n.contains(&client));
        headers::set_forwarded(
            &mut parts.headers,
            &conn.peer_text,
            conn.tls,
            host_header.as_ref(),
            peer_trusted,
        );
        let target = &upstream.target;
        if !target.preserve_host || host_header.is_none() {
            parts
                .headers
                .insert(header::HOST, target.host_header.clone());
        } else if let Some(h) = host_header {
            parts.headers.insert(header::HOST, h);
        }
        // Credentials in the upstream URL are opsgate's identity towards the upstream: they
        // replace any the client sent, as nginx's `proxy_set_header Authorization` does.
        if let Some(auth) = &target.authorization {
            parts.headers.insert(header::AUTHORIZATION, auth.clone());
        }
        if upstream.section.http2 {
            let host = parts.headers.remove(header::HOST);
            parts.uri = target.h2_uri(uri, host.as_ref());
            parts.version = Version::HTTP_2;
        } else {
            parts.uri = uri;
            parts.version = Version::HTTP_11;
        }
        let side = conn.side;
        Admitted::Forward(super::boxed_in_place(|| Forward {
            rt,
            start,
            side,
            route: route_index,
            rec,
            permit,
            outgoing: Some(Request::from_parts(parts, Body::Incoming(body))),
            request_id,
            client_upgrade,
        }))
    }

    /// The upstream call under its protections, and the response to the client: the part
    /// of a request that waits, so the only part whose state is boxed.
    pub async fn forward(&self, mut f: Box<Forward>) -> Response<ObservedBody> {
        // Not taken apart first: the request stays where it is (see `call::call`).
        let route = match f.side {
            Side::Ingress => f.rt.ingress.get(f.route),
            Side::Egress => f.rt.egress.get(f.route),
        };
        let upstream = &route.upstream;
        let breaker = route.breaker.as_deref().or(upstream.breaker.as_ref());
        let result = call::call(
            &upstream.target,
            breaker,
            upstream.retries.as_ref(),
            &self.resilience,
            &mut f.outgoing,
            f.start,
            route.timeout,
        )
        .await;
        let Forward {
            mut rec,
            permit,
            request_id,
            client_upgrade,
            ..
        } = *f;
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => return respond_err(rec, route, e, Some(request_id)),
        };
        // Time to the response headers is the latency adaptive concurrency tracks.
        if let Some(p) = &permit.adaptive {
            p.sample(Instant::now());
        }

        // 7. respond.
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
            }
            rec.status = 101;
            let (mut parts, _) = resp.into_parts();
            parts.headers.insert(X_REQUEST_ID.clone(), request_id);
            return observed(parts, Body::Empty, rec, Some(permit));
        }
        let (mut parts, body) = resp.into_parts();
        // An intermediary speaks its own version (RFC 9110 §2.5): an HTTP/1.0 upstream must
        // not turn the client's answer into HTTP/1.0 and cost it keep-alive. hyper's h2
        // server ignores the field.
        parts.version = Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers, Upgrade::None);
        parts.headers.insert(X_REQUEST_ID.clone(), request_id);
        rec.status = parts.status.as_u16();
        observed(parts, Body::Upstream(body), rec, Some(permit))
    }
}

/// Routes of this class may use the whole adaptive concurrency limit (SPEC §11).
const CRITICAL: &str = "critical";

/// `Some(rest)` when `path` is `prefix` or under it on a segment boundary.
fn reserved_sub<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    segment_prefix(path, prefix).then(|| &path[prefix.len()..])
}

async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "tunnel closed with error");
    }
}

/// The record every answer carries, whoever gives it.
fn record(
    req: &Request<Incoming>,
    start: Instant,
    metrics: Arc<crate::telemetry::RouteMetrics>,
    conn: &Conn,
    log: Option<Arc<crate::telemetry::access::AccessLog>>,
) -> Box<Record> {
    // Boxed: the record rides in the response body, which hyper moves several times;
    // 8 bytes move cheaper than ~300.
    super::boxed_in_place(|| {
        Record::begin(
            start,
            metrics,
            req.method().clone(),
            req.uri().clone(),
            conn.peer_text.clone(),
            log,
        )
    })
}

/// Answers a request no route took (bad path, no route) with `e`.
fn unrouted(
    rt: &Runtime,
    metrics: Arc<crate::telemetry::RouteMetrics>,
    req: &Request<Incoming>,
    conn: &Conn,
    start: Instant,
    e: ProxyError,
) -> Response<ObservedBody> {
    let mut rec = record(req, start, metrics, conn, rt.access_log.clone());
    rec.error = Some(e.label());
    let resp = e.into_response();
    rec.status = resp.status().as_u16();
    with_record_status(resp, rec, None)
}

fn respond_err(
    mut rec: Box<Record>,
    route: &Route,
    e: ProxyError,
    request_id: Option<HeaderValue>,
) -> Response<ObservedBody> {
    rec.error = Some(e.label());
    let mut resp = e.respond(route.fallback.as_ref());
    if let Some(id) = request_id {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    rec.status = e.logged_status(resp.status());
    with_record_status(resp, rec, None)
}

fn with_record(resp: Response<Body>, mut rec: Box<Record>) -> Response<ObservedBody> {
    rec.status = resp.status().as_u16();
    with_record_status(resp, rec, None)
}

fn with_record_status(
    resp: Response<Body>,
    rec: Box<Record>,
    permit: Option<super::admission::BulkheadPermit>,
) -> Response<ObservedBody> {
    let (parts, body) = resp.into_parts();
    observed(parts, body, rec, permit)
}

/// The response to the client, its record riding in the body.
fn observed(
    parts: http::response::Parts,
    body: Body,
    mut rec: Box<Record>,
    permit: Option<super::admission::BulkheadPermit>,
) -> Response<ObservedBody> {
    rec.permit = permit;
    Response::from_parts(parts, ObservedBody::new(body, Some(rec)))
}
