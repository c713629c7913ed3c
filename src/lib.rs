//! opsgate: a sidecar health/ops proxy.
//!
//! # Layout
//! - `config`: the TOML file, defaults, validation (pure).
pub mod config;
