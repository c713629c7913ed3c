//! The one reload path (SIGHUP, file watcher, admin API) with a typed outcome; a bad file
//! keeps the running config. Also forwards rooms' changes to events and gauges.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::{Shared, build, env_lookup, unix_now};
use crate::admin::{ReloadOutcome, ReloadStatus};
use crate::config::{Config, ConfigError};
use crate::ops::FleetControl;
use crate::proxy::Runtime;
use crate::proxy::breaker::Transition;
use crate::proxy::runtime::Deps;
use crate::telemetry::events::now_rfc3339;
use crate::telemetry::metrics::ResultLabel;

impl Shared {
    /// Re-reads the config and swaps everything atomically, or keeps the old config.
    pub async fn reload(&self, trigger: &'static str) -> ReloadOutcome {
        let _one_at_a_time = self.reload_lock.lock().await;
        let outcome = match self.try_reload() {
            Ok(warnings) => {
                for w in &warnings {
                    tracing::warn!(trigger, "{w}");
                }
                tracing::info!(trigger, "config reloaded");
                self.metrics
                    .ops
                    .config_reloads
                    .get_or_create(&ResultLabel { result: "success" })
                    .inc();
                self.metrics.ops.last_reload_success.set(unix_now());
                ReloadOutcome::Applied { warnings }
            }
            Err(error) => {
                let error = error.to_string();
                tracing::error!(trigger, error = %error, "config reload failed; keeping the running config");
                self.metrics
                    .ops
                    .config_reloads
                    .get_or_create(&ResultLabel { result: "failure" })
                    .inc();
                ReloadOutcome::Failed(error)
            }
        };
        let status = match &outcome {
            ReloadOutcome::Applied { .. } => ReloadStatus {
                result: "success",
                at: now_rfc3339(),
                error: None,
            },
            ReloadOutcome::Failed(e) => ReloadStatus {
                result: "failure",
                at: now_rfc3339(),
                error: Some(e.clone()),
            },
        };
        self.events.emit(
            "reload",
            serde_json::json!({"result": status.result, "error": status.error}),
        );
        self.last_reload.store(Arc::new(status));
        outcome
    }

    fn try_reload(&self) -> Result<Vec<String>, ReloadError> {
        let current = self.live.load_full();
        let config = self.source.load()?;
        if config.path.is_some() && config.sha256 == EMPTY_SHA256 {
            // Caught between a writer's truncate and its write: taken as is, it would
            // drop every route. The write's own event brings the watcher back.
            return Err(ReloadError::EmptyFile);
        }
        let maintenance = build::maintenance_settings(&config, &env_lookup)?;
        let tls = match &config.file.proxy.tls {
            Some(t) if self.tls.is_some() => {
                Some(crate::proxy::listener::tls_acceptor(&t.cert, &t.key)?)
            }
            _ => None,
        };
        let config = Arc::new(config);
        let runtime = Runtime::build(
            config.clone(),
            Some(&current),
            Deps {
                http: &self.metrics.http,
                ops: &self.metrics.ops,
                resilience: &self.metrics.resilience,
                on_breaker: breaker_observer(self.events.clone()),
                access_log: self.access_log.clone(),
                maintenance: Arc::new(maintenance.clone()),
                env: &env_lookup,
            },
        )?;
        let mut warnings = restart_warnings(&current.config, &config, &self.bound);
        if self.tls.is_some() != config.file.proxy.tls.is_some() {
            warnings.push(
                "proxy.tls was added or removed; the listener changes after a restart".to_string(),
            );
        }
        // The fleet subscriber is the last thing that can fail: start it before applying
        // anything, so a failed reload leaves nothing half-applied.
        let control_changed = current.config.file.control != config.file.control;
        let new_fleet = if control_changed {
            Some(self.start_fleet(&config)?)
        } else {
            None
        };

        // Everything validated: apply. The runtime swap is the atomic step for requests.
        self.live.store(Arc::new(runtime));
        if let (Some(slot), Some(acceptor)) = (&self.tls, tls) {
            slot.store(Some(Arc::new(acceptor)));
        }
        self.maintenance.update_settings(maintenance);
        self.health.replace(config.checks.clone());
        if let Some(new_fleet) = new_fleet {
            let mut fleet = self.fleet.lock().unwrap_or_else(|e| e.into_inner());
            *fleet = new_fleet;
            if fleet.is_none() {
                self.maintenance.set_fleet(None);
            }
        }
        Ok(warnings)
    }

    /// The fleet subscriber `[control]` asks for (`None`: no fleet key configured).
    fn start_fleet(&self, config: &Config) -> Result<Option<FleetControl>, crate::ops::Error> {
        let c = &config.file.control;
        match (&c.redis_url, &c.key) {
            (Some(url), Some(key)) => {
                FleetControl::start(url, key, c.poll_interval.get(), self.maintenance.clone())
                    .map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// Why a reload kept the running config. Its text is what the log, the `reload` event and
/// `/_ops/status` show.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(
        "config file is empty (a write in progress?); an empty file is never applied on reload"
    )]
    EmptyFile,
    #[error("{0}")]
    Page(#[from] build::PageError),
    #[error("{0}")]
    Tls(#[from] crate::proxy::listener::TlsError),
    /// The new config does not compile into a runtime (upstream URLs, TLS files, fleet limits).
    #[error("{0}")]
    Runtime(#[from] crate::proxy::upstream::BuildError),
    /// The changed `[control]` section's fleet subscriber did not start.
    #[error("{0}")]
    Fleet(#[from] crate::ops::Error),
}

/// The admin API's reload: the same path as SIGHUP and the watcher, one at a time.
pub struct AdminReload(pub Arc<Shared>);

impl crate::admin::Reload for AdminReload {
    async fn reload(&self) -> ReloadOutcome {
        self.0.reload("admin").await
    }

    fn last(&self) -> Arc<ReloadStatus> {
        self.0.last_reload.load_full()
    }
}

fn restart_warnings(old: &Config, new: &Config, bound: &super::Bound) -> Vec<String> {
    let mut w = Vec::new();
    let (o, n) = (&old.file, &new.file);
    if o.proxy.listen != n.proxy.listen {
        w.push(format!(
            "proxy.listen changed to {} but stays {} until restart",
            n.proxy.listen, bound.proxy
        ));
    }
    if o.admin.listen != n.admin.listen {
        w.push(format!(
            "admin.listen changed to {} but stays {} until restart",
            n.admin.listen, bound.admin
        ));
    }
    if o.egress.as_ref().and_then(|e| e.listen) != n.egress.as_ref().and_then(|e| e.listen) {
        w.push("egress.listen changed; it applies after a restart".to_string());
    }
    if o.proxy.max_header_bytes != n.proxy.max_header_bytes
        || o.proxy.header_read_timeout != n.proxy.header_read_timeout
    {
        w.push(
            "max_header_bytes / header_read_timeout apply to new connections after a restart"
                .to_string(),
        );
    }
    if o.metrics.buckets != n.metrics.buckets {
        w.push("metrics.buckets changed; histograms keep their buckets until restart".to_string());
    }
    w
}

/// sha256 of zero bytes: an empty config file.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// After an event on the config, wait this long for the burst to end (editors write,
/// rename and chmod in a row; kubelet swaps a ConfigMap in several steps)...
const QUIET: Duration = Duration::from_millis(150);
/// ... but never longer than this after the first event, so a config that keeps being
/// touched is still live within 1 s of a change.
const MAX_WAIT: Duration = Duration::from_millis(500);
/// The symlink kubelet renames over to publish a new ConfigMap version.
const CONFIGMAP_DATA: &str = "..data";

/// Watches the config file's directory (a Kubernetes ConfigMap swaps a symlink there,
/// so the file's own inode is the wrong thing to watch) and reloads when the file no
/// longer matches the running config. Only events naming the config file or `..data`
/// count: other files written in the directory neither trigger nor delay a reload.
/// Dropping the returned watcher stops it.
pub fn watch_config(shared: Arc<Shared>) -> Option<notify::RecommendedWatcher> {
    let path = shared.source.path.clone()?;
    let dir = path
        .parent()
        .map(PathBuf::from)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // Reads (ours included) are no change; a queue overflow may have hidden one.
        let ours = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| Some(n) == name.as_deref() || n == CONFIGMAP_DATA)
        });
        if (ours && !event.kind.is_access()) || event.need_rescan() {
            let _ = tx.send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the config directory; SIGHUP and the admin API still reload"))
    .ok()?;
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory");
        return None;
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            let deadline = tokio::time::Instant::now() + MAX_WAIT;
            loop {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                match tokio::time::timeout_at((now + QUIET).min(deadline), rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            // Unreadable (mid-swap) or empty (mid-write): the writer's next event comes back.
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue;
            };
            if bytes.is_empty() {
                continue;
            }
            if needs_reload(&shared, &crate::config::sha256_hex(&bytes)) {
                shared.reload("watch").await;
            }
        }
    });
    Some(watcher)
}

/// Whether the file (its sha256 `on_disk`) should be reloaded: it differs from what is
/// running, whichever path loaded that; or it matches, but the last reload failed (the
/// file was put back after a broken edit), so a reload makes `last_reload` say so.
fn needs_reload(shared: &Shared, on_disk: &str) -> bool {
    on_disk != shared.live.load().config.sha256 || shared.last_reload.load().result == "failure"
}

/// Logs each breaker transition once, with its reason, and publishes it as an event.
pub fn breaker_observer(
    events: Arc<crate::telemetry::events::Events>,
) -> crate::proxy::call::TransitionHook {
    Arc::new(move |name: &str, t: &Transition| {
        let (from, to, reason) = (t.from.as_str(), t.to.as_str(), t.reason.as_str());
        if t.to == crate::proxy::breaker::State::Open {
            tracing::warn!(breaker = name, from, to, reason, "circuit breaker opened");
        } else {
            tracing::info!(
                breaker = name,
                from,
                to,
                reason,
                "circuit breaker changed state"
            );
        }
        events.emit(
            "breaker",
            serde_json::json!({"name": name, "from": from, "to": to, "reason": reason}),
        );
    })
}

/// `recover_on_check`: while a breaker is OPEN, a passing run of its check moves it to
/// HALF_OPEN, so a health check, not a sacrificed user request, probes recovery.
/// Woken by each check run, not by a timer: an idle sidecar stays asleep, and a breaker
/// moves as soon as its check passes.
pub fn spawn_recover_on_check(shared: &Arc<Shared>) {
    let s = shared.clone();
    let mut runs = shared.health.subscribe_runs();
    tokio::spawn(async move {
        let mut last_seen: std::collections::HashMap<String, std::time::SystemTime> =
            Default::default();
        // A reload swaps breakers, not results: a breaker only ever moves on a new run.
        while runs.changed().await.is_ok() {
            let rt = s.live.load_full();
            let snap = s.health.snapshot();
            for b in rt.breakers() {
                let Some(check) = &b.recover_on_check else {
                    continue;
                };
                let Some(result) = snap.get(check) else {
                    continue;
                };
                let Some(at) = result.checked_at else {
                    continue;
                };
                // Only a run newer than the last one acted on counts: one probe, one nudge.
                if last_seen.get(check.as_str()) == Some(&at) {
                    continue;
                }
                last_seen.insert(check.clone(), at);
                if result.status.is_passing()
                    && b.breaker.state() == crate::proxy::breaker::State::Open
                {
                    b.breaker.check_passed(tokio::time::Instant::now());
                }
            }
        }
    });
}

/// Turns health flips and maintenance changes into events, gauges and log lines.
pub fn spawn_event_forwarders(shared: &Arc<Shared>) {
    let s = shared.clone();
    let mut flips = shared.health.subscribe_flips();
    tokio::spawn(async move {
        loop {
            match flips.recv().await {
                Ok(c) => s.events.emit(
                    "check",
                    serde_json::json!({"name": c.name, "from": c.from.as_str(), "to": c.to.as_str(), "message": c.message}),
                ),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    });
    let s = shared.clone();
    let mut changes = shared.maintenance.subscribe();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let c = changes.borrow_and_update().clone();
            s.metrics.ops.maintenance_mode.set(i64::from(c.enabled));
            tracing::info!(
                enabled = c.enabled,
                source = c.source.map(|s| s.as_str()),
                held_by = ?c.held_by.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "maintenance changed"
            );
            s.events.emit(
                "maintenance",
                serde_json::json!({"enabled": c.enabled, "held_by": c.held_by}),
            );
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn empty_sha256_is_the_digest_of_no_bytes() {
        assert_eq!(super::EMPTY_SHA256, crate::config::sha256_hex(b""));
    }
}
