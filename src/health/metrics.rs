//! Prometheus families of the health room (SPEC §7): per-check status and duration, overall status.
//! Owned by [`super::Health`]; the families live as long as it does, so reloads only add and
//! remove label sets.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{CheckSpec, Status};

/// Buckets of `health_check_duration_seconds`: 1 ms to 10 s, around usual check timeouts.
const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    check: String,
    critical: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabel {
    check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverallLabel {
    status: &'static str,
}

type HistogramFamily = Family<CheckLabel, Histogram, fn() -> Histogram>;

pub(crate) struct Metrics {
    check_status: Family<StatusLabels, Gauge>,
    duration: HistogramFamily,
    overall: Family<OverallLabel, Gauge>,
}

fn new_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            check_status: Family::default(),
            duration: Family::new_with_constructor(new_histogram as fn() -> Histogram),
            overall: Family::default(),
        }
    }

    /// Families are shared handles: the registry encodes the same ones we update.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "health_check_status",
            "Health check status: 1 healthy, 0 otherwise",
            self.check_status.clone(),
        );
        registry.register(
            "health_check_duration_seconds",
            "Duration of health check runs",
            self.duration.clone(),
        );
        registry.register(
            "health_status",
            "Overall health status: 1 for the current status, 0 for the others",
            self.overall.clone(),
        );
    }

    fn status_labels(spec: &CheckSpec) -> StatusLabels {
        StatusLabels {
            check: spec.name.clone(),
            critical: spec.critical.to_string(),
        }
    }

    pub fn set_check(&self, spec: &CheckSpec, status: Status) {
        let value = i64::from(status == Status::Healthy);
        self.check_status
            .get_or_create(&Self::status_labels(spec))
            .set(value);
    }

    pub fn observe(&self, spec: &CheckSpec, status: Status, latency: Duration) {
        self.set_check(spec, status);
        self.duration
            .get_or_create(&CheckLabel {
                check: spec.name.clone(),
            })
            .observe(latency.as_secs_f64());
    }

    pub fn remove_check(&self, spec: &CheckSpec) {
        self.check_status.remove(&Self::status_labels(spec));
        self.duration.remove(&CheckLabel {
            check: spec.name.clone(),
        });
    }

    /// One series per status the aggregate can take, so a query never meets a series that
    /// is always 0 (`status="unknown"` would be one: the aggregate is never unknown).
    pub fn set_overall(&self, current: Status) {
        for s in Status::OVERALL {
            self.overall
                .get_or_create(&OverallLabel { status: s.as_str() })
                .set(i64::from(s == current));
        }
    }
}
