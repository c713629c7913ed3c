//! The configuration: the TOML file, its defaults, `${VAR}` expansion and validation.
//! Pure (no sockets, no tasks): `load` gives a checked `Config` or every error with line:col.

pub mod checks;
pub mod defaults;
mod diag;
mod expand;
pub mod file;
pub mod status;
pub mod units;
pub mod validate;
pub mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::DeTable;

pub use checks::{CheckKind, CheckSpec};
pub use diag::{ConfigError, Diagnostic};
pub use file::*;
pub use units::{Dur, Size, format_duration, parse_duration, parse_listen};

/// Values from flags and environment that win over the file (SPEC precedence: flag, env, file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub admin_listen: Option<SocketAddr>,
}

/// A checked configuration and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file with the shorthand expanded: `proxy.upstream` became `upstreams.app` + route `default`.
    pub file: ConfigFile,
    /// `None` when running on built-in defaults (no file, `--upstream` given).
    pub path: Option<PathBuf>,
    /// sha256 of the file's bytes, hex; empty without a file.
    pub sha256: String,
    /// `[[health.checks]]` compiled, in file order.
    pub checks: Vec<CheckSpec>,
}

/// Where to look for the config file when `--config` and `OPSGATE_CONFIG` are unset.
pub const DEFAULT_PATHS: &[&str] = &["./opsgate.toml", "/etc/opsgate/opsgate.toml"];

/// Picks the config path: the explicit one, else the first default that exists.
pub fn resolve_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    DEFAULT_PATHS.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Reads and checks the file at `path` (or built-in defaults when `None`), reading `${VAR}`s
/// through `env`.
pub fn load(
    path: Option<&Path>,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let Some(path) = path else {
        let mut file = ConfigFile::default();
        file.admin.token = admin_token_default(env);
        apply_overrides(&mut file, overrides);
        return finish(file, None, String::new(), "<defaults>", "", None);
    };
    let name = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::single(&name, format!("cannot read config file: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| ConfigError::single(&name, "config file is not UTF-8"))?;
    let sha = sha256_hex(text.as_bytes());
    let mut config = parse_str(&text, &name, overrides, env)?;
    config.path = Some(path.to_path_buf());
    config.sha256 = sha;
    Ok(config)
}

/// Parses config text; `name` is used in messages.
pub fn parse_str(
    text: &str,
    name: &str,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let source = diag::Source { text };
    let at = |offset: usize| Some(source.line_col(offset));
    let mut spanned = DeTable::parse(text).map_err(|e| ConfigError {
        file: name.to_string(),
        diagnostics: vec![Diagnostic {
            at: e.span().and_then(|s| at(s.start)),
            message: e.message().trim().to_string(),
        }],
    })?;

    let mut env_errors = Vec::new();
    expand::expand_table(spanned.get_mut(), env, &mut env_errors);
    if !env_errors.is_empty() {
        return Err(ConfigError {
            file: name.to_string(),
            diagnostics: env_errors
                .into_iter()
                .map(|(span, message)| Diagnostic {
                    at: at(span.start),
                    message,
                })
                .collect(),
        });
    }

    let for_spans = spanned.clone();
    // serde stops at the first bad value: drop each offending key and deserialize again,
    // so one run reports every value error (bounded: each round removes one key).
    let mut parse_errors: Vec<Diagnostic> = Vec::new();
    let file = loop {
        match ConfigFile::deserialize(toml::de::Deserializer::from(spanned.clone())) {
            Ok(file) => break Some(file),
            Err(e) => {
                let span = e.span();
                let message = diag::with_hint(e.message().trim());
                let first = parse_errors.is_empty();
                let removed = span
                    .as_ref()
                    .is_some_and(|s| diag::remove_at(spanned.get_mut(), s.start));
                // A "missing field" after a removal is the removal's echo, not the user's error.
                if first || !message.starts_with("missing field") {
                    parse_errors.push(Diagnostic {
                        at: span.and_then(|s| at(s.start)),
                        message,
                    });
                }
                if !removed || parse_errors.len() >= 50 {
                    break None;
                }
            }
        }
    };
    parse_errors.sort_by_key(|d| d.at);
    let Some(mut file) = file.filter(|_| parse_errors.is_empty()) else {
        // Semantic checks of the remaining keys would judge defaults the user never wrote
        // in place of the dropped values, so only the value errors are reported.
        return Err(ConfigError {
            file: name.to_string(),
            diagnostics: parse_errors,
        });
    };
    if !diag::has_key(&for_spans, &["admin", "token"]) {
        file.admin.token = admin_token_default(env);
    }
    apply_overrides(&mut file, overrides);
    finish(file, None, String::new(), name, text, Some(&for_spans))
}

/// The `admin.token` of a file without that key: SPEC's `"${OPSGATE_ADMIN_TOKEN:-}"`. A key
/// that is present wins, even `token = ""`, like any other value written in the file.
fn admin_token_default(env: &dyn Fn(&str) -> Option<String>) -> String {
    env(defaults::ADMIN_TOKEN_ENV).unwrap_or_default()
}

fn apply_overrides(file: &mut ConfigFile, o: &Overrides) {
    if let Some(listen) = o.listen {
        file.proxy.listen = listen;
    }
    if let Some(admin) = o.admin_listen {
        file.admin.listen = admin;
    }
    if let Some(url) = &o.upstream {
        // A flag names "the app": it replaces the file's app upstream URL, keeping its other settings.
        match file.upstreams.get_mut(SHORTHAND_UPSTREAM) {
            Some(app) if file.proxy.upstream.is_none() => app.url = url.as_str().into(),
            _ => file.proxy.upstream = Some(url.clone()),
        }
    }
}

/// The upstream and route names the `proxy.upstream` shorthand defines.
pub const SHORTHAND_UPSTREAM: &str = "app";
pub const SHORTHAND_ROUTE: &str = "default";

fn finish(
    mut file: ConfigFile,
    path: Option<PathBuf>,
    sha256: String,
    name: &str,
    text: &str,
    spans: Option<&toml::Spanned<DeTable<'_>>>,
) -> Result<Config, ConfigError> {
    let mut checker = validate::Checker::new(spans, text);
    checker.shorthand_upstream = file.proxy.upstream.is_some();
    if let Some(url) = file.proxy.upstream.clone() {
        if file.upstreams.contains_key(SHORTHAND_UPSTREAM) {
            checker.error(
                &[diag::Seg::Key("proxy"), diag::Seg::Key("upstream")],
                "proxy.upstream defines upstream \"app\", but [upstreams.app] exists too: keep one",
            );
        } else {
            file.upstreams.insert(
                SHORTHAND_UPSTREAM.into(),
                UpstreamSection {
                    url: values::Checked::new(url),
                    ..Default::default()
                },
            );
            if file.routes.is_empty() {
                file.routes.push(RouteSection {
                    name: SHORTHAND_ROUTE.into(),
                    prefix: "/".into(),
                    upstream: SHORTHAND_UPSTREAM.into(),
                    ..Default::default()
                });
            }
        }
    }
    checker.check(&file);
    if checker.diagnostics.is_empty() {
        Ok(Config {
            file,
            path,
            sha256,
            checks: checker.checks,
        })
    } else {
        Err(ConfigError {
            file: name.to_string(),
            diagnostics: checker.diagnostics,
        })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl Config {
    /// The effective config as JSON with every secret replaced by `"<redacted>"`.
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut f = self.file.clone();
        let redact = |s: &mut String| {
            if !s.is_empty() {
                *s = REDACTED.into();
            }
        };
        redact(&mut f.admin.token);
        redact(&mut f.maintenance.bypass_token);
        for c in &mut f.health.checks {
            if let Some(u) = &mut c.url {
                *u = redact_url(u);
            }
        }
        if let Some(u) = &mut f.control.redis_url {
            *u = redact_url(u);
        }
        // The `upstream` shorthand (or `--upstream`), kept as written beside the
        // upstream it defines.
        if let Some(u) = &mut f.proxy.upstream {
            *u = redact_url(u);
        }
        let Ok(mut json) = serde_json::to_value(&f) else {
            return serde_json::Value::Null;
        };
        // Rewritten in the JSON: a checked URL always shows the text its value came from.
        for (name, u) in &f.upstreams {
            json["upstreams"][name]["url"] = redact_url(u.url.raw()).into();
        }
        json
    }
}

pub use crate::telemetry::redact::{REDACTED, redact_url};

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_str(text, "t.toml", &Overrides::default(), &no_env)
    }

    #[test]
    fn the_config_shown_over_the_api_holds_no_upstream_password() {
        for text in [
            "[proxy]\nupstream = \"http://ops:s3cretPW@127.0.0.1:3000\"\n",
            "[upstreams.app]\nurl = \"http://ops:s3cretPW@127.0.0.1:3000\"\n\
             [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        ] {
            let shown = parse(text).unwrap().redacted_json().to_string();
            assert!(!shown.contains("s3cretPW"), "{shown}");
            assert!(shown.contains("127.0.0.1:3000"), "{shown}");
        }
    }

    fn places(e: &ConfigError) -> Vec<(usize, usize)> {
        e.diagnostics.iter().filter_map(|d| d.at).collect()
    }

    #[test]
    fn every_value_error_is_reported_in_file_order() {
        let e = parse(
            "[proxy]\nmax_header_bytes = \"lots\"\n\n[upstreams.app]\nurl = \"http://127.0.0.1:3000\"\ntimeout = \"abc\"\nconect_timeout = \"1s\"\n\n[[routes]]\nname = \"x\"\nprefix = \"/\"\nupstream = \"app\"\ntimeout = 5\n",
        )
        .unwrap_err();
        assert_eq!(places(&e), vec![(2, 20), (6, 11), (7, 1), (13, 11)], "{e}");
        assert!(
            e.to_string().contains("did you mean `connect_timeout`"),
            "{e}"
        );
    }

    #[test]
    fn a_removed_required_key_is_not_reported_as_missing() {
        let e = parse("[[routes]]\nname = 5\nprefix = \"/\"\nupstream = \"app\"\n").unwrap_err();
        assert_eq!(e.diagnostics.len(), 1, "{e}");
        assert_eq!(places(&e), vec![(2, 8)], "{e}");
    }

    #[test]
    fn shorthand_upstream_without_scheme_points_at_its_line() {
        let e = parse("[proxy]\nlisten = \"127.0.0.1:8080\"\n\nupstream = \"127.0.0.1:3000\"\n")
            .unwrap_err();
        assert_eq!(places(&e), vec![(4, 12)], "{e}");
    }

    #[test]
    fn an_upstream_url_error_points_at_the_url_and_hides_its_password() {
        let e =
            parse("[upstreams.app]\nurl = \"http://u:s3cret@127.0.0.1:3000/?a=1\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml:2:7: upstream url `http://u:<redacted>@127.0.0.1:3000/?a=1` must not have a query string"
        );
        let e = parse("[proxy]\nupstream = \"http://u:s3cret@:80\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml:2:12: upstream url `http://u:<redacted>@:80` has no host"
        );
    }

    #[test]
    fn listen_accepts_a_bare_port_and_explains_what_it_expects() {
        let c =
            parse("[proxy]\nlisten = \":8081\"\nupstream = \"http://127.0.0.1:3000\"\n").unwrap();
        assert_eq!(c.file.proxy.listen, "0.0.0.0:8081".parse().unwrap());
        let e = parse("[proxy]\nlisten = \"8080\"\n").unwrap_err();
        assert!(e.to_string().contains("expected IP:port"), "{e}");
        assert!(parse_listen("[::1]:9901").is_ok());
        assert!(parse_listen(":").is_err());
    }

    #[test]
    fn minimal_config_defines_app_and_default_route() {
        let c = parse("[proxy]\nlisten = \"0.0.0.0:8080\"\nupstream = \"http://127.0.0.1:3000\"\n")
            .unwrap();
        assert_eq!(c.file.upstreams["app"].url.raw(), "http://127.0.0.1:3000");
        assert_eq!(c.file.routes.len(), 1);
        assert_eq!(c.file.routes[0].name, "default");
        assert_eq!(c.file.routes[0].prefix, "/");
    }

    #[test]
    fn type_error_has_line_and_col() {
        let e = parse("[proxy]\nlisten = \"0.0.0.0:8080\"\naccess_log = \"yes\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("t.toml:3:14: "), "{msg}");
    }

    #[test]
    fn unknown_key_has_hint_and_place() {
        let e = parse("[proxy]\nlistn = \"0.0.0.0:8080\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("t.toml:2:1: unknown field `listn`"),
            "{msg}"
        );
        assert!(msg.contains("did you mean `listen`?"), "{msg}");
    }

    #[test]
    fn unset_variable_is_named_with_its_line() {
        let e = parse("[proxy]\nupstream = \"http://127.0.0.1:3000\"\n[[health.checks]]\nname = \"db\"\ntype = \"postgres\"\nurl = \"${SQL_URL}\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("t.toml:6:7: "), "{msg}");
        assert!(msg.contains("SQL_URL"), "{msg}");
    }

    #[test]
    fn semantic_errors_are_all_reported_with_places() {
        let e = parse(
            "[upstreams.a]\nurl = \"ftp://x\"\n[[routes]]\nname = \"Bad Name\"\nprefix = \"api\"\nupstream = \"nope\"\n",
        )
        .unwrap_err();
        let lines: Vec<String> = e.to_string().lines().map(String::from).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0].starts_with("t.toml:2:7: upstream url"),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("t.toml:4:8: route name")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("t.toml:6:12: route `Bad Name` names unknown upstream")),
            "{lines:?}"
        );
    }

    #[test]
    fn exposed_admin_without_token_is_an_error() {
        let e = parse("[admin]\nlisten = \"0.0.0.0:9901\"\n").unwrap_err();
        assert!(e.to_string().contains("set admin.token"), "{e}");
        assert!(parse("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"s3cret\"\n").is_ok());
    }

    #[test]
    fn admin_token_defaults_to_the_environment_when_the_file_has_no_key() {
        let env = |name: &str| (name == "OPSGATE_ADMIN_TOKEN").then(|| "from-env".to_string());
        let o = Overrides::default();
        let without_key = "[admin]\nlisten = \"0.0.0.0:9901\"\n";
        let c = parse_str(without_key, "t", &o, &env).unwrap();
        assert_eq!(c.file.admin.token, "from-env");
        let c = parse_str("", "t", &o, &env).unwrap();
        assert_eq!(c.file.admin.token, "from-env");
        // No file at all (`run --upstream`): the same default.
        let c = load(None, &o, &env).unwrap();
        assert_eq!(c.file.admin.token, "from-env");
        // A key in the file wins, an empty one included.
        let c = parse_str("[admin]\ntoken = \"from-file\"\n", "t", &o, &env).unwrap();
        assert_eq!(c.file.admin.token, "from-file");
        let c = parse_str("[admin]\ntoken = \"\"\n", "t", &o, &env).unwrap();
        assert_eq!(c.file.admin.token, "");
        // Unset or empty variable: no token.
        assert_eq!(parse("").unwrap().file.admin.token, "");
        let empty = |_: &str| Some(String::new());
        assert_eq!(parse_str("", "t", &o, &empty).unwrap().file.admin.token, "");
        assert!(parse_str(without_key, "t", &o, &empty).is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let o = Overrides {
            listen: Some("127.0.0.1:1234".parse().unwrap()),
            upstream: Some("http://127.0.0.1:4000".into()),
            admin_listen: None,
        };
        let c = parse_str(
            "[proxy]\nlisten = \"0.0.0.0:8080\"\nupstream = \"http://127.0.0.1:3000\"\n",
            "t",
            &o,
            &no_env,
        )
        .unwrap();
        assert_eq!(c.file.proxy.listen.port(), 1234);
        assert_eq!(c.file.upstreams["app"].url.raw(), "http://127.0.0.1:4000");
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn egress_and_ingress_route_names_share_one_namespace() {
        let text = "[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nname = \"x\"\nprefix = \"/\"\nupstream = \"a\"\n\
                    [egress]\nlisten = \"127.0.0.1:9080\"\n[[egress.routes]]\nname = \"x\"\nprefix = \"/\"\nupstream = \"a\"\n";
        let e = parse_str(text, "t", &Overrides::default(), &|_| None).unwrap_err();
        assert!(e.to_string().contains("duplicate route name `x`"), "{e}");
    }

    #[test]
    fn retry_on_accepts_reset_and_classes() {
        let text = "[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[upstreams.a.retry]\non = [\"reset\", \"5xx\", \"429\"]\n";
        assert!(parse_str(text, "t", &Overrides::default(), &|_| None).is_ok());
        let bad = "[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[upstreams.a.retry]\non = [\"sometimes\"]\n";
        assert!(parse_str(bad, "t", &Overrides::default(), &|_| None).is_err());
    }
}
