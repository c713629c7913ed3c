//! `opsgate demo`: a small built-in app with opsgate in front, so a new user sees the
//! proxy, breaker, retries, maintenance and metrics work with nothing else installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Serves the demo app on `listener` until the task is dropped.
pub async fn serve_app(listener: TcpListener) {
    let counter = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let counter = counter.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let counter = counter.clone();
                async move { Ok::<_, Infallible>(app(req, &counter).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn app(req: Request<Incoming>, counter: &AtomicU64) -> Response<Full<Bytes>> {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    let query = req.uri().query().unwrap_or("").to_string();
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/") => json(
            StatusCode::OK,
            r#"{"app":"opsgate demo","endpoints":["GET /api/items","POST /api/items","GET /api/slow?ms=1500","GET /api/flaky"]}"#,
        ),
        (Method::GET, "/api/items") => json(
            StatusCode::OK,
            r#"[{"id":1,"name":"anvil"},{"id":2,"name":"rocket skates"}]"#,
        ),
        (Method::POST, "/api/items") => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            json(
                StatusCode::CREATED,
                format!(r#"{{"created":true,"bytes":{}}}"#, body.len()),
            )
        }
        (Method::GET, "/api/slow") => {
            let ms = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1500u64)
                .min(30_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, format!(r#"{{"slept_ms":{ms}}}"#))
        }
        (Method::GET, "/api/flaky") => {
            if n.is_multiple_of(2) {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    r#"{"error":"flaky says no"}"#,
                )
            } else {
                json(StatusCode::OK, r#"{"flaky":"ok this time"}"#)
            }
        }
        (Method::GET, "/health") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
    }
}

/// The demo's opsgate config, in the same TOML a user writes (so it is validated the same way).
pub fn demo_config(listen: SocketAddr, admin: SocketAddr, app: SocketAddr) -> String {
    format!(
        r#"
[proxy]
listen = "{listen}"

[admin]
listen = "{admin}"

[upstreams.app]
url = "http://{app}"
timeout = "1s"

[upstreams.app.breaker]
failure_threshold = 3
recovery_timeout = "10s"

[upstreams.app.retry]
attempts = 2
base_delay = "50ms"
# A timed-out call is not retried, so /api/slow answers 504 after one 1s timeout
# (the default list also retries "timeout" and "504").
on = ["connect-failure", "502", "503"]

[[routes]]
name = "api"
prefix = "/api"
upstream = "app"

[[routes]]
name = "web"
prefix = "/"
upstream = "app"

[[health.checks]]
name = "demo-app"
type = "http"
url = "http://{app}/health"
interval = "2s"
timeout = "500ms"
"#
    )
}

/// The banner with the commands to try; `opsgate` is how this binary is invoked from
/// the user's shell (see [`invocation`]).
pub fn banner(listen: SocketAddr, admin: SocketAddr, opsgate: &str) -> String {
    let port = listen.port();
    let admin_port = admin.port();
    // `ctl` defaults to the default admin port; name it only when the demo moved it.
    let ctl = if admin == crate::config::defaults::ADMIN_LISTEN {
        format!("{opsgate} ctl")
    } else {
        format!("{opsgate} ctl --admin http://127.0.0.1:{admin_port}")
    };
    format!(
        r#"
opsgate demo: proxy on http://127.0.0.1:{port} in front of a built-in app; admin on http://127.0.0.1:{admin_port}

  curl -i http://127.0.0.1:{port}/api/items                 # proxied (see X-Request-Id)
  curl -i -X POST -d '{{"name":"x"}}' http://127.0.0.1:{port}/api/items
  curl -i 'http://127.0.0.1:{port}/api/slow?ms=3000'        # 504 after the 1s upstream timeout (not retried)
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\n' http://127.0.0.1:{port}/api/flaky; done
  curl -s http://127.0.0.1:{port}/_health/ready
  curl -s http://127.0.0.1:{port}/metrics | grep http_requests_total
  {ctl} maintenance on --reason demo     # then POST gets 503, GET still works
  {ctl} status
  {ctl} maintenance clear

Ctrl-C stops it.
"#
    )
}

/// How the user can run this binary from where they stand: `opsgate` when the `opsgate`
/// on the PATH is this very file, otherwise its path (relative to the working directory
/// when it lies below it, as `cargo run` leaves it: `target/release/opsgate`).
pub fn invocation() -> String {
    let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "opsgate".to_string();
    };
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p).any(|dir| {
                std::fs::canonicalize(dir.join("opsgate")).is_ok_and(|found| found == exe)
            })
        })
        .unwrap_or(false);
    if on_path {
        return "opsgate".to_string();
    }
    let relative = std::env::current_dir()
        .and_then(std::fs::canonicalize)
        .ok()
        .and_then(|cwd| {
            exe.strip_prefix(cwd)
                .ok()
                .map(|r| format!("./{}", r.display()))
        });
    let shown = relative.unwrap_or_else(|| exe.display().to_string());
    if shown.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        format!("'{}'", shown.replace('\'', "'\\''"))
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_does_not_retry_timeouts() {
        let text = demo_config(
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:9901".parse().unwrap(),
            "127.0.0.1:3000".parse().unwrap(),
        );
        let cfg = crate::config::parse_str(
            &text,
            "<demo>",
            &crate::config::Overrides::default(),
            &|_: &str| None,
        )
        .expect("demo config is valid");
        let on = &cfg.file.upstreams["app"]
            .retry
            .as_ref()
            .expect("retry set")
            .on;
        assert!(
            !on.iter().any(|o| o.raw() == "timeout" || o.raw() == "504"),
            "{on:?}"
        );
    }

    #[test]
    fn banner_uses_the_given_invocation() {
        let b = banner(
            "0.0.0.0:8080".parse().unwrap(),
            "127.0.0.1:9901".parse().unwrap(),
            "./target/release/opsgate",
        );
        assert!(b.contains("  ./target/release/opsgate ctl maintenance on --reason demo"));
        assert!(!b.contains("\n  opsgate ctl"));
        // Unquoted, zsh would take `?` for a glob and refuse the command.
        assert!(
            b.contains("curl -i 'http://127.0.0.1:8080/api/slow?ms=3000'"),
            "{b}"
        );
    }
}
