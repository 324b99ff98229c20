//! What a request and a response allow (codings accepted, codings present, `no-transform`),
//! and the headers of an encoded variant or of a decoded body.

use http::header::{self, HeaderMap, HeaderValue};
use outpost_cache::key::{Accepted, Coding};

/// Whether the request's Accept-Encoding allows `coding` ([`Accepted::accepts`]).
pub fn accepts(headers: &HeaderMap, coding: Coding) -> bool {
    Accepted::parse(headers).accepts(coding)
}

/// The content coding a response already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoded {
    /// None, or `identity`.
    No,
    /// One coding we can decode.
    Known(Coding),
    /// Anything else (deflate, zstd, several codings): left alone.
    Other,
}

pub(crate) fn encoded(headers: &HeaderMap) -> Encoded {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    match (codings.next(), codings.next()) {
        (None, _) => Encoded::No,
        (Some(c), None) => match Coding::named(c) {
            Some(c) => Encoded::Known(c),
            None => Encoded::Other,
        },
        _ => Encoded::Other,
    }
}

/// Does a Cache-Control field in `headers` carry the `no-transform` directive?
pub(crate) fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
}

/// Adds `Accept-Encoding` to Vary unless it (or `*`) is there already.
pub fn merge_vary(headers: &mut HeaderMap) {
    let mut names: Vec<&str> = Vec::new();
    for v in headers.get_all(header::VARY) {
        let Ok(v) = v.to_str() else { return };
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" || name.eq_ignore_ascii_case("accept-encoding") {
                return;
            }
            names.push(name);
        }
    }
    names.push("Accept-Encoding");
    if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
        headers.insert(header::VARY, v);
    }
}

/// `"x"` → `W/"x"`; a weak tag stays as it is.
pub fn weaken_etag(headers: &mut HeaderMap) {
    let Some(tag) = headers.get(header::ETAG) else {
        return;
    };
    if tag.as_bytes().starts_with(b"W/") {
        return;
    }
    let mut weak = Vec::with_capacity(tag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(tag.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&weak) {
        headers.insert(header::ETAG, v);
    }
}

/// Fields that describe the exact bytes, which a change of coding invalidates.
const BYTE_FIELDS: [&str; 5] = [
    "content-length",
    "content-md5",
    "content-digest",
    "repr-digest",
    "digest",
];

/// The headers of the `coding` variant of an identity response.
pub fn encoded_headers(identity: &HeaderMap, coding: Coding) -> HeaderMap {
    let mut h = identity.clone();
    for name in BYTE_FIELDS {
        h.remove(name);
    }
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.as_str()),
    );
    weaken_etag(&mut h);
    merge_vary(&mut h);
    h
}

/// The headers of the decoded (identity) form of an encoded response.
pub(crate) fn decoded_headers(headers: &mut HeaderMap) {
    for name in BYTE_FIELDS {
        headers.remove(name);
    }
    headers.remove(header::CONTENT_ENCODING);
    weaken_etag(headers);
    merge_vary(headers);
}
