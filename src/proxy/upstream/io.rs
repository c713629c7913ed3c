//! Opening upstream connections: TCP (connect timeout, nodelay, keepalive), rustls with
//! ALPN for https, and the connection wrapper that resets a connection cut mid-request
//! and, on HTTP/1.1, shows what it writes to a [`HeadTap`].

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::BuildError;
use super::tap::HeadTap;
use crate::config::UpstreamSection;

/// How long an idle pooled connection's socket waits before the kernel probes its peer.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why no connection could be opened. Typed, so a timeout is known by its kind.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("resolve {0}: {1}")]
    Resolve(Arc<str>, io::Error),
    #[error("connect: {0}")]
    Tcp(io::Error),
    #[error("tls handshake: {0}")]
    Tls(io::Error),
}

/// Opens connections to one upstream's configured address, whatever Host or
/// `:authority` a request carries. TLS names (SNI, certificate check) are the
/// configured host.
pub struct Connector {
    host: Arc<str>,
    port: u16,
    /// The address when the URL names an IP: no resolver on the connect path.
    addr: Option<SocketAddr>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    /// HTTP/1.1: a connection closed in the middle of a request is reset (see [`UpstreamIo`]).
    reset_mid_request: bool,
}

impl Connector {
    pub fn new(
        name: &str,
        s: &UpstreamSection,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Self, BuildError> {
        let https = *scheme == Scheme::HTTPS;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        // `[::1]` in a URL is `::1` to the resolver and to rustls.
        let host: Arc<str> = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .into();
        let addr = host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, port));
        let tls = if https {
            let mut config = tls_config(name, s)?;
            config.alpn_protocols = vec![if s.http2 {
                b"h2".to_vec()
            } else {
                b"http/1.1".to_vec()
            }];
            let server_name = ServerName::try_from(host.to_string())
                .map_err(|_| BuildError::Url(name.into(), super::UrlError::Host))?;
            Some((TlsConnector::from(Arc::new(config)), server_name))
        } else {
            None
        };
        Ok(Self {
            host,
            port,
            addr,
            tls,
            connect_timeout: s.connect_timeout.get(),
            reset_mid_request: !s.http2,
        })
    }

    /// A new connection, TCP and TLS both under the connect timeout.
    pub async fn connect(&self) -> Result<UpstreamIo, ConnectError> {
        let connected = async {
            let tcp = self.tcp().await?;
            let _ = tcp.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
            let stream = match &self.tls {
                None => Stream::Plain(tcp),
                Some((connector, name)) => Stream::Tls(Box::new(
                    connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(ConnectError::Tls)?,
                )),
            };
            Ok(stream)
        };
        let inner = tokio::time::timeout(self.connect_timeout, connected)
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        Ok(UpstreamIo {
            inner,
            reset_mid_request: self.reset_mid_request,
            mid_request: false,
            tap: None,
        })
    }

    async fn tcp(&self) -> Result<TcpStream, ConnectError> {
        if let Some(addr) = self.addr {
            return TcpStream::connect(addr).await.map_err(ConnectError::Tcp);
        }
        let addrs = tokio::net::lookup_host((&*self.host, self.port))
            .await
            .map_err(|e| ConnectError::Resolve(self.host.clone(), e))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => ConnectError::Tcp(e),
            None => ConnectError::Resolve(
                self.host.clone(),
                io::Error::new(io::ErrorKind::NotFound, "no address"),
            ),
        })
    }
}

/// Where connections go, as `host:port`: never the URL's userinfo, which the connector
/// does not have.
impl std::fmt::Display for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{addr}"),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

// The transport in use answers each call. A match rather than a `dyn` stream: the calls stay
// direct (an indirect one cost about 5 instructions a poll, 6 polls a proxied request).
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An upstream connection. On HTTP/1.1 it is reset when closed after writing with nothing
/// read since (a call cut mid-request: timed out, its client gone, or its client's body
/// broken off): a FIN would wait behind the unsent body of an upstream that is not
/// reading, and the upstream would hold its socket until its own timeout.
pub struct UpstreamIo {
    inner: Stream,
    reset_mid_request: bool,
    mid_request: bool,
    /// HTTP/1.1: where a request head is kept for a retry (see [`HeadTap`]).
    tap: Option<Arc<HeadTap>>,
}

impl UpstreamIo {
    #[cfg(test)]
    pub fn plain(tcp: TcpStream) -> Self {
        Self {
            inner: Stream::Plain(tcp),
            reset_mid_request: true,
            mid_request: false,
            tap: None,
        }
    }

    /// This connection, recording what it writes to a tap the caller keeps.
    pub fn tapped(mut self) -> (Self, Arc<HeadTap>) {
        let tap = Arc::new(HeadTap::default());
        self.tap = Some(tap.clone());
        (self, tap)
    }

    /// A write of `pieces`: bytes written and none read since is a connection
    /// mid-request, and the tap, when armed, keeps what went out.
    fn poll_written<'a>(
        &mut self,
        cx: &mut Context<'_>,
        pieces: impl IntoIterator<Item = &'a [u8]>,
        op: impl FnOnce(Pin<&mut Stream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let r = op(Pin::new(&mut self.inner), cx);
        if let Poll::Ready(Ok(n)) = r {
            self.mid_request |= n > 0;
            if let Some(tap) = &self.tap {
                tap.record(pieces, n);
            }
        }
        r
    }

    fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.mid_request = false;
        }
        r
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_written(cx, [buf], |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_written(cx, bufs.iter().map(|b| &**b), |s, cx| {
                s.poll_write_vectored(cx, bufs)
            })
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        if self.reset_mid_request && self.mid_request {
            let _ = self.tcp().set_zero_linger();
        }
    }
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

/// rustls client config: webpki roots plus the optional CA file and client certificate.
/// ALPN is left to the caller.
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
    Ok(config)
}
