//! HTTP status patterns as the config writes them (`503`, `"5xx"`, `"200-399"`, `"200,204"`),
//! parsed once into inclusive ranges: validation, the breaker and the HTTP checks share them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A `failure_status` entry: `"5xx"`, `"4xx"`, `"503"` or `503`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum StatusPattern {
    Code(u16),
    Text(String),
}

/// An inclusive range of status codes; one code is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    pub lo: u16,
    pub hi: u16,
}

impl StatusRange {
    pub const fn new(lo: u16, hi: u16) -> Self {
        Self { lo, hi }
    }

    pub fn contains(self, status: u16) -> bool {
        (self.lo..=self.hi).contains(&status)
    }

    /// `"5xx"` -> 500..=599, `"503"` or `503` -> 503..=503; `None` outside 100..=599.
    pub fn from_pattern(p: &StatusPattern) -> Option<Self> {
        match p {
            StatusPattern::Code(c) => Self::code(*c),
            StatusPattern::Text(t) => Self::from_text(t),
        }
    }

    fn code(c: u16) -> Option<Self> {
        (100..=599).contains(&c).then_some(Self::new(c, c))
    }

    /// `"5xx"` (any case of `x`) or a code such as `"503"`.
    pub fn from_text(t: &str) -> Option<Self> {
        match t.as_bytes() {
            [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                let base = u16::from(d - b'0') * 100;
                Some(Self::new(base, base + 99))
            }
            _ => Self::code(t.parse().ok()?),
        }
    }
}

/// A set of accepted statuses, e.g. `"200-399"` or `"200,204"` or `"2xx"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRanges(Vec<StatusRange>);

impl StatusRanges {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|r| r.contains(status))
    }

    /// `"200-399"`, `"200,204"`, `"2xx"`; `None` for anything else or an empty list.
    pub fn parse(s: &str) -> Option<Self> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim) {
            let range = if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
                (a <= b && (100..=599).contains(&a) && b <= 599)
                    .then_some(StatusRange::new(a, b))?
            } else {
                StatusRange::from_text(part)?
            };
            out.push(range);
        }
        (!out.is_empty()).then_some(StatusRanges(out))
    }
}

impl FromIterator<StatusRange> for StatusRanges {
    fn from_iter<I: IntoIterator<Item = StatusRange>>(iter: I) -> Self {
        StatusRanges(iter.into_iter().collect())
    }
}

impl Default for StatusRanges {
    /// `200-399`, the SPEC default for an HTTP check's `expect_status`.
    fn default() -> Self {
        StatusRanges(vec![StatusRange::new(200, 399)])
    }
}

impl FromStr for StatusRanges {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
            .ok_or_else(|| format!("`{s}` must look like \"200-399\", \"200,204\" or \"2xx\""))
    }
}

impl fmt::Display for StatusRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.lo == r.hi {
                write!(f, "{}", r.lo)?;
            } else {
                write!(f, "{}-{}", r.lo, r.hi)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_patterns() {
        let text = |t: &str| StatusRange::from_pattern(&StatusPattern::Text(t.into()));
        assert_eq!(text("5xx"), Some(StatusRange::new(500, 599)));
        assert_eq!(
            StatusRange::from_pattern(&StatusPattern::Code(429)),
            Some(StatusRange::new(429, 429))
        );
        assert_eq!(text("6xx"), None);
        assert_eq!(StatusRange::from_pattern(&StatusPattern::Code(600)), None);
    }

    #[test]
    fn status_ranges() {
        let r = |lo, hi| StatusRange::new(lo, hi);
        assert_eq!(
            StatusRanges::parse("200-399"),
            Some(StatusRanges(vec![r(200, 399)]))
        );
        assert_eq!(
            StatusRanges::parse("200,204"),
            Some(StatusRanges(vec![r(200, 200), r(204, 204)]))
        );
        assert_eq!(StatusRanges::parse("abc"), None);
        assert_eq!(
            StatusRanges::parse("200,204").unwrap().to_string(),
            "200,204"
        );
        assert!(StatusRanges::default().contains(302));
        assert!(!StatusRanges::default().contains(404));
    }
}
