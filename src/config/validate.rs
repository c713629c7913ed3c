//! Semantic checks on a deserialized file: references, ranges, formats, cross-field rules.
//! Collects every problem at once, each pointed at its TOML path's line:col.

use std::collections::HashSet;
use std::net::SocketAddr;

use toml::Spanned;
use toml::de::DeTable;

use super::checks::{CheckSpec, compile_kind};
use super::diag::{Diagnostic, Seg, Source, span_of};
use super::file::*;
use super::values::{Checked, UpstreamUrlError};
use crate::paths::segment_prefix;

/// Route names the metrics layer uses for itself.
const RESERVED_ROUTE_NAMES: &[&str] = &["unmatched", "system"];

pub struct Checker<'a> {
    spans: Option<&'a Spanned<DeTable<'a>>>,
    /// Upstream "app" came from `proxy.upstream`: its URL's errors point there.
    pub shorthand_upstream: bool,
    source: Source<'a>,
    pub diagnostics: Vec<Diagnostic>,
    /// The checks whose kind compiled; complete when `diagnostics` is empty.
    pub checks: Vec<CheckSpec>,
}

impl<'a> Checker<'a> {
    pub fn new(spans: Option<&'a Spanned<DeTable<'a>>>, text: &'a str) -> Self {
        Self {
            spans,
            shorthand_upstream: false,
            source: Source { text },
            diagnostics: Vec::new(),
            checks: Vec::new(),
        }
    }

    pub fn error(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        let at = self
            .spans
            .map(|root| self.source.line_col(span_of(root, path).start));
        self.diagnostics.push(Diagnostic {
            at,
            message: message.into(),
        });
    }

    pub fn check(&mut self, f: &ConfigFile) {
        use Seg::Key as K;
        let p = &f.proxy;
        for (i, net) in p.trusted_proxies.iter().enumerate() {
            let _ = (i, net); // parsed by serde already; kept for symmetry with allow_ips
        }
        if p.max_header_bytes.0 < 1024 {
            self.error(
                &[K("proxy"), K("max_header_bytes")],
                "max_header_bytes must be at least 1KiB",
            );
        }
        if p.header_read_timeout.is_zero() {
            self.error(
                &[K("proxy"), K("header_read_timeout")],
                "header_read_timeout must be > 0",
            );
        }
        if let Some(tls) = &p.tls {
            for (key, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if !path.exists() {
                    self.error(
                        &[K("proxy"), K("tls"), K(key)],
                        format!("tls {key} file `{}` does not exist", path.display()),
                    );
                }
            }
        }

        if !f.admin.listen.ip().is_loopback() && f.admin.token.is_empty() {
            self.error(
                &[K("admin"), K("listen")],
                format!(
                    "admin listener {} is not loopback: set admin.token (or OPSGATE_ADMIN_TOKEN) so the admin API is not open",
                    f.admin.listen
                ),
            );
        }

        let check_names: HashSet<&str> = f.health.checks.iter().map(|c| c.name.as_str()).collect();
        for (name, u) in &f.upstreams {
            self.upstream(name, u, &check_names);
        }

        let mut seen = HashSet::new();
        for (i, r) in f.routes.iter().enumerate() {
            self.route(&[K("routes"), Seg::Idx(i)], r, f, &mut seen, &check_names);
        }
        if let Some(eg) = &f.egress {
            if let Some(addr) = eg.listen {
                if !addr.ip().is_loopback() {
                    self.error(
                        &[K("egress"), K("listen")],
                        format!("egress.listen must be a loopback address (got {addr}): the egress port would otherwise be an open proxy"),
                    );
                }
                if addr == p.listen || addr == f.admin.listen {
                    self.error(
                        &[K("egress"), K("listen")],
                        format!("egress.listen {addr} is already used by another listener"),
                    );
                }
            } else if !eg.routes.is_empty() {
                self.error(
                    &[K("egress")],
                    "egress routes need egress.listen (e.g. \"127.0.0.1:9080\")",
                );
            }
            // Same set as ingress routes: names are metric labels and breaker names.
            for (i, r) in eg.routes.iter().enumerate() {
                self.route(
                    &[K("egress"), K("routes"), Seg::Idx(i)],
                    r,
                    f,
                    &mut seen,
                    &check_names,
                );
            }
        }
        if same_port(p.listen, f.admin.listen) {
            self.error(
                &[K("admin"), K("listen")],
                format!(
                    "admin.listen {} is the proxy's listen address",
                    f.admin.listen
                ),
            );
        }

        self.maintenance(&f.maintenance);
        self.health(&f.health);
        self.metrics(&f.metrics, &f.health);

        let c = &f.control;
        match (&c.redis_url, &c.key) {
            (Some(url), Some(key)) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    self.error(
                        &[K("control"), K("redis_url")],
                        "control.redis_url must start with redis:// or rediss://",
                    );
                }
                if key.is_empty() {
                    self.error(&[K("control"), K("key")], "control.key must not be empty");
                }
            }
            (None, None) => {}
            // Fleet rate limits use the Redis without the maintenance key.
            (Some(url), None) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    self.error(
                        &[K("control"), K("redis_url")],
                        "control.redis_url must start with redis:// or rediss://",
                    );
                }
            }
            (None, Some(_)) => self.error(
                &[K("control")],
                "control.key is set but control.redis_url is missing",
            ),
        }
        if c.key_prefix.as_deref().is_some_and(str::is_empty) {
            self.error(
                &[K("control"), K("key_prefix")],
                "control.key_prefix must not be empty",
            );
        }
        if c.poll_interval.is_zero() {
            self.error(
                &[K("control"), K("poll_interval")],
                "poll_interval must be > 0",
            );
        }
        if f.circuit.force_open_env.is_empty() {
            self.error(
                &[K("circuit"), K("force_open_env")],
                "force_open_env must name an environment variable",
            );
        }
    }

    fn upstream(&mut self, name: &str, u: &UpstreamSection, checks: &HashSet<&str>) {
        use Seg::Key as K;
        let base = [K("upstreams"), K(name)];
        let at = |k: &'static str| [base[0], base[1], K(k)];
        if !is_label_safe(name) {
            self.error(
                &base,
                format!("upstream name `{name}` must match [a-z0-9_-]+"),
            );
        }
        if let Some(e) = u.url.error() {
            let e = upstream_url_message(u.url.raw(), e);
            if self.shorthand_upstream && name == super::SHORTHAND_UPSTREAM {
                self.error(&[K("proxy"), K("upstream")], e);
            } else {
                self.error(&at("url"), e);
            }
        }
        if u.connect_timeout.is_zero() {
            self.error(&at("connect_timeout"), "connect_timeout must be > 0");
        }
        if u.timeout.is_zero() {
            self.error(&at("timeout"), "timeout must be > 0");
        }
        if let Some(ac) = &u.adaptive_concurrency
            && !(1 <= ac.min_limit
                && ac.min_limit <= ac.initial_limit
                && ac.initial_limit <= ac.max_limit)
        {
            self.error(
                &at("adaptive_concurrency"),
                "adaptive_concurrency needs 1 <= min_limit <= initial_limit <= max_limit",
            );
        }
        // As written, so an invalid URL's TLS keys are judged too.
        let https = u.url.raw().starts_with("https://");
        for (key, path) in [
            ("ca_file", &u.ca_file),
            ("client_cert", &u.client_cert),
            ("client_key", &u.client_key),
        ] {
            if let Some(path) = path {
                if !https {
                    self.error(&at(key), format!("{key} only applies to https upstreams"));
                } else if !path.exists() {
                    self.error(
                        &at(key),
                        format!("{key} `{}` does not exist", path.display()),
                    );
                }
            }
        }
        if u.client_cert.is_some() != u.client_key.is_some() {
            self.error(&base, "client_cert and client_key go together");
        }
        if let Some(b) = &u.breaker {
            self.breaker(&[K("upstreams"), K(name), K("breaker")], b, checks);
        }
        if let Some(r) = &u.retry {
            self.retry(&[K("upstreams"), K(name), K("retry")], r);
        }
    }

    fn breaker(&mut self, base: &[Seg<'_>], b: &BreakerSection, checks: &HashSet<&str>) {
        let at = |k: &'static str| {
            let mut v = base.to_vec();
            v.push(Seg::Key(k));
            v
        };
        for (key, v) in [
            ("failure_threshold", b.failure_threshold),
            ("half_open_max_calls", b.half_open_max_calls),
            ("success_threshold", b.success_threshold),
            ("minimum_calls", b.minimum_calls),
        ] {
            if v == 0 {
                self.error(&at(key), format!("{key} must be > 0"));
            }
        }
        if b.success_threshold > b.half_open_max_calls.max(1) * 1000 {
            self.error(
                &at("success_threshold"),
                "success_threshold is unreasonably large",
            );
        }
        for (key, d) in [
            ("recovery_timeout", b.recovery_timeout),
            ("window", b.window),
            ("max_half_open_wait", b.max_half_open_wait),
        ] {
            if d.is_zero() {
                self.error(&at(key), format!("{key} must be > 0"));
            }
        }
        if let Some(rate) = b.failure_rate
            && !(rate > 0.0 && rate <= 1.0)
        {
            self.error(
                &at("failure_rate"),
                "failure_rate must be in (0, 1], e.g. 0.5",
            );
        }
        if b.slow_call_duration.is_some() && b.failure_rate.is_none() {
            self.error(
                &at("slow_call_duration"),
                "slow_call_duration only applies with failure_rate",
            );
        }
        if let Some(max) = b.max_recovery_timeout
            && max.0 < b.recovery_timeout.0
        {
            self.error(
                &at("max_recovery_timeout"),
                "max_recovery_timeout must be >= recovery_timeout",
            );
        }
        if let Some(check) = &b.recover_on_check
            && !checks.contains(check.as_str())
        {
            self.error(
                &at("recover_on_check"),
                format!("recover_on_check names no health check `{check}`"),
            );
        }
        for (i, s) in b.failure_status.iter().enumerate() {
            if !s.is_valid() {
                let mut path = at("failure_status");
                path.push(Seg::Idx(i));
                self.error(
                    &path,
                    "failure_status entries are \"5xx\", \"4xx\" or a status code such as 429",
                );
            }
        }
    }

    fn retry(&mut self, base: &[Seg<'_>], r: &RetrySection) {
        let at = |k: &'static str| {
            let mut v = base.to_vec();
            v.push(Seg::Key(k));
            v
        };
        if r.attempts == 0 {
            self.error(
                &at("attempts"),
                "attempts counts the first try too: it must be >= 1",
            );
        }
        if r.base_delay.0 > r.max_delay.0 {
            self.error(&at("base_delay"), "base_delay must be <= max_delay");
        }
        if !(r.budget >= 0.0 && r.budget.is_finite()) {
            self.error(&at("budget"), "budget must be a ratio >= 0, e.g. 0.2");
        }
        for (i, on) in r.on.iter().enumerate() {
            if !on.is_valid() {
                let on = on.raw();
                let mut path = at("on");
                path.push(Seg::Idx(i));
                self.error(&path, format!("unknown retry reason `{on}`: use connect-failure, timeout, reset, a 4xx/5xx status code or 5xx"));
            }
        }
        for (i, m) in r.methods.iter().enumerate() {
            if !m.is_valid() {
                let m = m.raw();
                let mut path = at("methods");
                path.push(Seg::Idx(i));
                self.error(
                    &path,
                    format!("`{m}` is not an HTTP method (write it in capitals)"),
                );
            }
        }
    }

    fn route(
        &mut self,
        base: &[Seg<'_>],
        r: &RouteSection,
        f: &ConfigFile,
        seen: &mut HashSet<String>,
        checks: &HashSet<&str>,
    ) {
        let at = |k: &'static str| {
            let mut v = base.to_vec();
            v.push(Seg::Key(k));
            v
        };
        if !is_label_safe(&r.name) {
            self.error(
                &at("name"),
                format!(
                    "route name `{}` must match [a-z0-9_-]+ (it is a metrics label)",
                    r.name
                ),
            );
        } else if RESERVED_ROUTE_NAMES.contains(&r.name.as_str()) {
            self.error(&at("name"), format!("route name `{}` is reserved", r.name));
        } else if !seen.insert(r.name.clone()) {
            self.error(&at("name"), format!("duplicate route name `{}`", r.name));
        }
        if !r.prefix.starts_with('/') {
            self.error(
                &at("prefix"),
                format!("prefix `{}` must start with /", r.prefix),
            );
        }
        if let Some(host) = &r.host
            && (host.is_empty() || host.contains('/'))
        {
            self.error(
                &at("host"),
                format!("host `{host}` must be a bare host name"),
            );
        }
        if !f.upstreams.contains_key(&r.upstream) {
            let known: Vec<&str> = f.upstreams.keys().map(String::as_str).collect();
            self.error(
                &at("upstream"),
                format!(
                    "route `{}` names unknown upstream `{}` (known: {})",
                    r.name,
                    r.upstream,
                    known.join(", ")
                ),
            );
        }
        if let Some(class) = &r.class
            && !is_label_safe(class)
        {
            self.error(
                &at("class"),
                format!("class `{class}` must match [a-z0-9_-]+"),
            );
        }
        if r.timeout.is_some_and(|t| t.is_zero()) {
            self.error(&at("timeout"), "timeout must be > 0");
        }
        if let Some(rl) = &r.rate_limit {
            if !(rl.per_second > 0.0 && rl.per_second.is_finite()) {
                self.error(&at("rate_limit"), "rate_limit.per_second must be > 0");
            }
            if rl.burst == Some(0) {
                self.error(&at("rate_limit"), "rate_limit.burst must be >= 1");
            }
            let rl_at = |k: &'static str| {
                let mut v = at("rate_limit");
                v.push(Seg::Key(k));
                v
            };
            if let Some(e) = rl.key.error() {
                self.error(&rl_at("key"), format!("rate_limit.{e}"));
            }
            if rl.max_keys == 0 {
                self.error(&rl_at("max_keys"), "rate_limit.max_keys must be >= 1");
            }
            if rl.scope == RateScope::Fleet && f.control.redis_url.is_none() {
                self.error(
                    &rl_at("scope"),
                    "rate_limit.scope = \"fleet\" needs [control] redis_url",
                );
            }
        }
        if let Some(b) = &r.breaker {
            self.breaker(&at("breaker"), b, checks);
        }
        if let Some(fb) = &r.fallback {
            if !fb.status.is_valid() {
                self.error(
                    &at("fallback"),
                    "fallback.status must be an HTTP status code",
                );
            }
            if !fb.content_type.is_valid() {
                self.error(
                    &at("fallback"),
                    "fallback.content_type is not a valid header value",
                );
            }
        }
    }

    fn maintenance(&mut self, m: &MaintenanceSection) {
        use Seg::Key as K;
        let at = |k: &'static str| [K("maintenance"), K(k)];
        if !m.status.is_valid() {
            self.error(&at("status"), "status must be an HTTP status code");
        }
        if !m.content_type.is_valid() {
            self.error(
                &at("content_type"),
                "content_type is not a valid header value",
            );
        }
        for (i, p) in m.exempt_prefixes.iter().enumerate() {
            if !p.starts_with('/') {
                self.error(
                    &[K("maintenance"), K("exempt_prefixes"), Seg::Idx(i)],
                    format!("`{p}` must start with /"),
                );
            }
        }
        if let Some(page) = &m.page
            && !page.exists()
        {
            self.error(
                &at("page"),
                format!("maintenance page `{}` does not exist", page.display()),
            );
        }
        for (i, w) in m.windows.iter().enumerate() {
            let path = [K("maintenance"), K("windows"), Seg::Idx(i)];
            match (w.start.is_valid(), w.end.is_valid()) {
                (true, true) if w.start.get() >= w.end.get() => {
                    self.error(&path, "window start must be before its end")
                }
                (true, true) => {}
                (false, _) => self.error(&path, not_a_time(&w.start)),
                (_, false) => self.error(&path, not_a_time(&w.end)),
            }
        }
    }

    fn health(&mut self, h: &HealthSection) {
        use Seg::Key as K;
        if !h.prefix.starts_with('/') || h.prefix.len() < 2 || h.prefix.ends_with('/') {
            self.error(
                &[K("health"), K("prefix")],
                "health.prefix must look like /_health",
            );
        }
        if h.interval.is_zero() || h.timeout.is_zero() {
            self.error(
                &[K("health")],
                "health.interval and health.timeout must be > 0",
            );
        }
        let mut seen = HashSet::new();
        for (i, c) in h.checks.iter().enumerate() {
            let base = [K("health"), K("checks"), Seg::Idx(i)];
            let at = |k: &'static str| [base[0], base[1], base[2], K(k)];
            if c.name.is_empty()
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                self.error(
                    &at("name"),
                    format!("check name `{}` must be [A-Za-z0-9._-]+", c.name),
                );
            } else if !seen.insert(c.name.as_str()) {
                self.error(&at("name"), format!("duplicate check name `{}`", c.name));
            }
            let kind = match compile_kind(c) {
                Ok(kind) => Some(kind),
                Err((key, msg)) => {
                    self.error(&at(key), msg);
                    None
                }
            };
            if c.kind == CheckType::Tcp && c.url.is_some() {
                self.error(&at("url"), "a tcp check takes `address`, not `url`");
            }
            if c.kind != CheckType::Tcp && c.address.is_some() {
                self.error(&at("address"), "`address` is for tcp checks; use `url`");
            }
            if c.query.is_some() && c.kind != CheckType::Postgres {
                self.error(&at("query"), "`query` is for postgres checks");
            }
            if (c.expect_status.is_some() || c.body_contains.is_some()) && c.kind != CheckType::Http
            {
                self.error(&base, "expect_status and body_contains are for http checks");
            }
            if let Some(es) = &c.expect_status
                && !es.is_valid()
            {
                let es = es.raw();
                self.error(
                    &at("expect_status"),
                    format!("expect_status `{es}` must look like \"200-399\" or \"200,204\""),
                );
            }
            if c.healthy_threshold == 0 || c.unhealthy_threshold == 0 {
                self.error(
                    &base,
                    "healthy_threshold and unhealthy_threshold must be >= 1",
                );
            }
            if c.interval.is_some_and(|d| d.is_zero()) || c.timeout.is_some_and(|d| d.is_zero()) {
                self.error(&base, "interval and timeout must be > 0");
            }
            if let Some(kind) = kind {
                self.checks.push(CheckSpec::from_section(c, kind, h));
            }
        }
    }

    fn metrics(&mut self, m: &MetricsSection, h: &HealthSection) {
        use Seg::Key as K;
        if !m.path.starts_with('/') {
            self.error(&[K("metrics"), K("path")], "metrics.path must start with /");
        } else if segment_prefix(&m.path, &h.prefix) {
            self.error(
                &[K("metrics"), K("path")],
                "metrics.path must not be under the health prefix",
            );
        }
        if m.buckets.is_empty()
            || m.buckets.windows(2).any(|w| w[0] >= w[1])
            || m.buckets.iter().any(|b| !b.is_finite() || *b <= 0.0)
        {
            self.error(
                &[K("metrics"), K("buckets")],
                "buckets must be positive and strictly increasing",
            );
        }
        for (i, c) in m.classes.iter().enumerate() {
            if !c.prefix.starts_with('/') || !is_label_safe(&c.class) {
                self.error(
                    &[K("metrics"), K("classes"), Seg::Idx(i)],
                    "a class needs a prefix starting with / and a name matching [a-z0-9_-]+",
                );
            }
        }
    }
}

fn not_a_time(t: &Checked<Timestamp, std::time::SystemTime>) -> String {
    format!(
        "`{}` is not an RFC 3339 time such as 2026-12-01T02:00:00Z",
        t.raw().as_text()
    )
}

fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Metric label values and route names: lowercase, digits, `_` and `-`.
pub fn is_label_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The message for an upstream `url` that did not parse. It quotes the URL, never with its
/// password.
fn upstream_url_message(raw: &str, e: &UpstreamUrlError) -> String {
    let url = crate::telemetry::redact::redact_url(raw);
    match e {
        UpstreamUrlError::Parse(reason) => format!("invalid upstream url `{url}`: {reason}"),
        UpstreamUrlError::Scheme => {
            format!("upstream url `{url}` must start with http:// or https://")
        }
        UpstreamUrlError::NoHost => format!("upstream url `{url}` has no host"),
        UpstreamUrlError::Query => format!("upstream url `{url}` must not have a query string"),
        UpstreamUrlError::Host => format!("invalid upstream url `{url}`: invalid host"),
    }
}
