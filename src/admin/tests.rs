//! The admin routes in process: the service function called with handles built here,
//! no listener and no binary.

use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::Full;

use super::*;
use crate::config::Config;
use crate::endpoints;
use crate::ops::MaintenanceSettings;
use crate::telemetry::MetricsRegistry;

const TOKEN: &str = "adm-tok-4711";

/// Answers every reload with `outcome` and counts the calls.
struct Scripted {
    outcome: ReloadOutcome,
    calls: AtomicUsize,
}

impl Reload for Scripted {
    async fn reload(&self) -> ReloadOutcome {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.outcome.clone()
    }

    fn last(&self) -> Arc<ReloadStatus> {
        Arc::new(ReloadStatus::initial())
    }
}

fn config(token: &str) -> Arc<Config> {
    let text = format!("[admin]\ntoken = \"{token}\"\n");
    let config =
        crate::config::parse_str(&text, "t.toml", &Default::default(), &|_: &str| None).unwrap();
    Arc::new(config)
}

fn admin(token: &str, outcome: ReloadOutcome) -> Arc<Admin<Scripted>> {
    let config = config(token);
    let metrics = Arc::new(MetricsRegistry::new(&config.file.metrics.buckets));
    let runtime = crate::proxy::runtime::build_for_test(config, &metrics).unwrap();
    let live = Arc::new(ArcSwap::from_pointee(runtime));
    let health = Health::new();
    let maintenance = Maintenance::new(MaintenanceSettings::default());
    let drain = Arc::new(Drain::default());
    let local = Arc::new(Local::new(endpoints::Handles {
        live: live.clone(),
        metrics,
        health: health.clone(),
        maintenance: maintenance.clone(),
        drain: drain.clone(),
    }));
    Arc::new(Admin {
        live,
        local,
        health,
        maintenance,
        fleet: Arc::new(Mutex::new(None)),
        drain,
        events: Arc::new(Events::default()),
        reload: Scripted {
            outcome,
            calls: AtomicUsize::new(0),
        },
        started: Instant::now(),
        session_secret: [7; 32],
    })
}

fn applied() -> ReloadOutcome {
    ReloadOutcome::Applied {
        warnings: Vec::new(),
    }
}

/// `(status, headers, body)` of one request through the admin service.
async fn call<R: Reload>(
    admin: &Arc<Admin<R>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = handle(admin, req).await;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

#[tokio::test]
async fn ops_routes_need_the_token_as_bearer_or_session_cookie() {
    let admin = admin(TOKEN, applied());

    let (status, headers, body) = call(&admin, "GET", "/_ops/status", &[], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"detail":"unauthorized"}"#);
    assert_eq!(
        headers[header::WWW_AUTHENTICATE],
        r#"Bearer realm="opsgate""#
    );

    let wrong = [("authorization", "Bearer adm-tok-4712")];
    let (status, _, _) = call(&admin, "GET", "/_ops/status", &wrong, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let auth = bearer();
    let right = [("authorization", auth.as_str())];
    let (status, _, body) = call(&admin, "GET", "/_ops/status", &right, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["config"]["last_reload"]["result"], "success");

    // What needs no token still answers without one.
    let (status, _, _) = call(&admin, "GET", "/_health/live", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&admin, "GET", "/_ops/", &[], "").await;
    assert_eq!(status, StatusCode::OK);

    // A wrong token gets no cookie; the right one gets a cookie that authorizes.
    let (status, _, _) = call(&admin, "POST", "/_ops/session", &[], "nope").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, headers, _) = call(&admin, "POST", "/_ops/session", &[], TOKEN).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let set = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        !set.contains(TOKEN),
        "the cookie must not carry the token: {set}"
    );
    assert!(
        set.ends_with("; Path=/_ops; HttpOnly; SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    let (status, _, _) = call(&admin, "GET", "/_ops/status", &[("cookie", &cookie)], "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn no_token_configured_leaves_the_ops_api_open() {
    let admin = admin("", applied());
    let (status, _, _) = call(&admin, "GET", "/_ops/maintenance", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, _) = call(&admin, "POST", "/_ops/session", &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(headers.get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn the_maintenance_override_goes_on_off_and_clears_through_the_handle() {
    let admin = admin(TOKEN, applied());
    let auth = bearer();
    let auth = [("authorization", auth.as_str())];
    let put = |body: &'static str| call(&admin, "PUT", "/_ops/maintenance", &auth, body);

    let (status, _, body) = put(r#"{"enabled":true,"reason":"db migration"}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(admin.maintenance.is_on());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["enabled"], true);
    assert_eq!(v["held_by"], json!(["override"]));
    assert_eq!(v["sources"]["override"], true);
    assert_eq!(v["reason"], "db migration");
    assert_eq!(
        v["sources"]["fleet"],
        Value::Null,
        "no fleet key configured"
    );

    let (status, _, body) = put(r#"{"enabled":false}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!admin.maintenance.is_on());
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["sources"]["override"],
        false
    );

    let (status, _, body) = put(r#"{"enabled":null}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!admin.maintenance.is_on());
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["sources"]["override"],
        Value::Null
    );

    // The GET body is the PUT's answer.
    let (_, _, got) = call(&admin, "GET", "/_ops/maintenance", &auth, "").await;
    assert_eq!(got, body);

    // `enabled` is required: a missing key must not read as "clear".
    let (status, _, _) = put(r#"{"reason":"x"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn reload_answers_with_the_outcome_of_the_reload_handle() {
    let auth = bearer();
    let auth = [("authorization", auth.as_str())];

    let ok = admin(
        TOKEN,
        ReloadOutcome::Applied {
            warnings: vec!["w".into()],
        },
    );
    let (status, _, body) = call(&ok, "POST", "/_ops/reload", &auth, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, r#"{"result":"success","warnings":["w"]}"#);
    assert_eq!(ok.reload.calls.load(Ordering::Relaxed), 1);

    let bad = admin(TOKEN, ReloadOutcome::Failed("bad file".into()));
    let (status, _, body) = call(&bad, "POST", "/_ops/reload", &auth, "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body, r#"{"error":"bad file","result":"failure"}"#);

    // Without the token the handle is never called.
    let (status, _, _) = call(&bad, "POST", "/_ops/reload", &[], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad.reload.calls.load(Ordering::Relaxed), 1);
    let (status, headers, _) = call(&bad, "GET", "/_ops/reload", &auth, "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers[header::ALLOW], "GET, HEAD");
}

#[test]
fn percent_decoding_of_breaker_names() {
    assert_eq!(percent_decode("route%3Aapi"), "route:api");
    assert_eq!(percent_decode("app"), "app");
    assert_eq!(percent_decode("%a\u{e9}"), "%a\u{e9}");
    assert_eq!(percent_decode("x%"), "x%");
}

/// The event stream through the service function, on tokio's paused clock: a quiet
/// stream still sends a fresh `status` every 5 s, and a drain through the API shows up
/// as its own event before the next `status`.
#[tokio::test(start_paused = true)]
async fn the_event_stream_sends_status_when_quiet_and_events_as_they_happen() {
    let admin = admin(TOKEN, applied());
    let auth = bearer();
    let auth = [("authorization", auth.as_str())];
    let req = Request::builder()
        .uri("/_ops/events")
        .header("authorization", &bearer())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = handle(&admin, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let mut next_event = async || {
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let text = String::from_utf8(frame.to_vec()).unwrap();
        let kind = text
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap()
            .to_owned();
        (kind, tokio::time::Instant::now())
    };

    let (kind, first) = next_event().await;
    assert_eq!(kind, "status");
    let (kind, quiet) = next_event().await;
    assert_eq!(kind, "status");
    assert_eq!(quiet - first, events::STATUS_EVERY);

    let (status, _, _) = call(&admin, "POST", "/_ops/drain", &auth, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(admin.drain.is_draining());
    assert_eq!(next_event().await.0, "drain");
    assert_eq!(next_event().await.0, "status");
}
