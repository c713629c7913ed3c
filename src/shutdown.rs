//! Signals and the drain sequence of SPEC §8: readiness off, keep accepting for
//! `shutdown_delay`, stop accepting, close connections gracefully, wait `drain_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{SignalKind, signal};

/// What the daemon is asked to do by the outside world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Reload,
}

/// Shared "we are going away" state: readiness reads it; SIGTERM and the admin API set it.
pub struct Drain {
    /// Set once: readiness answers 503 from then on. An atomic for the probe's cheap read.
    draining: AtomicBool,
    /// Wakes open health streams when draining starts.
    changed: tokio::sync::watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            changed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Drain {
    /// Returns true the first time, so the caller announces the drain once.
    pub fn start(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        if first {
            self.changed.send_replace(true);
        }
        first
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.changed.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Streams SIGTERM/SIGINT as `Terminate` and SIGHUP as `Reload`.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Terminate,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
