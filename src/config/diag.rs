//! Config errors with file:line:col, and span lookup by TOML path.
//! Everything that reports on the config file goes through here so every message has a place.

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line and column; `None` for problems without a place (an unreadable file).
    pub at: Option<(usize, usize)>,
    pub message: String,
}

/// Every problem found in one config file, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    pub fn single(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            diagnostics: vec![Diagnostic {
                at: None,
                message: message.into(),
            }],
        }
    }

    /// The first diagnostic, as one line: what `/_ops/status` and reload events show.
    pub fn summary(&self) -> String {
        let mut s = self.to_string();
        if let Some(i) = s.find('\n') {
            s.truncate(i);
            s.push_str(&format!(" (+{} more)", self.diagnostics.len() - 1));
        }
        s
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match d.at {
                Some((line, col)) => write!(f, "{}:{}:{}: {}", self.file, line, col, d.message)?,
                None => write!(f, "{}: {}", self.file, d.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Maps byte offsets of the source to 1-based line:col (columns count characters).
pub struct Source<'a> {
    pub text: &'a str,
}

impl Source<'_> {
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[line_start..offset].chars().count() + 1;
        (line, col)
    }
}

/// One step of a TOML path: a table key or an array index.
#[derive(Clone, Copy, Debug)]
pub enum Seg<'a> {
    Key(&'a str),
    Idx(usize),
}

/// Finds the span of the deepest existing node along `path`, so an error about a
/// missing key still points at its table.
pub fn span_of(root: &Spanned<DeTable<'_>>, path: &[Seg<'_>]) -> Range<usize> {
    let mut span = root.span();
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut value: Option<&DeValue<'_>> = None;
    for seg in path {
        let next = match (seg, table, value) {
            (Seg::Key(k), Some(t), _) => t
                .iter()
                .find(|(key, _)| key.get_ref() == k)
                .map(|(key, v)| (key.span(), v)),
            (Seg::Key(k), None, Some(v)) => v.as_table().and_then(|t| {
                t.iter()
                    .find(|(key, _)| key.get_ref() == k)
                    .map(|(key, v)| (key.span(), v))
            }),
            (Seg::Idx(i), _, Some(v)) => {
                v.as_array().and_then(|a| a.get(*i)).map(|v| (v.span(), v))
            }
            _ => None,
        };
        let Some((key_span, v)) = next else { break };
        // Point at the value of a scalar, at the key of a table (where the reader looks).
        span = if v.get_ref().is_table() || v.get_ref().is_array() {
            key_span
        } else {
            v.span()
        };
        table = None;
        value = Some(v.get_ref());
    }
    span
}

/// Whether the file spells out the key at `path` (tables, then the key), e.g. `["admin", "token"]`.
pub fn has_key(root: &Spanned<DeTable<'_>>, path: &[&str]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return true;
    };
    let mut value = match root.get_ref().iter().find(|(k, _)| k.get_ref() == first) {
        Some((_, v)) => v.get_ref(),
        None => return false,
    };
    for key in rest {
        value = match value
            .as_table()
            .and_then(|t| t.iter().find(|(k, _)| k.get_ref() == key))
        {
            Some((_, v)) => v.get_ref(),
            None => return false,
        };
    }
    true
}

/// Removes the deepest key whose key or value covers byte `offset` (the place serde
/// reported an error); true when something was removed. A header table's span is its
/// header alone, so nested tables are searched whatever their own span.
pub fn remove_at(table: &mut DeTable<'_>, offset: usize) -> bool {
    for (_, v) in table.iter_mut() {
        let found = match v.get_mut() {
            DeValue::Table(t) => remove_at(t, offset),
            DeValue::Array(a) => a.iter_mut().any(|item| match item.get_mut() {
                DeValue::Table(t) => remove_at(t, offset),
                _ => false,
            }),
            _ => false,
        };
        if found {
            return true;
        }
    }
    let covering = table
        .iter()
        .find(|(k, v)| k.span().contains(&offset) || v.span().contains(&offset))
        .map(|(k, _)| k.clone());
    covering.is_some_and(|k| table.remove(&k).is_some())
}

/// Appends "did you mean `x`?" to serde's unknown-field/variant messages.
pub fn with_hint(message: &str) -> String {
    let Some(rest) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
    else {
        return message.to_string();
    };
    let Some(end) = rest.find('`') else {
        return message.to_string();
    };
    let word = &rest[..end];
    let candidates = rest[end..]
        .split('`')
        .skip(2)
        .step_by(2)
        .filter(|c| !c.is_empty());
    let best = candidates
        .map(|c| (levenshtein(word, c), c))
        .filter(|(dist, c)| *dist <= (c.len().max(word.len()) / 3).max(1) + 1)
        .min_by_key(|(dist, _)| *dist);
    match best {
        Some((_, c)) => format!("{message}; did you mean `{c}`?"),
        None => message.to_string(),
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_suggests_the_closest_key() {
        let m = with_hint("unknown field `listn`, expected one of `listen`, `upstream`, `tls`");
        assert!(m.ends_with("did you mean `listen`?"), "{m}");
        let m = with_hint("unknown field `zzzzzz`, expected one of `listen`, `upstream`");
        assert!(!m.contains("did you mean"), "{m}");
    }

    #[test]
    fn remove_at_drops_the_deepest_key_at_the_offset() {
        let text = "[a]\nx = 1\n[[b]]\ny = 2\nz = 3\n";
        let mut t = DeTable::parse(text).unwrap();
        let y = text.find("y = 2").unwrap() + 4;
        assert!(remove_at(t.get_mut(), y));
        let b = t.get_ref().get("b").unwrap().get_ref().as_array().unwrap();
        let b0 = b[0].get_ref().as_table().unwrap();
        assert!(b0.get("y").is_none() && b0.get("z").is_some());
        let x = text.find("x = 1").unwrap() + 4;
        assert!(remove_at(t.get_mut(), x));
        let a = t.get_ref().get("a").unwrap().get_ref().as_table().unwrap();
        assert!(a.get("x").is_none());
        // Past the end of the text no key covers the offset.
        assert!(!remove_at(t.get_mut(), text.len() + 10));
    }

    #[test]
    fn line_col_counts_from_one() {
        let s = Source {
            text: "a = 1\nbb = 2\n",
        };
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        assert_eq!(s.line_col(11), (2, 6));
    }
}
