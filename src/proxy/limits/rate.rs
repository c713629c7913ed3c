//! A route's rate limit as admission calls it: one of four shapes (one bucket,
//! keyed buckets, a fleet bucket, keyed fleet buckets) behind one `check`.
//! Built once per config; a request allocates nothing unless it brings a new key.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
#[cfg(test)]
use http::HeaderName;
use tokio::time::Instant;

use super::fleet::{FleetBucket, Lease, Mode};
use super::keyed::{KeyRef, KeyedLimiter, KeyedMap};
use super::lease::{LeaseJob, LeaseSender, RouteFleet, key_id};
use crate::proxy::admission::RateLimiter;

pub use crate::config::values::RateKey as KeySource;

/// The request's key: a header value, else the client IP (resolved only if needed).
fn request_key<'r>(
    source: &KeySource,
    headers: &'r HeaderMap,
    client: impl FnOnce() -> IpAddr,
) -> KeyRef<'r> {
    match source {
        KeySource::Header(name) => match headers.get(name) {
            Some(v) => KeyRef::Bytes(v.as_bytes()),
            None => KeyRef::Ip(client()),
        },
        _ => KeyRef::Ip(client()),
    }
}

enum Shape {
    Local(RateLimiter),
    LocalKeyed(KeyedLimiter),
    Fleet {
        bucket: Arc<FleetBucket>,
        redis_key: Arc<str>,
    },
    /// Each key's bucket with its Redis key name (built once, when the key is new).
    FleetKeyed(KeyedMap<(Arc<FleetBucket>, Arc<str>)>),
}

/// One route's limit.
pub struct RouteRate {
    source: KeySource,
    shape: Shape,
    per_second: f64,
    burst: u32,
    /// `Some` for `scope = "fleet"`.
    fleet: Option<(Arc<RouteFleet>, LeaseSender)>,
}

impl RouteRate {
    /// `scope = "local"`.
    pub fn local(per_second: f64, burst: u32, source: KeySource, max_keys: usize) -> Self {
        let shape = match source {
            KeySource::Route => Shape::Local(RateLimiter::new(per_second, burst)),
            _ => Shape::LocalKeyed(KeyedLimiter::new(per_second, burst, max_keys)),
        };
        Self {
            source,
            shape,
            per_second,
            burst,
            fleet: None,
        }
    }

    /// `scope = "fleet"`: leases through `sender`, state shown through `route`.
    pub fn fleet(
        source: KeySource,
        max_keys: usize,
        route: Arc<RouteFleet>,
        sender: LeaseSender,
    ) -> Self {
        let (per_second, burst) = (route.per_second, route.burst);
        let shape = match source {
            KeySource::Route => Shape::Fleet {
                bucket: Arc::new(FleetBucket::new(per_second, burst, Instant::now())),
                redis_key: format!("{}route", route.bucket_prefix).into(),
            },
            _ => Shape::FleetKeyed(KeyedMap::new(max_keys)),
        };
        Self {
            source,
            shape,
            per_second,
            burst,
            fleet: Some((route, sender)),
        }
    }

    pub fn key(&self) -> &KeySource {
        &self.source
    }

    pub fn is_fleet(&self) -> bool {
        self.fleet.is_some()
    }

    /// True while a fleet limit enforces locally (always false for local limits).
    pub fn fallback(&self) -> bool {
        self.fleet
            .as_ref()
            .is_some_and(|(r, _)| r.fallback.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Takes a token for this request, or says how long until one is available.
    /// `client` resolves the client IP (only called when the key needs it).
    pub fn check(
        &self,
        now: Instant,
        headers: &HeaderMap,
        client: impl FnOnce() -> IpAddr,
    ) -> Result<(), Duration> {
        match &self.shape {
            Shape::Local(rl) => rl.try_acquire(now),
            Shape::LocalKeyed(rl) => {
                rl.try_acquire(request_key(&self.source, headers, client), now)
            }
            Shape::Fleet { bucket, redis_key } => {
                let d = bucket.admit(now);
                if let Some(lease) = d.lease {
                    self.send(now, bucket, redis_key, lease);
                }
                d.admit
            }
            Shape::FleetKeyed(map) => {
                let key = request_key(&self.source, headers, client);
                let prefix = self.fleet.as_ref().map_or("", |(r, _)| &r.bucket_prefix);
                let make = || {
                    let id = match key {
                        KeyRef::Ip(ip) => match ip.to_canonical() {
                            IpAddr::V4(v4) => key_id(&v4.octets()),
                            IpAddr::V6(v6) => key_id(&v6.octets()),
                        },
                        KeyRef::Bytes(b) => key_id(b),
                    };
                    (
                        Arc::new(FleetBucket::new(self.per_second, self.burst, now)),
                        Arc::from(format!("{prefix}{id}")),
                    )
                };
                let (d, lease) = map.with(key, make, |(bucket, redis_key)| {
                    let d = bucket.admit(now);
                    let lease = d
                        .lease
                        .map(|lease| (Arc::clone(bucket), Arc::clone(redis_key), lease));
                    (d, lease)
                });
                if let Some((bucket, redis_key, lease)) = lease {
                    self.send(now, &bucket, &redis_key, lease);
                }
                d.admit
            }
        }
    }

    fn send(&self, now: Instant, bucket: &Arc<FleetBucket>, redis_key: &Arc<str>, lease: Lease) {
        if let Some((route, sender)) = &self.fleet {
            if !route.may_try(now) {
                // Redis is down and another key has the route's next attempt:
                // this bucket stays local and asks again after its own interval.
                bucket.on_failure(now);
                return;
            }
            sender.send(LeaseJob {
                route: Arc::clone(route),
                bucket: Arc::clone(bucket),
                key: Arc::clone(redis_key),
                lease,
            });
        }
    }

    /// The route bucket's mode (fleet, `key = "route"` only; for tests and status).
    pub fn fleet_mode(&self) -> Option<Mode> {
        match &self.shape {
            Shape::Fleet { bucket, .. } => Some(bucket.mode()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sources_parse() {
        use crate::config::values::FromConfig;
        let parse = |text: &str| KeySource::from_config(&text.to_owned());
        assert_eq!(parse("route"), Ok(KeySource::Route));
        assert_eq!(parse("client_ip"), Ok(KeySource::ClientIp));
        assert_eq!(
            parse("header:X-Api-Key"),
            Ok(KeySource::Header(HeaderName::from_static("x-api-key")))
        );
        assert!(parse("header:bad name").is_err());
        assert!(parse("ip").is_err());
        assert_eq!(
            parse("header:X-Api-Key").unwrap().describe(),
            "header:x-api-key"
        );
    }

    #[tokio::test]
    async fn header_key_falls_back_to_the_client_ip() {
        let rl = RouteRate::local(
            1.0,
            1,
            KeySource::Header(HeaderName::from_static("x-api-key")),
            100,
        );
        let now = Instant::now();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let none = HeaderMap::new();
        let mut a = HeaderMap::new();
        a.insert("x-api-key", "a".parse().unwrap());
        assert!(rl.check(now, &none, || ip).is_ok());
        assert!(rl.check(now, &none, || ip).is_err(), "same ip, no header");
        assert!(
            rl.check(now, &a, || ip).is_ok(),
            "the key is its own bucket"
        );
        assert!(rl.check(now, &a, || ip).is_err());
        assert!(
            rl.check(now, &none, || "10.9.9.9".parse().unwrap()).is_ok(),
            "another client"
        );
    }

    #[tokio::test]
    async fn route_key_never_resolves_the_client() {
        let rl = RouteRate::local(1.0, 1, KeySource::Route, 100);
        let now = Instant::now();
        assert!(rl.check(now, &HeaderMap::new(), || unreachable!()).is_ok());
        assert!(!rl.fallback());
    }

    /// A keyed fleet limit with many keys through a long Redis outage, on the
    /// paused clock: the keys share one retry schedule, so the outage costs a
    /// bounded number of lease attempts per route, and all keys are back on
    /// the fleet budget within a second of Redis returning.
    #[tokio::test(start_paused = true)]
    async fn a_long_outage_costs_a_bounded_number_of_lease_attempts_per_route() {
        use super::super::fleet::Grant;
        use super::super::lease::{RETRY_CAP, RouteFleet};
        use std::collections::HashSet;
        use std::sync::Mutex;

        let t0 = Instant::now();
        let route = Arc::new(RouteFleet::new(
            "t",
            "api".into(),
            100.0,
            100,
            Default::default(),
        ));
        let (sender, mut jobs) = LeaseSender::channel(100_000);
        let rl = RouteRate::fleet(
            KeySource::Header(HeaderName::from_static("x-api-key")),
            10_000,
            route.clone(),
            sender,
        );
        let down_until = t0 + Duration::from_secs(10);
        // (when asked, Redis key) of every lease, answered after 1 ms: refused
        // while Redis is down, granted once it is back.
        type Asked = Vec<(Instant, Arc<str>)>;
        let asked: Arc<Mutex<Asked>> = Arc::default();
        let redis = {
            let asked = asked.clone();
            tokio::spawn(async move {
                while let Some(job) = jobs.recv().await {
                    let now = Instant::now();
                    asked.lock().unwrap().push((now, job.key.clone()));
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let grant = (now >= down_until).then_some(Grant {
                            granted: job.lease.want,
                            instances: 1,
                            wait: Duration::ZERO,
                            rate: 100.0,
                        });
                        job.answer(Instant::now(), grant);
                    });
                }
            })
        };
        // 1000 keys, each with a request every 50 ms (20 000/s).
        let keys: Vec<HeaderMap> = (0..1000)
            .map(|i| {
                let mut h = HeaderMap::new();
                h.insert("x-api-key", format!("key-{i}").parse().unwrap());
                h
            })
            .collect();
        let client = || -> IpAddr { unreachable!("every request has a key") };
        while Instant::now() < down_until + Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for h in &keys {
                let _ = rl.check(Instant::now(), h, client);
            }
        }
        redis.abort();
        let asked = asked.lock().unwrap();
        // The first round finds Redis' state unknown: each new key asks once.
        let after_first = asked
            .iter()
            .filter(|(at, _)| *at >= t0 + Duration::from_secs(1) && *at < down_until)
            .count();
        let bound = (Duration::from_secs(9).as_millis() / RETRY_CAP.as_millis()) as usize + 5;
        assert!(
            after_first <= bound,
            "{after_first} lease attempts in 9 s of outage (bound {bound}; keys retrying on their own make ~30 000)"
        );
        // Back: every key leases again within a second.
        let back: HashSet<_> = asked
            .iter()
            .filter(|(at, _)| *at >= down_until)
            .map(|(_, key)| key.clone())
            .collect();
        assert_eq!(back.len(), keys.len(), "keys back on the fleet budget");
        assert!(!rl.fallback());
    }
}
