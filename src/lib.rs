//! opsgate: a sidecar health/ops proxy.
//!
//! # Layout
//! The rooms of the daemon; a request's path reads in order from `proxy/`.
//!
//! - `health`: dependency checks in the background, a cached snapshot, and the bodies of
//!   `/_health/*`, `opsgate check` and `opsgate wait`.

pub mod health;
