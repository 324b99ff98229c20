//! Object paths: decoding and checking the `<path>` of `/objects/<path>`, and encoding a path
//! for a request URI (the client).
//!
//! A pushed object's path is what the data port serves it at, so it must be one clean absolute
//! path: no `.` or `..` segments (also when percent-encoded), no empty segments, no backslash,
//! no control characters (NUL included), no `?` or `#`, valid percent-encoding and UTF-8.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::error::AdminError;

/// The longest decoded object path accepted.
pub const MAX_PATH_LEN: usize = 2048;

/// Encode everything in a segment except RFC 3986 unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Decodes the raw (still percent-encoded) part after `/objects/` into a clean object path
/// with a leading slash, for example `css/a%20b.css` → `/css/a b.css`.
pub fn object_path(raw: &str) -> Result<String, AdminError> {
    let decoded = percent_decode_strict(raw)?;
    let path = String::from_utf8(decoded)
        .map_err(|_| AdminError::bad_request("invalid object path: not valid UTF-8"))?;
    check_decoded(&path)?;
    Ok(format!("/{path}"))
}

/// The listing prefix of `GET /objects?prefix=`: percent-decoded, empty means `/`, and it must
/// start with `/`. A prefix need not end on a segment boundary (`/img/ic` is fine).
pub fn list_prefix(raw: &str) -> Result<String, AdminError> {
    let decoded = percent_decode_strict(raw)?;
    let prefix = String::from_utf8(decoded)
        .map_err(|_| AdminError::bad_request("invalid prefix: not valid UTF-8"))?;
    if prefix.is_empty() {
        return Ok("/".to_string());
    }
    if !prefix.starts_with('/') {
        return Err(AdminError::bad_request(
            "invalid prefix: must start with '/'",
        ));
    }
    if prefix.chars().any(char::is_control) {
        return Err(AdminError::bad_request(
            "invalid prefix: control characters are not allowed",
        ));
    }
    Ok(prefix)
}

/// Percent-encodes an object path (`/css/a b.css`) segment by segment for a request URI
/// (`/css/a%20b.css`); [`object_path`] reverses it.
pub fn encode_object_path(path: &str) -> String {
    path.strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(|seg| utf8_percent_encode(seg, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

fn check_decoded(path: &str) -> Result<(), AdminError> {
    let bad = |why: &str| {
        Err(AdminError::BadRequest(format!(
            "invalid object path: {why}"
        )))
    };
    if path.is_empty() {
        return bad("empty; use PUT /objects/<path>");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("longer than 2048 bytes");
    }
    if path.chars().any(char::is_control) {
        return bad("control characters (NUL included) are not allowed");
    }
    if path.contains('\\') {
        return bad("backslashes are not allowed");
    }
    if path.contains(['?', '#']) {
        return bad("'?' and '#' are not allowed");
    }
    for seg in path.split('/') {
        match seg {
            "" => return bad("empty segment ('//' or a trailing '/')"),
            "." | ".." => return bad("'.' and '..' segments are not allowed (path traversal)"),
            _ => {}
        }
    }
    Ok(())
}

/// Percent-decoding that refuses a `%` not followed by two hex digits.
fn percent_decode_strict(raw: &str) -> Result<Vec<u8>, AdminError> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
                _ => {
                    return Err(AdminError::bad_request(
                        "invalid percent-encoding: '%' must be followed by two hex digits",
                    ));
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths_decode() {
        assert_eq!(object_path("index.html").unwrap(), "/index.html");
        assert_eq!(object_path("css/a%20b.css").unwrap(), "/css/a b.css");
        assert_eq!(object_path("%C3%A9t%C3%A9.txt").unwrap(), "/été.txt");
        assert_eq!(object_path("a/..b/c..").unwrap(), "/a/..b/c..");
        assert_eq!(object_path(".well-known/x").unwrap(), "/.well-known/x");
    }

    #[test]
    fn traversal_and_junk_are_refused() {
        for raw in [
            "",
            "..",
            "a/../b",
            "./a",
            "a/./b",
            "%2e%2e/etc/passwd",
            "%2E%2e",
            "a/%2e",
            "a//b",
            "a/",
            "/a",
            "a%00b",
            "a%5cb",
            "a\\b",
            "a%2f..%2fb",
            "a%3fb",
            "a%",
            "a%2",
            "a%zz",
            "a%ff",
            "a%0a",
        ] {
            let e = object_path(raw).unwrap_err();
            assert_eq!(e.status(), 400, "{raw}");
        }
        assert!(object_path(&"a".repeat(3000)).is_err());
    }

    #[test]
    fn encoding_round_trips() {
        for p in ["/a b/c%d.css", "/été/x+y.txt", "/plain.html", "/q?x"] {
            let enc = encode_object_path(p);
            assert!(!enc.contains(' ') && !enc.contains('?'), "{enc}");
            if p.contains('?') {
                assert!(object_path(&enc).is_err());
            } else {
                assert_eq!(object_path(&enc).unwrap(), p);
            }
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(list_prefix("").unwrap(), "/");
        assert_eq!(list_prefix("%2Fimg%2F").unwrap(), "/img/");
        assert!(list_prefix("img").is_err());
        assert!(list_prefix("%").is_err());
    }
}
