//! `Cache-Status` (RFC 9211): our entry, after the upstream caches' ones.

use std::time::SystemTime;

use http::header::{HeaderMap, HeaderValue};

use crate::cache::meta::CachedMeta;
use crate::cache::policy;
use crate::cache::status::CacheStatus;
use outpost_http::headers::CACHE_STATUS;

/// RFC 9211 `Cache-Status` entry for this hop.
pub(super) fn cache_status(
    cache: CacheStatus,
    stored: bool,
    meta: Option<&CachedMeta>,
    now: SystemTime,
    name: &str,
    err: &Option<crate::cache::upstream::UpstreamError>,
) -> String {
    // A pushed object stays fresh until it is deleted or purged: no ttl to give.
    let ttl = meta.filter(|m| !m.pinned()).map(|m| {
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
pub(super) fn append_cache_status(headers: &mut HeaderMap, ours: &str) {
    let mut all = upstream_cache_status(headers);
    all.push_str(ours);
    if let Ok(v) = HeaderValue::from_str(&all) {
        headers.insert(CACHE_STATUS, v);
    }
}

/// The upstream caches' `Cache-Status` entries followed by ", ", or an empty string.
pub(crate) fn upstream_cache_status(headers: &HeaderMap) -> String {
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
pub(crate) const HIT_TTL: &str = "; hit; ttl=";

/// Our `Cache-Status` entry for a fresh hit: `name; hit; ttl=N`.
pub(crate) fn push_hit_status(out: &mut String, name: &str, ttl: &str) {
    out.push_str(name);
    out.push_str(HIT_TTL);
    out.push_str(ttl);
}
