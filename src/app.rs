//! Wires the rooms together and owns the process lifecycle: startup order, reload,
//! and the shutdown sequence. Every shared handle is built here and passed down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{self, Config, Overrides};
use crate::endpoints::Local;
use crate::proxy::listener::{self, Limits};
use crate::proxy::{Gates, Proxy, Runtime, Side};
use crate::shutdown::{Drain, Signal, Signals};
use crate::telemetry::MetricsRegistry;

/// How `run` ended, for `main` to map to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Startup(String),
    #[error("second signal: exiting at once")]
    SecondSignal,
}

/// Where the config came from, so reloads read the same file with the same overrides.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: Option<std::path::PathBuf>,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, config::ConfigError> {
        config::load(self.path.as_deref(), &self.overrides, &env_lookup)
    }
}

pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Everything that lives as long as the process.
pub struct App {
    pub source: ConfigSource,
    pub live: Arc<ArcSwap<Runtime>>,
    pub metrics: Arc<MetricsRegistry>,
    pub drain: Arc<Drain>,
    pub gates: Arc<Gates>,
}

/// Runs the daemon until a signal ends it. `config` is already validated.
pub async fn run(source: ConfigSource, config: Config) -> Result<(), RunError> {
    let config = Arc::new(config);
    let f = &config.file;
    let metrics = Arc::new(MetricsRegistry::new(&f.metrics.buckets));
    let runtime = Runtime::build(config.clone(), None, &metrics.http, &env_lookup)
        .map_err(|e| RunError::Startup(e.to_string()))?;
    let live = Arc::new(ArcSwap::from_pointee(runtime));
    let drain = Arc::new(Drain::default());
    let gates = Arc::new(Gates::default());

    let tls = match &f.proxy.tls {
        Some(t) => Some(Arc::new(ArcSwapOption::from_pointee(
            listener::tls_acceptor(&t.cert, &t.key).map_err(RunError::Startup)?,
        ))),
        None => None,
    };

    // Bind everything before serving anything: a busy port fails the start as a whole.
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { what, addr, source })
    };
    let proxy_listener = bind("proxy", f.proxy.listen).await?;
    let admin_listener = bind("admin", f.admin.listen).await?;
    let egress_listener = match f.egress.as_ref().and_then(|e| e.listen) {
        Some(addr) => Some(bind("egress", addr).await?),
        None => None,
    };
    let mut signals = Signals::install().map_err(|e| RunError::Startup(format!("signals: {e}")))?;

    let local = Arc::new(Local {
        metrics: metrics.clone(),
        drain: drain.clone(),
    });
    let proxy = Arc::new(Proxy {
        live: live.clone(),
        local: local.clone(),
        gates: gates.clone(),
    });
    let limits = Limits {
        max_header_bytes: f.proxy.max_header_bytes.0 as usize,
        header_read_timeout: f.proxy.header_read_timeout.get(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    tracing::info!(
        listen = %proxy_listener.local_addr().map_or(f.proxy.listen, |a| a),
        admin = %admin_listener.local_addr().map_or(f.admin.listen, |a| a),
        config = config.path.as_ref().map(|p| p.display().to_string()),
        version = env!("CARGO_PKG_VERSION"),
        "opsgate started"
    );
    servers.push(tokio::spawn(listener::serve(
        proxy_listener,
        proxy.clone(),
        Side::Ingress,
        limits,
        tls,
        stop_rx.clone(),
    )));
    if let Some(l) = egress_listener {
        servers.push(tokio::spawn(listener::serve(
            l,
            proxy.clone(),
            Side::Egress,
            limits,
            None,
            stop_rx.clone(),
        )));
    }
    let admin_proxy = Arc::new(Proxy {
        live: live.clone(),
        local: local.clone(),
        gates: gates.clone(),
    });
    let admin_task = tokio::spawn(crate::admin::serve(
        admin_listener,
        admin_proxy,
        local.clone(),
        stop_rx.clone(),
    ));

    let app = App {
        source,
        live,
        metrics,
        drain,
        gates,
    };

    // Lifecycle: serve until told to stop.
    loop {
        tokio::select! {
            sig = signals.next() => match sig {
                Signal::Reload => app.reload("signal"),
                Signal::Terminate => break,
            },
            _ = app.drain.started.notified() => break,
        }
    }
    app.drain.start();
    let rt = app.live.load_full();
    let delay = rt.config.file.proxy.shutdown_delay.get();
    let drain_timeout = rt.config.file.proxy.drain_timeout.get();
    tracing::info!(shutdown_delay = ?delay, drain_timeout = ?drain_timeout, "draining: readiness is now 503");

    // Keep accepting for shutdown_delay so endpoint removal can propagate; a second signal ends it.
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = signals.next() => return Err(RunError::SecondSignal),
    }
    let _ = stop_tx.send(true);
    let mut graceful = Vec::new();
    for s in servers {
        if let Ok(g) = s.await {
            graceful.push(g);
        }
    }
    let all_closed = futures_util::future::join_all(graceful.into_iter().map(|g| g.shutdown()));
    tokio::select! {
        r = tokio::time::timeout(drain_timeout, all_closed) => {
            if r.is_err() {
                let left = in_flight(&app.live.load());
                tracing::warn!(requests = left, "drain_timeout cut off {left} requests");
            }
        }
        _ = signals.next() => return Err(RunError::SecondSignal),
    }
    admin_task.abort();
    tracing::info!("opsgate stopped");
    Ok(())
}

/// Requests in flight across every route, read from the routes' own gauges.
fn in_flight(rt: &Runtime) -> i64 {
    use std::sync::atomic::Ordering;
    rt.ingress
        .iter()
        .chain(rt.egress.iter())
        .flat_map(|r| r.metrics.iter())
        .map(|m| m.active.load(Ordering::Relaxed))
        .sum()
}

impl App {
    /// Re-reads the config and swaps the runtime atomically; a bad file keeps the old one.
    pub fn reload(&self, trigger: &'static str) {
        let current = self.live.load_full();
        let outcome = self.source.load().map_err(|e| e.to_string()).and_then(|c| {
            Runtime::build(Arc::new(c), Some(&current), &self.metrics.http, &env_lookup)
                .map_err(|e| e.to_string())
        });
        match outcome {
            Ok(rt) => {
                self.live.store(Arc::new(rt));
                tracing::info!(trigger, "config reloaded");
            }
            Err(e) => {
                tracing::error!(trigger, error = %e, "config reload failed; keeping the running config")
            }
        }
    }
}

/// Polls a condition until it holds or the deadline passes (for startup holds).
pub async fn wait_until(
    mut cond: impl FnMut() -> bool,
    deadline: Duration,
    every: Duration,
) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}
