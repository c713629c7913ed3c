//! `opsgate probe URL`: a one-shot GET for Docker HEALTHCHECK in images without curl.
//! Redirects are not followed; 2xx and 3xx pass.

use std::time::Duration;

use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub async fn probe(url: &str, timeout: Duration) -> Result<u16, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("invalid url {url}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, "opsgate-probe")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(format!(
            "timed out after {}",
            crate::config::format_duration(timeout)
        )),
        Ok(Err(e)) => Err(crate::proxy::upstream::ErrorChain(&e).to_string()),
        Ok(Ok(resp)) => Ok(resp.status().as_u16()),
    }
}
