//! Turns the checked config into each room's own settings types (health specs,
//! maintenance settings). The only place that knows both sides.

use std::time::SystemTime;

use bytes::Bytes;

use crate::config::{CheckType, Config, MaintenanceMode};
use crate::health::{CheckKind, CheckSpec};
use crate::ops::{MaintenanceSettings, Mode};
use crate::proxy::runtime::is_truthy;

pub fn check_specs(c: &Config) -> Vec<CheckSpec> {
    let h = &c.file.health;
    h.checks
        .iter()
        .map(|s| {
            let url = s.url.clone().unwrap_or_default();
            let kind = match s.kind {
                CheckType::Postgres => CheckKind::Postgres {
                    url,
                    query: s.query.clone(),
                },
                CheckType::Redis => CheckKind::Redis { url },
                CheckType::Http => CheckKind::Http {
                    url,
                    // Absent: SPEC's 200-399.
                    expect_status: s
                        .expect_status
                        .as_ref()
                        .map_or_else(Default::default, |e| e.get().clone()),
                    body_contains: s.body_contains.clone(),
                },
                CheckType::Tcp => CheckKind::Tcp {
                    address: s.address.clone().unwrap_or_default(),
                },
            };
            let mut spec = CheckSpec::new(s.name.clone(), kind);
            spec.interval = s.interval.unwrap_or(h.interval).get();
            spec.timeout = s.timeout.unwrap_or(h.timeout).get();
            spec.critical = s.critical;
            spec.healthy_threshold = s.healthy_threshold;
            spec.unhealthy_threshold = s.unhealthy_threshold;
            spec.degraded_over = s.degraded_over.map(|d| d.get());
            spec
        })
        .collect()
}

/// `[maintenance]` as the ops room takes it. `env` is read here, once per load.
pub fn maintenance_settings(
    c: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MaintenanceSettings, String> {
    let m = &c.file.maintenance;
    let page = match &m.page {
        Some(p) => {
            Some(Bytes::from(std::fs::read(p).map_err(|e| {
                format!("maintenance page {}: {e}", p.display())
            })?))
        }
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
