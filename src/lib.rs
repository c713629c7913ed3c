//! opsgate: a sidecar health/ops proxy.
//!
//! # Layout
//! - `app`: wires the rooms, startup order, reload, shutdown sequence. It gives each
//!   room only the handles it uses; no module below it imports it. `run` binds and
//!   installs signal handlers; `run_on` serves caller-bound listeners (tests, in process).
//! - `cli`: the command line.
//! - `config`: the TOML file, defaults, typed leaf values parsed as the file is read
//!   (`values`, `status`), validation (pure), and the health checks it compiles into
//!   typed specs (`checks`).
//! - `proxy`: the hot path, stage by stage (see its module docs).
//! - `endpoints`: `/_health/*` and `/metrics`, answered by opsgate itself (`endpoints::Handles`).
//! - `admin`: the admin listener and ops API, built from `admin::Admin`: what it reads,
//!   and the actions it may call (`Reload`, which the app implements).
//! - `health`: runs the checks `config` compiled: background tasks, cached snapshot, probes.
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
