//! `${VAR}` and `${VAR:-default}` expansion in every string value of the file.
//! Runs on the spanned TOML tree before deserialization, so errors keep their place.

use std::borrow::Cow;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Where to read variables from; a closure so tests never touch the process environment.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Expands every string value in place; returns (span, message) for each failure.
pub fn expand_table(
    table: &mut DeTable<'_>,
    env: Lookup<'_>,
    errors: &mut Vec<(Range<usize>, String)>,
) {
    for (_, v) in table.iter_mut() {
        expand_value(v, env, errors);
    }
}

fn expand_value(
    v: &mut Spanned<DeValue<'_>>,
    env: Lookup<'_>,
    errors: &mut Vec<(Range<usize>, String)>,
) {
    let span = v.span();
    match v.get_mut() {
        DeValue::String(s) if s.contains('$') => match expand_str(s, env) {
            Ok(out) => *s = Cow::Owned(out),
            Err(msg) => errors.push((span, msg)),
        },
        DeValue::Array(items) => {
            for item in items.iter_mut() {
                expand_value(item, env, errors);
            }
        }
        DeValue::Table(t) => expand_table(t, env, errors),
        _ => {}
    }
}

/// `$$` is a literal `$`; `${NAME}` must be set; `${NAME:-default}` falls back when unset or empty.
pub fn expand_str(s: &str, env: Lookup<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in `{s}`"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid variable name `{name}` in `${{{expr}}}`"));
            }
            match (
                env(name).filter(|v| !(v.is_empty() && default.is_some())),
                default,
            ) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_default_and_literal() {
        assert_eq!(expand_str("pg://${HOST}/x", &env).unwrap(), "pg://db/x");
        assert_eq!(expand_str("${NOPE:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(expand_str("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(expand_str("${NOPE:-}", &env).unwrap(), "");
        assert_eq!(expand_str("cost $$5 $x", &env).unwrap(), "cost $5 $x");
    }

    #[test]
    fn unset_without_default_names_the_variable() {
        let e = expand_str("${SQL_URL}", &env).unwrap_err();
        assert!(e.contains("`SQL_URL` is not set"), "{e}");
        assert!(expand_str("${UNCLOSED", &env).is_err());
    }
}
