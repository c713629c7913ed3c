//! The reload action as the admin API sees it: a trait the app implements, the outcome
//! `POST /_ops/reload` answers with, and the `last_reload` that `/_ops/status` shows.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;

use crate::telemetry::events::now_rfc3339;

/// Re-reads the config and applies it, or keeps the running one.
pub trait Reload: Send + Sync + 'static {
    fn reload(&self) -> impl Future<Output = ReloadOutcome> + Send;
    /// The outcome of the latest load or reload.
    fn last(&self) -> Arc<ReloadStatus>;
}

#[derive(Debug, Clone)]
pub enum ReloadOutcome {
    Applied { warnings: Vec<String> },
    Failed(String),
}

/// `last_reload` of `/_ops/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    pub result: &'static str,
    pub at: String,
    pub error: Option<String>,
}

impl ReloadStatus {
    pub fn initial() -> Self {
        Self {
            result: "success",
            at: now_rfc3339(),
            error: None,
        }
    }
}
