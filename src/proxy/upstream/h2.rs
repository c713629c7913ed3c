//! The one multiplexed connection to an `http2 = true` upstream, shared by every call and
//! remade when it closes. One connection, not one per Host: on h2 the request's
//! authority is the client's Host, and a client could invent as many as it likes.

use std::sync::Arc;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::io::Connector;
use super::{ErrorChain, SendError};
use crate::proxy::body::Body;

pub struct H2Upstream {
    current: arc_swap::ArcSwapOption<SendRequest<Body>>,
    /// Held while connecting, so concurrent calls wait for one new connection.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Upstream {
    pub fn new() -> Self {
        Self {
            current: arc_swap::ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn open(&self) -> Option<SendRequest<Body>> {
        self.current
            .load()
            .as_deref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    async fn sender(
        &self,
        connector: &Connector,
        upstream: &Arc<str>,
    ) -> Result<SendRequest<Body>, SendError> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        // Boxed for the reason `send_h1` boxes its connect: a rare path with a large state.
        Box::pin(self.connect(connector, upstream)).await
    }

    async fn connect(
        &self,
        connector: &Connector,
        upstream: &Arc<str>,
    ) -> Result<SendRequest<Body>, SendError> {
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let io = connector.connect().await.map_err(SendError::Connect)?;
        // The server's SETTINGS (MAX_CONCURRENT_STREAMS among them) are honoured by h2:
        // a call past the limit waits in `ready` for a stream.
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Handshake)?;
        let name = upstream.clone();
        tracing::debug!(%upstream, peer = %connector, "upstream h2 connection opened");
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %name, error = %ErrorChain(&e), "upstream h2 connection closed");
            }
        });
        self.current.store(Some(Arc::new(send.clone())));
        Ok(send)
    }

    /// Sends on the shared connection. A call dropped mid-way resets its stream only.
    pub async fn send(
        &self,
        connector: &Connector,
        upstream: &Arc<str>,
        req: &mut Option<http::Request<Body>>,
    ) -> Result<http::Response<hyper::body::Incoming>, SendError> {
        let mut send = self.sender(connector, upstream).await?;
        send.ready().await.map_err(SendError::Reset)?;
        let req = req.take().expect("a request to send");
        send.send_request(req).await.map_err(SendError::Reset)
    }
}
