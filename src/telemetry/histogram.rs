//! A histogram whose `observe` is a few relaxed atomic adds, for per-request latency.
//! prometheus-client's own takes a mutex per observation; this one never locks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending, with `+Inf` last.
    bounds: Box<[f64]>,
    /// Per-bucket counts (not cumulative), one per bound.
    counts: Box<[AtomicU64]>,
    /// Sum of observations as f64 bits, updated by compare-and-swap.
    sum: AtomicU64,
    count: AtomicU64,
}

/// Cheap to clone: clones share the same buckets.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Inner>);

impl AtomicHistogram {
    pub fn new(buckets: &[f64]) -> Self {
        let mut bounds: Vec<f64> = buckets.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.push(f64::INFINITY);
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(Inner {
            bounds: bounds.into(),
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .0
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.0.bounds.len() - 1);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        let mut cur = self.0.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self
                .0
                .sum
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .zip(self.0.counts.iter())
            .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
            .collect();
        // Count derived from the buckets read, so count and +Inf always agree in one scrape.
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = f64::from_bits(self.0.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_and_sum() {
        let h = AtomicHistogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        assert_eq!(h.count(), 3);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("lat", "latency", h.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("lat_bucket{le=\"0.1\"} 1"), "{out}");
        assert!(out.contains("lat_bucket{le=\"1.0\"} 2"), "{out}");
        assert!(out.contains("lat_bucket{le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("lat_count 3"), "{out}");
        assert!(out.contains("lat_sum 5.55"), "{out}");
    }
}
