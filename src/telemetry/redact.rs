//! Credential scrubbing for URLs and error texts: the one place that decides what a secret
//! looks like, so no password reaches a body, a log line, a metric or the status page.

/// What replaces a secret in any text we show.
pub const REDACTED: &str = "<redacted>";

/// Query or key=value parameters whose values are secrets (libpq spellings included).
const SECRET_KEYS: &[&str] = &["password", "pass", "sslpassword", "token", "secret"];

/// Replaces the password of a URL's userinfo and secret query parameters with `<redacted>`.
///
/// `postgres://user:pw@host/db?password=x` -> `postgres://user:<redacted>@host/db?password=<redacted>`.
/// A string that is not a URL still has `password=...` values redacted (libpq key=value form).
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let rest = match url.find("://") {
        Some(i) => {
            let (scheme, after) = url.split_at(i + 3);
            out.push_str(scheme);
            let end = after.find(['/', '?', '#']).unwrap_or(after.len());
            let (authority, tail) = after.split_at(end);
            match authority.rfind('@') {
                Some(at) => {
                    let userinfo = &authority[..at];
                    match userinfo.find(':') {
                        Some(colon) => {
                            out.push_str(&userinfo[..colon + 1]);
                            out.push_str(REDACTED);
                        }
                        // Redis reads a lone userinfo as the password.
                        None if scheme.starts_with("redis") => out.push_str(REDACTED),
                        None => out.push_str(userinfo),
                    }
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            }
            tail
        }
        None => url,
    };
    out.push_str(&redact_params(rest));
    out
}

/// Redacts the values of `key=value` pairs whose key names a secret, separated by `&`, `?` or spaces.
fn redact_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let mut token_start = 0;
    while let Some((i, c)) = chars.next() {
        if c == '=' {
            let key = &text[token_start..i];
            out.push('=');
            if SECRET_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k)) {
                out.push_str(REDACTED);
                // Skip the value up to the next separator.
                while let Some(&(_, n)) = chars.peek() {
                    if matches!(n, '&' | ' ' | '#' | ';') {
                        break;
                    }
                    chars.next();
                }
            }
            continue;
        }
        out.push(c);
        if matches!(c, '&' | '?' | ' ' | ';' | '/') {
            token_start = i + c.len_utf8();
        }
    }
    out
}

/// The secrets found in a configured URL, raw and percent-decoded, longest first.
///
/// Driver errors may echo parts of what they were given; every probe scrubs these from its
/// messages, whatever the driver chose to print.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Secrets(Vec<String>);

impl Secrets {
    /// Collects the userinfo password and secret parameters of `url`.
    pub fn from_url(url: &str) -> Self {
        let mut found = Vec::new();
        let mut user = "";
        if let Some(i) = url.find("://") {
            let after = &url[i + 3..];
            let end = after.find(['/', '?', '#']).unwrap_or(after.len());
            let authority = &after[..end];
            if let Some(at) = authority.rfind('@')
                && let Some((u, pw)) = authority[..at].split_once(':')
            {
                user = u;
                // A password equal to the user name is shown with the user anyway;
                // treating it as a secret would only hide the role name from the operator.
                if pw != u {
                    found.push(pw.to_owned());
                }
            }
        }
        for part in url.split(['?', '&', ' ', ';']) {
            if let Some((key, value)) = part.split_once('=')
                && SECRET_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k))
            {
                found.push(value.split('#').next().unwrap_or("").to_owned());
            }
        }
        let user = percent_decode(user);
        let mut all: Vec<String> = Vec::new();
        for s in found {
            let decoded = percent_decode(&s);
            for v in [s, decoded] {
                if !v.is_empty() && v != user && !all.contains(&v) {
                    all.push(v);
                }
            }
        }
        // Longest first so a secret containing another is replaced whole.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Secrets(all)
    }

    /// Removes every known secret from `text`, then redacts any URL-shaped credentials left.
    ///
    /// A secret is replaced where it stands as a whole token (no letter, digit or `_`
    /// glued to either side): a short password must not eat the identifiers around it,
    /// such as the role name in `role "shop" does not exist`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = replace_tokens(&out, s, REDACTED);
            }
        }
        scrub_urls(&out)
    }
}

/// Replaces each occurrence of `needle` in `text` that is not part of a longer word.
fn replace_tokens(text: &str, needle: &str, with: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(needle) {
        let end = i + needle.len();
        let glued = word(rest[..i].chars().next_back()) || word(rest[end..].chars().next());
        out.push_str(&rest[..i]);
        out.push_str(if glued { needle } else { with });
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Redacts userinfo passwords of URLs embedded anywhere in free text.
fn scrub_urls(text: &str) -> String {
    if !text.contains("://") {
        return redact_params(text);
    }
    text.split(' ')
        .map(|word| {
            if word.contains("://") {
                redact_url(word)
            } else {
                redact_params(word)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decodes `%XX` escapes; invalid escapes are kept as written.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Formats an error with its whole `source()` chain ("error connecting to server: Connection
/// refused"), skipping links whose text the previous one already contains.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// fred's text for an I/O error is the `Debug` of `std::io::Error`
/// (`IO Error: Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`); a
/// health body or log line wants the readable part alone: `IO Error: Connection refused`.
pub fn fred_error_text(err: &fred::error::Error) -> String {
    let details = err.details();
    if *err.kind() != fred::error::ErrorKind::IO {
        return err.to_string();
    }
    let quoted = |after: &str| {
        let start = details.find(after)? + after.len();
        let rest = &details[start..];
        rest.find('"').map(|end| &rest[..end])
    };
    let readable = quoted("message: \"")
        .or_else(|| quoted("error: \""))
        .or_else(|| {
            details
                .strip_prefix("Kind(")
                .and_then(|k| k.strip_suffix(')'))
        });
    match readable {
        Some(text) => format!("{}: {text}", err.kind().to_str()),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fred_io_errors_read_as_text_not_debug() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let os = std::io::Error::from_raw_os_error(111);
        let custom = std::io::Error::other("tls handshake eof");
        let e = |io| fred_error_text(&fred::error::Error::from(io));
        assert_eq!(e(os), "IO Error: Connection refused");
        assert_eq!(e(refused), "IO Error: ConnectionRefused");
        assert_eq!(e(custom), "IO Error: tls handshake eof");
        let other = fred::error::Error::new(fred::error::ErrorKind::Auth, "WRONGPASS bad");
        assert_eq!(
            fred_error_text(&other),
            "Authentication Error: WRONGPASS bad"
        );
    }

    #[test]
    fn redis_lone_userinfo_is_a_password() {
        assert_eq!(
            redact_url("rediss://s3cret@host"),
            "rediss://<redacted>@host"
        );
        assert_eq!(
            redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:<redacted>@host:6379/0"
        );
        assert_eq!(
            redact_url("postgres://user@host/db"),
            "postgres://user@host/db"
        );
        assert_eq!(
            redact_url("host=h password=pw user=u"),
            "host=h password=<redacted> user=u"
        );
    }

    #[test]
    fn redacts_userinfo_password() {
        assert_eq!(
            redact_url("postgres://user:s3cret@db:5432/app"),
            "postgres://user:<redacted>@db:5432/app"
        );
        assert_eq!(
            redact_url("redis://:pw@cache:6379/0"),
            "redis://:<redacted>@cache:6379/0"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(redact_url("http://user@h/x"), "http://user@h/x");
    }

    #[test]
    fn redacts_secret_params() {
        assert_eq!(
            redact_url("postgres://db/app?sslmode=require&password=x%20y&user=u"),
            "postgres://db/app?sslmode=require&password=<redacted>&user=u"
        );
        assert_eq!(
            redact_url("host=db password=abc user=u"),
            "host=db password=<redacted> user=u"
        );
    }

    #[test]
    fn secrets_are_scrubbed_raw_and_decoded() {
        let s = Secrets::from_url("postgres://u:p%40ss@h/db");
        assert_eq!(
            s.scrub("auth failed for p@ss and p%40ss"),
            "auth failed for <redacted> and <redacted>"
        );
        assert_eq!(
            s.scrub("see redis://x:other@h"),
            "see redis://x:<redacted>@h"
        );
    }

    #[test]
    fn identifiers_around_a_secret_are_kept() {
        // A short password must not cut into the role name the operator needs.
        let s = Secrets::from_url("postgres://shop:s@db/shop");
        assert_eq!(
            s.scrub(r#"role "shop" does not exist"#),
            r#"role "shop" does not exist"#
        );
        assert_eq!(s.scrub("got s back"), "got <redacted> back");
        // A password equal to the user name is no secret from whoever sees the user.
        let s = Secrets::from_url("postgres://shop:shop@db/app");
        assert_eq!(
            s.scrub(r#"role "shop" does not exist"#),
            r#"role "shop" does not exist"#
        );
        // A real password echoed as a token is still hidden.
        let s = Secrets::from_url("postgres://shop:hunter2@db/app");
        assert_eq!(
            s.scrub(r#"bad password "hunter2" for role "shop""#),
            r#"bad password "<redacted>" for role "shop""#
        );
    }

    #[test]
    fn chain_skips_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(error_chain(&io), "refused");
    }
}
