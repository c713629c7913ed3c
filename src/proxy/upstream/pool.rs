//! HTTP/1.1 keep-alive connections to one upstream: the idle ones, most recently used
//! first, and the response body that drives its connection and hands it back once fully
//! read. A connection has no task of its own: whichever call holds it polls it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::ErrorChain;
use super::io::UpstreamIo;
use super::quiet::Quiet;
use super::tap::HeadTap;
use crate::proxy::body::Body;

/// An idle connection older than this is closed. Apps close theirs sooner (gunicorn 2 s,
/// Node 5 s); a request on a stale one is replayed, the close being read before it is sent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream; past it the least recently used is closed.
/// Above the concurrency a sidecar sees, so a steady load never churns connections.
pub const MAX_IDLE: usize = 128;

/// hyper's half of a connection: what reads and writes the socket. Boxed, once per
/// connection, because hyper's type for a connection that can upgrade has no name; and it
/// must be that one from the first poll, or a 101 read in that poll fails the upgrade.
pub type Driver = Pin<Box<dyn std::future::Future<Output = hyper::Result<()>> + Send>>;

/// Moves a connection on: reads and writes what it can. `Ready` once the connection has
/// ended (closed or failed); it must not be polled after that.
pub fn poll_driver(driver: &mut Driver, cx: &mut Context<'_>, upstream: &str) -> Poll<()> {
    match driver.as_mut().poll(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(())) => Poll::Ready(()),
        Poll::Ready(Err(e)) => {
            tracing::debug!(%upstream, error = %ErrorChain(&e), "upstream connection closed");
            Poll::Ready(())
        }
    }
}

/// What stands in for a connection's half that ended, dropped to answer what it held.
pub fn ended() -> Driver {
    Box::pin(std::future::ready(Ok(())))
}

/// One HTTP/1.1 connection, driven by the task of the call using it, as Pingora does:
/// a request and its response wake no second task and cross no channel between tasks.
/// An idle connection is next polled by the call that takes it, which reads a close the
/// app sent meanwhile before it writes the request; hyper then hands the request back
/// unsent. Dropping a connection closes the socket (a reset if cut mid-request).
/// Boxed once, when opened: a response body carries its connection, and a pointer keeps
/// the response small enough to move with a short copy (it moves several times).
pub struct Conn {
    pub sender: SendRequest<Body>,
    pub driver: Driver,
    /// The waker both halves are polled with (see [`Quiet`]).
    pub quiet: Quiet,
    /// The deadline of the call using the connection. One timer for the connection's life:
    /// tokio moves a registered timer to a later deadline with one atomic step, where a
    /// timer per call is an insertion into its timer wheel and a removal (~600
    /// instructions). Between calls it may fire and wake the last caller's task, harmlessly.
    pub deadline: Pin<Box<tokio::time::Sleep>>,
    /// Keeps the head the connection writes, for a call that may retry it.
    pub tap: Arc<HeadTap>,
}

impl Conn {
    pub fn new(
        sender: SendRequest<Body>,
        driver: Connection<TokioIo<UpstreamIo>, Body>,
        tap: Arc<HeadTap>,
    ) -> Box<Self> {
        Box::new(Self {
            sender,
            driver: Box::pin(driver.with_upgrades()),
            quiet: Quiet::new(),
            // Set by each call before it is polled.
            deadline: Box::pin(tokio::time::sleep_until(Instant::now())),
            tap,
        })
    }

    /// Hands the connection to a task of its own, for a response that switched protocols:
    /// the upgraded stream comes out once the connection has been driven to its end.
    pub fn detach(self, upstream: std::sync::Arc<str>) {
        let Self { sender, driver, .. } = self;
        tokio::spawn(async move {
            let _sender = sender;
            if let Err(e) = driver.await {
                tracing::debug!(%upstream, error = %ErrorChain(&e), "upstream connection closed");
            }
        });
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

pub struct Pool {
    upstream: Arc<str>,
    /// Most recently used at the back. Never held across an await; per upstream.
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
    max_idle: usize,
    /// The waker of every idle connection: a close or stray bytes on one wakes the pool's
    /// watcher, which reads it and closes the connection at once, as nginx does for its
    /// cached upstream connections (no socket left in CLOSE_WAIT until the next call).
    watch: Arc<Watch>,
    watch_waker: Waker,
    watcher_started: AtomicBool,
}

struct Watch(tokio::sync::Notify);

impl Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

impl Pool {
    pub fn new(upstream: Arc<str>, idle_timeout: Duration, max_idle: usize) -> Arc<Self> {
        let watch = Arc::new(Watch(tokio::sync::Notify::new()));
        Arc::new(Self {
            upstream,
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
            max_idle,
            watch_waker: Waker::from(watch.clone()),
            watch,
            watcher_started: AtomicBool::new(false),
        })
    }

    /// The most recently used idle connection.
    pub fn checkout(&self) -> Option<Box<Conn>> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_back()
            .map(|i| i.conn)
    }

    /// Takes back a connection whose response was read to the end. One still busy (an
    /// early response while the request body is being written) is closed instead: a later
    /// call would wait behind that body.
    pub fn put(self: &Arc<Self>, conn: Box<Conn>) {
        if !conn.sender.is_ready() {
            return;
        }
        conn.quiet.hand_to(&self.watch_waker);
        let now = Instant::now();
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let evicted = (idle.len() >= self.max_idle).then(|| idle.pop_front());
            idle.push_back(Idle { conn, since: now });
            evicted
        };
        drop(evicted);
        self.start_watcher();
    }

    /// Closes the connections idle longer than the idle timeout and those that ended while
    /// idle (each is polled). Returns how many are left.
    fn sweep(&self, now: Instant) -> usize {
        let mut cx = Context::from_waker(&self.watch_waker);
        let mut ended = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for mut i in std::mem::take(&mut *idle) {
            let Conn { driver, quiet, .. } = &mut *i.conn;
            let open = now.saturating_duration_since(i.since) < self.idle_timeout
                && quiet
                    .poll(&mut cx, |cx| poll_driver(driver, cx, &self.upstream))
                    .is_pending();
            if open {
                idle.push_back(i);
            } else {
                ended.push(i);
            }
        }
        let left = idle.len();
        drop(idle);
        // Closed outside the lock.
        drop(ended);
        left
    }

    /// One task per pool sweeps when an idle connection wakes it and every quarter of the
    /// idle timeout, so an idle sidecar holds no upstream sockets after the idle timeout;
    /// it ends with the pool.
    fn start_watcher(self: &Arc<Self>) {
        if self.watcher_started.load(Ordering::Relaxed)
            || self.watcher_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        let watch = self.watch.clone();
        let every = self.idle_timeout / 4;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = watch.0.notified() => {}
                }
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep(Instant::now());
            }
        });
    }
}

/// A response body from an upstream. On HTTP/1.1 it holds its connection, drives it
/// while the body is read and returns it to the pool as soon as the last frame is out: a
/// body dropped before its end takes the connection with it, since a connection with
/// unread response bytes cannot be reused.
pub struct UpstreamBody {
    inner: Incoming,
    slot: Option<Slot>,
}

/// The connection a response body came on, and where it goes back.
pub struct Slot {
    pub conn: Box<Conn>,
    pub pool: Arc<Pool>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, slot: Option<Slot>) -> Self {
        let mut body = Self { inner, slot };
        body.release_if_done();
        body
    }

    fn release_if_done(&mut self) {
        if self.slot.is_some() && http_body::Body::is_end_stream(&self.inner) {
            let slot = self.slot.take().expect("checked");
            slot.pool.put(slot.conn);
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(Slot { conn, pool }) = &mut this.slot else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        let inner = &mut this.inner;
        let Conn { driver, quiet, .. } = &mut **conn;
        let (ended, r) = quiet.poll(cx, |cx| {
            // What the connection has read is taken first: a small response is all in the
            // body's channel by the time its headers are out, and needs no further poll.
            let r = Pin::new(&mut *inner).poll_frame(cx);
            if r.is_ready() {
                return (false, r);
            }
            let ended = poll_driver(driver, cx, &pool.upstream).is_ready();
            (ended, Pin::new(inner).poll_frame(cx))
        });
        if ended {
            this.slot = None;
            // The connection's end closed this body's channel: read that now.
            if r.is_pending() {
                return Pin::new(&mut this.inner).poll_frame(cx);
            }
            return r;
        }
        let done = match &r {
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(None) => true,
            Poll::Ready(Some(Err(_))) => {
                this.slot = None;
                false
            }
            Poll::Pending => false,
        };
        if done && let Some(Slot { mut conn, pool }) = this.slot.take() {
            // The connection goes idle in the poll that reads the response's end; one
            // that has not yet (its end came with this frame) gets that poll now.
            if !conn.sender.is_ready() {
                let Conn { driver, quiet, .. } = &mut *conn;
                if quiet
                    .poll(cx, |cx| poll_driver(driver, cx, &pool.upstream))
                    .is_ready()
                {
                    return r;
                }
            }
            pool.put(conn);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection polled once (so ready for a request), and the server's end of it.
    async fn conn_to(listener: &tokio::net::TcpListener) -> (Box<Conn>, tokio::net::TcpStream) {
        let addr = listener.local_addr().unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (io, tap) = UpstreamIo::plain(tcp).tapped();
        let (sender, driver) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io))
            .await
            .unwrap();
        let mut conn = Conn::new(sender, driver, tap);
        let Conn { driver, quiet, .. } = &mut *conn;
        let polled = std::future::poll_fn(|cx| {
            Poll::Ready(quiet.poll(cx, |cx| poll_driver(driver, cx, "app")))
        });
        assert!(polled.await.is_pending(), "open");
        assert!(conn.sender.is_ready());
        (conn, server)
    }

    /// The server's end sees the connection closed.
    async fn closed(server: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0; 16];
        let read = server.read(&mut buf);
        matches!(
            tokio::time::timeout(Duration::from_secs(5), read).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn checkout_is_most_recent_first_and_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new("app".into(), IDLE_TIMEOUT, 2);
        let (a, mut server_a) = conn_to(&listener).await;
        let (b, mut server_b) = conn_to(&listener).await;
        let (c, mut server_c) = conn_to(&listener).await;
        pool.put(a);
        pool.put(b);
        // Over the bound: the least recently used (`a`) is closed.
        pool.put(c);
        assert!(closed(&mut server_a).await);
        drop(pool.checkout().unwrap());
        assert!(closed(&mut server_c).await, "c, the most recent, first");
        drop(pool.checkout().unwrap());
        assert!(closed(&mut server_b).await);
        assert!(pool.checkout().is_none());
    }

    #[tokio::test]
    async fn an_idle_connection_the_app_closes_is_closed_at_once() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new("app".into(), IDLE_TIMEOUT, 8);
        let (conn, mut server) = conn_to(&listener).await;
        pool.put(conn);
        // The app's FIN; its socket can still read opsgate's.
        server.shutdown().await.unwrap();
        assert!(
            closed(&mut server).await,
            "closed long before the idle timeout"
        );
        assert!(pool.checkout().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new("app".into(), Duration::from_secs(10), 8);
        let (conn, _server_a) = conn_to(&listener).await;
        pool.put(conn);
        tokio::time::advance(Duration::from_secs(6)).await;
        let (conn, _server_b) = conn_to(&listener).await;
        pool.put(conn);
        assert_eq!(pool.sweep(Instant::now()), 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        // Only the older one is past 10 s.
        assert_eq!(pool.sweep(Instant::now()), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(pool.sweep(Instant::now()), 0);
    }
}
