//! Health checks against real PostgreSQL, Redis, HTTP and TCP servers, live, dead and silent.

use std::time::{Duration, Instant};

use http::StatusCode;
use opsgate::health::render::{self, Format, Readiness, View};
use opsgate::health::{
    CheckKind, CheckResult, CheckSpec, Health, Status, check_once, wait_for_critical,
};

use crate::support::postgres::PgServer;
use crate::support::redis::RedisServer;
use crate::support::{
    FixedHttp, SilentServer, eventually, free_port, init_tls, live_pg, live_pg_with_password,
};

const LIVE_REDIS: &str = "redis://127.0.0.1:6379";
/// Generous bound on scheduling noise on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(700);

fn spec(name: &str, kind: CheckKind) -> CheckSpec {
    CheckSpec {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(300),
        ..CheckSpec::new(name, kind)
    }
}

fn pg(url: &str) -> CheckKind {
    CheckKind::Postgres {
        url: url.to_owned(),
        query: None,
    }
}

fn redis(url: &str) -> CheckKind {
    CheckKind::Redis {
        url: url.to_owned(),
    }
}

fn tcp(address: impl ToString) -> CheckKind {
    CheckKind::Tcp {
        address: address.to_string(),
    }
}

fn http(url: &str, expect: &str, body_contains: Option<&str>) -> CheckKind {
    CheckKind::Http {
        url: url.to_owned(),
        expect_status: expect.parse().unwrap(),
        body_contains: body_contains.map(str::to_owned),
    }
}

async fn once(spec: CheckSpec) -> CheckResult {
    check_once(&[spec]).await.remove(0)
}

fn refused_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn message(r: &CheckResult) -> String {
    r.message.clone().unwrap_or_default().to_lowercase()
}

fn body(r: &render::Rendered) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// Waits until every check of `health` has a result.
async fn all_checked(health: &Health) {
    eventually(
        Duration::from_secs(5),
        "every check to have a result",
        || async {
            health
                .snapshot()
                .checks
                .iter()
                .all(|c| c.status != Status::Unknown)
        },
    )
    .await;
}

async fn status_becomes(health: &Health, name: &str, want: Status, limit: Duration) {
    eventually(limit, &format!("{name} to become {want}"), || async {
        health.snapshot().get(name).map(|c| c.status) == Some(want)
    })
    .await;
}

#[tokio::test]
async fn postgres_live_is_healthy_and_refused_is_unhealthy() {
    init_tls();
    let live = once(spec("db", pg(&live_pg()))).await;
    assert_eq!(live.status, Status::Healthy, "{:?}", live.message);
    assert!(live.latency.is_some() && live.checked_at.is_some() && live.message.is_none());

    let dead = once(spec(
        "db",
        pg(&format!("postgres://postgres@{}/postgres", refused_addr())),
    ))
    .await;
    assert_eq!(dead.status, Status::Unhealthy);
    assert!(message(&dead).contains("refused"), "{:?}", dead.message);
}

#[tokio::test]
async fn postgres_query_is_configurable() {
    init_tls();
    let good = CheckKind::Postgres {
        url: live_pg(),
        query: Some("SELECT count(*) FROM pg_class".into()),
    };
    assert_eq!(once(spec("db", good)).await.status, Status::Healthy);
    let bad = CheckKind::Postgres {
        url: live_pg(),
        query: Some("SELEC 1".into()),
    };
    let r = once(spec("db", bad)).await;
    assert_eq!(r.status, Status::Unhealthy);
    assert!(message(&r).contains("syntax"), "{:?}", r.message);
}

#[tokio::test]
async fn redis_live_is_healthy_and_refused_is_unhealthy() {
    init_tls();
    let live = once(spec("cache", redis(LIVE_REDIS))).await;
    assert_eq!(live.status, Status::Healthy, "{:?}", live.message);

    let dead = once(spec("cache", redis(&format!("redis://{}", refused_addr())))).await;
    assert_eq!(dead.status, Status::Unhealthy);
    assert!(message(&dead).contains("refused"), "{:?}", dead.message);
}

#[tokio::test]
async fn http_checks_status_body_and_refusal() {
    init_tls();
    let ok = FixedHttp::start(200, "all ok").await;
    let r = once(spec("api", http(&ok.url("/health"), "200-399", Some("ok")))).await;
    assert_eq!(r.status, Status::Healthy, "{:?}", r.message);

    let r = once(spec("api", http(&ok.url("/health"), "200", Some("ready")))).await;
    assert_eq!(r.status, Status::Unhealthy);
    assert_eq!(
        r.message.as_deref(),
        Some("body does not contain \"ready\"")
    );

    let failing = FixedHttp::start(503, "no").await;
    let r = once(spec("api", http(&failing.url("/"), "200,204", None))).await;
    assert_eq!(r.status, Status::Unhealthy);
    assert_eq!(
        r.message.as_deref(),
        Some("unexpected status 503 (expected 200,204)")
    );

    let r = once(spec(
        "api",
        http(&format!("http://{}/", refused_addr()), "200-399", None),
    ))
    .await;
    assert_eq!(r.status, Status::Unhealthy);
    assert!(message(&r).contains("refused"), "{:?}", r.message);
}

#[tokio::test]
async fn tcp_live_is_healthy_and_refused_is_unhealthy() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = once(spec("queue", tcp(listener.local_addr().unwrap()))).await;
    assert_eq!(r.status, Status::Healthy);

    let r = once(spec("queue", tcp(refused_addr()))).await;
    assert_eq!(r.status, Status::Unhealthy);
    assert!(message(&r).contains("refused"), "{:?}", r.message);
}

#[tokio::test]
async fn silent_servers_time_out_within_timeout_plus_slack() {
    init_tls();
    let silent = SilentServer::start().await;
    let addr = silent.addr;
    let specs = vec![
        spec("db", pg(&format!("postgres://postgres@{addr}/postgres"))),
        spec("cache", redis(&format!("redis://{addr}"))),
        spec(
            "api",
            http(&format!("http://{addr}/health"), "200-399", None),
        ),
    ];
    let start = Instant::now();
    let results = check_once(&specs).await;
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_millis(300) + SLACK,
        "took {elapsed:?}"
    );
    for r in &results {
        assert_eq!(r.status, Status::Unhealthy, "{}", r.name);
        assert_eq!(
            r.message.as_deref(),
            Some("timed out after 300ms"),
            "{}",
            r.name
        );
        let latency = r.latency.unwrap();
        assert!(
            latency >= Duration::from_millis(300) && latency < Duration::from_millis(300) + SLACK
        );
    }
}

#[tokio::test]
async fn degraded_over_marks_slow_checks() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut s = spec("queue", tcp(listener.local_addr().unwrap()));
    s.degraded_over = Some(Duration::ZERO);
    let r = once(s).await;
    assert_eq!(r.status, Status::Degraded);
    assert!(message(&r).starts_with("slow:"), "{:?}", r.message);
}

#[tokio::test]
async fn unknown_before_first_result_fails_readiness() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Current-thread runtime: no check task can run before we yield.
    let health = Health::start(vec![spec("queue", tcp(listener.local_addr().unwrap()))]);
    let snap = health.snapshot();
    assert_eq!(snap.status, Status::Unhealthy);
    assert_eq!(snap.checks[0].status, Status::Unknown);
    assert_eq!(snap.checks[0].message.as_deref(), Some("not checked yet"));
    let r = render::ready(&snap, Readiness::default(), View::default());
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body(&r)["checks"][0]["status"], "unknown");
    assert_eq!(
        render::startup(&snap, View::default()).status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    all_checked(&health).await;
    let r = render::ready(&health.snapshot(), Readiness::default(), View::default());
    assert_eq!(r.status, StatusCode::OK);
    health.shutdown();
}

#[tokio::test]
async fn critical_down_fails_ready_and_startup() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health = Health::start(vec![
        spec("queue", tcp(listener.local_addr().unwrap())),
        spec("db", tcp(refused_addr())),
    ]);
    all_checked(&health).await;
    let snap = health.snapshot();
    let ready = render::ready(&snap, Readiness::default(), View::default());
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body(&ready)["status"], "unhealthy");
    let startup = render::startup(&snap, View::default());
    assert_eq!(startup.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        render::check(&snap, "db", View::default()).status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        render::check(&snap, "queue", View::default()).status,
        StatusCode::OK
    );
    health.shutdown();
}

#[tokio::test]
async fn non_critical_down_is_degraded_but_ready() {
    init_tls();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cache = spec("cache", redis(&format!("redis://{}", refused_addr())));
    cache.critical = false;
    let health = Health::start(vec![
        spec("queue", tcp(listener.local_addr().unwrap())),
        cache,
    ]);
    all_checked(&health).await;
    let snap = health.snapshot();
    let ready = render::ready(&snap, Readiness::default(), View::default());
    assert_eq!(ready.status, StatusCode::OK);
    let b = body(&ready);
    assert_eq!(b["status"], "degraded");
    assert_eq!(b["checks"][1]["status"], "unhealthy");
    assert!(
        b["checks"][1]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("refused")
    );
    let startup = render::startup(&snap, View::default());
    assert_eq!(startup.status, StatusCode::OK);
    assert_eq!(body(&startup)["checks"].as_array().unwrap().len(), 1);

    let ietf = View {
        format: Format::HealthJson,
        ..View::default()
    };
    let r = render::ready(&snap, Readiness::default(), ietf);
    assert_eq!(r.content_type, "application/health+json");
    assert_eq!(body(&r)["status"], "warn");
    assert_eq!(
        body(&r)["checks"]["cache:responseTime"][0]["status"],
        "fail"
    );
    health.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_notifies_and_recovers_after_restart() {
    init_tls();
    let mut server = RedisServer::start();
    let health = Health::start(vec![spec("cache", redis(&server.url()))]);
    status_becomes(&health, "cache", Status::Healthy, Duration::from_secs(5)).await;

    let mut changed = health.subscribe();
    changed.borrow_and_update();
    let mut flips = health.subscribe_flips();
    server.kill();
    tokio::time::timeout(Duration::from_secs(2), changed.changed())
        .await
        .expect("a change notification after the server died")
        .unwrap();
    let flip = tokio::time::timeout(Duration::from_secs(2), flips.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (flip.name.as_str(), flip.from, flip.to),
        ("cache", Status::Healthy, Status::Unhealthy)
    );
    assert!(flip.message.is_some());
    assert_eq!(health.snapshot().status, Status::Unhealthy);

    server.restart();
    let restarted = Instant::now();
    // One interval (100ms) plus one timeout (300ms) at most, plus scheduling slack.
    status_becomes(
        &health,
        "cache",
        Status::Healthy,
        Duration::from_millis(400) + SLACK,
    )
    .await;
    assert!(restarted.elapsed() < Duration::from_millis(400) + SLACK);
    health.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_and_recovery_after_restart() {
    init_tls();
    let mut server = PgServer::start();
    let health = Health::start(vec![spec("db", pg(&server.url()))]);
    status_becomes(&health, "db", Status::Healthy, Duration::from_secs(10)).await;

    let mut flips = health.subscribe_flips();
    server.kill();
    let flip = tokio::time::timeout(Duration::from_secs(2), flips.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flip.to, Status::Unhealthy);
    let snap = health.snapshot();
    assert_eq!(
        render::ready(&snap, Readiness::default(), View::default()).status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    server.restart();
    // The server accepts before it finishes recovery; allow it a moment on top of one interval.
    status_becomes(&health, "db", Status::Healthy, Duration::from_secs(3)).await;
    health.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_messages_or_bodies() {
    init_tls();
    const SECRET: &str = "hunter2-very-secret";
    let silent = SilentServer::start().await;
    let guarded = RedisServer::start_with(&["--requirepass", "the-right-one"]);
    let specs = vec![
        spec("pg-live", pg(&live_pg_with_password(SECRET))),
        spec(
            "pg-dead",
            pg(&format!(
                "postgres://postgres:{SECRET}@{}/postgres",
                refused_addr()
            )),
        ),
        spec(
            "pg-silent",
            pg(&format!(
                "postgres://postgres:{SECRET}@{}/postgres",
                silent.addr
            )),
        ),
        spec(
            "pg-param",
            pg(&format!(
                "postgres://127.0.0.1:{}/postgres?user=postgres&password={SECRET}",
                free_port()
            )),
        ),
        spec(
            "pg-bad-url",
            pg(&format!(
                "postgres://postgres:{SECRET}@127.0.0.1:notaport/postgres"
            )),
        ),
        spec(
            "redis-dead",
            redis(&format!("redis://:{SECRET}@{}", refused_addr())),
        ),
        spec(
            "redis-wrongpass",
            redis(&format!(
                "redis://default:{SECRET}@127.0.0.1:{}",
                guarded.port
            )),
        ),
        spec(
            "http-dead",
            http(
                &format!("http://user:{SECRET}@{}/", refused_addr()),
                "200-399",
                None,
            ),
        ),
    ];
    for s in &specs {
        assert!(!s.kind.target().contains(SECRET), "{}", s.kind.target());
    }
    let results = check_once(&specs).await;
    assert_eq!(
        results[0].status,
        Status::Healthy,
        "{:?}",
        results[0].message
    );
    for r in &results[1..] {
        assert_eq!(r.status, Status::Unhealthy, "{}: {:?}", r.name, r.message);
    }
    let mut texts = vec![render::cli_json(&results), render::cli_table(&results)];
    texts.extend(results.iter().filter_map(|r| r.message.clone()));

    let health = Health::start(specs.clone());
    all_checked(&health).await;
    let snap = health.snapshot();
    let admin = View {
        admin: true,
        ..View::default()
    };
    for view in [
        admin,
        View {
            format: Format::HealthJson,
            ..admin
        },
    ] {
        for r in [
            render::ready(&snap, Readiness::default(), view),
            render::startup(&snap, view),
        ] {
            texts.push(String::from_utf8(r.body.to_vec()).unwrap());
        }
        for s in &specs {
            texts.push(
                String::from_utf8(render::check(&snap, &s.name, view).body.to_vec()).unwrap(),
            );
        }
    }
    health.shutdown();
    for text in &texts {
        assert!(!text.contains(SECRET), "secret leaked: {text}");
    }
    // The messages are still useful.
    let wrongpass = results
        .iter()
        .find(|r| r.name == "redis-wrongpass")
        .unwrap();
    assert!(
        message(wrongpass).contains("wrongpass"),
        "{:?}",
        wrongpass.message
    );
    assert!(
        message(&results[1]).contains("refused"),
        "{:?}",
        results[1].message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_threshold_holds_the_status_for_consecutive_failures() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut s = spec("queue", tcp(addr));
    s.interval = Duration::from_millis(50);
    s.unhealthy_threshold = 3;
    s.healthy_threshold = 2;
    let health = Health::start(vec![s]);
    status_becomes(&health, "queue", Status::Healthy, Duration::from_secs(2)).await;

    let mut flips = health.subscribe_flips();
    drop(listener);
    let dropped = Instant::now();
    let flip = tokio::time::timeout(Duration::from_secs(2), flips.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flip.to, Status::Unhealthy);
    // Three failing runs 50ms apart: the first comes within one interval, the third 100ms later.
    assert!(
        dropped.elapsed() >= Duration::from_millis(95),
        "flipped after {:?}",
        dropped.elapsed()
    );

    let _listener = std::net::TcpListener::bind(addr).unwrap();
    let back = Instant::now();
    let flip = tokio::time::timeout(Duration::from_secs(2), flips.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flip.to, Status::Healthy);
    assert!(
        back.elapsed() >= Duration::from_millis(45),
        "recovered after {:?}",
        back.elapsed()
    );
    health.shutdown();
}

#[tokio::test]
async fn check_once_json_and_exit_code() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut down = spec("queue-b", tcp(refused_addr()));
    down.critical = false;
    let results = check_once(&[
        spec("queue-a", tcp(listener.local_addr().unwrap())),
        down.clone(),
    ])
    .await;
    let json: serde_json::Value = serde_json::from_str(&render::cli_json(&results)).unwrap();
    assert_eq!(json["status"], "degraded");
    let a = &json["checks"][0];
    assert_eq!(a["name"], "queue-a");
    assert_eq!(a["type"], "tcp");
    assert_eq!(a["status"], "healthy");
    assert_eq!(a["critical"], true);
    assert!(a["latency_ms"].is_f64());
    assert!(a["checked_at"].as_str().unwrap().ends_with('Z'));
    assert!(a.get("message").is_none());
    assert_eq!(json["checks"][1]["status"], "unhealthy");
    assert!(json["checks"][1]["message"].is_string());
    assert_eq!(render::cli_exit_code(&results), 0);

    down.critical = true;
    assert_eq!(render::cli_exit_code(&check_once(&[down]).await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_critical_returns_once_a_dependency_is_up() {
    let port = free_port();
    let mut optional = spec("optional", tcp(refused_addr()));
    optional.critical = false;
    let specs = vec![spec("queue", tcp(format!("127.0.0.1:{port}"))), optional];
    let opener = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap()
    });
    let start = Instant::now();
    wait_for_critical(&specs, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(250));
    drop(opener.await.unwrap());

    let start = Instant::now();
    let err = wait_for_critical(
        &[spec("down", tcp(refused_addr()))],
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(err, Err(vec!["down".to_owned()]));
    assert!(start.elapsed() < Duration::from_millis(500) + SLACK);
}

#[tokio::test]
async fn reload_keeps_unchanged_checks_and_swaps_the_rest() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live = tcp(listener.local_addr().unwrap());
    let mut registry = prometheus_client::registry::Registry::default();
    let health = Health::start(vec![
        spec("a", live.clone()),
        spec("b", tcp(refused_addr())),
    ]);
    health.register(&mut registry);
    all_checked(&health).await;
    let a_before = health.snapshot().get("a").unwrap().clone();
    assert_eq!(a_before.status, Status::Healthy);

    let mut changed = health.subscribe();
    changed.borrow_and_update();
    health.replace(vec![spec("a", live.clone()), spec("c", live.clone())]);
    assert!(changed.has_changed().unwrap(), "a reload notifies");
    let snap = health.snapshot();
    assert_eq!(
        snap.checks
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert_eq!(
        snap.get("a").unwrap().status,
        Status::Healthy,
        "unchanged check keeps its state"
    );
    assert_eq!(snap.get("c").unwrap().status, Status::Unknown);

    // Same target, new settings: restarted, state kept.
    let mut a_slow = spec("a", live.clone());
    a_slow.interval = Duration::from_millis(200);
    health.replace(vec![a_slow, spec("c", live)]);
    assert_eq!(health.snapshot().get("a").unwrap().status, Status::Healthy);
    all_checked(&health).await;

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"health_check_status{check="a",critical="true"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"health_check_status{check="c",critical="true"} 1"#),
        "{text}"
    );
    assert!(
        !text.contains(r#"check="b""#),
        "removed check left metrics: {text}"
    );
    assert!(
        text.contains(r#"health_status{status="healthy"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"health_status{status="unhealthy"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(r#"health_check_duration_seconds_count{check="a"}"#),
        "{text}"
    );
    health.shutdown();
}

#[tokio::test]
async fn a_changed_check_keeps_its_last_result_until_the_new_definition_has_run() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live = tcp(listener.local_addr().unwrap());
    let optional = |name: &str, kind: CheckKind| CheckSpec {
        critical: false,
        ..spec(name, kind)
    };
    let health = Health::start(vec![
        spec("moved", live.clone()),
        optional("back", tcp(refused_addr())),
    ]);
    all_checked(&health).await;
    let overall = health.snapshot().status;
    assert_eq!(overall, Status::Degraded);
    let before = health.snapshot().get("moved").unwrap().clone();
    assert_eq!(before.status, Status::Healthy);
    assert_eq!(
        health.snapshot().get("back").unwrap().status,
        Status::Unhealthy
    );

    // "moved" now probes a server that never answers: its first run takes the whole
    // timeout. "back" now probes a live target, with a rise threshold.
    let silent = SilentServer::start().await;
    let mut moved = spec(
        "moved",
        http(&format!("http://{}/health", silent.addr), "200", None),
    );
    moved.timeout = Duration::from_millis(600);
    let mut back = optional("back", live);
    back.healthy_threshold = 3;
    // One run in this test's time: only a first result that decides can make it healthy.
    back.interval = Duration::from_secs(30);
    health.replace(vec![moved, back, optional("new", tcp(refused_addr()))]);

    let snap = health.snapshot();
    let kept = snap.get("moved").unwrap();
    assert_eq!(
        kept.status,
        Status::Healthy,
        "a changed check keeps its last result"
    );
    assert_eq!(kept.checked_at, before.checked_at);
    assert_eq!(kept.kind, "http");
    assert_eq!(
        snap.status, overall,
        "the reload must not move the overall status"
    );
    assert_eq!(
        snap.get("new").unwrap().status,
        Status::Unknown,
        "only a new check starts unknown"
    );

    // Until the new definition's first run ends (its whole timeout), the old result stays.
    crate::support::eventually(
        Duration::from_secs(5),
        "the new definition's first result",
        || async {
            let moved = health.snapshot().get("moved").unwrap().clone();
            if moved.checked_at == before.checked_at {
                assert_eq!(moved.status, Status::Healthy, "the old result must stay");
                return false;
            }
            true
        },
    )
    .await;
    let after = health.snapshot().get("moved").unwrap().clone();
    assert_eq!(after.status, Status::Unhealthy);
    assert!(message(&after).contains("timed out"), "{after:?}");
    // A new target's first result decides at once, whatever the old target's streak.
    status_becomes(&health, "back", Status::Healthy, Duration::from_secs(2)).await;
    health.shutdown();
}
