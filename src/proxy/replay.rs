//! The copy of a request's head kept while a retry may send it again. hyper empties the
//! head it encodes, so a retry after the request left needs its own copy; this one is
//! the header lines in one buffer, and a header map is rebuilt only when a retry comes.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Uri, Version};

/// A request head, replayable. Copying the lines is one allocation and plain copies;
/// cloning the map took a reference on every name and value and allocated its three
/// tables, on every request a retry policy covers, to serve the few that are retried.
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    /// Per header line, in the map's order: flags (1 byte), the name's and the value's
    /// lengths (4 bytes each, little-endian), the name, the value.
    lines: Bytes,
}

/// A line's framing: flags and the two lengths.
const FRAME: usize = 9;
const SENSITIVE: u8 = 1;

impl Replay {
    /// Copies `head`, without its extensions (the upstream request carries none).
    pub fn new(head: &Parts) -> Self {
        // A guess: most heads are a few hundred bytes; too low costs one growth.
        let mut lines = Vec::with_capacity(head.headers.len() * 48 + 128);
        for (name, value) in &head.headers {
            let name = name.as_str().as_bytes();
            let value_bytes = value.as_bytes();
            let mut frame = [0u8; FRAME];
            frame[0] = if value.is_sensitive() { SENSITIVE } else { 0 };
            // Heads are bounded far below 4 GiB by every server that could parse them.
            frame[1..5].copy_from_slice(&(name.len() as u32).to_le_bytes());
            frame[5..9].copy_from_slice(&(value_bytes.len() as u32).to_le_bytes());
            lines.extend_from_slice(&frame);
            lines.extend_from_slice(name);
            lines.extend_from_slice(value_bytes);
        }
        Self {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            lines: Bytes::from(lines),
        }
    }

    /// The head again, as [`Replay::new`] saw it. `None` only if a line no longer parses,
    /// which a line copied from a header map cannot do; the caller then does not retry.
    pub fn head(&self) -> Option<Parts> {
        let mut headers = HeaderMap::new();
        let lines = &self.lines;
        let mut at = 0;
        while at < lines.len() {
            let frame: [u8; FRAME] = lines.get(at..at + FRAME)?.try_into().ok()?;
            let name_len = u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]);
            let value_len = u32::from_le_bytes([frame[5], frame[6], frame[7], frame[8]]);
            let value_at = at + FRAME + name_len as usize;
            let end = value_at + value_len as usize;
            if end > lines.len() {
                return None;
            }
            let name = HeaderName::from_bytes(&lines[at + FRAME..value_at]).ok()?;
            let mut value = HeaderValue::from_maybe_shared(lines.slice(value_at..end)).ok()?;
            value.set_sensitive(frame[0] & SENSITIVE != 0);
            headers.append(name, value);
            at = end;
        }
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        parts.headers = headers;
        Some(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[(&str, &[u8])]) -> Parts {
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri("/a/b?c=d")
            .version(Version::HTTP_11);
        for (name, value) in lines {
            req = req.header(*name, HeaderValue::from_bytes(value).unwrap());
        }
        req.body(()).unwrap().into_parts().0
    }

    fn lines(h: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        h.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect()
    }

    #[test]
    fn the_head_comes_back_as_it_was_copied() {
        let mut original = head(&[
            ("host", b"app.internal:8080"),
            ("x-forwarded-for", b"10.0.0.1"),
            ("accept", b"text/html"),
            ("accept", b"application/json"),
            ("x-empty", b""),
            ("x-obs-text", b"caf\xc3\xa9\tend"),
            ("authorization", b"Bearer secret"),
        ]);
        original
            .headers
            .get_mut("authorization")
            .unwrap()
            .set_sensitive(true);
        let replay = Replay::new(&original);
        let again = replay.head().expect("a head");
        assert_eq!(again.method, Method::PUT);
        assert_eq!(again.uri, "/a/b?c=d");
        assert_eq!(again.version, Version::HTTP_11);
        assert_eq!(lines(&again.headers), lines(&original.headers));
        assert!(again.headers["authorization"].is_sensitive());
        assert!(!again.headers["host"].is_sensitive());
        // Every retry gets a head of its own.
        assert_eq!(
            lines(&replay.head().unwrap().headers),
            lines(&original.headers)
        );
    }

    #[test]
    fn a_head_without_headers_and_a_long_value_come_back() {
        let empty = Replay::new(&head(&[]));
        assert!(empty.head().unwrap().headers.is_empty());
        let long = vec![b'v'; 100_000];
        let original = head(&[("x-long", &long)]);
        let again = Replay::new(&original).head().unwrap();
        assert_eq!(again.headers["x-long"].as_bytes(), &long[..]);
    }

    #[test]
    fn cut_lines_are_refused_not_misread() {
        let mut replay = Replay::new(&head(&[("x-one", b"1"), ("x-two", b"2")]));
        let full = replay.lines.clone();
        for cut in 1..full.len() {
            replay.lines = full.slice(..cut);
            // A cut on a line boundary is a shorter head; anywhere else, no head.
            if let Some(parts) = replay.head() {
                assert_eq!(parts.headers.len(), 1, "cut at {cut}");
            }
        }
    }
}
