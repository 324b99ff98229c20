//! The client's own validators, evaluated by the cache against the stored ones: `If-None-Match`
//! and `If-Modified-Since` (RFC 9111 §4.3.2, RFC 9110 §13), and `If-Range` for ranges.

use http::header::{self, HeaderMap};

/// `If-Range` (RFC 9110 §13.1.5): serve the range only if the validator still matches.
pub(super) fn if_range_allows(req: &HeaderMap, resp: &HeaderMap) -> bool {
    let Some(v) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let v = v.trim();
    if v.starts_with('"') || v.starts_with("W/") {
        // Strong comparison only.
        return !v.starts_with("W/")
            && resp
                .get(header::ETAG)
                .and_then(|e| e.to_str().ok())
                .is_some_and(|e| e.trim() == v);
    }
    match (
        httpdate::parse_http_date(v),
        resp.get(header::LAST_MODIFIED)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| httpdate::parse_http_date(l).ok()),
    ) {
        (Ok(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Does the client's conditional GET/HEAD match the representation we are about to send?
pub(super) fn not_modified(req: &HeaderMap, resp: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = resp.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let etag = etag.trim().trim_start_matches("W/");
        return inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == etag);
    }
    if let Some(ims) = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        && let Some(lm) = resp
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        return lm <= ims;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn conditionals() {
        let mut resp = HeaderMap::new();
        resp.insert("etag", HeaderValue::from_static("\"abc\""));
        resp.insert(
            "last-modified",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        let mut req = HeaderMap::new();
        req.insert(
            "if-none-match",
            HeaderValue::from_static("W/\"abc\", \"x\""),
        );
        assert!(not_modified(&req, &resp));
        let mut req = HeaderMap::new();
        req.insert(
            "if-modified-since",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert!(not_modified(&req, &resp));
        req.insert("if-none-match", HeaderValue::from_static("\"zzz\""));
        assert!(!not_modified(&req, &resp));
    }
}
