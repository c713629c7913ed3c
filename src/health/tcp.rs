//! TCP probe: a connect to `host:port`, closed at once.
//! Driven by the scheduler, which bounds each run with the check's timeout.

use tokio::net::TcpStream;

use crate::telemetry::redact::error_chain;

pub(crate) struct TcpProbe {
    address: String,
}

impl TcpProbe {
    pub fn new(address: &str) -> Self {
        TcpProbe {
            address: address.to_owned(),
        }
    }

    pub async fn run(&mut self) -> Result<(), String> {
        TcpStream::connect(&self.address)
            .await
            .map(drop)
            .map_err(|e| format!("connect {}: {}", self.address, error_chain(&e)))
    }
}
