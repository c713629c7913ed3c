//! Pooled clients to upstreams (http and https over rustls), URI rewriting and the
//! per-attempt timeout. One client (and pool) per configured upstream.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::{
    CaptureConnection, Connected, Connection, capture_connection,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::Body;
use super::respond::ProxyError;
use crate::config::UpstreamSection;

pub type HttpClient = Client<FixedDst<HttpsConnector<HttpConnector>>, Body>;

type Stream = hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// Connects to the upstream's own address whatever the request URI says: with
/// `http2 = true` the URI's authority is the `:authority` to send (the client's Host),
/// not where to connect. TLS names (SNI, certificate check) stay the configured host.
/// Every connection it makes can be reset by the call that gave up on it ([`Abort`]).
#[derive(Clone)]
pub struct FixedDst<C> {
    inner: C,
    dst: Uri,
    /// HTTP/1.1: a connection closed in the middle of a request is reset (see `UpstreamIo`).
    reset_mid_request: bool,
}

impl<C> tower_service::Service<Uri> for FixedDst<C>
where
    C: tower_service::Service<Uri, Response = Stream>,
    C::Future: Send + 'static,
{
    type Response = UpstreamIo;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _requested: Uri) -> Self::Future {
        let connecting = self.inner.call(self.dst.clone());
        let reset_mid_request = self.reset_mid_request;
        Box::pin(async move {
            Ok(UpstreamIo {
                inner: connecting.await?,
                abort: Abort::default(),
                reset_mid_request,
                mid_request: false,
            })
        })
    }
}

/// Resets one upstream connection at once. A call that gave up (timeout, client gone)
/// uses it: a connection stuck writing a body the upstream never reads would otherwise
/// stay open until the upstream closes it, and a plain close would queue its FIN behind
/// the unsent body.
#[derive(Clone, Default)]
pub struct Abort(Arc<AbortInner>);

#[derive(Default)]
struct AbortInner {
    aborted: AtomicBool,
    waker: AtomicWaker,
}

impl Abort {
    pub fn abort(&self) {
        self.0.aborted.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

/// An upstream connection that its [`Abort`] can reset. On HTTP/1.1 it is also reset when
/// closed after writing with nothing read since (a call cut mid-request, e.g. its client's
/// body broke off): a FIN would wait behind the unsent body of an upstream that is not
/// reading, and the upstream would hold its socket until its own timeout.
pub struct UpstreamIo {
    inner: Stream,
    abort: Abort,
    reset_mid_request: bool,
    mid_request: bool,
}

impl UpstreamIo {
    /// After an abort: every operation fails, and the close that follows is a reset.
    fn aborted(&mut self, cx: &mut Context<'_>) -> bool {
        self.abort.0.waker.register(cx.waker());
        if !self.abort.0.aborted.load(Ordering::Acquire) {
            return false;
        }
        let _ = self.tcp().set_zero_linger();
        true
    }

    fn tcp(&self) -> &tokio::net::TcpStream {
        match &self.inner {
            hyper_rustls::MaybeHttpsStream::Http(s) => s.inner(),
            hyper_rustls::MaybeHttpsStream::Https(s) => s.inner().get_ref().0.inner().inner(),
        }
    }
}

fn aborted_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "call abandoned")
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.aborted(cx) {
            return Poll::Ready(Err(aborted_error()));
        }
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.mid_request = false;
        }
        r
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.aborted(cx) {
            return Poll::Ready(Err(aborted_error()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.mid_request |= n > 0;
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.aborted(cx) {
            return Poll::Ready(Err(aborted_error()));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.mid_request |= n > 0;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.aborted(cx) {
            return Poll::Ready(Err(aborted_error()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        // hyper may close the connection itself once the call is gone: still a reset.
        let cut = self.reset_mid_request && self.mid_request;
        if cut || self.abort.0.aborted.load(Ordering::Acquire) {
            let _ = self.tcp().set_zero_linger();
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.abort.clone())
    }
}

/// Resets the connection a call is using if the call ends without its response (timeout,
/// or the future dropped because the client went away). Disarmed by a response.
struct AbortOnDrop(Option<CaptureConnection>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.fire();
    }
}

impl AbortOnDrop {
    fn fire(&mut self) {
        let Some(capture) = self.0.take() else { return };
        let meta = capture.connection_metadata();
        if let Some(connected) = meta.as_ref() {
            let mut ext = http::Extensions::new();
            connected.get_extras(&mut ext);
            if let Some(abort) = ext.get::<Abort>() {
                abort.abort();
            }
        }
    }
}

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
    /// h2 connections carry many calls: one call giving up resets its stream, not them.
    http2: bool,
    pub timeout: Duration,
    client: HttpClient,
    /// `http2 = true`: calls go over this one shared connection instead of `client`.
    h2: Option<H2Upstream>,
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

/// Why an upstream's `url` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{0}")]
    Parse(http::uri::InvalidUri),
    #[error("no host")]
    NoHost,
    #[error("invalid host")]
    Host,
    #[error("invalid userinfo")]
    Userinfo,
    /// The authority is not a valid `Host` header value.
    #[error("{0}")]
    HostHeader(http::header::InvalidHeaderValue),
    /// The connector's fixed destination cannot be built from scheme and authority.
    #[error("{0}")]
    Destination(http::Error),
}

/// A TLS file an upstream names that cannot be used, with the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("ca_file {}: {error}", .path.display())]
    CaFile {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("ca_file {}: {error}", .path.display())]
    CaCert { path: PathBuf, error: rustls::Error },
    #[error("client_cert {}: {error}", .path.display())]
    ClientCert {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("client_key {}: {error}", .path.display())]
    ClientKey {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    /// The certificate and key do not make a usable client identity.
    #[error("{0}")]
    ClientAuth(rustls::Error),
}

impl Target {
    pub fn new(name: &str, s: &UpstreamSection) -> Result<Self, BuildError> {
        let uri: Uri = s
            .url
            .parse()
            .map_err(|e| BuildError::Url(name.into(), UrlError::Parse(e)))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let full_authority = uri
            .authority()
            .ok_or_else(|| BuildError::Url(name.into(), UrlError::NoHost))?;
        let (authority, authorization) =
            split_userinfo(full_authority).map_err(|e| BuildError::Url(name.into(), e))?;
        let base_path = match uri.path().trim_end_matches('/') {
            "" => None,
            p => Some(p.to_string()),
        };
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|e| BuildError::Url(name.into(), UrlError::HostHeader(e)))?;
        let (client, h2) = build_client(name, s, &scheme, &authority)?;
        Ok(Self {
            name: name.into(),
            scheme,
            authority,
            base_path,
            host_header,
            authorization,
            preserve_host: s.preserve_host,
            http2: s.http2,
            timeout: s.timeout.get(),
            client,
            h2,
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

    /// The upstream URI for an already-normalized path. `original` is the client's
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
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|_| ProxyError::BadPath)
    }

    /// One attempt: send and wait for response headers for at most `timeout`.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        if let Some(h2) = &self.h2 {
            // A timed-out or dropped call resets its stream; the connection stays.
            return match tokio::time::timeout(timeout, h2.send(req, &self.name)).await {
                Err(_) => Err(ProxyError::UpstreamTimeout),
                Ok(r) => r,
            };
        }
        // Only an HTTP/1.1 call with a body can leave its connection stuck mid-request: a
        // bodiless one that is dropped lets hyper close the connection on its own.
        let stuck_if_dropped = !self.http2 && !http_body::Body::is_end_stream(req.body());
        let capture = stuck_if_dropped.then(|| capture_connection(&mut req));
        let mut call = std::pin::pin!(tokio::time::timeout(timeout, self.client.request(req)));
        // Declared after `call`, so dropped before it: the abort is raised before hyper
        // learns the call is gone and closes the connection its own (FIN-queued) way.
        let mut guard = AbortOnDrop(capture);
        match call.as_mut().await {
            Err(_) => {
                guard.fire();
                Err(ProxyError::UpstreamTimeout)
            }
            Ok(Ok(resp)) => {
                guard.0 = None;
                Ok(resp)
            }
            Ok(Err(e)) if e.is_connect() => {
                let timed_out = is_timeout(&e);
                tracing::debug!(upstream = %self.name, timed_out, error = %ErrorChain(&e), "upstream connect failed");
                Err(ProxyError::UpstreamConnect)
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = %self.name, error = %ErrorChain(&e), "upstream request failed");
                Err(ProxyError::UpstreamReset)
            }
        }
    }
}

/// Splits `user:password@host:port` into the bare authority and a sensitive
/// `Authorization: Basic` value (userinfo is percent-decoded first, as URL parsers do).
fn split_userinfo(a: &Authority) -> Result<(Authority, Option<HeaderValue>), UrlError> {
    let Some((userinfo, host)) = a.as_str().rsplit_once('@') else {
        return Ok((a.clone(), None));
    };
    let bare: Authority = host.parse().map_err(|_| UrlError::Host)?;
    let decoded: Vec<u8> = percent_encoding::percent_decode(userinfo.as_bytes()).collect();
    use base64::Engine as _;
    let mut value = b"Basic ".to_vec();
    value.extend_from_slice(
        base64::engine::general_purpose::STANDARD
            .encode(decoded)
            .as_bytes(),
    );
    let mut value = HeaderValue::from_bytes(&value).map_err(|_| UrlError::Userinfo)?;
    value.set_sensitive(true);
    Ok((bare, Some(value)))
}

/// Whether a connect failed on the connect timeout: the connector reports it as an
/// `io::Error` of kind `TimedOut` somewhere down the error's source chain.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = err.source();
    }
    false
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

fn build_client(
    name: &str,
    s: &UpstreamSection,
    scheme: &Scheme,
    authority: &Authority,
) -> Result<(HttpClient, Option<H2Upstream>), BuildError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(s.connect_timeout.get()));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let tls = tls_config(name, s)?;
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let connector = if s.http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    let dst = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| BuildError::Url(name.into(), UrlError::Destination(e)))?;
    let connector = FixedDst {
        inner: connector,
        dst,
        reset_mid_request: !s.http2,
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_only(s.http2);
    let h2 = s.http2.then(|| H2Upstream::new(connector.clone()));
    Ok((b.build(connector), h2))
}

/// The one multiplexed connection to an `http2 = true` upstream, shared by every call and
/// remade when it closes. hyper-util's pool keys connections by the request's authority,
/// which on h2 is the client's Host: it would open a connection per Host value a client
/// cares to invent.
struct H2Upstream {
    connector: FixedDst<HttpsConnector<HttpConnector>>,
    current: arc_swap::ArcSwapOption<hyper::client::conn::http2::SendRequest<Body>>,
    /// Held while connecting, so concurrent calls wait for one new connection.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Upstream {
    fn new(connector: FixedDst<HttpsConnector<HttpConnector>>) -> Self {
        Self {
            connector,
            current: arc_swap::ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn open(&self) -> Option<hyper::client::conn::http2::SendRequest<Body>> {
        self.current
            .load()
            .as_deref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    async fn sender(
        &self,
        upstream: &str,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, ProxyError> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let mut connector = self.connector.clone();
        let connected = async {
            std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut connector, cx))
                .await?;
            tower_service::Service::call(&mut connector, self.connector.dst.clone()).await
        };
        let io = connected.await.map_err(|e| {
            tracing::debug!(upstream, error = %ErrorChain(&*e), "upstream connect failed");
            ProxyError::UpstreamConnect
        })?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| {
                tracing::debug!(upstream, error = %ErrorChain(&e), "upstream h2 handshake failed");
                ProxyError::UpstreamConnect
            })?;
        let name: Arc<str> = upstream.into();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %name, error = %ErrorChain(&e), "upstream h2 connection closed");
            }
        });
        self.current.store(Some(Arc::new(send.clone())));
        Ok(send)
    }

    async fn send(
        &self,
        req: Request<Body>,
        upstream: &str,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut send = self.sender(upstream).await?;
        let sent = async {
            send.ready().await?;
            send.send_request(req).await
        };
        sent.await.map_err(|e| {
            tracing::debug!(upstream, error = %ErrorChain(&e), "upstream request failed");
            ProxyError::UpstreamReset
        })
    }
}

/// rustls client config: webpki roots plus the optional CA file and client certificate.
pub fn tls_config(name: &str, s: &UpstreamSection) -> Result<rustls::ClientConfig, BuildError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let err = |e: TlsFileError| BuildError::Tls(name.into(), e);
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &s.ca_file {
        let pem = |error| {
            err(TlsFileError::CaFile {
                path: ca.clone(),
                error,
            })
        };
        for cert in CertificateDer::pem_file_iter(ca).map_err(pem)? {
            roots.add(cert.map_err(pem)?).map_err(|error| {
                err(TlsFileError::CaCert {
                    path: ca.clone(),
                    error,
                })
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (&s.client_cert, &s.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|error| {
                    err(TlsFileError::ClientCert {
                        path: cert.clone(),
                        error,
                    })
                })?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|error| {
                err(TlsFileError::ClientKey {
                    path: key.clone(),
                    error,
                })
            })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| err(TlsFileError::ClientAuth(e)))?
        }
        _ => builder.with_no_client_auth(),
    };
    // ALPN is left empty: hyper-rustls sets it from the enabled HTTP versions.
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_without_host_is_refused_by_kind() {
        let s = UpstreamSection {
            url: "/only/a/path".into(),
            ..Default::default()
        };
        let e = Target::new("app", &s).err().unwrap();
        assert!(matches!(&e, BuildError::Url(_, UrlError::NoHost)), "{e:?}");
        assert_eq!(e.to_string(), "upstream `app`: invalid url: no host");
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

    #[test]
    fn userinfo_leaves_the_authority_and_becomes_basic_auth() {
        let a: Authority = "us%65r:p%40ss@127.0.0.1:8080".parse().unwrap();
        let (bare, auth) = split_userinfo(&a).unwrap();
        assert_eq!(bare.as_str(), "127.0.0.1:8080");
        let auth = auth.unwrap();
        // base64("user:p@ss")
        assert_eq!(auth, "Basic dXNlcjpwQHNz");
        assert!(auth.is_sensitive());
        let plain: Authority = "example.com".parse().unwrap();
        assert_eq!(split_userinfo(&plain).unwrap(), (plain, None));
    }

    #[test]
    fn a_timeout_is_recognised_by_its_kind_not_its_text() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("tcp connect error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let timed_out = Outer(std::io::Error::new(std::io::ErrorKind::TimedOut, "elapsed"));
        assert!(is_timeout(&timed_out));
        // The text alone decides nothing: a refusal that says "timed out" is not a timeout.
        let refused = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "timed out",
        ));
        assert!(!is_timeout(&refused));
    }
}
