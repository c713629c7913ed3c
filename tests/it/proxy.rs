//! The proxy port end to end: the real binary between a real client and real upstreams.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::eventually;
use crate::support::metrics::series;
use crate::support::opsgate::{
    Opsgate, get, h2c, http1, raw_exchange, raw_status, read_response, send, shorthand,
};
use crate::support::upstream::{Filler, Hangup, Upstream, WsEcho, full, refused_url, seen};

const MIB: u64 = 1024 * 1024;
/// opsgate's peak RSS while streaming 100 MiB either way must stay under this.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

#[tokio::test]
async fn streams_a_100_mib_response_in_bounded_memory() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let len = 100 * MIB;
    let resp = http1()
        .request(
            Request::get(og.url(&format!("/download?bytes={len}")))
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, len);
    let peak = og.peak_rss_kib();
    println!("opsgate peak RSS: {peak} KiB");
    assert!(
        peak < RSS_LIMIT_KIB,
        "opsgate peaked at {peak} KiB streaming {len} bytes"
    );
}

#[tokio::test]
async fn streams_a_100_mib_upload_in_bounded_memory() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let len = 100 * MIB;
    let answer = send(
        &http1(),
        Request::post(og.url("/upload"))
            .body(Filler::boxed(len))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["body_bytes"], len);
    let peak = og.peak_rss_kib();
    println!("opsgate peak RSS: {peak} KiB");
    assert!(
        peak < RSS_LIMIT_KIB,
        "opsgate peaked at {peak} KiB receiving {len} bytes"
    );
}

#[tokio::test]
async fn tunnels_a_websocket_to_the_upstream() {
    let ws = WsEcho::start().await;
    let og = Opsgate::start(&shorthand(&ws.url(), "")).await;
    let stream = TcpStream::connect(og.addr()).await.unwrap();
    let (mut client, resp) =
        tokio_tungstenite::client_async(format!("ws://{}/socket", og.addr()), stream)
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(resp.headers().contains_key("x-request-id"));
    for msg in [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 255]),
    ] {
        client.send(msg.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), client.next())
            .await
            .expect("echo within 5s")
            .expect("connection open")
            .unwrap();
        assert_eq!(echoed, msg);
    }
    client.close(None).await.unwrap();
}

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let answer = send(
        &h2c(),
        Request::get(og.url("/h2?x=1"))
            .header("x-custom", "v")
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, http::Version::HTTP_2);
    let echo = answer.json();
    assert_eq!(echo["path"], "/h2");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(seen(&echo, "x-custom"), ["v"]);
    assert_eq!(seen(&echo, "x-forwarded-host"), [og.addr().to_string()]);
}

/// The first bytes decide whether a plain connection is served as HTTP/1 directly or
/// through the h1/h2 detecting connection: a request whose first segment is too short to
/// tell (`P` could begin `PRI`, the h2 preface, or `POST`) must still be served, and so
/// must a whole request line that begins with `P`.
#[tokio::test]
async fn requests_starting_like_the_h2_preface_are_served_as_http1() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    for (first, rest) in [
        (
            &b"P"[..],
            &b"OST /split HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n"[..],
        ),
        (
            b"PR",
            b"OPFIND /split HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            b"POST /whole HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n",
            b"",
        ),
    ] {
        let mut sock = TcpStream::connect(og.addr()).await.unwrap();
        sock.set_nodelay(true).unwrap();
        sock.write_all(first).await.unwrap();
        if !rest.is_empty() {
            // Not a synchronization: the answer is the same either way. The pause makes
            // it likely that opsgate's first look sees only `first`.
            tokio::time::sleep(Duration::from_millis(50)).await;
            sock.write_all(rest).await.unwrap();
        }
        let (head, body) = read_response(&mut sock).await;
        let sent = String::from_utf8_lossy(first);
        assert_eq!(raw_status(head.as_bytes()), 200, "{sent:?}: {head}");
        let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["version"], "HTTP/1.1", "{sent:?}");
        let line = [first, rest].concat();
        let method = line.split(|b| *b == b' ').next().unwrap();
        assert_eq!(
            echo["method"].as_str().unwrap().as_bytes(),
            method,
            "{sent:?}"
        );
    }
}

#[tokio::test]
async fn strips_hop_by_hop_headers_but_keeps_te_trailers() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let sent = [
        ("connection", "x-foo"),
        ("x-foo", "connection-scoped"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("te", "trailers"),
        ("x-bar", "end-to-end"),
    ];
    // The client really sends them: straight to the upstream they all arrive.
    let direct = get(&format!("{}/hop", app.url()), &sent).await.json();
    for name in ["x-foo", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            !seen(&direct, name).is_empty(),
            "client did not send {name}"
        );
    }
    let answer = get(&og.url("/hop"), &sent).await;
    assert_eq!(answer.status, StatusCode::OK);
    let echo = answer.json();
    for gone in ["x-foo", "keep-alive", "proxy-authorization"] {
        assert!(
            seen(&echo, gone).is_empty(),
            "{gone} reached upstream: {echo}"
        );
    }
    assert!(
        seen(&echo, "connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("x-foo")),
        "{echo}"
    );
    assert_eq!(seen(&echo, "te"), ["trailers"]);
    assert_eq!(seen(&echo, "x-bar"), ["end-to-end"]);
}

#[tokio::test]
async fn an_h2c_upgrade_is_dropped_not_tunnelled() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let answer = get(
        &og.url("/no-h2c"),
        &[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, http::Version::HTTP_11);
    let echo = answer.json();
    assert_eq!(echo["path"], "/no-h2c");
    for gone in ["upgrade", "http2-settings"] {
        assert!(
            seen(&echo, gone).is_empty(),
            "{gone} reached upstream: {echo}"
        );
    }
}

#[tokio::test]
async fn sets_forwarded_headers_and_passes_trace_context() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = get(
        &og.url("/fwd"),
        &[
            ("host", "shop.example:8443"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed.example"),
            ("traceparent", traceparent),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let echo = answer.json();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"]);
    assert_eq!(seen(&echo, "x-forwarded-host"), ["shop.example:8443"]);
    assert_eq!(seen(&echo, "host"), ["shop.example:8443"]);
    assert_eq!(seen(&echo, "traceparent"), [traceparent]);

    // Without a client X-Forwarded-For, the peer alone.
    let echo = get(&og.url("/fwd"), &[]).await.json();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarded_proto_and_host() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(
        &app.url(),
        "trusted_proxies = [\"127.0.0.0/8\"]",
    ))
    .await;
    let echo = get(
        &og.url("/fwd"),
        &[
            ("host", "internal:8080"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
        ],
    )
    .await
    .json();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["198.51.100.7, 127.0.0.1"]);
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(seen(&echo, "x-forwarded-host"), ["public.example"]);
}

#[tokio::test]
async fn request_id_is_generated_when_absent_and_kept_when_sent() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;

    let answer = get(&og.url("/id"), &[]).await;
    let id = answer
        .header("x-request-id")
        .expect("x-request-id on the response")
        .to_owned();
    assert!(!id.is_empty() && id.len() <= 200, "{id:?}");
    assert_eq!(seen(&answer.json(), "x-request-id"), [id.as_str()]);

    let other = get(&og.url("/id"), &[]).await;
    assert_ne!(
        other.header("x-request-id"),
        Some(id.as_str()),
        "ids repeat"
    );

    let answer = get(&og.url("/id"), &[("x-request-id", "client-chosen-42")]).await;
    assert_eq!(answer.header("x-request-id"), Some("client-chosen-42"));
    assert_eq!(seen(&answer.json(), "x-request-id"), ["client-chosen-42"]);
}

#[tokio::test]
async fn refused_upstream_is_502() {
    let og = Opsgate::start(&shorthand(&refused_url(), "")).await;
    let answer = get(&og.url("/x"), &[]).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json(), json!({"detail": "upstream unavailable"}));
    assert!(answer.header("x-request-id").is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn upstream_closing_before_its_answer_is_502() {
    let upstream = Hangup::start().await;
    let og = Opsgate::start(&shorthand(&upstream.url(), "")).await;
    let answer = get(&og.url("/x"), &[]).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json(), json!({"detail": "upstream unavailable"}));
}

/// Two routes to one upstream: `/short` times out after 200 ms, `/long` after 5 s.
fn short_and_long_timeouts(app: &Upstream) -> String {
    format!(
        r#"
[upstreams.app]
url = "{}"
[[routes]]
name = "short"
prefix = "/short"
upstream = "app"
timeout = "200ms"
[[routes]]
name = "long"
prefix = "/long"
upstream = "app"
timeout = "5s"
"#,
        app.url()
    )
}

/// A call to `/short` the echo upstream holds for 3 s: a 504 at the 200 ms timeout.
async fn assert_cut_at_the_short_timeout(og: &Opsgate, path: &str) {
    let started = Instant::now();
    let answer = get(&og.url(&format!("/short{path}?sleep_ms=3000")), &[]).await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json(), json!({"detail": "upstream timeout"}));
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(2000),
        "504 after {took:?}"
    );
}

#[tokio::test]
async fn slow_upstream_is_504_after_the_route_timeout() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&short_and_long_timeouts(&app)).await;
    assert_cut_at_the_short_timeout(&og, "/x").await;
}

/// A kept upstream connection carries one timer from call to call, moved to each call's
/// deadline: later (a fast call, then a slow one with a longer timeout) and earlier.
#[tokio::test]
async fn each_call_on_a_kept_connection_times_out_by_its_own_deadline() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&short_and_long_timeouts(&app)).await;
    // A short deadline, then a slow call with a later one on the same connection: the
    // earlier deadline must not cut it.
    assert_eq!(get(&og.url("/short/a"), &[]).await.status, StatusCode::OK);
    let answer = get(&og.url("/long/b?sleep_ms=500"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "cut at the earlier deadline");
    // A long deadline, then a hung call with an earlier one: cut at its own.
    assert_eq!(get(&og.url("/long/c"), &[]).await.status, StatusCode::OK);
    assert_cut_at_the_short_timeout(&og, "/d").await;
    assert_eq!(get(&og.url("/long/e"), &[]).await.status, StatusCode::OK);
}

fn two_upstreams(a: &Upstream, b: &Upstream, routes: &str) -> String {
    format!(
        "[upstreams.a]\nurl = \"{}\"\n[upstreams.b]\nurl = \"{}\"\n{routes}",
        a.url(),
        b.url()
    )
}

#[tokio::test]
async fn longest_prefix_wins_on_segment_boundaries_and_no_route_is_404() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let og = Opsgate::start(&two_upstreams(
        &a,
        &b,
        r#"
[[routes]]
name = "api"
prefix = "/api"
upstream = "a"
[[routes]]
name = "api_v2"
prefix = "/api/v2"
upstream = "b"
"#,
    ))
    .await;
    for (path, want) in [
        ("/api", "a"),
        ("/api/", "a"),
        ("/api/x", "a"),
        ("/api/v2", "b"),
        ("/api/v2/", "b"),
        ("/api/v2/users", "b"),
        ("/api/v2x", "a"),
    ] {
        let answer = get(&og.url(path), &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        assert_eq!(answer.json()["upstream"], want, "{path}");
    }
    for path in ["/apix", "/", "/other/api"] {
        let answer = get(&og.url(path), &[]).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(answer.json(), json!({"detail": "no route"}), "{path}");
    }
}

#[tokio::test]
async fn strip_prefix_forwards_the_rest_of_the_path() {
    let a = Upstream::echo("a").await;
    let og = Opsgate::start(&format!(
        r#"
[upstreams.a]
url = "{}"
[[routes]]
name = "svc"
prefix = "/svc"
upstream = "a"
strip_prefix = true
"#,
        a.url()
    ))
    .await;
    let echo = get(&og.url("/svc/x/y?q=1"), &[]).await.json();
    assert_eq!(echo["path"], "/x/y");
    assert_eq!(echo["query"], "q=1");
    let echo = get(&og.url("/svc"), &[]).await.json();
    assert_eq!(echo["path"], "/");
}

#[tokio::test]
async fn host_routes_win_over_path_routes() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let og = Opsgate::start(&two_upstreams(
        &a,
        &b,
        r#"
[[routes]]
name = "default"
prefix = "/"
upstream = "a"
[[routes]]
name = "deep"
prefix = "/deep/path"
upstream = "a"
[[routes]]
name = "hosted"
host = "api.example.test"
prefix = "/"
upstream = "b"
"#,
    ))
    .await;
    for (host, path, want) in [
        ("api.example.test", "/x", "b"),
        ("API.Example.TEST:8080", "/x", "b"),
        ("api.example.test", "/deep/path", "b"),
        ("other.test", "/x", "a"),
        ("other.test", "/deep/path", "a"),
    ] {
        let answer = get(&og.url(path), &[("host", host)]).await;
        assert_eq!(answer.status, StatusCode::OK, "{host} {path}");
        assert_eq!(answer.json()["upstream"], want, "{host} {path}");
    }
}

#[tokio::test]
async fn reserved_paths_are_answered_by_opsgate_on_segment_boundaries() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    for path in ["/_health/live", "/_health/ready", "/metrics"] {
        assert_eq!(
            get(&og.url(path), &[]).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let answer = get(&og.url("/_health/nope"), &[]).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json(), json!({"detail": "not found"}));
    assert_eq!(app.hits(), 0, "a reserved path was proxied");
    for path in [
        "/_healthx",
        "/metricsx",
        "/api/_health/live",
        "/api/metrics",
    ] {
        let answer = get(&og.url(path), &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        assert_eq!(answer.json()["path"], path, "{path} was not proxied");
    }
}

/// An ordinary request still gets through: the daemon survived whatever came before.
async fn still_serving(og: &Opsgate) {
    let answer = get(&og.url("/after"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["path"], "/after");
}

#[tokio::test]
async fn oversized_headers_get_431_and_the_daemon_keeps_serving() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "max_header_bytes = \"8KiB\"")).await;
    let mut req = b"GET /big-head HTTP/1.1\r\nhost: t\r\n".to_vec();
    for i in 0..20 {
        req.extend_from_slice(format!("x-pad-{i}: {}\r\n", "p".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let resp = raw_exchange(og.addr(), &req).await.unwrap();
    assert_eq!(raw_status(&resp), 431, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(app.hits(), 0, "the oversized request reached the upstream");
    still_serving(&og).await;
}

/// A head deadline of 500 ms, counted from the head's first byte. A cut that waited for the
/// connection's idle watchdog and then for its drain (1 s) lands outside `CUT`.
const HEAD_LIMIT: &str = "header_read_timeout = \"500ms\"";
const CUT: std::ops::Range<Duration> = Duration::from_millis(450)..Duration::from_millis(950);

/// Waits for opsgate to close the connection `rd` reads; asserts the close came within
/// `CUT` of `started`, and returns what opsgate sent before it.
async fn cut_within_the_limit(rd: &mut (impl AsyncRead + Unpin), started: Instant) -> Vec<u8> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "connection still open after 5s");
    assert!(CUT.contains(&took), "cut off after {took:?}");
    buf
}

#[tokio::test]
async fn slow_header_client_is_cut_off_after_header_read_timeout() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), HEAD_LIMIT)).await;
    let mut sock = TcpStream::connect(og.addr()).await.unwrap();
    // A client slow to begin, too: the deadline runs from the head's start, not the accept.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    sock.write_all(b"GET /slow HT").await.unwrap();
    let buf = cut_within_the_limit(&mut sock, started).await;
    // Closed without an answer, as hyper and nginx do; never a proxied one.
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    assert_eq!(app.hits(), 0);
    still_serving(&og).await;
}

#[tokio::test]
async fn slow_second_head_on_a_keep_alive_connection_is_cut_off_too() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), HEAD_LIMIT)).await;
    let mut sock = TcpStream::connect(og.addr()).await.unwrap();
    // The second head's deadline runs from the end of the first response, which this
    // client sees late when it is slow itself: timed from before the first request, the
    // cut is never early. (The idle close falls at the same moment here, so this test
    // cannot tell the two apart; the first-head tests above can.)
    let started = Instant::now();
    sock.write_all(b"GET /first HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut sock).await;
    assert_eq!(raw_status(head.as_bytes()), 200, "{head}");
    sock.write_all(b"GET /second HTTP/1.1\r\nhost:")
        .await
        .unwrap();
    let buf = cut_within_the_limit(&mut sock, started).await;
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    assert_eq!(app.hits(), 1);
    still_serving(&og).await;
}

#[tokio::test]
async fn trickling_client_on_the_admin_port_is_cut_off_too() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "header_read_timeout = \"300ms\"")).await;
    let sock = TcpStream::connect(og.admin_addr()).await.unwrap();
    let (mut rd, mut wr) = sock.into_split();
    let started = Instant::now();
    // Found by the hostile-client tool: the admin listener had no header deadline at all.
    let trickle = tokio::spawn(async move {
        for b in b"GET /_ops/status HTTP/1.1\r\nhost: t\r\nx-pad: ppppppppppppppppppppppppppp" {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::future::pending::<()>().await;
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    trickle.abort();
    assert!(
        read.is_ok(),
        "trickling admin connection still open after 5s"
    );
    assert!(took < Duration::from_secs(3), "cut off after {took:?}");
    assert_eq!(
        get(&og.admin_url("/_ops/status"), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn trickling_client_is_cut_off_after_header_read_timeout() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), HEAD_LIMIT)).await;
    let sock = TcpStream::connect(og.addr()).await.unwrap();
    let (mut rd, mut wr) = sock.into_split();
    let started = Instant::now();
    // Slowloris: one byte every 50 ms, each well inside any per-read timeout.
    let trickle = tokio::spawn(async move {
        let head = format!(
            "GET /trickle HTTP/1.1\r\nhost: t\r\nx-pad: {}",
            "p".repeat(200)
        );
        for b in head.bytes() {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    cut_within_the_limit(&mut rd, started).await;
    trickle.abort();
    assert_eq!(app.hits(), 0);
    still_serving(&og).await;
}

#[tokio::test]

async fn silent_client_is_cut_off_after_header_read_timeout() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "header_read_timeout = \"300ms\"")).await;
    let mut sock = TcpStream::connect(og.addr()).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(
        read.is_ok(),
        "a connection that sent nothing is open after 5s"
    );
    assert!(took < Duration::from_secs(3), "cut off after {took:?}");
    still_serving(&og).await;
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    for req in [
        &b"GET / HTTP/1.1\r\nhost: t\r\nthis is not a header\r\n\r\n"[..],
        &b"GET /a b c HTTP/1.1\r\nhost: t\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello"[..],
    ] {
        let resp = raw_exchange(og.addr(), req).await.unwrap();
        assert_eq!(
            raw_status(&resp),
            400,
            "{:?} -> {}",
            String::from_utf8_lossy(req),
            String::from_utf8_lossy(&resp)
        );
    }
    assert_eq!(app.hits(), 0);
    still_serving(&og).await;
}

#[tokio::test]
async fn paths_are_normalized_before_routing_and_forwarding() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    for (sent, path, query) in [
        ("/_health/../api/x", "/api/x", None),
        ("/a/%2e%2e/b", "/b", None),
        ("/a/%2E%2e/%2e/b", "/b", None),
        ("//a///b/./c", "/a/b/c", None),
        ("/../../etc", "/etc", None),
        ("/%41pi/%7Euser", "/Api/~user", None),
        ("/x/../y?q=%2e%2e/..", "/y", Some("q=%2e%2e/..")),
        ("/a%2Fb/../c", "/c", None),
        ("/keep%2Fencoded", "/keep%2Fencoded", None),
    ] {
        let answer = get(&og.url(sent), &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{sent}: {}", answer.text());
        let echo = answer.json();
        assert_eq!(echo["path"], path, "{sent}");
        assert_eq!(echo["query"].as_str(), query, "{sent}");
    }
}

#[tokio::test]
async fn encoded_slashes_are_rejected_when_configured() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "encoded_slashes = \"reject\"")).await;
    for path in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/api/%5c"] {
        let answer = get(&og.url(path), &[]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(answer.json(), json!({"detail": "bad path"}), "{path}");
    }
    assert_eq!(app.hits(), 0);
    assert_eq!(get(&og.url("/a/b"), &[]).await.status, StatusCode::OK);
}

async fn metrics_text(og: &Opsgate, accept: Option<&str>) -> (String, String) {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let answer = get(&og.url("/metrics"), &headers).await;
    assert_eq!(answer.status, StatusCode::OK);
    let ctype = answer.header("content-type").unwrap_or_default().to_owned();
    (answer.text(), ctype)
}

#[tokio::test]
async fn metrics_count_requests_by_route_in_prometheus_text() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&format!(
        r#"
[upstreams.app]
url = "{}"
[[routes]]
name = "api"
prefix = "/api"
upstream = "app"
"#,
        app.url()
    ))
    .await;
    assert_eq!(get(&og.url("/api/x"), &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(&og.url("/nowhere"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let ok = r#"http_requests_total{method="GET",route="api",class="public",status="200"}"#;
    let miss = r#"http_requests_total{method="GET",route="unmatched",class="public",status="404"}"#;
    // A request is counted when its response body is done, a moment after the client has it.
    let og_ref = &og;
    eventually(
        Duration::from_secs(5),
        "both requests counted",
        move || async move {
            let text = metrics_text(og_ref, None).await.0;
            series(&text, ok) == Some(1.0) && series(&text, miss) == Some(1.0)
        },
    )
    .await;
    let (text, ctype) = metrics_text(&og, None).await;
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    assert!(ctype.contains("version=0.0.4"), "{ctype}");
    assert!(
        text.contains("# TYPE http_requests_total counter"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    assert_eq!(
        series(
            &text,
            r#"http_request_duration_seconds_count{method="GET",route="api",class="public"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("/nowhere"), "raw path in a label: {text}");
    // The metrics scrapes themselves are reserved-path requests.
    assert!(
        text.contains(
            r#"http_requests_total{method="GET",route="system",class="system",status="200"}"#
        ),
        "{text}"
    );

    if which("promtool") {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        println!("promtool not installed: skipping `promtool check metrics`");
    }
}

fn which(tool: &str) -> bool {
    std::process::Command::new("which")
        .arg(tool)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn metrics_speak_openmetrics_when_asked() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&shorthand(&app.url(), "")).await;
    assert_eq!(get(&og.url("/x"), &[]).await.status, StatusCode::OK);
    let (text, ctype) = metrics_text(
        &og,
        Some("application/openmetrics-text; version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE http_requests counter"), "{text}");
    assert!(text.contains("http_requests_total{"), "{text}");
}
