//! The compiled, immutable snapshot of the config the proxy serves from.
//! Built once per load/reload and swapped atomically; a request reads one snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use ipnet::IpNet;
use tokio::sync::Semaphore;

use super::route::{Fallback, Route, RouteTable};
use super::upstream::{BuildError, Target};
use crate::config::{Config, EncodedSlashes, RouteSection, UpstreamSection};
use crate::telemetry::RouteMetrics;
use crate::ops::MaintenanceSettings;
use crate::telemetry::metrics::{HttpMetrics, OpsMetrics, RouteLabel};

/// An upstream's client and its protections. Reused across reloads while its settings
/// are unchanged, so pools stay warm and breaker state survives.
pub struct Upstream {
    pub section: UpstreamSection,
    pub target: Target,
    /// Bulkhead: a permit per in-flight request; `None` = unlimited.
    pub bulkhead: Option<Arc<Semaphore>>,
}

impl Upstream {
    pub fn name(&self) -> &Arc<str> {
        &self.target.name
    }
}

/// Label value for reserved paths and for requests no route matched.
pub const SYSTEM: &str = "system";
pub const UNMATCHED: &str = "unmatched";
pub const PUBLIC: &str = "public";

pub struct Runtime {
    pub config: Arc<Config>,
    pub ingress: RouteTable,
    pub egress: RouteTable,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub health_prefix: String,
    /// `Some` when metrics are served on the proxy port.
    pub metrics_path: Option<String>,
    pub reject_encoded_slashes: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub access_log: bool,
    /// `[[metrics.classes]]`: (prefix, class) pairs, first match wins.
    pub classes: Vec<(String, Arc<str>)>,
    pub system_metrics: Arc<RouteMetrics>,
    /// By class index, like routes without a class.
    pub unmatched_metrics: Vec<Arc<RouteMetrics>>,
    /// The `force_open_env` variable was on at startup.
    pub force_open: bool,
    /// Read by the maintenance gate; whether it is *on* lives in `ops::Maintenance`.
    pub maintenance: Arc<MaintenanceSettings>,
}

/// What the runtime needs besides the config: metric families and resolved settings.
pub struct Deps<'a> {
    pub http: &'a HttpMetrics,
    pub ops: &'a OpsMetrics,
    pub maintenance: Arc<MaintenanceSettings>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl Runtime {
    /// Builds a snapshot; `prev` lends the upstreams whose settings are unchanged.
    pub fn build(config: Arc<Config>, prev: Option<&Runtime>, deps: Deps<'_>) -> Result<Self, BuildError> {
        let f = &config.file;
        let http = deps.http;
        let mut upstreams = HashMap::new();
        for (name, section) in &f.upstreams {
            let reused = prev
                .and_then(|p| p.upstreams.get(name))
                .filter(|u| u.section == *section)
                .cloned();
            let up = match reused {
                Some(u) => u,
                None => Arc::new(Upstream {
                    section: section.clone(),
                    target: Target::new(name, section)?,
                    bulkhead: (section.max_in_flight > 0)
                        .then(|| Arc::new(Semaphore::new(section.max_in_flight as usize))),
                }),
            };
            upstreams.insert(name.clone(), up);
        }

        let classes: Vec<(String, Arc<str>)> = f
            .metrics
            .classes
            .iter()
            .map(|c| (c.prefix.clone(), Arc::from(c.class.as_str())))
            .collect();
        let per_class = |route: &Arc<str>| -> Vec<Arc<RouteMetrics>> {
            classes
                .iter()
                .map(|(_, c)| c.clone())
                .chain(std::iter::once(Arc::from(PUBLIC)))
                .map(|c| Arc::new(RouteMetrics::new(http, route.clone(), c)))
                .collect()
        };
        let compile = |sections: &[RouteSection]| -> RouteTable {
            let routes = sections
                .iter()
                .filter_map(|r| {
                    let upstream = upstreams.get(&r.upstream)?.clone();
                    let name: Arc<str> = r.name.as_str().into();
                    let metrics = match &r.class {
                        Some(c) => vec![Arc::new(RouteMetrics::new(
                            http,
                            name.clone(),
                            c.as_str().into(),
                        ))],
                        None => per_class(&name),
                    };
                    Some(Route {
                        prefix: r.prefix.clone(),
                        host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                        timeout: r
                            .timeout
                            .map_or(upstream.section.timeout.get(), |t| t.get()),
                        strip_prefix: r.strip_prefix,
                        fallback: r.fallback.as_ref().map(|fb| Fallback {
                            status: http::StatusCode::from_u16(fb.status)
                                .unwrap_or(http::StatusCode::OK),
                            content_type: HeaderValue::from_str(&fb.content_type)
                                .unwrap_or(HeaderValue::from_static("application/json")),
                            body: Bytes::from(fb.body.clone()),
                        }),
                        upstream,
                        maintenance_rejected: deps
                            .ops
                            .maintenance_rejected
                            .get_or_create(&RouteLabel { route: name.clone() })
                            .clone(),
                        name,
                        metrics,
                    })
                })
                .collect();
            RouteTable::new(routes)
        };
        let ingress = compile(&f.routes);
        let egress = f
            .egress
            .as_ref()
            .map(|e| compile(&e.routes))
            .unwrap_or_default();

        let force_open = (deps.env)(&f.circuit.force_open_env).is_some_and(|v| is_truthy(&v));
        Ok(Self {
            ingress,
            egress,
            upstreams,
            health_prefix: f.health.prefix.clone(),
            metrics_path: f.metrics.on_proxy_port.then(|| f.metrics.path.clone()),
            reject_encoded_slashes: f.proxy.encoded_slashes == EncodedSlashes::Reject,
            trusted_proxies: f.proxy.trusted_proxies.clone(),
            access_log: f.proxy.access_log,
            system_metrics: Arc::new(RouteMetrics::new(http, SYSTEM.into(), SYSTEM.into())),
            unmatched_metrics: per_class(&Arc::from(UNMATCHED)),
            classes,
            force_open,
            maintenance: deps.maintenance,
            config,
        })
    }

    /// Class index of a path for routes without their own class: the first
    /// `[[metrics.classes]]` prefix that matches, else the last slot (`public`).
    pub fn class_of(&self, path: &str) -> usize {
        self.classes
            .iter()
            .position(|(p, _)| crate::config::validate::segment_prefix(path, p))
            .unwrap_or(self.classes.len())
    }
}

/// `1`, `true`, `on`, `yes` (any case) switch a toggle on.
pub fn is_truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes"
    )
}
