//! Path normalization, done once per request before any decision (SPEC §4).
//! Order: decode unreserved %XX, merge slashes, remove dot segments; %2F and %5C stay encoded.

use std::borrow::Cow;

/// The outcome for one request path.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalized<'a> {
    Path(Cow<'a, str>),
    /// An encoded `/` or `\` under `encoded_slashes = "reject"`.
    EncodedSlash,
}

/// Normalizes `path` (no query). Borrows when the path is already normal, which is the
/// common case, so most requests allocate nothing here.
pub fn normalize(path: &str, reject_encoded_slashes: bool) -> Normalized<'_> {
    let bytes = path.as_bytes();
    let has_pct = bytes.contains(&b'%');
    if !has_pct && is_clean(bytes) {
        return Normalized::Path(Cow::Borrowed(path));
    }
    let decoded = if has_pct {
        decode_unreserved(path)
    } else {
        Cow::Borrowed(path)
    };
    // Checked after decoding: `%%32f` decodes to `%2f`.
    if reject_encoded_slashes && has_pct && has_encoded_slash(decoded.as_bytes()) {
        return Normalized::EncodedSlash;
    }
    let merged = merge_slashes(&decoded);
    Normalized::Path(Cow::Owned(remove_dot_segments(&merged)))
}

fn has_encoded_slash(b: &[u8]) -> bool {
    b.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && (w[2] | 0x20) == b'f') || (w[1] == b'5' && (w[2] | 0x20) == b'c'))
    })
}

/// Starts with `/`, no `//`, no `.`/`..` segment.
fn is_clean(b: &[u8]) -> bool {
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut prev_slash = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' {
            if prev_slash {
                return false;
            }
            prev_slash = true;
        } else {
            if prev_slash && c == b'.' {
                let rest = &b[i..];
                if rest == b"."
                    || rest == b".."
                    || rest.starts_with(b"./")
                    || rest.starts_with(b"../")
                {
                    return false;
                }
            }
            prev_slash = false;
        }
        i += 1;
    }
    true
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Decodes `%XX` only where XX is an unreserved character; other escapes keep their case.
/// A decoded character that completes a new escape with what precedes it (`%%32e` -> `%2e`)
/// is decoded too, so no unreserved escape is left for the app to turn into a dot segment
/// and normalizing twice changes nothing.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let b = path.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let c = h * 16 + l;
            if is_unreserved(c) {
                let o = out.get_or_insert_with(|| b[..i].to_vec());
                push_decoding(o, c);
                i += 3;
                continue;
            }
        }
        if let Some(o) = out.as_mut() {
            push_decoding(o, b[i]);
        }
        i += 1;
    }
    match out {
        // Only ASCII bytes were substituted for ASCII escapes, so this stays valid UTF-8.
        Some(o) => Cow::Owned(
            String::from_utf8(o)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
        None => Cow::Borrowed(path),
    }
}

/// Pushes `c`, then decodes the unreserved escape it may have completed, repeatedly.
/// Linear overall: each decode shortens the buffer by two.
fn push_decoding(o: &mut Vec<u8>, c: u8) {
    o.push(c);
    while let [.., b'%', h, l] = o[..]
        && let (Some(h), Some(l)) = (hex(h), hex(l))
        && is_unreserved(h * 16 + l)
    {
        o.truncate(o.len() - 3);
        o.push(h * 16 + l);
    }
}

fn merge_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 1);
    if !p.starts_with('/') {
        out.push('/');
    }
    let mut prev = false;
    for c in p.chars() {
        if c == '/' {
            if !prev {
                out.push(c);
            }
            prev = true;
        } else {
            out.push(c);
            prev = false;
        }
    }
    out
}

/// RFC 3986 §5.2.4 on an absolute path; climbing above the root stays at `/`.
fn remove_dot_segments(p: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    let trailing = p.ends_with('/') || p.ends_with("/.") || p.ends_with("/..");
    for seg in p.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    // A trailing empty segment from "/a/" was pushed as ""; rebuild without doubling it.
    while segs.last() == Some(&"") {
        segs.pop();
    }
    let mut out = String::with_capacity(p.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        match normalize(p, false) {
            Normalized::Path(p) => p.into_owned(),
            Normalized::EncodedSlash => "<400>".into(),
        }
    }

    #[test]
    fn spec_examples() {
        assert_eq!(n("/_health/../api/x"), "/api/x");
        assert_eq!(n("//_health/..%2fapi"), "/_health/..%2fapi");
        assert_eq!(n("/%2e%2e/api"), "/api");
        assert_eq!(n("/a/%2E%2E/b"), "/b");
        assert_eq!(n("/%41pi"), "/Api");
        assert_eq!(n("/../../etc"), "/etc");
        assert_eq!(n("/a//b///c"), "/a/b/c");
        assert_eq!(n("/a/./b/"), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/x%2Fy%5c"), "/x%2Fy%5c");
        assert_eq!(n("/%e2%82%ac"), "/%e2%82%ac");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a/.hidden"), "/a/.hidden");
        assert_eq!(n("/a/..b"), "/a/..b");
    }

    #[test]
    fn clean_paths_borrow() {
        assert!(matches!(
            normalize("/api/v1/items", false),
            Normalized::Path(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn encoded_slash_rejected_when_asked() {
        assert_eq!(normalize("/_health/a%2Fb", true), Normalized::EncodedSlash);
        assert_eq!(normalize("/a%5Cb", true), Normalized::EncodedSlash);
        assert!(matches!(normalize("/a%20b", true), Normalized::Path(_)));
    }

    #[test]
    fn escapes_made_by_decoding_are_decoded_too() {
        // Found by the normalize fuzz target: `%%32e` became `%2e`, a dot segment for any
        // app that decodes once, and normalizing again changed the path.
        assert_eq!(n("/%%32e%%32e/admin"), "/admin");
        assert_eq!(n("/public/%%32e%%32e/admin"), "/admin");
        assert_eq!(n("/%%%332e"), "/");
        assert_eq!(n("/%%32x"), "/%2x");
        assert_eq!(normalize("/a%%32fb", true), Normalized::EncodedSlash);
        assert_eq!(n("/a%%32fb"), "/a%2fb");
    }
}
