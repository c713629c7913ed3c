//! The route table: host-specific routes first, then the longest segment-boundary prefix.
//! Compiled once per config; matching a request is a scan with no allocation.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;

use super::runtime::Upstream;
use crate::paths::segment_prefix;
use crate::telemetry::RouteMetrics;

/// A route's canned answer when its breaker is open or its bulkhead full.
pub struct Fallback {
    pub status: http::StatusCode,
    pub content_type: HeaderValue,
    pub body: Bytes,
}

/// A route's token bucket and what to do when it is empty.
pub struct RateLimit {
    /// Shared with the next snapshot when a reload leaves a fleet limit unchanged.
    pub limiter: Arc<super::limits::rate::RouteRate>,
    /// Count and log, but let the request through.
    pub dry_run: bool,
    pub rejected: prometheus_client::metrics::counter::Counter,
    /// Dry-run rejections happen at request rate: one log line a second at most.
    pub dry_run_log: crate::telemetry::throttle::LogThrottle,
}

pub struct Route {
    pub name: Arc<str>,
    pub prefix: String,
    /// Lowercase, without port.
    pub host: Option<String>,
    pub upstream: Arc<Upstream>,
    /// Its name and its upstream's, as access lines carry them.
    pub log_names: Arc<crate::telemetry::access::RouteNames>,
    pub timeout: Duration,
    pub strip_prefix: bool,
    pub fallback: Option<Fallback>,
    /// Metrics handles by class index (see `Runtime::class_of`); one entry when the route names its class.
    pub metrics: Vec<Arc<RouteMetrics>>,
    pub rate_limit: Option<RateLimit>,
    /// A route-scoped breaker (`route:<name>`): it takes the place of the upstream's.
    pub breaker: Option<Arc<super::call::GuardedBreaker>>,
    /// `maintenance_rejected_total{route}`, resolved at build.
    pub maintenance_rejected: prometheus_client::metrics::counter::Counter,
}

impl Route {
    pub fn metrics_for(&self, class_idx: usize) -> &Arc<RouteMetrics> {
        if self.metrics.len() == 1 {
            &self.metrics[0]
        } else {
            &self.metrics[class_idx]
        }
    }

    /// The path to forward: with `strip_prefix`, `/api/x` under `/api` becomes `/x`.
    pub fn forward_path<'p>(&self, path: &'p str) -> &'p str {
        if !self.strip_prefix || self.prefix == "/" {
            return path;
        }
        let rest = &path[self.prefix.trim_end_matches('/').len()..];
        if rest.is_empty() { "/" } else { rest }
    }
}

#[derive(Default)]
pub struct RouteTable {
    /// Sorted: host routes first, then longer prefixes first.
    routes: Vec<Route>,
    /// Whether any route matches on host; without one the Host header is not looked at.
    by_host: bool,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| {
            b.host.is_some().cmp(&a.host.is_some()).then(
                b.prefix
                    .trim_end_matches('/')
                    .len()
                    .cmp(&a.prefix.trim_end_matches('/').len()),
            )
        });
        let by_host = routes.iter().any(|r| r.host.is_some());
        Self { routes, by_host }
    }

    /// Whether a route matches on host, so [`Self::find`] needs the request's.
    pub fn by_host(&self) -> bool {
        self.by_host
    }

    /// The first route that takes `host` and `path`, with its place in the table (a
    /// request cleared for the upstream finds its route again by it; see [`Self::get`]).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        let host = if self.by_host {
            host.map(strip_port)
        } else {
            None
        };
        self.routes.iter().enumerate().find(|(_, r)| {
            r.host
                .as_deref()
                .is_none_or(|h| host.is_some_and(|req| req.eq_ignore_ascii_case(h)))
                && segment_prefix(path, &r.prefix)
        })
    }

    /// The route `find` placed at `index`. Panics on an index from another table: one
    /// from `find` is only valid in the snapshot whose table gave it.
    pub fn get(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_ignored() {
        assert_eq!(strip_port("api.example.com:8080"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
