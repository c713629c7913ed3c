//! A lock-free sliding window of counters over a fixed number of time buckets,
//! clock-injected (the caller turns its `now` into an epoch; no timer, no I/O).
//! The breaker's rate rule and the retry budget are both built on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `K` counters summed over the last `B` buckets of one width each.
///
/// Each bucket is ONE atomic word `tag | counter[0] | .. | counter[K-1]`, every
/// counter `BITS` wide and the tag (the bucket's epoch, mod 2^(64 - K x BITS))
/// in the bits left over. A record is a single CAS on that word, so a bucket
/// whose epoch has passed is recycled (tag rewritten, counters zeroed) in the
/// same step that counts the new event: no lock, no separate reset, and no
/// reader ever sees a bucket half recycled.
///
/// Memory ordering: `Relaxed` throughout, on purpose. Every read-modify-write
/// of a bucket is totally ordered in that word's modification order whatever
/// the ordering, so no count is ever lost or doubled. The words publish no other
/// data (nothing is read *because* a count was seen), so no happens-before edge
/// is needed. And a sum over several buckets is not one atomic snapshot under
/// any ordering (`SeqCst` would not make a multi-word read atomic), so stronger
/// orderings would cost fences on the hot path and buy nothing.
///
/// What that leaves, and callers accept:
/// - [`SlidingWindow::try_record`] re-checks its condition against the current
///   bucket inside the CAS, so racers on the current bucket never overshoot;
///   the older buckets are read once before it, so a decision can miss a record
///   that lands in them concurrently (only a caller with a stale epoch writes
///   there): at most one overshoot per racing thread.
/// - A counter holds at most [`SlidingWindow::MAX`]; an event that would
///   overflow any counter of its bucket is not counted at all (refused), which
///   keeps ratios between counters intact.
/// - A bucket left untouched for exactly a multiple of lcm(`B`, 2^tag_bits)
///   bucket widths (327 680 for the breaker's layout) reads as current: at
///   worst one stale bucket's counts are added.
/// - Epochs are expected not to go back by `B` or more between callers: a
///   record for an older epoch recycles its bucket back to that epoch.
#[derive(Debug)]
pub struct SlidingWindow<const B: usize, const K: usize, const BITS: u32> {
    /// Origin of the epochs.
    base: Instant,
    width_ns: u64,
    buckets: [AtomicU64; B],
}

impl<const B: usize, const K: usize, const BITS: u32> SlidingWindow<B, K, BITS> {
    /// The largest value one counter of one bucket holds.
    pub const MAX: u64 = (1 << BITS) - 1;
    /// The counters' bits: the tag sits above them.
    const COUNT_BITS: u32 = K as u32 * BITS;
    const TAG_MASK: u64 = u64::MAX >> Self::COUNT_BITS;
    /// Checked at compile time for each layout used: at least one bucket and
    /// counter, and a tag of at least 16 bits so epochs rarely alias.
    const LAYOUT: () = assert!(
        B > 0 && K > 0 && BITS > 0 && BITS < 64 && (K as u64) * (BITS as u64) <= 48,
        "a bucket word needs at least 16 tag bits"
    );

    /// An empty window whose epochs start at `base`, each bucket `width` long
    /// (at least 1 ns): it covers the last `B x width`.
    pub fn new(base: Instant, width: Duration) -> Self {
        let () = Self::LAYOUT;
        Self {
            base,
            width_ns: u64::try_from(width.as_nanos()).unwrap_or(u64::MAX).max(1),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The bucket number of `now`: whole widths since `base` (0 before it).
    /// Read it once per event and pass it to every call for that event, so the
    /// record and the reads agree on the bucket and the clock is read once.
    pub fn epoch(&self, now: Instant) -> u64 {
        crate::proxy::clock::nanos_since(self.base, now) / self.width_ns
    }

    /// Adds `deltas` to the bucket of `epoch`. `false` (nothing counted) when a
    /// counter of that bucket would pass [`Self::MAX`].
    pub fn record(&self, epoch: u64, deltas: [u64; K]) -> bool {
        self.update(epoch, [0; K], |_| true, deltas)
    }

    /// Adds `deltas` to the bucket of `epoch` only if `admit` accepts the
    /// window's totals as they are before this record (the current bucket
    /// included, read in the CAS). `false` when refused, by `admit` or by a full
    /// counter.
    pub fn try_record(
        &self,
        epoch: u64,
        deltas: [u64; K],
        admit: impl Fn(&[u64; K]) -> bool,
    ) -> bool {
        let older = self.sum_from(epoch, 1);
        self.update(epoch, older, admit, deltas)
    }

    /// The counters summed over the window ending with the bucket of `epoch`.
    pub fn sum(&self, epoch: u64) -> [u64; K] {
        self.sum_from(epoch, 0)
    }

    /// Forgets every count.
    pub fn clear(&self) {
        for bucket in &self.buckets {
            bucket.store(0, Ordering::Relaxed);
        }
    }

    fn update(
        &self,
        epoch: u64,
        older: [u64; K],
        admit: impl Fn(&[u64; K]) -> bool,
        deltas: [u64; K],
    ) -> bool {
        self.bucket(epoch)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let current = Self::unpack(word, epoch).unwrap_or([0; K]);
                let mut total = older;
                let mut next = current;
                for i in 0..K {
                    total[i] += current[i];
                    next[i] = current[i].checked_add(deltas[i])?;
                    if next[i] > Self::MAX {
                        return None;
                    }
                }
                admit(&total).then(|| Self::pack(epoch, next))
            })
            .is_ok()
    }

    /// Sum of the buckets `back..B` epochs before `epoch` (0: `epoch` included).
    fn sum_from(&self, epoch: u64, back: u64) -> [u64; K] {
        let mut total = [0; K];
        for back in back..B as u64 {
            let Some(e) = epoch.checked_sub(back) else {
                break;
            };
            if let Some(counts) = Self::unpack(self.bucket(e).load(Ordering::Relaxed), e) {
                for (t, c) in total.iter_mut().zip(counts) {
                    *t += c;
                }
            }
        }
        total
    }

    fn bucket(&self, epoch: u64) -> &AtomicU64 {
        &self.buckets[(epoch % B as u64) as usize]
    }

    fn pack(epoch: u64, counts: [u64; K]) -> u64 {
        counts
            .iter()
            .fold(epoch & Self::TAG_MASK, |word, &c| (word << BITS) | c)
    }

    /// The bucket's counters if its tag is `epoch`'s, else `None` (stale).
    fn unpack(word: u64, epoch: u64) -> Option<[u64; K]> {
        if word >> Self::COUNT_BITS != epoch & Self::TAG_MASK {
            return None;
        }
        Some(std::array::from_fn(|i| {
            (word >> ((K - 1 - i) as u32 * BITS)) & Self::MAX
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Small counters (max 15) so saturation is reachable in tests.
    type Small = SlidingWindow<4, 2, 4>;

    #[test]
    fn counts_sum_over_the_last_b_buckets_only() {
        let t0 = Instant::now();
        let w = SlidingWindow::<10, 3, 16>::new(t0, ms(100));
        assert!(w.record(w.epoch(t0), [1, 1, 0]));
        assert!(w.record(w.epoch(t0 + ms(99)), [1, 0, 1]));
        assert!(w.record(w.epoch(t0 + ms(500)), [1, 0, 0]));
        assert_eq!(w.sum(w.epoch(t0 + ms(999))), [3, 1, 1]);
        // The first bucket [0, 100 ms) leaves the window at 1 s.
        assert_eq!(w.sum(w.epoch(t0 + ms(1000))), [1, 0, 0]);
        assert_eq!(w.sum(w.epoch(t0 + ms(1499))), [1, 0, 0]);
        assert_eq!(w.sum(w.epoch(t0 + ms(1500))), [0, 0, 0]);
    }

    #[test]
    fn a_stale_bucket_is_recycled_by_the_record_that_reuses_it() {
        let t0 = Instant::now();
        let w = Small::new(t0, ms(10));
        for _ in 0..5 {
            w.record(w.epoch(t0), [1, 1]);
        }
        // Epoch 4 shares epoch 0's bucket: its old counts must not carry over.
        assert!(w.record(w.epoch(t0 + ms(40)), [1, 0]));
        assert_eq!(w.sum(w.epoch(t0 + ms(40))), [1, 0]);
        assert_eq!(
            w.sum(w.epoch(t0 + ms(3_600_000))),
            [0, 0],
            "idle longer than the window"
        );
    }

    #[test]
    fn a_full_counter_refuses_the_whole_event() {
        let t0 = Instant::now();
        let w = Small::new(t0, ms(10));
        for _ in 0..Small::MAX {
            assert!(w.record(w.epoch(t0), [1, 0]));
        }
        assert!(!w.record(w.epoch(t0), [1, 1]), "first counter full");
        assert_eq!(
            w.sum(w.epoch(t0)),
            [15, 0],
            "the second counter did not move either"
        );
        assert!(
            w.record(w.epoch(t0 + ms(10)), [1, 1]),
            "the next bucket has room"
        );
        assert_eq!(w.sum(w.epoch(t0 + ms(10))), [16, 1]);
    }

    #[test]
    fn try_record_admits_on_the_totals_before_the_event() {
        let t0 = Instant::now();
        let w = Small::new(t0, ms(10));
        w.record(w.epoch(t0), [0, 2]);
        w.record(w.epoch(t0 + ms(10)), [0, 1]);
        let seen = std::sync::Mutex::new(Vec::new());
        let below_five = |t: &[u64; 2]| {
            seen.lock().unwrap().push(*t);
            t[1] < 5
        };
        let now = t0 + ms(10);
        assert!(w.try_record(w.epoch(now), [0, 1], below_five));
        assert!(w.try_record(w.epoch(now), [0, 1], below_five));
        assert!(!w.try_record(w.epoch(now), [0, 1], below_five));
        assert_eq!(w.sum(w.epoch(now)), [0, 5]);
        assert_eq!(seen.into_inner().unwrap(), [[0, 3], [0, 4], [0, 5]]);
    }

    #[test]
    fn clear_forgets_everything() {
        let t0 = Instant::now();
        let w = Small::new(t0, ms(10));
        w.record(w.epoch(t0), [3, 0]);
        w.record(w.epoch(t0 + ms(25)), [0, 3]);
        w.clear();
        assert_eq!(w.sum(w.epoch(t0 + ms(25))), [0, 0]);
    }

    #[test]
    fn time_before_the_base_is_epoch_zero_and_a_zero_width_is_one_nanosecond() {
        let t0 = Instant::now();
        let w = Small::new(t0 + ms(5), Duration::ZERO);
        assert_eq!(w.epoch(t0), 0);
        assert_eq!(w.epoch(t0 + ms(5) + Duration::from_nanos(7)), 7);
    }

    /// Runs `f(thread number)` on four threads at once; their results in order.
    fn on_four_threads<T: Send>(f: impl Fn(u64) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = (0..4).map(|i| s.spawn(move || f(i))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn concurrent_records_are_never_lost() {
        let t0 = Instant::now();
        let w = SlidingWindow::<10, 2, 20>::new(t0, ms(100));
        on_four_threads(|i| {
            for n in 0..5_000u64 {
                w.record(w.epoch(t0 + ms(n % 7 * 100)), [1, u64::from(i % 2 == 0)]);
            }
        });
        assert_eq!(w.sum(w.epoch(t0 + ms(600))), [20_000, 10_000]);
    }

    #[test]
    fn concurrent_try_records_never_overshoot_within_one_bucket() {
        let t0 = Instant::now();
        let w = SlidingWindow::<10, 2, 20>::new(t0, ms(100));
        let granted = on_four_threads(|_| {
            (0..100)
                .filter(|_| w.try_record(w.epoch(t0), [0, 1], |t| t[1] < 50))
                .count()
        });
        assert_eq!(granted.iter().sum::<usize>(), 50);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Record([u64; 2]),
        /// Admit while the second counter stays below the given share of the first plus a floor.
        TryRecord([u64; 2], u64),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3u64, 0..3u64).prop_map(|(a, b)| Op::Record([a, b])),
            2 => (0..3u64, 0..3u64, 0..8u64).prop_map(|(a, b, f)| Op::TryRecord([a, b], f)),
            2 => (0..40u64).prop_map(Op::Advance),
        ]
    }

    /// Runs `ops` on a real window and on a naive model (every event kept in a
    /// list, sums recomputed from scratch) and asserts they agree at every step.
    fn check_against_model<const B: usize, const BITS: u32>(ops: &[Op], width_ms: u64) {
        let t0 = Instant::now();
        let w = SlidingWindow::<B, 2, BITS>::new(t0, ms(width_ms));
        let max = SlidingWindow::<B, 2, BITS>::MAX;
        let mut now_ms = 0u64;
        let mut events: Vec<(u64, [u64; 2])> = Vec::new();
        // Sum of the events whose epoch is in `lo..=hi`.
        let total = |events: &[(u64, [u64; 2])], lo: u64, hi: u64| {
            let mut t = [0u64; 2];
            for (_, d) in events.iter().filter(|(e, _)| (lo..=hi).contains(e)) {
                t[0] += d[0];
                t[1] += d[1];
            }
            t
        };
        let window = |epoch: u64| (epoch.saturating_sub(B as u64 - 1), epoch);
        for op in ops {
            let epoch = now_ms / width_ms;
            let now = t0 + ms(now_ms);
            let in_bucket = total(&events, epoch, epoch);
            let fits = |d: &[u64; 2]| (0..2).all(|i| in_bucket[i] + d[i] <= max);
            match op {
                Op::Record(d) => {
                    let want = fits(d);
                    assert_eq!(
                        w.record(w.epoch(now), *d),
                        want,
                        "record {d:?} at {now_ms} ms"
                    );
                    if want {
                        events.push((epoch, *d));
                    }
                }
                Op::TryRecord(d, floor) => {
                    let (lo, hi) = window(epoch);
                    let t = total(&events, lo, hi);
                    let admit = |t: &[u64; 2]| t[1] < t[0] / 2 + floor;
                    let want = fits(d) && admit(&t);
                    assert_eq!(
                        w.try_record(w.epoch(now), *d, admit),
                        want,
                        "try_record {d:?} at {now_ms} ms with totals {t:?}"
                    );
                    if want {
                        events.push((epoch, *d));
                    }
                }
                Op::Advance(n) => now_ms += n,
            }
            let (lo, hi) = window(now_ms / width_ms);
            assert_eq!(
                w.sum(w.epoch(t0 + ms(now_ms))),
                total(&events, lo, hi),
                "sum at {now_ms} ms"
            );
        }
    }

    proptest! {
        #[test]
        fn matches_a_naive_model_with_small_counters(ops in prop::collection::vec(op(), 0..300)) {
            check_against_model::<4, 4>(&ops, 10);
        }

        #[test]
        fn matches_a_naive_model_with_the_budget_layout(ops in prop::collection::vec(op(), 0..300)) {
            check_against_model::<10, 20>(&ops, 7);
        }
    }
}
