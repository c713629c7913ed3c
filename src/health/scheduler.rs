//! Runs checks: one task per check (jittered start, then every interval), each run bounded by the
//! check's timeout. Also the one-shot runners behind `opsgate check` and `opsgate wait`.
//! Results go to the registry in `mod.rs`; nothing here is read by endpoints.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::http::HttpProbe;
use super::postgres::PostgresProbe;
use super::redis::RedisProbe;
use super::tcp::TcpProbe;
use super::{CheckKind, CheckResult, CheckSpec, Outcome, Shared, Status};

/// Shortest interval a task accepts; a zero interval would spin.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Upper bound of the start jitter, so checks of one config do not all hit at the same instant.
const MAX_START_JITTER: Duration = Duration::from_millis(250);
/// Pause between two rounds of `wait_for_critical`.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// A connection-holding prober for one check; kept across runs so a run is one round trip.
pub(crate) enum Probe {
    Postgres(PostgresProbe),
    Redis(RedisProbe),
    Http(HttpProbe),
    Tcp(TcpProbe),
}

impl Probe {
    pub fn new(spec: &CheckSpec) -> Self {
        match &spec.kind {
            CheckKind::Postgres { url, query } => {
                Probe::Postgres(PostgresProbe::new(url, query.as_deref()))
            }
            CheckKind::Redis { url } => Probe::Redis(RedisProbe::new(url, spec.timeout)),
            CheckKind::Http {
                url,
                expect_status,
                body_contains,
            } => Probe::Http(HttpProbe::new(
                url,
                expect_status.clone(),
                body_contains.clone(),
                spec.timeout,
            )),
            CheckKind::Tcp { address } => Probe::Tcp(TcpProbe::new(address)),
        }
    }

    /// One probe; `Err` holds a message already scrubbed of credentials.
    async fn run(&mut self) -> Result<(), String> {
        match self {
            Probe::Postgres(p) => p.run().await,
            Probe::Redis(p) => p.run().await,
            Probe::Http(p) => p.run().await,
            Probe::Tcp(p) => p.run().await,
        }
    }

    /// Drops a connection left in an unknown state by a timed-out run.
    fn reset(&mut self) {
        match self {
            Probe::Postgres(p) => p.reset(),
            Probe::Redis(p) => p.reset(),
            Probe::Http(_) | Probe::Tcp(_) => {}
        }
    }
}

/// `3s`, `500ms`, `1s 500ms`: the timeout as a user writes it in the config.
fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Runs `probe` once under the spec's timeout and classifies the result (no thresholds).
pub(crate) async fn run_once(probe: &mut Probe, spec: &CheckSpec) -> Outcome {
    let start = Instant::now();
    let result = tokio::time::timeout(spec.timeout, probe.run()).await;
    let latency = start.elapsed();
    let (status, message) = match result {
        Ok(Ok(())) => match spec.degraded_over {
            Some(limit) if latency > limit => (
                Status::Degraded,
                Some(format!(
                    "slow: {:.1}ms over {}",
                    latency.as_secs_f64() * 1000.0,
                    format_duration(limit)
                )),
            ),
            _ => (Status::Healthy, None),
        },
        Ok(Err(message)) => (Status::Unhealthy, Some(message)),
        Err(_) => {
            probe.reset();
            (
                Status::Unhealthy,
                Some(format!("timed out after {}", format_duration(spec.timeout))),
            )
        }
    };
    Outcome {
        status,
        latency,
        message,
        at: SystemTime::now(),
    }
}

/// Starts the task of one check: first run after a small jitter, then every interval; a run
/// that overruns the interval delays the next tick instead of stacking runs (single flight).
pub(crate) fn spawn(shared: Arc<Shared>, spec: Arc<CheckSpec>, generation: u64) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut probe = Probe::new(&spec);
        let interval = spec.interval.max(MIN_INTERVAL);
        let jitter_cap = (interval / 10).min(MAX_START_JITTER);
        let jitter = jitter_cap.mul_f64(fastrand::f64());
        tokio::time::sleep(jitter).await;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let outcome = run_once(&mut probe, &spec).await;
            shared.record(&spec.name, generation, outcome);
        }
    })
}

fn to_result(spec: &CheckSpec, outcome: Outcome) -> CheckResult {
    CheckResult {
        name: spec.name.clone(),
        kind: spec.kind.label(),
        critical: spec.critical,
        status: outcome.status,
        latency: Some(outcome.latency),
        checked_at: Some(outcome.at),
        message: outcome.message,
    }
}

/// Runs every check once, all in parallel, each bounded by its timeout (`opsgate check`).
/// Results keep the order of `specs`; thresholds do not apply.
pub async fn check_once(specs: &[CheckSpec]) -> Vec<CheckResult> {
    join_all(specs.iter().map(|spec| async move {
        let mut probe = Probe::new(spec);
        to_result(spec, run_once(&mut probe, spec).await)
    }))
    .await
}

/// Polls the critical checks until all pass (healthy or degraded) or `timeout` elapses
/// (`opsgate wait`). On timeout, returns the names of the critical checks still failing.
/// Connections are kept between rounds.
pub async fn wait_for_critical(specs: &[CheckSpec], timeout: Duration) -> Result<(), Vec<String>> {
    let critical: Vec<&CheckSpec> = specs.iter().filter(|s| s.critical).collect();
    let mut probes: Vec<Probe> = critical.iter().map(|s| Probe::new(s)).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut failing: Vec<String> = critical.iter().map(|s| s.name.clone()).collect();
    loop {
        let round = join_all(
            probes
                .iter_mut()
                .zip(&critical)
                .map(
                    |(probe, spec)| async move { (spec.name.clone(), run_once(probe, spec).await) },
                ),
        );
        match tokio::time::timeout_at(deadline, round).await {
            Ok(outcomes) => {
                failing = outcomes
                    .into_iter()
                    .filter(|(_, o)| !o.status.is_passing())
                    .map(|(name, _)| name)
                    .collect();
                if failing.is_empty() {
                    return Ok(());
                }
            }
            // The round was cut short: whatever failed last time is still not known to pass.
            Err(_) => return Err(failing),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(failing);
        }
        // The last round runs at the deadline itself, so a dependency that comes up in the
        // final poll interval is still seen.
        tokio::time::sleep_until((now + WAIT_POLL).min(deadline)).await;
    }
}
