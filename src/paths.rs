//! Path prefixes matched on segment boundaries: one rule shared by the router, the
//! maintenance gates, the admin listener and config validation, kept in a leaf module so
//! that none of them imports another for it.

/// Does `prefix` match `path` on a segment boundary? (`/api` matches `/api`, `/api/`,
/// `/api/x`; never `/apix`.) Routes, metrics classes, exempt paths and validation all
/// match prefixes this way.
pub fn segment_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_prefix_matches_on_boundaries() {
        assert!(segment_prefix("/api", "/api"));
        assert!(segment_prefix("/api/", "/api"));
        assert!(segment_prefix("/api/x", "/api"));
        assert!(segment_prefix("/api/x", "/api/"));
        assert!(!segment_prefix("/apix", "/api"));
        assert!(segment_prefix("/anything", "/"));
        assert!(segment_prefix("/", "/"));
    }
}
