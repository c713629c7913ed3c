//! The process from the outside: config errors and exit codes, flag/env/file precedence,
//! and the shutdown sequence (SIGTERM, shutdown_delay, drain_timeout, a second signal).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};

use crate::support::eventually;
use crate::support::loopback_addr;
use crate::support::opsgate::{Launch, Opsgate, check_config, get, h2c, http1, send, shorthand};
use crate::support::upstream::{Upstream, full, refused_url};

/// How long a process may take to exit when it should exit at once.
const EXIT_LIMIT: Duration = Duration::from_secs(5);

/// True when `text` holds `<file>:<line>:<col>:` for the given file and line.
fn has_place(text: &str, file: &str, line: usize) -> bool {
    let prefix = format!("{file}:{line}:");
    text.match_indices(&prefix).any(|(i, _)| {
        let rest = &text[i + prefix.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(':')
    })
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_config_reports_a_type_error_with_its_place() {
    let (out, path, _dir) =
        check_config("[proxy]\nlisten = \"127.0.0.1:8080\"\naccess_log = \"yes\"\n");
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("{}:3:14:", path.display())), "{err}");
}

#[test]
fn check_config_reports_an_unknown_key_with_a_hint() {
    let (out, path, _dir) =
        check_config("[proxy]\nlisten = \"127.0.0.1:8080\"\nupstrem = \"http://127.0.0.1:3000\"\n");
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(has_place(&err, &path.display().to_string(), 3), "{err}");
    assert!(err.contains("upstrem"), "{err}");
    assert!(err.contains("did you mean `upstream`?"), "{err}");
}

#[test]
fn check_config_reports_an_unset_variable() {
    let (out, path, _dir) = check_config(
        "[proxy]\nlisten = \"127.0.0.1:8080\"\nupstream = \"${OPSGATE_IT_NEVER_SET}\"\n",
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(has_place(&err, &path.display().to_string(), 3), "{err}");
    assert!(err.contains("OPSGATE_IT_NEVER_SET"), "{err}");
}

#[test]
fn check_config_accepts_a_valid_file() {
    let (out, _path, _dir) = check_config(
        r#"
[proxy]
listen = "127.0.0.1:8080"
max_header_bytes = "16KiB"
header_read_timeout = "5s"
encoded_slashes = "reject"

[upstreams.app]
url = "http://127.0.0.1:3000"
timeout = "${OPSGATE_IT_NEVER_SET:-10s}"

[[routes]]
name = "api"
prefix = "/api"
upstream = "app"
strip_prefix = true
"#,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

#[tokio::test]
async fn run_with_a_bad_config_exits_2_before_binding() {
    // The listen port is taken: had opsgate tried to bind before validating, it would exit 1.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut og = Launch::new()
        .config("[proxy]\nupstream = \"http://127.0.0.1:3000\"\naccess_log = \"yes\"\n")
        .arg("--listen")
        .arg(busy.local_addr().unwrap().to_string())
        .arg("--admin")
        .arg(loopback_addr().to_string())
        .spawn();
    let status = og.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(2), "{:?}", og.stderr());
    assert!(
        og.stderr().join("\n").contains(":3:14:"),
        "{:?}",
        og.stderr()
    );
    assert!(
        !og.logs().iter().any(|l| l.contains("opsgate started")),
        "{:?}",
        og.logs()
    );
}

#[tokio::test]
async fn run_without_config_or_upstream_is_a_usage_error() {
    let mut og = Launch::new().spawn();
    let status = og.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(2), "{:?}", og.stderr());
    assert!(
        og.stderr().join("\n").contains("--upstream"),
        "{:?}",
        og.stderr()
    );
}

#[tokio::test]
async fn flags_override_the_file() {
    let app = Upstream::echo("app").await;
    let file_listen = loopback_addr();
    let flag_listen = loopback_addr();
    let og = Launch::new()
        .config(&format!(
            "[proxy]\nlisten = \"{file_listen}\"\nupstream = \"{}\"\n[admin]\nlisten = \"{}\"\n",
            refused_url(),
            loopback_addr()
        ))
        .arg("--listen")
        .arg(flag_listen.to_string())
        .arg("--upstream")
        .arg(app.url())
        .listening_on(flag_listen)
        .start()
        .await;
    let answer = get(&og.url("/flagged"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["path"], "/flagged");
    assert!(
        tokio::net::TcpStream::connect(file_listen).await.is_err(),
        "the file's listen address is bound too"
    );
}

#[tokio::test]
async fn env_configures_run_without_a_file_and_flags_beat_env() {
    let app = Upstream::echo("app").await;
    let listen = loopback_addr();
    let og = Launch::new()
        .env("OPSGATE_UPSTREAM", app.url())
        .env("OPSGATE_LISTEN", listen.to_string())
        .env("OPSGATE_ADMIN_LISTEN", loopback_addr().to_string())
        .listening_on(listen)
        .start()
        .await;
    let answer = get(&og.url("/from-env"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["path"], "/from-env");
    drop(og);

    let listen = loopback_addr();
    let og = Launch::new()
        .env("OPSGATE_UPSTREAM", refused_url())
        .env("OPSGATE_LISTEN", listen.to_string())
        .env("OPSGATE_ADMIN_LISTEN", loopback_addr().to_string())
        .arg("--upstream")
        .arg(app.url())
        .listening_on(listen)
        .start()
        .await;
    let answer = get(&og.url("/flag-wins"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test]
async fn busy_listen_port_exits_1() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut og = Launch::new()
        .config(&shorthand(&refused_url(), ""))
        .arg("--listen")
        .arg(busy.local_addr().unwrap().to_string())
        .arg("--admin")
        .arg(loopback_addr().to_string())
        .spawn();
    let status = og.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(1), "{:?}", og.stderr());
    assert!(
        og.stderr().join("\n").contains("cannot listen"),
        "{:?}",
        og.stderr()
    );
}

async fn readiness(og: &Opsgate) -> StatusCode {
    get(&og.url("/_health/ready"), &[]).await.status
}

/// Waits until the upstream has the head of `n` requests.
async fn upstream_has(app: &Upstream, n: usize) {
    eventually(
        Duration::from_secs(5),
        "the request to reach upstream",
        move || async move { app.hits() >= n },
    )
    .await;
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let app = Upstream::echo("app").await;
    let mut og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let url = og.url("/slow?sleep_ms=500");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    upstream_has(&app, 1).await;
    og.sigterm();
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["path"], "/slow");
    assert_eq!(answer.header("connection"), Some("close"));
    let status = og.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(0), "{:?}", og.stderr());
}

#[tokio::test]
async fn sigterm_lets_an_h2_stream_in_flight_finish() {
    let app = Upstream::echo("app").await;
    let mut og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let client = h2c();
    let req = Request::get(og.url("/slow-h2?sleep_ms=500"))
        .body(full(Bytes::new()))
        .unwrap();
    let in_flight = tokio::spawn(async move { send(&client, req).await });
    upstream_has(&app, 1).await;
    og.sigterm();
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, http::Version::HTTP_2);
    assert_eq!(answer.json()["path"], "/slow-h2");
    let status = og.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(0), "{:?}", og.stderr());
}

#[tokio::test]
async fn shutdown_delay_keeps_accepting_while_readiness_is_503() {
    let app = Upstream::echo("app").await;
    let mut og = Opsgate::start(&shorthand(&app.url(), "shutdown_delay = \"2s\"")).await;
    assert_eq!(readiness(&og).await, StatusCode::OK);
    og.sigterm();
    let signalled = Instant::now();
    let og_ref = &og;
    eventually(
        Duration::from_millis(1500),
        "readiness to turn 503",
        move || async move { readiness(og_ref).await == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    // Still accepting new connections and proxying them.
    let answer = get(&og.url("/during-delay"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["path"], "/during-delay");
    let status = og.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(0), "{:?}", og.stderr());
    assert!(
        signalled.elapsed() >= Duration::from_millis(1950),
        "exited {:?} after SIGTERM, before shutdown_delay",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn drain_timeout_cuts_off_requests_and_still_exits_0() {
    let app = Upstream::echo("app").await;
    let mut og = Opsgate::start(&shorthand(&app.url(), "drain_timeout = \"200ms\"")).await;
    let client = http1();
    let req = Request::get(og.url("/stuck?sleep_ms=5000"))
        .body(full(Bytes::new()))
        .unwrap();
    let in_flight = tokio::spawn(async move { client.request(req).await.map(|r| r.status()) });
    upstream_has(&app, 1).await;
    og.sigterm();
    let signalled = Instant::now();
    let status = og.wait_exit(EXIT_LIMIT).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{:?}", og.stderr());
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM"
    );
    let warned = og.json_logs().into_iter().any(|l| {
        l["level"] == "WARN" && l.to_string().contains("drain_timeout cut off 1 requests")
    });
    assert!(warned, "no drain warning in {:#?}", og.logs());
    let result = in_flight.await.unwrap();
    assert!(result.is_err(), "the cut-off request got {result:?}");
}

#[tokio::test]
async fn second_signal_during_the_delay_exits_1() {
    let app = Upstream::echo("app").await;
    let mut og = Opsgate::start(&shorthand(&app.url(), "shutdown_delay = \"5s\"")).await;
    og.sigterm();
    let og_ref = &og;
    eventually(
        Duration::from_secs(3),
        "readiness to turn 503",
        move || async move { readiness(og_ref).await == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    let signalled = Instant::now();
    og.sigterm();
    let status = og.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(1), "{:?}", og.stderr());
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "second signal took {:?}",
        signalled.elapsed()
    );
}

/// A routed request's line names its route and upstream (rendered when the route is
/// built); a request no route took names `unmatched` and no upstream.
#[tokio::test]
async fn access_lines_name_the_route_and_its_upstream() {
    let app = Upstream::echo("app").await;
    let config = format!(
        "[upstreams.app]\nurl = \"{}\"\n[[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"app\"\n",
        app.url()
    );
    let mut og = Launch::new().config(&config).loopback().start().await;
    assert_eq!(get(&og.url("/api/x"), &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(&og.url("/elsewhere"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    // Access lines are batched; a clean stop writes out every line.
    og.sigterm();
    assert!(og.wait_exit(Duration::from_secs(10)).await.success());
    let logs = og.json_logs();
    let line = |path: &str| {
        logs.iter()
            .find(|l| l["target"] == "access" && l["path"] == path)
            .unwrap_or_else(|| panic!("no access line for {path}: {logs:?}"))
            .clone()
    };
    let routed = line("/api/x");
    assert_eq!(routed["route"], "api");
    assert_eq!(routed["upstream"], "app");
    assert_eq!(routed["method"], "GET");
    assert_eq!(routed["status"], 200);
    let unmatched = line("/elsewhere");
    assert_eq!(unmatched["route"], "unmatched");
    assert!(unmatched.get("upstream").is_none(), "{unmatched}");
    assert_eq!(unmatched["status"], 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opsgate_log_governs_the_access_log() {
    let app = Upstream::echo("app").await;
    // (OPSGATE_LOG, whether access lines are written)
    let cases = [
        (None, true),
        (Some("warn,access=info"), true),
        (Some("error"), false),
        (Some("info,access=off"), false),
    ];
    for (filter, written) in cases {
        let mut launch = Launch::new().config(&shorthand(&app.url(), "")).loopback();
        if let Some(f) = filter {
            launch = launch.env("OPSGATE_LOG", f);
        }
        let mut og = launch.start().await;
        assert_eq!(get(&og.url("/seen"), &[]).await.status, StatusCode::OK);
        // Access lines are batched; a clean stop writes out every line, so after it the
        // access line is in, or never will be.
        og.sigterm();
        assert!(og.wait_exit(Duration::from_secs(10)).await.success());
        let logs = og.json_logs();
        let access = logs
            .iter()
            .any(|l| l["target"] == "access" && l["path"] == "/seen");
        assert_eq!(
            access, written,
            "{filter:?}: access line written: {access}; {logs:?}"
        );
        if filter == Some("warn,access=info") {
            assert!(
                !logs.iter().any(|l| l["message"] == "opsgate started"),
                "warn keeps INFO lines of other targets out: {logs:?}"
            );
        }
    }
}
