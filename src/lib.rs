//! opsgate: a sidecar health/ops proxy.
//!
//! # Layout
//! - `app`: wires the rooms, startup order, reload, shutdown sequence. It gives each
//!   room only the handles it uses; no module below it imports it.
//! - `cli`: the command line.
//! - `config`: the TOML file, defaults, typed leaf values parsed as the file is read
//!   (`values`, `status`), validation (pure).
//! - `proxy`: the hot path, stage by stage (see its module docs).
//! - `endpoints`: `/_health/*` and `/metrics`, answered by opsgate itself (`endpoints::Handles`).
//! - `admin`: the admin listener and ops API, built from `admin::Admin`: what it reads,
//!   and the actions it may call (`Reload`, which the app implements).
//! - `health`: background dependency checks, cached snapshot, probe bodies.
//! - `ops`: maintenance state and its sources (config, env, flag file, windows, fleet key, override).
//! - `paths`: segment-boundary prefix matching, shared by routing, gates and validation.
//! - `ip_text`: IP addresses as text without `fmt`, for X-Forwarded-For and access lines.
//! - `shutdown`: signals and the drain state.
//! - `telemetry`: metrics registry and logging.
//! - `ctl`, `demo`, `probe`, `inject`: the `ctl`, `demo`, `probe` and `inject` commands.
pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod endpoints;
pub mod health;
pub mod inject;
pub mod ip_text;
pub mod ops;
pub mod paths;
pub mod probe;
pub mod proxy;
pub mod shutdown;
pub mod telemetry;
