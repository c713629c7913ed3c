//! Maintenance state: every source of the toggle, the effective bit and the status JSON.
//!
//! One [`Maintenance`] handle is built in `app.rs`; the proxy reads [`Maintenance::is_on`]
//! (one atomic load) per request, the admin API reads [`Maintenance::status`] and sets the
//! override, the reload path calls [`Maintenance::update_settings`], and the flag file,
//! window and fleet sources write into it from their background tasks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::watch;

use super::{TaskGuard, flag_file, windows};

/// Which requests maintenance blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Everything but GET, HEAD and OPTIONS.
    #[default]
    Writes,
    /// Every request that is not exempt, allowed or bypassed.
    All,
}

/// The resolved `[maintenance]` settings, built by the config room.
///
/// `env_on` is the env var's value as read once at startup; `page` is the HTML file's
/// content, loaded by the caller; `windows` are `(start, end)` pairs.
#[derive(Clone, Debug)]
pub struct MaintenanceSettings {
    pub enabled: bool,
    pub env_on: bool,
    pub flag_file: Option<PathBuf>,
    pub mode: Mode,
    pub exempt_prefixes: Vec<String>,
    pub allow_ips: Vec<IpNet>,
    pub bypass_token: Option<String>,
    pub retry_after: Duration,
    pub status: StatusCode,
    pub content_type: HeaderValue,
    pub body: Bytes,
    pub page: Option<Bytes>,
    pub fail_readiness: bool,
    pub windows: Vec<(SystemTime, SystemTime)>,
}

impl Default for MaintenanceSettings {
    /// The defaults of SPEC §2 `[maintenance]`.
    fn default() -> Self {
        Self {
            enabled: false,
            env_on: false,
            flag_file: None,
            mode: Mode::Writes,
            exempt_prefixes: vec!["/_health".to_owned(), "/metrics".to_owned()],
            allow_ips: Vec::new(),
            bypass_token: None,
            retry_after: Duration::from_secs(300),
            status: StatusCode::SERVICE_UNAVAILABLE,
            content_type: HeaderValue::from_static("application/json"),
            body: Bytes::from_static(br#"{"detail":"maintenance"}"#),
            page: None,
            fail_readiness: false,
            windows: Vec::new(),
        }
    }
}

/// One source of the maintenance toggle; serialized as its name in `held_by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Config,
    Env,
    FlagFile,
    Window,
    Fleet,
    Override,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Env => "env",
            Source::FlagFile => "flag_file",
            Source::Window => "window",
            Source::Fleet => "fleet",
            Source::Override => "override",
        }
    }
}

/// The value of every source, as `sources` in `GET /_ops/maintenance`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sources {
    pub config: bool,
    pub env: bool,
    pub flag_file: bool,
    pub window: bool,
    /// `None` when no fleet key is configured or its value is not known yet.
    pub fleet: Option<bool>,
    /// The admin API's runtime override; `None` defers to the other sources.
    #[serde(rename = "override")]
    pub override_on: Option<bool>,
}

impl Sources {
    /// The override when set, else any source that is on.
    pub fn effective(&self) -> bool {
        match self.override_on {
            Some(on) => on,
            None => {
                self.config || self.env || self.flag_file || self.window || self.fleet == Some(true)
            }
        }
    }

    /// The sources holding maintenance on (empty when it is off).
    pub fn held_by(&self) -> Vec<Source> {
        match self.override_on {
            Some(true) => vec![Source::Override],
            Some(false) => Vec::new(),
            None => [
                (self.config, Source::Config),
                (self.env, Source::Env),
                (self.flag_file, Source::FlagFile),
                (self.window, Source::Window),
                (self.fleet == Some(true), Source::Fleet),
            ]
            .into_iter()
            .filter_map(|(on, source)| on.then_some(source))
            .collect(),
        }
    }
}

/// The body of `GET /_ops/maintenance` (and `maintenance` in `/_ops/status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MaintenanceStatus {
    pub enabled: bool,
    pub mode: Mode,
    pub held_by: Vec<Source>,
    pub sources: Sources,
    pub reason: Option<String>,
}

/// What the change signal carries: the latest state and the source whose change made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaintenanceChange {
    /// Bumped on every change, so two equal-looking states can be told apart.
    pub seq: u64,
    /// `None` only for the initial value.
    pub source: Option<Source>,
    pub enabled: bool,
    pub held_by: Vec<Source>,
}

/// Cheap handle on the maintenance state; clones share it.
#[derive(Clone, Debug)]
pub struct Maintenance {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The effective bit, the proxy's only read per request: one lock-free load.
    /// Stored while `state` is locked, so concurrent writers leave it matching the sources.
    on: AtomicBool,
    /// Sources, reason and settings: written rarely and never across an `.await`,
    /// so a std Mutex (cheaper than tokio's, and it cannot be held over a suspension).
    state: Mutex<State>,
    /// Latest-value signal for the event stream and the gauge: a slow reader skips
    /// intermediate states but always sees the newest, which is what both need.
    changes: watch::Sender<MaintenanceChange>,
    /// Background source tasks; replacing or dropping a guard stops its task.
    tasks: Mutex<Tasks>,
}

#[derive(Debug)]
struct State {
    sources: Sources,
    reason: Option<String>,
    settings: Arc<MaintenanceSettings>,
    seq: u64,
    /// Generation of the flag file task; a replaced task's late report is ignored.
    flag_gen: u64,
    /// Generation of the window task, same purpose.
    window_gen: u64,
}

#[derive(Debug, Default)]
struct Tasks {
    flag_file: Option<TaskGuard>,
    windows: Option<TaskGuard>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Maintenance {
    /// Builds the state and starts the flag file and window tasks it needs.
    ///
    /// Every source is evaluated before this returns, so `is_on` is right at once.
    /// Must be called inside a tokio runtime.
    pub fn new(settings: MaintenanceSettings) -> Self {
        let settings = Arc::new(settings);
        let sources = Sources {
            config: settings.enabled,
            env: settings.env_on,
            flag_file: settings.flag_file.as_deref().is_some_and(flag_file::exists),
            window: windows::active_at(&settings.windows, SystemTime::now()),
            fleet: None,
            override_on: None,
        };
        let enabled = sources.effective();
        let (changes, _) = watch::channel(MaintenanceChange {
            seq: 0,
            source: None,
            enabled,
            held_by: sources.held_by(),
        });
        let maintenance = Self {
            inner: Arc::new(Inner {
                on: AtomicBool::new(enabled),
                state: Mutex::new(State {
                    sources,
                    reason: None,
                    settings: settings.clone(),
                    seq: 0,
                    flag_gen: 0,
                    window_gen: 0,
                }),
                changes,
                tasks: Mutex::new(Tasks::default()),
            }),
        };
        maintenance.restart_flag_file(&settings);
        maintenance.restart_windows(&settings);
        maintenance
    }

    /// Whether maintenance is effectively on: one atomic load, for the hot path.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.inner.on.load(Ordering::Acquire)
    }

    /// Whether `/_health/ready` must answer 503 because of maintenance.
    pub fn fails_readiness(&self) -> bool {
        self.is_on() && lock(&self.inner.state).settings.fail_readiness
    }

    /// The settings in force (the last ones given to `new` or `update_settings`).
    pub fn settings(&self) -> Arc<MaintenanceSettings> {
        lock(&self.inner.state).settings.clone()
    }

    /// The value of every source.
    pub fn sources(&self) -> Sources {
        lock(&self.inner.state).sources
    }

    /// The body of `GET /_ops/maintenance`.
    pub fn status(&self) -> MaintenanceStatus {
        let state = lock(&self.inner.state);
        MaintenanceStatus {
            enabled: state.sources.effective(),
            mode: state.settings.mode,
            held_by: state.sources.held_by(),
            sources: state.sources,
            reason: state.reason.clone(),
        }
    }

    /// A receiver that wakes on every source change (for the `maintenance` event and
    /// the `maintenance_mode` gauge).
    pub fn subscribe(&self) -> watch::Receiver<MaintenanceChange> {
        self.inner.changes.subscribe()
    }

    /// The admin API's runtime override: `Some(on)` forces, `None` clears (and drops the
    /// reason). Survives reloads.
    pub fn set_override(&self, on: Option<bool>, reason: Option<String>) {
        self.update(Source::Override, |state| {
            state.sources.override_on = on;
            state.reason = if on.is_some() { reason } else { None };
        });
    }

    /// The fleet key's value; `None` when not configured or not known yet.
    pub fn set_fleet(&self, on: Option<bool>) {
        self.update(Source::Fleet, |state| state.sources.fleet = on);
    }

    /// Applies reloaded settings: the config, flag file and window sources are
    /// re-evaluated; the override, the fleet value and the env value (read once at
    /// startup, so `new.env_on` is ignored) are kept.
    pub fn update_settings(&self, new: MaintenanceSettings) {
        let new = Arc::new(new);
        let old = {
            let mut state = lock(&self.inner.state);
            std::mem::replace(&mut state.settings, new.clone())
        };
        self.update(Source::Config, |state| state.sources.config = new.enabled);
        if old.flag_file != new.flag_file {
            self.restart_flag_file(&new);
        }
        if old.windows != new.windows {
            self.restart_windows(&new);
        }
    }

    /// Applies one write and, when the sources or the reason changed, refreshes the
    /// effective bit and signals the change, all under the state lock so that writers
    /// are seen in one order.
    fn update(&self, source: Source, write: impl FnOnce(&mut State)) {
        let mut state = lock(&self.inner.state);
        let before = (state.sources, state.reason.clone());
        write(&mut state);
        if (state.sources, &state.reason) == (before.0, &before.1) {
            return;
        }
        let enabled = state.sources.effective();
        self.inner.on.store(enabled, Ordering::Release);
        state.seq += 1;
        self.inner.changes.send_replace(MaintenanceChange {
            seq: state.seq,
            source: Some(source),
            enabled,
            held_by: state.sources.held_by(),
        });
    }

    /// Writes a background task's report unless the task has been replaced since.
    fn report(&self, source: Source, generation: u64, on: bool) {
        self.update(source, |state| {
            let current = match source {
                Source::FlagFile => state.flag_gen,
                _ => state.window_gen,
            };
            if current != generation {
                return;
            }
            match source {
                Source::FlagFile => state.sources.flag_file = on,
                _ => state.sources.window = on,
            }
        });
    }

    fn restart_flag_file(&self, settings: &MaintenanceSettings) {
        let mut tasks = lock(&self.inner.tasks);
        tasks.flag_file = None;
        let generation = {
            let mut state = lock(&self.inner.state);
            state.flag_gen += 1;
            state.flag_gen
        };
        let Some(path) = settings.flag_file.clone() else {
            self.report(Source::FlagFile, generation, false);
            return;
        };
        self.report(Source::FlagFile, generation, flag_file::exists(&path));
        let weak = Arc::downgrade(&self.inner);
        tasks.flag_file = Some(TaskGuard::spawn(flag_file::run(
            path,
            flag_file::POLL_INTERVAL,
            reporter(weak, Source::FlagFile, generation),
        )));
    }

    fn restart_windows(&self, settings: &MaintenanceSettings) {
        let mut tasks = lock(&self.inner.tasks);
        tasks.windows = None;
        let generation = {
            let mut state = lock(&self.inner.state);
            state.window_gen += 1;
            state.window_gen
        };
        let list = settings.windows.clone();
        self.report(
            Source::Window,
            generation,
            windows::active_at(&list, SystemTime::now()),
        );
        if list.is_empty() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tasks.windows = Some(TaskGuard::spawn(windows::run(
            list,
            reporter(weak, Source::Window, generation),
        )));
    }
}

/// A task's way to report its source; answers false once the state is gone, so the
/// task ends. Holds a `Weak` because the state owns the task (a strong one would cycle).
fn reporter(
    weak: Weak<Inner>,
    source: Source,
    generation: u64,
) -> impl FnMut(bool) -> bool + Send + 'static {
    move |on| match weak.upgrade() {
        Some(inner) => {
            Maintenance { inner }.report(source, generation, on);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_wins_and_held_by_names_sources() {
        let mut sources = Sources {
            flag_file: true,
            fleet: Some(true),
            ..Sources::default()
        };
        assert!(sources.effective());
        assert_eq!(sources.held_by(), vec![Source::FlagFile, Source::Fleet]);
        sources.override_on = Some(false);
        assert!(!sources.effective());
        assert!(sources.held_by().is_empty());
        sources.override_on = Some(true);
        assert_eq!(sources.held_by(), vec![Source::Override]);
        sources = Sources {
            fleet: Some(false),
            ..Sources::default()
        };
        assert!(!sources.effective());
    }

    #[test]
    fn status_serializes_as_the_spec_says() {
        let status = MaintenanceStatus {
            enabled: true,
            mode: Mode::Writes,
            held_by: vec![Source::FlagFile],
            sources: Sources {
                flag_file: true,
                ..Sources::default()
            },
            reason: None,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "enabled": true, "mode": "writes", "held_by": ["flag_file"],
                "sources": {"config": false, "env": false, "flag_file": true, "window": false,
                            "fleet": null, "override": null},
                "reason": null
            })
        );
    }
}
