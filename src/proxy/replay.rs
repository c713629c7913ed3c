//! The copy of a request's head kept while a retry may send it again. hyper empties the
//! head it encodes, so a retry after the request left needs its own copy. On HTTP/1.1 it
//! is the bytes the connection wrote (see `upstream::tap`); on h2, the header lines in one
//! buffer. A header map is rebuilt from either only when a retry comes.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Uri, Version};

/// A request head, replayable once kept. Either copy is one allocation and plain copies;
/// cloning the map took a reference on every name and value and allocated its three
/// tables, on every request a retry policy covers, to serve the few that are retried.
#[derive(Default)]
pub struct Replay {
    kept: Kept,
}

#[derive(Default)]
enum Kept {
    #[default]
    Nothing,
    /// An HTTP/1.1 head as written: request line, header lines, blank line, and maybe
    /// some of the body after it.
    Written(Bytes),
    Lines {
        method: Method,
        uri: Uri,
        version: Version,
        /// Per header line, in the map's order: flags (1 byte), the name's and the
        /// value's lengths (4 bytes each, little-endian), the name, the value.
        lines: Bytes,
    },
}

/// A line's framing: flags and the two lengths.
const FRAME: usize = 9;
const SENSITIVE: u8 = 1;

impl Replay {
    /// A copy of `head`'s lines, without its extensions (the upstream request carries none).
    pub fn lines(head: &Parts) -> Self {
        let mut replay = Self::default();
        replay.keep_lines(&head.method, &head.uri, head.version, &head.headers);
        replay
    }

    /// Whether nothing is kept yet: the first attempt keeps the head it sends.
    pub fn is_empty(&self) -> bool {
        matches!(self.kept, Kept::Nothing)
    }

    /// Keeps an HTTP/1.1 head as a connection wrote it; bytes after the head (of the
    /// body) are ignored, a head cut short is no head.
    pub fn keep_written(&mut self, head: Vec<u8>) {
        self.kept = Kept::Written(Bytes::from(head));
    }

    /// Keeps a head as its lines (h2, where no written form is at hand).
    pub fn keep_lines(
        &mut self,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
    ) {
        // A guess: most heads are a few hundred bytes; too low costs one growth.
        let mut lines = Vec::with_capacity(headers.len() * 48 + 128);
        for (name, value) in headers {
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
        self.kept = Kept::Lines {
            method: method.clone(),
            uri: uri.clone(),
            version,
            lines: Bytes::from(lines),
        };
    }

    /// The head again, as it was kept. `None` when nothing was kept or it no longer
    /// parses, which a copy of a valid head cannot do; the caller then does not retry.
    pub fn head(&self) -> Option<Parts> {
        match &self.kept {
            Kept::Nothing => None,
            Kept::Written(head) => parse_written(head),
            Kept::Lines {
                method,
                uri,
                version,
                lines,
            } => {
                let (mut parts, ()) = Request::new(()).into_parts();
                parts.method = method.clone();
                parts.uri = uri.clone();
                parts.version = *version;
                parts.headers = parse_lines(lines)?;
                Some(parts)
            }
        }
    }
}

/// An HTTP/1.1 head as hyper wrote it, back into parts. Values are slices of `head`.
fn parse_written(head: &Bytes) -> Option<Parts> {
    // Every header is a line: the line count bounds the header count.
    let lines = memchr::memchr_iter(b'\n', head).count();
    let mut headers = vec![httparse::EMPTY_HEADER; lines];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return None;
    };
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    parts.uri = Uri::from_maybe_shared(head.slice_ref(req.path?.as_bytes())).ok()?;
    parts.version = match req.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value)).ok()?;
        map.append(name, value);
    }
    parts.headers = map;
    Some(parts)
}

fn parse_lines(lines: &Bytes) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
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
    Some(headers)
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
        let replay = Replay::lines(&original);
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
        let empty = Replay::lines(&head(&[]));
        assert!(empty.head().unwrap().headers.is_empty());
        let long = vec![b'v'; 100_000];
        let original = head(&[("x-long", &long)]);
        let again = Replay::lines(&original).head().unwrap();
        assert_eq!(again.headers["x-long"].as_bytes(), &long[..]);
    }

    /// What hyper writes for a request: lowercase names, `: `, CRLF, a blank line.
    const WRITTEN: &[u8] = b"PUT /a/b?c=d HTTP/1.1\r\nhost: app.internal:8080\r\n\
        accept: text/html\r\naccept: application/json\r\nx-empty: \r\n\
        x-obs-text: caf\xc3\xa9\tend\r\ncontent-length: 4\r\n\r\n";

    fn written() -> Replay {
        let mut replay = Replay::default();
        assert!(replay.is_empty());
        replay.keep_written(WRITTEN.to_vec());
        assert!(!replay.is_empty());
        replay
    }

    #[test]
    fn a_written_head_comes_back_line_for_line() {
        let again = written().head().expect("a head");
        assert_eq!(again.method, Method::PUT);
        assert_eq!(again.uri, "/a/b?c=d");
        assert_eq!(again.version, Version::HTTP_11);
        let expected = head(&[
            ("host", b"app.internal:8080"),
            ("accept", b"text/html"),
            ("accept", b"application/json"),
            ("x-empty", b""),
            ("x-obs-text", b"caf\xc3\xa9\tend"),
            ("content-length", b"4"),
        ]);
        assert_eq!(lines(&again.headers), lines(&expected.headers));
    }

    #[test]
    fn a_cut_written_head_is_refused_and_a_body_after_it_ignored() {
        let mut replay = written();
        for cut in 0..WRITTEN.len() {
            replay.kept = Kept::Written(Bytes::copy_from_slice(&WRITTEN[..cut]));
            assert!(replay.head().is_none(), "cut at {cut}");
        }
        replay.kept = Kept::Written(Bytes::from([WRITTEN, b"body\r\nx: y\r\n\r\n"].concat()));
        let again = replay.head().expect("a head");
        assert_eq!(again.headers.len(), 6);
        assert!(Replay::default().head().is_none(), "nothing kept");
    }

    #[test]
    fn cut_lines_are_refused_not_misread() {
        let mut replay = Replay::lines(&head(&[("x-one", b"1"), ("x-two", b"2")]));
        let Kept::Lines { lines, .. } = &mut replay.kept else {
            panic!("lines kept");
        };
        let full = lines.clone();
        for cut in 1..full.len() {
            let Kept::Lines { lines, .. } = &mut replay.kept else {
                unreachable!()
            };
            *lines = full.slice(..cut);
            // A cut on a line boundary is a shorter head; anywhere else, no head.
            if let Some(parts) = replay.head() {
                assert_eq!(parts.headers.len(), 1, "cut at {cut}");
            }
        }
    }
}
