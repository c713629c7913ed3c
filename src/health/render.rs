//! Bodies of the health endpoints and of `opsgate check`, as pure functions of a snapshot.
//! The HTTP server maps paths to these and copies status, content type and body into responses.
//!
//! Choices where SPEC §3 is silent:
//! - Readiness forced down by draining or by `fail_readiness` during maintenance answers 503
//!   with `"status":"unhealthy"` and `"reason":"draining"` or `"reason":"maintenance"` (draining
//!   wins when both hold); in `application/health+json` the same text goes in the top-level
//!   `output`. The checks are listed as usual.
//! - `startup`, `ready` and a single check pass (200) when healthy or degraded.
//! - `details` applies to `message` (and IETF `output`) only; "on_failure" looks at the status of
//!   the view being rendered (after draining/maintenance).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde::ser::SerializeMap;

use super::{CheckResult, Snapshot, Status, aggregate};

pub const CONTENT_JSON: &str = "application/json";
pub const CONTENT_HEALTH_JSON: &str = "application/health+json";
pub const CONTENT_EVENT_STREAM: &str = "text/event-stream";
pub const CONTENT_TEXT: &str = "text/plain; charset=utf-8";

/// `?interval=` of `/_health/stream` when absent.
pub const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_secs(5);
/// Smaller `?interval=` values are raised to this (SPEC §10).
pub const MIN_STREAM_INTERVAL: Duration = Duration::from_millis(100);

/// A response to copy out: status, `Content-Type` and body.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// Body format, from the request's `Accept`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// SPEC §3 JSON.
    #[default]
    Json,
    /// IETF health-check draft (`application/health+json`).
    HealthJson,
}

impl Format {
    /// `HealthJson` when `Accept` names `application/health+json`, else `Json`.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.to_ascii_lowercase().contains(CONTENT_HEALTH_JSON) => Format::HealthJson,
            _ => Format::Json,
        }
    }
}

/// `[health] details`: how much of the messages the proxy port shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Details {
    #[default]
    Always,
    /// Messages only while the rendered status is not healthy.
    OnFailure,
    Never,
}

/// How to render: format, details policy, and which port asks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub format: Format,
    pub details: Details,
    /// The admin port always shows messages, whatever `details` says.
    pub admin: bool,
}

impl View {
    fn shows_messages(&self, status: Status) -> bool {
        self.admin
            || match self.details {
                Details::Always => true,
                Details::OnFailure => status != Status::Healthy,
                Details::Never => false,
            }
    }
}

/// What besides the checks forces readiness down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Shutdown or `POST /_ops/drain` started.
    pub draining: bool,
    /// Maintenance is on and `[maintenance] fail_readiness` is true.
    pub maintenance_fail: bool,
}

impl Readiness {
    fn reason(&self) -> Option<&'static str> {
        if self.draining {
            Some("draining")
        } else if self.maintenance_fail {
            Some("maintenance")
        } else {
            None
        }
    }
}

/// `GET /_health/live`: 200 `{"status":"ok"}`, touching nothing.
pub fn live() -> Rendered {
    Rendered {
        status: StatusCode::OK,
        content_type: CONTENT_JSON,
        body: Bytes::from_static(br#"{"status":"ok"}"#),
    }
}

/// 404 `{"detail":"not found"}`: unknown check names and unknown `/_health` paths.
pub fn not_found() -> Rendered {
    Rendered {
        status: StatusCode::NOT_FOUND,
        content_type: CONTENT_JSON,
        body: Bytes::from_static(br#"{"detail":"not found"}"#),
    }
}

/// `GET /_health/ready`: every check; 503 when unhealthy, draining or failed by maintenance.
pub fn ready(snapshot: &Snapshot, readiness: Readiness, view: View) -> Rendered {
    let reason = readiness.reason();
    let status = if reason.is_some() {
        Status::Unhealthy
    } else {
        snapshot.status
    };
    render_list(status, reason, &snapshot.checks, view)
}

/// The ready body as a JSON value (for `/_ops/status`'s `health` field and SSE).
pub fn ready_json(snapshot: &Snapshot, readiness: Readiness, view: View) -> serde_json::Value {
    let reason = readiness.reason();
    let status = if reason.is_some() {
        Status::Unhealthy
    } else {
        snapshot.status
    };
    let view = View {
        format: Format::Json,
        ..view
    };
    serde_json::to_value(list_body(
        status,
        reason,
        snapshot.checks.iter(),
        view,
        false,
    ))
    .unwrap_or(serde_json::Value::Null)
}

/// `GET /_health/startup`: critical checks only; 200 when they all pass.
pub fn startup(snapshot: &Snapshot, view: View) -> Rendered {
    let critical: Vec<CheckResult> = snapshot
        .checks
        .iter()
        .filter(|c| c.critical)
        .cloned()
        .collect();
    render_list(snapshot.startup_status(), None, &critical, view)
}

/// `GET /_health/checks/{name}`: that check's object; 200 healthy/degraded, 503 otherwise,
/// 404 when no check has that name.
pub fn check(snapshot: &Snapshot, name: &str, view: View) -> Rendered {
    let Some(c) = snapshot.get(name) else {
        return not_found();
    };
    let show = view.shows_messages(c.status);
    let status = http_status(c.status);
    match view.format {
        Format::Json => json(status, CONTENT_JSON, &CheckJson::new(c, show, false)),
        Format::HealthJson => {
            let body = IetfBody {
                status: ietf_status(c.status),
                output: None,
                checks: IetfChecks(vec![c], show),
            };
            json(status, CONTENT_HEALTH_JSON, &body)
        }
    }
}

fn render_list(
    status: Status,
    reason: Option<&'static str>,
    checks: &[CheckResult],
    view: View,
) -> Rendered {
    let code = http_status(status);
    match view.format {
        Format::Json => json(
            code,
            CONTENT_JSON,
            &list_body(status, reason, checks.iter(), view, false),
        ),
        Format::HealthJson => {
            let body = IetfBody {
                status: ietf_status(status),
                output: reason,
                checks: IetfChecks(checks.iter().collect(), view.shows_messages(status)),
            };
            json(code, CONTENT_HEALTH_JSON, &body)
        }
    }
}

fn http_status(status: Status) -> StatusCode {
    if status.is_passing() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn json(status: StatusCode, content_type: &'static str, body: &impl Serialize) -> Rendered {
    // Serializing these plain structs cannot fail; an empty body would still be a valid answer.
    let body = serde_json::to_vec(body).unwrap_or_default();
    Rendered {
        status,
        content_type,
        body: Bytes::from(body),
    }
}

#[derive(Serialize)]
struct ListBody<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    checks: Vec<CheckJson<'a>>,
}

fn list_body<'a>(
    status: Status,
    reason: Option<&'static str>,
    checks: impl Iterator<Item = &'a CheckResult>,
    view: View,
    with_kind: bool,
) -> ListBody<'a> {
    let show = view.shows_messages(status);
    ListBody {
        status: status.as_str(),
        reason,
        checks: checks.map(|c| CheckJson::new(c, show, with_kind)).collect(),
    }
}

#[derive(Serialize)]
struct CheckJson<'a> {
    name: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    status: &'static str,
    critical: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checked_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

impl<'a> CheckJson<'a> {
    fn new(c: &'a CheckResult, show_message: bool, with_kind: bool) -> Self {
        CheckJson {
            name: &c.name,
            kind: with_kind.then_some(c.kind),
            status: c.status.as_str(),
            critical: c.critical,
            latency_ms: c.latency.map(millis),
            checked_at: c.checked_at.map(rfc3339),
            message: if show_message && c.status != Status::Healthy {
                c.message.as_deref()
            } else {
                None
            },
        }
    }
}

/// Milliseconds with microsecond precision (`2.512`, `3001.0`).
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// `2026-11-22T17:00:00Z`.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ietf_status(status: Status) -> &'static str {
    match status {
        Status::Healthy => "pass",
        Status::Degraded => "warn",
        Status::Unhealthy | Status::Unknown => "fail",
    }
}

#[derive(Serialize)]
struct IetfBody<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'static str>,
    checks: IetfChecks<'a>,
}

/// `{"name:responseTime": [{...}]}`, in check order; the flag says whether `output` is shown.
struct IetfChecks<'a>(Vec<&'a CheckResult>, bool);

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IetfCheck<'a> {
    component_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    observed_value: Option<f64>,
    observed_unit: &'static str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a str>,
}

impl Serialize for IetfChecks<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for c in &self.0 {
            let entry = IetfCheck {
                component_type: match c.kind {
                    "postgres" | "redis" => "datastore",
                    _ => "component",
                },
                observed_value: c.latency.map(millis),
                observed_unit: "ms",
                status: ietf_status(c.status),
                time: c.checked_at.map(rfc3339),
                output: if self.1 && c.status != Status::Healthy {
                    c.message.as_deref()
                } else {
                    None
                },
            };
            map.serialize_entry(&format!("{}:responseTime", c.name), &[entry])?;
        }
        map.end()
    }
}

/// One server-sent event frame; multi-line `data` becomes several `data:` lines.
pub fn sse_frame(id: Option<&str>, event: &str, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + event.len() + 24);
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The `?interval=` of `/_health/stream` from a raw query string: `2s`, `500ms` or bare seconds
/// (`2.0`); absent -> 5s; below 100ms -> 100ms. `Err` carries a message for a 400.
pub fn stream_interval(query: Option<&str>) -> Result<Duration, String> {
    let value = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("interval="));
    let Some(value) = value else {
        return Ok(DEFAULT_STREAM_INTERVAL);
    };
    let parsed = match value.parse::<f64>() {
        Ok(secs) if (0.0..1e9).contains(&secs) => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("interval `{value}` is out of range")),
        Err(_) => humantime::parse_duration(value)
            .map_err(|_| format!("interval `{value}` is not a duration (e.g. 2s, 500ms or 2.0)"))?,
    };
    Ok(parsed.max(MIN_STREAM_INTERVAL))
}

/// `opsgate check --json`: `{"status", "checks":[{"name","type","status","critical","latency_ms","checked_at","message"}]}`.
pub fn cli_json(results: &[CheckResult]) -> String {
    let status = aggregate(results);
    let view = View {
        admin: true,
        ..View::default()
    };
    serde_json::to_string(&list_body(status, None, results.iter(), view, true)).unwrap_or_default()
}

/// `opsgate check`: a table (name, kind, critical, status, latency, message) and the overall line.
pub fn cli_table(results: &[CheckResult]) -> String {
    let header = ["NAME", "KIND", "CRITICAL", "STATUS", "LATENCY", "MESSAGE"];
    let rows: Vec<[String; 6]> = results
        .iter()
        .map(|c| {
            [
                c.name.clone(),
                c.kind.to_owned(),
                if c.critical { "yes" } else { "no" }.to_owned(),
                c.status.as_str().to_owned(),
                c.latency
                    .map(|d| format!("{:.1}ms", millis(d)))
                    .unwrap_or_else(|| "-".to_owned()),
                c.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 6]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    out.push_str(&format!("\noverall: {}\n", aggregate(results)));
    out
}

/// Exit code of `opsgate check`: 0 healthy or degraded, 1 unhealthy.
pub fn cli_exit_code(results: &[CheckResult]) -> i32 {
    if aggregate(results).is_passing() {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, critical: bool, status: Status, message: Option<&str>) -> CheckResult {
        CheckResult {
            name: name.into(),
            kind: "postgres",
            critical,
            status,
            latency: (status != Status::Unknown).then_some(Duration::from_micros(2500)),
            checked_at: (status != Status::Unknown)
                .then_some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_366_800)),
            message: message.map(str::to_owned),
        }
    }

    fn snap(checks: Vec<CheckResult>) -> Snapshot {
        Snapshot::new(checks)
    }

    fn body(r: &Rendered) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn ready_body_matches_spec_shape() {
        let s = snap(vec![
            check("database", true, Status::Healthy, None),
            check(
                "cache",
                false,
                Status::Unhealthy,
                Some("timed out after 3s"),
            ),
        ]);
        let r = ready(&s, Readiness::default(), View::default());
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.content_type, CONTENT_JSON);
        assert_eq!(
            std::str::from_utf8(&r.body).unwrap(),
            r#"{"status":"degraded","checks":[{"name":"database","status":"healthy","critical":true,"latency_ms":2.5,"checked_at":"2026-11-22T17:00:00Z"},{"name":"cache","status":"unhealthy","critical":false,"latency_ms":2.5,"checked_at":"2026-11-22T17:00:00Z","message":"timed out after 3s"}]}"#
        );
    }

    #[test]
    fn draining_and_maintenance_force_503_with_reason() {
        let s = snap(vec![check("database", true, Status::Healthy, None)]);
        let r = ready(
            &s,
            Readiness {
                draining: true,
                maintenance_fail: true,
            },
            View::default(),
        );
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(&r)["status"], "unhealthy");
        assert_eq!(body(&r)["reason"], "draining");
        let r = ready(
            &s,
            Readiness {
                draining: false,
                maintenance_fail: true,
            },
            View::default(),
        );
        assert_eq!(body(&r)["reason"], "maintenance");
        let r = ready(&s, Readiness::default(), View::default());
        assert!(body(&r).get("reason").is_none());
    }

    #[test]
    fn details_policy() {
        let degraded = snap(vec![check("c", false, Status::Degraded, Some("slow"))]);
        let never = View {
            details: Details::Never,
            ..View::default()
        };
        assert!(
            body(&ready(&degraded, Readiness::default(), never))["checks"][0]
                .get("message")
                .is_none()
        );
        let admin = View {
            details: Details::Never,
            admin: true,
            ..View::default()
        };
        assert_eq!(
            body(&ready(&degraded, Readiness::default(), admin))["checks"][0]["message"],
            "slow"
        );
        let on_failure = View {
            details: Details::OnFailure,
            ..View::default()
        };
        assert_eq!(
            body(&ready(&degraded, Readiness::default(), on_failure))["checks"][0]["message"],
            "slow"
        );
    }

    #[test]
    fn startup_lists_critical_only() {
        let s = snap(vec![
            check("database", true, Status::Healthy, None),
            check("cache", false, Status::Unhealthy, Some("down")),
        ]);
        let r = startup(&s, View::default());
        assert_eq!(r.status, StatusCode::OK);
        let b = body(&r);
        assert_eq!(b["status"], "healthy");
        assert_eq!(b["checks"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn single_check_and_404() {
        let s = snap(vec![check(
            "database",
            true,
            Status::Unknown,
            Some("not checked yet"),
        )]);
        let r = check_view(&s, "database");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        let b = body(&r);
        assert_eq!(b["status"], "unknown");
        assert_eq!(b["message"], "not checked yet");
        assert!(b.get("checked_at").is_none() && b.get("latency_ms").is_none());
        assert_eq!(check_view(&s, "nope").status, StatusCode::NOT_FOUND);
    }

    fn check_view(s: &Snapshot, name: &str) -> Rendered {
        super::check(s, name, View::default())
    }

    #[test]
    fn ietf_format() {
        let s = snap(vec![
            check("database", true, Status::Healthy, None),
            check("cache", false, Status::Degraded, Some("slow")),
        ]);
        let view = View {
            format: Format::from_accept(Some("application/health+json")),
            ..View::default()
        };
        let r = ready(&s, Readiness::default(), view);
        assert_eq!(r.content_type, CONTENT_HEALTH_JSON);
        let b = body(&r);
        assert_eq!(b["status"], "warn");
        let db = &b["checks"]["database:responseTime"][0];
        assert_eq!(db["observedValue"], 2.5);
        assert_eq!(db["observedUnit"], "ms");
        assert_eq!(db["status"], "pass");
        assert_eq!(db["time"], "2026-11-22T17:00:00Z");
        assert_eq!(b["checks"]["cache:responseTime"][0]["output"], "slow");
    }

    #[test]
    fn interval_parser() {
        assert_eq!(stream_interval(None), Ok(DEFAULT_STREAM_INTERVAL));
        assert_eq!(stream_interval(Some("a=b")), Ok(DEFAULT_STREAM_INTERVAL));
        assert_eq!(
            stream_interval(Some("interval=2s")),
            Ok(Duration::from_secs(2))
        );
        assert_eq!(
            stream_interval(Some("x=1&interval=500ms")),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            stream_interval(Some("interval=2.0")),
            Ok(Duration::from_secs(2))
        );
        assert_eq!(
            stream_interval(Some("interval=0.01")),
            Ok(MIN_STREAM_INTERVAL)
        );
        assert_eq!(
            stream_interval(Some("interval=10ms")),
            Ok(MIN_STREAM_INTERVAL)
        );
        assert!(stream_interval(Some("interval=soon")).is_err());
        assert!(stream_interval(Some("interval=-1")).is_err());
    }

    #[test]
    fn sse_frames() {
        assert_eq!(
            &sse_frame(None, "health", "{}")[..],
            b"event: health\ndata: {}\n\n"
        );
        assert_eq!(
            &sse_frame(Some("7"), "x", "a\nb")[..],
            b"id: 7\nevent: x\ndata: a\ndata: b\n\n"
        );
    }

    #[test]
    fn cli_outputs() {
        let results = vec![
            check("database", true, Status::Healthy, None),
            check("cache", false, Status::Unhealthy, Some("refused")),
        ];
        assert_eq!(cli_exit_code(&results), 0);
        let table = cli_table(&results);
        assert!(table.starts_with("NAME"), "{table}");
        assert!(
            table.contains("cache     postgres  no        unhealthy  2.5ms    refused"),
            "{table}"
        );
        let json: serde_json::Value = serde_json::from_str(&cli_json(&results)).unwrap();
        assert_eq!(json["status"], "degraded");
        assert_eq!(json["checks"][1]["type"], "postgres");
        let down = vec![check("database", true, Status::Unhealthy, Some("refused"))];
        assert_eq!(cli_exit_code(&down), 1);
    }
}
