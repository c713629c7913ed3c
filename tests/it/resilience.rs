//! Breakers, retries, deadlines, bulkheads, rate limits and fallbacks through the real
//! daemon: a scripted upstream that fails on command, opsgate in front, and the admin API
//! and `/metrics` to see what opsgate decided.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use serde_json::Value;

use crate::support::eventually;
use crate::support::inprocess::InProcess;
use crate::support::metrics::{sample, scrape};
use crate::support::opsgate::{
    Answer, Launch, Opsgate, get, http1, raw_status, read_response, request, send,
};
use crate::support::upstream::{Reply, Scripted, Upstream, full, refused_url};

/// Upper bound for any condition awaited below; the configs use far shorter timeouts.
const LIMIT: Duration = Duration::from_secs(5);

/// What a paused clock is advanced by beyond an open period read from `/_ops/breakers`,
/// whose seconds may be rounded.
const MARGIN: Duration = Duration::from_millis(1);

/// The `{"detail":"circuit open"}` opsgate answers for a rejected call.
const CIRCUIT_OPEN: &str = r#"{"detail":"circuit open"}"#;

/// An opsgate config with one upstream `app` at `url` and one catch-all route `api`.
/// `upstream` goes into `[upstreams.app]`, `tables` after it (`[upstreams.app.breaker]`,
/// `[upstreams.app.retry]`), `route` into the `[[routes]]` entry.
struct Setup<'a> {
    url: &'a str,
    upstream: &'a str,
    tables: &'a str,
    route: &'a str,
}

impl<'a> Setup<'a> {
    fn new(url: &'a str) -> Self {
        Self {
            url,
            upstream: "",
            tables: "",
            route: "",
        }
    }

    fn upstream(self, upstream: &'a str) -> Self {
        Self { upstream, ..self }
    }

    fn tables(self, tables: &'a str) -> Self {
        Self { tables, ..self }
    }

    fn route(self, route: &'a str) -> Self {
        Self { route, ..self }
    }

    fn text(&self) -> String {
        format!(
            "[proxy]\naccess_log = false\n\n\
             [upstreams.app]\nurl = \"{}\"\nconnect_timeout = \"500ms\"\ntimeout = \"5s\"\n{}\n\n\
             {}\n\n\
             [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n{}\n",
            self.url, self.upstream, self.tables, self.route
        )
    }

    /// Starts opsgate on fresh loopback ports and waits until it serves.
    async fn start(&self) -> Rig {
        self.start_with_env(&[]).await
    }

    async fn start_with_env(&self, env: &[(&str, &str)]) -> Rig {
        let mut launch = Launch::new().config(&self.text()).loopback();
        for (k, v) in env {
            launch = launch.env(k, *v);
        }
        let og = launch.start().await;
        Rig {
            addr: og.addr(),
            admin: og.admin_addr(),
            og: Running::Process(og),
        }
    }

    /// Starts opsgate in the test's runtime; with a paused clock, recovery timeouts pass
    /// when the test advances it, not on the wall clock.
    async fn start_in_process(&self) -> Rig {
        let og = InProcess::start(&self.text()).await;
        Rig {
            addr: og.addr(),
            admin: og.admin_addr(),
            og: Running::InProcess(og),
        }
    }
}

/// A running opsgate and its addresses.
struct Rig {
    og: Running,
    addr: SocketAddr,
    admin: SocketAddr,
}

/// Kept for as long as the rig lives: dropping it stops opsgate.
enum Running {
    Process(Opsgate),
    #[allow(dead_code)]
    InProcess(InProcess),
}

impl Rig {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process, for its logs.
    fn process(&self) -> &Opsgate {
        match &self.og {
            Running::Process(og) => og,
            Running::InProcess(_) => panic!("in-process opsgate writes no log to read"),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        get(&self.url(path), &[]).await
    }

    async fn send(&self, method: &str, path: &str, body: Vec<u8>) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(self.url(path))
            .body(full(Bytes::from(body)))
            .unwrap();
        send(&http1(), req).await
    }

    async fn admin_post(&self, path: &str) -> Answer {
        let req = Request::post(format!("http://{}{path}", self.admin))
            .body(full(Bytes::new()))
            .unwrap();
        send(&http1(), req).await
    }

    /// The `/_ops/breakers` entry of breaker `name`.
    async fn breaker(&self, name: &str) -> Value {
        crate::support::opsgate::breaker(self.admin, name).await
    }

    /// The value of sample `name` whose labels include every `labels` pair, from the
    /// proxy port's `/metrics`; `None` when no such sample is exported.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&scrape(&self.url("/metrics")).await, name, labels)
    }
}

/// Asserts `answer` is opsgate's own circuit-open rejection.
fn assert_circuit_open(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.text(), CIRCUIT_OPEN);
    let retry_after: u64 = answer
        .header("retry-after")
        .expect("Retry-After on a circuit-open answer")
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    assert_eq!(answer.header("x-opsgate-circuit"), Some("open"));
}

/// Asserts `answer` is the scripted upstream's own `status`, relayed by opsgate.
fn assert_upstream_status(answer: &Answer, status: u16) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.text());
    assert_eq!(
        answer.text(),
        format!(r#"{{"upstream_status":{status}}}"#),
        "not the upstream's answer"
    );
}

#[tokio::test]
async fn breaker_opens_on_consecutive_5xx_stops_calling_and_recovers_through_half_open() {
    let app = Scripted::start(Reply::Status(503)).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 3\nrecovery_timeout = \"300ms\"\n\
             half_open_max_calls = 1\nsuccess_threshold = 2\n",
        )
        .start()
        .await;

    for i in 1..=3 {
        assert_upstream_status(&rig.get("/x").await, 503);
        assert_eq!(app.hits(), i);
    }
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["reason"], "consecutive_failures");
    assert!(b["remaining_timeout_s"].as_f64().unwrap() > 0.0, "{b}");

    // Open: rejected at once, the upstream sees nothing more.
    for _ in 0..5 {
        assert_circuit_open(&rig.get("/x").await);
    }
    assert_eq!(app.hits(), 3);
    let b = rig.breaker("app").await;
    assert_eq!(b["rejected_calls"], 5, "{b}");
    assert_eq!(b["total_calls"], 8, "{b}");
    assert_eq!(b["failed_calls"], 3, "{b}");
    let open = [("breaker", "app"), ("state", "open")];
    assert_eq!(rig.metric("circuit_breaker_state", &open).await, Some(1.0));
    let closed = [("breaker", "app"), ("state", "closed")];
    assert_eq!(
        rig.metric("circuit_breaker_state", &closed).await,
        Some(0.0)
    );
    let to_open = [("breaker", "app"), ("to", "open")];
    assert_eq!(
        rig.metric("circuit_breaker_state_changes_total", &to_open)
            .await,
        Some(1.0)
    );
    for (result, n) in [("failure", 3.0), ("rejected", 5.0)] {
        let labels = [("breaker", "app"), ("result", result)];
        assert_eq!(
            rig.metric("circuit_breaker_calls_total", &labels).await,
            Some(n),
            "result={result}"
        );
    }

    // After recovery_timeout one trial goes through; it fails and the circuit re-opens.
    let (r, a) = (&rig, &app);
    eventually(
        LIMIT,
        "a half-open trial reaching the upstream",
        move || async move {
            let answer = r.get("/x").await;
            if a.hits() == 3 {
                assert_circuit_open(&answer);
                return false;
            }
            assert_upstream_status(&answer, 503);
            true
        },
    )
    .await;
    assert_eq!(app.hits(), 4);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["reason"], "trial_failed");
    assert_circuit_open(&rig.get("/x").await);
    assert_eq!(app.hits(), 4);

    // The upstream heals: trials succeed and `success_threshold` of them close it.
    app.set(Reply::Ok);
    eventually(LIMIT, "a successful half-open trial", move || async move {
        r.get("/x").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(rig.breaker("app").await["state"], "half_open");
    assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["reason"], "recovered");
    assert_eq!(b["remaining_timeout_s"], 0.0);
    assert_eq!(
        rig.metric("circuit_breaker_state", &closed).await,
        Some(1.0)
    );
    assert_eq!(rig.metric("circuit_breaker_state", &open).await, Some(0.0));
    assert_eq!(
        rig.metric("circuit_breaker_state_changes_total", &to_open)
            .await,
        Some(2.0)
    );
    let to_closed = [("breaker", "app"), ("to", "closed")];
    assert_eq!(
        rig.metric("circuit_breaker_state_changes_total", &to_closed)
            .await,
        Some(1.0)
    );
    let before = app.hits();
    for _ in 0..3 {
        assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    }
    assert_eq!(app.hits(), before + 3);

    // One log line per transition, with its reason, in order. Lines are written in
    // order by a background thread: once the last one is in, so are the others.
    let last_in = rig
        .process()
        .wait_for_log(Duration::from_secs(2), |l| {
            l["breaker"] == "app" && l["to"] == "closed" && l["reason"] == "recovered"
        })
        .await;
    assert!(last_in, "no log line for the last transition");
    let logged: Vec<(String, String, String)> = rig
        .process()
        .json_logs()
        .iter()
        .filter(|l| l["breaker"] == "app" && l.get("from").is_some())
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
            (s("from"), s("to"), s("reason"))
        })
        .collect();
    let want = [
        ("closed", "open", "consecutive_failures"),
        ("open", "half_open", "recovery_timeout"),
        ("half_open", "open", "trial_failed"),
        ("open", "half_open", "recovery_timeout"),
        ("half_open", "closed", "recovered"),
    ]
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
    assert_eq!(logged, want);
}

#[tokio::test]
async fn a_passing_recover_on_check_moves_an_open_breaker_to_half_open_before_its_timeout() {
    let app = Scripted::start(Reply::Status(503)).await;
    // An hour of recovery timeout: only the check can move the breaker within the test.
    let tables = format!(
        "[upstreams.app.breaker]\nfailure_threshold = 1\nrecovery_timeout = \"1h\"\n\
         recover_on_check = \"app-port\"\n\n\
         [[health.checks]]\nname = \"app-port\"\ntype = \"tcp\"\naddress = \"{}\"\n\
         interval = \"50ms\"\ncritical = false\n",
        app.addr
    );
    let rig = Setup::new(&app.url()).tables(&tables).start().await;

    assert_upstream_status(&rig.get("/x").await, 503);
    eventually(LIMIT, "the breaker moved by its passing check", || async {
        let b = rig.breaker("app").await;
        b["state"] == "half_open" && b["reason"] == "check_passed"
    })
    .await;
    // The trial the check allowed reaches the upstream.
    app.set(Reply::Ok);
    assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    assert_eq!(app.hits(), 2);
}

#[tokio::test]
async fn an_unlisted_404_never_opens_the_breaker_but_a_listed_429_does() {
    let app = Scripted::start(Reply::Status(404)).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 2\nrecovery_timeout = \"10s\"\n\
             failure_status = [\"5xx\", 429]\n",
        )
        .start()
        .await;

    for _ in 0..6 {
        assert_upstream_status(&rig.get("/x").await, 404);
    }
    assert_eq!(app.hits(), 6);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["failed_calls"], 0, "{b}");
    assert_eq!(b["successful_calls"], 6, "{b}");

    app.set(Reply::Status(429));
    for _ in 0..2 {
        assert_upstream_status(&rig.get("/x").await, 429);
    }
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["reason"], "consecutive_failures");
    assert_circuit_open(&rig.get("/x").await);
    assert_eq!(app.hits(), 8);
}

#[tokio::test]
async fn the_failure_rate_rule_opens_only_once_minimum_calls_is_reached() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 100\nrecovery_timeout = \"10s\"\n\
             failure_rate = 0.5\nwindow = \"10s\"\nminimum_calls = 6\n",
        )
        .start()
        .await;

    // 3 failures in 5 calls is 60%, but below minimum_calls.
    let fail = Reply::Status(500);
    app.then(&[fail, Reply::Ok, fail, Reply::Ok, fail]);
    for _ in 0..5 {
        rig.get("/x").await;
    }
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["failed_calls"], 3, "{b}");

    // The sixth call (4 of 6 failed) reaches minimum_calls and trips the rate rule.
    app.then(&[fail]);
    assert_upstream_status(&rig.get("/x").await, 500);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["reason"], "failure_rate");
    assert_circuit_open(&rig.get("/x").await);
    assert_eq!(app.hits(), 6);
}

/// `[upstreams.app.retry]` with quick backoff and the given extra keys.
fn retry_table(extra: &str) -> String {
    format!("[upstreams.app.retry]\nbase_delay = \"1ms\"\nmax_delay = \"5ms\"\n{extra}\n")
}

#[tokio::test]
async fn a_get_is_retried_on_503_and_succeeds() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 3"))
        .start()
        .await;
    app.then(&[Reply::Status(503)]);
    let answer = rig.get("/x").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.text(), r#"{"ok":true}"#);
    assert_eq!(app.hits(), 2);
    let labels = [("upstream", "app"), ("reason", "503")];
    assert_eq!(
        rig.metric("upstream_retries_total", &labels).await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_retry_sends_the_head_the_first_attempt_sent() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 3"))
        .start()
        .await;
    app.then(&[Reply::Status(503), Reply::Status(502)]);
    let headers = [
        ("accept", "text/html"),
        ("accept", "application/json"),
        ("x-tenant", "caf\u{e9}"),
        ("x-empty", ""),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
    ];
    let answer = request("PUT", &rig.url("/x/y?q=1&r=2"), &headers, "{\"n\":1}").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let heads = app.heads();
    assert_eq!(heads.len(), 3, "{heads:#?}");
    // Three attempts, one head: the request id and X-Forwarded-* included.
    assert_eq!(heads[1], heads[0]);
    assert_eq!(heads[2], heads[0]);
    let first = &heads[0];
    assert!(first.starts_with("PUT /x/y?q=1&r=2 HTTP/1.1\n"), "{first}");
    for line in [
        "accept: text/html\naccept: application/json\n",
        "x-tenant: caf\u{e9}\n",
        "x-empty: \n",
        "cookie: a=1\ncookie: b=2\n",
        "content-length: 7\n",
        "x-request-id: ",
        "x-forwarded-for: 127.0.0.1\n",
    ] {
        assert!(first.contains(line), "{line:?} not in {first}");
    }
}

#[tokio::test]
async fn a_request_the_upstream_read_and_dropped_is_retried_with_its_head() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 2\non = [\"reset\"]"))
        .start()
        .await;
    // Read whole, then the connection closed with no answer: the head went out, so
    // the retry sends the copy the connection kept of it.
    app.then(&[Reply::Drop]);
    let answer = request("PUT", &rig.url("/x"), &[("x-tenant", "a")], "{}").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let heads = app.heads();
    assert_eq!(heads.len(), 2, "{heads:#?}");
    assert_eq!(heads[1], heads[0]);
    assert!(heads[0].contains("x-tenant: a\n"), "{}", heads[0]);
    let labels = [("upstream", "app"), ("reason", "reset")];
    assert_eq!(
        rig.metric("upstream_retries_total", &labels).await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_post_is_never_retried() {
    let app = Scripted::start(Reply::Status(503)).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 3"))
        .start()
        .await;
    assert_upstream_status(&rig.send("POST", "/x", b"{}".to_vec()).await, 503);
    assert_eq!(app.hits(), 1);
    let labels = [("upstream", "app"), ("reason", "503")];
    assert_eq!(rig.metric("upstream_retries_total", &labels).await, None);
}

#[tokio::test]
async fn a_put_larger_than_max_body_is_not_retried_but_a_small_one_is() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 3\nmax_body = \"1KiB\""))
        .start()
        .await;

    app.then(&[Reply::Status(503)]);
    assert_upstream_status(&rig.send("PUT", "/x", vec![b'a'; 2048]).await, 503);
    assert_eq!(app.hits(), 1, "a body over max_body is streamed once");

    app.then(&[Reply::Status(503)]);
    let answer = rig.send("PUT", "/x", vec![b'a'; 100]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(app.hits(), 3);
}

#[tokio::test]
async fn the_retry_budget_caps_amplification() {
    let app = Scripted::start(Reply::Status(503)).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table(
            "attempts = 3\nbudget = 0.2\nbudget_min_per_second = 1",
        ))
        .start()
        .await;
    let requests = 100;
    for _ in 0..requests {
        assert_upstream_status(&rig.get("/x").await, 503);
    }
    // Over the 10 s window: retries <= 0.2 x requests + 10 x 1 (plus a little slack).
    let hits = app.hits();
    println!("{hits} upstream hits for {requests} requests");
    let cap = requests * 12 / 10 + 10 + 2;
    assert!(hits <= cap, "{hits} upstream hits for {requests} requests");
    assert!(hits > requests, "no retry at all ({hits} hits)");
    let exhausted = rig
        .metric(
            "upstream_retry_budget_exhausted_total",
            &[("upstream", "app")],
        )
        .await
        .unwrap_or(0.0);
    assert!(exhausted > 0.0, "budget never reported exhausted");
    let retried = rig
        .metric(
            "upstream_retries_total",
            &[("upstream", "app"), ("reason", "503")],
        )
        .await
        .unwrap();
    assert_eq!(retried as usize, hits - requests);
}

#[tokio::test]
async fn per_try_timeout_cuts_a_hung_attempt_and_the_retry_succeeds() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 2\nper_try_timeout = \"200ms\""))
        .route("timeout = \"3s\"")
        .start()
        .await;
    app.then(&[Reply::Hang]);
    let started = Instant::now();
    let answer = rig.get("/x").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(app.hits(), 2);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    let labels = [("upstream", "app"), ("reason", "timeout")];
    assert_eq!(
        rig.metric("upstream_retries_total", &labels).await,
        Some(1.0)
    );
}

#[tokio::test]
async fn without_per_try_timeout_a_hanging_upstream_gives_504_after_the_route_timeout() {
    let app = Scripted::start(Reply::Hang).await;
    let rig = Setup::new(&app.url())
        .route("timeout = \"300ms\"")
        .start()
        .await;
    let started = Instant::now();
    let answer = rig.get("/x").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.text(), r#"{"detail":"upstream timeout"}"#);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    assert_eq!(app.hits(), 1);
}

/// A replayable body is read before the first attempt; its upload is the client's time,
/// so the attempt's timeout starts once the body is in, not when the request arrived.
#[tokio::test]
async fn a_slow_small_upload_does_not_use_up_the_first_attempts_timeout() {
    let app = Upstream::echo("app").await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 2"))
        .route("timeout = \"300ms\"")
        .start()
        .await;
    let mut sock = tokio::net::TcpStream::connect(rig.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    sock.write_all(b"PUT /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\n\r\nab")
        .await
        .unwrap();
    // The slow client under test: half its body now, the rest after twice the timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    sock.write_all(b"cd").await.unwrap();
    let (head, body) = read_response(&mut sock).await;
    assert_eq!(raw_status(head.as_bytes()), 200, "{head}");
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["body_bytes"], 4, "{echo}");
    assert_eq!(app.hits(), 1);
    // Not saved by a retry: a first attempt timed out by the upload would be retried.
    let labels = [("upstream", "app"), ("reason", "timeout")];
    assert_eq!(rig.metric("upstream_retries_total", &labels).await, None);
}

#[tokio::test]
async fn retry_after_is_waited_for_only_when_it_fits_the_deadline() {
    // Fits: 1 s of Retry-After inside a 3 s request deadline.
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 2\nper_try_timeout = \"1s\""))
        .route("timeout = \"3s\"")
        .start()
        .await;
    app.then(&[Reply::RetryAfter(503, 1)]);
    let started = Instant::now();
    let answer = rig.get("/x").await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(app.hits(), 2);
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "retried after {took:?}, not after Retry-After: 1"
    );

    // Does not fit: a 500 ms deadline gets the upstream's 503 at once.
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables(&retry_table("attempts = 2\nper_try_timeout = \"400ms\""))
        .route("timeout = \"500ms\"")
        .start()
        .await;
    app.then(&[Reply::RetryAfter(503, 1)]);
    let started = Instant::now();
    let answer = rig.get("/x").await;
    let took = started.elapsed();
    assert_upstream_status(&answer, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(app.hits(), 1);
    assert!(took < Duration::from_millis(400), "answered after {took:?}");
}

#[tokio::test]
async fn the_bulkhead_rejects_beyond_max_in_flight() {
    let app = Upstream::echo("app").await;
    let rig = Setup::new(&app.url())
        .upstream("max_in_flight = 1")
        .start()
        .await;
    let slow_url = rig.url("/slow?sleep_ms=1500");
    let slow = tokio::spawn(async move { get(&slow_url, &[]).await.status });
    let a = &app;
    eventually(
        LIMIT,
        "the slow request reaching the upstream",
        move || async move { a.hits() == 1 },
    )
    .await;

    let answer = rig.get("/x").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.text(), r#"{"detail":"overloaded"}"#);
    assert_eq!(app.hits(), 1);
    assert_eq!(
        rig.metric("bulkhead_rejected_total", &[("upstream", "app")])
            .await,
        Some(1.0)
    );

    // The slot frees with the slow response.
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    assert_eq!(rig.get("/x").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .route("rate_limit = { per_second = 1, burst = 2 }")
        .start()
        .await;
    assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    let answer = rig.get("/x").await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.text(), r#"{"detail":"rate limited"}"#);
    let retry_after: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(app.hits(), 2);
    assert_eq!(
        rig.metric("rate_limited_total", &[("route", "api")]).await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_dry_run_rate_limit_lets_requests_through_and_counts_them() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .route("rate_limit = { per_second = 1, burst = 2, dry_run = true }")
        .start()
        .await;
    for _ in 0..4 {
        assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    }
    assert_eq!(app.hits(), 4);
    assert_eq!(
        rig.metric("rate_limited_total", &[("route", "api")]).await,
        Some(2.0)
    );
}

#[tokio::test]
async fn the_fallback_is_served_when_the_breaker_is_open_or_the_bulkhead_full() {
    let app = Upstream::echo("app").await;
    let rig = Setup::new(&app.url())
        .upstream("max_in_flight = 1")
        .tables("[upstreams.app.breaker]\nrecovery_timeout = \"10s\"\n")
        .route(
            "fallback = { status = 200, content_type = \"application/json\", \
             body = '{\"fallback\":true}' }",
        )
        .start()
        .await;
    let is_fallback = |a: &Answer| {
        a.status == StatusCode::OK
            && a.header("content-type") == Some("application/json")
            && a.text() == r#"{"fallback":true}"#
    };

    let answer = rig.admin_post("/_ops/breakers/app/open").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let answer = rig.get("/x").await;
    assert!(is_fallback(&answer), "{} {}", answer.status, answer.text());
    assert_eq!(app.hits(), 0);

    // Breaker admits everything again; now fill the bulkhead.
    rig.admin_post("/_ops/breakers/app/close").await;
    let slow_url = rig.url("/slow?sleep_ms=1500");
    let slow = tokio::spawn(async move { get(&slow_url, &[]).await.status });
    let a = &app;
    eventually(
        LIMIT,
        "the slow request reaching the upstream",
        move || async move { a.hits() == 1 },
    )
    .await;
    let answer = rig.get("/x").await;
    assert!(is_fallback(&answer), "{} {}", answer.status, answer.text());
    assert_eq!(app.hits(), 1);
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn circuit_open_env_rejects_every_request_without_touching_the_upstream() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .start_with_env(&[("CIRCUIT_OPEN", "1")])
        .await;
    let started = Instant::now();
    for answer in [
        rig.get("/x").await,
        rig.send("POST", "/api/y", b"{}".to_vec()).await,
    ] {
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.text(), CIRCUIT_OPEN);
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(app.hits(), 0);
    for path in ["/_health/live", "/_health/ready", "/metrics"] {
        assert_eq!(rig.get(path).await.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn admin_api_forces_open_disables_and_resets_the_breaker() {
    let app = Scripted::start(Reply::Status(503)).await;
    let rig = Setup::new(&app.url())
        .tables("[upstreams.app.breaker]\nfailure_threshold = 2\nrecovery_timeout = \"10s\"\n")
        .start()
        .await;

    let b = rig.breaker("app").await;
    let fields = [
        "name",
        "state",
        "reason",
        "remaining_timeout_s",
        "total_calls",
        "successful_calls",
        "failed_calls",
        "rejected_calls",
        "state_changes",
        "dry_run",
    ];
    for field in fields {
        assert!(b.get(field).is_some(), "no {field} in {b}");
    }
    assert_eq!(b["state"], "closed");
    assert_eq!(b["dry_run"], false);
    assert_eq!(b["state_changes"], 0);

    // open -> forced_open: rejects without calling the upstream.
    let answer = rig.admin_post("/_ops/breakers/app/open").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["state"], "forced_open");
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "forced_open");
    assert_eq!(b["reason"], "manual");
    for _ in 0..3 {
        assert_circuit_open(&rig.get("/x").await);
    }
    assert_eq!(app.hits(), 0);
    let open = [("breaker", "app"), ("state", "open")];
    assert_eq!(rig.metric("circuit_breaker_state", &open).await, Some(1.0));

    // close -> disabled: admits everything, failures included, and still counts.
    let answer = rig.admin_post("/_ops/breakers/app/close").await;
    assert_eq!(answer.json()["state"], "disabled");
    for _ in 0..4 {
        assert_upstream_status(&rig.get("/x").await, 503);
    }
    assert_eq!(app.hits(), 4);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "disabled", "{b}");
    assert_eq!(b["failed_calls"], 4, "{b}");
    assert_eq!(b["rejected_calls"], 3, "{b}");
    assert_eq!(b["state_changes"], 2, "{b}");
    let closed = [("breaker", "app"), ("state", "closed")];
    assert_eq!(
        rig.metric("circuit_breaker_state", &closed).await,
        Some(1.0)
    );

    // reset -> closed with counters cleared; the count rule works again from zero.
    let answer = rig.admin_post("/_ops/breakers/app/reset").await;
    assert_eq!(answer.status, StatusCode::OK);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["reason"], "manual");
    for field in [
        "total_calls",
        "successful_calls",
        "failed_calls",
        "rejected_calls",
        "state_changes",
    ] {
        assert_eq!(b[field], 0, "{field} after reset: {b}");
    }
    assert_upstream_status(&rig.get("/x").await, 503);
    assert_eq!(rig.breaker("app").await["state"], "closed");
    assert_upstream_status(&rig.get("/x").await, 503);
    assert_eq!(rig.breaker("app").await["state"], "open");
    assert_circuit_open(&rig.get("/x").await);
    assert_eq!(app.hits(), 6);

    let answer = rig.admin_post("/_ops/breakers/nope/reset").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_dry_run_breaker_never_rejects_but_counts_would_be_rejections() {
    let app = Scripted::start(Reply::Status(503)).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 2\nrecovery_timeout = \"10s\"\n\
             dry_run = true\n",
        )
        .start()
        .await;
    for _ in 0..2 {
        assert_upstream_status(&rig.get("/x").await, 503);
    }
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["dry_run"], true);

    for _ in 0..3 {
        assert_upstream_status(&rig.get("/x").await, 503);
    }
    assert_eq!(app.hits(), 5);
    let b = rig.breaker("app").await;
    assert_eq!(b["rejected_calls"], 3, "{b}");
    assert_eq!(b["total_calls"], 5, "{b}");
    let rejected = [("breaker", "app"), ("result", "rejected")];
    assert_eq!(
        rig.metric("circuit_breaker_calls_total", &rejected).await,
        Some(3.0)
    );
    let open = [("breaker", "app"), ("state", "open")];
    assert_eq!(rig.metric("circuit_breaker_state", &open).await, Some(1.0));
}

#[tokio::test]
async fn each_retry_is_a_breaker_call_and_a_rejected_attempt_is_not_retried() {
    let app = Scripted::start(Reply::Status(503)).await;
    let tables = format!(
        "[upstreams.app.breaker]\nfailure_threshold = 2\nrecovery_timeout = \"10s\"\n\n{}",
        retry_table("attempts = 3")
    );
    let rig = Setup::new(&app.url()).tables(&tables).start().await;

    // Attempt 1 and 2 fail and open the breaker; attempt 3 is rejected and ends the request.
    let answer = rig.get("/x").await;
    assert_circuit_open(&answer);
    assert_eq!(answer.header("retry-after"), Some("10"));
    assert_eq!(app.hits(), 2);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["failed_calls"], 2, "{b}");
    assert_eq!(b["rejected_calls"], 1, "{b}");
    assert_eq!(b["total_calls"], 3, "{b}");

    // While open, a request is rejected once and never retried.
    assert_circuit_open(&rig.get("/x").await);
    assert_eq!(app.hits(), 2);
    assert_eq!(rig.breaker("app").await["rejected_calls"], 2);
    let labels = [("upstream", "app"), ("reason", "503")];
    assert_eq!(
        rig.metric("upstream_retries_total", &labels).await,
        Some(2.0)
    );
}

#[tokio::test]
async fn half_open_admits_only_its_trial_slots_and_a_hung_trial_times_out_to_open() {
    let app = Scripted::start(Reply::Hang).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 1\nrecovery_timeout = \"200ms\"\n\
             half_open_max_calls = 1\nmax_half_open_wait = \"400ms\"\n",
        )
        .start()
        .await;
    app.then(&[Reply::Status(503)]);
    assert_upstream_status(&rig.get("/x").await, 503);
    assert_eq!(rig.breaker("app").await["state"], "open");

    let r = &rig;
    eventually(LIMIT, "the breaker to turn half-open", move || async move {
        r.breaker("app").await["state"] == "half_open"
    })
    .await;
    // The one trial slot is taken by a request the upstream never answers.
    let trial_url = rig.url("/trial");
    let trial = tokio::spawn(async move { get(&trial_url, &[]).await });
    let a = &app;
    eventually(
        LIMIT,
        "the trial reaching the upstream",
        move || async move { a.hits() == 2 },
    )
    .await;
    let answer = rig.get("/x").await;
    assert_circuit_open(&answer);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(app.hits(), 2);

    eventually(LIMIT, "the hung half-open to re-open", move || async move {
        r.breaker("app").await["state"] == "open"
    })
    .await;
    assert_eq!(rig.breaker("app").await["reason"], "half_open_timeout");
    trial.abort();
}

#[tokio::test]
async fn a_route_scoped_breaker_is_named_after_its_route() {
    let app = Scripted::start(Reply::Status(500)).await;
    let rig = Setup::new(&app.url())
        .route("breaker = { failure_threshold = 2, recovery_timeout = \"10s\" }")
        .start()
        .await;
    for _ in 0..2 {
        assert_upstream_status(&rig.get("/x").await, 500);
    }
    let b = rig.breaker("route:api").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_circuit_open(&rig.get("/x").await);
    assert_eq!(app.hits(), 2);
    let open = [("breaker", "route:api"), ("state", "open")];
    assert_eq!(rig.metric("circuit_breaker_state", &open).await, Some(1.0));

    let answer = rig.admin_post("/_ops/breakers/route:api/reset").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["state"], "closed");
    assert_upstream_status(&rig.get("/x").await, 500);
}

#[tokio::test]
async fn connect_failures_and_timeouts_count_as_breaker_failures_and_are_retried() {
    // Refused: 502 after a retry on connect-failure, and two of them open the breaker.
    let url = refused_url();
    let tables = format!(
        "[upstreams.app.breaker]\nfailure_threshold = 2\nrecovery_timeout = \"10s\"\n\
         failure_status = []\n\n{}",
        retry_table("attempts = 2\nbudget_min_per_second = 100")
    );
    let rig = Setup::new(&url).tables(&tables).start().await;
    let answer = rig.get("/x").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.text(), r#"{"detail":"upstream unavailable"}"#);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["failed_calls"], 2, "{b}");
    let labels = [("upstream", "app"), ("reason", "connect-failure")];
    assert_eq!(
        rig.metric("upstream_retries_total", &labels).await,
        Some(1.0)
    );

    // No answer within the route timeout counts too, whatever `failure_status` says.
    let app = Scripted::start(Reply::Hang).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 2\nrecovery_timeout = \"10s\"\n\
             failure_status = []\n",
        )
        .route("timeout = \"100ms\"")
        .start()
        .await;
    for _ in 0..2 {
        assert_eq!(rig.get("/x").await.status, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(rig.breaker("app").await["state"], "open");
    assert_circuit_open(&rig.get("/x").await);
    assert_eq!(app.hits(), 2);
}

#[tokio::test]
async fn slow_calls_open_the_breaker_through_the_rate_rule() {
    let app = Upstream::echo("app").await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nrecovery_timeout = \"10s\"\nfailure_rate = 0.5\n\
             minimum_calls = 3\nslow_call_duration = \"50ms\"\n",
        )
        .start()
        .await;
    assert_eq!(rig.get("/fast").await.status, StatusCode::OK);
    for _ in 0..2 {
        assert_eq!(rig.get("/slow?sleep_ms=120").await.status, StatusCode::OK);
    }
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["reason"], "slow_calls");
    assert_eq!(b["failed_calls"], 0, "{b}");
    assert_circuit_open(&rig.get("/fast").await);
    assert_eq!(app.hits(), 3);
}

#[tokio::test(start_paused = true)]
async fn each_reopen_doubles_the_recovery_timeout_up_to_its_max() {
    let app = Scripted::start(Reply::Status(503)).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 1\nrecovery_timeout = \"500ms\"\n\
             half_open_max_calls = 1\nmax_recovery_timeout = \"5s\"\n",
        )
        .start_in_process()
        .await;
    assert_upstream_status(&rig.get("/x").await, 503);
    let first = rig.breaker("app").await["remaining_timeout_s"]
        .as_f64()
        .unwrap();
    assert!(first > 0.0 && first <= 0.5, "first open period {first}s");

    // Nothing reaches the upstream until the open period has passed, however long it was.
    assert_circuit_open(&rig.get("/x").await);
    tokio::time::advance(Duration::from_secs_f64(first) + MARGIN).await;
    assert_upstream_status(&rig.get("/x").await, 503);
    assert_eq!(app.hits(), 2);
    let b = rig.breaker("app").await;
    assert_eq!(b["reason"], "trial_failed");
    // 2 x 500ms, jittered by ±10%: longer than any first period could be.
    let second = b["remaining_timeout_s"].as_f64().unwrap();
    assert!(
        second > 0.5 && second <= 1.1,
        "second open period {second}s"
    );

    // Each failed trial doubles it again, until max_recovery_timeout caps it.
    let mut period = second;
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs_f64(period) + MARGIN).await;
        assert_upstream_status(&rig.get("/x").await, 503);
        period = rig.breaker("app").await["remaining_timeout_s"]
            .as_f64()
            .unwrap();
    }
    assert!(
        period > 4.9 && period <= 5.0,
        "capped open period {period}s"
    );
}

#[tokio::test]
async fn circuit_open_env_serves_the_route_fallback() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .route("fallback = { status = 200, body = '{\"fallback\":true}' }")
        .start_with_env(&[("CIRCUIT_OPEN", "on")])
        .await;
    let answer = rig.get("/x").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), r#"{"fallback":true}"#);
    assert_eq!(app.hits(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_fails_while_open_does_not_extend_the_open_period() {
    let app = Scripted::start(Reply::Ok).await;
    let rig = Setup::new(&app.url())
        .tables("[upstreams.app.breaker]\nfailure_threshold = 1\nrecovery_timeout = \"1s\"\n")
        .route("timeout = \"600ms\"")
        .start_in_process()
        .await;
    // A hangs until its timeout; B fails at once and opens the breaker meanwhile.
    app.then(&[Reply::Hang, Reply::Status(503)]);
    let slow_url = rig.url("/a");
    let slow = tokio::spawn(async move { get(&slow_url, &[]).await.status });
    let a = &app;
    eventually(
        LIMIT,
        "the first request reaching the upstream",
        move || async move { a.hits() == 1 },
    )
    .await;
    assert_upstream_status(&rig.get("/b").await, 503);
    assert_eq!(rig.breaker("app").await["state"], "open");

    assert_eq!(slow.await.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["failed_calls"], 2, "{b}");
    let left = b["remaining_timeout_s"].as_f64().unwrap();
    assert!(
        left < 0.7,
        "the late failure restarted the open period: {left}s left"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_breaker_goes_through_half_open_back_to_closed() {
    let app = Scripted::start(Reply::Status(503)).await;
    let rig = Setup::new(&app.url())
        .tables(
            "[upstreams.app.breaker]\nfailure_threshold = 1\nrecovery_timeout = \"300ms\"\n\
             success_threshold = 1\ndry_run = true\n",
        )
        .start_in_process()
        .await;
    assert_upstream_status(&rig.get("/x").await, 503);
    assert_eq!(rig.breaker("app").await["state"], "open");
    app.set(Reply::Ok);
    // Open but dry-run: calls still go through, and the breaker stays open until its
    // (jittered) recovery timeout has passed.
    assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    assert_eq!(rig.breaker("app").await["state"], "open");
    tokio::time::advance(Duration::from_millis(330) + MARGIN).await;
    assert_eq!(rig.get("/x").await.status, StatusCode::OK);
    let b = rig.breaker("app").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["reason"], "recovered");
}
