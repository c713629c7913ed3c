//! The ops room: maintenance state, its sources and the maintenance gate decision.
//!
//! Built once in `app.rs` and handed down: the proxy calls [`Maintenance::is_on`] and
//! [`gate::decide`] per request, the admin API reads [`Maintenance::status`] and calls
//! [`Maintenance::set_override`], the reload path calls [`Maintenance::update_settings`],
//! and [`fleet::FleetControl`] feeds the fleet-wide Redis key in. Nothing here serves HTTP.
//!
//! Files: `maintenance.rs` the state and its status, `gate.rs` the pure per-request
//! decision, `flag_file.rs` and `windows.rs` the background sources, `fleet.rs` the
//! Redis key.

pub mod flag_file;
pub mod fleet;
pub mod gate;
pub mod maintenance;
pub mod windows;

pub use fleet::{FleetControl, FleetStatus, fleet_set};
pub use gate::{MaintenanceBody, MaintenanceReject, client_ip, decide};
pub use maintenance::{
    Maintenance, MaintenanceChange, MaintenanceSettings, MaintenanceStatus, Mode, Source, Sources,
};

/// What can go wrong in the ops room (only the fleet key talks to the outside).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Redis URL does not parse; the message never contains the password.
    #[error("invalid redis url {url}: {message}")]
    InvalidUrl { url: String, message: String },
    /// Talking to Redis failed; the message never contains the password.
    #[error("redis {url}: {message}")]
    Redis { url: String, message: String },
}

/// Runs a spawned task until this guard is dropped; how background sources are cancelled.
#[derive(Debug)]
pub(crate) struct TaskGuard(tokio::task::JoinHandle<()>);

impl TaskGuard {
    pub(crate) fn spawn<F>(future: F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        Self(tokio::spawn(future))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
