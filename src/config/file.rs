//! Serde mirror of `opsgate.toml`: every key of the file, its default, nothing resolved.
//! Leaf values are parsed as they are read ([`Checked`]); `validate` reports those that did not
//! parse and checks the rest. Unknown keys fail here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::defaults as d;
pub use super::status::StatusPattern;
use super::status::{StatusRange, StatusRanges};
use super::units::{Dur, Size};
pub use super::values::Timestamp;
use super::values::{Checked, RateKey, RetryCondition, Spelled, UpstreamUrl, UpstreamUrlError};

#[derive(Deserialize, Serialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    pub proxy: ProxySection,
    pub admin: AdminSection,
    pub upstreams: BTreeMap<String, UpstreamSection>,
    pub routes: Vec<RouteSection>,
    pub egress: Option<EgressSection>,
    pub maintenance: MaintenanceSection,
    pub circuit: CircuitSection,
    pub health: HealthSection,
    pub metrics: MetricsSection,
    pub control: ControlSection,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    #[serde(deserialize_with = "super::units::listen::deserialize")]
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSection>,
    pub max_header_bytes: Size,
    pub header_read_timeout: Dur,
    pub shutdown_delay: Dur,
    pub drain_timeout: Dur,
    pub trusted_proxies: Vec<IpNet>,
    pub encoded_slashes: EncodedSlashes,
    pub access_log: bool,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listen: d::PROXY_LISTEN,
            upstream: None,
            tls: None,
            max_header_bytes: d::MAX_HEADER_BYTES,
            header_read_timeout: d::HEADER_READ_TIMEOUT,
            shutdown_delay: d::SHUTDOWN_DELAY,
            drain_timeout: d::DRAIN_TIMEOUT,
            trusted_proxies: Vec::new(),
            encoded_slashes: EncodedSlashes::Keep,
            access_log: true,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EncodedSlashes {
    #[default]
    Keep,
    Reject,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    #[serde(deserialize_with = "super::units::listen::deserialize")]
    pub listen: SocketAddr,
    pub token: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: d::ADMIN_LISTEN,
            token: String::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    pub url: Spelled<UpstreamUrl, UpstreamUrlError>,
    pub connect_timeout: Dur,
    pub timeout: Dur,
    pub max_in_flight: u32,
    pub http2: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    pub preserve_host: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<AdaptiveConcurrencySection>,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            url: "".into(),
            connect_timeout: d::CONNECT_TIMEOUT,
            timeout: d::UPSTREAM_TIMEOUT,
            max_in_flight: 0,
            http2: false,
            ca_file: None,
            client_cert: None,
            client_key: None,
            preserve_host: true,
            breaker: None,
            retry: None,
            adaptive_concurrency: None,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSection {
    pub failure_threshold: u32,
    pub recovery_timeout: Dur,
    pub half_open_max_calls: u32,
    pub success_threshold: u32,
    pub failure_status: Vec<Checked<StatusPattern, StatusRange>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,
    pub window: Dur,
    pub minimum_calls: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_call_duration: Option<Dur>,
    pub max_half_open_wait: Dur,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_recovery_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recover_on_check: Option<String>,
    pub dry_run: bool,
}

impl Default for BreakerSection {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            recovery_timeout: d::RECOVERY_TIMEOUT,
            half_open_max_calls: 3,
            success_threshold: 2,
            failure_status: vec![Checked::builtin(StatusPattern::Text("5xx".into()))],
            failure_rate: None,
            window: d::BREAKER_WINDOW,
            minimum_calls: 20,
            slow_call_duration: None,
            max_half_open_wait: d::MAX_HALF_OPEN_WAIT,
            max_recovery_timeout: None,
            recover_on_check: None,
            dry_run: false,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySection {
    pub attempts: u32,
    pub base_delay: Dur,
    pub max_delay: Dur,
    pub on: Vec<Spelled<RetryCondition>>,
    /// `"0s"` in the file: each attempt has the whole route/upstream timeout.
    #[serde(with = "super::units::zero_is_off")]
    pub per_try_timeout: Option<Dur>,
    pub methods: Vec<Spelled<http::Method>>,
    pub budget: f64,
    pub budget_min_per_second: u32,
    pub max_body: Size,
}

impl Default for RetrySection {
    fn default() -> Self {
        Self {
            attempts: 3,
            base_delay: d::RETRY_BASE_DELAY,
            max_delay: d::RETRY_MAX_DELAY,
            on: d::RETRY_ON
                .iter()
                .map(|s| Checked::builtin(s.to_string()))
                .collect(),
            per_try_timeout: None,
            methods: d::RETRY_METHODS
                .iter()
                .map(|s| Checked::builtin(s.to_string()))
                .collect(),
            budget: 0.2,
            budget_min_per_second: 10,
            max_body: d::RETRY_MAX_BODY,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub upstream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackSection>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub per_second: f64,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub dry_run: bool,
    /// `"route"` (default), `"client_ip"` or `"header:<Name>"`.
    #[serde(default = "d::rate_limit_key")]
    pub key: Spelled<RateKey, String>,
    #[serde(default)]
    pub scope: RateScope,
    #[serde(default = "d::rate_limit_max_keys")]
    pub max_keys: usize,
}

/// Where a rate limit's budget lives.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RateScope {
    /// This instance only.
    #[default]
    Local,
    /// Shared by every instance on `[control] redis_url` and `key_prefix`.
    Fleet,
}

/// `[upstreams.<name>.adaptive_concurrency]`; the table's presence turns it on.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConcurrencySection {
    pub min_limit: u32,
    pub max_limit: u32,
    pub initial_limit: u32,
    pub dry_run: bool,
}

impl Default for AdaptiveConcurrencySection {
    fn default() -> Self {
        Self {
            min_limit: d::ADAPTIVE_MIN_LIMIT,
            max_limit: d::ADAPTIVE_MAX_LIMIT,
            initial_limit: d::ADAPTIVE_INITIAL_LIMIT,
            dry_run: false,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackSection {
    #[serde(default = "d::fallback_status")]
    pub status: Checked<u16, http::StatusCode>,
    #[serde(default = "d::json_content_type")]
    pub content_type: Spelled<http::HeaderValue>,
    #[serde(default)]
    pub body: String,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EgressSection {
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::units::listen::option::deserialize"
    )]
    pub listen: Option<SocketAddr>,
    pub routes: Vec<RouteSection>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MaintenanceMode {
    #[default]
    Writes,
    All,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceSection {
    pub enabled: bool,
    pub env: String,
    pub flag_file: String,
    pub mode: MaintenanceMode,
    pub exempt_prefixes: Vec<String>,
    pub allow_ips: Vec<IpNet>,
    pub bypass_token: String,
    pub retry_after: Dur,
    pub status: Checked<u16, http::StatusCode>,
    pub content_type: Spelled<http::HeaderValue>,
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<PathBuf>,
    pub fail_readiness: bool,
    pub windows: Vec<WindowSection>,
}

impl Default for MaintenanceSection {
    fn default() -> Self {
        Self {
            enabled: false,
            env: "MAINTENANCE_MODE".into(),
            flag_file: String::new(),
            mode: MaintenanceMode::Writes,
            exempt_prefixes: vec!["/_health".into(), "/metrics".into()],
            allow_ips: Vec::new(),
            bypass_token: String::new(),
            retry_after: d::MAINTENANCE_RETRY_AFTER,
            status: Checked::builtin(503),
            content_type: d::json_content_type(),
            body: r#"{"detail":"maintenance"}"#.into(),
            page: None,
            fail_readiness: false,
            windows: Vec::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowSection {
    pub start: Checked<Timestamp, SystemTime>,
    pub end: Checked<Timestamp, SystemTime>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitSection {
    pub force_open_env: String,
}

impl Default for CircuitSection {
    fn default() -> Self {
        Self {
            force_open_env: "CIRCUIT_OPEN".into(),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Details {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub prefix: String,
    pub interval: Dur,
    pub timeout: Dur,
    pub details: Details,
    pub wait_for_critical: Dur,
    pub checks: Vec<CheckSection>,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            prefix: "/_health".into(),
            interval: d::CHECK_INTERVAL,
            timeout: d::CHECK_TIMEOUT,
            details: Details::Always,
            wait_for_critical: Dur::secs(0),
            checks: Vec::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    Postgres,
    Redis,
    Http,
    Tcp,
}

/// One `[[health.checks]]` table as written: every kind's keys, so a key of another kind is
/// reported by `validate` with a sentence rather than as unknown. Compiled into a
/// [`CheckSpec`](super::checks::CheckSpec), whose kind carries only its own fields.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckSection {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: CheckType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<Spelled<StatusRanges>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_over: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default = "d::yes")]
    pub critical: bool,
    #[serde(default = "d::one")]
    pub healthy_threshold: u32,
    #[serde(default = "d::one")]
    pub unhealthy_threshold: u32,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub path: String,
    pub on_proxy_port: bool,
    pub buckets: Vec<f64>,
    pub classes: Vec<ClassSection>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            path: "/metrics".into(),
            on_proxy_port: true,
            buckets: d::BUCKETS.to_vec(),
            classes: Vec::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassSection {
    pub prefix: String,
    pub class: String,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub poll_interval: Dur,
    /// Prefix of fleet rate-limit keys; unset: `opsgate:${SERVICE_NAME:-default}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
}

impl Default for ControlSection {
    fn default() -> Self {
        Self {
            redis_url: None,
            key: None,
            poll_interval: d::FLEET_POLL_INTERVAL,
            key_prefix: None,
        }
    }
}
