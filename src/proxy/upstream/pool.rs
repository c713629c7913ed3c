//! HTTP/1.1 keep-alive connections to one upstream: the idle ones, most recently used
//! first, and the response body that hands its connection back once fully read.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::io::Abort;
use crate::proxy::body::Body;

/// An idle connection older than this is closed. Apps close theirs sooner (gunicorn 2 s,
/// Node 5 s); a stale one is detected on checkout or replayed on a fresh connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream; past it the least recently used is closed.
/// Above the concurrency a sidecar sees, so a steady load never churns connections.
pub const MAX_IDLE: usize = 128;

/// One HTTP/1.1 connection: the sender half and the handle that resets its socket.
pub struct Conn {
    pub sender: SendRequest<Body>,
    pub abort: Abort,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

pub struct Pool {
    /// Most recently used at the back. Never held across an await; per upstream.
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
    max_idle: usize,
    reaper_started: std::sync::atomic::AtomicBool,
}

impl Pool {
    pub fn new(idle_timeout: Duration, max_idle: usize) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
            max_idle,
            reaper_started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The most recently used idle connection that is still open.
    pub fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(i) = idle.pop_back() {
            if !i.conn.sender.is_closed() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Takes back a connection whose response was read to the end.
    pub fn put(self: &Arc<Self>, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let evicted = (idle.len() >= self.max_idle).then(|| idle.pop_front());
            idle.push_back(Idle { conn, since: now });
            evicted
        };
        drop(evicted);
        self.start_reaper();
    }

    /// Closes the connections idle longer than the idle timeout. Returns how many are left.
    fn evict_expired(&self, now: Instant) -> usize {
        let expired: Vec<Idle> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let keep_from = idle
                .iter()
                .position(|i| now.saturating_duration_since(i.since) < self.idle_timeout)
                .unwrap_or(idle.len());
            idle.drain(..keep_from).collect()
        };
        drop(expired);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// One task per pool closes expired connections, so an idle sidecar holds no
    /// upstream sockets after the idle timeout; it ends with the pool.
    fn start_reaper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.reaper_started.load(Ordering::Relaxed)
            || self.reaper_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        let every = self.idle_timeout / 4;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.evict_expired(Instant::now());
            }
        });
    }
}

/// A response body from an upstream. On HTTP/1.1 it holds its connection and returns it
/// to the pool as soon as the last frame is out: a body dropped before its end takes the
/// connection with it, since hyper cannot reuse a connection with unread response bytes.
pub struct UpstreamBody {
    inner: Incoming,
    slot: Option<(Conn, Arc<Pool>)>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, slot: Option<(Conn, Arc<Pool>)>) -> Self {
        let mut body = Self { inner, slot };
        body.release_if_done();
        body
    }

    fn release_if_done(&mut self) {
        if self.slot.is_some() && http_body::Body::is_end_stream(&self.inner) {
            let (conn, pool) = self.slot.take().expect("checked");
            pool.put(conn);
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
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            Poll::Ready(None) => {
                if let Some((conn, pool)) = this.slot.take() {
                    pool.put(conn);
                }
            }
            // An error ends the connection: dropping the sender lets hyper close it.
            Poll::Ready(Some(Err(_))) => this.slot = None,
            Poll::Pending => {}
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

    async fn conn_to(listener: &tokio::net::TcpListener) -> Conn {
        let addr = listener.local_addr().unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        Conn {
            sender,
            abort: Abort::default(),
        }
    }

    #[tokio::test]
    async fn checkout_is_most_recent_first_and_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(IDLE_TIMEOUT, 2);
        let (a, b, c) = (
            conn_to(&listener).await,
            conn_to(&listener).await,
            conn_to(&listener).await,
        );
        let (a_abort, c_abort) = (a.abort.clone(), c.abort.clone());
        pool.put(a);
        pool.put(b);
        // Over the bound: the least recently used (`a`) is closed.
        pool.put(c);
        let first = pool.checkout().unwrap();
        assert!(first.abort.same_as(&c_abort));
        let second = pool.checkout().unwrap();
        assert!(!second.abort.same_as(&a_abort));
        assert!(pool.checkout().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(Duration::from_secs(10), 8);
        pool.put(conn_to(&listener).await);
        tokio::time::advance(Duration::from_secs(6)).await;
        pool.put(conn_to(&listener).await);
        assert_eq!(pool.evict_expired(Instant::now()), 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        // Only the older one is past 10 s.
        assert_eq!(pool.evict_expired(Instant::now()), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(pool.evict_expired(Instant::now()), 0);
    }
}
