//! Health endpoints, `wait_for_critical` and the `check` / `wait` commands through the real
//! daemon: checks against live, dead and silent dependencies, observed over HTTP on the proxy
//! and admin ports, in the metrics and in the logs.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::metrics::{sample, scrape, series};
use crate::support::opsgate::{self, Answer, Launch, Opsgate, get, http1, run_to_end, send};
use crate::support::redis::RedisServer;
use crate::support::upstream::{Upstream, full, refused_url};
use crate::support::{SilentServer, eventually, free_port};

/// Generous bound on scheduling noise on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(700);
/// Check interval used by most configs below.
const INTERVAL: Duration = Duration::from_millis(100);

/// A port that accepts TCP connections (and drops them) until dropped.
struct Port {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Port {
    async fn open() -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Opens a given port (one picked by `free_port` earlier).
    async fn open_at(port: u16) -> Self {
        Self::serve(TcpListener::bind(("127.0.0.1", port)).await.unwrap())
    }

    fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                drop(sock);
            }
        });
        Port { addr, task }
    }

    /// Stops accepting and closes the port; returns once connects are refused.
    async fn close(self) {
        let addr = self.addr;
        drop(self);
        eventually(Duration::from_secs(2), "the port to close", || async move {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await;
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address nothing listens on.
fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn tcp_check(name: &str, address: impl std::fmt::Display, critical: bool) -> String {
    format!(
        "[[health.checks]]\nname = \"{name}\"\ntype = \"tcp\"\naddress = \"{address}\"\ncritical = {critical}\n"
    )
}

/// A config proxying to `upstream`, with `proxy` keys, `health` keys (100 ms interval and
/// 300 ms timeout unless overridden per check) and the given checks.
fn config(upstream: &str, proxy: &str, health: &str, checks: &[String]) -> String {
    format!(
        "[proxy]\nupstream = \"{upstream}\"\n{proxy}\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\n{health}\n{}",
        checks.concat()
    )
}

async fn start(checks: &[String]) -> Opsgate {
    start_with("", checks).await
}

async fn start_with(health: &str, checks: &[String]) -> Opsgate {
    Opsgate::start(&config(&refused_url(), "", health, checks)).await
}

async fn head(url: &str) -> Answer {
    let req = Request::head(url).body(full(Bytes::new())).unwrap();
    send(&http1(), req).await
}

async fn post(url: &str) -> Answer {
    let req = Request::post(url).body(full(Bytes::new())).unwrap();
    send(&http1(), req).await
}

/// The check named `name` in a ready/startup body.
fn check_in<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks list in {body}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {body}"))
}

fn names(body: &Value) -> Vec<String> {
    body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `/_health/ready` shows check `name` with `status`; returns the body.
async fn await_check(og: &Opsgate, name: &str, status: &str, limit: Duration) -> Value {
    let url = og.url("/_health/ready");
    let deadline = Instant::now() + limit;
    loop {
        let body = get(&url, &[]).await.json();
        if check_in(&body, name)["status"] == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "check {name} not {status} within {limit:?}; last ready body: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn has_message(body: &Value) -> bool {
    body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c.get("message").is_some())
}

#[tokio::test]
async fn live_is_ok_with_every_dependency_down_and_head_mirrors_get() {
    let og = start(&[
        tcp_check("db", dead_addr(), true),
        tcp_check("cache", dead_addr(), false),
    ])
    .await;
    await_check(&og, "db", "unhealthy", SLACK).await;
    await_check(&og, "cache", "unhealthy", SLACK).await;

    let live = get(&og.url("/_health/live"), &[]).await;
    assert_eq!(live.status, StatusCode::OK);
    assert_eq!(live.json(), serde_json::json!({"status": "ok"}));

    for (path, want) in [
        ("/_health/live", StatusCode::OK),
        ("/_health/ready", StatusCode::SERVICE_UNAVAILABLE),
        ("/_health/startup", StatusCode::SERVICE_UNAVAILABLE),
        ("/_health/checks/db", StatusCode::SERVICE_UNAVAILABLE),
        ("/_health/checks/nope", StatusCode::NOT_FOUND),
    ] {
        let g = get(&og.url(path), &[]).await;
        let h = head(&og.url(path)).await;
        assert_eq!(g.status, want, "GET {path}: {}", g.text());
        assert_eq!(h.status, want, "HEAD {path}");
        assert!(h.body.is_empty(), "HEAD {path} has a body: {}", h.text());
        assert_eq!(
            h.header("content-type"),
            g.header("content-type"),
            "HEAD {path} content type"
        );
    }
    let h = head(&og.url("/_health/stream")).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.header("content-type"), Some("text/event-stream"));
    assert!(h.body.is_empty());
}

#[tokio::test]
async fn a_check_that_has_not_run_is_unknown_and_not_ready() {
    // An HTTP check against a server that accepts and never answers: the first run takes its
    // whole 2 s timeout, so right after start nothing has a result yet.
    let silent = SilentServer::start().await;
    let check = format!(
        "[[health.checks]]\nname = \"slow\"\ntype = \"http\"\nurl = \"http://{}/health\"\n\
         interval = \"60s\"\ntimeout = \"2s\"\n",
        silent.addr
    );
    let og = start(&[check]).await;

    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    let body = ready.json();
    assert_eq!(body["status"], "unhealthy", "{body}");
    let slow = check_in(&body, "slow");
    assert_eq!(slow["status"], "unknown", "{body}");
    assert_eq!(slow["message"], "not checked yet", "{body}");
    assert!(slow.get("checked_at").is_none(), "{body}");

    let startup = get(&og.url("/_health/startup"), &[]).await;
    assert_eq!(startup.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(check_in(&startup.json(), "slow")["status"], "unknown");
    let one = get(&og.url("/_health/checks/slow"), &[]).await;
    assert_eq!(one.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(one.json()["status"], "unknown");
}

#[tokio::test]
async fn critical_down_fails_ready_and_startup() {
    let cache = Port::open().await;
    let og = start(&[
        tcp_check("db", dead_addr(), true),
        tcp_check("cache", cache.addr, false),
    ])
    .await;
    await_check(&og, "db", "unhealthy", SLACK).await;
    await_check(&og, "cache", "healthy", SLACK).await;

    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = ready.json();
    assert_eq!(body["status"], "unhealthy", "{body}");
    let db = check_in(&body, "db");
    assert_eq!(db["critical"], true);
    assert!(
        db["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(db["checked_at"].is_string(), "{body}");
    assert!(db["latency_ms"].is_number(), "{body}");

    let startup = get(&og.url("/_health/startup"), &[]).await;
    assert_eq!(startup.status, StatusCode::SERVICE_UNAVAILABLE);
    let startup = startup.json();
    assert_eq!(startup["status"], "unhealthy");
    assert_eq!(
        names(&startup),
        ["db"],
        "startup lists critical checks only"
    );
}

#[tokio::test]
async fn non_critical_down_is_degraded_but_ready() {
    let db = Port::open().await;
    let og = start(&[
        tcp_check("db", db.addr, true),
        tcp_check("cache", dead_addr(), false),
    ])
    .await;
    await_check(&og, "db", "healthy", SLACK).await;
    await_check(&og, "cache", "unhealthy", SLACK).await;

    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.header("content-type"), Some("application/json"));
    let body = ready.json();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(names(&body), ["db", "cache"], "configuration order");
    let cache = check_in(&body, "cache");
    assert_eq!(cache["critical"], false);
    let message = cache["message"].as_str().unwrap_or_default();
    assert!(message.contains("connect"), "{body}");
    assert!(
        check_in(&body, "db").get("message").is_none(),
        "a healthy check has no message: {body}"
    );

    let startup = get(&og.url("/_health/startup"), &[]).await;
    assert_eq!(startup.status, StatusCode::OK);
    let startup = startup.json();
    assert_eq!(startup["status"], "healthy", "{startup}");
    assert_eq!(
        names(&startup),
        ["db"],
        "startup lists critical checks only"
    );
}

#[tokio::test]
async fn single_checks_and_unknown_paths() {
    let up = Port::open().await;
    let og = start(&[
        tcp_check("up", up.addr, true),
        tcp_check("down", dead_addr(), false),
    ])
    .await;
    await_check(&og, "up", "healthy", SLACK).await;
    await_check(&og, "down", "unhealthy", SLACK).await;

    let one = get(&og.url("/_health/checks/up"), &[]).await;
    assert_eq!(one.status, StatusCode::OK);
    let body = one.json();
    assert_eq!(body["name"], "up");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["critical"], true);

    let one = get(&og.url("/_health/checks/down"), &[]).await;
    assert_eq!(one.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = one.json();
    assert_eq!(body["status"], "unhealthy");
    assert!(body["message"].is_string(), "{body}");

    for path in [
        "/_health/checks/nope",
        "/_health/whatever",
        "/_health/checks/",
        "/_health/checks/up/more",
    ] {
        let a = get(&og.url(path), &[]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.text());
        assert_eq!(
            a.json(),
            serde_json::json!({"detail": "not found"}),
            "{path}"
        );
    }
}

#[tokio::test]
async fn redis_death_and_recovery_show_in_readiness() {
    let mut redis = RedisServer::start();
    let check = format!(
        "[[health.checks]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{}\"\ninterval = \"200ms\"\n",
        redis.url()
    );
    let og = start(&[check]).await;
    let flip_limit = Duration::from_millis(200) + Duration::from_millis(300) + SLACK;
    await_check(&og, "cache", "healthy", Duration::from_secs(3)).await;

    redis.kill();
    let killed = Instant::now();
    await_check(&og, "cache", "unhealthy", flip_limit).await;
    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let down_after = killed.elapsed();
    // The reason reads as text, not as the Debug of an io::Error. The first failed run may
    // be a timeout on the old connection; the next dial is refused.
    let url = og.url("/_health/checks/cache");
    crate::support::eventually(Duration::from_secs(3), "a refused dial", || async {
        let check = get(&url, &[]).await.json();
        check["message"] == "IO Error: Connection refused"
    })
    .await;
    // The flip's log line keeps its own `message`; the check's reason rides in `error`.
    let logged = og
        .wait_for_log(Duration::from_secs(2), |l| {
            l["message"] == "health check changed"
                && l["check"] == "cache"
                && l["to"] == "unhealthy"
                && l["error"].as_str().is_some_and(|e| !e.is_empty())
        })
        .await;
    assert!(
        logged,
        "no flip line with its reason in `error`: {:?}",
        og.logs()
    );

    redis.restart();
    let restarted = Instant::now();
    await_check(&og, "cache", "healthy", flip_limit).await;
    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["status"], "healthy");
    eprintln!(
        "redis: unhealthy {down_after:?} after kill, healthy {:?} after restart",
        restarted.elapsed()
    );
}

/// A `/_health/stream` response read event by event.
struct EventStream {
    body: Incoming,
    buf: String,
}

impl EventStream {
    async fn open(url: &str) -> (Answer, Self) {
        let req = Request::get(url).body(full(Bytes::new())).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), http1().request(req))
            .await
            .expect("stream headers within 5s")
            .unwrap();
        let (parts, body) = resp.into_parts();
        let head = Answer {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: Bytes::new(),
        };
        (
            head,
            EventStream {
                body,
                buf: String::new(),
            },
        )
    }

    /// The next event's name and data (parsed as JSON), and when it arrived.
    async fn next(&mut self, limit: Duration) -> (String, Value, Instant) {
        let fut = async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let at = Instant::now();
                    let raw: String = self.buf.drain(..end + 2).collect();
                    let mut event = String::new();
                    let mut data = Vec::new();
                    for line in raw.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push(v.strip_prefix(' ').unwrap_or(v));
                        }
                    }
                    let data = data.join("\n");
                    let value = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data:?}"));
                    return (event, value, at);
                }
                let frame = self
                    .body
                    .frame()
                    .await
                    .expect("stream ended")
                    .expect("stream failed");
                if let Ok(data) = frame.into_data() {
                    self.buf.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .unwrap_or_else(|_| panic!("no event within {limit:?}"))
    }
}

/// Gaps between consecutive arrival times.
fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn stream_sends_ready_body_at_once_on_change_and_periodically() {
    let mut redis = RedisServer::start();
    let check = format!(
        "[[health.checks]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{}\"\n",
        redis.url()
    );
    let og = start(&[check]).await;
    await_check(&og, "cache", "healthy", Duration::from_secs(3)).await;

    // Periodic events every 200 ms; nothing changes meanwhile.
    let asked = Instant::now();
    let (head, mut periodic) = EventStream::open(&og.url("/_health/stream?interval=200ms")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let mut times = Vec::new();
    for i in 0..4 {
        let (event, data, at) = periodic.next(Duration::from_secs(2)).await;
        assert_eq!(event, "health");
        assert_eq!(data["status"], "healthy", "event {i}: {data}");
        assert_eq!(check_in(&data, "cache")["status"], "healthy");
        times.push(at);
    }
    assert!(
        times[0] - asked < Duration::from_millis(500),
        "first event after {:?}",
        times[0] - asked
    );
    for gap in gaps(&times) {
        assert!(
            gap >= Duration::from_millis(150) && gap <= Duration::from_millis(200) + SLACK,
            "periodic gaps at ?interval=200ms: {:?}",
            gaps(&times)
        );
    }
    drop(periodic);

    // A 10 ms interval is raised to 100 ms.
    let (_, mut fast) = EventStream::open(&og.url("/_health/stream?interval=10ms")).await;
    let mut times = Vec::new();
    for _ in 0..4 {
        times.push(fast.next(Duration::from_secs(2)).await.2);
    }
    for gap in gaps(&times) {
        assert!(
            gap >= Duration::from_millis(90),
            "gaps at ?interval=10ms: {:?}",
            gaps(&times)
        );
    }
    drop(fast);

    // A long interval: the only event after the first is the one the change causes.
    let (_, mut changes) = EventStream::open(&og.url("/_health/stream?interval=30s")).await;
    let (_, first, _) = changes.next(Duration::from_millis(500)).await;
    assert_eq!(first["status"], "healthy", "{first}");
    redis.kill();
    let killed = Instant::now();
    let (event, data, at) = changes
        .next(INTERVAL + Duration::from_millis(300) + SLACK)
        .await;
    assert_eq!(event, "health");
    assert_eq!(data["status"], "unhealthy", "{data}");
    assert_eq!(check_in(&data, "cache")["status"], "unhealthy", "{data}");
    eprintln!("stream: change event {:?} after kill", at - killed);
}

#[tokio::test]
async fn stream_interval_takes_bare_seconds() {
    let og = start(&[]).await;
    let (head, mut stream) = EventStream::open(&og.url("/_health/stream?interval=0.25")).await;
    assert_eq!(head.status, StatusCode::OK);
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(stream.next(Duration::from_secs(2)).await.2);
    }
    for gap in gaps(&times) {
        assert!(
            gap >= Duration::from_millis(200) && gap <= Duration::from_millis(250) + SLACK,
            "gaps at ?interval=0.25: {:?}",
            gaps(&times)
        );
    }
}

#[tokio::test]
async fn a_slow_check_is_degraded_passing_and_not_counted_healthy() {
    let db = Port::open().await;
    let slow = format!(
        "[[health.checks]]\nname = \"slow\"\ntype = \"tcp\"\naddress = \"{}\"\ndegraded_over = \"0ms\"\n",
        db.addr
    );
    let og = start(&[slow]).await;
    let body = await_check(&og, "slow", "degraded", SLACK).await;
    assert_eq!(body["status"], "degraded", "{body}");
    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK);
    let one = get(&og.url("/_health/checks/slow"), &[]).await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.text());
    let one = one.json();
    assert_eq!(one["status"], "degraded");
    assert!(one["message"].is_string(), "{one}");
    let startup = get(&og.url("/_health/startup"), &[]).await;
    assert_eq!(startup.status, StatusCode::OK);
    let text = get(&og.url("/metrics"), &[]).await.text();
    assert_eq!(
        series(
            &text,
            r#"health_check_status{check="slow",critical="true"}"#
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        series(&text, r#"health_status{status="degraded"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn health_json_answers_in_the_ietf_format() {
    let up = Port::open().await;
    let og = start(&[
        tcp_check("up", up.addr, true),
        tcp_check("down", dead_addr(), false),
    ])
    .await;
    await_check(&og, "up", "healthy", SLACK).await;
    await_check(&og, "down", "unhealthy", SLACK).await;
    let accept = [("accept", "application/health+json")];

    let ready = get(&og.url("/_health/ready"), &accept).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(
        ready.header("content-type"),
        Some("application/health+json")
    );
    let body = ready.json();
    assert_eq!(body["status"], "warn", "{body}");
    let checks = body["checks"].as_object().expect("checks is an object");
    assert_eq!(checks.len(), 2, "{body}");
    let up_entry = &checks["up:responseTime"][0];
    assert_eq!(up_entry["status"], "pass", "{body}");
    assert!(up_entry["observedValue"].is_number(), "{body}");
    assert_eq!(up_entry["observedUnit"], "ms", "{body}");
    let time = up_entry["time"].as_str().expect("time");
    assert!(time.ends_with('Z') && time.contains('T'), "{time}");
    assert!(up_entry.get("output").is_none(), "{body}");
    let down_entry = &checks["down:responseTime"][0];
    assert_eq!(down_entry["status"], "fail", "{body}");
    assert!(down_entry["observedValue"].is_number(), "{body}");
    assert!(
        down_entry["output"].as_str().is_some_and(|o| !o.is_empty()),
        "{body}"
    );

    let startup = get(&og.url("/_health/startup"), &accept).await;
    assert_eq!(startup.status, StatusCode::OK);
    let startup = startup.json();
    assert_eq!(startup["status"], "pass", "{startup}");
    assert_eq!(startup["checks"].as_object().unwrap().len(), 1, "{startup}");

    let one = get(&og.url("/_health/checks/down"), &accept).await;
    assert_eq!(one.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(one.header("content-type"), Some("application/health+json"));
    assert_eq!(one.json()["status"], "fail");
}

#[tokio::test]
async fn details_never_hides_messages_on_the_proxy_port_only() {
    let db = Port::open().await;
    let og = start_with(
        "details = \"never\"",
        &[
            tcp_check("db", db.addr, true),
            tcp_check("cache", dead_addr(), false),
        ],
    )
    .await;
    await_check(&og, "db", "healthy", SLACK).await;
    await_check(&og, "cache", "unhealthy", SLACK).await;

    let body = get(&og.url("/_health/ready"), &[]).await.json();
    assert_eq!(body["status"], "degraded");
    assert!(!has_message(&body), "proxy port shows a message: {body}");
    let one = get(&og.url("/_health/checks/cache"), &[]).await.json();
    assert!(one.get("message").is_none(), "{one}");
    let ietf = get(
        &og.url("/_health/ready"),
        &[("accept", "application/health+json")],
    )
    .await
    .json();
    assert!(
        ietf["checks"]["cache:responseTime"][0]
            .get("output")
            .is_none(),
        "{ietf}"
    );

    let admin = get(&og.admin_url("/_health/ready"), &[]).await;
    assert_eq!(admin.status, StatusCode::OK);
    let admin = admin.json();
    assert!(
        check_in(&admin, "cache")["message"].is_string(),
        "the admin port always shows messages: {admin}"
    );
}

#[tokio::test]
async fn details_on_failure_shows_messages_only_while_not_healthy() {
    let db = Port::open().await;
    let cache = Port::open().await;
    let og = start_with(
        "details = \"on_failure\"",
        &[
            tcp_check("db", db.addr, true),
            tcp_check("cache", cache.addr, false),
        ],
    )
    .await;
    await_check(&og, "db", "healthy", SLACK).await;
    let body = await_check(&og, "cache", "healthy", SLACK).await;
    assert_eq!(body["status"], "healthy");
    assert!(!has_message(&body), "{body}");

    cache.close().await;
    let body = await_check(&og, "cache", "unhealthy", SLACK).await;
    assert_eq!(body["status"], "degraded");
    assert!(
        check_in(&body, "cache")["message"].is_string(),
        "on_failure shows messages while degraded: {body}"
    );
}

#[tokio::test]
async fn passwords_in_check_urls_never_show() {
    const SECRET: &str = "Hunter2Secret";
    const QUERY_SECRET: &str = "QueryPw77";
    let checks = [
        format!(
            "[[health.checks]]\nname = \"db\"\ntype = \"postgres\"\n\
             url = \"postgres://admin:{SECRET}@{}/app\"\n",
            dead_addr()
        ),
        format!(
            "[[health.checks]]\nname = \"db2\"\ntype = \"postgres\"\ncritical = false\n\
             url = \"postgres://admin@{}/app?password={QUERY_SECRET}\"\n",
            dead_addr()
        ),
    ];
    let og = start(&checks).await;
    await_check(&og, "db", "unhealthy", SLACK).await;
    await_check(&og, "db2", "unhealthy", SLACK).await;
    // A few more runs of each, so whatever a run logs is in the logs.
    let runs = |text: &str, check: &str| {
        sample(
            text,
            "health_check_duration_seconds_count",
            &[("check", check)],
        )
        .unwrap_or(0.0)
    };
    let metrics_url = og.url("/metrics");
    let before = scrape(&metrics_url).await;
    let (db, db2) = (runs(&before, "db"), runs(&before, "db2"));
    let url = &metrics_url;
    eventually(
        SLACK * 2,
        "three more runs of each check",
        move || async move {
            let text = scrape(url).await;
            runs(&text, "db") >= db + 3.0 && runs(&text, "db2") >= db2 + 3.0
        },
    )
    .await;

    let mut seen = Vec::new();
    for url in [
        og.url("/_health/ready"),
        og.url("/_health/startup"),
        og.url("/_health/checks/db"),
        og.url("/_health/checks/db2"),
        og.admin_url("/_health/ready"),
        og.admin_url("/_ops/status"),
        og.admin_url("/_ops/config"),
    ] {
        let a = get(&url, &[]).await;
        seen.push((url, a.text()));
    }
    let ready = &seen[0].1;
    assert!(
        ready.contains("\"message\""),
        "the failing checks carry messages: {ready}"
    );
    let status: Value = serde_json::from_str(&seen[5].1).unwrap();
    assert_eq!(
        check_in(&status["health"], "db")["status"],
        "unhealthy",
        "{status}"
    );
    let db_logged = og
        .wait_for_log(Duration::from_secs(2), |l| {
            let text = l.to_string();
            text.contains("\"db\"") && text.contains("unhealthy")
        })
        .await;
    let logs = og.logs();
    assert!(db_logged, "no log line about the db check: {logs:#?}");
    for line in logs.into_iter().chain(og.stderr()) {
        seen.push(("log".into(), line));
    }
    for (what, text) in &seen {
        for secret in [SECRET, QUERY_SECRET] {
            assert!(!text.contains(secret), "{what} shows the password: {text}");
        }
    }
}

#[tokio::test]
async fn readiness_fails_while_draining() {
    let og = Opsgate::start(&config(&refused_url(), "shutdown_delay = \"10s\"", "", &[])).await;
    assert_eq!(
        get(&og.url("/_health/ready"), &[]).await.status,
        StatusCode::OK
    );

    let drained = post(&og.admin_url("/_ops/drain")).await;
    assert_eq!(drained.status, StatusCode::OK, "{}", drained.text());

    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    let body = ready.json();
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert_eq!(body["reason"], "draining", "{body}");
    let admin = get(&og.admin_url("/_health/ready"), &[]).await;
    assert_eq!(admin.status, StatusCode::SERVICE_UNAVAILABLE);
    let live = get(&og.url("/_health/live"), &[]).await;
    assert_eq!(live.status, StatusCode::OK, "live while draining");
}

#[tokio::test]

async fn drain_by_the_admin_api_keeps_serving() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&config(&app.url(), "", "", &[])).await;
    let drained = post(&og.admin_url("/_ops/drain")).await;
    assert_eq!(drained.status, StatusCode::OK);
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(1) {
        let ready = opsgate::raw_exchange(
            og.addr(),
            b"GET /_health/ready HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap_or_else(|e| panic!("{:?} after the drain: {e}", began.elapsed()));
        assert_eq!(opsgate::raw_status(&ready), 503);
        let proxied = opsgate::raw_exchange(
            og.addr(),
            b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap_or_else(|e| panic!("{:?} after the drain: {e}", began.elapsed()));
        assert_eq!(opsgate::raw_status(&proxied), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]

async fn stream_sends_an_event_when_draining_starts() {
    let og = Opsgate::start(&config(&refused_url(), "shutdown_delay = \"10s\"", "", &[])).await;
    let (_, mut stream) = EventStream::open(&og.url("/_health/stream?interval=30s")).await;
    let (_, first, _) = stream.next(Duration::from_millis(500)).await;
    assert_eq!(first["status"], "healthy", "{first}");
    let drained = post(&og.admin_url("/_ops/drain")).await;
    assert_eq!(drained.status, StatusCode::OK);
    let (_, data, _) = stream.next(Duration::from_secs(2)).await;
    assert_eq!(data["status"], "unhealthy", "{data}");
    assert_eq!(data["reason"], "draining", "{data}");
}

/// Starts opsgate holding traffic for 2 s on a critical check against `port` (nothing there yet).
async fn start_holding(app: &Upstream, port: u16) -> (Opsgate, Instant) {
    let text = config(
        &app.url(),
        "",
        "wait_for_critical = \"2s\"",
        &[tcp_check("dep", format!("127.0.0.1:{port}"), true)],
    );
    let began = Instant::now();
    let og = Launch::new().config(&text).loopback().start().await;
    (og, began)
}

#[tokio::test]
async fn wait_for_critical_holds_until_the_dependency_comes_up() {
    let app = Upstream::echo("app").await;
    let port = free_port();
    let (og, began) = start_holding(&app, port).await;

    let held = get(&og.url("/x"), &[]).await;
    assert_eq!(
        held.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        held.text()
    );
    assert_eq!(held.json(), serde_json::json!({"detail": "starting"}));
    assert!(held.header("retry-after").is_some(), "no Retry-After");
    assert_eq!(app.hits(), 0, "a held request reached the upstream");

    let _dep = Port::open_at(port).await;
    let url = og.url("/x");
    eventually(Duration::from_secs(3), "proxying to start", || {
        let url = url.clone();
        async move { get(&url, &[]).await.status == StatusCode::OK }
    })
    .await;
    let took = began.elapsed();
    assert!(
        took < Duration::from_millis(1900),
        "proxying started only after {took:?}, not when the dependency came up"
    );
    assert!(app.hits() > 0);
}

#[tokio::test]
async fn wait_for_critical_gives_up_after_its_limit() {
    let app = Upstream::echo("app").await;
    let port = free_port();
    let (og, began) = start_holding(&app, port).await;

    let held = get(&og.url("/x"), &[]).await;
    assert_eq!(held.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(held.json(), serde_json::json!({"detail": "starting"}));

    let url = og.url("/x");
    eventually(Duration::from_secs(4), "proxying to start anyway", || {
        let url = url.clone();
        async move { get(&url, &[]).await.status == StatusCode::OK }
    })
    .await;
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "proxying started after {took:?}, before wait_for_critical elapsed"
    );
    // The dependency is still down: readiness says so.
    assert_eq!(
        get(&og.url("/_health/ready"), &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn wait_for_critical_does_not_hold_without_critical_checks() {
    let app = Upstream::echo("app").await;
    let text = config(
        &app.url(),
        "",
        "wait_for_critical = \"2s\"",
        &[tcp_check("optional", dead_addr(), false)],
    );
    let began = Instant::now();
    let og = Opsgate::start(&text).await;
    let first = get(&og.url("/x"), &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert!(began.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn health_metrics_follow_the_checks() {
    let x = Port::open().await;
    let og = start(&[tcp_check("x", x.addr, true)]).await;
    await_check(&og, "x", "healthy", SLACK).await;

    let status = r#"health_check_status{check="x",critical="true"}"#;
    let count = r#"health_check_duration_seconds_count{check="x"}"#;
    let text = get(&og.url("/metrics"), &[]).await.text();
    assert_eq!(series(&text, status), Some(1.0), "{text}");
    assert!(series(&text, count).is_some_and(|c| c > 0.0), "{text}");
    assert_eq!(
        series(&text, r#"health_status{status="healthy"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(&text, r#"health_status{status="unhealthy"}"#),
        Some(0.0)
    );

    x.close().await;
    await_check(&og, "x", "unhealthy", SLACK).await;
    let text = get(&og.url("/metrics"), &[]).await.text();
    assert_eq!(series(&text, status), Some(0.0), "{text}");
    assert_eq!(
        series(&text, r#"health_status{status="healthy"}"#),
        Some(0.0)
    );
    assert_eq!(
        series(&text, r#"health_status{status="unhealthy"}"#),
        Some(1.0),
        "{text}"
    );
    // The admin port serves the same families.
    let admin = get(&og.admin_url("/metrics"), &[]).await.text();
    assert_eq!(series(&admin, status), Some(0.0), "{admin}");
}

/// Writes `text` as a config file in a fresh directory.
fn config_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checks.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// `opsgate <args> --config <path>`, run from `dir`.
fn command(dir: &std::path::Path, path: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut cmd = opsgate::command(dir);
    cmd.args(args).arg("--config").arg(path);
    cmd
}

#[tokio::test]
async fn check_command_prints_every_check_and_exits_by_status() {
    let db = Port::open().await;
    let degraded = config(
        &refused_url(),
        "",
        "",
        &[
            tcp_check("db", db.addr, true),
            tcp_check("cache", dead_addr(), false),
        ],
    );
    let (dir, path) = config_file(&degraded);

    let out = run_to_end(command(dir.path(), &path, &["check", "--json"])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "degraded exits 0: {stdout}");
    let body: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check --json is not one JSON document ({e}): {stdout}"));
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(names(&body), ["db", "cache"]);
    let db_entry = check_in(&body, "db");
    assert_eq!(db_entry["type"], "tcp");
    assert_eq!(db_entry["status"], "healthy");
    assert_eq!(db_entry["critical"], true);
    assert!(db_entry["latency_ms"].is_number(), "{body}");
    let cache_entry = check_in(&body, "cache");
    assert_eq!(cache_entry["status"], "unhealthy");
    assert_eq!(cache_entry["critical"], false);
    assert!(cache_entry["message"].is_string(), "{body}");

    let out = run_to_end(command(dir.path(), &path, &["check"])).await;
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "KIND", "CRITICAL", "STATUS", "LATENCY", "MESSAGE"] {
        assert!(header.contains(column), "no {column} column: {table}");
    }
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {table}"))
            .to_owned()
    };
    let db_row = row("db");
    for cell in ["tcp", "yes", "healthy", "ms"] {
        assert!(db_row.contains(cell), "db row lacks {cell}: {db_row}");
    }
    let cache_row = row("cache");
    for cell in ["tcp", "no", "unhealthy", "ms", "connect"] {
        assert!(
            cache_row.contains(cell),
            "cache row lacks {cell}: {cache_row}"
        );
    }

    let unhealthy = config(
        &refused_url(),
        "",
        "",
        &[tcp_check("db", dead_addr(), true)],
    );
    let (dir, path) = config_file(&unhealthy);
    let out = run_to_end(command(dir.path(), &path, &["check", "--json"])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "critical down exits 1: {stdout}"
    );
    let body: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert_eq!(check_in(&body, "db")["status"], "unhealthy");
}

#[tokio::test]
async fn wait_command_returns_once_the_dependency_is_up() {
    let port = free_port();
    let text = config(
        &refused_url(),
        "",
        "",
        &[
            tcp_check("dep", format!("127.0.0.1:{port}"), true),
            tcp_check("optional", dead_addr(), false),
        ],
    );
    let (dir, path) = config_file(&text);
    let began = Instant::now();
    let mut child =
        tokio::process::Command::from(command(dir.path(), &path, &["wait", "--timeout", "5s"]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "wait returned before the dependency was up"
    );
    let _dep = Port::open_at(port).await;
    let out = tokio::time::timeout(Duration::from_secs(6), child.wait_with_output())
        .await
        .expect("wait exited within 6s")
        .unwrap();
    let took = began.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(2),
        "wait took {took:?} after the dependency came up at ~300ms"
    );
}

/// `opsgate wait --timeout <timeout>` with a passing and a failing critical check.
async fn wait_with_one_failing(timeout: &str) -> (std::process::Output, Duration) {
    let cache = Port::open().await;
    let text = config(
        &refused_url(),
        "",
        "",
        &[
            tcp_check("billing-cache", cache.addr, true),
            tcp_check("payments-db", dead_addr(), true),
        ],
    );
    let (dir, path) = config_file(&text);
    let began = Instant::now();
    let out = run_to_end(command(dir.path(), &path, &["wait", "--timeout", timeout])).await;
    (out, began.elapsed())
}

#[tokio::test]
async fn wait_command_times_out_naming_the_failing_check() {
    let (out, took) = wait_with_one_failing("500ms").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("payments-db"), "{stderr}");
    assert!(
        !stderr.contains("billing-cache"),
        "a passing check named: {stderr}"
    );
    assert!(
        took < Duration::from_secs(3),
        "wait --timeout 500ms took {took:?}"
    );
}

#[tokio::test]

async fn wait_command_keeps_trying_until_its_timeout() {
    let (out, took) = wait_with_one_failing("500ms").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        took >= Duration::from_millis(480),
        "wait --timeout 500ms gave up after {took:?}"
    );
}

#[tokio::test]
async fn real_postgres_reports_healthy() {
    let live_pg = crate::support::live_pg();
    let og = start(&[format!(
        "[[health.checks]]\nname = \"db\"\ntype = \"postgres\"\nurl = \"{live_pg}\"\ntimeout = \"2s\"\n"
    )])
    .await;
    let body = await_check(&og, "db", "healthy", Duration::from_secs(5)).await;
    assert_eq!(body["status"], "healthy", "{body}");
    let ready = get(&og.url("/_health/ready"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK);
    let db = check_in(&ready.json(), "db").clone();
    assert!(db["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "{db}");
    assert!(db["checked_at"].is_string(), "{db}");
    let one = get(&og.url("/_health/checks/db"), &[]).await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json()["status"], "healthy");
}
