//! Redis probe: `PING` over one reused fred client (`rediss://` over rustls).
//! Driven by the scheduler, which bounds each run with the check's timeout.
//!
//! fred's own reconnect policy is off: a dead server would otherwise be redialled in the
//! background, with a log line per attempt, between and during runs. Instead each run dials at
//! most once, bounded by the check's timeout, and a broken client is dropped and rebuilt by the
//! next run.

use std::time::Duration;

use fred::prelude::{Builder, Client, ClientLike, Config};
use fred::types::ConnectHandle;

use crate::telemetry::redact::{Secrets, error_chain, fred_error_text};

struct Conn {
    client: Client,
    /// The task driving the client's connection.
    driver: ConnectHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The client is never used again; stop its routing task instead of waiting on a QUIT.
        self.driver.abort();
    }
}

pub(crate) struct RedisProbe {
    config: Result<Config, String>,
    timeout: Duration,
    conn: Option<Conn>,
    secrets: Secrets,
}

impl RedisProbe {
    pub fn new(url: &str, timeout: Duration) -> Self {
        let secrets = Secrets::from_url(url);
        let config = Config::from_url(url)
            .map_err(|e| secrets.scrub(&format!("invalid redis url: {}", error_chain(&e))));
        RedisProbe {
            config,
            timeout,
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
            Some(conn) if conn.client.is_connected() => conn,
            _ => self.connect().await?,
        };
        let conn = self.conn.insert(conn);
        conn.client
            .ping::<String>(None)
            .await
            .map(drop)
            .map_err(|e| fred_error_text(&e))
    }

    async fn connect(&self) -> Result<Conn, String> {
        let config = self.config.as_ref().map_err(Clone::clone)?;
        let timeout = self.timeout;
        let client = Builder::from_config(config.clone())
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                // One attempt per command: a retry belongs to the next run.
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .build()
            .map_err(|e| error_chain(&e))?;
        // No reconnect policy is set: `init` dials once and reports the error.
        let driver = client.init().await.map_err(|e| fred_error_text(&e))?;
        Ok(Conn { client, driver })
    }

    /// Forgets the client; the next run dials again.
    pub fn reset(&mut self) {
        self.conn = None;
    }
}
