//! Metrics registry, logging setup and credential redaction for everything that reports.
//! Built once in `app`; other rooms get handles, never a global.

pub mod access;
pub mod batch;
pub mod events;
pub mod histogram;
pub mod logging;
pub mod metrics;
pub mod redact;
pub mod throttle;

pub use metrics::{HttpMetrics, MetricsRegistry, RouteMetrics};
