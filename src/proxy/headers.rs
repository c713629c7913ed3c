//! Header rewriting between client and upstream: hop-by-hop removal, X-Forwarded-*,
//! request id. Pure functions over `HeaderMap`s; the pipeline calls them in order.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_OPSGATE_CIRCUIT: HeaderName = HeaderName::from_static("x-opsgate-circuit");
/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
static FIXED_HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What kind of upgrade a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    None,
    /// WebSocket and other HTTP/1.1 upgrades: tunnelled.
    Tunnel,
}

/// `Upgrade` on an HTTP/1.1 request with `Connection: upgrade`; `h2c` is never tunnelled.
pub fn upgrade_kind(h: &HeaderMap, version: http::Version) -> Upgrade {
    if version != http::Version::HTTP_11 {
        return Upgrade::None;
    }
    let Some(up) = h.get(header::UPGRADE) else {
        return Upgrade::None;
    };
    if up.as_bytes().eq_ignore_ascii_case(b"h2c") {
        return Upgrade::None;
    }
    let conn_upgrade = h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    });
    if conn_upgrade {
        Upgrade::Tunnel
    } else {
        Upgrade::None
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names. An upgrade
/// keeps `Connection: upgrade` and `Upgrade`, which the tunnel needs. `TE: trailers` stays
/// (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: Upgrade) {
    let tunnel = upgrade == Upgrade::Tunnel;
    // One pass over the lines finds all there is to do, without hashing a name; most
    // messages carry none of these, a typical response just `Connection`.
    let mut present = 0u8;
    let mut names_others = false;
    let mut te_other = false;
    for (k, v) in h.iter() {
        let v = v.as_bytes();
        if k == header::TE {
            te_other |= !v.eq_ignore_ascii_case(b"trailers");
        } else if let Some(i) = fixed_index(k) {
            present |= 1 << i;
            // Every `Connection` line counts: `close` on the first must not hide a name
            // on the second.
            names_others |= i == 0 && (v.contains(&b',') || !is_std_token(v));
        }
    }
    if names_others {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .filter(|n| !(tunnel && n == header::UPGRADE))
            .collect();
        // One of them may be a name removed below too: removing it twice is harmless.
        for n in named {
            h.remove(n);
        }
    }
    if tunnel {
        // The tunnel needs `Connection: upgrade` and `Upgrade`: set and kept below.
        present &= !(1 << 0 | 1 << 7);
    }
    while present != 0 {
        let i = present.trailing_zeros() as usize;
        present &= present - 1;
        h.remove(&FIXED_HOP_BY_HOP[i]);
    }
    if tunnel {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_other {
        h.remove(header::TE);
    }
}

/// Where `name` is in [`FIXED_HOP_BY_HOP`]. Most names are ruled out by their length
/// alone (the fixed names are 7, 10 or 16 to 19 bytes long), without reading their bytes.
/// The rest are compared with constants, not with the table: a standard name is then one
/// compare of its tag, and no request reads the table's cache lines.
fn fixed_index(name: &HeaderName) -> Option<usize> {
    if !matches!(name.as_str().len(), 7 | 10 | 16..=19) {
        return None;
    }
    let standard = |h: HeaderName| *name == h;
    Some(if standard(header::CONNECTION) {
        0
    } else if standard(header::PROXY_AUTHENTICATE) {
        3
    } else if standard(header::PROXY_AUTHORIZATION) {
        4
    } else if standard(header::TRAILER) {
        5
    } else if standard(header::TRANSFER_ENCODING) {
        6
    } else if standard(header::UPGRADE) {
        7
    } else {
        // Custom names, lowercase in a `HeaderName`.
        match name.as_str() {
            "keep-alive" => 1,
            "proxy-connection" => 2,
            _ => return None,
        }
    })
}

/// `Connection: close` / `keep-alive` name no extra headers; skip the scan for them.
fn is_std_token(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"close") || v.eq_ignore_ascii_case(b"keep-alive")
}

/// An IP as a header value, with no heap `String` and no `fmt` for IPv4.
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_bytes(crate::ip_text::IpText::new(ip).as_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Sets X-Forwarded-For/-Proto/-Host. A trusted peer's X-Forwarded-Proto/-Host are kept;
/// X-Forwarded-For is always kept and appended to (only `trusted` decides who believes it).
/// `peer` is the peer's IP as text (`ip_header_value`).
pub fn set_forwarded(
    h: &mut HeaderMap,
    peer: &HeaderValue,
    tls: bool,
    host: Option<&HeaderValue>,
    peer_trusted: bool,
) {
    // One hash of the name whether the client sent the header or not.
    match h.entry(&X_FORWARDED_FOR) {
        header::Entry::Occupied(mut e) if !e.get().is_empty() => {
            let prev = e.get();
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                e.insert(v);
            }
        }
        header::Entry::Occupied(mut e) => {
            e.insert(peer.clone());
        }
        header::Entry::Vacant(e) => {
            e.insert(peer.clone());
        }
    }
    if !(peer_trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if tls { "https" } else { "http" };
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !(peer_trusted && h.contains_key(&X_FORWARDED_HOST))
        && let Some(host) = host
    {
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
}

/// Eight lowercase hex digits, one per byte of `nibbles`, each byte 0..=15. Arithmetic on
/// the whole word instead of a lookup table: a table of digit pairs is 512 bytes, and
/// random ids touch most of its cache lines on every request.
fn hex8(nibbles: u64) -> [u8; 8] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // 1 in each byte above 9: adding 6 carries into bit 4 exactly then, never past the byte.
    let above_9 = ((nibbles + 6 * ONES) >> 4) & ONES;
    // '0' for every digit; 'a' - '0' - 10 = 39 more for the letters.
    (nibbles + u64::from(b'0') * ONES + 39 * above_9).to_le_bytes()
}

/// Returns the request's id, generating a 32-hex-digit one when the client sent none.
pub fn ensure_request_id(h: &mut HeaderMap) -> HeaderValue {
    match h.entry(&X_REQUEST_ID) {
        header::Entry::Occupied(e) if !e.get().is_empty() && e.get().len() <= 200 => {
            e.get().clone()
        }
        header::Entry::Occupied(mut e) => {
            let id = new_request_id();
            e.insert(id.clone());
            id
        }
        header::Entry::Vacant(e) => e.insert(new_request_id()).clone(),
    }
}

pub fn new_request_id() -> HeaderValue {
    const LOW_NIBBLES: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    let mut buf = [0u8; 32];
    // 128 random bits, each nibble one digit; their order in the id does not matter.
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    let words = [a, a >> 4, b, b >> 4].map(|w| hex8(w & LOW_NIBBLES));
    for (digits, word) in buf.chunks_exact_mut(8).zip(words) {
        digits.copy_from_slice(&word);
    }
    // Owned by the `Bytes` itself: one allocation, and the clones that go into the
    // response and the access line are reference counts.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut h, Upgrade::None);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn every_connection_and_te_line_counts() {
        // Found by the headers fuzz target: only the first line of each was looked at.
        let mut h = map(&[
            ("connection", "close"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("te", "gzip"),
        ]);
        strip_hop_by_hop(&mut h, Upgrade::None);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn upgrade_keeps_its_headers_and_h2c_is_not_tunnelled() {
        let h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(upgrade_kind(&h, http::Version::HTTP_11), Upgrade::Tunnel);
        let mut h2 = h.clone();
        strip_hop_by_hop(&mut h2, Upgrade::Tunnel);
        assert_eq!(h2.get("upgrade").unwrap(), "websocket");
        let c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert_eq!(upgrade_kind(&c, http::Version::HTTP_11), Upgrade::None);
    }

    #[test]
    fn the_length_check_lets_every_fixed_name_through() {
        for (i, name) in FIXED_HOP_BY_HOP.iter().enumerate() {
            assert_eq!(fixed_index(name), Some(i), "{name}");
        }
        for name in ["te", "host", "trailers", "connections", "content-length"] {
            assert_eq!(fixed_index(&HeaderName::from_static(name)), None, "{name}");
        }
    }

    #[test]
    fn xff_appends() {
        let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
        let peer = ip_header_value("10.0.0.1".parse().unwrap());
        set_forwarded(&mut h, &peer, false, None, false);
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "1.2.3.4, 10.0.0.1");
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "http");
    }

    #[test]
    fn request_id_generated_or_kept() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert!(
            id.as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)),
            "{id:?}"
        );
        assert_ne!(new_request_id(), new_request_id());
        // Every nibble is the digit it stands for.
        assert_eq!(&hex8(0x0706_0504_0302_0100), b"01234567");
        assert_eq!(&hex8(0x0f0e_0d0c_0b0a_0908), b"89abcdef");
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
    }
}
