//! What is stored with every cached object: status, headers, the serialised policy, validators,
//! timing, tags and a format version, so disk contents survive upgrades (an unknown version is a
//! miss, never a misread).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ETAG, HeaderName, LAST_MODIFIED};
use http::{HeaderMap, StatusCode};
use http_cache_semantics::CachePolicy;
use serde::{Deserialize, Serialize};

use super::clock::{from_unix_ms, unix_ms};

/// Bumped whenever the stored layout changes incompatibly.
pub const META_VERSION: u32 = 1;

/// Metadata of one stored response (one Vary variant of one key).
///
/// Stored by position (the disk tier's records are MessagePack arrays): a new field goes at the
/// end, with `#[serde(default)]`; any other change to the fields needs a new record format (a
/// test in the disk tier pins their order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedMeta {
    pub version: u32,
    /// The normalised key text (`host/path?query`).
    pub key: String,
    #[serde(with = "http_serde::status_code")]
    pub status: StatusCode,
    /// End-to-end response headers as stored (hop-by-hop and Set-Cookie removed).
    #[serde(with = "http_serde::header_map")]
    pub headers: HeaderMap,
    /// http-cache-semantics policy, built from a request stripped of Cookie and credentials.
    pub policy: CachePolicy,
    pub stored_at_ms: u64,
    /// When the response stops being fresh (policy TTL at store time).
    pub fresh_until_ms: u64,
    /// `stale-while-revalidate` window after `fresh_until`, in seconds (0 = none).
    pub swr_secs: u64,
    /// `stale-if-error` window after `fresh_until`, in seconds (0 = none).
    pub sie_secs: u64,
    pub body_len: u64,
    /// Request header names the response varies on (lower-case), empty without Vary.
    pub vary: Vec<String>,
    /// Surrogate keys / cache tags (from `Surrogate-Key` or `Cache-Tag`).
    pub tags: Vec<String>,
    /// The purge sequence current when this response was fetched; a later purge that matches
    /// it invalidates it (see `invalidation`).
    #[serde(default)]
    pub purge_seq: u64,
}

/// `fresh_until_ms` of a pushed (pinned) object: fresh until it is deleted or purged.
pub const PINNED_UNTIL_MS: u64 = u64::MAX / 2;

impl CachedMeta {
    /// A pushed object: its freshness has no end to report (`Cache-Status` gives no `ttl`).
    pub fn pinned(&self) -> bool {
        self.fresh_until_ms >= PINNED_UNTIL_MS
    }

    pub fn fresh_until(&self) -> SystemTime {
        from_unix_ms(self.fresh_until_ms)
    }

    /// How long past freshness the object is at `now` (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until()).unwrap_or_default()
    }

    pub fn etag(&self) -> Option<&str> {
        self.headers.get(ETAG).and_then(|v| v.to_str().ok())
    }

    pub fn last_modified(&self) -> Option<&str> {
        self.headers
            .get(LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
    }

    pub fn has_validator(&self) -> bool {
        self.etag().is_some() || self.last_modified().is_some()
    }

    pub fn vary_names(&self) -> Vec<HeaderName> {
        self.vary
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    }

    pub fn set_stored_now(&mut self, now: SystemTime, ttl: Duration) {
        self.stored_at_ms = unix_ms(now);
        self.fresh_until_ms = unix_ms(now + ttl);
    }
}

/// Tags of a response: `Surrogate-Key` (space-separated, Fastly style) and `Cache-Tag`
/// (comma-separated, Cloudflare style).
pub fn tags_of(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for v in headers.get_all("surrogate-key") {
        if let Ok(v) = v.to_str() {
            tags.extend(v.split_ascii_whitespace().map(str::to_string));
        }
    }
    for v in headers.get_all("cache-tag") {
        if let Ok(v) = v.to_str() {
            // Comma-separated; whitespace separates too, so a tag never holds a space (a
            // `Surrogate-Key` purge could not name it).
            tags.extend(
                v.split(|c: char| c == ',' || c.is_ascii_whitespace())
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            );
        }
    }
    tags.sort();
    tags.dedup();
    tags
}

/// The bytes of a header map's names and values, plus `per_field` for each field.
pub fn fields_len(headers: &HeaderMap, per_field: usize) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + per_field)
        .sum()
}

/// A body held by the memory tier: shared, never copied per hit.
#[derive(Debug, Clone)]
pub struct MemObject {
    pub meta: Arc<CachedMeta>,
    pub body: Bytes,
}

impl MemObject {
    /// Bytes the memory tier charges for this object.
    pub fn weight(&self) -> u32 {
        let headers = fields_len(&self.meta.headers, 32);
        (self.body.len() + headers + self.meta.key.len() + 1024)
            .try_into()
            .unwrap_or(u32::MAX)
    }
}
