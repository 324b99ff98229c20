//! Pushed objects: assets an operator uploads through the admin API. They live in their own
//! disk tier under `<cache_dir>/pushed/` (a [`DiskTier`] with no size bound, so eviction never
//! removes them), survive restarts, and are served on the data port as HITs for their path.
//! Only a DELETE or a purge removes one.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};

use super::clock::unix_ms;
use super::coalesce::Budget;
use super::disk::{DiskHit, DiskTier};
use super::key::KeyHash;
use super::meta::{CachedMeta, META_VERSION};

/// What to store for a push.
#[derive(Debug, Clone)]
pub struct PushSpec {
    /// The request path it answers, starting with `/`.
    pub path: String,
    pub content_type: String,
    pub cache_control: String,
    pub tags: Vec<String>,
    pub content_length: Option<u64>,
}

/// A pushed object as listed and acknowledged.
#[derive(Debug, Clone)]
pub struct PushedInfo {
    pub path: String,
    pub size: u64,
    pub etag: String,
    pub content_type: String,
    pub pushed_at_ms: u64,
}

/// Why a push failed. The stream's own error comes back as `Body`.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Body(String),
    #[error("storage failed: {0}")]
    Storage(#[from] io::Error),
}

pub struct PinnedStore {
    tier: Arc<DiskTier>,
    /// Set once anything was ever pushed (or found at start-up): until then a lookup by path,
    /// which every hit makes, costs one load.
    any: AtomicBool,
    /// The largest purge sequence among the objects found at start-up.
    loaded_purge_seq: u64,
}

/// The key a pushed path is stored under (never collides with a cache key: those never start
/// with a NUL byte).
pub fn pinned_key(path: &str) -> KeyHash {
    // blake3 of "\0pushed" + path, hashed in two pieces so a lookup allocates nothing.
    let mut h = blake3::Hasher::new();
    h.update(b"\0pushed");
    h.update(path.as_bytes());
    KeyHash(*h.finalize().as_bytes())
}

impl PinnedStore {
    /// `held_budget`: memory for the metadata of recently served pushed objects; `reads`:
    /// for bodies read until they are sent (see [`DiskTier::open_within`]).
    pub async fn open(dir: &Path, held_budget: u64, reads: Arc<Budget>) -> io::Result<Self> {
        // Every pushed path must be known before the first request: the load is waited for.
        let (tier, loaded) = DiskTier::open_loaded(dir, u64::MAX, held_budget, reads).await?;
        let any = AtomicBool::new(!tier.keys().is_empty());
        let loaded_purge_seq = loaded.iter().map(|l| l.purge_seq).max().unwrap_or(0);
        Ok(Self {
            tier,
            any,
            loaded_purge_seq,
        })
    }

    /// The largest purge sequence among the objects found at start-up (the purge sequence
    /// must not restart below it).
    pub fn loaded_purge_seq(&self) -> u64 {
        self.loaded_purge_seq
    }

    pub fn contains(&self, path: &str) -> bool {
        self.any() && self.tier.contains(&pinned_key(path))
    }

    /// Was anything ever pushed (or found at start-up)?
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    pub async fn get(&self, path: &str) -> Option<DiskHit> {
        self.tier.get(&pinned_key(path)).await
    }

    pub fn tier(&self) -> &Arc<DiskTier> {
        &self.tier
    }

    /// Streams a body to disk and makes it visible only once it is complete. If the stream
    /// fails (a size limit, a digest mismatch, a dropped client) nothing is stored.
    pub async fn push<S, E>(
        &self,
        spec: PushSpec,
        body: S,
        now: SystemTime,
        purge_seq: u64,
    ) -> Result<(PushedInfo, bool), PushError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        // Before the object can become visible, so no lookup skips it.
        self.any.store(true, Ordering::Release);
        let key = pinned_key(&spec.path);
        let existed = self.tier.contains(&key);
        let mut writer = self.tier.begin_write(key);
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| PushError::Body(e.to_string()))?;
            writer.write(chunk).await?;
        }
        let mut info = None;
        let sri = writer
            .commit_with(|sri, size| {
                let mut meta = pushed_meta(&spec, sri, size, now);
                meta.purge_seq = purge_seq;
                info = Some(PushedInfo {
                    path: spec.path.clone(),
                    size,
                    etag: meta.etag().unwrap_or_default().to_string(),
                    content_type: spec.content_type.clone(),
                    pushed_at_ms: unix_ms(now),
                });
                meta
            })
            .await?;
        let _ = sri;
        Ok((info.expect("commit_with ran the builder"), !existed))
    }

    pub async fn delete(&self, path: &str) -> bool {
        let key = pinned_key(path);
        let had = self.tier.contains(&key);
        self.tier.remove(&key).await;
        had
    }

    /// Pushed objects whose path starts with `prefix` and that `live` accepts, sorted by path.
    pub async fn list(&self, prefix: &str, live: impl Fn(&CachedMeta) -> bool) -> Vec<PushedInfo> {
        let mut out = Vec::new();
        for key in self.tier.keys() {
            let Some(hit) = self.tier.peek(&key).await else {
                continue;
            };
            if !hit.meta.key.starts_with(prefix) || !live(&hit.meta) {
                continue;
            }
            out.push(PushedInfo {
                path: hit.meta.key.clone(),
                size: hit.entry.size,
                etag: hit.meta.etag().unwrap_or_default().to_string(),
                content_type: hit
                    .meta
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                pushed_at_ms: hit.meta.stored_at_ms,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

/// Metadata of a pushed object: a 200 with the operator's Content-Type, Cache-Control and
/// Surrogate-Key, a strong ETag from the SHA-256 of the bytes, and Last-Modified = push time.
fn pushed_meta(
    spec: &PushSpec,
    sri: &cacache::Integrity,
    size: u64,
    now: SystemTime,
) -> CachedMeta {
    let (_, hex) = sri.to_hex();
    let mut headers = HeaderMap::new();
    let mut put = |name: header::HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(name, v);
        }
    };
    put(header::CONTENT_TYPE, &spec.content_type);
    put(header::CACHE_CONTROL, &spec.cache_control);
    put(header::ETAG, &format!("\"{hex}\""));
    put(header::LAST_MODIFIED, &httpdate::fmt_http_date(now));
    if !spec.tags.is_empty() {
        put(
            header::HeaderName::from_static("surrogate-key"),
            &spec.tags.join(" "),
        );
    }
    let req = http::Request::builder()
        .uri(format!("http://pushed{}", spec.path))
        .body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| http::Request::new(()).into_parts().0);
    let mut resp = http::Response::new(()).into_parts().0;
    resp.status = StatusCode::OK;
    resp.headers = headers.clone();
    let policy = super::policy::stored_policy(&req, &resp, now);
    CachedMeta {
        version: META_VERSION,
        key: spec.path.clone(),
        status: StatusCode::OK,
        headers,
        policy,
        stored_at_ms: unix_ms(now),
        fresh_until_ms: super::meta::PINNED_UNTIL_MS,
        swr_secs: 0,
        sie_secs: 0,
        body_len: size,
        vary: Vec::new(),
        tags: spec.tags.clone(),
        purge_seq: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_keys_never_change() {
        // Pushed objects on disk are found by this hash after an upgrade: it must stay the
        // blake3 of "\0pushed" followed by the path.
        assert_eq!(pinned_key("/a/b.js"), KeyHash::of("\0pushed/a/b.js"));
        assert_ne!(pinned_key("/a/b.js"), pinned_key("/a/b.css"));
    }
}
