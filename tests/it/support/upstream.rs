//! Test upstreams on port 0: an echo app (with slow and huge modes), an app that fails on
//! command, a WebSocket echo, and a refused address. Each server is aborted, with its
//! connections, on drop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::free_port;

/// The body type test servers and clients send.
pub type TestBody = BoxBody<Bytes, Infallible>;

/// A body of `len` bytes of `x`, produced 64 KiB at a time and never held whole.
pub struct Filler {
    remaining: u64,
}

static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

impl Filler {
    pub fn new(len: u64) -> Self {
        Self { remaining: len }
    }

    pub fn boxed(len: u64) -> TestBody {
        Self::new(len).boxed()
    }
}

impl http_body::Body for Filler {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &CHUNK[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

pub fn full(body: impl Into<Bytes>) -> TestBody {
    http_body_util::Full::new(body.into()).boxed()
}

/// An HTTP app (HTTP/1.1 and h2c) that answers every request with a JSON echo of what it
/// received: `{"upstream","method","path","query","version","headers":{name:[values]},"body_bytes"}`.
/// The request body is counted as it streams, never buffered.
///
/// The query string steers it: `sleep_ms=N` waits N ms before answering; `bytes=N` answers
/// with N bytes of `x` instead of the echo.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn echo(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                let counter = counter.clone();
                let service = service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    answer(name, req)
                });
                conns.spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(sock), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            name,
            hits,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests whose head has arrived (counted before any `sleep_ms`).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

async fn answer(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let query = req.uri().query().map(str::to_owned);
    if let Some(ms) = query_u64(query.as_deref(), "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    if let Some(n) = query_u64(query.as_deref(), "bytes") {
        return Ok(Response::new(Filler::boxed(n)));
    }
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<serde_json::Value> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        headers.insert(name.as_str().to_owned(), values.into());
    }
    let echo = serde_json::json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": query,
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut resp = Response::new(full(echo.to_string()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// A WebSocket server echoing every text and binary message back.
pub struct WsEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl WsEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsEcho { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server that reads the request head, then closes the connection without answering.
pub struct Hangup {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Hangup {
    pub async fn start() -> Self {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                conns.spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                });
            }
        });
        Hangup { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Hangup {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream URL nothing listens on: connecting is refused at once.
pub fn refused_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// A listener that never accepts, its accept queue full: the kernel drops every further
/// SYN, so a connect to it neither succeeds nor fails until the connecting side gives up.
pub struct Unanswered {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
}

impl Unanswered {
    /// How long a connect to a queue with room may take before the queue counts as full:
    /// a loopback handshake is done in the kernel, far within it.
    const HANDSHAKE_LIMIT: Duration = Duration::from_millis(500);

    pub fn start() -> Self {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // How many handshakes a `listen(0)` queue takes is the kernel's choice; the first
        // connect left unanswered shows it is full, and nothing here ever empties it.
        let mut queued = Vec::new();
        loop {
            match std::net::TcpStream::connect_timeout(&addr, Self::HANDSHAKE_LIMIT) {
                Ok(s) => queued.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                Err(e) => panic!("filling the accept queue of {addr}: {e}"),
            }
            assert!(queued.len() < 16, "the accept queue of {addr} never filled");
        }
        Self {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// What a [`Scripted`] upstream answers to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// 200 `{"ok":true}`.
    Ok,
    /// This status with the body `{"upstream_status":N}`, so a test can tell it from
    /// an answer opsgate made up.
    Status(u16),
    /// As `Status`, plus `Retry-After: <secs>`.
    RetryAfter(u16, u32),
    /// Reads the request and never answers (until the server is dropped).
    Hang,
    /// Reads the request and closes the connection without an answer.
    Drop,
}

/// The replies still queued and the one used once the queue is empty.
struct Script {
    queue: std::collections::VecDeque<Reply>,
    steady: Reply,
    /// Every request head seen, as text (see [`Scripted::heads`]).
    heads: Vec<String>,
}

/// An HTTP/1.1 app that fails on command: each request takes the next queued [`Reply`],
/// or the steady one when the queue is empty; both can be changed while it runs. Counts
/// every request head it sees, hung ones included.
pub struct Scripted {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// A std mutex: held only to pop or replace a `Reply`, never across an await.
    script: Arc<std::sync::Mutex<Script>>,
    task: JoinHandle<()>,
}

impl Scripted {
    /// Starts answering every request with `steady`.
    pub async fn start(steady: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(std::sync::Mutex::new(Script {
            queue: Default::default(),
            steady,
            heads: Vec::new(),
        }));
        let (counter, shared) = (hits.clone(), script.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                let (counter, shared) = (counter.clone(), shared.clone());
                let service = service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let reply = {
                        let mut s = shared.lock().unwrap();
                        s.heads.push(head_text(&req));
                        let steady = s.steady;
                        s.queue.pop_front().unwrap_or(steady)
                    };
                    scripted_answer(reply, req)
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), service)
                        .await;
                });
            }
        });
        Scripted {
            addr,
            hits,
            script,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests whose head has arrived.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The heads of the requests seen so far, in order: the request line, then every
    /// header line as it arrived (`name: value`), one per line.
    pub fn heads(&self) -> Vec<String> {
        self.script.lock().unwrap().heads.clone()
    }

    /// From now on, answers `reply` once the queue is empty.
    pub fn set(&self, reply: Reply) {
        self.script.lock().unwrap().steady = reply;
    }

    /// Answers the next requests with `replies`, in order, before the steady reply.
    pub fn then(&self, replies: &[Reply]) {
        self.script.lock().unwrap().queue.extend(replies);
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn head_text(req: &Request<Incoming>) -> String {
    let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
    for (name, value) in req.headers() {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text
}

/// An `Err` makes hyper close the connection without writing a response.
async fn scripted_answer(
    reply: Reply,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, std::io::Error> {
    let mut body = req.into_body();
    while let Some(Ok(_)) = body.frame().await {}
    let (status, retry_after) = match reply {
        Reply::Ok => {
            let mut resp = Response::new(full(r#"{"ok":true}"#));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return Ok(resp);
        }
        Reply::Hang => match std::future::pending::<Infallible>().await {},
        Reply::Drop => return Err(std::io::ErrorKind::ConnectionAborted.into()),
        Reply::Status(status) => (status, None),
        Reply::RetryAfter(status, secs) => (status, Some(secs)),
    };
    let mut resp = Response::new(full(format!(r#"{{"upstream_status":{status}}}"#)));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    }
    Ok(resp)
}

/// The values the echo upstream saw for header `name`.
pub fn seen(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}
