//! The fuzz targets' bodies: one `check_*` function per target, each taking raw bytes and
//! asserting the invariants of one pure part of opsgate. The `cargo fuzz` targets call them,
//! and the stable test suite replays the committed corpus through the same functions.
//!
//! Only opsgate's own dependencies are used here, so the test suite can include this file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use opsgate::config::units::{Size, format_duration, parse_duration, parse_size};
use opsgate::paths::segment_prefix;
use opsgate::proxy::admission::RateLimiter;
use opsgate::proxy::breaker::{
    Breaker, BreakerPolicy, Outcome, Permit, RateRule, State, Transition,
};
use opsgate::proxy::headers;
use opsgate::proxy::normalize::{Normalized, normalize};
use opsgate::proxy::retry::{RetryBudget, parse_retry_after};
use tokio::time::Instant;

/// The targets, by name: the corpus directory names under `fuzz/corpus/`.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("config", check_config),
    ("normalize", check_normalize),
    ("headers", check_headers),
    ("maintenance", check_maintenance),
    ("units", check_units),
    ("resilience", check_resilience),
];

/// Reads structured values off the front of the fuzz input; zeros once it runs dry.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Up to the next `sep` (consumed), or the rest.
    fn field(&mut self, sep: u8) -> &'a [u8] {
        match self.data.iter().position(|b| *b == sep) {
            Some(i) => {
                let (f, rest) = self.data.split_at(i);
                self.data = &rest[1..];
                f
            }
            None => std::mem::take(&mut self.data),
        }
    }
}

// ---------------------------------------------------------------------------------------
// config: TOML text + environment -> validated runtime
// ---------------------------------------------------------------------------------------

/// Input: TOML text, then optionally a NUL byte and `NAME=value` lines for `${VAR}`s.
/// A rejection must carry a line:col inside the text; an accepted config must build.
pub fn check_config(data: &[u8]) {
    let mut input = Input::new(data);
    let Ok(text) = std::str::from_utf8(input.field(0)) else {
        return;
    };
    let env: Vec<(String, String)> = input
        .field(0)
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = std::str::from_utf8(line).ok()?;
            let (k, v) = line.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let overrides = opsgate::config::Overrides::default();
    let config = match opsgate::config::parse_str(text, "fuzz.toml", &overrides, &lookup) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.diagnostics.is_empty(), "a rejection with no message");
            let lines = text.split('\n').count();
            for d in &e.diagnostics {
                let (line, col) = d.at.unwrap_or_else(|| panic!("no line:col: {}", d.message));
                assert!(line >= 1 && col >= 1, "line:col is 1-based: {line}:{col}");
                assert!(line <= lines, "line {line} past the end ({lines} lines)");
                assert!(!d.message.is_empty(), "empty message at {line}:{col}");
            }
            let _ = e.summary();
            return;
        }
    };
    let _ = config.redacted_json();
    // Files named by the config are read at build time; keep the fuzzer off devices.
    if text.contains("/dev/") || text.contains("/proc/") || text.contains("/sys/") {
        return;
    }
    build_runtime(config, &lookup);
}

fn build_runtime(config: opsgate::config::Config, env: &dyn Fn(&str) -> Option<String>) {
    use opsgate::proxy::runtime::{Deps, Runtime};
    install_crypto();
    let mut config = config;
    // The page is a file read from disk; its bytes do not take part in any decision here.
    config.file.maintenance.page = None;
    let Ok(maintenance) = opsgate::app::build::maintenance_settings(&config, env) else {
        return;
    };
    let metrics = opsgate::telemetry::metrics::MetricsRegistry::new(&config.file.metrics.buckets);
    let built = Runtime::build(
        Arc::new(config),
        None,
        Deps {
            http: &metrics.http,
            ops: &metrics.ops,
            resilience: &metrics.resilience,
            on_breaker: Arc::new(|_: &str, _: &Transition| {}),
            access_log: Arc::new(opsgate::telemetry::access::AccessLog::Tracing),
            maintenance: Arc::new(maintenance),
            env,
        },
    );
    if let Ok(rt) = built {
        let _ = rt.class_of("/");
        let _ = rt.ingress.find(None, "/");
    }
}

fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

// ---------------------------------------------------------------------------------------
// normalize: idempotent, no dot segments, no encoded slash past "reject", prefix matching
// ---------------------------------------------------------------------------------------

/// Input: one flag byte (bit 0: reject encoded slashes), a prefix up to NUL, then the path.
pub fn check_normalize(data: &[u8]) {
    let mut input = Input::new(data);
    let reject = input.u8() & 1 == 1;
    let Ok(prefix) = std::str::from_utf8(input.field(0)) else {
        return;
    };
    let Ok(path) = std::str::from_utf8(input.data) else {
        return;
    };
    let out = match normalize(path, reject) {
        Normalized::EncodedSlash => {
            assert!(reject, "EncodedSlash without reject for {path:?}");
            return;
        }
        Normalized::Path(p) => p.into_owned(),
    };
    assert!(out.starts_with('/'), "{path:?} -> {out:?} is not absolute");
    assert!(
        !out.contains("//"),
        "{path:?} -> {out:?} has an empty segment"
    );
    for seg in out.split('/') {
        assert!(
            seg != "." && seg != "..",
            "{path:?} -> {out:?} has a dot segment"
        );
        // What an upstream that decodes once sees must not be a dot segment either.
        let once = percent_decode(seg.as_bytes(), false);
        assert!(
            once != b"." && once != b"..",
            "{path:?} -> {out:?} has an encoded dot segment {seg:?}"
        );
    }
    if reject {
        assert!(
            !has_encoded_slash_naive(&out),
            "{path:?} -> {out:?} carries an encoded slash past reject"
        );
    }
    match normalize(&out, reject) {
        Normalized::Path(again) => assert_eq!(again, out, "normalize is not idempotent"),
        Normalized::EncodedSlash => panic!("{out:?} (from {path:?}) is rejected on a second pass"),
    }
    assert_eq!(
        segment_prefix(&out, prefix),
        naive_segment_prefix(&out, prefix),
        "segment_prefix({out:?}, {prefix:?}) disagrees with the reference"
    );
}

fn has_encoded_slash_naive(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    l.contains("%2f") || l.contains("%5c")
}

/// Reference: split both into segments; the prefix's segments (trailing `/` ignored) must
/// be the path's first segments.
fn naive_segment_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    if prefix.is_empty() {
        return true;
    }
    if !path.starts_with(prefix) {
        return false;
    }
    let p: Vec<&str> = path.split('/').collect();
    let q: Vec<&str> = prefix.split('/').collect();
    q.len() <= p.len() && p[..q.len()] == q[..]
}

/// Decodes every valid `%XX` once (`keep_slashes`: `%2F`/`%5C` stay), as an upstream would.
fn percent_decode(b: &[u8], keep_slashes: bool) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let c = h * 16 + l;
            if !(keep_slashes && (c == b'/' || c == b'\\')) {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// RFC 3986 §5.2.4 on segments, by the book, for the reference views.
fn resolve_dots(path: &[u8]) -> Vec<u8> {
    let mut segs: Vec<&[u8]> = Vec::new();
    let parts: Vec<&[u8]> = path.split(|b| *b == b'/').skip(1).collect();
    let n = parts.len();
    for (i, seg) in parts.into_iter().enumerate() {
        match seg {
            b"." | b".." => {
                if seg == b".." {
                    segs.pop();
                }
                if i + 1 == n {
                    segs.push(b"");
                }
            }
            s => segs.push(s),
        }
    }
    let mut out = Vec::new();
    for s in segs {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

// ---------------------------------------------------------------------------------------
// headers: hop-by-hop stripping, X-Forwarded-For and trusted proxies, request id
// ---------------------------------------------------------------------------------------

/// Input: flag byte, peer selector, trusted-net selectors, then `name: value` lines.
pub fn check_headers(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let peer = pick_ip(input.u8());
    let trusted: Vec<IpNet> = (0..input.u8() % 4).map(|_| pick_net(input.u8())).collect();
    let mut h = HeaderMap::new();
    while !input.is_empty() {
        let line = input.field(b'\n');
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    let original = h.clone();

    // X-Forwarded-For resolution against a reference walk.
    let xff = h.get(&headers::X_FORWARDED_FOR);
    let got = opsgate::ops::client_ip(peer, xff, &trusted);
    assert_eq!(
        got,
        naive_client_ip(peer, xff, &trusted),
        "client_ip disagrees with the reference for {xff:?}"
    );
    if !trusted.iter().any(|n| n.contains(&peer.to_canonical())) {
        assert_eq!(
            got,
            peer.to_canonical(),
            "an untrusted peer's XFF was believed"
        );
    }

    // Hop-by-hop stripping.
    let version = if flags & 1 == 0 {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_2
    };
    let upgrade = headers::upgrade_kind(&h, version);
    headers::strip_hop_by_hop(&mut h, upgrade);
    let tunnel = upgrade == headers::Upgrade::Tunnel;
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "trailer",
        "transfer-encoding",
    ] {
        assert!(!h.contains_key(name), "{name} survived stripping");
    }
    if tunnel {
        assert_eq!(h.get_all(header::CONNECTION).iter().count(), 1);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert!(h.contains_key(header::UPGRADE));
    } else {
        assert!(!h.contains_key(header::CONNECTION), "connection survived");
        assert!(!h.contains_key(header::UPGRADE), "upgrade survived");
    }
    for v in original.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',') {
            let Ok(named) = HeaderName::from_bytes(token.trim_ascii()) else {
                continue;
            };
            if tunnel && (named == header::UPGRADE || named == header::CONNECTION) {
                continue;
            }
            assert!(
                !h.contains_key(&named),
                "{named} is named by Connection but was forwarded"
            );
        }
    }
    for te in h.get_all(header::TE) {
        assert!(
            te.as_bytes().eq_ignore_ascii_case(b"trailers"),
            "TE {te:?} forwarded (only `trailers` may pass)"
        );
    }
    // Nothing else is touched.
    for (name, value) in &original {
        if !h.contains_key(name) {
            continue;
        }
        if name == header::CONNECTION || name == header::TE {
            continue;
        }
        assert!(
            h.get_all(name).iter().any(|v| v == value),
            "{name}: {value:?} changed by stripping"
        );
    }

    // Forwarded headers.
    let tls = flags & 2 != 0;
    let peer_trusted = flags & 4 != 0;
    let host = original.get(header::HOST).cloned();
    let before = h.clone();
    headers::set_forwarded(
        &mut h,
        &headers::ip_header_value(peer),
        tls,
        host.as_ref(),
        peer_trusted,
    );
    let xff = h
        .get(&headers::X_FORWARDED_FOR)
        .expect("X-Forwarded-For is always set");
    let peer_text = peer.to_string();
    assert!(
        xff.as_bytes().ends_with(peer_text.as_bytes()),
        "XFF {xff:?} does not end with the peer {peer_text}"
    );
    match before.get(&headers::X_FORWARDED_FOR) {
        Some(prev) if !prev.is_empty() => {
            assert!(
                xff.as_bytes().starts_with(prev.as_bytes()),
                "XFF lost its chain"
            )
        }
        _ => assert_eq!(xff.as_bytes(), peer_text.as_bytes()),
    }
    let proto = h
        .get(&headers::X_FORWARDED_PROTO)
        .expect("X-Forwarded-Proto is always set");
    if !(peer_trusted && before.contains_key(&headers::X_FORWARDED_PROTO)) {
        assert_eq!(proto, if tls { "https" } else { "http" });
    }
    if !peer_trusted && let Some(host) = &host {
        assert_eq!(h.get(&headers::X_FORWARDED_HOST), Some(host));
    }

    // Request id: the client's if sane, else 32 hex digits.
    let id = headers::ensure_request_id(&mut h);
    assert!(!id.is_empty() && id.len() <= 200);
    assert_eq!(h.get(&headers::X_REQUEST_ID), Some(&id));
    match before.get(&headers::X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 200 => assert_eq!(&id, v),
        _ => assert!(id.len() == 32 && id.as_bytes().iter().all(u8::is_ascii_hexdigit)),
    }

    // The replay copy a retry sends: every line back, in order, sensitivity included.
    if flags & 8 != 0
        && let Some(v) = h.get_mut(&headers::X_FORWARDED_FOR)
    {
        v.set_sensitive(true);
    }
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.headers = h;
    let again = opsgate::proxy::replay::Replay::lines(&head)
        .head()
        .expect("a copied head comes back");
    let lines = |m: &HeaderMap| -> Vec<(HeaderName, HeaderValue, bool)> {
        m.iter()
            .map(|(n, v)| (n.clone(), v.clone(), v.is_sensitive()))
            .collect()
    };
    assert_eq!(
        lines(&again.headers),
        lines(&head.headers),
        "replay changed the head"
    );

    // The HTTP/1.1 copy: the head as hyper writes it, a body after it, parsed back. On
    // the wire a value's leading and trailing blanks are not part of it (RFC 9110 §5.5).
    let mut written = b"GET /p?q HTTP/1.1\r\n".to_vec();
    for (name, value) in &head.headers {
        written.extend_from_slice(name.as_str().as_bytes());
        written.extend_from_slice(b": ");
        written.extend_from_slice(value.as_bytes());
        written.extend_from_slice(b"\r\n");
    }
    written.extend_from_slice(b"\r\nbody\r\n\r\n");
    let mut replay = opsgate::proxy::replay::Replay::default();
    replay.keep_written(written);
    let again = replay.head().expect("a written head comes back");
    assert_eq!(again.method, http::Method::GET);
    assert_eq!(again.uri, "/p?q");
    let trimmed = |m: &HeaderMap| -> Vec<(HeaderName, Vec<u8>)> {
        m.iter()
            .map(|(n, v)| {
                let v = v.as_bytes();
                let blank = |b: &u8| *b == b' ' || *b == b'\t';
                let start = v.iter().position(|b| !blank(b)).unwrap_or(v.len());
                let end = v.iter().rposition(|b| !blank(b)).map_or(start, |i| i + 1);
                (n.clone(), v[start..end].to_vec())
            })
            .collect()
    };
    assert_eq!(
        trimmed(&again.headers),
        trimmed(&head.headers),
        "the written head changed"
    );
}

/// The rightmost address not itself a trusted proxy, walking from the trusted peer.
fn naive_client_ip(peer: IpAddr, xff: Option<&HeaderValue>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return peer;
    }
    // A header that is not visible ASCII (obs-text) is garbage as a whole: the trusted
    // peer is the last hop known.
    let Some(text) = xff.and_then(|v| v.to_str().ok()) else {
        return peer;
    };
    let entries: Vec<&str> = text.split(',').map(str::trim).collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let ip = entry
            .parse::<IpAddr>()
            .ok()
            .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()));
        let Some(ip) = ip.map(|ip| ip.to_canonical()) else {
            return client;
        };
        client = ip;
        if !is_trusted(ip) {
            return ip;
        }
    }
    client
}

fn pick_ip(b: u8) -> IpAddr {
    match b % 6 {
        0 => IpAddr::V4(Ipv4Addr::new(10, 0, 0, b / 6)),
        1 => IpAddr::V4(Ipv4Addr::new(192, 168, 1, b)),
        2 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        3 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        4 => IpAddr::V6(Ipv4Addr::new(10, 0, 0, b).to_ipv6_mapped()),
        _ => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(b))),
    }
}

fn pick_net(b: u8) -> IpNet {
    let text = match b % 6 {
        0 => "10.0.0.0/8",
        1 => "192.168.1.0/24",
        2 => "127.0.0.1/32",
        3 => "::1/128",
        4 => "fd00::/8",
        _ => "0.0.0.0/0",
    };
    text.parse().expect("static net")
}

// ---------------------------------------------------------------------------------------
// maintenance: a write passes only under an exempt prefix it really lies under
// ---------------------------------------------------------------------------------------

/// Input: flag byte, method selector, an exempt prefix up to NUL, then the raw request path.
pub fn check_maintenance(data: &[u8]) {
    use opsgate::ops::maintenance::{MaintenanceSettings, Mode};
    let mut input = Input::new(data);
    let flags = input.u8();
    let reject = flags & 1 == 1;
    let mode = if flags & 2 == 0 {
        Mode::Writes
    } else {
        Mode::All
    };
    let method = match input.u8() % 5 {
        0 => Method::POST,
        1 => Method::PUT,
        2 => Method::DELETE,
        3 => Method::PATCH,
        _ => Method::GET,
    };
    let Ok(prefix) = std::str::from_utf8(input.field(0)) else {
        return;
    };
    // Config validation holds exempt prefixes to absolute, normal paths.
    if !prefix.starts_with('/')
        || !matches!(normalize(prefix, false), Normalized::Path(p) if p == prefix)
    {
        return;
    }
    // The request line the client sent; the proxy sees what `http::Uri` accepts.
    let Ok(uri) = std::str::from_utf8(input.data).map(str::parse::<http::Uri>) else {
        return;
    };
    let Ok(uri) = uri else { return };
    let raw = uri.path();
    let path = match normalize(raw, reject) {
        Normalized::Path(p) => p.into_owned(),
        Normalized::EncodedSlash => return,
    };
    let mut settings = MaintenanceSettings::default();
    settings.mode = mode;
    settings.exempt_prefixes = vec![prefix.to_string()];
    let client = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    let passed = opsgate::ops::gate::decide_at(
        &settings,
        true,
        &method,
        &path,
        client,
        &HeaderMap::new(),
        UNIX_EPOCH,
    )
    .is_none();
    let write = method != Method::GET;
    if !passed || (!write && mode == Mode::Writes) {
        return;
    }
    // The app decodes the forwarded path once (encoded slashes too, unless rejected) and
    // resolves dot segments: that view must lie under the prefix as the app reads it too.
    let upstream_view = resolve_dots(&percent_decode(path.as_bytes(), !reject));
    let prefix_view = percent_decode(prefix.as_bytes(), !reject);
    assert!(
        naive_segment_prefix_bytes(&upstream_view, &prefix_view),
        "{method} {raw:?} passed exempt prefix {prefix:?}, but the app sees {:?}",
        String::from_utf8_lossy(&upstream_view)
    );
}

fn naive_segment_prefix_bytes(path: &[u8], prefix: &[u8]) -> bool {
    let prefix = prefix.strip_suffix(b"/").unwrap_or(prefix);
    if prefix.is_empty() {
        return true;
    }
    let p: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
    let q: Vec<&[u8]> = prefix.split(|b| *b == b'/').collect();
    q.len() <= p.len() && p[..q.len()] == q[..]
}

// ---------------------------------------------------------------------------------------
// units and Retry-After
// ---------------------------------------------------------------------------------------

/// Input: selector byte, then text.
pub fn check_units(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.u8();
    let Ok(text) = std::str::from_utf8(input.data) else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(d) = parse_duration(text) {
                assert!(
                    d <= Duration::from_secs(10 * 366 * 86400),
                    "{text:?} -> {d:?}"
                );
                let shown = format_duration(d);
                let back = parse_duration(&shown)
                    .unwrap_or_else(|e| panic!("{d:?} shown as {shown:?} does not parse: {e}"));
                let diff = back.abs_diff(d);
                assert!(
                    diff < Duration::from_millis(1),
                    "{text:?} -> {d:?} -> {shown:?} -> {back:?}"
                );
            }
        }
        1 => {
            if let Ok(n) = parse_size(text) {
                let shown = Size(n).to_string();
                assert_eq!(parse_size(&shown), Ok(n), "{text:?} -> {n} -> {shown:?}");
            }
        }
        _ => {
            let Ok(value) = HeaderValue::from_str(text) else {
                return;
            };
            let t1 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            let t2 = t1 + Duration::from_secs(3600);
            let a = parse_retry_after(&value, t1);
            let b = parse_retry_after(&value, t2);
            assert_eq!(a.is_some(), b.is_some(), "{text:?} parses at one time only");
            if let (Some(a), Some(b)) = (a, b) {
                assert!(b <= a, "{text:?}: later is not sooner ({a:?} then {b:?})");
                let t = text.trim();
                if t.bytes().all(|c| c.is_ascii_digit()) {
                    assert_eq!(a, b, "delta-seconds depend on the clock");
                    if let Ok(n) = t.parse::<u64>() {
                        assert_eq!(a, Duration::from_secs(n));
                    }
                } else {
                    assert!(
                        a.saturating_sub(b) <= Duration::from_secs(3600),
                        "a date moved by more than the clock"
                    );
                    assert_eq!(t.len(), 29, "{t:?} accepted as an IMF-fixdate");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// breaker, retry budget and rate limiter under random event sequences
// ---------------------------------------------------------------------------------------

/// Input: policy bytes, then one event per byte (with an argument byte).
pub fn check_resilience(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => breaker_sequence(&mut input),
        1 => budget_sequence(&mut input),
        _ => limiter_sequence(&mut input),
    }
}

fn breaker_sequence(input: &mut Input<'_>) {
    let failure_threshold = u32::from(input.u8() % 8);
    let recovery_ms = u64::from(input.u8()) * 10 + 1;
    let half_open_max_calls = u32::from(input.u8() % 4);
    let success_threshold = u32::from(input.u8() % 4);
    let rate_byte = input.u8();
    let rate = (rate_byte & 1 == 1).then(|| RateRule {
        failure_rate: f64::from(rate_byte >> 1).max(1.0) / 127.0,
        window: Duration::from_millis(u64::from(input.u8()) * 50 + 10),
        minimum_calls: u32::from(input.u8() % 16),
        slow_call_duration: None,
    });
    let backoff = input.u8();
    let policy = BreakerPolicy {
        failure_threshold,
        recovery_timeout: Duration::from_millis(recovery_ms),
        half_open_max_calls,
        success_threshold,
        rate,
        max_half_open_wait: Duration::from_millis(u64::from(input.u8()) * 20 + 1),
        max_recovery_timeout: (backoff & 1 == 1)
            .then(|| Duration::from_millis(recovery_ms * u64::from(backoff >> 1).max(1))),
        dry_run: false,
    };
    let max_open = policy
        .max_recovery_timeout
        .unwrap_or(policy.recovery_timeout)
        .max(policy.recovery_timeout)
        .mul_f64(1.11)
        + Duration::from_millis(1);
    let seen: Arc<Mutex<Vec<Transition>>> = Arc::default();
    let log = seen.clone();
    let origin = Instant::now();
    let mut now = origin;
    let breaker = Arc::new(Breaker::new(
        policy.clone(),
        Arc::new(move |t: &Transition| log.lock().expect("log").push(*t)),
        now,
    ));
    // Permits with the epoch they were admitted in: a transition starts a new one, and
    // outcomes of older permits do not count towards the consecutive rule.
    let mut held: Vec<(Permit, usize)> = Vec::new();
    let mut epoch = 0usize;
    let mut consecutive_in_closed = 0u32;
    let mut last_transitions = 0;
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        steps += 1;
        let op = input.u8();
        let arg = input.u8();
        let before = breaker.snapshot(now).state;
        match op % 8 {
            0 | 1 => match breaker.try_acquire(now) {
                Ok(p) => {
                    assert!(
                        !matches!(before, State::Open | State::ForcedOpen),
                        "admitted while {before:?}"
                    );
                    held.push((p, epoch))
                }
                Err(r) => {
                    assert!(
                        !matches!(before, State::Closed | State::Disabled),
                        "rejected while {before:?}"
                    );
                    assert!(r.retry_after_secs() >= 1);
                    if r.state == State::Open {
                        assert!(r.retry_after <= max_open, "open for {:?}", r.retry_after);
                    }
                }
            },
            2..=4 if !held.is_empty() => {
                let (p, admitted_in) = held.swap_remove(usize::from(arg) % held.len());
                let outcome = if op % 8 == 2 {
                    Outcome::Success
                } else {
                    Outcome::Failure
                };
                let counts = admitted_in == epoch && before == State::Closed && !p.is_trial();
                p.record(now, outcome);
                if counts && policy.rate.is_none() {
                    if outcome == Outcome::Failure {
                        consecutive_in_closed += 1;
                    } else {
                        consecutive_in_closed = 0;
                    }
                }
            }
            5 if !held.is_empty() => {
                let _ = held.swap_remove(usize::from(arg) % held.len());
            }
            6 => now += Duration::from_millis(u64::from(arg) * 7),
            7 => match arg % 8 {
                0 => {
                    // A reset of a closed breaker clears its counts but keeps its generation:
                    // calls admitted before it still report (and a success still counts).
                    breaker.reset(now);
                    consecutive_in_closed = 0;
                }
                1 => breaker.force_open(now),
                2 => breaker.disable(now),
                3 => breaker.check_passed(now),
                _ => now += Duration::from_micros(u64::from(arg) * 97),
            },
            _ => now += Duration::from_millis(1),
        }
        let snap = breaker.snapshot(now);
        let transitions = seen.lock().expect("log").len();
        if transitions != last_transitions {
            last_transitions = transitions;
            epoch += 1;
            consecutive_in_closed = 0;
        }
        if policy.rate.is_none() && snap.state == State::Closed {
            assert!(
                consecutive_in_closed < failure_threshold.max(1),
                "{consecutive_in_closed} consecutive failures and still closed"
            );
        }
        assert_eq!(
            snap.total_calls,
            snap.successful_calls
                + snap.failed_calls
                + snap.rejected_calls
                + snap.cancelled_calls
                + snap.in_flight,
            "counters do not add up: {snap:?}"
        );
        assert!(
            snap.in_flight <= held.len() as u64,
            "{snap:?} vs {} held",
            held.len()
        );
        if snap.state == State::Open {
            assert!(
                snap.remaining_timeout_s <= max_open.as_secs_f64(),
                "{snap:?}"
            );
        }
        let c = breaker.counts();
        assert_eq!(
            c.total - (c.success + c.failure + c.rejected + c.cancelled),
            held.len() as u64
        );
    }
    drop(held);
    let c = breaker.counts();
    assert_eq!(c.total, c.success + c.failure + c.rejected + c.cancelled);
    // Every transition legal, chained, and reported once.
    let seen = seen.lock().expect("log");
    let mut state = State::Closed;
    for t in seen.iter() {
        assert!(t.is_legal(), "illegal transition {t:?}");
        assert_eq!(
            t.from, state,
            "transition {t:?} does not start where the last ended"
        );
        assert_eq!(t.open_for.is_some(), t.to == State::Open, "{t:?}");
        if let Some(d) = t.open_for {
            assert!(d <= max_open, "{t:?} longer than the policy allows");
        }
        state = t.to;
    }
    assert_eq!(seen.len() as u64, c.state_changes);
    assert_eq!(state, breaker.state());
}

fn budget_sequence(input: &mut Input<'_>) {
    let ratio = f64::from(input.u8()) / 100.0;
    let floor = u32::from(input.u8() % 8);
    let origin = Instant::now();
    let mut now = origin;
    let budget = RetryBudget::new(ratio, floor, origin);
    // Reference: (second, is_retry) of every counted event.
    let mut events: Vec<(u64, bool)> = Vec::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        steps += 1;
        let op = input.u8();
        let sec = now.duration_since(origin).as_secs();
        let in_window = |e: &(u64, bool)| e.0 + 10 > sec;
        match op % 4 {
            0 | 1 => {
                budget.record_request(now);
                events.push((sec, false));
            }
            2 => {
                let requests = events.iter().filter(|e| in_window(e) && !e.1).count() as f64;
                let retries = events.iter().filter(|e| in_window(e) && e.1).count() as f64;
                let allowed = ratio * requests + f64::from(floor) * 10.0;
                let ok = budget.try_withdraw(now);
                assert_eq!(
                    ok,
                    retries + 1.0 <= allowed,
                    "withdraw {ok} with {retries} retries, {requests} requests, allowed {allowed}"
                );
                if ok {
                    events.push((sec, true));
                }
            }
            _ => now += Duration::from_millis(u64::from(op >> 2) * 40),
        }
        let sec = now.duration_since(origin).as_secs();
        let (r, t) = budget.usage(now);
        let want_r = events.iter().filter(|e| e.0 + 10 > sec && !e.1).count() as u64;
        let want_t = events.iter().filter(|e| e.0 + 10 > sec && e.1).count() as u64;
        // (The bound holds when a retry is withdrawn, checked above; later, requests can
        // age out of the window before the retries they paid for.)
        assert_eq!((r, t), (want_r, want_t), "usage at second {sec}");
    }
}

fn limiter_sequence(input: &mut Input<'_>) {
    let per_second = f64::from(input.u16().max(1)) / 16.0;
    let burst = u32::from(input.u8() % 32);
    let origin = Instant::now();
    let limiter = RateLimiter::new_at(per_second, burst, origin);
    let interval = Duration::from_secs_f64(1.0 / per_second);
    let mut now = origin;
    let mut admitted: Vec<Duration> = Vec::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        steps += 1;
        let op = input.u8();
        if op & 1 == 0 {
            now += Duration::from_micros(u64::from(op) * u64::from(input.u8()) * 10);
            continue;
        }
        let at = now.duration_since(origin);
        match limiter.try_acquire(now) {
            Ok(()) => admitted.push(at),
            Err(wait) => {
                assert!(wait > Duration::ZERO, "refused with no wait");
                assert!(
                    wait <= interval + Duration::from_micros(1),
                    "wait {wait:?} longer than one interval {interval:?}"
                );
                // Waiting as told is enough.
                let later = now + wait;
                if op & 2 == 2 {
                    now = later;
                    limiter
                        .try_acquire(now)
                        .unwrap_or_else(|w| panic!("told to wait {wait:?}, then told {w:?}"));
                    admitted.push(now.duration_since(origin));
                }
            }
        }
        // Over any stretch, at most burst + stretch x rate admissions (GCRA's bound).
        if let Some(&last) = admitted.last() {
            for (i, &first) in admitted.iter().enumerate().rev().take(64) {
                let n = (admitted.len() - i) as f64;
                let span = (last - first).as_secs_f64();
                let bound = f64::from(burst.max(1)) + span * per_second + 1e-6 * per_second + 1e-9;
                assert!(
                    n <= bound.floor() + 1.0,
                    "{n} admitted in {span}s (bound {bound})"
                );
            }
        }
    }
}
