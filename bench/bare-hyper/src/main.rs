//! A bare reverse proxy: hyper 1's HTTP/1 server, hyper-util's legacy client
//! with its keep-alive pool, and nothing else. It is the floor a hyper proxy
//! starts from, measured beside opsgate, nginx and HAProxy.
//!
//! Usage: bare-hyper LISTEN_ADDR UPSTREAM_ADDR  (e.g. 127.0.0.1:8080 127.0.0.1:9000)
//! With `-` as UPSTREAM_ADDR every request is answered 503 with an empty body: the
//! floor for a rejection answered by a hyper server.
//! The runtime is tokio's current-thread one, as opsgate's with one worker;
//! BARE_RUNTIME=multi picks the multi-threaded one (TOKIO_WORKER_THREADS sizes it).
//! SIGTERM ends it through `main`'s return, so a build instrumented for a profile
//! (bench/bare-hyper/pgo.sh) writes its counts.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare-hyper LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR");
    let multi = std::env::var("BARE_RUNTIME").is_ok_and(|v| v == "multi");
    let mut builder = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder.enable_all().build().expect("runtime");
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            () = serve(listen, upstream) => {}
            _ = term.recv() => {}
        }
    });
}

async fn serve(listen: SocketAddr, upstream: String) {
    let listener = TcpListener::bind(listen).await.expect("bind");
    eprintln!("bare-hyper: listening on {listen}, upstream {upstream}");
    if upstream == "-" {
        loop {
            let stream = accept(&listener).await;
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(status(StatusCode::SERVICE_UNAVAILABLE))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let upstream: &'static str = Box::leak(upstream.into_boxed_str());
    loop {
        let stream = accept(&listener).await;
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(client.clone(), upstream, req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The next connection, with Nagle off. An accept error (EMFILE) backs off briefly
/// instead of spinning.
async fn accept(listener: &TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri = Uri::builder()
        .scheme("http")
        .authority(upstream)
        .path_and_query(path)
        .build();
    let Ok(uri) = uri else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    *req.uri_mut() = uri;
    match client.request(req).await {
        Ok(resp) => Ok(resp.map(BodyExt::boxed)),
        Err(_) => Ok(status(StatusCode::BAD_GATEWAY)),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = code;
    resp
}
