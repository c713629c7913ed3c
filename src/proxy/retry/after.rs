//! `Retry-After` from an upstream: delta-seconds or an HTTP date, as a wait.

use std::time::{Duration, SystemTime};

use http::HeaderValue;

/// Length of an IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
const IMF_FIXDATE_LEN: usize = 29;

/// Parses `Retry-After`: delta-seconds or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`); a date in the past is zero. Anything else
/// is `None`, as for any malformed value: the obsolete RFC 850 and asctime date
/// forms (which RFC 9110 forbids senders to generate), impossible dates, and an
/// IMF-fixdate whose weekday does not match its date or whose second is 60.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly large values still mean "not soon": saturate, don't reject.
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    // `httpdate` also reads the obsolete forms; they are 24 (asctime) or at least
    // 30 (RFC 850) bytes long, so the length alone keeps them out.
    if text.len() != IMF_FIXDATE_LEN {
        return None;
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    /// Sun, 06 Nov 1994 08:49:37 GMT
    fn rfc_example() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    fn retry_after(text: &'static str) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_static(text), rfc_example())
    }

    #[test]
    fn retry_after_delta_seconds() {
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("0"), Some(Duration::ZERO));
        assert_eq!(retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(
            retry_after("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["-1", "1.5", "", "5s", "+3", "0x10"] {
            assert_eq!(retry_after(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_imf_fixdate() {
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:51:37 GMT"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after("Sat, 05 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO),
            "past"
        );
        assert_eq!(
            retry_after("Mon, 07 Nov 1994 08:49:37 GMT"),
            Some(Duration::from_secs(86_400))
        );
        let far = parse_retry_after(
            &HeaderValue::from_static("Sun, 22 Nov 2026 17:00:00 GMT"),
            UNIX_EPOCH,
        );
        assert_eq!(far, Some(Duration::from_secs(1_795_366_800)));
        let leap = parse_retry_after(
            &HeaderValue::from_static("Tue, 29 Feb 2000 23:59:59 GMT"),
            UNIX_EPOCH,
        );
        assert_eq!(leap, Some(Duration::from_secs(951_868_799)));
        for bad in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Thu, 29 Feb 2001 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:49:37 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            // Stricter than a shape check: the weekday must match, no leap second.
            "Mon, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:60 GMT",
        ] {
            assert_eq!(retry_after(bad), None, "{bad:?}");
        }
    }
}
