//! The Redis side of fleet limits: one task per config that carries lease
//! requests from [`FleetBucket`]s to Redis (fred) and the answers back.
//! Never on the request path: requests only `try_send` a job, never wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use fred::interfaces::LuaInterface;
use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::fleet::{
    DEMAND_TTL, FleetBucket, Grant, INSTANCE_TTL, LEASE_SCRIPT, LEASE_TIMEOUT, Lease,
};
use crate::proxy::clock::nanos_since;

/// Jobs waiting for the driver; a full queue means Redis is not keeping up,
/// and the bucket treats the job as failed rather than waiting.
const QUEUE: usize = 1024;
/// fred reconnects this often while Redis is down (recovery well within 1 s).
const RECONNECT_MS: u32 = 100;
/// While Redis is down, a route's keys try it again after this, doubling per
/// failed lease up to `RETRY_CAP`; the cap plus a reconnect stays well within
/// the 1 s of recovery SPEC §11 allows.
pub const RETRY_BASE: Duration = Duration::from_millis(100);
pub const RETRY_CAP: Duration = Duration::from_millis(500);

/// A route's fleet limit as the driver and the status page see it.
#[derive(Debug)]
pub struct RouteFleet {
    pub route: Arc<str>,
    /// `{prefix}:rl:{route}:instances`: the live-instance set.
    pub instances_key: String,
    /// `{prefix}:rl:{route}:`: bucket keys are this plus a key id.
    pub bucket_prefix: String,
    pub per_second: f64,
    pub burst: u32,
    /// True while this route enforces locally; written by lease answers only.
    pub fallback: AtomicBool,
    /// `rate_limit_fleet_fallback{route}`.
    pub gauge: Gauge,
    /// Origin of `retry_at`.
    base: Instant,
    /// While in fallback, no lease of this route is sent before this (ns since
    /// `base`). Shared by all the route's keys, so a long outage costs one
    /// attempt per backoff step, not one per key; an atomic because any
    /// request may claim the next attempt.
    retry_at: AtomicU64,
    /// Failed leases since the last success: the backoff's exponent.
    failures: AtomicU32,
}

impl RouteFleet {
    pub fn new(prefix: &str, route: Arc<str>, per_second: f64, burst: u32, gauge: Gauge) -> Self {
        Self {
            instances_key: format!("{prefix}:rl:{route}:instances"),
            bucket_prefix: format!("{prefix}:rl:{route}:"),
            route,
            per_second,
            burst,
            fallback: AtomicBool::new(false),
            gauge,
            base: Instant::now(),
            retry_at: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }

    /// Whether a lease may go to Redis now: always while Redis answers; while
    /// it does not, one request per backoff step claims the attempt for the
    /// whole route.
    pub fn may_try(&self, now: Instant) -> bool {
        if !self.fallback.load(Ordering::Acquire) {
            return true;
        }
        let at = nanos_since(self.base, now);
        let due = self.retry_at.load(Ordering::Acquire);
        if at < due {
            return false;
        }
        let steps = self
            .failures
            .load(Ordering::Relaxed)
            .saturating_sub(1)
            .min(8);
        let backoff = (RETRY_BASE * (1 << steps)).min(RETRY_CAP);
        let next = at.saturating_add(backoff.as_nanos() as u64);
        self.retry_at
            .compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    fn on_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.set_fallback(false);
    }

    fn on_failure(&self) {
        let _ = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            });
        self.set_fallback(true);
    }

    fn set_fallback(&self, on: bool) {
        if self.fallback.swap(on, Ordering::AcqRel) != on {
            self.gauge.set(i64::from(on));
            if on {
                tracing::warn!(route = %self.route, "fleet rate limit: Redis unreachable, enforcing a local share of the limit");
            } else {
                tracing::info!(route = %self.route, "fleet rate limit: back on the fleet budget");
            }
        }
    }
}

/// One lease to ask for.
pub struct LeaseJob {
    pub route: Arc<RouteFleet>,
    pub bucket: Arc<FleetBucket>,
    /// The bucket's Redis key (route bucket or keyed bucket).
    pub key: Arc<str>,
    pub lease: Lease,
}

impl LeaseJob {
    /// Hands Redis' answer to the bucket and the route; `None` is a failed lease.
    pub fn answer(&self, now: Instant, grant: Option<Grant>) {
        match grant {
            Some(grant) => {
                self.bucket.on_grant(now, grant);
                self.route.on_success();
            }
            None => {
                self.bucket.on_failure(now);
                self.route.on_failure();
            }
        }
    }
}

/// The sending half, held by the routes; cheap to clone.
#[derive(Clone, Debug)]
pub struct LeaseSender {
    tx: mpsc::Sender<LeaseJob>,
}

impl LeaseSender {
    /// Hands a job to the driver without waiting; a full queue fails the lease.
    pub fn send(&self, job: LeaseJob) {
        if let Err(e) = self.tx.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            job.answer(Instant::now(), None);
        }
    }

    /// A sender whose jobs the caller answers (tests drive buckets with it).
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<LeaseJob>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }
}

/// Starts the driver for `redis_url`. `instance` identifies this process in
/// the live-instance sets. The task ends when every sender is dropped.
pub fn start(redis_url: &str, instance: Arc<str>) -> Result<LeaseSender, fred::error::Error> {
    let config = Config::from_url(redis_url)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = LEASE_TIMEOUT * 5;
            c.internal_command_timeout = LEASE_TIMEOUT * 5;
            c.max_command_attempts = 1;
        })
        .set_policy(ReconnectPolicy::new_constant(0, RECONNECT_MS));
    let client = builder.build()?;
    let (tx, mut rx) = mpsc::channel::<LeaseJob>(QUEUE);
    let script_sha: Arc<str> = sha1_hex(LEASE_SCRIPT).into();
    tokio::spawn(async move {
        let _conn = client.connect();
        while let Some(job) = rx.recv().await {
            let client = client.clone();
            let sha = script_sha.clone();
            let instance = instance.clone();
            tokio::spawn(async move {
                let result =
                    tokio::time::timeout(LEASE_TIMEOUT, lease(&client, &sha, &instance, &job))
                        .await;
                let grant = match result {
                    Ok(Ok(grant)) => Some(grant),
                    Ok(Err(e)) => {
                        tracing::debug!(route = %job.route.route, error = %e, "fleet lease failed");
                        None
                    }
                    Err(_) => None,
                };
                job.answer(Instant::now(), grant);
            });
        }
        let _ = client.quit().await;
    });
    Ok(LeaseSender { tx })
}

async fn lease(
    client: &fred::prelude::Client,
    sha: &str,
    instance: &str,
    job: &LeaseJob,
) -> Result<Grant, fred::error::Error> {
    let (keys, args) = job.script_call(instance);
    let answer: Result<Vec<i64>, _> = client.evalsha(sha, keys.clone(), args.clone()).await;
    let answer = match answer {
        // A restarted Redis has lost its script cache: EVAL loads it again.
        Err(e) if e.details().starts_with("NOSCRIPT") || e.to_string().contains("NOSCRIPT") => {
            client.eval(LEASE_SCRIPT, keys, args).await?
        }
        other => other?,
    };
    Ok(job.grant_from(&answer))
}

impl LeaseJob {
    /// KEYS and ARGV of [`LEASE_SCRIPT`] for this lease, as `instance`.
    pub fn script_call(&self, instance: &str) -> (Vec<String>, Vec<String>) {
        let keys = vec![self.key.to_string(), self.route.instances_key.clone()];
        let args = vec![
            self.route.per_second.to_string(),
            self.route.burst.to_string(),
            self.lease.want.to_string(),
            instance.to_owned(),
            INSTANCE_TTL.as_millis().to_string(),
            if self.lease.rejoin { "1" } else { "0" }.to_owned(),
            format!("{:.3}", self.lease.demand),
            DEMAND_TTL.as_millis().to_string(),
        ];
        (keys, args)
    }

    /// The script's answer as a grant.
    pub fn grant_from(&self, answer: &[i64]) -> Grant {
        let get = |i: usize| answer.get(i).copied().unwrap_or(0).max(0);
        let instances = u32::try_from(get(1)).unwrap_or(u32::MAX).max(1);
        let rate = match get(3) {
            0 => self.route.per_second / f64::from(instances),
            milli => milli as f64 / 1000.0,
        };
        Grant {
            granted: u32::try_from(get(0)).unwrap_or(u32::MAX),
            instances,
            wait: Duration::from_millis(u64::try_from(get(2)).unwrap_or(0)),
            rate,
        }
    }
}

fn sha1_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A key's id in Redis: a digest, so header values (API keys) never appear
/// in Redis key names.
pub fn key_id(key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_digest_is_what_redis_computes() {
        // SHA1("return 1"), as SCRIPT LOAD would answer.
        assert_eq!(
            sha1_hex("return 1"),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn key_ids_hide_the_key() {
        let id = key_id(b"secret-api-key");
        assert_eq!(id.len(), 32);
        assert!(!id.contains("secret"));
        assert_eq!(id, key_id(b"secret-api-key"));
    }
}
