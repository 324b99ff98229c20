//! The respond phase: turns an engine answer into the client's response. It evaluates the
//! client's own conditional request against the stored validators (RFC 9111 §4.3.2), serves byte
//! ranges from whole objects (RFC 9110 §14), strips bodies for HEAD, and adds `Age`, `Via`,
//! `Cache-Status` (RFC 9211) and `X-Cache`.

use std::io;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use outpost_http::body::{RespBody, full, plain};

use crate::cache::meta::CachedMeta;
use crate::cache::policy;
use crate::cache::status::CacheStatus;
use crate::cache::{Served, ServedBody};
use crate::error::{EdgeError, error_response};
use outpost_http::headers::{CACHE_STATUS, CACHE_TAG, SURROGATE_CONTROL, SURROGATE_KEY, X_CACHE};

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

fn stream_body(s: futures_util::stream::BoxStream<'static, io::Result<Bytes>>) -> RespBody {
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
            let (head, _) = error_response(&err, &id.name).into_parts();
            (head.headers, ServedBody::Full(crate::error::body_of(&err)))
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

fn partial(
    mut headers: HeaderMap,
    body: ServedBody,
    start: u64,
    end: u64,
    total: u64,
) -> Response<RespBody> {
    let len = end - start + 1;
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{total}")) {
        headers.insert(header::CONTENT_RANGE, v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let body = match body {
        ServedBody::Full(b) => full(b.slice(start as usize..=end as usize)),
        ServedBody::Empty => full(Bytes::new()),
        ServedBody::Stream { stream, .. } => stream_body(slice_stream(stream, start, len)),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    *resp.headers_mut() = headers;
    resp
}

/// Skips `start` bytes and yields `len` bytes of a chunk stream, slicing (not copying) chunks.
fn slice_stream(
    stream: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    start: u64,
    len: u64,
) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
    let mut pos: u64 = 0;
    let end = start + len;
    stream
        .try_filter_map(move |chunk| {
            let c_start = pos;
            let c_end = pos + chunk.len() as u64;
            pos = c_end;
            let out = if c_end <= start || c_start >= end {
                None
            } else {
                let from = start.saturating_sub(c_start) as usize;
                let to = (end.min(c_end) - c_start) as usize;
                Some(chunk.slice(from..to))
            };
            futures_util::future::ready(Ok(out))
        })
        .take_while({
            let mut seen: u64 = 0;
            move |r| {
                let more = seen < len;
                if let Ok(c) = r {
                    seen += c.len() as u64;
                }
                futures_util::future::ready(more)
            }
        })
        .boxed()
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeSpec {
    Satisfiable(u64, u64),
    Unsatisfiable,
    /// Not a single byte range we serve: send the whole representation (RFC 9110 §14.2).
    Ignore,
}

/// Parses a single `bytes=` range. Multiple ranges are answered with the full object.
pub(crate) fn parse_range(value: &[u8], total: u64) -> RangeSpec {
    let Ok(s) = std::str::from_utf8(value) else {
        return RangeSpec::Ignore;
    };
    let Some(spec) = s.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return RangeSpec::Ignore;
        };
        if n == 0 || total == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Satisfiable(total.saturating_sub(n), total - 1);
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeSpec::Ignore;
    };
    let end = if b.is_empty() {
        total.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(total.saturating_sub(1)),
            _ => return RangeSpec::Ignore,
        }
    };
    if start >= total {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Satisfiable(start, end)
}

/// `If-Range` (RFC 9110 §13.1.5): serve the range only if the validator still matches.
fn if_range_allows(req: &HeaderMap, resp: &HeaderMap) -> bool {
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
fn not_modified(req: &HeaderMap, resp: &HeaderMap) -> bool {
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

/// RFC 9211 `Cache-Status` entry for this hop.
fn cache_status(
    cache: CacheStatus,
    stored: bool,
    meta: Option<&CachedMeta>,
    now: SystemTime,
    name: &str,
    err: &Option<crate::cache::upstream::UpstreamError>,
) -> String {
    let ttl = meta.map(|m| {
        let fresh = policy::ttl(m, now).as_secs() as i64;
        if fresh > 0 {
            fresh
        } else {
            -(m.staleness(now).as_secs() as i64)
        }
    });
    if cache == CacheStatus::Hit
        && let Some(t) = ttl.and_then(|t| u64::try_from(t).ok())
    {
        let mut s = String::new();
        push_hit_status(&mut s, name, itoa::Buffer::new().format(t));
        return s;
    }
    let mut s = String::from(name);
    match cache {
        CacheStatus::Hit => s.push_str("; hit"),
        CacheStatus::Stale => {
            s.push_str("; hit");
            if err.is_some() {
                s.push_str("; fwd=stale; detail=\"stale-if-error\"");
            } else {
                s.push_str("; detail=\"stale-while-revalidate\"");
            }
        }
        CacheStatus::Revalidated => s.push_str("; fwd=stale; fwd-status=304"),
        CacheStatus::Miss => s.push_str("; fwd=miss"),
        CacheStatus::Pass(reason) => {
            s.push_str("; fwd=");
            s.push_str(match reason {
                crate::cache::status::PassReason::Method => "method",
                crate::cache::status::PassReason::RequestNoStore => "request",
                _ => "uri-miss",
            });
            s.push_str("; detail=\"");
            s.push_str(reason.as_str());
            s.push('"');
        }
        CacheStatus::Error => {
            s.push_str("; fwd=miss");
            if let Some(e) = err {
                s.push_str("; detail=\"");
                s.push_str(e.kind());
                s.push('"');
            }
        }
    }
    if let Some(t) = ttl.filter(|_| !matches!(cache, CacheStatus::Pass(_) | CacheStatus::Error)) {
        s.push_str(&format!("; ttl={t}"));
    }
    if stored && matches!(cache, CacheStatus::Miss) {
        s.push_str("; stored");
    }
    s
}

/// Cache-Status is a list: upstream caches' entries come first, ours last (RFC 9211 §2).
fn append_cache_status(headers: &mut HeaderMap, ours: &str) {
    let mut all = upstream_cache_status(headers);
    all.push_str(ours);
    if let Ok(v) = HeaderValue::from_str(&all) {
        headers.insert(CACHE_STATUS, v);
    }
}

/// The upstream caches' `Cache-Status` entries followed by ", ", or an empty string.
pub(super) fn upstream_cache_status(headers: &HeaderMap) -> String {
    let mut all = String::new();
    for v in headers.get_all(CACHE_STATUS) {
        if let Ok(v) = v.to_str() {
            all.push_str(v);
            all.push_str(", ");
        }
    }
    all
}

/// What follows the cache name in a fresh hit's `Cache-Status` entry, before the ttl.
pub(super) const HIT_TTL: &str = "; hit; ttl=";

/// Our `Cache-Status` entry for a fresh hit: `name; hit; ttl=N`.
pub(super) fn push_hit_status(out: &mut String, name: &str, ttl: &str) {
    out.push_str(name);
    out.push_str(HIT_TTL);
    out.push_str(ttl);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(b"bytes=0-9", 100), RangeSpec::Satisfiable(0, 9));
        assert_eq!(
            parse_range(b"bytes=90-", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range(b"bytes=-10", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range(b"bytes=95-200", 100),
            RangeSpec::Satisfiable(95, 99)
        );
        assert_eq!(parse_range(b"bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=5-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range(b"bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range(b"items=0-1", 100), RangeSpec::Ignore);
    }

    #[tokio::test]
    async fn slicing_a_stream_across_chunks() {
        let chunks: Vec<io::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"0123")),
            Ok(Bytes::from_static(b"4567")),
            Ok(Bytes::from_static(b"89")),
        ];
        let s = futures_util::stream::iter(chunks).boxed();
        let out: Vec<Bytes> = slice_stream(s, 3, 5).try_collect().await.unwrap();
        assert_eq!(out.concat(), b"34567");
    }

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
