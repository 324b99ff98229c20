//! The request phase: what a client may send, and exactly what goes upstream.
//!
//! [`check`] refuses what the cache could misread before anything is looked up: ambiguous
//! authorities (two Host fields, an HTTP/2 `:authority` that disagrees with `host`, userinfo, a
//! scheme other than http or https), a GET or HEAD that carries a body (RFC 9110 §9.3.1: the
//! body would have to be forwarded to mean anything, and forwarding its framing without it
//! smuggles the next request on a pooled connection), an `Expect` other than `100-continue`
//! (RFC 9110 §10.1.1), TRACE, and an oversized target.
//!
//! [`UpstreamHeaders::build`] is the one place an upstream request head is made. It copies the
//! client's fields through a deny list: hop-by-hop fields, framing (`Content-Length` is
//! recomputed by the client from the body actually sent), and the forwarding and override
//! fields origins and frameworks trust to rewrite a request (`X-Forwarded-Host`,
//! `X-Original-URL`, `Forwarded`, `X-HTTP-Method-Override`, ...), which the cache key does not
//! hold. An operator may forward some of those (`[upstream] forward_headers`); each one
//! forwarded is then part of the cache key ([`KeyOptions::keyed_headers`]). `Host` is always the
//! authority the key was built from.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version, request};

use crate::cache::key::NormalizedRequest;
pub use crate::error::Refusal;
use outpost_http::headers::{self, DANGEROUS_FORWARDING, is_hop_by_hop};

/// Which client fields are forwarded upstream (from `[upstream]`).
#[derive(Debug, Clone, Default)]
pub struct ForwardPolicy {
    /// Stripped from every upstream request: [`DANGEROUS_FORWARDING`] minus
    /// `forward_headers`, plus `strip_headers`.
    strip: Vec<HeaderName>,
}

impl ForwardPolicy {
    /// `forward`: names from [`DANGEROUS_FORWARDING`] the operator forwards (and so keys on);
    /// `strip`: further names never forwarded.
    pub fn new(forward: &[HeaderName], strip: &[HeaderName]) -> Self {
        let mut names: Vec<HeaderName> = DANGEROUS_FORWARDING
            .iter()
            .map(|n| HeaderName::from_static(n))
            .filter(|n| !forward.contains(n))
            .collect();
        for n in strip {
            if !names.contains(n) && !forward.contains(n) {
                names.push(n.clone());
            }
        }
        Self { strip: names }
    }

    fn strips(&self, name: &HeaderName) -> bool {
        self.strip.contains(name)
    }
}

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

/// What the proxy adds to every upstream request.
pub struct Hop<'a> {
    pub via: &'a HeaderValue,
    pub surrogate_capability: &'a HeaderValue,
    pub client: super::Client,
    /// Set `X-Forwarded-Proto` from the client connection (edges); shields keep the edge's.
    pub sets_forwarded_proto: bool,
}

/// Builds the head of an upstream request: the one place one is made (see the module docs).
pub fn upstream_head(
    parts: &request::Parts,
    norm: &NormalizedRequest,
    policy: &ForwardPolicy,
    hop: &Hop<'_>,
) -> request::Parts {
    let (mut out, ()) = http::Request::new(()).into_parts();
    out.method = parts.method.clone();
    out.version = Version::HTTP_11;
    out.uri = origin_form(&parts.uri);
    out.extensions = parts.extensions.clone();
    out.headers = forwarded_fields(&parts.headers, policy);
    // Exactly the authority the key was built from.
    if let Some(h) = norm.parts.headers.get(header::HOST) {
        out.headers.insert(header::HOST, h.clone());
    }
    out.headers.append(header::VIA, hop.via.clone());
    out.headers.append(
        headers::SURROGATE_CAPABILITY,
        hop.surrogate_capability.clone(),
    );
    append_forwarded_for(&mut out.headers, hop.client.addr);
    if hop.sets_forwarded_proto || !out.headers.contains_key(headers::X_FORWARDED_PROTO) {
        let proto = if hop.client.tls { "https" } else { "http" };
        out.headers
            .insert(headers::X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    out
}

/// The client's fields that may go upstream: no hop-by-hop field (nor one `Connection` names),
/// no framing, no Host (set from the key), nothing the policy strips.
fn forwarded_fields(client: &HeaderMap, policy: &ForwardPolicy) -> HeaderMap {
    let named = headers::connection_named(client);
    let mut out = HeaderMap::with_capacity(client.len() + 4);
    for (name, value) in client {
        if is_hop_by_hop(name)
            || name == header::CONTENT_LENGTH
            || name == header::HOST
            || name == header::EXPECT
            || named.contains(name)
            || policy.strips(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: std::net::SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers
        .get(headers::X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(headers::X_FORWARDED_FOR, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::KeyOptions;

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

    #[test]
    fn upstream_head_forwards_only_chosen_fields() {
        let client = parts(
            "GET",
            "http://h.example/a?x=1",
            Version::HTTP_11,
            &[
                ("host", "evil.example"),
                ("content-length", "29"),
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("x-forwarded-host", "evil.example"),
                ("x-original-url", "/admin"),
                ("forwarded", "host=evil"),
                ("x-http-method-override", "DELETE"),
                ("x-forwarded-for", "10.0.0.1"),
                ("accept", "text/html"),
                ("x-custom", "kept"),
                ("x-drop-me", "1"),
            ],
        );
        let norm = NormalizedRequest::new(
            &client.method,
            &client.uri,
            &client.headers,
            &KeyOptions::default(),
        )
        .unwrap();
        let policy = ForwardPolicy::new(&[], &[HeaderName::from_static("x-drop-me")]);
        let via = HeaderValue::from_static("1.1 edge");
        let cap = HeaderValue::from_static("edge=\"Surrogate/1.0\"");
        let hop = Hop {
            via: &via,
            surrogate_capability: &cap,
            client: super::super::Client {
                addr: "192.0.2.7:5000".parse().unwrap(),
                tls: false,
            },
            sets_forwarded_proto: true,
        };
        let up = upstream_head(&client, &norm, &policy, &hop);
        assert_eq!(up.uri, "/a?x=1");
        assert_eq!(up.headers["host"], "h.example");
        assert_eq!(up.headers.get_all("host").iter().count(), 1);
        for gone in [
            "content-length",
            "connection",
            "x-secret",
            "x-forwarded-host",
            "x-original-url",
            "forwarded",
            "x-http-method-override",
            "x-drop-me",
        ] {
            assert!(!up.headers.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(up.headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(up.headers["x-forwarded-proto"], "http");
        assert_eq!(up.headers["accept"], "text/html");
        assert_eq!(up.headers["x-custom"], "kept");
        assert_eq!(up.headers["via"], "1.1 edge");
        // An operator may forward one of them: then it is forwarded.
        let policy = ForwardPolicy::new(&[HeaderName::from_static("x-forwarded-host")], &[]);
        let up = upstream_head(&client, &norm, &policy, &hop);
        assert_eq!(up.headers["x-forwarded-host"], "evil.example");
    }
}
