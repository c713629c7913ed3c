//! Leaf values the file spells as text or numbers (status patterns, retry conditions,
//! methods, status codes, header values, times, upstream URLs, rate-limit keys), parsed once
//! while the file is read. Validation reports the ones that did not parse; the runtime takes
//! the typed value.

use std::time::SystemTime;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::status::{StatusPattern, StatusRange, StatusRanges};

/// A timestamp written either as a TOML datetime or as an RFC 3339 string.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Timestamp {
    Text(String),
    Toml(toml::value::Datetime),
}

impl Timestamp {
    pub fn as_text(&self) -> String {
        match self {
            Timestamp::Text(s) => s.clone(),
            Timestamp::Toml(d) => d.to_string(),
        }
    }
}

/// A value as written (`raw`) and what it parsed to, or why it did not (`E`, for values whose
/// message says more than "not one of these").
///
/// Reading the file never fails on a value that is the right TOML type but does not parse:
/// validation reports it, with its path, line:col and message, beside every other error,
/// and a file with such a value never becomes a [`Config`](super::Config). So past loading,
/// [`Checked::get`] always has a value; the runtime never parses the text again.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked<R, T, E = ()> {
    raw: R,
    value: Result<T, E>,
}

/// A checked value written as a string.
pub type Spelled<T, E = ()> = Checked<String, T, E>;

/// How a value is parsed from what the file holds; `Err` when it is not one.
pub trait FromConfig<R, E = ()>: Sized {
    fn from_config(raw: &R) -> Result<Self, E>;
}

impl<R, T: FromConfig<R, E>, E> Checked<R, T, E> {
    pub fn new(raw: R) -> Self {
        let value = T::from_config(&raw);
        Self { raw, value }
    }

    /// A built-in default.
    ///
    /// # Panics
    /// When `raw` does not parse: defaults are constants, and the config's tests build them all.
    pub fn builtin(raw: R) -> Self
    where
        R: std::fmt::Debug,
    {
        let checked = Self::new(raw);
        assert!(
            checked.value.is_ok(),
            "built-in default {:?} does not parse",
            checked.raw
        );
        checked
    }
}

/// Values built in code (the `proxy.upstream` shorthand, tests) are parsed like the file's.
impl<T: FromConfig<String, E>, E> From<&str> for Checked<String, T, E> {
    fn from(raw: &str) -> Self {
        Self::new(raw.to_owned())
    }
}

impl<R, T, E> Checked<R, T, E> {
    /// What the file wrote.
    pub fn raw(&self) -> &R {
        &self.raw
    }

    /// False for a value validation must refuse.
    pub fn is_valid(&self) -> bool {
        self.value.is_ok()
    }

    /// Why the value did not parse; `None` for a valid one.
    pub fn error(&self) -> Option<&E> {
        self.value.as_ref().err()
    }

    /// The parsed value.
    ///
    /// # Panics
    /// On a value that did not parse, which only an unvalidated file can hold.
    pub fn get(&self) -> &T {
        match &self.value {
            Ok(value) => value,
            Err(_) => panic!("a config holding a value that does not parse is refused at load"),
        }
    }
}

impl<R: Serialize, T, E> Serialize for Checked<R, T, E> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de, R: Deserialize<'de>, T: FromConfig<R, E>, E> Deserialize<'de> for Checked<R, T, E> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        R::deserialize(d).map(Self::new)
    }
}

/// A `retry.on` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCondition {
    ConnectFailure,
    Timeout,
    Reset,
    /// One status code, 400..=599.
    Status(u16),
    /// A class: `4` for `"4xx"`, `5` for `"5xx"`.
    Class(u8),
}

impl FromConfig<String> for RetryCondition {
    fn from_config(text: &String) -> Result<Self, ()> {
        match text.as_str() {
            "connect-failure" => Ok(Self::ConnectFailure),
            "timeout" => Ok(Self::Timeout),
            "reset" => Ok(Self::Reset),
            _ => StatusRange::from_text(text)
                .filter(|r| r.lo >= 400)
                .map(|r| {
                    if r.lo == r.hi {
                        Self::Status(r.lo)
                    } else {
                        // from_text gives a single code or a whole class.
                        Self::Class((r.lo / 100) as u8)
                    }
                })
                .ok_or(()),
        }
    }
}

/// Methods are written in capitals, as on the wire.
impl FromConfig<String> for Method {
    fn from_config(text: &String) -> Result<Self, ()> {
        Method::from_bytes(text.as_bytes())
            .ok()
            .filter(|_| text.to_ascii_uppercase() == *text)
            .ok_or(())
    }
}

impl FromConfig<String> for HeaderValue {
    fn from_config(text: &String) -> Result<Self, ()> {
        HeaderValue::from_str(text).map_err(drop)
    }
}

impl FromConfig<String> for StatusRanges {
    fn from_config(text: &String) -> Result<Self, ()> {
        StatusRanges::parse(text).ok_or(())
    }
}

/// A status code opsgate may answer with: 100..=599.
impl FromConfig<u16> for StatusCode {
    fn from_config(code: &u16) -> Result<Self, ()> {
        (100..=599)
            .contains(code)
            .then(|| StatusCode::from_u16(*code).ok())
            .flatten()
            .ok_or(())
    }
}

/// A `failure_status` entry: `"5xx"`, `"4xx"`, `"503"` or `503`.
impl FromConfig<StatusPattern> for StatusRange {
    fn from_config(p: &StatusPattern) -> Result<Self, ()> {
        StatusRange::from_pattern(p).ok_or(())
    }
}

impl FromConfig<Timestamp> for SystemTime {
    fn from_config(t: &Timestamp) -> Result<Self, ()> {
        let text = t.as_text();
        humantime::parse_rfc3339_weak(&text)
            .or_else(|_| humantime::parse_rfc3339(&text))
            .map_err(drop)
    }
}

/// An upstream's `url`, split into what a connection and a request need.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port, without userinfo, which stays out of the URI (and so out of the pool
    /// key and every line a library may log about it).
    pub authority: Authority,
    /// `Host` to send when `preserve_host = false`.
    pub host_header: HeaderValue,
    /// `Authorization: Basic` from the URL's userinfo; marked sensitive.
    pub authorization: Option<HeaderValue>,
    /// Path prefix without its trailing `/` (`None` for `/`).
    pub base_path: Option<String>,
}

/// Why an upstream's `url` was refused; validation words the message around the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamUrlError {
    /// Not a URI at all: the parser's reason.
    Parse(String),
    Scheme,
    NoHost,
    Query,
    /// The host that remains once userinfo is split off is not one.
    Host,
}

impl FromConfig<String, UpstreamUrlError> for UpstreamUrl {
    fn from_config(text: &String) -> Result<Self, UpstreamUrlError> {
        let uri: Uri = text.parse().map_err(|e: http::uri::InvalidUri| {
            // The parser's reason never quotes its input, so it cannot show a password.
            UpstreamUrlError::Parse(e.to_string())
        })?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(UpstreamUrlError::Scheme),
        };
        let full_authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or(UpstreamUrlError::NoHost)?;
        if uri.query().is_some() {
            return Err(UpstreamUrlError::Query);
        }
        let (authority, authorization) = split_userinfo(full_authority)?;
        // An authority is visible ASCII, so always a valid header value.
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| UpstreamUrlError::Host)?;
        let base_path = match uri.path().trim_end_matches('/') {
            "" => None,
            p => Some(p.to_owned()),
        };
        Ok(Self {
            scheme,
            authority,
            host_header,
            authorization,
            base_path,
        })
    }
}

/// Splits `user:password@host:port` into the bare authority and a sensitive
/// `Authorization: Basic` value (userinfo is percent-decoded first, as URL parsers do).
fn split_userinfo(a: &Authority) -> Result<(Authority, Option<HeaderValue>), UpstreamUrlError> {
    let Some((userinfo, host)) = a.as_str().rsplit_once('@') else {
        return Ok((a.clone(), None));
    };
    let bare: Authority = host.parse().map_err(|_| UpstreamUrlError::Host)?;
    let decoded: Vec<u8> = percent_encoding::percent_decode(userinfo.as_bytes()).collect();
    use base64::Engine as _;
    let mut value = b"Basic ".to_vec();
    value.extend_from_slice(
        base64::engine::general_purpose::STANDARD
            .encode(decoded)
            .as_bytes(),
    );
    // Base64 after an ASCII prefix: always a valid header value.
    let mut value = HeaderValue::from_bytes(&value).map_err(|_| UpstreamUrlError::Host)?;
    value.set_sensitive(true);
    Ok((bare, Some(value)))
}

/// `rate_limit.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    Route,
    ClientIp,
    /// Absent header: the client IP.
    Header(HeaderName),
}

/// `"route" | "client_ip" | "header:<Name>"`; the error is the message after `rate_limit.`.
impl FromConfig<String, String> for RateKey {
    fn from_config(text: &String) -> Result<Self, String> {
        match text.as_str() {
            "route" => Ok(Self::Route),
            "client_ip" => Ok(Self::ClientIp),
            _ => match text.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(Self::Header)
                    .map_err(|_| format!("key: {name:?} is not a valid header name")),
                None => Err(format!(
                    "key must be \"route\", \"client_ip\" or \"header:<Name>\", not {text:?}"
                )),
            },
        }
    }
}

impl RateKey {
    /// Written as in the config, for the status page.
    pub fn describe(&self) -> String {
        match self {
            Self::Route => "route".into(),
            Self::ClientIp => "client_ip".into(),
            Self::Header(h) => format!("header:{h}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: FromConfig<String>>(text: &str) -> Option<T> {
        T::from_config(&text.to_owned()).ok()
    }

    #[test]
    fn retry_conditions_parse_every_form_and_refuse_others() {
        assert_eq!(
            parse("connect-failure"),
            Some(RetryCondition::ConnectFailure)
        );
        assert_eq!(parse("timeout"), Some(RetryCondition::Timeout));
        assert_eq!(parse("reset"), Some(RetryCondition::Reset));
        assert_eq!(parse("503"), Some(RetryCondition::Status(503)));
        assert_eq!(parse("4xx"), Some(RetryCondition::Class(4)));
        assert_eq!(parse("5XX"), Some(RetryCondition::Class(5)));
        for bad in [
            "50x",
            "600",
            "099",
            "302",
            "2xx",
            "Timeout",
            "",
            "5031",
            "connect_failure",
        ] {
            assert_eq!(parse::<RetryCondition>(bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn methods_must_be_written_in_capitals() {
        assert_eq!(parse("GET"), Some(Method::GET));
        assert_eq!(parse::<Method>("get"), None);
        assert_eq!(parse::<Method>("BAD METHOD"), None);
    }

    #[test]
    fn a_checked_value_keeps_its_spelling_and_refuses_quietly() {
        let five: Checked<StatusPattern, StatusRange> =
            Checked::builtin(StatusPattern::Text("5xx".into()));
        assert_eq!(*five.get(), StatusRange::new(500, 599));
        assert_eq!(serde_json::to_value(&five).unwrap(), "5xx");
        let bad: Spelled<Method> = serde_json::from_str("\"get\"").unwrap();
        assert!(!bad.is_valid());
        assert_eq!(bad.raw(), "get");
        assert_eq!(
            <StatusCode as FromConfig<u16>>::from_config(&700),
            Err(()),
            "a code opsgate would not send"
        );
    }

    #[test]
    fn userinfo_leaves_the_authority_and_becomes_basic_auth() {
        let a: Authority = "us%65r:p%40ss@127.0.0.1:8080".parse().unwrap();
        let (bare, auth) = split_userinfo(&a).unwrap();
        assert_eq!(bare.as_str(), "127.0.0.1:8080");
        let auth = auth.unwrap();
        // base64("user:p@ss")
        assert_eq!(auth, "Basic dXNlcjpwQHNz");
        assert!(auth.is_sensitive());
        let plain: Authority = "example.com".parse().unwrap();
        assert_eq!(split_userinfo(&plain).unwrap(), (plain, None));
    }

    #[test]
    fn an_upstream_url_splits_into_what_a_call_needs() {
        let url: UpstreamUrl = parse_or("https://u:pw@[::1]:8443/api/v1/").unwrap();
        assert_eq!(url.scheme, Scheme::HTTPS);
        assert_eq!(url.authority.as_str(), "[::1]:8443");
        assert_eq!(url.host_header, "[::1]:8443");
        assert_eq!(url.authorization.unwrap(), "Basic dTpwdw==");
        assert_eq!(url.base_path.as_deref(), Some("/api/v1"));
        let url: UpstreamUrl = parse_or("http://127.0.0.1:3000/").unwrap();
        assert_eq!(url.scheme, Scheme::HTTP);
        assert_eq!((url.authorization, url.base_path), (None, None));
    }

    #[test]
    fn an_upstream_url_is_refused_with_its_reason() {
        let refused = |text: &str| parse_or::<UpstreamUrl, UpstreamUrlError>(text).unwrap_err();
        assert!(matches!(refused(""), UpstreamUrlError::Parse(_)));
        assert!(matches!(refused("http://a b"), UpstreamUrlError::Parse(_)));
        assert_eq!(refused("127.0.0.1:3000"), UpstreamUrlError::Scheme);
        assert_eq!(refused("ftp://x"), UpstreamUrlError::Scheme);
        assert_eq!(refused("/only/a/path"), UpstreamUrlError::Scheme);
        assert_eq!(
            refused("http:///x"),
            UpstreamUrlError::Parse("invalid format".into())
        );
        assert_eq!(refused("http://u:pw@:80/"), UpstreamUrlError::NoHost);
        assert_eq!(refused("http://x/?a=1"), UpstreamUrlError::Query);
        // Brackets around the userinfo leave `b]:80` as the host.
        assert_eq!(refused("http://[a@b]:80"), UpstreamUrlError::Host);
    }

    fn parse_or<T: FromConfig<String, E>, E>(text: &str) -> Result<T, E> {
        T::from_config(&text.to_owned())
    }
}
