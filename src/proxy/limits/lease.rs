//! The Redis side of fleet limits: one task per config that carries lease
//! requests from [`FleetBucket`]s to Redis (fred) and the answers back.
//! Never on the request path: requests only `try_send` a job, never wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::interfaces::LuaInterface;
use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::fleet::{FleetBucket, Grant, INSTANCE_TTL, LEASE_SCRIPT, LEASE_TIMEOUT};

/// Jobs waiting for the driver; a full queue means Redis is not keeping up,
/// and the bucket treats the job as failed rather than waiting.
const QUEUE: usize = 1024;
/// fred reconnects this often while Redis is down (recovery well within 1 s).
const RECONNECT_MS: u32 = 100;

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
    /// True while this route enforces locally; written by the driver only.
    pub fallback: AtomicBool,
    /// `rate_limit_fleet_fallback{route}`.
    pub gauge: Gauge,
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
        }
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
    pub want: u32,
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
            job.bucket.on_failure(Instant::now());
            job.route.set_fallback(true);
        }
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
                let now = Instant::now();
                match result {
                    Ok(Ok(grant)) => {
                        job.bucket.on_grant(now, grant);
                        job.route.set_fallback(false);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(route = %job.route.route, error = %e, "fleet lease failed");
                        job.bucket.on_failure(now);
                        job.route.set_fallback(true);
                    }
                    Err(_) => {
                        job.bucket.on_failure(now);
                        job.route.set_fallback(true);
                    }
                }
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
    let keys = vec![job.key.to_string(), job.route.instances_key.clone()];
    let args = vec![
        job.route.per_second.to_string(),
        job.route.burst.to_string(),
        job.want.to_string(),
        instance.to_owned(),
        INSTANCE_TTL.as_millis().to_string(),
    ];
    let answer: Result<Vec<i64>, _> = client.evalsha(sha, keys.clone(), args.clone()).await;
    let answer = match answer {
        // A restarted Redis has lost its script cache: EVAL loads it again.
        Err(e) if e.details().starts_with("NOSCRIPT") || e.to_string().contains("NOSCRIPT") => {
            client.eval(LEASE_SCRIPT, keys, args).await?
        }
        other => other?,
    };
    let get = |i: usize| answer.get(i).copied().unwrap_or(0).max(0);
    Ok(Grant {
        granted: u32::try_from(get(0)).unwrap_or(u32::MAX),
        instances: u32::try_from(get(1)).unwrap_or(u32::MAX).max(1),
        wait: Duration::from_millis(u64::try_from(get(2)).unwrap_or(0)),
    })
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
