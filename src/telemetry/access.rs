//! The access log: one JSON line per request, formatted by hand into a reused buffer.
//! tracing's JSON formatter costs ~20k instructions a line; this is a few hundred.

use std::io::Write;
use std::time::{Duration, SystemTime};

use super::batch::Batcher;

/// Where access lines go. `Json` batches them per thread for the log writer (the same
/// stream as every other line, up to `batch::FLUSH_INTERVAL` later); `Tracing` emits
/// events for the human-readable format; `Off` when `OPSGATE_LOG` filters target `access`
/// at INFO out.
#[derive(Clone)]
pub enum AccessLog {
    Json(Batcher),
    Tracing,
    Off,
}

/// One request, as the access line shows it.
pub struct Entry<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub bytes: u64,
    pub names: Names<'a>,
    /// The client's IP as text.
    pub client: &'a [u8],
    pub request_id: Option<&'a [u8]>,
    pub error: Option<&'a str>,
}

impl AccessLog {
    /// Whether lines are written at all; `false` lets the runtime skip the access log.
    pub fn is_on(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    pub fn write(&self, e: &Entry<'_>) {
        match self {
            AccessLog::Off => {}
            // Formatted straight into the thread's batch: no copy, no allocation.
            AccessLog::Json(batch) => batch.write(|line| format_json(line, e, SystemTime::now())),
            AccessLog::Tracing => tracing::info!(
                target: "access",
                method = e.method,
                path = e.path,
                status = e.status,
                duration_ms = e.duration.as_secs_f64() * 1000.0,
                bytes = e.bytes,
                route = e.names.route(),
                upstream = e.names.upstream(),
                client = std::str::from_utf8(e.client).unwrap_or("?"),
                request_id = e.request_id.and_then(|v| std::str::from_utf8(v).ok()),
                error = e.error,
            ),
        }
    }
}

/// Which route answered, as the access line names it.
#[derive(Clone, Copy)]
pub enum Names<'a> {
    /// A configured route, with its upstream.
    Route(&'a RouteNames),
    /// No configured route: `system` (probes, scrapes) or an unmatched request's.
    Unrouted(&'a str),
}

impl<'a> Names<'a> {
    fn route(self) -> &'a str {
        match self {
            Names::Route(n) => &n.route,
            Names::Unrouted(r) => r,
        }
    }

    fn upstream(self) -> Option<&'a str> {
        match self {
            Names::Route(n) => Some(&n.upstream),
            Names::Unrouted(_) => None,
        }
    }
}

/// A route's name and its upstream's, and the two as access lines carry them: escaped
/// once, when the route is built, instead of on every line.
pub struct RouteNames {
    route: std::sync::Arc<str>,
    upstream: std::sync::Arc<str>,
    /// `,"route":"…","upstream":"…"`
    json: Box<[u8]>,
}

impl RouteNames {
    pub fn new(route: std::sync::Arc<str>, upstream: std::sync::Arc<str>) -> Self {
        let mut json = Vec::new();
        names_json(&mut json, &route, Some(&upstream));
        Self {
            route,
            upstream,
            json: json.into(),
        }
    }
}

fn names_json(out: &mut Vec<u8>, route: &str, upstream: Option<&str>) {
    out.extend_from_slice(b",\"route\":");
    json_str(out, route.as_bytes());
    if let Some(u) = upstream {
        out.extend_from_slice(b",\"upstream\":");
        json_str(out, u.as_bytes());
    }
}

/// The same shape tracing's JSON lines have, so one parser reads every line.
pub fn format_json(out: &mut Vec<u8>, e: &Entry<'_>, now: SystemTime) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    rfc3339_micros(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"method\":\"");
    // A method is a token (RFC 9110 §9.1), which has nothing to escape; hyper's parser
    // and `http::Method` accept nothing else.
    out.extend_from_slice(e.method.as_bytes());
    out.extend_from_slice(b"\",\"path\":");
    json_str(out, e.path.as_bytes());
    // Integers through itoa: this runs once per request, and float formatting
    // (`{:.3}`) costs more than the rest of the line.
    let mut ints = itoa::Buffer::new();
    out.extend_from_slice(b",\"status\":");
    out.extend_from_slice(ints.format(e.status).as_bytes());
    out.extend_from_slice(b",\"duration_ms\":");
    millis_3(out, e.duration);
    out.extend_from_slice(b",\"bytes\":");
    out.extend_from_slice(ints.format(e.bytes).as_bytes());
    match e.names {
        Names::Route(n) => out.extend_from_slice(&n.json),
        Names::Unrouted(route) => names_json(out, route, None),
    }
    out.extend_from_slice(b",\"client\":\"");
    out.extend_from_slice(e.client);
    out.push(b'"');
    if let Some(id) = e.request_id {
        out.extend_from_slice(b",\"request_id\":");
        json_str(out, id);
    }
    if let Some(err) = e.error {
        out.extend_from_slice(b",\"error\":");
        json_str(out, err.as_bytes());
    }
    out.extend_from_slice(b",\"target\":\"access\"}\n");
}

thread_local! {
    /// `YYYY-MM-DDTHH:MM:SS` of the last second a line was written in on this thread:
    /// the calendar arithmetic runs once a second, not once a line.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// `now` as RFC 3339 UTC with microseconds, as `humantime::format_rfc3339_micros` prints it.
fn rfc3339_micros(out: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let date = SECOND.with(|cell| {
        let (cached, text) = cell.get();
        if cached == secs {
            return text;
        }
        let mut text = [0u8; 19];
        let whole =
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                .to_string();
        text.copy_from_slice(&whole.as_bytes()[..19]);
        cell.set((secs, text));
        text
    });
    out.extend_from_slice(&date);
    let micros = since.subsec_micros();
    let mut frac = [b'.', 0, 0, 0, 0, 0, 0, b'Z'];
    let mut rest = micros;
    for digit in frac[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&frac);
}

/// A duration in milliseconds with three decimals (microseconds, rounded), as `{:.3}`
/// would print it.
fn millis_3(out: &mut Vec<u8>, d: Duration) {
    // In u64, not the u128 `as_nanos` gives: no 128-bit division per line.
    let micros = d.as_secs() * 1_000_000 + u64::from(d.subsec_nanos() + 500) / 1000;
    let mut ints = itoa::Buffer::new();
    out.extend_from_slice(ints.format(micros / 1000).as_bytes());
    let frac = (micros % 1000) as u16;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// A JSON string. Runs of plain bytes are copied whole; quotes, backslashes and control
/// characters are escaped, and bytes that are not UTF-8 become U+FFFD.
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    if is_plain_ascii(s) {
        // Nearly every value (method, path, route, request id): no escape, valid UTF-8.
        out.extend_from_slice(s);
    } else {
        match std::str::from_utf8(s) {
            Ok(text) => escape_into(out, text),
            Err(_) => escape_into(out, &String::from_utf8_lossy(s)),
        }
    }
    out.push(b'"');
}

/// Printable ASCII other than the quote and the backslash. Without an early exit, so the loop vectorizes.
fn is_plain_ascii(s: &[u8]) -> bool {
    s.iter().fold(true, |ok, &b| {
        ok & (b' '..=b'~').contains(&b) & (b != b'"') & (b != b'\\')
    })
}

fn escape_into(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' || b == b'\\' || b < 0x20 {
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => {
                    let _ = write!(out, "\\u{b:04x}");
                }
            }
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_valid_json_with_every_field() {
        let mut out = Vec::new();
        let e = Entry {
            method: "GET",
            path: "/a\"b\\c\u{1}",
            status: 200,
            duration: Duration::from_micros(1500),
            bytes: 13,
            names: Names::Route(&RouteNames::new("api".into(), "app".into())),
            client: b"127.0.0.1",
            request_id: Some(b"abc"),
            error: None,
        };
        format_json(&mut out, &e, SystemTime::UNIX_EPOCH);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["route"], "api");
        assert_eq!(v["upstream"], "app");
        assert_eq!(v["path"], "/a\"b\\c\u{1}");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["target"], "access");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["request_id"], "abc");
        assert!(v.get("error").is_none());
    }

    #[test]
    fn route_names_are_escaped_and_an_unrouted_line_has_no_upstream() {
        let names = RouteNames::new("r\"1".into(), "up\\x".into());
        let line = |names| {
            let mut out = Vec::new();
            let e = Entry {
                method: "PURGE",
                path: "/",
                status: 200,
                duration: Duration::ZERO,
                bytes: 0,
                names,
                client: b"::1",
                request_id: None,
                error: None,
            };
            format_json(&mut out, &e, SystemTime::UNIX_EPOCH);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        let routed = line(Names::Route(&names));
        assert_eq!(routed["route"], "r\"1");
        assert_eq!(routed["upstream"], "up\\x");
        assert_eq!(routed["method"], "PURGE");
        let unrouted = line(Names::Unrouted("un\"matched"));
        assert_eq!(unrouted["route"], "un\"matched");
        assert!(unrouted.get("upstream").is_none());
    }

    #[test]
    fn timestamps_read_as_humantime_prints_them() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_563_331);
        // Same second twice (the cache), the next second, a year later, the epoch.
        for t in [
            base + Duration::from_micros(7),
            base + Duration::from_micros(999_999),
            base + Duration::from_secs(1),
            base + Duration::from_secs(366 * 86_400) + Duration::from_nanos(123_456_789),
            SystemTime::UNIX_EPOCH,
        ] {
            let mut out = Vec::new();
            rfc3339_micros(&mut out, t);
            let expected = humantime::format_rfc3339_micros(t).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn durations_print_as_milliseconds_with_three_decimals() {
        for (d, text) in [
            (Duration::ZERO, "0.000"),
            (Duration::from_nanos(499), "0.000"),
            (Duration::from_nanos(500), "0.001"),
            (Duration::from_micros(1500), "1.500"),
            (Duration::from_micros(12_345_678), "12345.678"),
            (Duration::from_nanos(999_999_600), "1000.000"),
        ] {
            let mut out = Vec::new();
            millis_3(&mut out, d);
            assert_eq!(std::str::from_utf8(&out).unwrap(), text, "{d:?}");
        }
    }
}
