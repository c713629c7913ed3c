//! Every default of the config file, in one place, as documented constants.
//! `file.rs` reads them; `config/opsgate.toml` shows them to users.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::units::{Dur, Size};
use super::values::{Checked, Spelled};

/// Proxy listener: every interface, as a sidecar's port must be reachable from the pod network.
pub const PROXY_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080);
/// Admin listener: loopback only unless a token is set.
pub const ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);
/// `admin.token` when the file has no such key: `token = "${OPSGATE_ADMIN_TOKEN:-}"` (SPEC §2),
/// so a token from a Kubernetes Secret protects the API without a line of config.
pub const ADMIN_TOKEN_ENV: &str = "OPSGATE_ADMIN_TOKEN";
/// Request line + headers above this get 431.
pub const MAX_HEADER_BYTES: Size = Size(64 * 1024);
/// A client that has not sent its whole header block by then is cut off (slowloris).
pub const HEADER_READ_TIMEOUT: Dur = Dur::secs(10);
pub const SHUTDOWN_DELAY: Dur = Dur::secs(0);
pub const DRAIN_TIMEOUT: Dur = Dur::secs(30);
pub const CONNECT_TIMEOUT: Dur = Dur::secs(2);
pub const UPSTREAM_TIMEOUT: Dur = Dur::secs(30);
pub const RECOVERY_TIMEOUT: Dur = Dur::secs(30);
pub const BREAKER_WINDOW: Dur = Dur::secs(10);
pub const MAX_HALF_OPEN_WAIT: Dur = Dur::secs(10);
pub const RETRY_BASE_DELAY: Dur = Dur::millis(100);
pub const RETRY_MAX_DELAY: Dur = Dur::secs(2);
pub const RETRY_ON: &[&str] = &["connect-failure", "timeout", "502", "503", "504"];
/// Idempotent methods only: a POST may have had its effect before the failure.
pub const RETRY_METHODS: &[&str] = &["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];
pub const RETRY_MAX_BODY: Size = Size(64 * 1024);
pub const MAINTENANCE_RETRY_AFTER: Dur = Dur::secs(300);
pub const CHECK_INTERVAL: Dur = Dur::secs(10);
pub const CHECK_TIMEOUT: Dur = Dur::secs(3);
pub const FLEET_POLL_INTERVAL: Dur = Dur::secs(5);
/// Keyed rate-limit buckets kept per route (SPEC §11).
pub const RATE_LIMIT_MAX_KEYS: usize = 100_000;
/// Fleet rate-limit key prefix when `[control] key_prefix` is unset; the
/// service name comes from `SERVICE_NAME` at load.
pub const KEY_PREFIX_SERVICE_DEFAULT: &str = "default";
pub const ADAPTIVE_MIN_LIMIT: u32 = 4;
pub const ADAPTIVE_MAX_LIMIT: u32 = 1000;
pub const ADAPTIVE_INITIAL_LIMIT: u32 = 20;
pub const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub fn fallback_status() -> Checked<u16, http::StatusCode> {
    Checked::builtin(200)
}
pub fn json_content_type() -> Spelled<http::HeaderValue> {
    Checked::builtin("application/json".into())
}
pub fn yes() -> bool {
    true
}
pub fn one() -> u32 {
    1
}
pub fn rate_limit_key() -> Spelled<super::values::RateKey, String> {
    Checked::builtin("route".into())
}
pub fn rate_limit_max_keys() -> usize {
    RATE_LIMIT_MAX_KEYS
}
