//! HTTP probe: `GET url`, pass on an expected status and, optionally, a body substring.
//! Driven by the scheduler, which bounds each run with the check's timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::StatusRanges;
use crate::telemetry::redact::{Secrets, error_chain, redact_url};

/// How much of the body `body_contains` looks at; a health page bigger than this is not one.
const MAX_BODY: usize = 64 * 1024;

const USER_AGENT: &str = concat!("opsgate-health/", env!("CARGO_PKG_VERSION"));

pub(crate) struct HttpProbe {
    /// Pooled, so a run reuses the previous run's keep-alive connection.
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    uri: Result<Uri, String>,
    expect_status: StatusRanges,
    body_contains: Option<String>,
    secrets: Secrets,
}

impl HttpProbe {
    pub fn new(
        url: &str,
        expect_status: StatusRanges,
        body_contains: Option<String>,
        timeout: Duration,
    ) -> Self {
        let secrets = Secrets::from_url(url);
        let uri = url
            .parse::<Uri>()
            .map_err(|e| format!("invalid url {}: {e}", redact_url(url)));
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .expect("ring supports the default protocol versions")
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        HttpProbe {
            client,
            uri,
            expect_status,
            body_contains,
            secrets,
        }
    }

    pub async fn run(&mut self) -> Result<(), String> {
        self.try_run().await.map_err(|e| self.secrets.scrub(&e))
    }

    async fn try_run(&self) -> Result<(), String> {
        let uri = self.uri.clone()?;
        let request = Request::get(uri)
            .header(header::USER_AGENT, USER_AGENT)
            .body(Empty::new())
            .map_err(|e| error_chain(&e))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status().as_u16();
        if !self.expect_status.contains(status) {
            return Err(format!(
                "unexpected status {status} (expected {})",
                self.expect_status
            ));
        }
        let Some(needle) = &self.body_contains else {
            return Ok(());
        };
        let mut body = response.into_body();
        let mut seen: Vec<u8> = Vec::new();
        while seen.len() < MAX_BODY {
            let Some(frame) = body.frame().await else {
                break;
            };
            let frame = frame.map_err(|e| error_chain(&e))?;
            if let Some(data) = frame.data_ref() {
                let take = data.len().min(MAX_BODY - seen.len());
                seen.extend_from_slice(&data[..take]);
                if contains(&seen, needle.as_bytes()) {
                    return Ok(());
                }
            }
        }
        Err(format!("body does not contain {needle:?}"))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
