//! opsgate: a sidecar health/ops proxy.
//!
//! # Layout
//! The rooms of the daemon; a request's path reads in order from `proxy/`.

pub mod proxy;
