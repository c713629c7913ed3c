//! Wires the rooms together and owns the process lifecycle: startup order, reload,
//! and the shutdown sequence. Every shared handle is built here and passed down.

pub mod build;
pub mod reload;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::{Admin, ReloadStatus};
use crate::config::{self, Config, ConfigFile, Overrides};
use crate::endpoints::{self, Local};
use crate::health::Health;
use crate::ops::{FleetControl, Maintenance};
use crate::proxy::listener::{self, Limits};
use crate::proxy::runtime::Deps;
use crate::proxy::{Gates, Proxy, Runtime, Side};
use crate::shutdown::{Drain, Signal, Signals};
use crate::telemetry::MetricsRegistry;
use crate::telemetry::access::AccessLog;
use crate::telemetry::events::Events;

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
    #[error("{0}")]
    Page(#[from] build::PageError),
    #[error("{0}")]
    Tls(#[from] listener::TlsError),
    #[error("{0}")]
    Runtime(#[from] crate::proxy::upstream::BuildError),
    #[error("{0}")]
    Fleet(#[from] crate::ops::Error),
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

/// What reloads, signals and shutdown act on; each room gets only its own handles from it.
pub struct Shared {
    pub source: ConfigSource,
    /// The proxy's snapshot; swapped whole on reload.
    pub live: Arc<ArcSwap<Runtime>>,
    pub metrics: Arc<MetricsRegistry>,
    pub drain: Arc<Drain>,
    pub gates: Arc<Gates>,
    pub health: Health,
    pub maintenance: Maintenance,
    /// Replaced when `[control]` changes on reload; held only to swap or read status.
    pub fleet: Arc<Mutex<Option<FleetControl>>>,
    pub events: Arc<Events>,
    /// Last load/reload outcome, for `/_ops/status`.
    pub last_reload: ArcSwap<ReloadStatus>,
    /// Serializes reloads (watcher, SIGHUP and admin may fire together).
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Bound addresses, to warn when a reload asks for other ones.
    pub bound: Bound,
    pub tls: Option<Arc<ArcSwapOption<tokio_rustls::TlsAcceptor>>>,
    pub access_log: Arc<AccessLog>,
}

#[derive(Debug, Clone)]
pub struct Bound {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub egress: Option<SocketAddr>,
}

/// The sockets opsgate serves on. `run` binds them from the config; an embedding binds
/// its own (tests: port 0, so no port is picked and then lost to another process).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    pub egress: Option<TcpListener>,
}

impl Listeners {
    /// Binds every address of the config before anything serves: a busy port fails the
    /// start as a whole.
    pub async fn bind(f: &ConfigFile) -> Result<Self, RunError> {
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { what, addr, source })
        };
        Ok(Listeners {
            proxy: bind("proxy", f.proxy.listen).await?,
            admin: bind("admin", f.admin.listen).await?,
            egress: match f.egress.as_ref().and_then(|e| e.listen) {
                Some(addr) => Some(bind("egress", addr).await?),
                None => None,
            },
        })
    }
}

/// Where the requests to reload and to terminate come from.
pub enum Control {
    /// SIGHUP, SIGTERM and SIGINT: the daemon.
    Signals(Signals),
    /// Sent by whoever embeds opsgate; a closed channel asks for nothing more.
    Channel(mpsc::UnboundedReceiver<Signal>),
}

impl Control {
    /// A [`Control::Channel`] and its sender.
    pub fn channel() -> (mpsc::UnboundedSender<Signal>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Control::Channel(rx))
    }

    async fn next(&mut self) -> Signal {
        match self {
            Control::Signals(s) => s.next().await,
            Control::Channel(rx) => match rx.recv().await {
                Some(signal) => signal,
                None => std::future::pending().await,
            },
        }
    }

    /// The next `Terminate`; reloads meanwhile are ignored (no reload while stopping).
    async fn terminate(&mut self) {
        while self.next().await != Signal::Terminate {}
    }
}

/// Runs the daemon until a signal ends it. `config` is already validated.
pub async fn run(
    source: ConfigSource,
    config: Config,
    access_log: AccessLog,
) -> Result<(), RunError> {
    let rooms = Rooms::build(source, config, access_log)?;
    let listeners = Listeners::bind(&rooms.config.file).await?;
    let signals = Signals::install().map_err(|e| RunError::Startup(format!("signals: {e}")))?;
    rooms.serve(listeners, Control::Signals(signals)).await
}

/// Runs opsgate on listeners bound by the caller until `control` asks it to terminate;
/// the shutdown sequence is `run`'s.
pub async fn run_on(
    source: ConfigSource,
    config: Config,
    access_log: AccessLog,
    listeners: Listeners,
    control: Control,
) -> Result<(), RunError> {
    Rooms::build(source, config, access_log)?
        .serve(listeners, control)
        .await
}

/// What is built from the config before any socket is bound, so a config that cannot run
/// (maintenance page, TLS files, fleet URL) fails the start with nothing bound.
struct Rooms {
    source: ConfigSource,
    config: Arc<Config>,
    access_log: Arc<AccessLog>,
    metrics: Arc<MetricsRegistry>,
    maintenance: Maintenance,
    health: Health,
    events: Arc<Events>,
    live: Arc<ArcSwap<Runtime>>,
    tls: Option<Arc<ArcSwapOption<tokio_rustls::TlsAcceptor>>>,
}

impl Rooms {
    fn build(
        source: ConfigSource,
        config: Config,
        access_log: AccessLog,
    ) -> Result<Self, RunError> {
        let access_log = Arc::new(access_log);
        let config = Arc::new(config);
        let f = &config.file;
        let mut registry = MetricsRegistry::new(&f.metrics.buckets);

        let maintenance_settings = build::maintenance_settings(&config, &env_lookup)?;
        let maintenance = Maintenance::new(maintenance_settings.clone());
        let health = Health::new();
        health.register(registry.registry_mut());
        let metrics = Arc::new(registry);
        let events = Arc::new(Events::default());
        let runtime = Runtime::build(
            config.clone(),
            None,
            Deps {
                http: &metrics.http,
                ops: &metrics.ops,
                resilience: &metrics.resilience,
                on_breaker: reload::breaker_observer(events.clone()),
                access_log: access_log.clone(),
                maintenance: Arc::new(maintenance_settings),
                env: &env_lookup,
            },
        )?;
        let live = Arc::new(ArcSwap::from_pointee(runtime));

        let tls = match &f.proxy.tls {
            Some(t) => Some(Arc::new(ArcSwapOption::from_pointee(
                listener::tls_acceptor(&t.cert, &t.key)?,
            ))),
            None => None,
        };
        Ok(Rooms {
            source,
            config,
            access_log,
            metrics,
            maintenance,
            health,
            events,
            live,
            tls,
        })
    }

    async fn serve(self, listeners: Listeners, mut signals: Control) -> Result<(), RunError> {
        let Rooms {
            source,
            config,
            access_log,
            metrics,
            maintenance,
            health,
            events,
            live,
            tls,
        } = self;
        let f = &config.file;
        let Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
            egress: egress_listener,
        } = listeners;

        let specs = config.checks.clone();
        let wait_for_critical = f.health.wait_for_critical.get();
        let gates = Arc::new(Gates {
            starting: (!wait_for_critical.is_zero() && specs.iter().any(|s| s.critical)).into(),
            maintenance: maintenance.clone(),
        });
        health.replace(specs);

        let fleet = match (&f.control.redis_url, &f.control.key) {
            (Some(url), Some(key)) => Some(FleetControl::start(
                url,
                key,
                f.control.poll_interval.get(),
                maintenance.clone(),
            )?),
            _ => None,
        };

        let bound = Bound {
            proxy: proxy_listener.local_addr().unwrap_or(f.proxy.listen),
            admin: admin_listener.local_addr().unwrap_or(f.admin.listen),
            egress: egress_listener.as_ref().and_then(|l| l.local_addr().ok()),
        };
        let session_secret = random_secret().map_err(RunError::Startup)?;
        let started = Instant::now();
        let shared = Arc::new(Shared {
            source,
            live: live.clone(),
            metrics: metrics.clone(),
            drain: Arc::new(Drain::default()),
            gates: gates.clone(),
            health: health.clone(),
            maintenance: maintenance.clone(),
            fleet: Arc::new(Mutex::new(fleet)),
            events,
            last_reload: ArcSwap::from_pointee(ReloadStatus::initial()),
            reload_lock: tokio::sync::Mutex::new(()),
            bound: bound.clone(),
            tls: tls.clone(),
            access_log,
        });
        metrics.ops.last_reload_success.set(unix_now());
        metrics
            .ops
            .maintenance_mode
            .set(i64::from(maintenance.is_on()));
        reload::spawn_event_forwarders(&shared);
        reload::spawn_recover_on_check(&shared);
        if gates.starting.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::spawn(hold_until_critical(shared.clone(), wait_for_critical));
        }
        let watcher = reload::watch_config(shared.clone());

        let local = Arc::new(Local::new(endpoints::Handles {
            live: live.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            maintenance: maintenance.clone(),
            drain: shared.drain.clone(),
        }));
        let admin = Arc::new(Admin {
            live: live.clone(),
            local: local.clone(),
            health: health.clone(),
            maintenance: maintenance.clone(),
            fleet: shared.fleet.clone(),
            drain: shared.drain.clone(),
            events: shared.events.clone(),
            reload: reload::AdminReload(shared.clone()),
            started,
            session_secret,
        });
        let proxy = Arc::new(Proxy {
            live: live.clone(),
            local: local.clone(),
            gates: gates.clone(),
            resilience: metrics.resilience.clone(),
        });
        let limits = Limits {
            max_header_bytes: f.proxy.max_header_bytes.0 as usize,
            header_read_timeout: f.proxy.header_read_timeout.get(),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut servers = Vec::new();
        let rt = tokio::runtime::Handle::current();
        let runtime = match rt.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread",
            _ => "multi-thread",
        };
        tracing::info!(
            listen = %bound.proxy,
            admin = %bound.admin,
            runtime,
            workers = rt.metrics().num_workers(),
            egress = bound.egress.map(|a| a.to_string()),
            config = shared.source.path.as_ref().map(|p| p.display().to_string()),
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
        let admin_task = tokio::spawn(crate::admin::serve(
            admin_listener,
            admin,
            limits,
            stop_rx.clone(),
        ));

        // Serve until a terminating signal. `POST /_ops/drain` only turns readiness off:
        // the pod keeps serving until its orchestrator sends SIGTERM.
        while signals.next().await == Signal::Reload {
            shared.reload("signal").await;
        }
        if shared.drain.start() {
            shared
                .events
                .emit("drain", serde_json::json!({"phase": "started"}));
        }
        let rt = shared.live.load_full();
        let delay = rt.config.file.proxy.shutdown_delay.get();
        let drain_timeout = rt.config.file.proxy.drain_timeout.get();
        tracing::info!(
            shutdown_delay = %config::format_duration(delay),
            drain_timeout = %config::format_duration(drain_timeout),
            "draining: readiness is now 503"
        );

        // Keep accepting for shutdown_delay so endpoint removal can propagate; a second signal ends it.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = signals.terminate() => return Err(RunError::SecondSignal),
        }
        let _ = stop_tx.send(true);
        drop(watcher);
        let mut graceful = Vec::new();
        for s in servers {
            if let Ok(g) = s.await {
                graceful.push(g);
            }
        }
        tracing::info!(
            in_flight = in_flight(&shared.live.load()),
            "listeners closed: draining open connections"
        );
        let all_closed = futures_util::future::join_all(graceful.into_iter().map(|g| g.shutdown()));
        tokio::select! {
            r = tokio::time::timeout(drain_timeout, all_closed) => {
                if r.is_err() {
                    let left = in_flight(&shared.live.load());
                    tracing::warn!(requests = left, "drain_timeout cut off {left} requests");
                }
            }
            _ = signals.terminate() => return Err(RunError::SecondSignal),
        }
        shared
            .events
            .emit("drain", serde_json::json!({"phase": "stopped"}));
        admin_task.abort();
        health.shutdown();
        tracing::info!("opsgate stopped");
        Ok(())
    }
}

/// Holds proxied traffic (503 `starting`) until critical checks pass or `limit` elapses.
async fn hold_until_critical(shared: Arc<Shared>, limit: std::time::Duration) {
    let mut changes = shared.health.subscribe();
    let passed = tokio::time::timeout(limit, async {
        loop {
            if shared.health.snapshot().startup_status().is_passing() {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok();
    shared
        .gates
        .starting
        .store(false, std::sync::atomic::Ordering::Relaxed);
    if passed {
        tracing::info!("critical checks pass: proxying");
    } else {
        tracing::warn!(
            wait_for_critical = %config::format_duration(limit),
            "critical checks still failing after wait_for_critical: proxying anyway"
        );
    }
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

fn random_secret() -> Result<[u8; 32], String> {
    use ring::rand::SecureRandom;
    let mut secret = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "no system randomness for the admin session secret".to_string())?;
    Ok(secret)
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
