//! PostgreSQL probe: `SELECT 1` (or the configured query) over one reused tokio-postgres connection.
//! Driven by the scheduler, which bounds each run with the check's timeout.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::telemetry::redact::{Secrets, error_chain};

const DEFAULT_QUERY: &str = "SELECT 1";

/// A live connection: the client and the task driving its socket.
struct Conn {
    client: Client,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A connection to a silent server would otherwise wait for its reply forever.
        self.driver.abort();
    }
}

pub(crate) struct PostgresProbe {
    /// Parsed once; `Err` holds a scrubbed message reported by every run.
    config: Result<Config, String>,
    query: String,
    /// Built only for `sslmode=require`: tokio-postgres would otherwise try TLS for `prefer`
    /// and fail certificate checks libpq would not make.
    tls: Option<MakeRustlsConnect>,
    conn: Option<Conn>,
    secrets: Secrets,
}

impl PostgresProbe {
    pub fn new(url: &str, query: Option<&str>) -> Self {
        let secrets = Secrets::from_url(url);
        let config = url
            .parse::<Config>()
            .map_err(|e| secrets.scrub(&format!("invalid postgres url: {}", error_chain(&e))));
        let tls = match &config {
            Ok(c) if c.get_ssl_mode() == SslMode::Require => Some(tls_connector()),
            _ => None,
        };
        PostgresProbe {
            config,
            query: query.unwrap_or(DEFAULT_QUERY).to_owned(),
            tls,
            conn: None,
            secrets,
        }
    }

    pub async fn run(&mut self) -> Result<(), String> {
        let result = self.try_run().await;
        if result.is_err() {
            self.reset();
        }
        result.map_err(|e| self.secrets.scrub(&e))
    }

    async fn try_run(&mut self) -> Result<(), String> {
        let conn = match self.conn.take() {
            Some(conn) if !conn.client.is_closed() => conn,
            _ => self.connect().await?,
        };
        let conn = self.conn.insert(conn);
        conn.client
            .simple_query(&self.query)
            .await
            .map(drop)
            .map_err(|e| error_chain(&e))
    }

    async fn connect(&self) -> Result<Conn, String> {
        let config = self.config.as_ref().map_err(Clone::clone)?;
        let chain = |e: tokio_postgres::Error| error_chain(&e);
        match &self.tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await.map_err(chain)?;
                let driver = tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(Conn { client, driver })
            }
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(chain)?;
                let driver = tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(Conn { client, driver })
            }
        }
    }

    /// Forgets the connection; the next run reconnects.
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// rustls with ring and the webpki roots; certificates are verified (stricter than libpq's
/// `require`, which only encrypts).
fn tls_connector() -> MakeRustlsConnect {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    MakeRustlsConnect::new(config)
}
