//! The engine's side of the hit fast path: a fresh, valid object of the memory tier found from
//! the request's primary key and headers alone, with no normalised request built and nothing
//! allocated, and nothing awaited (the data port answers such a hit within hyper's call to the
//! service). `None` always means "take the full path"; this lookup has no side effects.
//!
//! The front end prepares the response head of an object once ([`PreparedHead`], kept in the
//! object's memory entry) and reuses it for every later hit, adding only what changes with
//! time (`Age`, the `Cache-Status` ttl).
//!
//! The disk tier has a fast path too ([`Engine::fresh_disk_hit`]): an object whose metadata
//! the tier holds decoded, whose body is read whole (inline in its record, or a content file up
//! to `WHOLE_READ_MAX`) and was read within the last moments (so its pages are cached), and
//! which the memory tier would not take (the full path promotes those). Its body is read and
//! checked on the calling thread, without a hop to the blocking pool; its prepared head is
//! kept with the held metadata.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::Engine;
use super::clock::unix_ms;
use super::disk::DiskEntry;
use super::encoded::{encoded_key, encoded_matches};
use super::key::{Coding, KeyHash};
use super::memory::{EntryRef, MemEntry};
use super::meta::CachedMeta;
use super::purge_log::Verdict;

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
    /// `Age` at `at_ms`, in milliseconds; from there it grows by one second per second (RFC
    /// 9111 §4.2.3).
    pub age_at_ms: u64,
    /// When it was prepared, in Unix milliseconds.
    pub at_ms: u64,
}

impl PreparedHead {
    /// `Age` at `now_ms` (Unix milliseconds), whole seconds. Integer arithmetic: a hit
    /// computes this once per request.
    pub fn age(&self, now_ms: u64) -> u64 {
        (self.age_at_ms + now_ms.saturating_sub(self.at_ms)) / 1000
    }
}

/// Where a stored object keeps the head the fast path prepared for it, with an id naming the
/// object in per-thread tables. The slot lives and dies with the object's entry (a memory
/// entry, or held disk metadata): a replaced object (a new fill, a 304 update) gets a new,
/// empty slot, so a head never outlives the metadata it was built from.
#[derive(Debug)]
pub struct HeadSlot {
    /// Unique in the process, never reused.
    pub id: u64,
    head: OnceLock<PreparedHead>,
}

impl HeadSlot {
    pub fn new() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            head: OnceLock::new(),
        }
    }

    /// The prepared head, if a hit has built it.
    pub fn head(&self) -> Option<&PreparedHead> {
        self.head.get()
    }

    /// Keeps `head` unless another hit got there first; returns the one kept.
    pub fn set_head(&self, head: PreparedHead) -> &PreparedHead {
        let _ = self.head.set(head);
        self.head.get().unwrap_or_else(|| unreachable!("set above"))
    }
}

impl Default for HeadSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// Remaining freshness of `meta` at `now_ms`, in whole seconds.
fn ttl_secs(meta: &CachedMeta, now_ms: u64) -> u64 {
    meta.fresh_until_ms.saturating_sub(now_ms) / 1000
}

/// A fresh disk hit on the fast path (see the module docs); [`Engine::disk_hit_body`] reads
/// its body, once the answer is known to need it.
pub struct DiskFreshHit {
    /// The variant key the object is stored under.
    pub key: KeyHash,
    pub meta: Arc<CachedMeta>,
    pub slot: Arc<HeadSlot>,
    entry: Arc<DiskEntry>,
    pub now: SystemTime,
    /// `now` in Unix milliseconds.
    pub now_ms: u64,
}

impl DiskFreshHit {
    /// Remaining freshness in whole seconds, for `Cache-Status: ttl=`.
    pub fn ttl_secs(&self) -> u64 {
        ttl_secs(&self.meta, self.now_ms)
    }
}

/// A fresh memory hit. As the lookup returns it, it holds the entry through this thread's
/// handle ([`EntryRef`]); [`FreshHit::to_owned`] makes one that can be held across an await.
pub struct FreshHit<E = Arc<MemEntry>> {
    /// The variant key the object is stored under.
    pub key: KeyHash,
    pub entry: E,
    pub now: SystemTime,
    /// `now` in Unix milliseconds.
    pub now_ms: u64,
}

impl<E: Deref<Target = MemEntry>> FreshHit<E> {
    pub fn meta(&self) -> &Arc<CachedMeta> {
        &self.entry.obj.meta
    }

    /// Remaining freshness in whole seconds, for `Cache-Status: ttl=`.
    pub fn ttl_secs(&self) -> u64 {
        ttl_secs(self.meta(), self.now_ms)
    }
}

impl FreshHit<EntryRef> {
    pub fn to_owned(&self) -> FreshHit {
        FreshHit {
            key: self.key,
            entry: self.entry.to_arc(),
            now: self.now,
            now_ms: self.now_ms,
        }
    }
}

impl Engine {
    /// A fresh, unpurged object in the memory tier for the primary key and the request's
    /// headers (Vary). The caller has already ruled out request directives that change
    /// freshness (Cache-Control, Pragma, Authorization), and pushed paths
    /// ([`Engine::is_pushed`]).
    pub fn fresh_hit(&self, primary: KeyHash, headers: &HeaderMap) -> Option<FreshHit<EntryRef>> {
        let key = self.variant_of(primary, headers);
        let entry = self.memory.entry(&key)?;
        let now = self.clock.now();
        let now_ms = unix_ms(now);
        self.answerable(&key, &entry.obj.meta, now_ms)
            .then_some(FreshHit {
                key,
                entry,
                now,
                now_ms,
            })
    }

    /// A fresh, unpurged object of the disk tier that the fast path can answer (see the module
    /// docs); its body is read by [`Engine::disk_hit_body`]. Called when [`Engine::fresh_hit`]
    /// found nothing.
    pub fn fresh_disk_hit(&self, primary: KeyHash, headers: &HeaderMap) -> Option<DiskFreshHit> {
        let disk = self.disk.as_ref()?;
        let key = self.variant_of(primary, headers);
        let (meta, slot, entry) = disk.held_hot(&key)?;
        // One the memory tier would take goes the full path, which promotes it there (so the
        // memory tier never holds what this answers).
        if self.memory.fits(entry.size) {
            return None;
        }
        let now = self.clock.now();
        let now_ms = unix_ms(now);
        self.answerable(&key, &meta, now_ms)
            .then_some(DiskFreshHit {
                key,
                meta,
                slot,
                entry,
                now,
                now_ms,
            })
    }

    /// The body of a fast disk hit, read and checked on this thread. `None` on any doubt: the
    /// full path then answers (and drops what is damaged).
    pub fn disk_hit_body(&self, hit: &DiskFreshHit) -> Option<Bytes> {
        self.disk.as_ref()?.body_now(&hit.key, &hit.entry)
    }

    /// Fresh at `now_ms`, not purged, and not due for a prefresh (the full path serves those
    /// and starts it).
    fn answerable(&self, key: &KeyHash, meta: &CachedMeta, now_ms: u64) -> bool {
        now_ms < meta.fresh_until_ms
            && self.purges.log.check(&meta.key, &meta.tags, meta.purge_seq) == Verdict::Valid
            && !self.prefresh_due(key, meta, now_ms)
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
    pub fn fresh_encoded<E: Deref<Target = MemEntry>>(
        &self,
        base: &FreshHit<E>,
        coding: Coding,
    ) -> Option<EntryRef> {
        let entry = self.memory.entry(&encoded_key(base.key, coding.as_str()))?;
        encoded_matches(&entry.obj.meta, base.meta()).then_some(entry)
    }
}
