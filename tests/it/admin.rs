//! Ops control through the real daemon: maintenance on the proxy port, every maintenance
//! source, reloads, the admin API (auth, config, events, drain), `opsgate ctl` and the
//! fleet key on a throwaway Redis.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::inprocess::InProcess;
use crate::support::metrics::{scrape, series};
use crate::support::opsgate::{
    Answer, Launch, Opsgate, command, get, http1, raw_exchange, raw_status, request, run_to_end,
};
use crate::support::redis::RedisServer;
use crate::support::upstream::{Upstream, full};
use crate::support::{Served, eventually, free_port, loopback_addr};

const TOKEN: &str = "adm-tok-4711";

/// One upstream `app` behind one route `api` on `/api`, then `extra` (more tables).
fn api_config(upstream: &Upstream, route_timeout: &str, extra: &str) -> String {
    format!(
        r#"[upstreams.app]
url = "{}"

[upstreams.app.breaker]
failure_threshold = 5

[[routes]]
name = "api"
prefix = "/api"
upstream = "app"
timeout = "{route_timeout}"

{extra}
"#,
        upstream.url()
    )
}

async fn start(upstream: &Upstream, extra: &str) -> Opsgate {
    Opsgate::start(&api_config(upstream, "10s", extra)).await
}

/// An admin call without a token.
async fn ops(og: &impl Served, method: &str, path: &str, body: &str) -> Answer {
    request(method, &og.admin_url(path), &[], body).await
}

/// An admin call with the bearer token.
async fn ops_auth(og: &impl Served, method: &str, path: &str, body: &str) -> Answer {
    let bearer = format!("Bearer {TOKEN}");
    request(
        method,
        &og.admin_url(path),
        &[("authorization", &bearer)],
        body,
    )
    .await
}

/// `GET path` on the admin port, asserting 200, as JSON.
async fn ops_json(og: &impl Served, path: &str) -> Value {
    let a = ops(og, "GET", path, "").await;
    assert_eq!(a.status, 200, "GET {path}: {}", a.text());
    a.json()
}

async fn set_override(og: &impl Served, body: Value) -> Value {
    let a = ops(og, "PUT", "/_ops/maintenance", &body.to_string()).await;
    assert_eq!(a.status, 200, "PUT /_ops/maintenance {body}: {}", a.text());
    a.json()
}

/// Status of a `POST /api/write` through the proxy.
async fn post_status(og: &impl Served) -> u16 {
    request("POST", &og.url("/api/write"), &[], "x")
        .await
        .status
        .as_u16()
}

/// The proxy port's `/metrics` text.
async fn metrics(og: &impl Served) -> String {
    scrape(&og.url("/metrics")).await
}

/// Runs `opsgate <args>` to completion off the async threads: (exit code, stdout, stderr).
async fn opsgate_cmd(args: Vec<String>, env: Vec<(String, String)>) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(dir.path());
    cmd.args(&args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_to_end(cmd).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `opsgate ctl --admin <og's admin> [--token T] <args>`.
async fn ctl(og: &Opsgate, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["ctl".to_owned(), "--admin".to_owned(), og.admin_url("")];
    if let Some(t) = token {
        all.extend(["--token".to_owned(), t.to_owned()]);
    }
    all.extend(args.iter().map(|a| a.to_string()));
    opsgate_cmd(all, Vec::new()).await
}

/// A log line whose message is `message` and whose fields satisfy `pred`, awaited for up
/// to 2 s (logs are written asynchronously).
async fn logged(og: &Opsgate, message: &str, pred: impl Fn(&Value) -> bool) -> bool {
    og.wait_for_log(Duration::from_secs(2), |l| {
        l["message"] == message && pred(l)
    })
    .await
}

// ---- maintenance on the proxy port -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_mode_blocks_writes_with_retry_after_and_the_configured_body() {
    let up = Upstream::echo("app").await;
    let og = start(
        &up,
        r#"[maintenance]
enabled = true
retry_after = "120s"
body = '{"detail":"down for an upgrade"}'
"#,
    )
    .await;

    let a = request("POST", &og.url("/api/orders"), &[], "{}").await;
    assert_eq!(a.status, 503);
    assert_eq!(a.header("retry-after"), Some("120"));
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.text(), r#"{"detail":"down for an upgrade"}"#);
    for method in ["PUT", "DELETE", "PATCH"] {
        let a = request(method, &og.url("/api/orders/1"), &[], "").await;
        assert_eq!(a.status, 503, "{method}");
    }
    assert_eq!(up.hits(), 0, "a blocked write reached the app");

    for method in ["GET", "HEAD", "OPTIONS"] {
        let a = request(method, &og.url("/api/orders"), &[], "").await;
        assert_eq!(a.status, 200, "{method}");
    }
    assert_eq!(up.hits(), 3);
    // Without fail_readiness, maintenance leaves readiness alone.
    assert_eq!(get(&og.url("/_health/ready"), &[]).await.status, 200);

    let m = ops_json(&og, "/_ops/maintenance").await;
    assert_eq!(m["enabled"], true);
    assert_eq!(m["mode"], "writes");
    assert_eq!(m["held_by"], json!(["config"]));

    let text = metrics(&og).await;
    assert_eq!(series(&text, "maintenance_mode"), Some(1.0), "{text}");
    assert_eq!(
        series(&text, r#"maintenance_rejected_total{route="api"}"#),
        Some(4.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_mode_blocks_reads_but_not_exempt_paths_and_path_tricks_do_not_slip_past() {
    let up = Upstream::echo("app").await;
    let launch = Launch::new();
    let page = launch.dir().join("maintenance.html");
    std::fs::write(&page, "<h1>Back soon</h1>").unwrap();
    // A catch-all route too, so that a path outside the exemptions has somewhere to go.
    let extra = format!(
        "[[routes]]\nname = \"site\"\nprefix = \"/\"\nupstream = \"app\"\n\n\
         [maintenance]\nenabled = true\nmode = \"all\"\npage = \"{}\"\n",
        page.display()
    );
    let og = launch
        .config(&api_config(&up, "10s", &extra))
        .loopback()
        .start()
        .await;

    let a = get(&og.url("/api/x"), &[]).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.text(), r#"{"detail":"maintenance"}"#);
    assert_eq!(a.header("retry-after"), Some("300"));

    // Exempt prefixes pass, on segment boundaries only.
    for path in ["/_health/live", "/_health/ready", "/metrics"] {
        assert_eq!(get(&og.url(path), &[]).await.status, 200, "{path}");
    }
    for path in ["/_healthx", "/metricsx/a"] {
        assert_eq!(get(&og.url(path), &[]).await.status, 503, "{path}");
    }

    // Dot segments and encoded dots are resolved before the gate decides.
    for path in ["/_health/../api/x", "/%2e%2e/api/x", "/_health/%2E%2E/api"] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
        let resp = raw_exchange(og.addr(), req.as_bytes()).await.unwrap();
        assert_eq!(raw_status(&resp), 503, "{path}");
    }
    // An encoded slash is no separator: this stays under /_health, answered by opsgate.
    let req = b"GET //_health/..%2fapi HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";
    let resp = raw_exchange(og.addr(), req).await.unwrap();
    assert_eq!(raw_status(&resp), 404, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(up.hits(), 0, "a request reached the app during maintenance");

    // Browsers get the page, API clients the body.
    let a = get(
        &og.url("/api/x"),
        &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")],
    )
    .await;
    assert_eq!(a.status, 503);
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{:?}",
        a.headers
    );
    assert_eq!(a.text(), "<h1>Back soon</h1>");
    assert!(a.header("retry-after").is_some());

    let text = metrics(&og).await;
    assert_eq!(
        series(&text, r#"maintenance_rejected_total{route="api"}"#),
        Some(5.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_by_header_cookie_and_allowed_ip_but_not_by_a_spoofed_forwarded_for() {
    let up = Upstream::echo("app").await;
    let guarded = start(
        &up,
        r#"[maintenance]
enabled = true
mode = "all"
bypass_token = "let-me-in"
allow_ips = ["10.0.0.0/8"]
"#,
    );
    let local = start(
        &up,
        "[maintenance]\nenabled = true\nmode = \"all\"\nallow_ips = [\"127.0.0.1/32\"]\n",
    );
    let (guarded, local) = tokio::join!(guarded, local);
    let og = &guarded;
    let url = og.url("/api/x");
    assert_eq!(get(&url, &[]).await.status, 503);
    assert_eq!(
        get(&url, &[("x-maintenance-bypass", "let-me-in")])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&url, &[("x-maintenance-bypass", "let-me-i")])
            .await
            .status,
        503
    );
    assert_eq!(
        get(&url, &[("cookie", "theme=dark; opsgate_bypass=let-me-in")])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&url, &[("cookie", "opsgate_bypass=nope")]).await.status,
        503
    );
    // The peer (127.0.0.1) is not a trusted proxy: its X-Forwarded-For is not believed.
    assert_eq!(
        get(&url, &[("x-forwarded-for", "10.0.0.1")]).await.status,
        503
    );
    let a = request(
        "POST",
        &url,
        &[("x-forwarded-for", "10.0.0.1"), ("x-real-ip", "10.0.0.1")],
        "",
    )
    .await;
    assert_eq!(a.status, 503);
    assert_eq!(up.hits(), 2);

    // The client's own address in allow_ips passes reads and writes.
    assert_eq!(get(&local.url("/api/x"), &[]).await.status, 200);
    assert_eq!(post_status(&local).await, 200);
    assert_eq!(up.hits(), 4);
}

// ---- maintenance sources -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_var_at_startup_turns_maintenance_on() {
    let up = Upstream::echo("app").await;
    let og = Launch::new()
        .config(&api_config(&up, "10s", ""))
        .env("MAINTENANCE_MODE", "1")
        .loopback()
        .start()
        .await;
    assert_eq!(post_status(&og).await, 503);
    let m = ops_json(&og, "/_ops/maintenance").await;
    assert_eq!(m["enabled"], true);
    assert_eq!(m["held_by"], json!(["env"]));
    assert_eq!(m["sources"]["env"], true);
    assert_eq!(m["sources"]["config"], false);
    assert_eq!(series(&metrics(&og).await, "maintenance_mode"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_file_override_and_ctl_each_turn_maintenance_on_and_off() {
    let up = Upstream::echo("app").await;
    let launch = Launch::new();
    let flag = launch.dir().join("maintenance.flag");
    let extra = format!("[maintenance]\nflag_file = \"{}\"\n", flag.display());
    let og = launch
        .config(&api_config(&up, "10s", &extra))
        .loopback()
        .start()
        .await;

    let m = ops_json(&og, "/_ops/maintenance").await;
    assert_eq!(m["enabled"], false);
    assert_eq!(m["held_by"], json!([]));
    assert_eq!(
        m["sources"],
        json!({"config": false, "env": false, "flag_file": false, "window": false,
               "fleet": null, "override": null})
    );
    assert_eq!(post_status(&og).await, 200);

    // Flag file created at runtime.
    std::fs::write(&flag, "").unwrap();
    eventually(
        Duration::from_secs(2),
        "the flag file to block writes",
        || async { post_status(&og).await == 503 },
    )
    .await;
    let m = ops_json(&og, "/_ops/maintenance").await;
    assert_eq!(m["held_by"], json!(["flag_file"]));
    assert_eq!(m["sources"]["flag_file"], true);
    assert_eq!(series(&metrics(&og).await, "maintenance_mode"), Some(1.0));

    // The override off wins over the flag file; clearing it hands back to the file.
    let m = set_override(&og, json!({"enabled": false})).await;
    assert_eq!(m["enabled"], false);
    assert_eq!(m["held_by"], json!([]));
    assert_eq!(m["sources"]["flag_file"], true);
    assert_eq!(m["sources"]["override"], false);
    assert_eq!(post_status(&og).await, 200);
    let m = set_override(&og, json!({"enabled": null})).await;
    assert_eq!(m["held_by"], json!(["flag_file"]));
    assert_eq!(m["sources"]["override"], Value::Null);
    assert_eq!(post_status(&og).await, 503);

    // Flag file removed.
    std::fs::remove_file(&flag).unwrap();
    eventually(
        Duration::from_secs(2),
        "removing the flag file to unblock",
        || async { post_status(&og).await == 200 },
    )
    .await;
    assert_eq!(ops_json(&og, "/_ops/maintenance").await["enabled"], false);
    eventually(Duration::from_secs(1), "maintenance_mode 0", || async {
        series(&metrics(&og).await, "maintenance_mode") == Some(0.0)
    })
    .await;

    // The override through the API, with a reason.
    let m = set_override(&og, json!({"enabled": true, "reason": "db migration"})).await;
    assert_eq!(m["held_by"], json!(["override"]));
    assert_eq!(m["reason"], "db migration");
    assert_eq!(post_status(&og).await, 503);
    set_override(&og, json!({"enabled": null})).await;
    assert_eq!(post_status(&og).await, 200);

    // And through `opsgate ctl`.
    let (code, _, err) = ctl(&og, None, &["maintenance", "on", "--reason", "deploy"]).await;
    assert_eq!(code, 0, "{err}");
    let m = ops_json(&og, "/_ops/maintenance").await;
    assert_eq!(m["held_by"], json!(["override"]));
    assert_eq!(m["reason"], "deploy");
    assert_eq!(post_status(&og).await, 503);
    let (code, _, err) = ctl(&og, None, &["maintenance", "off"]).await;
    assert_eq!(code, 0, "{err}");
    let m = ops_json(&og, "/_ops/maintenance").await;
    assert_eq!(m["enabled"], false);
    assert_eq!(m["sources"]["override"], false);
    assert_eq!(post_status(&og).await, 200);
    let (code, _, err) = ctl(&og, None, &["maintenance", "clear"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        ops_json(&og, "/_ops/maintenance").await["sources"]["override"],
        Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_readiness_turns_ready_503_while_in_maintenance() {
    let up = Upstream::echo("app").await;
    let og = start(&up, "[maintenance]\nfail_readiness = true\n").await;
    let ready = || async { get(&og.url("/_health/ready"), &[]).await.status.as_u16() };
    assert_eq!(ready().await, 200);
    set_override(&og, json!({"enabled": true})).await;
    assert_eq!(ready().await, 503);
    // Reads still pass in writes mode; only readiness fails.
    assert_eq!(get(&og.url("/api/x"), &[]).await.status, 200);
    set_override(&og, json!({"enabled": null})).await;
    assert_eq!(ready().await, 200);
}

// ---- reload --------------------------------------------------------------------------------

/// A config file the directory watcher does not see change: `<dir>/conf/opsgate.toml` is a
/// symlink to `<dir>/real/opsgate.toml`, and only the latter is rewritten. Reloads then
/// come from the trigger under test alone.
fn detached_config(dir: &Path, text: &str) -> (PathBuf, PathBuf) {
    let (conf, real) = (dir.join("conf"), dir.join("real"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    let target = real.join("opsgate.toml");
    std::fs::write(&target, text).unwrap();
    let link = conf.join("opsgate.toml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    (link, target)
}

async fn start_detached(text: &str) -> (Opsgate, PathBuf) {
    let launch = Launch::new();
    let (link, target) = detached_config(launch.dir(), text);
    let og = launch.config_at(link).loopback().start().await;
    (og, target)
}

/// Status of a GET that makes the app wait 300 ms (504 under a short route timeout).
async fn slow_status(og: &Opsgate) -> u16 {
    get(&og.url("/api/slow?sleep_ms=300"), &[])
        .await
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_applies_a_changed_route_timeout() {
    let up = Upstream::echo("app").await;
    let (og, file) = start_detached(&api_config(&up, "50ms", "")).await;
    assert_eq!(slow_status(&og).await, 504);
    let before = ops_json(&og, "/_ops/status").await;

    std::fs::write(&file, api_config(&up, "5s", "")).unwrap();
    assert_eq!(slow_status(&og).await, 504, "applied before any reload");
    let a = ops(&og, "POST", "/_ops/reload", "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["result"], "success");
    assert_eq!(slow_status(&og).await, 200);

    let status = ops_json(&og, "/_ops/status").await;
    assert_eq!(status["config"]["last_reload"]["result"], "success");
    assert_eq!(status["config"]["last_reload"]["error"], Value::Null);
    assert_ne!(status["config"]["sha256"], before["config"]["sha256"]);
    let text = metrics(&og).await;
    assert_eq!(
        series(&text, r#"config_reloads_total{result="success"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(logged(&og, "config reloaded", |l| l["trigger"] == "admin").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let up = Upstream::echo("app").await;
    let (og, file) = start_detached(&api_config(&up, "50ms", "")).await;
    assert_eq!(slow_status(&og).await, 504);
    std::fs::write(&file, api_config(&up, "5s", "")).unwrap();
    og.sighup();
    eventually(Duration::from_secs(2), "the SIGHUP reload", || async {
        logged(&og, "config reloaded", |l| l["trigger"] == "signal").await
    })
    .await;
    assert_eq!(slow_status(&og).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_noticed_within_two_seconds() {
    let up = Upstream::echo("app").await;
    let launch = Launch::new();
    // The layout kubelet gives a mounted ConfigMap.
    let cm = launch.dir().join("cm");
    let v1 = cm.join("..2026_11_22_10_00_00.000000001");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("opsgate.toml"), api_config(&up, "50ms", "")).unwrap();
    std::os::unix::fs::symlink(v1.file_name().unwrap(), cm.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/opsgate.toml", cm.join("opsgate.toml")).unwrap();
    let og = launch
        .config_at(cm.join("opsgate.toml"))
        .loopback()
        .start()
        .await;
    assert_eq!(slow_status(&og).await, 504);
    let old_sha = ops_json(&og, "/_ops/status").await["config"]["sha256"].clone();

    // The update: a new timestamped dir, then `..data` atomically renamed over.
    let new_text = api_config(&up, "5s", "");
    let v2 = cm.join("..2026_11_22_10_05_00.000000002");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("opsgate.toml"), &new_text).unwrap();
    std::os::unix::fs::symlink(v2.file_name().unwrap(), cm.join("..data_tmp")).unwrap();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    let want = opsgate::config::sha256_hex(new_text.as_bytes());
    eventually(
        Duration::from_secs(2),
        "the swapped config to load",
        || async { ops_json(&og, "/_ops/status").await["config"]["sha256"] == want.as_str() },
    )
    .await;
    assert_ne!(old_sha, want.as_str());
    assert_eq!(slow_status(&og).await, 200);
    assert!(logged(&og, "config reloaded", |l| l["trigger"] == "watch").await);
}

/// The sha256 `/_ops/status` reports for the running config.
async fn running_sha(og: &Opsgate) -> String {
    ops_json(og, "/_ops/status").await["config"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits until the running config is `text`; the watcher must get there on its own.
async fn running_becomes(og: &Opsgate, text: &str, what: &str) {
    let want = opsgate::config::sha256_hex(text.as_bytes());
    eventually(Duration::from_secs(3), what, || async {
        running_sha(og).await == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_file_beside_the_config_does_not_delay_a_reload() {
    let up = Upstream::echo("app").await;
    let og = Launch::new()
        .config(&api_config(&up, "50ms", ""))
        .loopback()
        .start()
        .await;
    // Another program's file in the same directory, rewritten every 50 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, busy) = (stop.clone(), og.config_path().with_file_name("app.log"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                std::fs::write(&busy, format!("line {n}\n")).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let changed = api_config(&up, "5s", "");
    // Written aside and renamed over, as editors do: the reload sees the whole file.
    let aside = og.config_path().with_file_name(".opsgate.toml.swp");
    std::fs::write(&aside, &changed).unwrap();
    std::fs::rename(&aside, og.config_path()).unwrap();
    running_becomes(
        &og,
        &changed,
        "the edit to load while app.log keeps changing",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(slow_status(&og).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_loads_an_edit_after_another_path_reloaded() {
    let up = Upstream::echo("app").await;
    let a = api_config(&up, "50ms", "");
    let b = api_config(&up, "5s", "");
    let og = Launch::new().config(&a).loopback().start().await;
    og.write_config(&b);
    running_becomes(&og, &b, "B from the watcher").await;
    // Back to A through the admin API, right after the edit.
    og.write_config(&a);
    let r = ops(&og, "POST", "/_ops/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        running_sha(&og).await,
        opsgate::config::sha256_hex(a.as_bytes())
    );
    // B again: the watcher compares with what runs, not with what it tried last.
    og.write_config(&b);
    running_becomes(&og, &b, "B again from the watcher").await;
    assert_eq!(slow_status(&og).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn putting_the_running_config_back_after_a_broken_edit_clears_the_error() {
    let up = Upstream::echo("app").await;
    let good = api_config(&up, "50ms", "");
    let og = Launch::new().config(&good).loopback().start().await;
    og.write_config(&format!("{good}\n[bogus]\n"));
    eventually(
        Duration::from_secs(3),
        "the broken edit to fail",
        || async {
            ops_json(&og, "/_ops/status").await["config"]["last_reload"]["result"] == "failure"
        },
    )
    .await;
    og.write_config(&good);
    eventually(Duration::from_secs(3), "the error to clear", || async {
        ops_json(&og, "/_ops/status").await["config"]["last_reload"]["result"] == "success"
    })
    .await;
    let status = ops_json(&og, "/_ops/status").await;
    assert_eq!(
        status["config"]["last_reload"]["error"],
        Value::Null,
        "{status}"
    );
    assert_eq!(
        status["config"]["sha256"],
        opsgate::config::sha256_hex(good.as_bytes())
    );
    assert_eq!(
        slow_status(&og).await,
        504,
        "the running config never changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_is_never_applied_on_reload() {
    let up = Upstream::echo("app").await;
    let (og, file) = start_detached(&api_config(&up, "10s", "")).await;
    // What a reader sees between a writer's truncate and its write.
    std::fs::write(&file, "").unwrap();
    let a = ops(&og, "POST", "/_ops/reload", "").await;
    assert_eq!(a.status, 422, "{}", a.text());
    assert!(
        a.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("empty")),
        "{}",
        a.text()
    );
    assert_eq!(get(&og.url("/api/x"), &[]).await.status, 200, "routes kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_keeps_the_running_config_and_reports_the_error() {
    let up = Upstream::echo("app").await;
    let good = api_config(&up, "50ms", "");
    let (og, file) = start_detached(&good).await;
    assert_eq!(slow_status(&og).await, 504);

    // A longer timeout (which would turn the 504 into a 200) next to a broken line.
    let broken = api_config(&up, "5s", "[maintenance]\nmode = writes\n");
    let line = broken.lines().position(|l| l == "mode = writes").unwrap() + 1;
    std::fs::write(&file, &broken).unwrap();
    let a = ops(&og, "POST", "/_ops/reload", "").await;
    assert_eq!(a.status, 422, "{}", a.text());
    let body = a.json();
    assert_eq!(body["result"], "failure");
    let error = body["error"].as_str().unwrap().to_owned();
    // `<file>:<line>:<col>: <message>`
    let col = error
        .split_once(&format!("opsgate.toml:{line}:"))
        .and_then(|(_, rest)| rest.split_once(':'))
        .and_then(|(col, _)| col.parse::<u32>().ok());
    assert!(col.is_some(), "no line:col for line {line}: {error}");

    assert_eq!(slow_status(&og).await, 504, "the old config must stay");
    assert_eq!(post_status(&og).await, 200);
    let status = ops_json(&og, "/_ops/status").await;
    let last = &status["config"]["last_reload"];
    assert_eq!(last["result"], "failure");
    assert_eq!(last["error"], error.as_str());
    assert!(last["at"].as_str().is_some_and(|t| t.contains('T')));
    assert_eq!(
        status["config"]["sha256"],
        opsgate::config::sha256_hex(good.as_bytes())
    );
    let text = metrics(&og).await;
    assert_eq!(
        series(&text, r#"config_reloads_total{result="failure"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        logged(
            &og,
            "config reload failed; keeping the running config",
            |l| { l["level"] == "ERROR" && l["error"] == error.as_str() }
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_during_a_request_loop_fail_no_request() {
    let up = Upstream::echo("app").await;
    let og = start(&up, "").await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for n in 0..2 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), og.url("/api/x"));
        clients.push(tokio::spawn(async move {
            // One client reuses its connection, the other opens one per request.
            let client = if n == 0 {
                Client::builder(TokioExecutor::new()).build_http()
            } else {
                http1()
            };
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get(&url).body(full(Bytes::new())).unwrap();
                let good = match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        resp.into_body().collect().await.is_ok() && status == 200
                    }
                    Err(_) => false,
                };
                if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for i in 0..10 {
        let timeout = if i % 2 == 0 { "5s" } else { "6s" };
        og.write_config(&api_config(&up, timeout, ""));
        let a = ops(&og, "POST", "/_ops/reload", "").await;
        assert_eq!(a.status, 200, "reload {i}: {}", a.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok >= 20, "only {ok} requests in the loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_of_an_unchanged_upstream_survives_a_reload() {
    let up = Upstream::echo("app").await;
    let (og, file) = start_detached(&api_config(&up, "10s", "")).await;
    let a = ops(&og, "POST", "/_ops/breakers/app/open", "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["state"], "forced_open");

    std::fs::write(&file, api_config(&up, "9s", "")).unwrap();
    let a = ops(&og, "POST", "/_ops/reload", "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let breakers = ops_json(&og, "/_ops/breakers").await;
    let app = breakers["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "app")
        .cloned()
        .unwrap_or_else(|| panic!("no breaker app: {breakers}"));
    assert_eq!(app["state"], "forced_open", "{app}");
    let a = get(&og.url("/api/x"), &[]).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.header("x-opsgate-circuit"), Some("open"));
    assert_eq!(up.hits(), 0);
}

/// Two critical checks on the app: `steady` (slow: each run takes 300 ms), and `moved`,
/// whose definition is `moved`.
fn checks_config(up: &Upstream, moved: &str) -> String {
    api_config(
        up,
        "10s",
        &format!(
            r#"[[health.checks]]
name = "steady"
type = "http"
url = "{url}/health?sleep_ms=300"
interval = "400ms"
timeout = "3s"

[[health.checks]]
name = "moved"
interval = "400ms"
timeout = "3s"
{moved}
"#,
            url = up.url()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_stays_up_through_a_reload_that_changes_a_check() {
    let up = Upstream::echo("app").await;
    let before = format!("type = \"tcp\"\naddress = \"{}\"", up.addr);
    let (og, file) = start_detached(&checks_config(&up, &before)).await;
    let ready_url = og.url("/_health/ready");
    eventually(Duration::from_secs(5), "readiness", || async {
        get(&ready_url, &[]).await.status == 200
    })
    .await;

    // Probe readiness without pause through the reload, as a kubelet on every pod would.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (stop, url) = (stop.clone(), ready_url.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let a = get(&url, &[]).await;
                answers.push((a.status.as_u16(), a.text()));
            }
            answers
        })
    };
    // `steady` is unchanged; `moved` now probes another target, slow too.
    let after = format!("type = \"http\"\nurl = \"{}/moved?sleep_ms=300\"", up.url());
    std::fs::write(&file, checks_config(&up, &after)).unwrap();
    let a = ops(&og, "POST", "/_ops/reload", "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    // The new definition has a result once `moved` reports a run as slow as the new target.
    let moved_url = og.url("/_health/checks/moved");
    eventually(
        Duration::from_secs(5),
        "the new definition to run",
        || async {
            get(&moved_url, &[]).await.json()["latency_ms"]
                .as_f64()
                .is_some_and(|ms| ms >= 300.0)
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let answers = poller.await.unwrap();
    assert!(answers.len() > 5, "too few probes: {answers:?}");
    let failed: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "readiness dropped during the reload: {failed:?}"
    );
    let moved = get(&moved_url, &[]).await.json();
    assert_eq!(moved["status"], "healthy", "{moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_address_change_warns_and_keeps_serving() {
    let up = Upstream::echo("app").await;
    let listen: SocketAddr = loopback_addr();
    let admin: SocketAddr = loopback_addr();
    let text = |proxy: SocketAddr| {
        format!(
            "[proxy]\nlisten = \"{proxy}\"\n\n[admin]\nlisten = \"{admin}\"\n\n{}",
            api_config(&up, "10s", "")
        )
    };
    let launch = Launch::new();
    let (link, file) = detached_config(launch.dir(), &text(listen));
    let og = launch
        .config_at(link)
        .listening_on(listen)
        .admin_on(admin)
        .start()
        .await;

    let moved: SocketAddr = loopback_addr();
    std::fs::write(&file, text(moved)).unwrap();
    let a = ops(&og, "POST", "/_ops/reload", "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let body = a.json();
    assert_eq!(body["result"], "success");
    assert!(
        body["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w.as_str().unwrap().contains("proxy.listen"))),
        "{body}"
    );
    assert!(
        og.wait_for_log(Duration::from_secs(2), |l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("proxy.listen")))
            .await,
        "no warning logged: {:#?}",
        og.logs()
    );
    assert_eq!(get(&og.url("/api/x"), &[]).await.status, 200);
    assert!(std::net::TcpStream::connect(moved).is_err());
}

// ---- admin API -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_the_api_but_not_metrics_health_or_the_page_shell() {
    let up = Upstream::echo("app").await;
    let og = start(&up, &format!("[admin]\ntoken = \"{TOKEN}\"\n")).await;
    let unauthorized = |a: &Answer| {
        assert_eq!(a.status, 401, "{}", a.text());
        assert_eq!(a.json(), json!({"detail": "unauthorized"}));
    };
    unauthorized(&ops(&og, "GET", "/_ops/status", "").await);
    unauthorized(
        &request(
            "GET",
            &og.admin_url("/_ops/status"),
            &[("authorization", "Bearer adm-tok-4712")],
            "",
        )
        .await,
    );
    unauthorized(&ops(&og, "PUT", "/_ops/maintenance", r#"{"enabled":true}"#).await);
    assert_eq!(
        post_status(&og).await,
        200,
        "an unauthorized PUT took effect"
    );
    let a = ops_auth(&og, "GET", "/_ops/status", "").await;
    assert_eq!(a.status, 200);
    assert!(a.json()["version"].is_string());

    // A session cookie for the browser.
    unauthorized(&ops(&og, "POST", "/_ops/session", "wrong").await);
    let a = ops(&og, "POST", "/_ops/session", TOKEN).await;
    assert!(a.status.is_success(), "{}", a.status);
    let cookie = a.header("set-cookie").expect("set-cookie").to_owned();
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    assert!(attrs[0].starts_with("opsgate_session="), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/_ops"] {
        assert!(attrs.contains(&attr), "{attr} missing: {cookie}");
    }
    assert!(!cookie.to_ascii_lowercase().contains("max-age"), "{cookie}");
    assert!(
        !cookie.contains(TOKEN),
        "the cookie carries the token: {cookie}"
    );
    let a = request(
        "GET",
        &og.admin_url("/_ops/status"),
        &[("cookie", attrs[0])],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());

    // Open without a token.
    for path in ["/metrics", "/_health/live", "/_ops/"] {
        let a = ops(&og, "GET", path, "").await;
        assert_eq!(a.status, 200, "{path}");
    }
    let shell = ops(&og, "GET", "/_ops/", "").await;
    assert!(
        shell
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/html"))
    );
}

/// 401 without the token, 200 with it, on `/_ops/status`.
async fn assert_token_required(og: &Opsgate) {
    let a = ops(og, "GET", "/_ops/status", "").await;
    assert_eq!(a.status, 401, "open without a token: {}", a.text());
    assert_eq!(a.json(), json!({"detail": "unauthorized"}));
    assert_eq!(ops_auth(og, "GET", "/_ops/status", "").await.status, 200);
    let a = ops(og, "PUT", "/_ops/maintenance", r#"{"enabled":true}"#).await;
    assert_eq!(a.status, 401, "{}", a.text());
    assert_eq!(
        post_status(og).await,
        200,
        "an unauthorized PUT took effect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_comes_from_the_environment_when_the_file_has_none() {
    let up = Upstream::echo("app").await;
    let og = Launch::new()
        .config(&api_config(&up, "10s", ""))
        .loopback()
        .env("OPSGATE_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
    assert_token_required(&og).await;
    let config = ops_auth(&og, "GET", "/_ops/config", "").await.json();
    assert_eq!(config["admin"]["token"], "<redacted>");

    // No config file at all: `run --upstream` on built-in defaults.
    let og = Launch::new()
        .arg("--upstream")
        .arg(up.url())
        .loopback()
        .env("OPSGATE_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
    assert_token_required(&og).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_admin_without_a_token_refuses_to_start() {
    let up = Upstream::echo("app").await;
    let admin_port = free_port();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\n\n[admin]\nlisten = \"0.0.0.0:{admin_port}\"\n\n{}",
        free_port(),
        api_config(&up, "10s", "")
    );
    let mut og = Launch::new().config(&text).spawn();
    let status = og.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(2), "stderr: {:?}", og.stderr());
    assert!(std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_endpoint_redacts_secrets_and_includes_defaults() {
    let up = Upstream::echo("app").await;
    let text = format!(
        r#"[admin]
token = "{TOKEN}"

[upstreams.app]
url = "http://deploy:up-pass-31@{}"

[[routes]]
name = "api"
prefix = "/api"
upstream = "app"

[maintenance]
bypass_token = "bypass-sec-52"

[[health.checks]]
name = "cache"
type = "redis"
url = "redis://:cache-pass-77@127.0.0.1:{}"
critical = false
interval = "1h"
"#,
        up.addr,
        free_port()
    );
    let og = Opsgate::start(&text).await;
    let a = ops_auth(&og, "GET", "/_ops/config", "").await;
    assert_eq!(a.status, 200);
    let raw = a.text();
    for secret in [TOKEN, "up-pass-31", "bypass-sec-52", "cache-pass-77"] {
        assert!(!raw.contains(secret), "{secret} shown: {raw}");
    }
    let c = a.json();
    assert_eq!(c["admin"]["token"], "<redacted>");
    assert_eq!(c["maintenance"]["bypass_token"], "<redacted>");
    assert_eq!(
        c["upstreams"]["app"]["url"],
        format!("http://deploy:<redacted>@{}", up.addr)
    );
    assert!(
        c["health"]["checks"][0]["url"]
            .as_str()
            .is_some_and(|u| u.contains("<redacted>")),
        "{c}"
    );
    // Defaults are filled in.
    assert_eq!(c["proxy"]["drain_timeout"], "30s");
    assert_eq!(c["proxy"]["encoded_slashes"], "keep");
    assert_eq!(c["maintenance"]["mode"], "writes");
    assert_eq!(c["maintenance"]["status"], 503);
    assert_eq!(
        c["maintenance"]["exempt_prefixes"],
        json!(["/_health", "/metrics"])
    );
    assert_eq!(c["health"]["interval"], "10s");
    assert_eq!(c["metrics"]["path"], "/metrics");
    assert_eq!(
        c["upstreams"]["app"]["connect_timeout"], "2s",
        "{}",
        c["upstreams"]
    );
    for line in og.logs() {
        for secret in ["up-pass-31", "cache-pass-77"] {
            assert!(!line.contains(secret), "{secret} logged: {line}");
        }
    }
}

/// One server-sent event.
#[derive(Debug)]
struct SseEvent {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// A reader of `/_ops/events`.
struct Sse {
    body: Incoming,
    buf: String,
}

impl Sse {
    async fn connect(og: &Opsgate, last_event_id: Option<u64>) -> Sse {
        let mut b = Request::get(og.admin_url("/_ops/events"));
        if let Some(id) = last_event_id {
            b = b.header("last-event-id", id.to_string());
        }
        let resp = http1()
            .request(b.body(full(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped); panics after 2 s.
    async fn next(&mut self) -> SseEvent {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
                return SseEvent { id, event, data };
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("no event within 2s")
                .expect("stream ended")
                .unwrap();
            if let Ok(bytes) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }

    /// The next event of kind `event`, skipping others (e.g. interleaved `status`).
    async fn next_of(&mut self, event: &str) -> SseEvent {
        loop {
            let e = self.next().await;
            if e.event == event {
                return e;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_status_then_maintenance_and_resume_with_last_event_id() {
    let up = Upstream::echo("app").await;
    let og = start(&up, "").await;
    let mut first = Sse::connect(&og, None).await;
    let mut watcher = Sse::connect(&og, None).await;
    let e = first.next().await;
    assert_eq!(e.event, "status", "{e:?}");
    assert_eq!(e.data["type"], "status");
    assert_eq!(e.data["maintenance"]["enabled"], false);
    assert!(e.data["version"].is_string());
    assert_eq!(watcher.next().await.event, "status");

    set_override(&og, json!({"enabled": true, "reason": "it"})).await;
    let m = first.next().await;
    assert_eq!(m.event, "maintenance", "{m:?}");
    assert_eq!(m.data["type"], "maintenance");
    assert_eq!(m.data["enabled"], true);
    assert_eq!(m.data["held_by"], json!(["override"]));
    assert!(m.data["at"].is_string());
    let seen = m.id.expect("events carry an id");
    let s = first.next().await;
    assert_eq!(s.event, "status", "{s:?}");
    assert_eq!(s.data["maintenance"]["enabled"], true);
    watcher.next_of("maintenance").await;
    drop(first);

    // Missed while away: two changes, each seen by the other stream before going on.
    set_override(&og, json!({"enabled": false})).await;
    let off = watcher.next_of("maintenance").await;
    set_override(&og, json!({"enabled": null})).await;
    let cleared = watcher.next_of("maintenance").await;

    let mut resumed = Sse::connect(&og, Some(seen)).await;
    let r1 = resumed.next().await;
    let r2 = resumed.next().await;
    assert_eq!(
        (r1.event.as_str(), r1.id),
        ("maintenance", off.id),
        "{r1:?}"
    );
    assert_eq!(r1.data["enabled"], false);
    assert_eq!(
        (r2.event.as_str(), r2.id),
        ("maintenance", cleared.id),
        "{r2:?}"
    );
    let s = resumed.next().await;
    assert_eq!(s.event, "status", "{s:?}");
    assert_eq!(s.data["maintenance"]["enabled"], false);
}

#[tokio::test(start_paused = true)]
async fn drain_fails_readiness_and_keeps_proxying() {
    let up = Upstream::echo("app").await;
    let mut og = InProcess::start(&api_config(&up, "10s", "")).await;
    assert_eq!(get(&og.url("/_health/ready"), &[]).await.status, 200);
    let a = ops(&og, "POST", "/_ops/drain", "").await;
    assert_eq!(a.status, 200, "{}", a.text());
    // Keeps serving for as long as it is not told to stop, well past any drain timeout.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(og.running(), "opsgate stopped after POST /_ops/drain");
        let ready = raw_exchange(
            og.addr(),
            b"GET /_health/ready HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .await
        .expect("the proxy port stopped answering after a drain");
        assert_eq!(raw_status(&ready), 503);
        let api = raw_exchange(
            og.addr(),
            b"GET /api/x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .await
        .expect("the proxy port stopped answering after a drain");
        assert_eq!(raw_status(&api), 200);
    }
    assert_eq!(ops_json(&og, "/_ops/status").await["draining"], true);
    // Told to stop, it runs the shutdown sequence to its end.
    og.terminate();
    og.stopped().await.expect("a clean stop");
}

// ---- opsgate ctl ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_status_breaker_reload_drain_and_exit_codes() {
    let up = Upstream::echo("app").await;
    let og = start(&up, &format!("[admin]\ntoken = \"{TOKEN}\"\n")).await;

    let (code, out, err) = ctl(&og, Some(TOKEN), &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("opsgate "), "{out}");
    assert!(out.contains("maintenance: off (mode writes)"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("app") && l.contains("closed")),
        "{out}"
    );
    assert!(
        serde_json::from_str::<Value>(&out).is_err(),
        "not a summary: {out}"
    );

    let (code, out, err) = ctl(&og, Some(TOKEN), &["--json", "status"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(v["version"].is_string());
    assert_eq!(v["maintenance"]["enabled"], false);

    // The token from the environment.
    let (code, _, err) = opsgate_cmd(
        vec![
            "ctl".into(),
            "--admin".into(),
            og.admin_url(""),
            "status".into(),
        ],
        vec![("OPSGATE_ADMIN_TOKEN".into(), TOKEN.into())],
    )
    .await;
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = ctl(&og, Some(TOKEN), &["breaker", "open", "app"]).await;
    assert_eq!(code, 0, "{err}");
    let b = ops_auth(&og, "GET", "/_ops/breakers", "").await.json();
    assert_eq!(b["breakers"][0]["state"], "forced_open", "{b}");
    let (code, _, err) = ctl(&og, Some(TOKEN), &["breaker", "reset", "app"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ctl(&og, Some(TOKEN), &["breaker", "open", "nope"]).await;
    assert_eq!(code, 1, "{err}");

    let (code, out, err) = ctl(&og, Some(TOKEN), &["reload"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["result"], "success");

    // Wrong or missing token: exit 1 with a hint.
    for token in [Some("wrong"), None] {
        let (code, _, err) = ctl(&og, token, &["status"]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("401"), "{err}");
        assert!(err.contains("hint:") && err.contains("--token"), "{err}");
    }
    // Nothing listening: exit 1.
    let (code, _, err) = opsgate_cmd(
        vec![
            "ctl".into(),
            "--admin".into(),
            format!("http://127.0.0.1:{}", free_port()),
            "status".into(),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(code, 1, "{err}");

    let (code, out, err) = ctl(&og, Some(TOKEN), &["drain"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["draining"], true);
}

// ---- fleet ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_follow_the_fleet_key_and_keep_it_through_a_redis_outage() {
    const PASSWORD: &str = "fleet-pw-9031";
    let key = "opsgate:it:maintenance";
    let up = Upstream::echo("app").await;
    let mut redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port);
    let extra =
        format!("[control]\nredis_url = \"{url}\"\nkey = \"{key}\"\npoll_interval = \"5s\"\n");
    let (a, b, c) = tokio::join!(start(&up, &extra), start(&up, &extra), start(&up, &extra));
    let nodes = [a, b, c];
    for og in &nodes {
        eventually(
            Duration::from_secs(5),
            "the fleet key read as off",
            || async { ops_json(og, "/_ops/maintenance").await["sources"]["fleet"] == false },
        )
        .await;
    }

    let fleet = |state: &'static str| {
        let args = [
            "ctl",
            "fleet",
            "maintenance",
            state,
            "--redis",
            &url,
            "--key",
            key,
        ]
        .map(String::from)
        .to_vec();
        async move {
            let (code, out, err) = opsgate_cmd(args, Vec::new()).await;
            assert_eq!(code, 0, "ctl fleet maintenance {state}: {err}");
            assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD));
        }
    };
    let all_posts = |want: u16| {
        let nodes = &nodes;
        async move {
            for og in nodes {
                if post_status(og).await != want {
                    return false;
                }
            }
            true
        }
    };

    fleet("on").await;
    eventually(Duration::from_secs(1), "all three blocking writes", || {
        all_posts(503)
    })
    .await;
    for og in &nodes {
        let m = ops_json(og, "/_ops/maintenance").await;
        assert_eq!(m["held_by"], json!(["fleet"]), "{m}");
    }
    fleet("off").await;
    eventually(Duration::from_secs(1), "all three passing writes", || {
        all_posts(200)
    })
    .await;
    fleet("on").await;
    eventually(
        Duration::from_secs(1),
        "all three blocking writes again",
        || all_posts(503),
    )
    .await;

    // Redis gone: the last state holds and the API still answers.
    redis.kill();
    for og in &nodes {
        eventually(
            Duration::from_secs(5),
            "the lost connection to show",
            || async { ops_json(og, "/_ops/maintenance").await["fleet"]["connected"] == false },
        )
        .await;
    }
    assert!(
        all_posts(503).await,
        "the fleet state was dropped with Redis"
    );
    for og in &nodes {
        let m = ops_json(og, "/_ops/maintenance").await;
        assert_eq!(m["enabled"], true);
        assert_eq!(m["sources"]["fleet"], true);
    }

    // The password shows nowhere.
    for og in &nodes {
        for path in ["/_ops/status", "/_ops/maintenance", "/_ops/config"] {
            let text = ops(og, "GET", path, "").await.text();
            assert!(
                !text.contains(PASSWORD),
                "{path} shows the password: {text}"
            );
            if path == "/_ops/config" {
                assert!(text.contains("redis://:<redacted>@127.0.0.1"), "{text}");
            }
        }
        for line in og.logs().iter().chain(og.stderr().iter()) {
            assert!(!line.contains(PASSWORD), "logged: {line}");
        }
    }
}
