//! The Prometheus registry and the request metrics' handle tables.
//! Families are registered once at startup; routes resolve their handles when the config is
//! built, so a request only does atomic increments.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::histogram::AtomicHistogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: Arc<str>,
    pub class: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub method: &'static str,
    pub route: Arc<str>,
    pub class: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteClassLabels {
    pub route: Arc<str>,
    pub class: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

#[derive(Clone, Debug)]
pub struct Buckets(Arc<[f64]>);

impl MetricConstructor<AtomicHistogram> for Buckets {
    fn new_metric(&self) -> AtomicHistogram {
        AtomicHistogram::new(&self.0)
    }
}

/// The request families of SPEC §7 (`http_*`), shared by every route handle table.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<DurationLabels, AtomicHistogram, Buckets>,
    pub in_progress: Family<RouteClassLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Operations families: maintenance and config reloads (SPEC §7).
#[derive(Clone, Debug, Default)]
pub struct OpsMetrics {
    pub maintenance_mode: Gauge,
    pub maintenance_rejected: Family<RouteLabel, Counter>,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub last_reload_success: Gauge<f64, std::sync::atomic::AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerStateLabels {
    pub breaker: Arc<str>,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerCallLabels {
    pub breaker: Arc<str>,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerToLabels {
    pub breaker: Arc<str>,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub upstream: Arc<str>,
    pub reason: &'static str,
}

/// Resilience families (SPEC §7): breakers, retries, bulkheads, rate limits.
#[derive(Clone, Debug, Default)]
pub struct ResilienceMetrics {
    pub breaker_state: Family<BreakerStateLabels, Gauge>,
    pub breaker_calls: Family<BreakerCallLabels, Counter>,
    pub breaker_state_changes: Family<BreakerToLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub retry_budget_exhausted: Family<UpstreamLabel, Counter>,
    pub bulkhead_rejected: Family<UpstreamLabel, Counter>,
    pub rate_limited: Family<RouteLabel, Counter>,
    /// 1 while a fleet rate limit enforces its local share (Redis unreachable).
    pub rate_limit_fleet_fallback: Family<RouteLabel, Gauge>,
    pub adaptive_concurrency_limit: Family<UpstreamLabel, Gauge>,
    pub adaptive_concurrency_rejected: Family<UpstreamLabel, Counter>,
}

/// The registry plus the families the proxy itself owns. Other rooms register theirs
/// through `registry_mut` before the app freezes it.
pub struct MetricsRegistry {
    registry: Registry,
    pub http: HttpMetrics,
    pub ops: OpsMetrics,
    pub resilience: ResilienceMetrics,
}

impl MetricsRegistry {
    pub fn new(buckets: &[f64]) -> Self {
        let mut registry = Registry::default();
        let http = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(Buckets(buckets.into())),
            in_progress: Family::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, class and status",
            http.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request received to response finished",
            http.duration.clone(),
        );
        registry.register(
            "http_requests_in_progress",
            "Requests being served",
            http.in_progress.clone(),
        );
        let build = Family::<VersionLabels, Gauge>::default();
        build
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("opsgate_build_info", "opsgate build information", build);
        let ops = OpsMetrics::default();
        // Both results exist from the start, so `increase()` sees the first failure.
        for result in ["success", "failure"] {
            let _ = ops.config_reloads.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "maintenance_mode",
            "1 while maintenance mode is on",
            ops.maintenance_mode.clone(),
        );
        registry.register(
            "maintenance_rejected",
            "Requests answered by maintenance mode",
            ops.maintenance_rejected.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            ops.config_reloads.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load",
            ops.last_reload_success.clone(),
        );
        let resilience = ResilienceMetrics::default();
        let r = &resilience;
        registry.register(
            "circuit_breaker_state",
            "1 for the breaker's current state (forced_open shows as open, disabled as closed)",
            r.breaker_state.clone(),
        );
        registry.register(
            "circuit_breaker_calls",
            "Calls offered to a breaker, by result",
            r.breaker_calls.clone(),
        );
        registry.register(
            "circuit_breaker_state_changes",
            "Breaker transitions, by new state",
            r.breaker_state_changes.clone(),
        );
        registry.register(
            "upstream_retries",
            "Retries, by the retry.on entry that fired",
            r.retries.clone(),
        );
        registry.register(
            "upstream_retry_budget_exhausted",
            "Retries refused because the retry budget was spent",
            r.retry_budget_exhausted.clone(),
        );
        registry.register(
            "bulkhead_rejected",
            "Requests refused by a full bulkhead",
            r.bulkhead_rejected.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests over a route's rate limit",
            r.rate_limited.clone(),
        );
        registry.register(
            "rate_limit_fleet_fallback",
            "1 while a fleet rate limit enforces a local share because Redis is unreachable",
            r.rate_limit_fleet_fallback.clone(),
        );
        registry.register(
            "adaptive_concurrency_limit",
            "The adaptive concurrency limit in force",
            r.adaptive_concurrency_limit.clone(),
        );
        registry.register(
            "adaptive_concurrency_rejected",
            "Calls refused (or, with dry_run, that would have been) by adaptive concurrency",
            r.adaptive_concurrency_rejected.clone(),
        );
        Self {
            registry,
            http,
            ops,
            resilience,
        }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// OpenMetrics 1.0 text, as prometheus-client writes it.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(8192);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Prometheus text format 0.0.4 (what `promtool check metrics` and most scrapers expect).
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }
}

/// Rewrites OpenMetrics text as Prometheus 0.0.4: counters' HELP/TYPE name the `_total`
/// series, `# UNIT` and `# EOF` lines go, and `_created` series are dropped.
pub fn openmetrics_to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut counter_family: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            counter_family = om
                .contains(&format!("# TYPE {name} counter"))
                .then_some(name);
            if let Some(name) = counter_family {
                out.push_str("# HELP ");
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = counter_family
                && rest.starts_with(name)
            {
                out.push_str("# TYPE ");
                out.push_str(name);
                out.push_str("_total counter\n");
                continue;
            }
        } else if !line.starts_with('#') {
            let series = line.split(['{', ' ']).next().unwrap_or("");
            if series.ends_with("_created") {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// HTTP methods that get their own label value; any other method is `other`, so clients
/// cannot grow the label set.
pub const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];

pub fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Status codes with a pre-allocated handle slot; others go through the family's map.
const STATUS_SLOTS: [u16; 22] = [
    200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 405, 408, 409, 413, 429, 431, 500, 502,
    503, 504, 101,
];

fn status_slot(status: u16) -> Option<usize> {
    STATUS_SLOTS.iter().position(|s| *s == status)
}

/// One (route, class) pair's handles, resolved lazily per method/status and then reused:
/// the first request with a new combination takes the family's lock once, later ones only
/// load a `OnceLock` and increment an atomic.
#[derive(Debug)]
pub struct RouteMetrics {
    family: HttpMetrics,
    route: Arc<str>,
    class: Arc<str>,
    /// Set once per (method, status) slot; never a lock after the first use.
    requests: Box<[[OnceLock<Counter>; STATUS_SLOTS.len()]; METHODS.len()]>,
    /// Set once per method.
    duration: [OnceLock<AtomicHistogram>; METHODS.len()],
    in_progress: Gauge,
    /// In-flight count mirrored locally for cheap reads (the status page).
    pub active: Arc<AtomicI64>,
    /// Finished requests and 5xx answers, for the status page's rates.
    total: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
}

impl RouteMetrics {
    pub fn new(family: &HttpMetrics, route: Arc<str>, class: Arc<str>) -> Self {
        let in_progress = family
            .in_progress
            .get_or_create(&RouteClassLabels {
                route: route.clone(),
                class: class.clone(),
            })
            .clone();
        Self {
            family: family.clone(),
            route,
            class,
            requests: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| OnceLock::new())
            })),
            duration: std::array::from_fn(|_| OnceLock::new()),
            in_progress,
            active: Arc::new(AtomicI64::new(0)),
            total: Default::default(),
            errors: Default::default(),
        }
    }

    pub fn route(&self) -> &str {
        &self.route
    }

    pub fn class(&self) -> &str {
        &self.class
    }

    pub fn start(&self) {
        self.in_progress.inc();
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// (requests finished, 5xx answers) since start.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.total.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    pub fn finish(&self, method: usize, status: u16, seconds: f64) {
        self.in_progress.dec();
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let labels = || RequestLabels {
            method: METHODS[method],
            route: self.route.clone(),
            class: self.class.clone(),
            status,
        };
        match status_slot(status) {
            Some(slot) => self.requests[method][slot]
                .get_or_init(|| self.family.requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.family.requests.get_or_create(&labels()).inc(),
        };
        self.duration[method]
            .get_or_init(|| {
                self.family
                    .duration
                    .get_or_create(&DurationLabels {
                        method: METHODS[method],
                        route: self.route.clone(),
                        class: self.class.clone(),
                    })
                    .clone()
            })
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let m = MetricsRegistry::new(&[0.1, 1.0]);
        let r = RouteMetrics::new(&m.http, "api".into(), "public".into());
        r.start();
        r.finish(0, 200, 0.05);
        r.start();
        r.finish(7, 599, 0.05);
        let text = m.encode_prometheus();
        assert!(
            text.contains("# TYPE http_requests_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP http_requests_total "), "{text}");
        assert!(
            text.contains(
                r#"http_requests_total{method="GET",route="api",class="public",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"status="599"} 1"#), "{text}");
        assert!(
            text.contains(r#"http_requests_in_progress{route="api",class="public"} 0"#),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(m.encode_openmetrics().ends_with("# EOF\n"));
    }
}
