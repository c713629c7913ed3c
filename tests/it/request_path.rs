//! The request path against real peers and hostile clients: credentials in upstream URLs,
//! HTTP/2 translation, HTTP versions, client faults, resets, deadlines and abandoned calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::eventually;
use crate::support::opsgate::{
    Launch, breaker, get, raw_exchange, raw_status, read_response, request,
};
use crate::support::upstream::{Unanswered, Upstream, full, seen};

/// Upper bound for any condition awaited below; the configs use far shorter timeouts.
const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn upstream_url_credentials_are_sent_as_basic_auth_and_never_logged() {
    let app = Upstream::echo("app").await;
    let config = format!(
        "[proxy]\nupstream = \"http://opsuser:s3cretPW@{}\"\n",
        app.addr
    );
    let og = Launch::new()
        .config(&config)
        .env("OPSGATE_LOG", "debug")
        .loopback()
        .start()
        .await;
    // base64("opsuser:s3cretPW")
    let basic = "Basic b3BzdXNlcjpzM2NyZXRQVw==";
    for client_auth in [None, Some("Bearer client-token")] {
        let headers: Vec<(&str, &str)> = client_auth
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        let answer = get(&og.url("/creds"), &headers).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let echo = answer.json();
        assert_eq!(seen(&echo, "authorization"), [basic], "{echo}");
        assert_eq!(
            seen(&echo, "host"),
            [format!("127.0.0.1:{}", og.addr().port())]
        );
    }
    // Positive control: the upstream connection's debug lines are on.
    let pool_logged = og
        .wait_for_log(Duration::from_secs(5), |l| {
            l.to_string().contains("upstream connection opened")
        })
        .await;
    assert!(
        pool_logged,
        "no upstream connection debug line: {:?}",
        og.logs()
    );
    let leaks: Vec<String> = og
        .logs()
        .into_iter()
        .chain(og.stderr())
        .filter(|l| l.contains("s3cretPW") || l.contains("b3BzdXNlcjpzM2NyZXRQVw"))
        .collect();
    assert!(leaks.is_empty(), "credential in log lines: {leaks:#?}");
}

/// An upstream whose accept queue is full drops the SYN: the connect gives up at
/// `connect_timeout`, the client gets a 502, and the debug line says it timed out.
#[tokio::test]
async fn a_connect_nobody_answers_gives_up_at_connect_timeout_with_a_502() {
    let app = Unanswered::start();
    let config = format!(
        "[upstreams.app]\nurl = \"http://{}\"\nconnect_timeout = \"200ms\"\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        app.addr
    );
    let og = Launch::new()
        .config(&config)
        .env("OPSGATE_LOG", "debug")
        .loopback()
        .start()
        .await;
    let sent = std::time::Instant::now();
    let answer = get(&og.url("/never"), &[]).await;
    let took = sent.elapsed();
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.text(), r#"{"detail":"upstream unavailable"}"#);
    assert!(
        took >= Duration::from_millis(200) && took < LIMIT,
        "answered after {took:?}"
    );
    let logged = og
        .wait_for_log(LIMIT, |l| {
            l["message"] == "upstream connect failed"
                && l["timed_out"] == true
                && l["error"] == "connect timed out after 200ms"
        })
        .await;
    assert!(logged, "no timed-out connect line: {:#?}", og.json_logs());
}

/// `[upstreams.app]` at `url` with a 3-failure breaker and retries, one catch-all route.
fn guarded(url: &str, upstream_extra: &str) -> String {
    format!(
        "[upstreams.app]\nurl = \"{url}\"\n{upstream_extra}\n\
         [upstreams.app.breaker]\nfailure_threshold = 3\n\
         [upstreams.app.retry]\nattempts = 3\nbase_delay = \"1ms\"\n\
         on = [\"connect-failure\", \"timeout\", \"reset\", \"502\", \"503\", \"504\"]\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n"
    )
}

#[tokio::test]
async fn client_body_faults_never_count_against_the_upstream() {
    let app = Upstream::echo("app").await;
    let og = Launch::new()
        .config(&guarded(&app.url(), ""))
        .loopback()
        .start()
        .await;
    let head = "PUT /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n";
    // Chunk-size overflow, then a bare-LF chunk line: both malformed, both 400.
    for body in [
        "FFFFFFFFFFFFFFFFFFFFFF\r\nx\r\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
    ] {
        let resp = raw_exchange(og.addr(), format!("{head}{body}").as_bytes())
            .await
            .unwrap();
        assert_eq!(raw_status(&resp), 400, "{}", String::from_utf8_lossy(&resp));
    }
    // A hang-up in the middle of an announced body (too large to buffer for a retry, so it
    // streams): a client abort, logged as 499.
    let mut sock = TcpStream::connect(og.addr()).await.unwrap();
    sock.write_all(b"PUT /up HTTP/1.1\r\nhost: t\r\ncontent-length: 100000000\r\n\r\n0123456789")
        .await
        .unwrap();
    drop(sock);
    let aborted = og
        .wait_for_log(LIMIT, |l| {
            l["status"] == 499 && l["error"] == "client_abort"
        })
        .await;
    assert!(aborted, "no 499 client_abort access line: {:#?}", og.logs());
    let malformed = og
        .json_logs()
        .iter()
        .filter(|l| l["status"] == 400 && l["error"] == "bad_request_body")
        .count();
    assert_eq!(malformed, 2, "{:#?}", og.logs());
    assert!(
        app.hits() <= 3,
        "a client fault was retried: {} hits",
        app.hits()
    );
    let b = breaker(og.admin_addr(), "app").await;
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(b["failed_calls"], 0, "{b}");
    let answer = get(&og.url("/after"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// An HTTP/1.0 app: reads one request head per connection, answers `HTTP/1.0 200` with a
/// body and closes, as Python's `http.server` does.
async fn http10_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock
                    .write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello")
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_http10_upstream_still_gives_http11_clients_keep_alive() {
    let (app, _task) = http10_upstream().await;
    let og = Launch::new()
        .config(&format!("[proxy]\nupstream = \"http://{app}\"\n"))
        .loopback()
        .start()
        .await;
    let mut sock = TcpStream::connect(og.addr()).await.unwrap();
    for i in 0..2 {
        sock.write_all(b"GET /legacy HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut sock).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "request {i}: {head}"
        );
        assert_eq!(body, b"hello");
    }
}

/// An app speaking HTTP/1.1 and h2c (prior knowledge) answering with what it saw:
/// `{"authority": ..., "host": [...]}` (`?sleep_ms=N` first waits; `?flaky` answers the
/// first request of every two 503), and counting the TCP connections it accepted and the
/// requests that reached it, whose heads it keeps.
struct H2App {
    addr: std::net::SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl H2App {
    async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(addr: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = heads.clone();
        let task = tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                let kept = kept.clone();
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    let mut head = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
                    for (name, value) in req.headers() {
                        head.push_str(&format!(
                            "{name}: {}\n",
                            String::from_utf8_lossy(value.as_bytes())
                        ));
                    }
                    kept.lock().unwrap().push(head);
                    async move {
                        if req.uri().query() == Some("flaky") && n.is_multiple_of(2) {
                            let mut resp = http::Response::new(full("unavailable"));
                            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            return Ok(resp);
                        }
                        if let Some(ms) =
                            req.uri().query().and_then(|q| q.strip_prefix("sleep_ms="))
                        {
                            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                        }
                        let hosts: Vec<String> = req
                            .headers()
                            .get_all("host")
                            .iter()
                            .map(|v| v.to_str().unwrap().to_owned())
                            .collect();
                        let echo = serde_json::json!({
                            "authority": req.uri().authority().map(|a| a.as_str()),
                            "host": hosts,
                        });
                        Ok::<_, std::convert::Infallible>(http::Response::new(full(
                            echo.to_string(),
                        )))
                    }
                });
                set.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(sock), service)
                        .await;
                });
            }
        });
        H2App {
            addr,
            conns,
            requests,
            heads,
            task,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn hits(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for H2App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn sequential_calls_reuse_one_upstream_connection() {
    let app = H2App::start().await;
    let og = Launch::new()
        .config(&format!("[proxy]\nupstream = \"http://{}\"\n", app.addr))
        .loopback()
        .start()
        .await;
    for i in 0..20 {
        let answer = get(&og.url(&format!("/seq/{i}")), &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(app.hits(), 20);
    assert_eq!(app.connections(), 1);
}

/// One usable CPU (here `TOKIO_WORKER_THREADS=1`) runs opsgate on tokio's current-thread
/// runtime: requests with and without bodies, probes and the stop all work there too.
#[tokio::test]
async fn one_worker_runs_the_current_thread_runtime() {
    let app = Upstream::echo("app").await;
    let mut og = Launch::new()
        .config(&format!("[proxy]\nupstream = \"{}\"\n", app.url()))
        .env("TOKIO_WORKER_THREADS", "1")
        .loopback()
        .start()
        .await;
    // Log lines come from a writer thread: the line may trail the open port.
    let started = og
        .wait_for_log(LIMIT, |l| {
            l["message"] == "opsgate started" && l["runtime"] == "current-thread"
        })
        .await;
    assert!(started, "{:?}", og.logs());
    for i in 0..10 {
        let a = request("POST", &og.url(&format!("/one/{i}")), &[], "payload").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["body_bytes"], 7);
        assert_eq!(get(&og.url("/_health/live"), &[]).await.status, 200);
    }
    assert_eq!(app.hits(), 10);
    og.sigterm();
    assert!(og.wait_exit(Duration::from_secs(10)).await.success());
}

/// An app that answers one request per connection with a keep-alive response, then
/// closes the connection and says so: the idle connection opsgate pooled is stale.
#[tokio::test]
async fn an_idle_connection_the_app_closed_is_not_an_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let app = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            drop(sock);
            let _ = closed_tx.send(());
        }
    });
    let og = Launch::new()
        .config(&format!("[proxy]\nupstream = \"http://{addr}\"\n"))
        .loopback()
        .start()
        .await;
    for i in 0..40 {
        let answer = get(&og.url(&format!("/stale/{i}")), &[]).await;
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
        assert_eq!(answer.text(), "ok");
        // The next request finds the connection closed by the app, whether or not opsgate
        // has seen the FIN yet.
        closed.recv().await.unwrap();
    }
    app.abort();
}

#[tokio::test]
async fn http2_upstreams_get_the_host_as_authority_and_no_host_header() {
    let app = H2App::start().await;
    for preserve_host in [true, false] {
        let og = Launch::new()
            .config(&format!(
                "[upstreams.app]\nurl = \"http://{}\"\nhttp2 = true\npreserve_host = {preserve_host}\n\
                 [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
                app.addr
            ))
            .loopback()
            .start()
            .await;
        // Requests arrive over HTTP/1.1, each with its own Host.
        for host in ["shop.example.com", "a.example", "b.example:8443"] {
            let answer = get(&og.url("/grpc"), &[("host", host)]).await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            let echo = answer.json();
            let want = if preserve_host {
                host.to_owned()
            } else {
                app.addr.to_string()
            };
            let what = format!("preserve_host = {preserve_host}, host {host}: {echo}");
            assert_eq!(echo["authority"], want.as_str(), "{what}");
            assert_eq!(echo["host"], serde_json::json!([]), "{what}");
        }
    }
    // Wherever `:authority` points, opsgate connected to the configured address, over one
    // shared connection per opsgate: a client's Host values never multiply connections.
    assert_eq!(app.connections(), 2);
}

#[tokio::test]
async fn a_retry_to_an_http2_upstream_sends_the_head_the_first_attempt_sent() {
    let app = H2App::start().await;
    let og = Launch::new()
        .config(&format!(
            "[upstreams.app]\nurl = \"http://{}\"\nhttp2 = true\n\
             [upstreams.app.retry]\nattempts = 2\nbase_delay = \"1ms\"\nmax_delay = \"5ms\"\n\
             [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
            app.addr
        ))
        .loopback()
        .start()
        .await;
    let headers = [
        ("accept", "text/html"),
        ("accept", "application/json"),
        ("x-tenant", "caf\u{e9}"),
        ("x-empty", ""),
    ];
    let answer = request("PUT", &og.url("/x?flaky"), &headers, "{\"n\":1}").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let heads = app.heads();
    assert_eq!(heads.len(), 2, "{heads:#?}");
    assert_eq!(heads[1], heads[0], "the retry's head");
    let first = &heads[0];
    // The client's Host as `:authority` (`preserve_host`), the path as it came.
    assert!(
        first.starts_with("PUT http://") && first.contains("/x?flaky HTTP/2.0\n"),
        "{first}"
    );
    for line in [
        "accept: text/html\naccept: application/json\n",
        "x-tenant: caf\u{e9}\n",
        "x-empty: \n",
        "x-request-id: ",
        "x-forwarded-for: 127.0.0.1\n",
    ] {
        assert!(first.contains(line), "{line:?} not in {first}");
    }
}

/// Reads until the server closes the connection; panics if it is still open after `LIMIT`.
async fn closed_by_server(sock: &mut TcpStream, what: &str) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(LIMIT, sock.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "{what}: connection still open after {LIMIT:?}"
    );
}

/// The client connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn header_read_timeout_covers_h2_preface_headers_and_idle_connections() {
    let app = Upstream::echo("app").await;
    let og = Launch::new()
        .config(&format!(
            "[proxy]\nupstream = \"{}\"\nheader_read_timeout = \"1s\"\n",
            app.url()
        ))
        .loopback()
        .start()
        .await;

    // A partial connection preface: protocol detection must not wait forever.
    let mut sock = TcpStream::connect(og.addr()).await.unwrap();
    sock.write_all(&H2_PREFACE[..16]).await.unwrap();
    closed_by_server(&mut sock, "partial preface").await;

    // A HEADERS frame announcing 100 bytes that sends 10.
    let mut sock = TcpStream::connect(og.addr()).await.unwrap();
    sock.write_all(H2_PREFACE).await.unwrap();
    sock.write_all(&[0, 0, 100, 1, 0x4, 0, 0, 0, 1])
        .await
        .unwrap();
    sock.write_all(&[0x82; 10]).await.unwrap();
    closed_by_server(&mut sock, "partial HEADERS").await;

    // An h2 connection that served a request, then stays idle.
    let tcp = TcpStream::connect(og.addr()).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(og.url("/idle")).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    drop(client);
    let ended = tokio::time::timeout(LIMIT, conn).await;
    assert!(
        ended.is_ok(),
        "idle h2 connection still open after {LIMIT:?}"
    );
    assert_eq!(app.hits(), 1);
}

#[tokio::test]
async fn h2_rapid_reset_gets_goaway_and_does_not_churn_upstream_connections() {
    let app = H2App::start().await;
    let og = Launch::new()
        .config(&format!(
            "[proxy]\nupstream = \"http://{}\"\naccess_log = false\n",
            app.addr
        ))
        .loopback()
        .start()
        .await;
    let tcp = TcpStream::connect(og.addr()).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    let mut goaway = false;
    // HEADERS, then RST_STREAM a moment later: each stream is accepted and dispatched first.
    while sent < 1000 {
        let ready = tokio::time::timeout(LIMIT, client.clone().ready())
            .await
            .unwrap_or_else(|_| panic!("the connection stalled after {sent} streams"));
        client = match ready {
            Ok(ready) => ready,
            Err(e) => {
                goaway = e.is_go_away();
                break;
            }
        };
        let req = http::Request::get(og.url("/slow?sleep_ms=500"))
            .body(())
            .unwrap();
        let mut stream = match client.send_request(req, true) {
            Ok((_resp, stream)) => stream,
            Err(e) => {
                goaway = e.is_go_away();
                break;
            }
        };
        sent += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
        stream.send_reset(h2::Reason::CANCEL);
    }
    assert!(goaway, "{sent} reset streams and no GOAWAY");
    let ended = tokio::time::timeout(LIMIT, conn).await;
    assert!(ended.is_ok(), "the abusive connection is still open");
    let conns = app.connections();
    println!("{sent} streams reset before GOAWAY; the upstream saw {conns} connections");
    // The resets hit streams already dispatched (else the bound below says nothing).
    assert!(
        app.hits() >= 20,
        "only {} streams reached the upstream",
        app.hits()
    );
    assert!(
        conns <= 150,
        "{sent} resets made {conns} upstream connections"
    );
    // Everyone else is still served.
    let answer = get(&og.url("/after"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// An app that accepts connections, reads nothing and never answers, holding each socket
/// until the test ends (as an app stuck before reading an upload does).
async fn never_reads() -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    (addr, accepted, task)
}

/// TCP connections in state ESTABLISHED whose local port is `port`, from /proc/net/tcp.
fn established_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).unwrap() == port && f[3] == "01"
        })
        .count()
}

#[tokio::test]
async fn an_abandoned_upload_releases_its_upstream_connection_at_once() {
    let (app, accepted, _task) = never_reads().await;
    let og = Launch::new()
        .config(&format!(
            "[upstreams.app]\nurl = \"http://{app}\"\ntimeout = \"1s\"\n\
             [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n"
        ))
        .loopback()
        .start()
        .await;
    // Uploads the app never reads: one that waits for its 504, one that hangs up first.
    for hang_up in [false, true] {
        let mut sock = TcpStream::connect(og.addr()).await.unwrap();
        sock.write_all(b"PUT /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000000\r\n\r\n")
            .await
            .unwrap();
        let before = accepted.load(Ordering::SeqCst);
        let (mut rd, mut wr) = sock.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            while wr.write_all(&chunk).await.is_ok() {}
        });
        eventually(LIMIT, "the upload to reach the app", || async {
            accepted.load(Ordering::SeqCst) > before
        })
        .await;
        if hang_up {
            writer.abort();
            drop(rd);
        } else {
            let mut head = [0u8; 12];
            tokio::time::timeout(LIMIT, rd.read_exact(&mut head))
                .await
                .expect("an answer within 5s")
                .unwrap();
            assert_eq!(&head, b"HTTP/1.1 504", "{}", String::from_utf8_lossy(&head));
            writer.abort();
        }
        let what = if hang_up {
            "opsgate to release the app's connection after the client hung up"
        } else {
            "opsgate to release the app's connection after the 504"
        };
        eventually(LIMIT, what, || async { established_on(app.port()) == 0 }).await;
    }
}

#[tokio::test]
async fn an_http2_upstream_that_restarts_is_reconnected() {
    let app = H2App::start().await;
    let addr = app.addr;
    let og = Launch::new()
        .config(&format!(
            "[upstreams.app]\nurl = \"http://{addr}\"\nhttp2 = true\nconnect_timeout = \"500ms\"\n\
             [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n"
        ))
        .loopback()
        .start()
        .await;
    assert_eq!(get(&og.url("/one"), &[]).await.status, 200);
    drop(app);
    eventually(LIMIT, "a 502 while the upstream is down", || async {
        let answer = get(&og.url("/down"), &[]).await;
        answer.status == 502 && answer.text() == r#"{"detail":"upstream unavailable"}"#
    })
    .await;
    let app = H2App::start_on(addr).await;
    eventually(LIMIT, "a 200 once the upstream is back", || async {
        get(&og.url("/two"), &[]).await.status == 200
    })
    .await;
    assert_eq!(app.connections(), 1);
}

#[tokio::test]
async fn a_timed_out_call_to_an_http2_upstream_resets_only_its_stream() {
    let app = H2App::start().await;
    let og = Launch::new()
        .config(&format!(
            "[upstreams.app]\nurl = \"http://{}\"\nhttp2 = true\ntimeout = \"300ms\"\n\
             [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
            app.addr
        ))
        .loopback()
        .start()
        .await;
    assert_eq!(get(&og.url("/slow?sleep_ms=3000"), &[]).await.status, 504);
    assert_eq!(get(&og.url("/fast"), &[]).await.status, 200);
    assert_eq!(app.connections(), 1, "the 504 cost the shared connection");
}
