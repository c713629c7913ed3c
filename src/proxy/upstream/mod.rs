//! The upstream side of a call: each configured upstream's address, its connections
//! (an HTTP/1.1 keep-alive pool or one shared h2 connection), URI rewriting and the
//! per-attempt timeout. Errors come out typed: connect, reset before headers, timeout.

mod h2;
mod io;
mod pool;
mod quiet;
mod tap;

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper_util::rt::TokioIo;

use self::h2::H2Upstream;
use self::io::{ConnectError, Connector};
pub use self::io::{TlsFileError, tls_config};
pub use self::pool::UpstreamBody;
use self::pool::{Conn, Pool, Slot};
use super::body::Body;
use super::replay::Replay;
use super::respond::ProxyError;
use crate::config::UpstreamSection;

/// An upstream's target and client. Built at config load; shared by every route to it.
pub struct Target {
    pub name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// Path prefix of the upstream URL without its trailing `/` (`None` for `/`).
    base_path: Option<String>,
    /// `Host` to send when `preserve_host = false`.
    pub host_header: HeaderValue,
    /// `Authorization: Basic` from the URL's userinfo, which is kept out of the URI (and so
    /// out of the pool key and every line a library may log about it).
    pub authorization: Option<HeaderValue>,
    pub preserve_host: bool,
    pub timeout: Duration,
    connector: Connector,
    transport: Transport,
}

enum Transport {
    /// Keep-alive connections, one call at a time each.
    Http1(Arc<Pool>),
    /// `http2 = true`: one multiplexed connection; a call giving up resets its stream only.
    Http2(H2Upstream),
}

/// Why an attempt got no response headers (the timeout aside).
#[derive(Debug)]
enum SendError {
    Connect(ConnectError),
    Handshake(hyper::Error),
    /// The connection failed or closed before the response headers.
    Reset(hyper::Error),
    /// No response headers by the attempt's deadline.
    Timeout,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("upstream `{0}`: invalid url: {1}")]
    Url(String, UrlError),
    #[error("upstream `{0}`: {1}")]
    Tls(String, TlsFileError),
    #[error("fleet rate limits: {0}")]
    Fleet(String),
    #[error("route `{0}` names unknown upstream `{1}`")]
    UnknownUpstream(String, String),
}

/// Why a valid upstream `url` still cannot be connected to (the config refuses the rest).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The host is not a name TLS can verify (SNI and the certificate check need one).
    #[error("invalid host")]
    Host,
}

impl Target {
    pub fn new(name: &str, s: &UpstreamSection) -> Result<Self, BuildError> {
        let url = s.url.get();
        let connector = Connector::new(name, s, &url.scheme, &url.authority)?;
        let transport = if s.http2 {
            Transport::Http2(H2Upstream::new())
        } else {
            Transport::Http1(Pool::new(name.into(), pool::IDLE_TIMEOUT, pool::MAX_IDLE))
        };
        Ok(Self {
            name: name.into(),
            scheme: url.scheme.clone(),
            authority: url.authority.clone(),
            base_path: url.base_path.clone(),
            host_header: url.host_header.clone(),
            authorization: url.authorization.clone(),
            preserve_host: s.preserve_host,
            timeout: s.timeout.get(),
            connector,
            transport,
        })
    }

    /// The URI for an HTTP/2 upstream: its authority becomes `:authority`, so it is the
    /// Host opsgate would send on HTTP/1.1 (`preserve_host` decides), and no separate
    /// `Host` may go with it (RFC 9113 §8.3.1). `host` is the client's Host.
    pub fn h2_uri(&self, uri: Uri, host: Option<&HeaderValue>) -> Uri {
        let authority = match host {
            Some(h) if self.preserve_host && !h.as_bytes().contains(&b'@') => {
                Authority::try_from(h.as_bytes()).ok()
            }
            _ => None,
        };
        let Some(authority) = authority else {
            return uri;
        };
        let mut parts = uri.clone().into_parts();
        parts.authority = Some(authority);
        Uri::from_parts(parts).unwrap_or(uri)
    }

    /// The upstream URI for an already-normalized path: origin-form on HTTP/1.1, absolute
    /// on h2 (where scheme and authority become pseudo-headers). `original` is the client's
    /// path and query: reused as is (a refcount, no copy) when the path did not change.
    pub fn uri_for(&self, path: &str, original: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        let query = original.and_then(|pq| pq.query());
        let pq = match (&self.base_path, original) {
            (None, Some(pq)) if pq.path() == path => pq.clone(),
            (base, _) => {
                let base = base.as_deref().unwrap_or("");
                let mut s = String::with_capacity(
                    base.len() + path.len() + query.map_or(0, |q| q.len() + 1),
                );
                s.push_str(base);
                s.push_str(path);
                if let Some(q) = query {
                    s.push('?');
                    s.push_str(q);
                }
                PathAndQuery::from_maybe_shared(bytes::Bytes::from(s))
                    .map_err(|_| ProxyError::BadPath)?
            }
        };
        if matches!(self.transport, Transport::Http1(_)) {
            return Ok(Uri::from(pq));
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|_| ProxyError::BadPath)
    }

    /// One attempt: send and wait for response headers until `deadline`. `req` is taken
    /// when a connection takes it. `keep`, when given and empty, keeps the head sent, for
    /// a retry.
    pub async fn send(
        &self,
        req: &mut Option<Request<Body>>,
        deadline: tokio::time::Instant,
        keep: Option<&mut Replay>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let keep = keep.filter(|k| k.is_empty());
        let sent = match &self.transport {
            Transport::Http1(pool) => self.send_h1(pool, req, deadline, keep).await,
            Transport::Http2(h2) => {
                if let (Some(keep), Some(r)) = (keep, req.as_ref()) {
                    keep.keep_lines(r.method(), r.uri(), r.version(), r.headers());
                }
                let sending = h2.send(&self.connector, &self.name, req);
                match tokio::time::timeout_at(deadline, sending).await {
                    Ok(r) => r.map(|resp| resp.map(|b| UpstreamBody::new(b, None))),
                    Err(_) => Err(SendError::Timeout),
                }
            }
        };
        let upstream = &self.name;
        match sent {
            Ok(resp) => Ok(resp),
            Err(SendError::Timeout) => Err(ProxyError::UpstreamTimeout),
            Err(SendError::Connect(e)) => {
                let timed_out = matches!(e, ConnectError::Timeout(_));
                tracing::debug!(%upstream, timed_out, error = %e, "upstream connect failed");
                Err(ProxyError::UpstreamConnect)
            }
            Err(SendError::Handshake(e)) => {
                tracing::debug!(%upstream, error = %ErrorChain(&e), "upstream handshake failed");
                Err(ProxyError::UpstreamConnect)
            }
            Err(SendError::Reset(e)) => {
                tracing::debug!(%upstream, error = %ErrorChain(&e), "upstream request failed");
                Err(ProxyError::UpstreamReset)
            }
        }
    }

    /// HTTP/1.1: an idle connection if one is open, else a new one. A request the idle
    /// connection never started (the app closed it between requests) goes again: on the
    /// next idle connection, then on a new one, never twice on a new one. The connection
    /// is driven here until the response headers, then by the response body. `keep` gets
    /// the head as the connection wrote it.
    async fn send_h1(
        &self,
        pool: &Arc<Pool>,
        req: &mut Option<Request<Body>>,
        deadline: tokio::time::Instant,
        mut keep: Option<&mut Replay>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let (mut conn, reused) = match pool.checkout() {
                Some(conn) => (conn, true),
                // Boxed: connecting (TCP, TLS, handshake) is a rare path whose state is
                // larger than the whole call's; inline, every future that awaits this one
                // would carry it and be copied at its size on every request.
                None => {
                    match tokio::time::timeout_at(deadline, Box::pin(self.connect_h1())).await {
                        Ok(conn) => (conn?, false),
                        Err(_) => return Err(SendError::Timeout),
                    }
                }
            };
            let Conn {
                sender,
                driver,
                quiet,
                deadline: timer,
                tap,
            } = &mut *conn;
            timer.as_mut().reset(deadline);
            if keep.is_some() {
                tap.arm();
            }
            let mut ended = false;
            let mut sending = std::pin::pin!(None);
            // The outcome is left here rather than returned through the polls: with the
            // request an error may hand back, it is a few hundred bytes, copied at every
            // level it is returned through.
            let mut sent = None;
            // A call dropped here (timeout, client gone) drops the connection with it:
            // closed, or reset if the request was cut (see `UpstreamIo`).
            std::future::poll_fn(|cx| {
                // Queued under the quiet waker too: the queue wakes the connection, polled
                // right after. A poll of its own, which is ready: a wake seen in a pending
                // poll makes the task poll again, and this one needs no second poll.
                if sending.is_none() {
                    let _ready = quiet.poll(cx, |_| {
                        let req = req.take().expect("a request to send");
                        sending.set(Some(sender.try_send_request(req)));
                        Poll::Ready(())
                    });
                }
                let done = quiet.poll(cx, |cx| {
                    if !ended && pool::poll_driver(driver, cx, &self.name).is_ready() {
                        ended = true;
                        // Dropped now: that answers the request still queued with its error.
                        *driver = pool::ended();
                    }
                    let waiting = sending.as_mut().as_pin_mut().expect("queued above");
                    waiting.poll(cx).map(|r| sent = Some(r))
                });
                // With the task's own waker: the timer's wake comes from outside this poll.
                if done.is_pending() && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                done
            })
            .await;
            // Whatever the outcome, what went out of the head is kept: a reset or a timeout
            // may be retried too (a head cut short is not; see `Replay`).
            if let Some(keep) = keep.as_deref_mut()
                && let Some(head) = tap.take()
            {
                keep.keep_written(head);
            }
            match sent {
                // Timed out: the connection is dropped with the call, as a cancelled call's is.
                None => return Err(SendError::Timeout),
                Some(Ok(resp)) => {
                    let slot = if ended {
                        None
                    } else if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        (*conn).detach(self.name.clone());
                        None
                    } else {
                        Some(Slot {
                            conn,
                            pool: pool.clone(),
                        })
                    };
                    // Taken apart and put together once: `Response::map` moves it twice.
                    let (parts, body) = resp.into_parts();
                    return Ok(Response::from_parts(parts, UpstreamBody::new(body, slot)));
                }
                Some(Err(mut e)) => match e.take_message() {
                    Some(unsent) if reused => *req = Some(unsent),
                    _ => return Err(SendError::Reset(e.into_error())),
                },
            }
        }
    }

    async fn connect_h1(&self) -> Result<Box<Conn>, SendError> {
        let io = self.connector.connect().await.map_err(SendError::Connect)?;
        let (io, tap) = io.tapped();
        let (sender, driver) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Handshake)?;
        let upstream = &self.name;
        tracing::debug!(%upstream, peer = %self.connector, "upstream connection opened");
        Ok(Conn::new(sender, driver, tap))
    }
}

/// Displays an error with its `source()` chain ("connect: Connection refused").
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_tls_cannot_verify_is_refused_by_kind() {
        let s = UpstreamSection {
            url: "https://a!b:8443".into(),
            ..Default::default()
        };
        assert!(s.url.is_valid(), "a valid URI to the config");
        let e = Target::new("app", &s).err().unwrap();
        assert!(matches!(&e, BuildError::Url(_, UrlError::Host)), "{e:?}");
        assert_eq!(e.to_string(), "upstream `app`: invalid url: invalid host");
    }

    #[test]
    fn unreadable_tls_file_names_upstream_and_file() {
        let s = UpstreamSection {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = tls_config("app", &s).unwrap_err();
        assert!(
            matches!(&e, BuildError::Tls(_, TlsFileError::CaFile { .. })),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("upstream `app`: ca_file /nonexistent/ca.pem: "),
            "{e}"
        );
    }
}
