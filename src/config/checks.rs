//! A health check as the config defines it, typed: each kind carries only its own fields.
//! Compiled from the raw `[[health.checks]]` tables by the validation pass; the health room's
//! scheduler runs these specs as they are.

use std::time::Duration;

use super::defaults as d;
use super::file::{CheckSection, CheckType, HealthSection};
use super::status::StatusRanges;
use crate::telemetry::redact::redact_url;

/// One check as the scheduler needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckSpec {
    /// Unique name; the key for reloads, metrics labels and `/_health/checks/{name}`.
    pub name: String,
    pub kind: CheckKind,
    pub interval: Duration,
    /// Bound on one run; a run that takes longer is `unhealthy` with `timed out after ...`.
    pub timeout: Duration,
    /// Whether this check can make the service unhealthy (and counts for `startup`).
    pub critical: bool,
    /// Consecutive passing results needed to leave `unhealthy` (rise).
    pub healthy_threshold: u32,
    /// Consecutive failing results needed to enter `unhealthy` (fall).
    pub unhealthy_threshold: u32,
    /// A passing run slower than this is `degraded`.
    pub degraded_over: Option<Duration>,
}

impl CheckSpec {
    /// A critical check with the SPEC defaults (10s interval, 3s timeout, thresholds 1).
    pub fn new(name: impl Into<String>, kind: CheckKind) -> Self {
        CheckSpec {
            name: name.into(),
            kind,
            interval: d::CHECK_INTERVAL.get(),
            timeout: d::CHECK_TIMEOUT.get(),
            critical: true,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            degraded_over: None,
        }
    }

    /// The spec of a table whose kind compiled; the `[health]` section gives the defaults.
    pub(super) fn from_section(s: &CheckSection, kind: CheckKind, h: &HealthSection) -> Self {
        CheckSpec {
            name: s.name.clone(),
            kind,
            interval: s.interval.unwrap_or(h.interval).get(),
            timeout: s.timeout.unwrap_or(h.timeout).get(),
            critical: s.critical,
            healthy_threshold: s.healthy_threshold,
            unhealthy_threshold: s.unhealthy_threshold,
            degraded_over: s.degraded_over.map(|d| d.get()),
        }
    }
}

/// What a check probes and how.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckKind {
    /// `SELECT 1` (or `query`) over tokio-postgres; `sslmode=require` uses rustls.
    Postgres { url: String, query: Option<String> },
    /// `PING` over fred; `rediss://` uses rustls.
    Redis { url: String },
    /// `GET url`; passes when the status is in `expect_status` and the body (first 64 KiB)
    /// contains `body_contains`.
    Http {
        url: String,
        expect_status: StatusRanges,
        body_contains: Option<String>,
    },
    /// A TCP connect to `host:port`.
    Tcp { address: String },
}

impl CheckKind {
    /// The config's `type` value: `postgres`, `redis`, `http`, `tcp`.
    pub fn label(&self) -> &'static str {
        match self {
            CheckKind::Postgres { .. } => "postgres",
            CheckKind::Redis { .. } => "redis",
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
        }
    }

    /// What the check points at, with credentials redacted (for status pages and logs).
    pub fn target(&self) -> String {
        match self {
            CheckKind::Postgres { url, .. }
            | CheckKind::Redis { url }
            | CheckKind::Http { url, .. } => redact_url(url),
            CheckKind::Tcp { address } => address.clone(),
        }
    }
}

/// Why a table's kind did not compile: the key to point at and the message.
pub(super) type KindError = (&'static str, String);

/// The typed kind of one table, or the one problem with its target (`url` / `address`).
/// Keys that belong to other kinds are the caller's to report; they are not read here.
pub(super) fn compile_kind(c: &CheckSection) -> Result<CheckKind, KindError> {
    let url = |schemes: &[&str]| -> Result<String, KindError> {
        match &c.url {
            None => Err((
                "url",
                format!("a {:?} check needs `url`", c.kind).to_lowercase(),
            )),
            Some(u) if !schemes.iter().any(|s| u.starts_with(s)) => Err((
                "url",
                format!("url must start with {}", schemes.join(" or ")),
            )),
            Some(u) => Ok(u.clone()),
        }
    };
    match c.kind {
        CheckType::Postgres => {
            url(&["postgres://", "postgresql://"]).map(|url| CheckKind::Postgres {
                url,
                query: c.query.clone(),
            })
        }
        CheckType::Redis => url(&["redis://", "rediss://"]).map(|url| CheckKind::Redis { url }),
        CheckType::Http => url(&["http://", "https://"]).map(|url| CheckKind::Http {
            url,
            // Absent: SPEC's 200-399. A value that did not parse is reported apart, and a
            // config with an error is never run, so its placeholder is never probed.
            expect_status: c
                .expect_status
                .as_ref()
                .filter(|e| e.is_valid())
                .map_or_else(Default::default, |e| e.get().clone()),
            body_contains: c.body_contains.clone(),
        }),
        CheckType::Tcp => match &c.address {
            None => Err(("address", "a tcp check needs `address` (host:port)".into())),
            Some(a)
                if a.rsplit_once(':')
                    .is_none_or(|(_, p)| p.parse::<u16>().is_err()) =>
            {
                Err(("address", format!("address `{a}` must be host:port")))
            }
            Some(a) => Ok(CheckKind::Tcp { address: a.clone() }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, parse_str};

    fn checks(text: &str) -> Vec<CheckSpec> {
        let text = format!("[proxy]\nupstream = \"http://127.0.0.1:3000\"\n{text}");
        parse_str(&text, "t.toml", &Overrides::default(), &|_| None)
            .unwrap()
            .checks
    }

    #[test]
    fn each_kind_compiles_to_its_own_fields_in_file_order() {
        let specs = checks(
            "[health]\ninterval = \"7s\"\n\
             [[health.checks]]\nname = \"db\"\ntype = \"postgres\"\nurl = \"postgres://h/db\"\nquery = \"SELECT 2\"\n\
             [[health.checks]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"redis://h\"\ntimeout = \"1s\"\n\
             [[health.checks]]\nname = \"web\"\ntype = \"http\"\nurl = \"http://h/x\"\nbody_contains = \"ok\"\ndegraded_over = \"200ms\"\n\
             [[health.checks]]\nname = \"port\"\ntype = \"tcp\"\naddress = \"h:5432\"\ncritical = false\nunhealthy_threshold = 3\n",
        );
        let kinds: Vec<&CheckKind> = specs.iter().map(|s| &s.kind).collect();
        assert_eq!(
            kinds,
            [
                &CheckKind::Postgres {
                    url: "postgres://h/db".into(),
                    query: Some("SELECT 2".into()),
                },
                &CheckKind::Redis {
                    url: "redis://h".into(),
                },
                &CheckKind::Http {
                    url: "http://h/x".into(),
                    expect_status: StatusRanges::default(),
                    body_contains: Some("ok".into()),
                },
                &CheckKind::Tcp {
                    address: "h:5432".into(),
                },
            ]
        );
        assert_eq!(specs[0].interval, Duration::from_secs(7));
        assert_eq!(specs[1].timeout, Duration::from_secs(1));
        assert_eq!(specs[0].timeout, d::CHECK_TIMEOUT.get());
        assert_eq!(specs[2].degraded_over, Some(Duration::from_millis(200)));
        assert!(specs[0].critical && !specs[3].critical);
        assert_eq!(specs[3].unhealthy_threshold, 3);
    }

    #[test]
    fn a_written_expect_status_replaces_the_default() {
        let specs = checks(
            "[[health.checks]]\nname = \"web\"\ntype = \"http\"\nurl = \"http://h/\"\nexpect_status = \"204\"\n",
        );
        let CheckKind::Http { expect_status, .. } = &specs[0].kind else {
            panic!("{specs:?}");
        };
        assert!(expect_status.contains(204) && !expect_status.contains(200));
    }
}
