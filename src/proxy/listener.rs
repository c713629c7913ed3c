//! Accepting connections: TCP (and optionally TLS), HTTP/1.1 and h2 on one port, limits
//! against slow or oversized clients, and graceful close of every connection on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::body::BoxError;
use super::head_timer::{HeadClock, HeadTimer, Lateness};
use super::pipeline::{Admitted, Conn, Proxy, Side};

/// hyper's read buffer cannot be smaller than this; `max_header_bytes` below it is raised.
pub const MIN_HEADER_BUF: usize = 8 * 1024;

/// Connection limits, from `[proxy]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

/// The HTTP/1 settings, on hyper's h1 builder and on hyper-util's auto builder's h1 half
/// alike (two types with the same methods): one list, so the two paths cannot drift.
macro_rules! http1_settings {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size($limits.max_header_bytes.max(MIN_HEADER_BUF))
            .keep_alive(true)
    };
}

pub fn http_builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_settings!(b.http1(), limits);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid-reset limits of the h2 layer, pinned so an upgrade cannot loosen them:
        // streams reset before they were accepted, and streams we had to reset for errors.
        // Accepted-then-reset streams are bounded by `InFlight` below.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// The HTTP/1 half of [`http_builder`], for a connection whose first bytes already ruled
/// out h2: served by hyper's h1 connection directly, without the auto-detecting wrapper
/// that replays the sniffed bytes and dispatches every poll.
fn http1_builder(limits: Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    http1_settings!(b, limits);
    b
}

/// The h2 connection preface (RFC 9113 §3.4): what a prior-knowledge h2 client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a connection whose first bytes are `first` may be h2 with prior knowledge.
/// Any other first bytes (`GET`, `POST`, ...) can only be HTTP/1.
fn may_be_h2(first: &[u8]) -> bool {
    let n = first.len().min(H2_PREFACE.len());
    first[..n] == H2_PREFACE[..n]
}

/// Accepts until `stop` turns true, then asks every open connection to close gracefully
/// (`Connection: close` on HTTP/1, GOAWAY on h2) and returns the handle that waits for them.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    side: Side,
    limits: Limits,
    tls: Option<Arc<ArcSwapOption<TlsAcceptor>>>,
    mut stop: watch::Receiver<bool>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let builder = http_builder(limits);
    let h1_builder = http1_builder(limits);
    let mut accept_errors = 0u32;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                accept_errors = 0;
                pair
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on a full table.
                accept_errors = accept_errors.saturating_add(1);
                if accept_errors == 1 || accept_errors.is_power_of_two() {
                    tracing::warn!(error = %e, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(
                    10 * u64::from(accept_errors.min(100)),
                ))
                .await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tls_acceptor = tls.as_ref().and_then(|t| t.load_full());
        let conn_info = Conn::new(peer, tls_acceptor.is_some(), side);
        let proxy = proxy.clone();
        let head = HeadClock::new();
        let builder = builder.clone();
        let h1_builder = h1_builder.clone();
        // Held until the connection is gone: the caller's `shutdown()` waits for it.
        let watcher = graceful.watcher();
        let stop = stop.clone();
        tokio::spawn(async move {
            // `h1_only`: the first bytes ruled out h2 (see `may_be_h2`).
            let (io, h1_only) = match tls_acceptor {
                None => {
                    // hyper's header timer starts only after the h1/h2 sniff, which waits for
                    // the first byte without a deadline: a client that sends nothing would
                    // hold its socket forever. One peek bounds that.
                    // The same look decides the protocol when it can: bytes that are not
                    // the start of the h2 preface mean HTTP/1.
                    let mut first = [0u8; H2_PREFACE.len()];
                    let n = match tokio::time::timeout(
                        limits.header_read_timeout,
                        stream.peek(&mut first),
                    )
                    .await
                    {
                        Ok(Ok(n)) if n > 0 => n,
                        Ok(_) => return,
                        Err(_) => {
                            tracing::debug!(%peer, "client sent nothing before header_read_timeout");
                            return;
                        }
                    };
                    (ClientIo::Plain(stream), !may_be_h2(&first[..n]))
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                            .await;
                    match handshake {
                        // ALPN decides inside the auto connection.
                        Ok(Ok(s)) => (ClientIo::Tls(Box::new(s)), false),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "tls handshake timed out");
                            return;
                        }
                    }
                }
            };
            let state = Arc::new(ConnState::new(proxy, conn_info));
            let service_state = state.clone();
            let service = service_fn(move |req| {
                let mut in_flight = InFlight::start(&service_state);
                async move {
                    // Read when the request is first polled: hyper's h2 server calls the
                    // service, then queues the future as a task of its own, and that wait
                    // is not the upstream's. The in-flight span, the record, admission, the
                    // breaker's admission and the upstream deadline all start from it.
                    let arrived = Instant::now();
                    in_flight.started = Some(arrived);
                    // The await comes after the match, so the `Admitted` (~380 bytes) is
                    // not kept in this future, which hyper holds for every request.
                    let state = &*in_flight.state;
                    let proxy = &state.proxy;
                    let call = match proxy.admit(req, &state.conn, arrived) {
                        Admitted::Answered(mut resp) => {
                            in_flight.answered(resp.status());
                            resp.body_mut().set_in_flight(in_flight);
                            return Ok(resp);
                        }
                        // Boxed: the upstream call's state machine is a few KiB, and
                        // hyper's dispatcher would otherwise move it by value.
                        Admitted::Forward(f) => {
                            Box::into_pin(super::boxed_in_place(|| proxy.forward(f)))
                        }
                    };
                    let mut resp = call.await;
                    in_flight.answered(resp.status());
                    // Set in place: `Response::map` would move the whole response twice.
                    resp.body_mut().set_in_flight(in_flight);
                    Ok::<_, Infallible>(resp)
                }
            });
            // The h1 header deadline is kept by this connection's watchdog (`drive`).
            let result = if h1_only {
                let mut builder = h1_builder;
                builder.timer(HeadTimer(head.clone()));
                let conn = builder
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades();
                drive(conn, &state, &head, limits, stop, peer).await
            } else {
                let mut builder = builder;
                builder.http1().timer(HeadTimer(head.clone()));
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .into_owned();
                drive(conn, &state, &head, limits, stop, peer).await
            };
            drop(watcher);
            if let Err(e) = result {
                // Client-side trouble (reset, malformed request, header timeout): not ours to alarm about.
                tracing::debug!(%peer, error = %e, "connection closed with error");
            }
        });
    }
    graceful
}

/// Runs one connection to its end. It is asked to close gracefully (`Connection: close`,
/// GOAWAY) on shutdown, when it has had no request in flight for `header_read_timeout`
/// (an idle h2 connection, a partial h2 preface or HEADERS frame: nothing hyper's h1
/// header timer sees), and when its client cancels too many streams (h2 rapid reset).
/// A connection that has not finished `header_read_timeout` after an idle or abuse close
/// began is dropped. The same watchdog tells hyper when an h1 request head is overdue.
async fn drive<F, E>(
    conn: F,
    state: &ConnState,
    head: &HeadClock,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) -> Result<(), BoxError>
where
    F: Future<Output = Result<(), E>> + GracefulClose,
    E: Into<BoxError>,
{
    let mut conn = std::pin::pin!(conn);
    let mut stop = std::pin::pin!(stopped(&mut stop));
    let mut changed = std::pin::pin!(state.changed.notified());
    let limit = limits.header_read_timeout;
    // One timer for the connection's life, re-armed lazily: it fires at the idle deadline
    // last computed, and only then is the deadline asked afresh. Requests move the deadline
    // without touching the timer, so a busy connection costs one wake-up per `limit`.
    let mut watchdog = std::pin::pin!(tokio::time::sleep_until(
        state
            .idle_deadline(limit)
            .unwrap_or_else(|| Instant::now() + limit)
    ));
    // The task wakes for every read and write of the connection; the signals below are
    // looked at only when one of them woke it (each look takes a lock or two).
    let gate = Arc::new(SignalGate::default());
    let gate_waker = std::task::Waker::from(gate.clone());
    let mut draining = false;
    let mut hard_deadline: Option<Instant> = None;
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Signal::Done(r));
            }
            gate.task.register(cx.waker());
            if !gate.fired.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut cx = Context::from_waker(&gate_waker);
            if !draining && stop.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Signal::Stop);
            }
            if changed.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Signal::Changed);
            }
            if watchdog.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Signal::Watchdog);
            }
            Poll::Pending
        })
        .await;
        // Whatever was handled, every signal is looked at (and re-armed) on the next poll.
        gate.fired.store(true, Ordering::Release);
        let next = match event {
            Signal::Done(r) => return r.map_err(Into::into),
            Signal::Stop => {
                conn.as_mut().close_gracefully();
                draining = true;
                continue;
            }
            Signal::Changed => {
                changed.set(state.changed.notified());
                if draining || !state.abusive.load(Ordering::Relaxed) {
                    continue;
                }
                tracing::info!(%peer, "closing a connection that cancels too many streams");
                conn.as_mut().close_gracefully();
                draining = true;
                let hard = Instant::now() + limit;
                hard_deadline = Some(hard);
                hard
            }
            Signal::Watchdog => {
                let now = Instant::now();
                match head.expire(now.into_std()) {
                    Lateness::OnTime => {}
                    // hyper ends the connection when the loop polls it next.
                    Lateness::Late => {
                        watchdog.as_mut().reset(now + limit);
                        continue;
                    }
                    Lateness::StillLate => {
                        tracing::debug!(%peer, "request head overdue and not cut by hyper; dropped");
                        return Ok(());
                    }
                }
                if let Some(hard) = hard_deadline {
                    if now >= hard {
                        tracing::debug!(%peer, "connection did not close in time; dropped");
                        return Ok(());
                    }
                    hard
                } else {
                    match state.idle_deadline(limit) {
                        Some(due) if now >= due && !draining => {
                            tracing::debug!(%peer, "closing a connection idle for header_read_timeout");
                            conn.as_mut().close_gracefully();
                            draining = true;
                            let hard = now + limit;
                            hard_deadline = Some(hard);
                            hard
                        }
                        Some(due) if now < due => due,
                        // A request in flight (or a drain under way): look again a period later.
                        _ => now + limit,
                    }
                }
            }
        };
        // An h1 head being read may be due sooner than anything above.
        let next = head
            .due()
            .map_or(next, |due| next.min(Instant::from_std(due)));
        watchdog.as_mut().reset(next);
    }
}

/// What woke a connection's `drive` loop.
enum Signal<E> {
    Done(Result<(), E>),
    Stop,
    Changed,
    Watchdog,
}

/// The waker `drive` hands its signals: it notes that one of them fired, then wakes the
/// connection's task, so the task's other wake-ups skip polling them.
struct SignalGate {
    fired: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl Default for SignalGate {
    fn default() -> Self {
        Self {
            // Polled once at the start, which registers the gate with every signal.
            fired: AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        }
    }
}

impl std::task::Wake for SignalGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `graceful_shutdown` of hyper's and hyper-util's connections, behind a trait so `drive` can name it.
pub trait GracefulClose {
    fn close_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<S, B> GracefulClose for hyper::server::conn::http1::UpgradeableConnection<TokioIo<ClientIo>, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
{
    fn close_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<S, B> GracefulClose
    for auto::UpgradeableConnection<'static, TokioIo<ClientIo>, S, TokioExecutor>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A cancelled stream younger than this counts towards the rapid-reset limit.
const PREMATURE_RESET: Duration = Duration::from_secs(1);
/// Rapid reset (CVE-2023-44487), as Envoy bounds it: once a connection has had this many
/// premature cancels and they are at least half of its requests, it gets GOAWAY.
const MAX_PREMATURE_RESETS: u32 = 100;

/// What a connection's requests share: who the client is, and what its watchdog knows
/// (requests in flight, since when it has been idle, how its client has been cancelling).
/// Every request's in-flight span holds it, so a request reaches the proxy and its
/// connection through that one reference.
pub struct ConnState {
    proxy: Arc<Proxy>,
    conn: Conn,
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` when the last request finished.
    idle_since_ms: AtomicU64,
    /// An upgraded (tunnelled) connection lives as long as its tunnel.
    upgraded: AtomicBool,
    requests: AtomicU32,
    premature_resets: AtomicU32,
    abusive: AtomicBool,
    changed: tokio::sync::Notify,
}

impl ConnState {
    fn new(proxy: Arc<Proxy>, conn: Conn) -> Self {
        Self {
            proxy,
            conn,
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            requests: AtomicU32::new(0),
            premature_resets: AtomicU32::new(0),
            abusive: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// When the connection is due to close for idleness; `None` while a request is in flight.
    fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 || self.upgraded.load(Ordering::Relaxed) {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.born + since + limit)
    }
}

/// One request on a connection, from its head until its response body is done (or dropped).
pub struct InFlight {
    state: Arc<ConnState>,
    /// When the request was first polled; `None` until then (a stream reset while queued).
    started: Option<Instant>,
    answered: bool,
    /// Set by `close`, so `drop` reuses the caller's clock read instead of reading again.
    end: Option<Instant>,
}

impl InFlight {
    fn start(state: &Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.requests.fetch_add(1, Ordering::Relaxed);
        Self {
            state: state.clone(),
            started: None,
            answered: false,
            end: None,
        }
    }

    /// Ends the span at `end`.
    pub fn close(mut self, end: Instant) {
        self.end = Some(end);
    }

    fn answered(&mut self, status: http::StatusCode) {
        self.answered = true;
        if status == http::StatusCode::SWITCHING_PROTOCOLS {
            self.state.upgraded.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &*self.state;
        // Cancelled before it was polled at all counts as premature too. An answered
        // request reads no clock here.
        if !self.answered && self.started.is_none_or(|t| t.elapsed() < PREMATURE_RESET) {
            let resets = s.premature_resets.fetch_add(1, Ordering::Relaxed) + 1;
            if resets >= MAX_PREMATURE_RESETS
                && u64::from(resets) * 2 >= u64::from(s.requests.load(Ordering::Relaxed))
            {
                s.abusive.store(true, Ordering::Relaxed);
                // The only news the connection's watchdog cannot wait for.
                s.changed.notify_one();
            }
        }
        if s.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let end = self.end.unwrap_or_else(Instant::now);
            let ms = u64::try_from(end.saturating_duration_since(s.born).as_millis())
                .unwrap_or(u64::MAX);
            s.idle_since_ms.store(ms, Ordering::Relaxed);
        }
    }
}

/// The client's transport, plain or TLS, as one type for hyper.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Tls(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Why the proxy's TLS acceptor cannot be built; the file it names is the one to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls cert {}: {source}", path.display())]
    Cert {
        path: std::path::PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("tls key {}: {source}", path.display())]
    Key {
        path: std::path::PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate and key do not make a server config (e.g. they do not match).
    #[error("tls: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads a TLS acceptor (h2 and http/1.1 by ALPN) from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert.to_path_buf(),
            source,
        })?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_start_of_the_h2_preface_may_be_h2() {
        assert!(may_be_h2(H2_PREFACE));
        assert!(may_be_h2(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"));
        // Too few bytes to rule it out.
        assert!(may_be_h2(b"P"));
        assert!(may_be_h2(b"PRI * HT"));
        for h1 in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /",
            b"PUT",
            b"PATCH",
            b"PRI / HTTP/1.1",
        ] {
            assert!(!may_be_h2(h1), "{:?}", String::from_utf8_lossy(h1));
        }
    }
}
