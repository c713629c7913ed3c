//! Reads opsgate's `/metrics`: the one Prometheus / OpenMetrics text parser the tests share,
//! with lookups by exact series text or by name and a subset of labels.

use http::StatusCode;

use super::opsgate::get;

/// One sample line: `name{k="v",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// The series as written, name and label set: `x_total{a="b"}`.
    pub series: &'a str,
    pub name: &'a str,
    pub labels: Vec<(&'a str, String)>,
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `key`, unescaped.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample line in `text`; comments, blank lines and lines that do not parse are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
}

/// The value of the sample whose series is exactly `series` (e.g. `x_total{a="b"}`).
pub fn series(text: &str, series: &str) -> Option<f64> {
    samples(text).find(|s| s.series == series).map(|s| s.value)
}

/// The value of the first sample named `name` whose labels include every `labels` pair.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
}

/// `GET url` (a `/metrics` endpoint), asserting 200; the body as text.
pub async fn scrape(url: &str) -> String {
    let answer = get(url, &[]).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "GET {url}: {}",
        answer.text()
    );
    answer.text()
}

fn parse_line(line: &str) -> Option<Sample<'_>> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let (labels, series_end) = if line[name_end..].starts_with('{') {
        let (labels, len) = parse_labels(&line[name_end + 1..])?;
        (labels, name_end + 1 + len)
    } else {
        (Vec::new(), name_end)
    };
    // After the value an OpenMetrics line may carry a timestamp or an exemplar.
    let value = line[series_end..].split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        series: &line[..series_end],
        name,
        labels,
        value,
    })
}

/// Parses `k="v",...}` (the text after `{`); returns the labels and the length up to and
/// including the closing `}`.
fn parse_labels(text: &str) -> Option<(Vec<(&str, String)>, usize)> {
    let mut labels = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    loop {
        match bytes.get(i)? {
            b'}' => return Some((labels, i + 1)),
            b',' | b' ' => i += 1,
            _ => {
                let eq = i + text[i..].find('=')?;
                let key = text[i..eq].trim();
                if bytes.get(eq + 1) != Some(&b'"') {
                    return None;
                }
                let mut value = String::new();
                let mut j = eq + 2;
                loop {
                    match bytes.get(j)? {
                        b'\\' => {
                            match bytes.get(j + 1)? {
                                b'n' => value.push('\n'),
                                b => value.push(char::from(*b)),
                            }
                            j += 2;
                        }
                        b'"' => break,
                        _ => {
                            let c = text[j..].chars().next()?;
                            value.push(c);
                            j += c.len_utf8();
                        }
                    }
                }
                labels.push((key, value));
                i = j + 1;
            }
        }
    }
}

#[test]
fn parses_names_labels_escapes_and_trailing_fields() {
    let text = "# HELP x_total Things.\n\
                x_total{a=\"b\",c=\"d,e}\\\"\"} 3\n\
                up 1 1700000000\n\
                y_bucket{le=\"+Inf\"} 7 # {trace_id=\"t\"} 1\n";
    let all: Vec<_> = samples(text).collect();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].series, "x_total{a=\"b\",c=\"d,e}\\\"\"}");
    assert_eq!(all[0].label("c"), Some("d,e}\""));
    assert_eq!(sample(text, "x_total", &[("a", "b")]), Some(3.0));
    assert_eq!(sample(text, "x_total", &[("a", "z")]), None);
    assert_eq!(series(text, "up"), Some(1.0));
    assert_eq!(series(text, "y_bucket{le=\"+Inf\"}"), Some(7.0));
    assert_eq!(series(text, "x_total"), None);
}
