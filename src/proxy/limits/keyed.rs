//! Keyed token buckets: one GCRA bucket per client IP or header value, at most
//! `max_keys` of them, the least recently used dropped first.
//!
//! Used by route rate limits with `key = "client_ip" | "header:<Name>"` (a
//! `key = "route"` limit keeps the single-atomic [`RateLimiter`](super::super::admission::RateLimiter)).
//! Keys are reduced to a 64-bit SipHash with a per-limiter random seed, so a
//! lookup allocates nothing and a client cannot aim collisions at another key.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::admission::Gcra;
use crate::proxy::clock::nanos_since;

/// What a keyed bucket is keyed by, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub enum KeyRef<'a> {
    Ip(IpAddr),
    Bytes(&'a [u8]),
}

/// The map's key is already a keyed SipHash: hashing it again buys nothing.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in so the hasher stays total.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

const NIL: u32 = u32::MAX;

struct Node<V> {
    key: u64,
    value: V,
    prev: u32,
    next: u32,
}

/// One shard: a hash index into a slab of nodes threaded as an LRU list
/// (head = most recent). Every operation is O(1) and, once the slab is at
/// capacity, allocation-free.
struct Shard<V> {
    index: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    nodes: Vec<Node<V>>,
    head: u32,
    tail: u32,
    capacity: usize,
}

impl<V> Shard<V> {
    fn new(capacity: usize) -> Self {
        Self {
            index: HashMap::default(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.max(1),
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old == NIL {
            self.tail = i;
        } else {
            self.nodes[old as usize].prev = i;
        }
        self.head = i;
    }

    /// The value for `key`, created by `make` when absent (evicting the least
    /// recently used key when full); marks it most recently used.
    fn get_or_insert_with(&mut self, key: u64, make: impl FnOnce() -> V) -> &mut V {
        if let Some(&i) = self.index.get(&key) {
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return &mut self.nodes[i as usize].value;
        }
        let i = if self.nodes.len() < self.capacity {
            self.nodes.push(Node {
                key,
                value: make(),
                prev: NIL,
                next: NIL,
            });
            (self.nodes.len() - 1) as u32
        } else {
            let i = self.tail;
            self.unlink(i);
            let n = &mut self.nodes[i as usize];
            self.index.remove(&n.key);
            n.key = key;
            n.value = make();
            i
        };
        self.index.insert(key, i);
        self.push_front(i);
        &mut self.nodes[i as usize].value
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

/// A bounded map from request keys to per-key state, shared by all requests
/// of one route.
///
/// Sharded `std::sync::Mutex`es rather than one lock or a concurrent map: a
/// request locks one shard of 16 for a few dozen nanoseconds and never across
/// an `.await`, so two requests contend only when their keys land in the same
/// shard at the same instant. DashMap has no bound and no LRU; caches with a
/// bound (moka) evict asynchronously and may refuse to admit a new key, and a
/// refused key would get a fresh bucket on every request, that is no limit at
/// all. LRU order is kept per shard: the key dropped is the least recently
/// used of its shard, an approximation of the global order that is exact with
/// one shard (used for `max_keys` below 1024).
pub struct KeyedMap<V> {
    seed: RandomState,
    /// Power of two; the low bits of a key's hash pick its shard.
    shards: Box<[Mutex<Shard<V>>]>,
}

impl<V> KeyedMap<V> {
    pub fn new(max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let n = if max_keys >= 1024 { 16 } else { 1 };
        let per_shard = max_keys / n;
        Self {
            seed: RandomState::new(),
            shards: (0..n).map(|_| Mutex::new(Shard::new(per_shard))).collect(),
        }
    }

    /// The key's 64-bit identity in this map.
    pub fn hash(&self, key: KeyRef<'_>) -> u64 {
        let mut h = self.seed.build_hasher();
        match key {
            KeyRef::Ip(ip) => {
                h.write_u8(0);
                match ip.to_canonical() {
                    IpAddr::V4(v4) => h.write(&v4.octets()),
                    IpAddr::V6(v6) => h.write(&v6.octets()),
                }
            }
            KeyRef::Bytes(b) => {
                h.write_u8(1);
                h.write(b);
            }
        }
        h.finish()
    }

    /// Runs `f` on the state of `key` (created by `make` if absent) under its
    /// shard's lock. `f` must not block.
    pub fn with<R>(
        &self,
        key: KeyRef<'_>,
        make: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let hash = self.hash(key);
        let shard = &self.shards[(hash as usize) & (self.shards.len() - 1)];
        // A panic under the lock cannot leave a shard half-updated in a way that
        // matters more than refusing service would: keep going with its state.
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        f(shard.get_or_insert_with(hash, make))
    }

    /// Keys held now (for status and tests).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `per_second` / `burst` for every key of a route, keys bounded by `max_keys`.
pub struct KeyedLimiter {
    gcra: Gcra,
    base: Instant,
    buckets: KeyedMap<u64>,
}

impl KeyedLimiter {
    pub fn new(per_second: f64, burst: u32, max_keys: usize) -> Self {
        Self::new_at(per_second, burst, max_keys, Instant::now())
    }

    /// As [`KeyedLimiter::new`] with an explicit clock origin.
    pub fn new_at(per_second: f64, burst: u32, max_keys: usize, now: Instant) -> Self {
        Self {
            gcra: Gcra::new(per_second, burst),
            base: now,
            buckets: KeyedMap::new(max_keys),
        }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is available.
    pub fn try_acquire(&self, key: KeyRef<'_>, now: Instant) -> Result<(), Duration> {
        let at = nanos_since(self.base, now);
        // A new key starts with a full burst: tat 0 is "long ago".
        self.buckets
            .with(key, || 0, |tat| self.gcra.acquire(tat, at))
    }

    /// Keys with a bucket now.
    pub fn keys(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ip(n: u32) -> KeyRef<'static> {
        KeyRef::Ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let t0 = Instant::now();
        let rl = KeyedLimiter::new_at(10.0, 2, 100, t0);
        assert!(rl.try_acquire(ip(1), t0).is_ok());
        assert!(rl.try_acquire(ip(1), t0).is_ok());
        assert_eq!(rl.try_acquire(ip(1), t0), Err(ms(100)));
        // Another client is not affected by the first one's exhaustion.
        assert!(rl.try_acquire(ip(2), t0).is_ok());
        assert!(rl.try_acquire(ip(2), t0).is_ok());
        assert!(rl.try_acquire(ip(2), t0).is_err());
        assert_eq!(rl.try_acquire(ip(1), t0 + ms(100)), Ok(()));
        assert_eq!(rl.keys(), 2);
    }

    #[test]
    fn header_values_and_ips_are_distinct_keys() {
        let t0 = Instant::now();
        let rl = KeyedLimiter::new_at(1.0, 1, 100, t0);
        assert!(rl.try_acquire(KeyRef::Bytes(b"key-a"), t0).is_ok());
        assert!(rl.try_acquire(KeyRef::Bytes(b"key-a"), t0).is_err());
        assert!(rl.try_acquire(KeyRef::Bytes(b"key-b"), t0).is_ok());
        assert!(rl.try_acquire(KeyRef::Bytes(b"10.0.0.1"), t0).is_ok());
        assert!(rl.try_acquire(ip(1), t0).is_ok());
    }

    #[test]
    fn a_mapped_v6_address_is_the_same_client_as_its_v4() {
        let t0 = Instant::now();
        let rl = KeyedLimiter::new_at(1.0, 1, 100, t0);
        let v4: IpAddr = "10.0.0.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert!(rl.try_acquire(KeyRef::Ip(v4), t0).is_ok());
        assert!(rl.try_acquire(KeyRef::Ip(mapped), t0).is_err());
    }

    #[test]
    fn keys_are_bounded_and_the_least_recently_used_goes_first() {
        let t0 = Instant::now();
        let rl = KeyedLimiter::new_at(1.0, 1, 3, t0);
        for n in 1..=3 {
            assert!(rl.try_acquire(ip(n), t0).is_ok());
        }
        // Touch 1: now 2 is the least recently used.
        assert!(rl.try_acquire(ip(1), t0).is_err());
        assert!(rl.try_acquire(ip(4), t0).is_ok());
        assert_eq!(rl.keys(), 3);
        // 1, 3 and 4 are still limited; 2 was dropped and starts afresh.
        assert!(rl.try_acquire(ip(1), t0).is_err());
        assert!(rl.try_acquire(ip(3), t0).is_err());
        assert!(rl.try_acquire(ip(4), t0).is_err());
        assert!(rl.try_acquire(ip(2), t0).is_ok());
        assert_eq!(rl.keys(), 3);
    }

    #[test]
    fn many_keys_stay_within_max_keys_across_shards() {
        let t0 = Instant::now();
        let rl = KeyedLimiter::new_at(1.0, 1, 4096, t0);
        for n in 0..50_000 {
            let _ = rl.try_acquire(ip(n), t0);
        }
        assert!(rl.keys() <= 4096, "{}", rl.keys());
        assert!(rl.keys() >= 4000, "shards fill evenly: {}", rl.keys());
        // The most recent keys are all still there (and limited).
        for n in 49_900..50_000 {
            assert!(rl.try_acquire(ip(n), t0).is_err(), "key {n} was evicted");
        }
    }

    #[test]
    fn lru_list_survives_random_operations() {
        // Model check against a Vec-based LRU.
        let mut shard: Shard<u32> = Shard::new(5);
        let mut model: Vec<u64> = Vec::new();
        let mut x: u64 = 12345;
        for step in 0..10_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = (x >> 33) % 9;
            *shard.get_or_insert_with(key, || step) += 0;
            if let Some(p) = model.iter().position(|&k| k == key) {
                model.remove(p);
            } else if model.len() == 5 {
                model.pop();
            }
            model.insert(0, key);
            let mut order = Vec::new();
            let mut i = shard.head;
            while i != NIL {
                order.push(shard.nodes[i as usize].key);
                i = shard.nodes[i as usize].next;
            }
            assert_eq!(order, model, "step {step}");
            assert_eq!(shard.len(), model.len());
        }
    }

    #[test]
    fn sustained_rate_per_key_matches_per_second_plus_burst() {
        let t0 = Instant::now();
        let rl = KeyedLimiter::new_at(50.0, 10, 10, t0);
        let mut admitted = [0usize; 2];
        for step in 0..10_000 {
            for (k, a) in admitted.iter_mut().enumerate() {
                *a += usize::from(rl.try_acquire(ip(k as u32), t0 + ms(step)).is_ok());
            }
        }
        for a in admitted {
            assert!((509..=511).contains(&a), "{a}");
        }
    }

    #[test]
    fn concurrent_callers_on_one_key_share_exactly_one_burst() {
        let t0 = Instant::now();
        let rl = Arc::new(KeyedLimiter::new_at(1.0, 100, 100_000, t0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rl = rl.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| rl.try_acquire(KeyRef::Bytes(b"shared"), t0).is_ok())
                        .count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn two_maps_hash_the_same_key_differently() {
        let a: KeyedMap<()> = KeyedMap::new(10);
        let b: KeyedMap<()> = KeyedMap::new(10);
        let k = KeyRef::Bytes(b"x");
        assert_eq!(a.hash(k), a.hash(k));
        assert_ne!(a.hash(k), b.hash(k), "seeded per map");
    }
}
