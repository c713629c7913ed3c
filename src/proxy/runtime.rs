//! The compiled, immutable snapshot of the config the proxy serves from.
//! Built once per load/reload and swapped atomically; a request reads one snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ipnet::IpNet;

use super::admission::Bulkhead;
use super::breaker::{BreakerPolicy, RateRule};
use super::call::{GuardedBreaker, Retries};
use super::limits::adaptive::{AdaptiveLimiter, AdaptiveSettings};
use super::limits::lease::{self, LeaseSender, RouteFleet};
use super::limits::rate::RouteRate;
use super::retry::RetryPolicy;
use super::route::{Fallback, RateLimit, Route, RouteTable};
use super::upstream::{BuildError, Target};
use crate::config::{BreakerSection, Config, EncodedSlashes, RouteSection, UpstreamSection};
use crate::ops::MaintenanceSettings;
use crate::telemetry::RouteMetrics;
use crate::telemetry::access::AccessLog;
use crate::telemetry::metrics::{
    HttpMetrics, OpsMetrics, ResilienceMetrics, RouteLabel, UpstreamLabel,
};

/// An upstream's client and its protections. Reused across reloads while its settings
/// are unchanged, so pools stay warm and breaker state survives.
pub struct Upstream {
    pub section: UpstreamSection,
    pub target: Target,
    pub bulkhead: Bulkhead,
    pub bulkhead_rejected: prometheus_client::metrics::counter::Counter,
    pub breaker: Option<GuardedBreaker>,
    pub retries: Option<Retries>,
    /// `adaptive_concurrency`, with `adaptive_concurrency_rejected_total{upstream}`.
    pub adaptive: Option<(
        Arc<AdaptiveLimiter>,
        prometheus_client::metrics::counter::Counter,
    )>,
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
    /// `None` when `access_log = false` or `OPSGATE_LOG` filters target `access` out.
    pub access_log: Option<Arc<AccessLog>>,
    /// `[[metrics.classes]]`: (prefix, class) pairs, first match wins.
    pub classes: Vec<(String, Arc<str>)>,
    pub system_metrics: Arc<RouteMetrics>,
    /// By class index, like routes without a class.
    pub unmatched_metrics: Vec<Arc<RouteMetrics>>,
    /// The `force_open_env` variable was on at startup.
    pub force_open: bool,
    /// Read by the maintenance gate; whether it is *on* lives in `ops::Maintenance`.
    pub maintenance: Arc<MaintenanceSettings>,
    /// Route-scoped breakers by name (`route:<name>`), with the settings they were built
    /// from, so a reload keeps those whose settings did not change.
    pub route_breakers: HashMap<String, (BreakerSection, Arc<GuardedBreaker>)>,
    /// The lease driver and the fleet rate limits built on it, kept by a reload
    /// that leaves them unchanged. `None` without a fleet limit.
    pub fleet: Option<FleetLimits>,
}

/// Fleet rate limits as a reload sees them. A reload that keeps `[control]
/// redis_url` and the key prefix keeps the driver (its Redis connection and
/// this process's instance id, so the fleet does not count it twice), and each
/// route whose limit is unchanged keeps its buckets and leased stock.
pub struct FleetLimits {
    redis_url: String,
    prefix: String,
    sender: LeaseSender,
    /// By `ingress:<route>` / `egress:<route>`: the settings each limit was
    /// built from (`dry_run` aside: it is not the limiter's) and the limiter.
    routes: HashMap<String, (crate::config::RateLimitSection, Arc<RouteRate>)>,
}

impl FleetLimits {
    fn key(table: &str, route: &str) -> String {
        format!("{table}:{route}")
    }

    /// The limiter built for `rl` on a previous snapshot, if its settings are the same.
    fn reusable(
        &self,
        table: &str,
        route: &str,
        rl: &crate::config::RateLimitSection,
    ) -> Option<Arc<RouteRate>> {
        let (old, limiter) = self.routes.get(&Self::key(table, route))?;
        (limiter_settings(old) == limiter_settings(rl)).then(|| limiter.clone())
    }
}

fn limiter_settings(rl: &crate::config::RateLimitSection) -> crate::config::RateLimitSection {
    crate::config::RateLimitSection {
        dry_run: false,
        ..rl.clone()
    }
}

/// What the runtime needs besides the config: metric families and resolved settings.
pub struct Deps<'a> {
    pub http: &'a HttpMetrics,
    pub ops: &'a OpsMetrics,
    pub resilience: &'a ResilienceMetrics,
    /// Told of every breaker transition (logs once and publishes the event).
    pub on_breaker: super::call::TransitionHook,
    pub access_log: Arc<AccessLog>,
    pub maintenance: Arc<MaintenanceSettings>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl Runtime {
    /// Builds a snapshot; `prev` lends the upstreams whose settings are unchanged.
    pub fn build(
        config: Arc<Config>,
        prev: Option<&Runtime>,
        deps: Deps<'_>,
    ) -> Result<Self, BuildError> {
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
                None => {
                    let target = Target::new(name, section)?;
                    let n = target.name.clone();
                    Arc::new(Upstream {
                        section: section.clone(),
                        bulkhead: Bulkhead::new(section.max_in_flight as usize),
                        bulkhead_rejected: deps
                            .resilience
                            .bulkhead_rejected
                            .get_or_create(&UpstreamLabel {
                                upstream: n.clone(),
                            })
                            .clone(),
                        breaker: section
                            .breaker
                            .as_ref()
                            .map(|b| guarded(n.clone(), b, &deps)),
                        retries: section.retry.as_ref().map(|r| {
                            Retries::new(RetryPolicy::from_config(r), deps.resilience, &n)
                        }),
                        adaptive: section.adaptive_concurrency.as_ref().map(|ac| {
                            let label = UpstreamLabel {
                                upstream: n.clone(),
                            };
                            let limiter = AdaptiveLimiter::new(
                                AdaptiveSettings {
                                    min_limit: ac.min_limit,
                                    max_limit: ac.max_limit,
                                    initial_limit: ac.initial_limit,
                                    dry_run: ac.dry_run,
                                },
                                tokio::time::Instant::now(),
                            )
                            .with_gauge(
                                deps.resilience
                                    .adaptive_concurrency_limit
                                    .get_or_create(&label)
                                    .clone(),
                            );
                            (
                                Arc::new(limiter),
                                deps.resilience
                                    .adaptive_concurrency_rejected
                                    .get_or_create(&label)
                                    .clone(),
                            )
                        }),
                        target,
                    })
                }
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
        let leases = fleet_leases(f, prev.and_then(|p| p.fleet.as_ref()), &deps)?;
        // Limiters of the previous snapshot are only reused on the same driver.
        let prev_fleet = leases.as_ref().and_then(|l| l.kept);
        let compile = |table: &str, sections: &[RouteSection]| -> Result<RouteTable, BuildError> {
            let routes = sections
                .iter()
                .map(|r| {
                    // Validation refuses such a route; a hand-built file must not lose it quietly.
                    let upstream = upstreams
                        .get(&r.upstream)
                        .ok_or_else(|| {
                            BuildError::UnknownUpstream(r.name.clone(), r.upstream.clone())
                        })?
                        .clone();
                    let name: Arc<str> = r.name.as_str().into();
                    let metrics = match &r.class {
                        Some(c) => vec![Arc::new(RouteMetrics::new(
                            http,
                            name.clone(),
                            c.as_str().into(),
                        ))],
                        None => per_class(&name),
                    };
                    let route_breaker = r.breaker.as_ref().map(|b| {
                        let key = format!("route:{}", r.name);
                        match prev.and_then(|p| p.route_breakers.get(&key)) {
                            Some((old, g)) if old == b => g.clone(),
                            _ => Arc::new(guarded(key.as_str().into(), b, &deps)),
                        }
                    });
                    Ok(Route {
                        rate_limit: r.rate_limit.as_ref().map(|rl| RateLimit {
                            limiter: prev_fleet
                                .and_then(|p| p.reusable(table, &r.name, rl))
                                .unwrap_or_else(|| {
                                    Arc::new(route_rate(&name, rl, leases.as_ref(), &deps))
                                }),
                            dry_run: rl.dry_run,
                            dry_run_log: crate::telemetry::throttle::LogThrottle::new(
                                std::time::Duration::from_secs(1),
                            ),
                            rejected: deps
                                .resilience
                                .rate_limited
                                .get_or_create(&RouteLabel {
                                    route: r.name.as_str().into(),
                                })
                                .clone(),
                        }),
                        breaker: route_breaker,
                        prefix: r.prefix.clone(),
                        host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                        timeout: r
                            .timeout
                            .map_or(upstream.section.timeout.get(), |t| t.get()),
                        strip_prefix: r.strip_prefix,
                        fallback: r.fallback.as_ref().map(|fb| Fallback {
                            status: *fb.status.get(),
                            content_type: fb.content_type.get().clone(),
                            body: Bytes::from(fb.body.clone()),
                        }),
                        log_names: Arc::new(crate::telemetry::access::RouteNames::new(
                            name.clone(),
                            upstream.name().clone(),
                        )),
                        upstream,
                        maintenance_rejected: deps
                            .ops
                            .maintenance_rejected
                            .get_or_create(&RouteLabel {
                                route: name.clone(),
                            })
                            .clone(),
                        name,
                        metrics,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(RouteTable::new(routes))
        };
        let ingress = compile("ingress", &f.routes)?;
        let route_breakers = collect_route_breakers(f.routes.iter(), &ingress);
        let egress_sections = f.egress.as_ref().map_or(&[][..], |e| &e.routes[..]);
        let egress = match &f.egress {
            Some(e) => compile("egress", &e.routes)?,
            None => RouteTable::default(),
        };
        let fleet = leases.map(|Leases { sender, prefix, .. }| {
            let mut routes = HashMap::new();
            for (table, sections, built) in [
                ("ingress", &f.routes[..], &ingress),
                ("egress", egress_sections, &egress),
            ] {
                for section in sections {
                    let Some(rl) = &section.rate_limit else {
                        continue;
                    };
                    let limiter = built
                        .iter()
                        .find(|r| *r.name == *section.name)
                        .and_then(|r| r.rate_limit.as_ref())
                        .map(|l| l.limiter.clone())
                        .filter(|l| l.is_fleet());
                    if let Some(limiter) = limiter {
                        routes.insert(
                            FleetLimits::key(table, &section.name),
                            (rl.clone(), limiter),
                        );
                    }
                }
            }
            FleetLimits {
                redis_url: f.control.redis_url.clone().unwrap_or_default(),
                prefix,
                sender,
                routes,
            }
        });

        let force_open = (deps.env)(&f.circuit.force_open_env).is_some_and(|v| is_truthy(&v));
        Ok(Self {
            ingress,
            egress,
            upstreams,
            health_prefix: f.health.prefix.clone(),
            metrics_path: f.metrics.on_proxy_port.then(|| f.metrics.path.clone()),
            reject_encoded_slashes: f.proxy.encoded_slashes == EncodedSlashes::Reject,
            trusted_proxies: f.proxy.trusted_proxies.clone(),
            // `OPSGATE_LOG` may filter the access log out: then no line is even formatted.
            access_log: (f.proxy.access_log && deps.access_log.is_on())
                .then(|| deps.access_log.clone()),
            system_metrics: Arc::new(RouteMetrics::new(http, SYSTEM.into(), SYSTEM.into())),
            unmatched_metrics: per_class(&Arc::from(UNMATCHED)),
            classes,
            force_open,
            maintenance: deps.maintenance,
            route_breakers,
            fleet,
            config,
        })
    }

    /// Class index of a path for routes without their own class: the first
    /// `[[metrics.classes]]` prefix that matches, else the last slot (`public`).
    pub fn class_of(&self, path: &str) -> usize {
        self.classes
            .iter()
            .position(|(p, _)| crate::paths::segment_prefix(path, p))
            .unwrap_or(self.classes.len())
    }
}

impl Runtime {
    /// Every breaker, upstream-scoped then route-scoped, for the admin API and health hooks.
    pub fn breakers(&self) -> Vec<&GuardedBreaker> {
        let mut out: Vec<&GuardedBreaker> = self
            .upstreams
            .values()
            .filter_map(|u| u.breaker.as_ref())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        let mut routes: Vec<&GuardedBreaker> = self
            .route_breakers
            .values()
            .map(|(_, g)| g.as_ref())
            .collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(routes);
        out
    }

    pub fn breaker(&self, name: &str) -> Option<&GuardedBreaker> {
        self.breakers().into_iter().find(|b| &*b.name == name)
    }
}

/// The lease driver when any route has a fleet rate limit, with the key prefix,
/// and `prev` when its driver was kept. A reload keeps the driver while the
/// Redis URL and prefix are the same; otherwise it starts a new one and the old
/// one ends with the last route that holds it.
fn fleet_leases<'p>(
    f: &crate::config::ConfigFile,
    prev: Option<&'p FleetLimits>,
    deps: &Deps<'_>,
) -> Result<Option<Leases<'p>>, BuildError> {
    let fleet = f
        .routes
        .iter()
        .chain(f.egress.iter().flat_map(|e| e.routes.iter()))
        .any(|r| {
            r.rate_limit
                .as_ref()
                .is_some_and(|rl| rl.scope == crate::config::RateScope::Fleet)
        });
    let Some(url) = f.control.redis_url.as_deref().filter(|_| fleet) else {
        return Ok(None);
    };
    let prefix = match &f.control.key_prefix {
        Some(p) => p.clone(),
        None => format!(
            "opsgate:{}",
            (deps.env)("SERVICE_NAME")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| crate::config::defaults::KEY_PREFIX_SERVICE_DEFAULT.into())
        ),
    };
    if let Some(p) = prev.filter(|p| p.redis_url == url && p.prefix == prefix) {
        return Ok(Some(Leases {
            sender: p.sender.clone(),
            prefix,
            kept: Some(p),
        }));
    }
    let instance: Arc<str> = format!("{}-{:016x}", std::process::id(), fastrand::u64(..)).into();
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(BuildError::Fleet("needs the async runtime".into()));
    }
    // The error names what is wrong with the URL, never its password.
    let sender = lease::start(url, instance)
        .map_err(|e| BuildError::Fleet(format!("control.redis_url: {}", e.kind().to_str())))?;
    Ok(Some(Leases {
        sender,
        prefix,
        kept: None,
    }))
}

/// The lease driver a snapshot uses.
struct Leases<'p> {
    sender: LeaseSender,
    prefix: String,
    /// The previous snapshot's fleet limits, when their driver is kept.
    kept: Option<&'p FleetLimits>,
}

fn route_rate(
    name: &Arc<str>,
    rl: &crate::config::RateLimitSection,
    leases: Option<&Leases<'_>>,
    deps: &Deps<'_>,
) -> RouteRate {
    let burst = rl
        .burst
        .unwrap_or_else(|| rl.per_second.ceil().max(1.0) as u32);
    let source = rl.key.get().clone();
    match (rl.scope, leases) {
        (crate::config::RateScope::Fleet, Some(Leases { sender, prefix, .. })) => {
            let gauge = deps
                .resilience
                .rate_limit_fleet_fallback
                .get_or_create(&RouteLabel {
                    route: name.clone(),
                })
                .clone();
            gauge.set(0);
            let route = Arc::new(RouteFleet::new(
                prefix,
                name.clone(),
                rl.per_second,
                burst,
                gauge,
            ));
            RouteRate::fleet(source, rl.max_keys, route, sender.clone())
        }
        _ => RouteRate::local(rl.per_second, burst, source, rl.max_keys),
    }
}

fn collect_route_breakers<'a>(
    sections: impl Iterator<Item = &'a RouteSection>,
    table: &RouteTable,
) -> HashMap<String, (BreakerSection, Arc<GuardedBreaker>)> {
    sections
        .filter_map(|s| {
            let b = s.breaker.as_ref()?;
            let route = table.iter().find(|r| &*r.name == s.name.as_str())?;
            let g = route.breaker.clone()?;
            Some((g.name.to_string(), (b.clone(), g)))
        })
        .collect()
}

fn guarded(name: Arc<str>, b: &BreakerSection, deps: &Deps<'_>) -> GuardedBreaker {
    GuardedBreaker::new(
        name,
        breaker_policy(b),
        b.failure_status.iter().map(|s| *s.get()).collect(),
        b.recover_on_check.clone(),
        deps.resilience,
        deps.on_breaker.clone(),
    )
}

pub fn breaker_policy(b: &BreakerSection) -> BreakerPolicy {
    BreakerPolicy {
        failure_threshold: b.failure_threshold,
        recovery_timeout: b.recovery_timeout.get(),
        half_open_max_calls: b.half_open_max_calls,
        success_threshold: b.success_threshold,
        rate: b.failure_rate.map(|failure_rate| RateRule {
            failure_rate,
            window: b.window.get(),
            minimum_calls: b.minimum_calls,
            slow_call_duration: b.slow_call_duration.map(|d| d.get()),
        }),
        max_half_open_wait: b.max_half_open_wait.get(),
        max_recovery_timeout: b.max_recovery_timeout.map(|d| d.get()),
        dry_run: b.dry_run,
    }
}

/// `1`, `true`, `on`, `yes` (any case) switch a toggle on.
pub fn is_truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes"
    )
}

/// A runtime for in-process tests: no breaker hook, no access log, default maintenance,
/// an empty environment.
#[cfg(test)]
pub(crate) fn build_for_test(
    config: Arc<Config>,
    metrics: &crate::telemetry::MetricsRegistry,
) -> Result<Runtime, BuildError> {
    Runtime::build(
        config,
        None,
        Deps {
            http: &metrics.http,
            ops: &metrics.ops,
            resilience: &metrics.resilience,
            on_breaker: Arc::new(|_: &str, _: &crate::proxy::breaker::Transition| {}),
            access_log: Arc::new(AccessLog::Off),
            maintenance: Arc::new(crate::ops::MaintenanceSettings::default()),
            env: &|_: &str| None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::MetricsRegistry;

    #[tokio::test]
    async fn a_route_without_its_upstream_fails_the_build_instead_of_vanishing() {
        let text = "[upstreams.app]\nurl = \"http://127.0.0.1:9\"\n\n\
                    [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n";
        let mut config =
            crate::config::parse_str(text, "t.toml", &Default::default(), &|_: &str| None).unwrap();
        config.file.routes[0].upstream = "gone".into();
        let metrics = MetricsRegistry::new(&config.file.metrics.buckets);
        let built = build_for_test(Arc::new(config), &metrics);
        assert!(
            matches!(built, Err(BuildError::UnknownUpstream(ref r, ref u)) if r == "api" && u == "gone"),
            "{:?}",
            built.err()
        );
    }
}
