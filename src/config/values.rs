//! Leaf values the file spells as text or numbers (status patterns, retry conditions,
//! methods, status codes, header values, times), parsed once while the file is read.
//! Validation reports the ones that did not parse; the runtime takes the typed value.

use std::time::SystemTime;

use http::{HeaderValue, Method, StatusCode};
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

/// A value as written (`raw`) and what it parsed to.
///
/// Reading the file never fails on a value that is the right TOML type but does not parse:
/// validation reports it, with its path, line:col and message, beside every other error,
/// and a file with such a value never becomes a [`Config`](super::Config). So past loading,
/// [`Checked::get`] always has a value; the runtime never parses the text again.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked<R, T> {
    raw: R,
    value: Option<T>,
}

/// A checked value written as a string.
pub type Spelled<T> = Checked<String, T>;

/// How a value is parsed from what the file holds; `None` when it is not one.
pub trait FromConfig<R>: Sized {
    fn from_config(raw: &R) -> Option<Self>;
}

impl<R, T: FromConfig<R>> Checked<R, T> {
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
            checked.value.is_some(),
            "built-in default {:?} does not parse",
            checked.raw
        );
        checked
    }
}

impl<R, T> Checked<R, T> {
    /// What the file wrote.
    pub fn raw(&self) -> &R {
        &self.raw
    }

    /// False for a value validation must refuse.
    pub fn is_valid(&self) -> bool {
        self.value.is_some()
    }

    /// The parsed value.
    ///
    /// # Panics
    /// On a value that did not parse, which only an unvalidated file can hold.
    pub fn get(&self) -> &T {
        self.value
            .as_ref()
            .expect("a config holding a value that does not parse is refused at load")
    }
}

impl<R: Serialize, T> Serialize for Checked<R, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de, R: Deserialize<'de>, T: FromConfig<R>> Deserialize<'de> for Checked<R, T> {
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
    fn from_config(text: &String) -> Option<Self> {
        match text.as_str() {
            "connect-failure" => Some(Self::ConnectFailure),
            "timeout" => Some(Self::Timeout),
            "reset" => Some(Self::Reset),
            _ => StatusRange::from_text(text)
                .filter(|r| r.lo >= 400)
                .map(|r| {
                    if r.lo == r.hi {
                        Self::Status(r.lo)
                    } else {
                        // from_text gives a single code or a whole class.
                        Self::Class((r.lo / 100) as u8)
                    }
                }),
        }
    }
}

/// Methods are written in capitals, as on the wire.
impl FromConfig<String> for Method {
    fn from_config(text: &String) -> Option<Self> {
        Method::from_bytes(text.as_bytes())
            .ok()
            .filter(|_| text.to_ascii_uppercase() == *text)
    }
}

impl FromConfig<String> for HeaderValue {
    fn from_config(text: &String) -> Option<Self> {
        HeaderValue::from_str(text).ok()
    }
}

impl FromConfig<String> for StatusRanges {
    fn from_config(text: &String) -> Option<Self> {
        StatusRanges::parse(text)
    }
}

/// A status code opsgate may answer with: 100..=599.
impl FromConfig<u16> for StatusCode {
    fn from_config(code: &u16) -> Option<Self> {
        (100..=599)
            .contains(code)
            .then(|| StatusCode::from_u16(*code).ok())
            .flatten()
    }
}

/// A `failure_status` entry: `"5xx"`, `"4xx"`, `"503"` or `503`.
impl FromConfig<StatusPattern> for StatusRange {
    fn from_config(p: &StatusPattern) -> Option<Self> {
        StatusRange::from_pattern(p)
    }
}

impl FromConfig<Timestamp> for SystemTime {
    fn from_config(t: &Timestamp) -> Option<Self> {
        let text = t.as_text();
        humantime::parse_rfc3339_weak(&text)
            .or_else(|_| humantime::parse_rfc3339(&text))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: FromConfig<String>>(text: &str) -> Option<T> {
        T::from_config(&text.to_owned())
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
            None,
            "a code opsgate would not send"
        );
    }
}
