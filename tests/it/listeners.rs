//! The listeners and metric paths no other module covers: TLS with h2 by ALPN, https
//! upstreams with a private CA, the egress port's isolation, `on_proxy_port = false`
//! and `[[metrics.classes]]`. Certificates come from `openssl` at test time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use crate::support::metrics::{scrape, series};
use crate::support::opsgate::{Launch, Opsgate, get};
use crate::support::upstream::Upstream;
use crate::support::{eventually, loopback_addr};

/// A CA and a leaf for `localhost` / `127.0.0.1` signed by it, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pki(dir: &Path) -> Pki {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=opsgate test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
    Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("leaf.pem"),
        key: dir.join("leaf.key"),
    }
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

/// One GET over TLS offering `alpn`; returns the negotiated protocol, the HTTP version
/// and status of the answer, and its body.
async fn tls_get(
    addr: SocketAddr,
    ca: &Path,
    alpn: &[&[u8]],
    path: &str,
) -> std::io::Result<(Vec<u8>, Version, StatusCode, Bytes)> {
    crate::support::init_tls();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await?;
    let negotiated = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    let io = TokioIo::new(tls);
    let err = std::io::Error::other;
    let req = Request::get(format!("https://localhost{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = if negotiated == b"h2" {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(err)?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(err)?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(err)?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(err)?
    };
    let (version, status) = (resp.version(), resp.status());
    let body = resp.into_body().collect().await.map_err(err)?.to_bytes();
    Ok((negotiated, version, status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_speaks_h2_and_http1_by_alpn() {
    let app = Upstream::echo("app").await;
    let launch = Launch::new();
    let pki = pki(launch.dir());
    let config = format!(
        "[proxy]\nupstream = \"{}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        app.url(),
        pki.cert.display(),
        pki.key.display()
    );
    let og = launch.config(&config).loopback().spawn();
    // The harness waits over plain HTTP; this port only speaks TLS.
    let (addr, ca) = (og.addr(), &pki.ca);
    eventually(
        Duration::from_secs(10),
        "a TLS answer on /_health/live",
        move || async move { tls_get(addr, ca, &[b"h2"], "/_health/live").await.is_ok() },
    )
    .await;

    let (alpn, version, status, body) = tls_get(og.addr(), &pki.ca, &[b"h2", b"http/1.1"], "/x")
        .await
        .unwrap();
    assert_eq!(
        (alpn.as_slice(), version, status),
        (&b"h2"[..], Version::HTTP_2, StatusCode::OK)
    );
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["path"], "/x");
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https", "{echo}");

    let (alpn, version, status, _) = tls_get(og.addr(), &pki.ca, &[b"http/1.1"], "/x")
        .await
        .unwrap();
    assert_eq!(
        (alpn.as_slice(), version, status),
        (&b"http/1.1"[..], Version::HTTP_11, StatusCode::OK)
    );
    // A plain-HTTP client on the TLS port gets no HTTP answer, and the port keeps serving.
    assert!(
        crate::support::opsgate::raw_exchange(og.addr(), b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .map_or(true, |r| !r.starts_with(b"HTTP/"))
    );
    assert!(tls_get(og.addr(), &pki.ca, &[b"h2"], "/x").await.is_ok());
}

/// An https upstream answering `hello over tls` with the leaf certificate.
async fn tls_upstream(pki: &Pki) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    crate::support::init_tls();
    let certs: Vec<_> = CertificateDer::pem_file_iter(&pki.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"hello over tls"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_verified_against_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = tls_upstream(&pki).await;
    let with_ca = format!(
        "[upstreams.app]\nurl = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n[[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        upstream.port(),
        pki.ca.display()
    );
    let og = Opsgate::start(&with_ca).await;
    let a = get(&og.url("/x"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "hello over tls");

    // Only the public roots: the private CA is not trusted, so the upstream is unavailable.
    let without = format!(
        "[proxy]\nupstream = \"https://127.0.0.1:{}\"\n",
        upstream.port()
    );
    let og = Opsgate::start(&without).await;
    let a = get(&og.url("/x"), &[]).await;
    assert_eq!(a.status, 502, "{}", a.text());
    assert_eq!(a.json()["detail"], "upstream unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_port_serves_only_egress_routes() {
    let app = Upstream::echo("app").await;
    let payments = Upstream::echo("payments").await;
    let egress: SocketAddr = loopback_addr();
    let config = format!(
        "[upstreams.app]\nurl = \"{}\"\n[upstreams.payments]\nurl = \"{}\"\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"app\"\n\
         [egress]\nlisten = \"{egress}\"\n\
         [[egress.routes]]\nname = \"payments\"\nprefix = \"/payments\"\nstrip_prefix = true\nupstream = \"payments\"\n",
        app.url(),
        payments.url()
    );
    let og = Opsgate::start(&config).await;
    let e = |p: &str| format!("http://{egress}{p}");

    let a = get(&e("/payments/v1/charges?x=1"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["upstream"], "payments");
    assert_eq!(a.json()["path"], "/v1/charges");
    assert_eq!(a.json()["query"], "x=1");
    // Nothing but egress routes on the egress port: no health, metrics or ingress routes.
    for path in ["/_health/live", "/metrics", "/api/x"] {
        let a = get(&e(path), &[]).await;
        assert_eq!(
            (a.status, a.json()["detail"].clone()),
            (StatusCode::NOT_FOUND, Value::from("no route")),
            "{path}"
        );
    }
    // And egress routes are never reachable from the proxy port.
    let a = get(&og.url("/payments/v1/charges"), &[]).await;
    assert_eq!(a.status, 404);
    assert_eq!(get(&og.url("/api/x"), &[]).await.status, 200);
    assert_eq!(payments.hits(), 1);
}

#[tokio::test]
async fn metrics_path_is_proxied_when_not_on_the_proxy_port() {
    let app = Upstream::echo("app").await;
    let og = Opsgate::start(&format!(
        "[proxy]\nupstream = \"{}\"\n[metrics]\non_proxy_port = false\n",
        app.url()
    ))
    .await;
    let a = get(&og.url("/metrics"), &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["path"], "/metrics", "reached the app");
    assert_eq!(app.hits(), 1);
    let m = get(&og.admin_url("/metrics"), &[]).await;
    assert!(
        m.text().contains("# TYPE http_requests_total counter"),
        "the admin port still serves it"
    );
}

#[tokio::test]
async fn metrics_classes_label_requests_by_path() {
    let app = Upstream::echo("app").await;
    let config = format!(
        "[proxy]\nupstream = \"{}\"\n[[metrics.classes]]\nprefix = \"/admin\"\nclass = \"admin\"\n",
        app.url()
    );
    let og = Opsgate::start(&config).await;
    for path in ["/admin/users", "/adminx", "/shop"] {
        assert_eq!(get(&og.url(path), &[]).await.status, 200, "{path}");
    }
    let text = scrape(&og.url("/metrics")).await;
    let count = |class: &str| {
        series(
            &text,
            &format!(
                r#"http_requests_total{{method="GET",route="default",class="{class}",status="200"}}"#
            ),
        )
    };
    // `/adminx` is not under `/admin`: segment boundaries, like every other prefix.
    assert_eq!(count("admin"), Some(1.0), "{text}");
    assert_eq!(count("public"), Some(2.0), "{text}");
}

#[tokio::test]
async fn a_get_under_a_retry_policy_reaches_the_upstream_without_body_headers() {
    let app = Upstream::echo("app").await;
    let config = format!(
        "[upstreams.app]\nurl = \"{}\"\n[upstreams.app.retry]\nattempts = 3\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        app.url()
    );
    let og = Opsgate::start(&config).await;
    let echo = get(&og.url("/x"), &[]).await.json();
    // The replay buffer must not turn "no body" into "a body of 0 bytes".
    assert!(echo["headers"].get("content-length").is_none(), "{echo}");
    assert!(echo["headers"].get("transfer-encoding").is_none(), "{echo}");
    assert_eq!(echo["body_bytes"], 0);
}
