//! Dependency health: checks run in the background, their results cached in one snapshot.
//! Sits beside the proxy, never on its path: endpoints read [`Health::snapshot`] and render it with
//! [`render`]; the scheduler tasks are the only writers.
//!
//! # Semantics
//! - A check starts `unknown` ("not checked yet"); its first result sets its status directly.
//!   After that `healthy_threshold` consecutive passing results (healthy or degraded) are needed
//!   to leave `unhealthy`, and `unhealthy_threshold` consecutive failures to enter it (HAProxy's
//!   rise/fall). Between healthy and degraded the status follows each result at once.
//! - Overall status (SPEC §3): a critical check unhealthy or unknown -> unhealthy; else any
//!   check not healthy -> degraded; else healthy; no checks -> healthy.
//! - Reload ([`Health::replace`]) diffs by name: an identical spec keeps its task, schedule and
//!   state; a changed spec gets a new task and shows its last result until the new definition
//!   has one (a changed target's first result then sets the status directly, thresholds apply
//!   after); only a new name starts `unknown`; removed checks stop and leave the metrics.

mod http;
mod metrics;
mod postgres;
mod redis;
pub mod render;
mod scheduler;
mod tcp;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

pub use crate::config::checks::{CheckKind, CheckSpec};
pub use crate::config::status::StatusRanges;
pub use crate::telemetry::redact::{REDACTED, redact_url};
pub use scheduler::{check_once, wait_for_critical};

/// Default interval between two runs of a check (SPEC §2 `[health] interval`).
pub const DEFAULT_INTERVAL: Duration = crate::config::defaults::CHECK_INTERVAL.get();
/// Default bound on one run of a check (SPEC §2 `[health] timeout`).
pub const DEFAULT_TIMEOUT: Duration = crate::config::defaults::CHECK_TIMEOUT.get();
/// Message of a check that has not produced a result yet (SPEC §10).
pub const NOT_CHECKED_YET: &str = "not checked yet";

/// A check's or the service's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Healthy,
    Degraded,
    Unhealthy,
    /// Not run yet.
    Unknown,
}

impl Status {
    /// The statuses the aggregate can take (SPEC §3): `health_status` exports exactly these.
    /// `unknown` belongs to single checks only: an unknown critical check makes the service
    /// unhealthy, an unknown non-critical one degraded.
    pub const OVERALL: [Status; 3] = [Status::Healthy, Status::Degraded, Status::Unhealthy];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
            Status::Unknown => "unknown",
        }
    }

    /// Healthy or degraded: what readiness and `opsgate check` accept.
    pub fn is_passing(self) -> bool {
        matches!(self, Status::Healthy | Status::Degraded)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One check's latest state, as endpoints show it.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckResult {
    pub name: String,
    /// `postgres`, `redis`, `http` or `tcp`.
    pub kind: &'static str,
    pub critical: bool,
    pub status: Status,
    /// Duration of the latest run; `None` before the first.
    pub latency: Option<Duration>,
    /// End of the latest run; `None` before the first.
    pub checked_at: Option<SystemTime>,
    /// Why the check is not healthy; `None` when healthy. Never holds credentials.
    pub message: Option<String>,
}

impl CheckResult {
    fn unknown(spec: &CheckSpec) -> Self {
        CheckResult {
            name: spec.name.clone(),
            kind: spec.kind.label(),
            critical: spec.critical,
            status: Status::Unknown,
            latency: None,
            checked_at: None,
            message: Some(NOT_CHECKED_YET.to_owned()),
        }
    }
}

/// Aggregates check statuses as SPEC §3 says; never `Unknown` (see [`Status::OVERALL`]).
pub fn aggregate<'a>(checks: impl IntoIterator<Item = &'a CheckResult>) -> Status {
    let mut overall = Status::Healthy;
    for c in checks {
        match c.status {
            Status::Unhealthy | Status::Unknown if c.critical => return Status::Unhealthy,
            Status::Healthy => {}
            _ => overall = Status::Degraded,
        }
    }
    overall
}

/// Every check's state at one instant, plus the aggregate; immutable once published.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Aggregate over all checks (the readiness view).
    pub status: Status,
    /// In configuration order.
    pub checks: Vec<CheckResult>,
}

impl Snapshot {
    fn new(checks: Vec<CheckResult>) -> Self {
        Snapshot {
            status: aggregate(&checks),
            checks,
        }
    }

    /// Aggregate over critical checks only (the startup view).
    pub fn startup_status(&self) -> Status {
        aggregate(self.checks.iter().filter(|c| c.critical))
    }

    pub fn get(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// A check's status flip, for event streams (`/_ops/events` type `check`).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckChange {
    pub name: String,
    pub from: Status,
    pub to: Status,
    pub message: Option<String>,
    pub at: SystemTime,
}

/// The outcome of one run, before thresholds.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    /// Healthy, degraded or unhealthy; never unknown.
    pub status: Status,
    pub latency: Duration,
    pub message: Option<String>,
    pub at: SystemTime,
}

/// Rise/fall debouncing of raw results (pure; no clock, no I/O).
#[derive(Clone, Debug)]
pub(crate) struct Debounce {
    shown: Status,
    /// Consecutive results on the other side (pass vs fail) of `shown`.
    streak: u32,
}

impl Debounce {
    pub fn new() -> Self {
        Debounce {
            shown: Status::Unknown,
            streak: 0,
        }
    }

    /// Feeds one raw result (never `Unknown`); returns the status to show.
    pub fn observe(
        &mut self,
        raw: Status,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Status {
        if self.shown == Status::Unknown || raw.is_passing() == self.shown.is_passing() {
            self.shown = raw;
            self.streak = 0;
        } else {
            self.streak += 1;
            let need = if raw.is_passing() {
                healthy_threshold
            } else {
                unhealthy_threshold
            };
            if self.streak >= need.max(1) {
                self.shown = raw;
                self.streak = 0;
            }
        }
        self.shown
    }
}

/// One running check in the registry.
struct Entry {
    spec: Arc<CheckSpec>,
    /// Tells a late result from a replaced task apart from the current one.
    generation: u64,
    debounce: Debounce,
    result: CheckResult,
    /// Message of the latest failing run, shown while thresholds hold a non-healthy status.
    last_problem: Option<String>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Default)]
struct Registry {
    order: Vec<String>,
    entries: HashMap<String, Entry>,
    next_generation: u64,
    shut_down: bool,
}

pub(crate) struct Shared {
    /// Lock-free reads for probes and endpoints; replaced whole after each result so a reader
    /// never sees half an update.
    snapshot: ArcSwap<Snapshot>,
    /// Serializes writers (check tasks, reload) so no result is lost between load and store; a
    /// std mutex because it is never held across an `.await`.
    registry: Mutex<Registry>,
    /// Bumped on every status change (a check's or the aggregate's); `watch` because SSE only
    /// needs to learn "something changed" and then reads the snapshot.
    changed: watch::Sender<u64>,
    /// Each check flip with its message; `broadcast` because every event subscriber must see
    /// every flip, in order.
    flips: broadcast::Sender<CheckChange>,
    /// Bumped on every new snapshot, a passing run that changed nothing included: for
    /// whoever acts on each run rather than on changes.
    published: watch::Sender<u64>,
    metrics: metrics::Metrics,
}

/// Handle to the health room; cheap to clone.
#[derive(Clone)]
pub struct Health {
    shared: Arc<Shared>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// An empty registry (status healthy, no checks); no task is started.
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        let (flips, _) = broadcast::channel(64);
        let (published, _) = watch::channel(0);
        let metrics = metrics::Metrics::new();
        metrics.set_overall(Status::Healthy);
        Health {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(Snapshot::new(Vec::new())),
                registry: Mutex::new(Registry::default()),
                changed,
                flips,
                published,
                metrics,
            }),
        }
    }

    /// Creates the registry and starts one task per check. Needs a tokio runtime.
    pub fn start(specs: Vec<CheckSpec>) -> Self {
        let health = Self::new();
        health.replace(specs);
        health
    }

    /// The latest snapshot; never waits on a dependency.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Fires (the value increments) on every status change of a check or of the aggregate.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Every check flip, with its message.
    pub fn subscribe_flips(&self) -> broadcast::Receiver<CheckChange> {
        self.shared.flips.subscribe()
    }

    /// Fires on every new snapshot: each check run's result, changed or not.
    pub fn subscribe_runs(&self) -> watch::Receiver<u64> {
        self.shared.published.subscribe()
    }

    /// Registers `health_check_status`, `health_check_duration_seconds` and `health_status`.
    /// Call once; the families outlive reloads.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        self.shared.metrics.register(registry);
    }

    /// Replaces the set of checks (config reload); see the module docs for what is kept.
    /// Needs a tokio runtime. Duplicate names: the first one wins.
    pub fn replace(&self, specs: Vec<CheckSpec>) {
        let mut reg = self.shared.lock();
        if reg.shut_down {
            return;
        }
        let mut old = std::mem::take(&mut reg.entries);
        let mut order = Vec::with_capacity(specs.len());
        for spec in specs {
            if reg.entries.contains_key(&spec.name) {
                tracing::warn!(check = %spec.name, "duplicate health check name ignored");
                continue;
            }
            order.push(spec.name.clone());
            let name = spec.name.clone();
            let entry = match old.remove(&name) {
                Some(entry) if *entry.spec == spec => entry,
                Some(mut entry) => {
                    // Changed settings: a new task runs the new definition, and until its
                    // first result the check shows its last one, so a reload (every pod at
                    // once, for a ConfigMap) does not drop readiness for a run's duration.
                    if let Some(task) = entry.task.take() {
                        task.abort();
                    }
                    if entry.spec.critical != spec.critical {
                        self.shared.metrics.remove_check(&entry.spec);
                    }
                    if entry.spec.kind != spec.kind {
                        // Another target: its first result decides, not the old one's streak.
                        entry.debounce = Debounce::new();
                        entry.last_problem = None;
                    }
                    entry.result.critical = spec.critical;
                    entry.result.kind = spec.kind.label();
                    entry.generation = reg.bump();
                    entry.spec = Arc::new(spec);
                    entry.task = Some(scheduler::spawn(
                        self.shared.clone(),
                        entry.spec.clone(),
                        entry.generation,
                    ));
                    self.shared
                        .metrics
                        .set_check(&entry.spec, entry.result.status);
                    entry
                }
                None => {
                    let spec = Arc::new(spec);
                    let generation = reg.bump();
                    self.shared.metrics.set_check(&spec, Status::Unknown);
                    Entry {
                        result: CheckResult::unknown(&spec),
                        task: Some(scheduler::spawn(
                            self.shared.clone(),
                            spec.clone(),
                            generation,
                        )),
                        spec,
                        generation,
                        debounce: Debounce::new(),
                        last_problem: None,
                    }
                }
            };
            reg.entries.insert(name, entry);
        }
        for (_, removed) in old.drain() {
            self.shared.metrics.remove_check(&removed.spec);
        }
        reg.order = order;
        self.shared.publish(&reg, true);
    }

    /// Stops every check task; the last snapshot stays readable. Later `replace` calls are ignored.
    pub fn shutdown(&self) {
        let mut reg = self.shared.lock();
        reg.shut_down = true;
        for entry in reg.entries.values_mut() {
            if let Some(task) = entry.task.take() {
                task.abort();
            }
        }
    }
}

impl Registry {
    fn bump(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one run's outcome to the check `name` (ignored if that task was replaced).
    pub(crate) fn record(&self, name: &str, generation: u64, outcome: Outcome) {
        let mut reg = self.lock();
        if reg.shut_down {
            return;
        }
        let Some(entry) = reg.entries.get_mut(name) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        let spec = entry.spec.clone();
        let from = entry.result.status;
        let to = entry.debounce.observe(
            outcome.status,
            spec.healthy_threshold,
            spec.unhealthy_threshold,
        );
        if outcome.status != Status::Healthy {
            entry.last_problem = outcome.message.clone();
        }
        entry.result.status = to;
        entry.result.latency = Some(outcome.latency);
        entry.result.checked_at = Some(outcome.at);
        entry.result.message = match to {
            Status::Healthy => None,
            _ if outcome.status == Status::Healthy => entry.last_problem.clone(),
            _ => outcome.message.clone(),
        };
        self.metrics.observe(&spec, to, outcome.latency);
        let changed = from != to;
        if changed {
            let message = entry.result.message.clone();
            match to {
                Status::Unhealthy => {
                    tracing::warn!(check = %name, %from, %to, error = message.as_deref().unwrap_or(""), "health check changed")
                }
                _ => {
                    tracing::info!(check = %name, %from, %to, error = message.as_deref().unwrap_or(""), "health check changed")
                }
            }
            // The snapshot goes first: whoever hears of the flip must find it in the snapshot
            // (the events stream sends a `status` read from it right after the `check`).
            self.publish(&reg, changed);
            let _ = self.flips.send(CheckChange {
                name: name.to_owned(),
                from,
                to,
                message,
                at: outcome.at,
            });
        } else {
            self.publish(&reg, changed);
        }
    }

    /// Builds and stores a new snapshot from the registry; notifies when `changed` or when the
    /// aggregate moved.
    fn publish(&self, reg: &Registry, changed: bool) {
        let checks: Vec<CheckResult> = reg
            .order
            .iter()
            .filter_map(|n| reg.entries.get(n).map(|e| e.result.clone()))
            .collect();
        let snapshot = Snapshot::new(checks);
        let overall_moved = self.snapshot.load().status != snapshot.status;
        self.metrics.set_overall(snapshot.status);
        self.snapshot.store(Arc::new(snapshot));
        if changed || overall_moved {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        self.published.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    fn result(critical: bool, status: Status) -> CheckResult {
        CheckResult {
            name: "c".into(),
            kind: "tcp",
            critical,
            status,
            latency: None,
            checked_at: None,
            message: None,
        }
    }

    #[test]
    fn aggregation_follows_spec() {
        assert_eq!(aggregate([]), Healthy);
        assert_eq!(
            aggregate(&[result(true, Healthy), result(false, Healthy)]),
            Healthy
        );
        assert_eq!(
            aggregate(&[result(true, Healthy), result(false, Unhealthy)]),
            Degraded
        );
        assert_eq!(aggregate(&[result(true, Degraded)]), Degraded);
        assert_eq!(aggregate(&[result(false, Unknown)]), Degraded);
        assert_eq!(
            aggregate(&[result(true, Unknown), result(false, Healthy)]),
            Unhealthy
        );
        assert_eq!(
            aggregate(&[result(false, Degraded), result(true, Unhealthy)]),
            Unhealthy
        );
    }

    #[test]
    fn first_result_sets_state_directly() {
        let mut d = Debounce::new();
        assert_eq!(d.observe(Unhealthy, 3, 3), Unhealthy);
        let mut d = Debounce::new();
        assert_eq!(d.observe(Healthy, 3, 3), Healthy);
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut d = Debounce::new();
        d.observe(Healthy, 2, 3);
        assert_eq!(d.observe(Unhealthy, 2, 3), Healthy);
        assert_eq!(d.observe(Unhealthy, 2, 3), Healthy);
        // A pass in between resets the streak.
        assert_eq!(d.observe(Healthy, 2, 3), Healthy);
        assert_eq!(d.observe(Unhealthy, 2, 3), Healthy);
        assert_eq!(d.observe(Unhealthy, 2, 3), Healthy);
        assert_eq!(d.observe(Unhealthy, 2, 3), Unhealthy);
    }

    #[test]
    fn rise_needs_consecutive_passes_and_degraded_counts_as_pass() {
        let mut d = Debounce::new();
        d.observe(Unhealthy, 2, 1);
        assert_eq!(d.observe(Degraded, 2, 1), Unhealthy);
        assert_eq!(d.observe(Healthy, 2, 1), Healthy);
        // Healthy <-> degraded follows at once.
        assert_eq!(d.observe(Degraded, 2, 1), Degraded);
        assert_eq!(d.observe(Healthy, 2, 1), Healthy);
        assert_eq!(d.observe(Unhealthy, 2, 1), Unhealthy);
    }

    fn health_status_series(health: &Health) -> Vec<String> {
        let mut registry = prometheus_client::registry::Registry::default();
        health.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut series: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("health_status{"))
            .map(str::to_owned)
            .collect();
        series.sort();
        series
    }

    #[tokio::test]
    async fn health_status_exports_exactly_the_three_overall_statuses() {
        let unreachable = CheckKind::Tcp {
            address: "127.0.0.1:1".into(),
        };
        // Before any run every check is unknown: a critical one makes the service unhealthy.
        let health = Health::start(vec![CheckSpec::new("db", unreachable.clone())]);
        assert_eq!(health.snapshot().status, Unhealthy);
        assert_eq!(
            health_status_series(&health),
            [
                r#"health_status{status="degraded"} 0"#,
                r#"health_status{status="healthy"} 0"#,
                r#"health_status{status="unhealthy"} 1"#,
            ]
        );
        health.shutdown();

        // Only non-critical checks, none run yet: degraded, still no `unknown` series.
        let mut cache = CheckSpec::new("cache", unreachable);
        cache.critical = false;
        let health = Health::start(vec![cache]);
        assert_eq!(health.snapshot().status, Degraded);
        assert_eq!(
            health_status_series(&health),
            [
                r#"health_status{status="degraded"} 1"#,
                r#"health_status{status="healthy"} 0"#,
                r#"health_status{status="unhealthy"} 0"#,
            ]
        );
        health.shutdown();
    }

    #[test]
    fn status_ranges_parse() {
        let r: StatusRanges = "200-299, 304".parse().unwrap();
        assert!(r.contains(204) && r.contains(304) && !r.contains(301));
        assert_eq!(r.to_string(), "200-299,304");
        assert!("200,204".parse::<StatusRanges>().unwrap().contains(204));
        assert!("399-200".parse::<StatusRanges>().is_err());
        assert!("abc".parse::<StatusRanges>().is_err());
        assert!("700".parse::<StatusRanges>().is_err());
        let classes: StatusRanges = "2xx".parse().unwrap();
        assert!(classes.contains(204) && !classes.contains(302));
    }
}
