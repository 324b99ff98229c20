//! The respond phase: turns an engine answer into the client's response. It evaluates the
//! client's own conditional request against the stored validators (RFC 9111 §4.3.2), serves byte
//! ranges from whole objects (RFC 9110 §14), strips bodies for HEAD, and adds `Age`, `Via`,
//! `Cache-Status` (RFC 9211) and `X-Cache`.

use std::io;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use outpost_http::body::{RespBody, full, plain};

use crate::cache::policy;
use crate::cache::status::CacheStatus;
use crate::cache::{Served, ServedBody};

mod cache_status;
mod range;
mod validators;

use crate::error::{EdgeError, proxy_error_parts};
pub(crate) use cache_status::{HIT_TTL, push_hit_status, upstream_cache_status};
use cache_status::{append_cache_status, cache_status};
use outpost_http::headers::{CACHE_STATUS, CACHE_TAG, SURROGATE_CONTROL, SURROGATE_KEY, X_CACHE};
use range::partial;
pub(crate) use range::{RangeSpec, parse_range};
use validators::{if_range_allows, not_modified};

/// Per-node identity used in `Via` and `Cache-Status`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The `Cache-Status` cache name, for example `outpost` or `outpost-edge-a`.
    pub name: String,
    /// The `Via` entry, for example `1.1 outpost`.
    pub via: HeaderValue,
    /// `Surrogate-Capability` sent upstream (Edge Architecture 1.0), e.g. `outpost="Surrogate/1.0"`.
    pub surrogate_capability: HeaderValue,
    /// An edge is the last surrogate: it removes `Surrogate-Control` before clients see it.
    pub strip_surrogate_control: bool,
    /// Remove the tag headers (`Surrogate-Key`, `Cache-Tag`) before clients see them; they are
    /// stored with the object for purges. A shield keeps them for the edges.
    pub strip_tags: bool,
    /// Set `X-Forwarded-Proto` upstream from the client connection (an edge faces clients);
    /// a shield keeps the value its edges sent.
    pub sets_forwarded_proto: bool,
}

pub(super) fn stream_body(
    s: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
) -> RespBody {
    RespBody::boxed(StreamBody::new(s.map_ok(Frame::data)))
}

/// What the cache did for a response, carried in the response's extensions to the layer that
/// records metrics and writes the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub cache: CacheStatus,
    pub tier: crate::cache::status::Tier,
    /// Time to the upstream response head, when this request waited for one.
    pub upstream: Option<std::time::Duration>,
}

/// Builds the client response from what the engine served.
pub fn respond(
    served: Served,
    method: &Method,
    req_headers: &HeaderMap,
    id: &Identity,
) -> Response<RespBody> {
    let outcome = Outcome {
        cache: served.cache,
        tier: served.tier,
        upstream: served.upstream_time,
    };
    let mut resp = build(served, method, req_headers, id);
    resp.extensions_mut().insert(outcome);
    resp
}

/// The response without the [`Outcome`] extension. A response without `Date` gets one from
/// hyper on the way out (RFC 9110 §6.6.1), from a clock it reads once a second.
pub(super) fn build(
    served: Served,
    method: &Method,
    req_headers: &HeaderMap,
    id: &Identity,
) -> Response<RespBody> {
    let Served {
        status,
        headers,
        body,
        meta,
        cache,
        stored,
        now,
        upstream_error,
        failure,
        ..
    } = served;
    // An engine failure: the error's text and headers (`Proxy-Status`), then the same
    // decorations as any answer (Via, Cache-Status, X-Cache).
    let (mut headers, body) = match failure {
        Some(f) => {
            let err = EdgeError::from(f);
            let (headers, body) = proxy_error_parts(&err, &id.name);
            (headers, ServedBody::Full(body))
        }
        None => (headers, body),
    };
    let from_store = matches!(
        cache,
        CacheStatus::Hit | CacheStatus::Stale | CacheStatus::Revalidated
    );
    if let Some(m) = meta.as_deref()
        && (from_store || stored)
    {
        let age = policy::age(m, now).as_secs();
        headers.insert(header::AGE, HeaderValue::from(age));
    }
    headers.append(header::VIA, id.via.clone());
    if id.strip_surrogate_control {
        headers.remove(SURROGATE_CONTROL);
    }
    if id.strip_tags {
        headers.remove(SURROGATE_KEY);
        headers.remove(CACHE_TAG);
    }
    let cs = cache_status(
        cache,
        stored,
        meta.as_deref(),
        now,
        &id.name,
        &upstream_error,
    );
    append_cache_status(&mut headers, &cs);
    headers.insert(X_CACHE, HeaderValue::from_static(cache.as_str()));

    // The client's own validators, evaluated by the cache (RFC 9111 §4.3.2). Only when we
    // fetched or hold the whole 200: a pass-through answer already reflects them.
    if status == StatusCode::OK
        && !matches!(cache, CacheStatus::Pass(_) | CacheStatus::Error)
        && not_modified(req_headers, &headers)
    {
        return not_modified_response(headers);
    }

    let len = body.len();
    // Ranges from a whole stored (or streaming) object.
    if status == StatusCode::OK
        && *method == Method::GET
        && !matches!(cache, CacheStatus::Pass(_) | CacheStatus::Error)
        && let Some(total) = len
        && let Some(range) = req_headers.get(header::RANGE)
        && if_range_allows(req_headers, &headers)
    {
        match parse_range(range.as_bytes(), total) {
            RangeSpec::Satisfiable(start, end) => {
                return partial(headers, body, start, end, total);
            }
            RangeSpec::Unsatisfiable => {
                let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                let rh = r.headers_mut();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                    rh.insert(header::CONTENT_RANGE, v);
                }
                for name in [header::VIA, header::DATE] {
                    if let Some(v) = headers.get(&name) {
                        rh.insert(name, v.clone());
                    }
                }
                return r;
            }
            RangeSpec::Ignore => {}
        }
    }
    if status == StatusCode::OK || status.is_success() {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }

    match len {
        Some(n) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
    let body = if *method == Method::HEAD
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::NO_CONTENT
    {
        full(Bytes::new())
    } else {
        into_resp_body(body)
    };
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

fn into_resp_body(body: ServedBody) -> RespBody {
    match body {
        ServedBody::Empty => full(Bytes::new()),
        ServedBody::Full(b) => full(b),
        ServedBody::Stream { stream, .. } => stream_body(stream),
    }
}

fn not_modified_response(headers: HeaderMap) -> Response<RespBody> {
    // RFC 9110 §15.4.5: the fields a 200 would have carried that matter for caches.
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
        header::AGE,
        header::VIA,
    ] {
        for v in headers.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    for name in [CACHE_STATUS, X_CACHE] {
        for v in headers.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    *r.headers_mut() = out;
    r
}
