//! The request phase: what a client may send, and what the request is ([`dispatch`]: purge,
//! cache or pass, decided before anything else is prepared).
//!
//! [`check`] refuses what the cache could misread before anything is looked up: ambiguous
//! authorities (two Host fields, an HTTP/2 `:authority` that disagrees with `host`, userinfo, a
//! scheme other than http or https), a GET or HEAD that carries a body (RFC 9110 §9.3.1: the
//! body would have to be forwarded to mean anything, and forwarding its framing without it
//! smuggles the next request on a pooled connection), an `Expect` other than `100-continue`
//! (RFC 9110 §10.1.1), TRACE, and an oversized target.

use http::header;
use http::{Method, StatusCode, Version, request};

use crate::cache::key::{CacheKey, NormalizedRequest};
use crate::error::EdgeError;
pub use crate::error::Refusal;

/// Limits of the request phase.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Longest request target (path and query) in bytes: 414 above.
    pub max_uri: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_uri: 8 << 10 }
    }
}

/// Refuses requests the cache could misread (see the module docs). `has_body`: the request
/// carries content (a non-zero Content-Length, Transfer-Encoding, or HTTP/2 DATA).
pub fn check(parts: &request::Parts, has_body: bool, limits: RequestLimits) -> Result<(), Refusal> {
    let uri = &parts.uri;
    if uri.path_and_query().map_or(0, |p| p.as_str().len()) > limits.max_uri {
        return Err(Refusal::new(
            StatusCode::URI_TOO_LONG,
            "the request target is too long",
        ));
    }
    if let Some(scheme) = uri.scheme_str()
        && !scheme.eq_ignore_ascii_case("http")
        && !scheme.eq_ignore_ascii_case("https")
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "only http and https targets are served",
        ));
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "more than one Host header (RFC 9112 §3.2)",
        ));
    }
    if let Some(a) = uri.authority()
        && a.as_str().contains('@')
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "userinfo in the request target is not accepted",
        ));
    }
    if let Some(h) = host
        && h.as_bytes().contains(&b'@')
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid Host header: userinfo is not part of a host",
        ));
    }
    // HTTP/2 carries the authority twice: they must agree (RFC 9113 §8.3.1). HTTP/1.1's
    // absolute form overrides Host (RFC 9112 §3.2.2); the key and the origin both use it.
    if parts.version == Version::HTTP_2
        && let (Some(a), Some(h)) = (uri.authority(), host)
        && !same_authority(a.as_str().as_bytes(), h.as_bytes())
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the host header does not match :authority (RFC 9113 §8.3.1)",
        ));
    }
    if parts.method == Method::TRACE {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "TRACE is not allowed",
        ));
    }
    if (parts.method == Method::GET || parts.method == Method::HEAD) && has_body {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "a GET or HEAD request must not carry a body (RFC 9110 §9.3.1)",
        ));
    }
    for v in parts.headers.get_all(header::EXPECT) {
        if !v.as_bytes().eq_ignore_ascii_case(b"100-continue") {
            return Err(Refusal::new(
                StatusCode::EXPECTATION_FAILED,
                "only Expect: 100-continue is supported",
            ));
        }
    }
    Ok(())
}

/// Two spellings of one authority: compared without case, a trailing dot or the default port.
fn same_authority(a: &[u8], b: &[u8]) -> bool {
    fn norm(x: &[u8]) -> &[u8] {
        let x = x.trim_ascii();
        let x = x.strip_suffix(b":80").unwrap_or(x);
        let x = x.strip_suffix(b":443").unwrap_or(x);
        x.strip_suffix(b".").unwrap_or(x)
    }
    norm(a).eq_ignore_ascii_case(norm(b))
}

/// What the proxy does with a request, decided once, before anything else is prepared.
pub enum Dispatch {
    /// `PURGE`: an admin operation on the key ([`super::purge`]).
    Purge(NormalizedRequest),
    /// GET or HEAD: the cache answers.
    Cache(NormalizedRequest),
    /// Any other method: passed through with its body (and a success invalidates the URL).
    Pass(NormalizedRequest),
}

/// The request phase: refuses what [`check`] refuses, builds the cache key (unless the fast
/// path built it already: `key`; a request is keyed once), and dispatches.
pub fn dispatch(
    parts: &request::Parts,
    has_body: bool,
    route: &super::Route,
    key: Option<CacheKey>,
) -> Result<Dispatch, EdgeError> {
    check(parts, has_body, route.limits).map_err(|refusal| EdgeError::Refused {
        refusal,
        unread_body: has_body,
    })?;
    let norm = match key {
        Some(key) => NormalizedRequest::with_key(&parts.method, &parts.headers, key),
        None => NormalizedRequest::new(&parts.method, &parts.uri, &parts.headers, &route.key_opts),
    }
    .map_err(|e| EdgeError::BadRequest(e.to_string()))?;
    Ok(if parts.method.as_str() == "PURGE" {
        Dispatch::Purge(norm)
    } else if parts.method == Method::GET || parts.method == Method::HEAD {
        Dispatch::Cache(norm)
    } else {
        Dispatch::Pass(norm)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(
        method: &str,
        uri: &str,
        version: Version,
        headers: &[(&str, &str)],
    ) -> request::Parts {
        let mut b = http::Request::builder()
            .method(method)
            .uri(uri)
            .version(version);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn refuses_ambiguous_requests() {
        let l = RequestLimits::default();
        let ok = |p: request::Parts, body| check(&p, body, l);
        let h1 = Version::HTTP_11;
        let h2 = Version::HTTP_2;
        assert!(ok(parts("GET", "/a", h1, &[("host", "h")]), false).is_ok());
        let two = parts("GET", "/a", h1, &[("host", "h"), ("host", "evil")]);
        assert_eq!(ok(two, false).unwrap_err().status, StatusCode::BAD_REQUEST);
        let h2_mismatch = parts("GET", "http://h/a", h2, &[("host", "evil")]);
        assert_eq!(ok(h2_mismatch, false).unwrap_err().status, 400);
        let h2_same = parts("GET", "http://h/a", h2, &[("host", "H:80")]);
        assert!(ok(h2_same, false).is_ok());
        // HTTP/1.1 absolute form wins over Host (the upstream Host is rewritten).
        assert!(ok(parts("GET", "http://h/a", h1, &[("host", "evil")]), false).is_ok());
        assert_eq!(
            ok(parts("GET", "/a", h1, &[("host", "user@h")]), false)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            ok(parts("GET", "http://u@h/a", h1, &[]), false)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            ok(parts("GET", "ftp://h/a", h1, &[]), false)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            ok(parts("GET", "/a", h1, &[("host", "h")]), true)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            ok(parts("HEAD", "/a", h1, &[("host", "h")]), true)
                .unwrap_err()
                .status,
            400
        );
        assert!(ok(parts("POST", "/a", h1, &[("host", "h")]), true).is_ok());
        assert_eq!(
            ok(parts("TRACE", "/a", h1, &[("host", "h")]), false)
                .unwrap_err()
                .status,
            405
        );
        assert_eq!(
            ok(
                parts("GET", "/a", h1, &[("host", "h"), ("expect", "bogus")]),
                false
            )
            .unwrap_err()
            .status,
            417
        );
        let long = format!("/{}", "a".repeat(9000));
        assert_eq!(
            ok(parts("GET", &long, h1, &[("host", "h")]), false)
                .unwrap_err()
                .status,
            414
        );
    }
}
