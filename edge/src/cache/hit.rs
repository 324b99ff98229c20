//! The engine's side of the hit fast path: a fresh, valid object of the memory tier found from
//! the request's primary key and headers alone, with no normalised request built and nothing
//! allocated. `None` always means "take the full path"; this lookup has no side effects.
//!
//! The front end prepares the response head of an object once ([`PreparedHead`], kept in the
//! object's memory entry) and reuses it for every later hit, adding only what changes with
//! time (`Age`, the `Cache-Status` ttl).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use super::Engine;
use super::clock::unix_ms;
use super::encoded::{encoded_key, encoded_matches};
use super::invalidation::Verdict;
use super::key::{Coding, KeyHash};
use super::memory::MemEntry;
use super::meta::CachedMeta;

/// How a prepared response depends on the request's `Accept-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codings {
    /// Not at all: every client gets these bytes.
    Ignored,
    /// An identity object the front end compresses: identity clients get this head, others
    /// an encoded variant (itself a memory entry with its own head).
    Negotiated,
    /// Decided per request on the full path (for example a body the origin encoded).
    FullPath,
}

/// The response head of a fresh hit on one stored object, as the front end sends it.
#[derive(Debug)]
pub struct PreparedHead {
    pub status: StatusCode,
    /// Every response header but `Age` and `Cache-Status`, with room for both.
    pub headers: HeaderMap,
    /// Upstream caches' `Cache-Status` entries and ", ", or empty (RFC 9211: ours comes last).
    pub cache_status_prefix: String,
    pub codings: Codings,
    /// `Age` at `at`; from there it grows by one second per second (RFC 9111 §4.2.3).
    pub age_at: Duration,
    pub at: SystemTime,
}

impl PreparedHead {
    /// `Age` at `now`, whole seconds.
    pub fn age(&self, now: SystemTime) -> u64 {
        (self.age_at + now.duration_since(self.at).unwrap_or_default()).as_secs()
    }
}

/// A fresh memory hit.
pub struct FreshHit {
    /// The variant key the object is stored under.
    pub key: KeyHash,
    pub entry: Arc<MemEntry>,
    pub now: SystemTime,
}

impl FreshHit {
    pub fn meta(&self) -> &Arc<CachedMeta> {
        &self.entry.obj.meta
    }

    /// Remaining freshness in whole seconds, for `Cache-Status: ttl=`.
    pub fn ttl_secs(&self) -> u64 {
        self.meta().fresh_until_ms.saturating_sub(unix_ms(self.now)) / 1000
    }
}

impl Engine {
    /// A fresh, unpurged object in the memory tier for the primary key and the request's
    /// headers (Vary). The caller has already ruled out request directives that change
    /// freshness (Cache-Control, Pragma, Authorization), and pushed paths
    /// ([`Engine::is_pushed`]).
    pub async fn fresh_hit(&self, primary: KeyHash, headers: &HeaderMap) -> Option<FreshHit> {
        let key = self.variant_of(primary, headers);
        let entry = self.memory.entry(&key).await?;
        let now = self.clock.now();
        let meta = &entry.obj.meta;
        if unix_ms(now) >= meta.fresh_until_ms
            || self.gens.check(&meta.key, &meta.tags, meta.purge_seq) != Verdict::Valid
        {
            return None;
        }
        Some(FreshHit { key, entry, now })
    }

    /// Is a pushed object stored for this path (`/path?query` of the key)? One atomic load
    /// until anything was ever pushed.
    pub fn is_pushed(&self, path: &str) -> bool {
        self.pinned.as_ref().is_some_and(|p| p.contains(path))
    }

    /// Could any path be a pushed one? (False until something is pushed.)
    pub fn may_have_pushed(&self) -> bool {
        self.pinned.as_ref().is_some_and(|p| p.any())
    }

    /// The encoded variant of a fresh hit, if the memory tier holds one made from this very
    /// version of the object.
    pub async fn fresh_encoded(&self, base: &FreshHit, coding: Coding) -> Option<Arc<MemEntry>> {
        let entry = self
            .memory
            .entry(&encoded_key(base.key, coding.as_str()))
            .await?;
        encoded_matches(&entry.obj.meta, base.meta()).then_some(entry)
    }
}
