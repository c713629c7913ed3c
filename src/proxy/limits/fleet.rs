//! Fleet-wide rate limits: every instance on the same Redis and `key_prefix`
//! shares one budget per route and key. Instances lease tokens in batches and
//! spend them locally, so no request waits on Redis.
//!
//! [`FleetBucket`] is the state machine (clock injected, no I/O): it admits or
//! refuses, says when a lease is wanted, and falls back to a local limit of
//! `per_second / N` when leases fail or stall. [`LEASE_SCRIPT`] is the atomic
//! Redis side, which also divides the rate among the instances by their
//! demand; `lease` (fred) carries leases between the two.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::admission::Gcra;
use crate::proxy::clock::nanos_since;

/// A batch covers this much of the instance's demand (at least its share of the rate).
pub const LEASE_PERIOD: Duration = Duration::from_millis(200);
/// Two leases of one bucket are at least this far apart: bounds Redis calls
/// per instance and bucket to 20/s whatever the load.
pub const MIN_LEASE_GAP: Duration = Duration::from_millis(50);
/// A lease not answered within this is a failure: fall back (never wait longer).
pub const LEASE_TIMEOUT: Duration = Duration::from_millis(200);
/// Leased tokens unspent after this are dropped, so an idle instance cannot
/// sit on a stock and spend it in a burst long after the fleet refilled.
pub const STOCK_TTL: Duration = Duration::from_secs(1);
/// A stock this close to its expiry is refreshed (a lease answered later
/// than `LEASE_TIMEOUT` is a failure anyway), so an unspent batch expiring
/// under load does not leave requests without tokens for a round trip.
pub const REFRESH_LEAD: Duration = LEASE_TIMEOUT;
/// The low-water mark covers this many lease round trips of demand: one for
/// the answer, one for a round trip slower than the last ones.
const ROUND_TRIPS_COVERED: u32 = 2;
/// With its stock spent, an instance falls back once its lease is this many
/// round trips late, and at least `LATE_MIN`: on loopback a lease takes about
/// a millisecond, so waiting out `LEASE_TIMEOUT` would refuse 200 ms of
/// requests each time Redis dies.
const LATE_ROUND_TRIPS: u32 = 4;
pub const LATE_MIN: Duration = Duration::from_millis(20);
/// In fallback, how often a request may try Redis again (recovery within 1 s).
pub const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// An instance not seen for this long is no longer counted in N.
pub const INSTANCE_TTL: Duration = Duration::from_secs(3);
/// An instance whose demand has not been reported for this long gets no part
/// of the rate: a busy instance leases at least once per `STOCK_TTL`, and a
/// quiet one must not hold back the others' shares for long.
pub const DEMAND_TTL: Duration = STOCK_TTL;
/// Leased tokens are spent no faster than this instance's part of the rate
/// (its allocation), with this much of it as a burst: lumpy grants become an
/// even flow, so the fleet's admitted total does not depend on when each
/// lease lands.
pub const PACE_WINDOW: Duration = LEASE_PERIOD;

/// What Redis answered to a lease.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    pub granted: u32,
    /// Live instances sharing the route (this one included).
    pub instances: u32,
    /// How long until this instance's account can grant again (0 if it can).
    pub wait: Duration,
    /// This instance's part of the rate (tokens/s): its demand, or a fair
    /// share of the rate when the fleet's demand exceeds it.
    pub rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No lease answered yet: a local limit at `per_second / 1` until one is.
    Starting,
    Leasing,
    /// Redis unreachable or slow: local limit at `per_second / N`.
    Fallback,
    /// Redis answered the first lease after a fallback by emptying this
    /// instance's account (see [`Lease::rejoin`]): the local limit holds
    /// until a refill is granted, so nothing is refused in between.
    Rejoining,
}

/// A lease to ask Redis for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lease {
    pub want: u32,
    /// This instance spent a local share since its last grant: Redis empties
    /// its account before granting (once per fallback, however many leases
    /// carry the flag), since an account refilled over the outage (or
    /// recreated full by a restart) would let the fleet spend that time's
    /// budget twice.
    pub rejoin: bool,
    /// Requests per second this instance saw since its last lease (admitted
    /// or not, at most the rate): Redis divides the rate by these.
    pub demand: f64,
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// `Err(retry_after)` means 429.
    pub admit: Result<(), Duration>,
    /// Ask Redis for this lease now (the caller hands it to the driver and
    /// later reports [`FleetBucket::on_grant`] or [`FleetBucket::on_failure`]).
    pub lease: Option<Lease>,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    /// Last known live instances (1 if never known).
    instances: u32,
    /// When the lease in flight was asked for.
    pending_since: Option<Instant>,
    /// No lease before this (the fleet bucket is dry, or Redis is down).
    next_lease: Instant,
    /// When the last lease was asked for (demand is counted since then).
    last_ask: Instant,
    /// Low-water mark that goes with the batch asked for: at or below it,
    /// the next lease is asked for.
    next_mark: u32,
    /// Most of the stock carried over when the batch asked for lands: the new
    /// mark for a refresh before expiry, everything for a prefetch.
    carry: u32,
    /// Lease round trip as last seen: rises with a slow answer at once,
    /// decays by an eighth per faster one.
    rtt: Duration,
    /// Leases tell Redis this instance spent locally: from entering Fallback
    /// to the next grant (a failed lease may or may not have reached Redis;
    /// the script caps once per fallback).
    rejoin: bool,
    /// The lease in flight carries `rejoin`.
    rejoin_sent: bool,
    /// Until then (set by the first grant after a fallback) N is not
    /// lowered and the allocation is capped at `per_second / N`: the other
    /// instances report their demand only as their own retries succeed, and
    /// a Redis that lost its state meanwhile would count this one alone.
    settle_until: Option<Instant>,
    /// Tokens of a stock that expired unspent which may still be spent on
    /// credit until the lease in flight is answered: an instance back from
    /// an idle second would otherwise refuse for a round trip under a limit
    /// that does not bind.
    bridge: u32,
    /// Tokens spent on credit and not yet paid back: taken from the next
    /// grants, so they add nothing to what Redis granted.
    borrowed: u32,
    /// Local limit state (Starting and Fallback): GCRA arrival time, ns since `base`.
    local_tat: u64,
    local: Gcra,
}

/// One route's (or one key's) share of a fleet budget, on this instance.
pub struct FleetBucket {
    per_second: f64,
    burst: u32,
    base: Instant,
    /// Leased tokens not yet spent. Most requests only take one with a CAS
    /// here (the lock-free fast path); the rest go through `state`.
    stock: AtomicU32,
    /// Nanoseconds since `base` until which the stock may be spent; 0 while
    /// not leasing, so the fast path is closed in Starting and Fallback.
    fresh_until: AtomicU64,
    /// From this (ns since `base`) a request takes the lock to see about
    /// refreshing a stock close to expiry; `fresh_until` once one is asked for.
    refresh_at: AtomicU64,
    /// At or below this stock a request takes the lock to see about a prefetch.
    prefetch_mark: AtomicU32,
    /// Requests since the last lease was asked for: the demand a batch is sized from.
    demand: AtomicU32,
    /// Nanoseconds per token of this instance's allocation; with `pace_tat`
    /// a GCRA over leased tokens (window `PACE_WINDOW`). Its own atomic: a
    /// request reads it once, and a grant replaces it whole.
    pace_interval: AtomicU64,
    /// The pacing GCRA's arrival time (ns since `base`); spent tokens move it
    /// on without the lock, so it is an atomic beside `stock`.
    pace_tat: AtomicU64,
    /// Mode, lease bookkeeping and the local limit: taken by the driver's answers
    /// and by the few requests off the fast path, never across an `.await`.
    state: Mutex<State>,
}

impl FleetBucket {
    pub fn new(per_second: f64, burst: u32, now: Instant) -> Self {
        Self {
            per_second,
            burst,
            base: now,
            stock: AtomicU32::new(0),
            fresh_until: AtomicU64::new(0),
            refresh_at: AtomicU64::new(0),
            prefetch_mark: AtomicU32::new(0),
            demand: AtomicU32::new(0),
            pace_interval: AtomicU64::new(1),
            pace_tat: AtomicU64::new(0),
            state: Mutex::new(State {
                mode: Mode::Starting,
                instances: 1,
                pending_since: None,
                next_lease: now,
                last_ask: now,
                next_mark: 0,
                carry: 0,
                rtt: Duration::ZERO,
                rejoin: false,
                rejoin_sent: false,
                settle_until: None,
                bridge: 0,
                borrowed: 0,
                local_tat: 0,
                local: Gcra::new(per_second, burst),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nanos(&self, now: Instant) -> u64 {
        nanos_since(self.base, now)
    }

    /// Tokens to ask for, and the low-water mark that goes with them. The
    /// mark is what this instance's demand spends in `ROUND_TRIPS_COVERED`
    /// lease round trips, at least half the batch; the batch is that plus
    /// `LEASE_PERIOD` of demand. Demand is the recent rate, at least this
    /// instance's share, at most the fleet rate; never more than the fleet
    /// burst. Sizing by demand lets a busy instance take a large allocation
    /// in few calls; sizing the mark by the round trip has the refill arrive
    /// before the stock runs out on a slow Redis. The third value is the
    /// demand itself, reported to Redis.
    fn batch(&self, s: &State, now: Instant) -> (u32, u32, f64) {
        let share = self.per_second / f64::from(s.instances.max(1));
        let elapsed = now.saturating_duration_since(s.last_ask).as_secs_f64();
        let demand = if elapsed > 0.0 {
            (f64::from(self.demand.load(Ordering::Relaxed)) / elapsed).min(self.per_second)
        } else {
            0.0
        };
        let rate = share.max(demand);
        let low_water = rate * (s.rtt * ROUND_TRIPS_COVERED).as_secs_f64();
        let batch = (rate * LEASE_PERIOD.as_secs_f64() + low_water).ceil() as u32;
        // The first lease takes this instance's share of the burst, so a fleet
        // burst is usable at once even at low rates.
        let first = if s.mode == Mode::Starting {
            self.burst / s.instances.max(1)
        } else {
            0
        };
        let batch = batch.max(first).clamp(1, self.burst.max(1));
        let mark = (low_water.ceil() as u32).max(batch / 2).min(batch);
        (batch, mark, demand)
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    pub fn instances(&self) -> u32 {
        self.lock().instances
    }

    /// Whether the fast path may serve this request: the stock is fresh,
    /// not due for a refresh, and above the prefetch mark.
    fn fast_open(&self, at: u64) -> bool {
        at < self.refresh_at.load(Ordering::Acquire)
            && self.stock.load(Ordering::Acquire) > self.prefetch_mark.load(Ordering::Relaxed)
    }

    /// Takes a leased token without the lock while the fast path is open.
    fn take_fast(&self, at: u64) -> bool {
        if at >= self.refresh_at.load(Ordering::Acquire) {
            return false;
        }
        let mark = self.prefetch_mark.load(Ordering::Relaxed);
        self.stock
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > mark).then(|| n - 1)
            })
            .is_ok()
    }

    /// Whether the allocation allows a token now, or how long until it does.
    /// Only looks: [`Self::paced`] moves it on once a token is taken, so a
    /// refusal costs no CAS; requests racing past the same look are all
    /// admitted, each moving the arrival time on (at most one per thread early).
    fn pace_check(&self, at: u64) -> Result<(), Duration> {
        let interval = self.pace_interval.load(Ordering::Relaxed);
        let tolerance = (PACE_WINDOW.as_nanos() as u64).max(interval);
        let next = self
            .pace_tat
            .load(Ordering::Acquire)
            .max(at)
            .saturating_add(interval);
        let ahead = next - at;
        if ahead > tolerance {
            Err(Duration::from_nanos(ahead - tolerance))
        } else {
            Ok(())
        }
    }

    fn paced(&self, at: u64) {
        let interval = self.pace_interval.load(Ordering::Relaxed);
        let _ = self
            .pace_tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(at).saturating_add(interval))
            });
    }

    /// Takes a leased token if any is left and fresh. An expired stock is
    /// dropped, all but what may bridge the refill (see [`State::bridge`]).
    fn take(&self, s: &mut State, at: u64) -> bool {
        if at >= self.fresh_until.load(Ordering::Acquire) {
            let stale = self.stock.swap(0, Ordering::AcqRel);
            if stale > 0 {
                s.bridge = stale.min(self.bridge_cap(s));
            }
            return false;
        }
        self.stock
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// What an expired stock may lend: the allocation's worth of the wait
    /// [`Self::stalled`] allows a dry instance before it falls back, so the
    /// credit never outlasts the lease it bridges.
    fn bridge_cap(&self, s: &State) -> u32 {
        let window = (s.rtt * LATE_ROUND_TRIPS).max(LATE_MIN).as_nanos() as u64;
        let interval = self.pace_interval.load(Ordering::Relaxed).max(1);
        u32::try_from(window.div_ceil(interval)).unwrap_or(u32::MAX)
    }

    /// Whether a lease in flight for `waited` is too late to wait for: past
    /// `LEASE_TIMEOUT`, or, with nothing left to spend meanwhile, a few round
    /// trips late (a dead Redis is then worked around in tens of
    /// milliseconds instead of refusing everything for the whole timeout).
    fn stalled(&self, s: &State, waited: Duration, at: u64) -> bool {
        if waited >= LEASE_TIMEOUT {
            return true;
        }
        let dry = self.stock.load(Ordering::Acquire) == 0
            || at >= self.fresh_until.load(Ordering::Acquire);
        s.mode == Mode::Leasing && dry && waited >= (s.rtt * LATE_ROUND_TRIPS).max(LATE_MIN)
    }

    /// One request.
    pub fn admit(&self, now: Instant) -> Decision {
        let at = self.nanos(now);
        self.demand.fetch_add(1, Ordering::Relaxed);
        let pace = self.pace_check(at);
        if self.fast_open(at) {
            match pace {
                Err(wait) => {
                    return Decision {
                        admit: Err(wait),
                        lease: None,
                    };
                }
                Ok(()) if self.take_fast(at) => {
                    self.paced(at);
                    return Decision {
                        admit: Ok(()),
                        lease: None,
                    };
                }
                Ok(()) => {}
            }
        }
        let mut s = self.lock();
        if let Some(since) = s.pending_since
            && self.stalled(&s, now.saturating_duration_since(since), at)
        {
            // Redis is slow: stop waiting for it (the late answer is still taken).
            s.pending_since = None;
            s.rejoin_sent = false;
            self.fall_back(&mut s, now);
        }
        let mode = s.mode;
        let admit = match mode {
            Mode::Leasing if pace.is_err() => pace,
            Mode::Leasing if self.take(&mut s, at) => {
                self.paced(at);
                Ok(())
            }
            Mode::Leasing => Err(Duration::from_secs_f64(
                f64::from(s.instances.max(1)) / self.per_second.max(1e-9),
            )
            .max(s.next_lease.saturating_duration_since(now))),
            Mode::Starting | Mode::Fallback | Mode::Rejoining => {
                let local = s.local;
                local.acquire(&mut s.local_tat, at)
            }
        };
        let low = self.stock.load(Ordering::Acquire) <= self.prefetch_mark.load(Ordering::Relaxed);
        let refresh = at >= self.refresh_at.load(Ordering::Acquire);
        let want = s.pending_since.is_none()
            && now >= s.next_lease
            && (s.mode != Mode::Leasing
                || ((low || refresh)
                    && now.saturating_duration_since(s.last_ask) >= MIN_LEASE_GAP));
        let lease = want.then(|| {
            let (batch, mark, demand) = self.batch(&s, now);
            s.pending_since = Some(now);
            s.last_ask = now;
            s.next_mark = mark;
            // A stock refreshed above its mark was leased for more demand than
            // came: what the new mark does not need would have expired.
            s.carry = if low { u32::MAX } else { mark };
            self.demand.store(0, Ordering::Relaxed);
            // Until this lease is answered, nobody else needs the lock to ask.
            self.prefetch_mark.store(0, Ordering::Relaxed);
            self.refresh_at
                .store(self.fresh_until.load(Ordering::Acquire), Ordering::Release);
            s.rejoin_sent = s.rejoin;
            Lease {
                want: batch,
                rejoin: s.rejoin_sent,
                demand,
            }
        });
        // Out of fresh tokens with a refill on its way: an expired stock
        // lends what bridges the round trip; a spent one (the limit binds,
        // or Redis is slow) lends nothing.
        let admit = match admit {
            Err(_)
                if s.mode == Mode::Leasing
                    && pace.is_ok()
                    && s.pending_since.is_some()
                    && s.bridge > 0 =>
            {
                s.bridge -= 1;
                s.borrowed = s.borrowed.saturating_add(1);
                self.paced(at);
                Ok(())
            }
            other => other,
        };
        Decision { admit, lease }
    }

    /// The driver could not hand the lease to Redis at all (queue full).
    pub fn on_not_sent(&self) {
        let mut s = self.lock();
        s.pending_since = None;
        s.rejoin_sent = false;
    }

    /// Redis answered a lease.
    pub fn on_grant(&self, now: Instant, grant: Grant) {
        let mut s = self.lock();
        s.pending_since = None;
        // Leases asked for while leasing measure the round trip; the first one
        // after start or fallback also pays for a connection, so it only
        // gives a first estimate or a lower one.
        let rtt = now.saturating_duration_since(s.last_ask).min(LEASE_TIMEOUT);
        s.rtt = if s.mode != Mode::Leasing {
            if s.rtt.is_zero() { rtt } else { s.rtt.min(rtt) }
        } else if rtt >= s.rtt {
            rtt
        } else {
            s.rtt - (s.rtt - rtt) / 8
        };
        if s.mode == Mode::Fallback {
            s.settle_until = Some(now + DEMAND_TTL);
        }
        let settling = s.settle_until.is_some_and(|until| now < until);
        let instances = if settling {
            grant.instances.max(s.instances)
        } else {
            grant.instances.max(1)
        };
        if s.instances != instances {
            s.instances = instances;
            s.local = self.local_gcra(s.instances);
        }
        let rate = if settling {
            grant.rate.min(self.per_second / f64::from(instances))
        } else {
            grant.rate
        };
        s.rejoin = false;
        if std::mem::take(&mut s.rejoin_sent) && grant.granted == 0 && s.mode == Mode::Fallback {
            // The account was emptied for this rejoin: keep the local
            // share until the refill, instead of refusing meanwhile.
            s.mode = Mode::Rejoining;
            s.next_lease = now + grant.wait.min(LEASE_PERIOD);
            return;
        }
        // The lease is answered: no more credit, and what was spent on it
        // comes out of this grant (or the next ones, if this one is short).
        s.bridge = 0;
        let repaid = s.borrowed.min(grant.granted);
        s.borrowed -= repaid;
        let granted = grant.granted - repaid;
        let at = self.nanos(now);
        if at >= self.fresh_until.load(Ordering::Acquire) {
            self.stock.store(granted, Ordering::Release);
        } else {
            // Tokens still fresh: all kept after a prefetch; after a refresh
            // before expiry only the new mark, so a refresh cannot keep an
            // unspent stock alive past `STOCK_TTL`.
            let carry = s.carry;
            let _ = self
                .stock
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.min(carry).saturating_add(granted))
                });
        }
        self.prefetch_mark.store(s.next_mark, Ordering::Relaxed);
        let fresh_until = self.nanos(now + STOCK_TTL);
        self.fresh_until.store(fresh_until, Ordering::Release);
        self.refresh_at.store(
            fresh_until.saturating_sub(REFRESH_LEAD.as_nanos() as u64),
            Ordering::Release,
        );
        if rate > 0.0 && rate.is_finite() {
            let interval = (1e9 / rate).clamp(1.0, 1e15) as u64;
            self.pace_interval.store(interval, Ordering::Relaxed);
        }
        match s.mode {
            // The first grant: the pacing window starts full, as a local
            // bucket would (the stock still bounds what it lets through).
            Mode::Starting => self.pace_tat.store(at, Ordering::Release),
            // Back from a local limit that was spending its share: no window
            // on top of it, or every return from a fallback would add one.
            Mode::Fallback | Mode::Rejoining => self.pace_tat.store(
                at.saturating_add(PACE_WINDOW.as_nanos() as u64),
                Ordering::Release,
            ),
            Mode::Leasing => {}
        }
        s.mode = Mode::Leasing;
        // Dry account: do not ask again before it could grant (each instance
        // has its own account, so nobody else takes its refill meanwhile).
        s.next_lease = now + grant.wait.min(LEASE_PERIOD);
    }

    /// A lease failed (Redis down, script error, timeout).
    pub fn on_failure(&self, now: Instant) {
        let mut s = self.lock();
        s.pending_since = None;
        s.rejoin_sent = false;
        self.fall_back(&mut s, now);
    }

    fn local_gcra(&self, instances: u32) -> Gcra {
        let n = instances.max(1);
        Gcra::new(self.per_second / f64::from(n), (self.burst / n).max(1))
    }

    fn fall_back(&self, s: &mut State, now: Instant) {
        if s.mode != Mode::Fallback {
            s.mode = Mode::Fallback;
            s.rejoin = true;
            s.local = self.local_gcra(s.instances);
            // Enter with an empty local bucket: a flapping Redis must not hand
            // out a fresh local burst at every switch (the leased tokens were
            // just being spent at the fleet rate).
            // Tokens spent on credit were never granted: the local limit
            // pays for them instead.
            let owed = s.local.interval_ns().saturating_mul(u64::from(s.borrowed));
            s.local_tat = s.local.full_at(self.nanos(now)).saturating_add(owed);
            s.bridge = 0;
            s.borrowed = 0;
            self.fresh_until.store(0, Ordering::Release);
            self.refresh_at.store(0, Ordering::Release);
            self.stock.store(0, Ordering::Release);
        }
        s.next_lease = now + RETRY_INTERVAL;
    }
}

/// The Redis side of a lease, atomic in one script. Each instance has an
/// account in the bucket's hash, refilled from Redis' own clock (instances'
/// clocks may disagree) at its allocation: its reported demand, or an equal
/// share of what the smaller demands leave (max-min fair), with what nobody
/// asks for split evenly, so the allocations add up to the rate. An account
/// holds at most its allocation's share of the burst, so together they hold
/// the burst. Grants follow the allocations instead of whoever asks first,
/// and the instance spends them at its allocation (see [`PACE_WINDOW`]). The
/// script also registers the instance in a score-expired sorted set and
/// counts the live ones. Both keys carry a TTL, so a fleet that stops leaves
/// nothing; an instance gone quiet drops out of the allocation after the
/// demand TTL.
///
/// KEYS: bucket hash, instances zset. ARGV: rate/s, burst, want, instance id,
/// instance TTL ms, rejoin (`1`: empty the account first, see
/// [`Lease::rejoin`]; the caller then waits `wait_ms` on its local limit),
/// demand/s, demand TTL ms. The hash marks an instance that emptied its
/// account until that instance leases without the flag, so a fallback whose
/// leases reach Redis but time out (a slow link) empties it once, not at
/// every retry. Returns `{granted, instances, wait_ms, allocation in
/// thousandths of a token/s}`. Nothing is granted below half a batch or
/// 150 ms of the allocation, whichever is less: a dry account answers "come
/// back in `wait_ms`" instead of handing out crumbs that would each cost a
/// round trip (the pacing spends a grant over that time anyway).
pub const LEASE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local id = ARGV[4]
local ttl = tonumber(ARGV[5])
local demand = math.max(0, math.min(rate, tonumber(ARGV[7]) or 0))
local dttl = tonumber(ARGV[8])
redis.call('ZADD', KEYS[2], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local n = redis.call('ZCARD', KEYS[2])
local raw = redis.call('HGETALL', KEYS[1])
local b = {}
for i = 1, #raw, 2 do b[raw[i]] = raw[i + 1] end
local demands = {demand}
for k, v in pairs(b) do
  if string.sub(k, 1, 2) == 'd:' then
    local other = string.sub(k, 3)
    if other ~= id then
      if now - (tonumber(b['s:' .. other]) or 0) > dttl then
        redis.call('HDEL', KEYS[1], k, 's:' .. other, 'a:' .. other, 'r:' .. other)
      else
        demands[#demands + 1] = tonumber(v)
      end
    end
  end
end
table.sort(demands)
local left, level = rate, nil
for i, d in ipairs(demands) do
  local fair = left / (#demands - i + 1)
  if d >= fair then
    level = fair
    break
  end
  left = left - d
end
local alloc
if level then
  alloc = math.min(demand, level)
else
  alloc = demand + left / #demands
end
alloc = math.max(alloc, rate / 1000000)
local cap = math.max(1, burst * alloc / rate)
local acct = tonumber(b['a:' .. id]) or cap
local since = tonumber(b['s:' .. id]) or now
acct = math.min(cap, acct + math.max(0, now - since) * alloc / 1000)
if ARGV[6] == '1' then
  if not b['r:' .. id] then
    acct = math.min(acct, 0)
    redis.call('HSET', KEYS[1], 'r:' .. id, 1)
  end
elseif b['r:' .. id] then
  redis.call('HDEL', KEYS[1], 'r:' .. id)
end
local least = math.max(1, math.min(want / 2, math.ceil(alloc * 0.15), math.floor(cap)))
local granted = 0
if acct >= least then
  granted = math.min(want, math.floor(acct))
end
acct = acct - granted
local wait = 0
if acct < least then
  wait = math.ceil((least - acct) * 1000 / alloc)
end
redis.call('HSET', KEYS[1], 'd:' .. id, tostring(demand), 's:' .. id, now, 'a:' .. id, tostring(acct))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + ttl)
return {granted, n, wait, math.floor(alloc * 1000)}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A grant whose allocation never binds (these tests are about tokens).
    fn grant(granted: u32, instances: u32) -> Grant {
        Grant {
            granted,
            instances,
            wait: Duration::ZERO,
            rate: 1e6,
        }
    }

    #[test]
    fn starts_local_and_asks_for_a_lease_at_once() {
        let t0 = Instant::now();
        let b = FleetBucket::new(100.0, 10, t0);
        let d = b.admit(t0);
        assert_eq!(d.admit, Ok(()));
        assert_eq!(
            d.lease.map(|l| l.want),
            Some(10),
            "100/s x 200 ms, capped by the burst"
        );
        // One lease in flight at a time.
        assert_eq!(b.admit(t0).lease, None);
        assert_eq!(b.mode(), Mode::Starting);
    }

    #[test]
    fn spends_leased_tokens_and_prefetches_at_half_a_batch() {
        let t0 = Instant::now();
        let b = FleetBucket::new(300.0, 300, t0);
        let first = b.admit(t0).lease.unwrap().want;
        assert_eq!(first, 300, "the first lease asks for the burst");
        b.on_grant(t0, grant(20, 3));
        assert_eq!(b.mode(), Mode::Leasing);
        assert_eq!(b.instances(), 3);
        // Stock 20, under half the 300 asked for: the first request after
        // MIN_LEASE_GAP prefetches, the others spend.
        let mut leases = 0;
        for i in 0..20 {
            let d = b.admit(t0 + ms(60));
            assert_eq!(d.admit, Ok(()), "token {i}");
            leases += usize::from(d.lease.is_some());
        }
        assert_eq!(leases, 1, "one prefetch, no lease per request");
        // Out of stock, lease still pending: refuse, never wait.
        let d = b.admit(t0 + ms(61));
        assert!(d.admit.is_err());
        assert_eq!(d.lease, None);
        b.on_grant(t0 + ms(62), grant(20, 3));
        assert_eq!(b.admit(t0 + ms(62)).admit, Ok(()));
    }

    #[test]
    fn admitted_never_exceeds_what_redis_granted() {
        let t0 = Instant::now();
        let b = FleetBucket::new(100.0, 100, t0);
        let _ = b.admit(t0);
        b.on_grant(t0, grant(7, 1));
        let ok = (0..100).filter(|_| b.admit(t0).admit.is_ok()).count();
        assert_eq!(ok, 7);
    }

    /// A bucket whose 20 tokens, at an allocation of 100/s, expired unspent:
    /// `at` is the first request after that, which asks for the refill.
    fn expired(t0: Instant) -> (FleetBucket, Instant) {
        let b = FleetBucket::new(100.0, 100, t0);
        let _ = b.admit(t0);
        b.on_grant(
            t0,
            Grant {
                granted: 20,
                instances: 1,
                wait: Duration::ZERO,
                rate: 100.0,
            },
        );
        let at = t0 + STOCK_TTL;
        let d = b.admit(at);
        assert_eq!(d.admit, Ok(()), "on credit while the refill is asked for");
        assert!(d.lease.is_some());
        (b, at)
    }

    #[test]
    fn an_expired_stock_only_lends_what_bridges_the_refill() {
        let (b, at) = expired(Instant::now());
        // The allocation's worth of LATE_MIN (2 tokens at 100/s), not the 20.
        assert_eq!(b.admit(at).admit, Ok(()));
        assert!(b.admit(at).admit.is_err());
        // The refill pays the credit back: 5 granted, 3 left to spend.
        let later = at + ms(1);
        b.on_grant(
            later,
            Grant {
                granted: 5,
                instances: 1,
                wait: Duration::ZERO,
                rate: 100.0,
            },
        );
        let ok = (0..100).filter(|_| b.admit(later).admit.is_ok()).count();
        assert_eq!(ok, 3);
    }

    #[test]
    fn credit_a_dry_account_cannot_cover_comes_out_of_the_next_grant() {
        let (b, at) = expired(Instant::now());
        assert_eq!(b.admit(at).admit, Ok(()));
        b.on_grant(
            at + ms(1),
            Grant {
                granted: 0,
                instances: 1,
                wait: ms(50),
                rate: 100.0,
            },
        );
        // The limit binds: nothing lent again while the account refills.
        for i in 2..51 {
            let d = b.admit(at + ms(i));
            assert!(d.admit.is_err(), "at {i} ms");
            assert_eq!(d.lease, None);
        }
        let refill = at + ms(51);
        let d = b.admit(refill);
        assert!(d.admit.is_err());
        assert!(d.lease.is_some());
        b.on_grant(
            refill,
            Grant {
                granted: 10,
                instances: 1,
                wait: Duration::ZERO,
                rate: 100.0,
            },
        );
        let ok = (0..100).filter(|_| b.admit(refill).admit.is_ok()).count();
        assert_eq!(ok, 8, "10 granted, 2 of them spent on credit");
    }

    #[test]
    fn credit_left_when_the_lease_fails_is_paid_by_the_local_limit() {
        let (b, at) = expired(Instant::now());
        assert_eq!(b.admit(at).admit, Ok(()));
        let failed = at + ms(1);
        b.on_failure(failed);
        assert_eq!(b.mode(), Mode::Fallback);
        // Entered empty at 100/s, two tokens owed: the first local token
        // comes 30 ms later instead of 10.
        assert!(b.admit(failed + ms(29)).admit.is_err());
        assert_eq!(b.admit(failed + ms(30)).admit, Ok(()));
    }

    #[test]
    fn a_dry_account_is_not_asked_again_before_it_refills() {
        let t0 = Instant::now();
        let b = FleetBucket::new(100.0, 100, t0);
        let _ = b.admit(t0);
        b.on_grant(
            t0,
            Grant {
                granted: 0,
                instances: 2,
                wait: ms(80),
                rate: 50.0,
            },
        );
        // The account is this instance's own: nobody else takes its refill.
        for step in 0..80 {
            let d = b.admit(t0 + ms(step));
            assert!(d.admit.is_err());
            assert_eq!(d.lease, None, "at {step} ms");
        }
        assert!(b.admit(t0 + ms(80)).lease.is_some());
    }

    #[test]
    fn leased_tokens_are_spent_at_the_allocation_not_as_they_land() {
        let t0 = Instant::now();
        let b = FleetBucket::new(300.0, 300, t0);
        let _ = b.admit(t0);
        // 60 tokens at once, for an allocation of 100/s: PACE_WINDOW's worth
        // (20) goes at once, the rest at 100/s, however hard requests come.
        b.on_grant(
            t0,
            Grant {
                granted: 60,
                instances: 3,
                wait: Duration::ZERO,
                rate: 100.0,
            },
        );
        let mut at_once = 0;
        while b.admit(t0).admit.is_ok() {
            at_once += 1;
        }
        assert_eq!(at_once, 20);
        let refused = b.admit(t0);
        assert_eq!(refused.admit, Err(ms(10)), "the next token of 100/s");
        // One request per millisecond for 400 ms: 100/s of it admitted.
        let later = (1..=400)
            .filter(|i| b.admit(t0 + ms(*i)).admit.is_ok())
            .count();
        assert_eq!(later, 40);
    }

    /// Answers `want` after `delay` of paused time, as the driver would:
    /// `Some(grant)` from Redis, `None` a failed lease.
    fn answer(b: &Arc<FleetBucket>, delay: Duration, result: Option<Grant>) {
        let b = Arc::clone(b);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            match result {
                Some(g) => b.on_grant(Instant::now(), g),
                None => b.on_failure(Instant::now()),
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_falls_back_to_the_share_of_the_last_known_fleet() {
        let b = Arc::new(FleetBucket::new(300.0, 30, Instant::now()));
        let _ = b.admit(Instant::now());
        b.on_grant(Instant::now(), grant(0, 3));
        advance(ms(100)).await;
        let d = b.admit(Instant::now());
        assert!(d.lease.is_some());
        answer(&b, ms(1), None);
        // Auto-advance: the answer (due at 1 ms) runs before this sleep ends.
        tokio::time::sleep(ms(2)).await;
        assert_eq!(b.mode(), Mode::Fallback);
        // Local limit: 100/s, entered empty. Over 1 s offered 1000/s: ~100 admitted.
        let mut ok = 0;
        for _ in 0..1000 {
            advance(ms(1)).await;
            let d = b.admit(Instant::now());
            ok += usize::from(d.admit.is_ok());
            if d.lease.is_some() {
                b.on_failure(Instant::now());
            }
        }
        assert!((98..=101).contains(&ok), "{ok}");
    }

    #[tokio::test(start_paused = true)]
    async fn never_known_fleet_falls_back_to_the_whole_rate() {
        let b = FleetBucket::new(50.0, 5, Instant::now());
        let _ = b.admit(Instant::now());
        b.on_failure(Instant::now());
        assert_eq!(b.mode(), Mode::Fallback);
        assert_eq!(b.instances(), 1);
        let mut ok = 0;
        for _ in 0..1000 {
            let d = b.admit(Instant::now());
            ok += usize::from(d.admit.is_ok());
            if d.lease.is_some() {
                b.on_failure(Instant::now());
            }
            advance(ms(1)).await;
        }
        assert!((48..=51).contains(&ok), "{ok}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_lease_leaves_the_stock_to_spend_then_falls_back() {
        let b = FleetBucket::new(100.0, 100, Instant::now());
        let _ = b.admit(Instant::now());
        // 40 tokens, under the mark of the first batch: the first request
        // after MIN_LEASE_GAP prefetches, and Redis never answers.
        b.on_grant(Instant::now(), grant(40, 2));
        advance(ms(60)).await;
        assert!(b.admit(Instant::now()).lease.is_some());
        // One request per 10 ms: the 39 tokens left are spent (they were
        // granted), the first request after them finds the lease stalled.
        let mut admitted = 0;
        let fell_back = loop {
            advance(ms(10)).await;
            let d = b.admit(Instant::now());
            if b.mode() == Mode::Fallback {
                assert!(d.admit.is_err(), "the local bucket starts empty");
                break Instant::now();
            }
            assert_eq!(d.admit, Ok(()), "spending the stock meanwhile");
            admitted += 1;
        };
        assert_eq!(admitted, 39);
        let _ = fell_back;
        // ... and admits at the local rate (100/s over 2 instances) from then on.
        advance(ms(20)).await;
        assert_eq!(b.admit(Instant::now()).admit, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_lease_with_nothing_left_to_spend_falls_back_at_once() {
        let b = FleetBucket::new(100.0, 100, Instant::now());
        let _ = b.admit(Instant::now());
        b.on_grant(Instant::now(), grant(20, 2));
        // Drain to trigger a prefetch that Redis never answers.
        advance(ms(60)).await;
        let mut asked = None;
        for _ in 0..20 {
            advance(ms(1)).await;
            if b.admit(Instant::now()).lease.is_some() {
                asked = Some(Instant::now());
            }
        }
        let asked = asked.expect("prefetch");
        assert_eq!(b.mode(), Mode::Leasing);
        // One request per millisecond from then on, the stock spent.
        let fell_back = loop {
            advance(ms(1)).await;
            let _ = b.admit(Instant::now());
            if b.mode() == Mode::Fallback {
                break Instant::now();
            }
        };
        // The round trip measured at 0: the floor, not LEASE_TIMEOUT.
        assert_eq!(fell_back - asked, LATE_MIN);
        advance(ms(20)).await;
        assert_eq!(b.admit(Instant::now()).admit, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn recovers_within_a_second_of_redis_returning() {
        let t0 = Instant::now();
        let b = Arc::new(FleetBucket::new(100.0, 100, t0));
        let redis_back = t0 + Duration::from_secs(2);
        // 200 requests/s; a lease fails after 1 ms while Redis is down (refused).
        let mut tries = 0;
        let mut recovered = None;
        while recovered.is_none() && Instant::now() < redis_back + Duration::from_secs(1) {
            tokio::time::sleep(ms(5)).await;
            let now = Instant::now();
            if b.admit(now).lease.is_some() {
                if now < redis_back {
                    tries += 1;
                    answer(&b, ms(1), None);
                } else {
                    answer(&b, ms(1), Some(grant(20, 1)));
                }
            }
            if now >= redis_back && b.mode() == Mode::Leasing {
                recovered = Some(now);
            }
        }
        // Down: a lease is retried every RETRY_INTERVAL, not per request.
        assert!((8..=9).contains(&tries), "{tries}");
        let recovered = recovered.expect("back on the fleet budget within 1 s");
        assert!(
            recovered - redis_back <= RETRY_INTERVAL + ms(5),
            "{:?}",
            recovered - redis_back
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_grant_after_fallback_is_still_used() {
        let b = FleetBucket::new(100.0, 100, Instant::now());
        let _ = b.admit(Instant::now());
        advance(LEASE_TIMEOUT).await;
        let _ = b.admit(Instant::now());
        assert_eq!(b.mode(), Mode::Fallback);
        advance(ms(1)).await;
        b.on_grant(Instant::now(), grant(5, 1));
        assert_eq!(b.mode(), Mode::Leasing);
    }

    /// A bucket that leased, then lost Redis; `at` is after its first retry is due.
    fn fallen_back(t0: Instant) -> (FleetBucket, Instant) {
        let b = FleetBucket::new(300.0, 300, t0);
        let first = b.admit(t0).lease.unwrap();
        assert!(!first.rejoin, "a starting instance spent nothing locally");
        b.on_grant(t0, grant(300, 3));
        for _ in 0..300 {
            assert!(b.admit(t0).lease.is_none_or(|l| !l.rejoin));
        }
        b.on_failure(t0 + ms(60));
        assert_eq!(b.mode(), Mode::Fallback);
        (b, t0 + ms(60) + RETRY_INTERVAL)
    }

    #[test]
    fn the_first_lease_after_a_fallback_rejoins_and_keeps_the_local_limit_until_a_refill() {
        let t0 = Instant::now();
        let (b, at) = fallen_back(t0);
        let d = b.admit(at);
        assert!(d.lease.unwrap().rejoin);
        // Redis emptied the account: the local share still admits.
        b.on_grant(
            at,
            Grant {
                granted: 0,
                instances: 3,
                wait: ms(50),
                rate: 100.0,
            },
        );
        assert_eq!(b.mode(), Mode::Rejoining);
        let later = at + ms(20);
        let d = b.admit(later);
        assert_eq!(d.admit, Ok(()), "the local limit, not a refusal");
        assert_eq!(d.lease, None, "the refill is not due yet");
        // The refill is asked for without the flag: one rejoin per fallback.
        let d = b.admit(at + ms(50));
        assert!(!d.lease.unwrap().rejoin);
        b.on_grant(at + ms(51), grant(0, 3));
        assert_eq!(
            b.mode(),
            Mode::Leasing,
            "a dry bucket is waited for as usual"
        );
        assert!(b.admit(at + ms(52)).admit.is_err());
    }

    #[test]
    fn back_from_a_fallback_an_instance_keeps_its_local_share_until_the_others_report() {
        let t0 = Instant::now();
        let (b, at) = fallen_back(t0);
        assert!(b.admit(at).lease.is_some());
        // A restarted Redis knows this instance alone and allocates it all.
        let alone = Grant {
            granted: 300,
            instances: 1,
            wait: Duration::ZERO,
            rate: 300.0,
        };
        b.on_grant(at, alone);
        assert_eq!(b.mode(), Mode::Leasing);
        assert_eq!(b.instances(), 3, "not lowered while the others return");
        // Spent at 100/s (300 / 3) from an empty window, not at 300/s.
        let admitted = (1..=500)
            .filter(|i| b.admit(at + ms(*i)).admit.is_ok())
            .count();
        assert_eq!(admitted, 50);
        // Once the others had time to report, Redis is believed again.
        let later = at + DEMAND_TTL;
        b.on_grant(later, alone);
        assert_eq!(b.instances(), 1);
    }

    #[test]
    fn leases_rejoin_from_a_fallback_until_a_grant_and_never_while_leasing() {
        let t0 = Instant::now();
        let (b, at) = fallen_back(t0);
        assert!(b.admit(at).lease.unwrap().rejoin);
        b.on_failure(at + LEASE_TIMEOUT);
        let at = at + LEASE_TIMEOUT + RETRY_INTERVAL;
        assert!(b.admit(at).lease.unwrap().rejoin, "failed: told again");
        b.on_not_sent();
        assert!(b.admit(at).lease.unwrap().rejoin, "not sent: told again");
        b.on_grant(at, grant(10, 3));
        assert_eq!(b.mode(), Mode::Leasing);
        let mut asked = 0;
        for i in 0..10 {
            if let Some(lease) = b.admit(at + ms(60 + i)).lease {
                asked += 1;
                assert!(!lease.rejoin);
            }
        }
        assert_eq!(asked, 1);
    }

    /// A Redis that answers every lease after `delay` and grants all that is
    /// asked (a limit that never binds), on the paused clock. Offered
    /// `offered`/s for `secs`; returns (refused, admitted, leases).
    async fn against_a_slow_redis(
        per_second: f64,
        burst: u32,
        offered: f64,
        delay: Duration,
        secs: u64,
    ) -> (usize, usize, usize) {
        let b = Arc::new(FleetBucket::new(per_second, burst, Instant::now()));
        offer(&b, offered, delay, secs).await
    }

    /// `offered`/s for `secs` to `b`, leases granted in full after `delay`.
    async fn offer(
        b: &Arc<FleetBucket>,
        offered: f64,
        delay: Duration,
        secs: u64,
    ) -> (usize, usize, usize) {
        let end = Instant::now() + Duration::from_secs(secs);
        let (mut refused, mut admitted, mut leases) = (0, 0, 0);
        let mut carry = 0.0;
        while Instant::now() < end {
            tokio::time::sleep(ms(1)).await;
            carry += offered / 1000.0;
            while carry >= 1.0 {
                carry -= 1.0;
                let d = b.admit(Instant::now());
                match d.admit {
                    Ok(()) => admitted += 1,
                    Err(_) => refused += 1,
                }
                if let Some(Lease { want, .. }) = d.lease {
                    leases += 1;
                    let b = b.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        b.on_grant(Instant::now(), grant(want, 1));
                    });
                }
            }
        }
        (refused, admitted, leases)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_slower_than_half_a_batch_is_asked_for_early_enough() {
        // 150 ms per lease (under the 200 ms timeout): half of a 200 ms batch
        // runs out before the answer arrives unless the low-water mark
        // covers the round trip.
        let (refused, admitted, leases) =
            against_a_slow_redis(1000.0, 1000, 900.0, ms(150), 5).await;
        assert_eq!(refused, 0, "{admitted} admitted, {leases} leases");
        assert!(leases * 10 <= admitted, "{leases} leases for {admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stock_about_to_expire_is_refreshed_before_it_does() {
        // A big first batch (the burst) that the instance does not spend
        // within STOCK_TTL: the refill must be asked for before it expires.
        let (refused, admitted, leases) =
            against_a_slow_redis(50_000.0, 50_000, 12_000.0, ms(5), 4).await;
        assert_eq!(refused, 0, "{admitted} admitted, {leases} leases");
        assert!(leases * 10 <= admitted, "{leases} leases for {admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_back_after_an_idle_second_is_not_refused_while_the_refill_is_asked() {
        // Rounds of steady load with idle seconds between them (as in
        // `bench/overload.py cpu`): the stock left at the end of a round
        // expires in the gap, and the next round starts before the refill
        // is answered.
        let b = Arc::new(FleetBucket::new(1e6, 1_000_000, Instant::now()));
        let (mut refused, mut admitted, mut leases) = (0, 0, 0);
        for _ in 0..3 {
            let (r, a, l) = offer(&b, 32_000.0, ms(1), 4).await;
            (refused, admitted, leases) = (refused + r, admitted + a, leases + l);
            tokio::time::sleep(Duration::from_secs(8)).await;
        }
        assert_eq!(refused, 0, "{admitted} admitted, {leases} leases");
        assert!(leases * 1000 <= admitted, "{leases} leases for {admitted}");
    }
}
