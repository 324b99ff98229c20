//! The one place an upstream request is made ([`upstream_request`]).
//!
//! [`upstream_head`] builds the head. It copies the
//! client's fields through a deny list: hop-by-hop fields, framing (`Content-Length` is
//! recomputed by the client from the body actually sent), and the forwarding and override
//! fields origins and frameworks trust to rewrite a request (`X-Forwarded-Host`,
//! `X-Original-URL`, `Forwarded`, `X-HTTP-Method-Override`, ...), which the cache key does not
//! hold. An operator may forward some of those (`[upstream] forward_headers`); each one
//! forwarded is then part of the cache key ([`KeyOptions::keyed_headers`](crate::cache::key::KeyOptions::keyed_headers)). `Host` is always the
//! authority the key was built from.

//!
//! On top of the head: a versioned URL's parameter is removed when the operator asks
//! (`strip_upstream`), and a cacheable request carries its Accept-Encoding bucket (`br`,
//! `gzip` or `identity`, the value the cache key holds) so an origin that varies on it answers
//! exactly what the key stands for.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version, request};

use super::Route;
use crate::cache::key::{Coding, NormalizedRequest};
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

/// The upstream request of a cacheable or passed request, and whether its URL is versioned
/// (cache busting). `bucket_encoding`: set Accept-Encoding to the key's bucket (cacheable
/// requests, compression on).
pub fn upstream_request(
    parts: &request::Parts,
    norm: &NormalizedRequest,
    route: &Route,
    hop: &Hop<'_>,
    bucket_encoding: bool,
) -> (request::Parts, bool) {
    let mut upstream = upstream_head(parts, norm, &route.forward, hop);
    let versioning = &route.versioning;
    let versioned =
        !versioning.param.is_empty() && query_has(upstream.uri.query(), &versioning.param);
    if versioned && versioning.strip_upstream {
        upstream.uri = without_param(&upstream.uri, &versioning.param);
    }
    if bucket_encoding {
        let bucket = Coding::negotiate(&upstream.headers).as_str();
        upstream
            .headers
            .insert(header::ACCEPT_ENCODING, HeaderValue::from_static(bucket));
    }
    (upstream, versioned)
}

fn query_has(query: Option<&str>, param: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|p| p.split('=').next() == Some(param)))
}

/// The URI without one query parameter.
fn without_param(uri: &Uri, param: &str) -> Uri {
    let path = uri.path();
    let rest: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(param))
        .collect();
    let pq = if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    pq.parse().unwrap_or_else(|_| uri.clone())
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
