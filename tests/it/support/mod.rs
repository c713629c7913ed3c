//! Shared test fixtures: free ports, tiny TCP/HTTP servers, throwaway Redis and PostgreSQL,
//! test upstreams, opsgate as a process (`opsgate`) or in the test's runtime (`inprocess`),
//! and the `/metrics` parser.

#![allow(dead_code)]

pub mod inprocess;
pub mod metrics;
pub mod opsgate;
pub mod postgres;
pub mod redis;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An opsgate a test talks to, whether a process ([`opsgate::Opsgate`]) or in the test's
/// runtime ([`inprocess::InProcess`]).
pub trait Served {
    /// `http://<proxy>` followed by `path_and_query`.
    fn url(&self, path_and_query: &str) -> String;
    /// `http://<admin>` followed by `path_and_query`.
    fn admin_url(&self, path_and_query: &str) -> String;
}

impl Served for opsgate::Opsgate {
    fn url(&self, path_and_query: &str) -> String {
        opsgate::Opsgate::url(self, path_and_query)
    }
    fn admin_url(&self, path_and_query: &str) -> String {
        opsgate::Opsgate::admin_url(self, path_and_query)
    }
}

impl Served for inprocess::InProcess {
    fn url(&self, path_and_query: &str) -> String {
        inprocess::InProcess::url(self, path_and_query)
    }
    fn admin_url(&self, path_and_query: &str) -> String {
        inprocess::InProcess::admin_url(self, path_and_query)
    }
}

/// The PostgreSQL the tests own: `OPSGATE_TEST_PG_URL` (ci/install-test-deps.sh starts a
/// throwaway cluster and sets it), else the local server's `postgres` user on 5432.
pub fn live_pg() -> String {
    std::env::var("OPSGATE_TEST_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// [`live_pg`] with `password` set in its userinfo (the server must not check it: the
/// throwaway cluster trusts loopback).
pub fn live_pg_with_password(password: &str) -> String {
    let url = live_pg();
    let (scheme, rest) = url.split_once("://").expect("postgres URL");
    let (userinfo, host) = rest.split_once('@').unwrap_or(("postgres", rest));
    let user = userinfo.split(':').next().unwrap_or("postgres");
    format!("{scheme}://{user}:{password}@{host}")
}

/// Installs ring as the process's rustls provider (idempotent).
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A port nothing listens on (bound then released; good enough on loopback), and never
/// one this process handed out before: the kernel may give the same port to two binds in a
/// row once the first is released, and a launch that asks for a proxy and an admin port
/// would then get one port twice.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// A loopback address on a [`free_port`].
pub fn loopback_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; panics with `what` on timeout.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Blocks until something accepts TCP connections on `port`.
pub fn wait_listening(port: u16, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server that accepts connections and never answers; aborted on drop.
pub struct SilentServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl SilentServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        SilentServer { addr, task }
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 server answering every request with one fixed status and body.
pub struct FixedHttp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl FixedHttp {
    pub async fn start(status: u16, body: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = sock.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let response = format!(
                                "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if sock.write_all(response.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        FixedHttp { addr, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for FixedHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
