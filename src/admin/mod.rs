//! The admin listener: `/metrics` and `/_health/*` for now; the ops API lives here.
//! Loopback by default; never reachable through the proxy port.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::endpoints::Local;
use crate::proxy::listener::stopped;
use crate::proxy::respond::ProxyError;
use crate::proxy::{Body, Proxy};

pub async fn serve(
    listener: TcpListener,
    _proxy: Arc<Proxy>,
    local: Arc<Local>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let local = local.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let local = local.clone();
                async move { Ok::<_, Infallible>(route(&local, req)) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn route(local: &Local, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let rt_metrics = "/metrics";
    if path == rt_metrics {
        let (parts, _) = req.into_parts();
        return local.metrics_response(&parts);
    }
    if let Some(sub) = path.strip_prefix("/_health") {
        return local.health_response(req, sub);
    }
    ProxyError::NotFound.into_response()
}
