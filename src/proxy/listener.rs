//! Accepting connections: TCP (and optionally TLS), HTTP/1.1 and h2 on one port, limits
//! against slow or oversized clients, and graceful close of every connection on shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::pipeline::{Conn, Proxy, Side};

/// hyper's read buffer cannot be smaller than this; `max_header_bytes` below it is raised.
pub const MIN_HEADER_BUF: usize = 8 * 1024;

/// Connection limits, from `[proxy]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

pub fn http_builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BUF))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
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
        let conn_info = Conn {
            peer,
            tls: tls_acceptor.is_some(),
            side,
        };
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, conn_info).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let result = match tls_acceptor {
                None => {
                    // hyper's header timer starts only after the h1/h2 sniff, which waits for
                    // the first byte without a deadline: a client that sends nothing would
                    // hold its socket forever. One peek bounds that.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return,
                        Err(_) => {
                            tracing::debug!(%peer, "client sent nothing before header_read_timeout");
                            return;
                        }
                    }
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                            .await;
                    let stream = match handshake {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "tls handshake timed out");
                            return;
                        }
                    };
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                // Client-side trouble (reset, malformed request, header timeout): not ours to alarm about.
                tracing::debug!(%peer, error = %e, "connection closed with error");
            }
        });
    }
    graceful
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Loads a TLS acceptor (h2 and http/1.1 by ALPN) from PEM files.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls cert {}: {e}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
