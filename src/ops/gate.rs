//! The maintenance gate: may this request pass while maintenance is on?
//!
//! Pure functions called by `proxy/maintenance.rs` after path normalization and before
//! routing, with the caller's snapshot of the settings and one `Maintenance::is_on` load.
//! The allow path allocates nothing; the reject path only clones reference-counted bytes.

use crate::paths::segment_prefix;
use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{ACCEPT, COOKIE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use ipnet::IpNet;

use super::maintenance::{MaintenanceSettings, Mode};
use super::windows;

/// Header carrying the bypass token.
pub const BYPASS_HEADER: &str = "x-maintenance-bypass";
/// Cookie carrying the bypass token.
pub const BYPASS_COOKIE: &str = "opsgate_bypass";

/// The answer to a request stopped by maintenance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaintenanceReject {
    pub status: StatusCode,
    /// Value of the `Retry-After` header, in whole seconds.
    pub retry_after_secs: u64,
    pub body: MaintenanceBody,
}

/// Which body the reject carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaintenanceBody {
    /// The configured HTML page (`Content-Type: text/html; charset=utf-8`).
    Page(Bytes),
    /// The configured body with its content type.
    Body {
        content_type: HeaderValue,
        body: Bytes,
    },
}

/// Decides one request: `None` lets it through, `Some` is the answer to send instead.
///
/// `normalized_path` is the path after normalization (SPEC §4), `client_ip` the result
/// of [`client_ip`]. Reads the clock only when it rejects inside a window.
pub fn decide(
    settings: &MaintenanceSettings,
    maintenance_on: bool,
    method: &Method,
    normalized_path: &str,
    client_ip: IpAddr,
    headers: &HeaderMap,
) -> Option<MaintenanceReject> {
    decide_with(
        settings,
        maintenance_on,
        method,
        normalized_path,
        client_ip,
        headers,
        SystemTime::now,
    )
}

/// [`decide`] with the clock given, for tests.
pub fn decide_at(
    settings: &MaintenanceSettings,
    maintenance_on: bool,
    method: &Method,
    normalized_path: &str,
    client_ip: IpAddr,
    headers: &HeaderMap,
    now: SystemTime,
) -> Option<MaintenanceReject> {
    decide_with(
        settings,
        maintenance_on,
        method,
        normalized_path,
        client_ip,
        headers,
        || now,
    )
}

fn decide_with(
    settings: &MaintenanceSettings,
    maintenance_on: bool,
    method: &Method,
    path: &str,
    client_ip: IpAddr,
    headers: &HeaderMap,
    now: impl FnOnce() -> SystemTime,
) -> Option<MaintenanceReject> {
    if !maintenance_on || passes(settings, method, path, client_ip, headers) {
        return None;
    }
    let retry_after = if settings.windows.is_empty() {
        settings.retry_after
    } else {
        windows::remaining_at(&settings.windows, now()).unwrap_or(settings.retry_after)
    };
    // Round up: a client that retries after this many seconds must not be early.
    let retry_after_secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let body = match &settings.page {
        Some(page) if prefers_html(headers, &settings.content_type) => {
            MaintenanceBody::Page(page.clone())
        }
        _ => MaintenanceBody::Body {
            content_type: settings.content_type.clone(),
            body: settings.body.clone(),
        },
    };
    Some(MaintenanceReject {
        status: settings.status,
        retry_after_secs,
        body,
    })
}

/// Whether a request goes through although maintenance is on.
fn passes(
    settings: &MaintenanceSettings,
    method: &Method,
    path: &str,
    client_ip: IpAddr,
    headers: &HeaderMap,
) -> bool {
    if settings.mode == Mode::Writes
        && (method == Method::GET || method == Method::HEAD || method == Method::OPTIONS)
    {
        return true;
    }
    if settings
        .exempt_prefixes
        .iter()
        .any(|prefix| segment_prefix(path, prefix))
    {
        return true;
    }
    let client_ip = client_ip.to_canonical();
    if settings
        .allow_ips
        .iter()
        .any(|net| net.contains(&client_ip))
    {
        return true;
    }
    match settings.bypass_token.as_deref() {
        Some(token) if !token.is_empty() => has_bypass_token(headers, token.as_bytes()),
        _ => false,
    }
}

fn has_bypass_token(headers: &HeaderMap, token: &[u8]) -> bool {
    if headers
        .get_all(BYPASS_HEADER)
        .iter()
        .any(|value| constant_time_eq(value.as_bytes(), token))
    {
        return true;
    }
    headers.get_all(COOKIE).iter().any(|value| {
        value.as_bytes().split(|&b| b == b';').any(|pair| {
            let pair = pair.trim_ascii();
            match pair.iter().position(|&b| b == b'=') {
                Some(eq) => {
                    pair[..eq].trim_ascii() == BYPASS_COOKIE.as_bytes()
                        && constant_time_eq(pair[eq + 1..].trim_ascii(), token)
                }
                None => false,
            }
        })
    })
}

/// Compares without an early exit on the first differing byte, so the time taken does
/// not tell how much of a guessed token was right (the length may leak; it is not secret
/// enough to matter next to the token itself).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Whether the client's `Accept` prefers `text/html` over the configured content type.
/// Only an explicit `text/html` or `text/*` counts for HTML, so `*/*` (curl, most API
/// clients) gets the configured body and a browser gets the page.
pub fn prefers_html(headers: &HeaderMap, content_type: &HeaderValue) -> bool {
    let essence = content_type
        .to_str()
        .ok()
        .and_then(|ct| ct.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    let (ct_type, ct_sub) = essence.split_once('/').unwrap_or((essence, ""));
    // (specificity, q) of the best-matching range for each side.
    let mut html: (i8, f32) = (-1, 0.0);
    let mut other: (i8, f32) = (-1, 0.0);
    for value in headers.get_all(ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let range = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .or_else(|| p.trim().strip_prefix("Q="))
                })
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let Some((ty, sub)) = range.split_once('/') else {
                continue;
            };
            let html_spec = if ty.eq_ignore_ascii_case("text") && sub.eq_ignore_ascii_case("html") {
                2
            } else if ty.eq_ignore_ascii_case("text") && sub == "*" {
                1
            } else {
                -1
            };
            let other_spec = if ty.eq_ignore_ascii_case(ct_type) && sub.eq_ignore_ascii_case(ct_sub)
            {
                2
            } else if ty.eq_ignore_ascii_case(ct_type) && sub == "*" {
                1
            } else if ty == "*" && sub == "*" {
                0
            } else {
                -1
            };
            if html_spec > html.0 || (html_spec == html.0 && html_spec >= 0 && q > html.1) {
                html = (html_spec, q);
            }
            if other_spec > other.0 || (other_spec == other.0 && other_spec >= 0 && q > other.1) {
                other = (other_spec, q);
            }
        }
    }
    html.0 >= 0 && html.1 > 0.0 && html.1 >= other.1
}

/// The client address for `allow_ips`: `X-Forwarded-For` is believed only when the
/// peer is a trusted proxy, and then the rightmost address that is not itself trusted
/// is the client. A spoofed header from an untrusted peer changes nothing.
pub fn client_ip(peer: IpAddr, xff: Option<&HeaderValue>, trusted_proxies: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let Some(list) = xff.and_then(|v| v.to_str().ok()) else {
        return peer;
    };
    let mut client = peer;
    for entry in list.rsplit(',') {
        let Some(ip) = parse_forwarded_ip(entry.trim()) else {
            // Garbage in the chain: the last hop we could verify is all we know.
            return client;
        };
        client = ip;
        if !trusted(&ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn html_only_when_asked_for() {
        let json = HeaderValue::from_static("application/json");
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(prefers_html(&accept(browser), &json));
        assert!(!prefers_html(&accept("*/*"), &json));
        assert!(!prefers_html(&HeaderMap::new(), &json));
        assert!(!prefers_html(
            &accept("application/json, text/html;q=0.5"),
            &json
        ));
        assert!(!prefers_html(&accept("text/html;q=0"), &json));
        assert!(prefers_html(&accept("text/*"), &json));
    }

    #[test]
    fn segment_boundaries() {
        assert!(segment_prefix("/_health", "/_health"));
        assert!(segment_prefix("/_health/", "/_health"));
        assert!(segment_prefix("/_health/x", "/_health"));
        assert!(!segment_prefix("/_healthx", "/_health"));
        assert!(segment_prefix("/_health", "/_health/"));
        assert!(segment_prefix("/anything", "/"));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn forwarded_entries_with_ports() {
        assert_eq!(
            parse_forwarded_ip("1.2.3.4:80"),
            Some("1.2.3.4".parse().unwrap())
        );
        assert_eq!(parse_forwarded_ip("[::1]:80"), Some("::1".parse().unwrap()));
        assert_eq!(parse_forwarded_ip("unknown"), None);
    }
}
