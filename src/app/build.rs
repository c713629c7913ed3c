//! Turns the checked config into each room's own settings types (maintenance settings).
//! The only place that knows both sides. Health checks need no conversion: the config pass
//! compiles them into the specs the scheduler runs (`Config::checks`).

use std::path::PathBuf;
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::{Config, MaintenanceMode};
use crate::ops::{MaintenanceSettings, Mode};
use crate::proxy::runtime::is_truthy;

/// The `maintenance.page` file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("maintenance page {}: {source}", path.display())]
pub struct PageError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// `[maintenance]` as the ops room takes it. `env` is read here, once per load.
pub fn maintenance_settings(
    c: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MaintenanceSettings, PageError> {
    let m = &c.file.maintenance;
    let page = match &m.page {
        Some(p) => Some(Bytes::from(std::fs::read(p).map_err(|source| {
            PageError {
                path: p.clone(),
                source,
            }
        })?)),
        None => None,
    };
    let windows = m
        .windows
        .iter()
        .map(|w| (*w.start.get(), *w.end.get()))
        .collect::<Vec<(SystemTime, SystemTime)>>();
    Ok(MaintenanceSettings {
        enabled: m.enabled,
        env_on: !m.env.is_empty() && env(&m.env).is_some_and(|v| is_truthy(&v)),
        flag_file: (!m.flag_file.is_empty()).then(|| m.flag_file.clone().into()),
        mode: match m.mode {
            MaintenanceMode::Writes => Mode::Writes,
            MaintenanceMode::All => Mode::All,
        },
        exempt_prefixes: m.exempt_prefixes.clone(),
        allow_ips: m.allow_ips.clone(),
        bypass_token: (!m.bypass_token.is_empty()).then(|| m.bypass_token.clone()),
        retry_after: m.retry_after.get(),
        status: *m.status.get(),
        content_type: m.content_type.get().clone(),
        body: Bytes::from(m.body.clone()),
        page,
        fail_readiness: m.fail_readiness,
        windows,
    })
}
