//! Background revalidation of stale objects (soft purges, stale-while-revalidate) and of
//! fresh ones near their end (prefresh) within a budget, and storing the metadata a 304
//! refreshed.

use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use super::disk::MetaUpdate;
use super::key::KeyHash;
use super::meta::{CachedMeta, MemObject};
use super::{CacheRequest, Engine, Stored};

/// Prefreshes running at once (per node, hence per origin or shield tier).
pub const PREFRESH_CONCURRENCY: usize = 16;

/// Keys whose prefresh attempt is remembered (to make one per stored copy); past this many,
/// the memory starts over.
const PREFRESH_TRIED_MAX: usize = 1 << 16;

/// Token bucket for background revalidations.
pub(super) struct Budget {
    tokens: f64,
    last: std::time::Instant,
}

impl Budget {
    /// A full bucket: `per_sec` tokens.
    pub(super) fn full(per_sec: u32) -> Self {
        Self {
            tokens: f64::from(per_sec),
            last: std::time::Instant::now(),
        }
    }
}

impl Engine {
    /// Takes one token from the revalidation budget.
    fn revalidation_allowed(&self) -> bool {
        let rate = f64::from(self.cfg.revalidations_per_sec.max(1));
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Starts one background revalidation for a stale object, unless one runs already or the
    /// budget is spent (the object is then served stale and revalidated by a later request).
    pub(super) fn revalidate_in_background(
        self: &Arc<Self>,
        req: &CacheRequest,
        variant: KeyHash,
        meta: &Arc<CachedMeta>,
    ) {
        // One revalidation per key: skip when a current fetch is already running (one that
        // started before a purge does not count; fill_or_join replaces it).
        if self.fill_running(&variant) || !self.revalidation_allowed() {
            return;
        }
        let primary = req.norm.key.hash();
        let stale = Self::stale_stub(meta);
        // Nobody reads a background revalidation: drop the reader at once.
        drop(self.fill_or_join(req, primary, variant, Some(&stale)));
    }

    /// Is this fresh object in its prefresh window (past `prefresh` of its lifetime) with no
    /// attempt made for this copy yet? Pushed objects have no end, so never.
    pub fn prefresh_due(&self, key: &KeyHash, meta: &CachedMeta, now_ms: u64) -> bool {
        let share = self.cfg.prefresh;
        if share <= 0.0 || share >= 1.0 || meta.pinned() {
            return false;
        }
        let life = meta.fresh_until_ms.saturating_sub(meta.stored_at_ms);
        let at = meta.stored_at_ms + (life as f64 * share) as u64;
        now_ms >= at
            && self
                .prefresh_tried
                .get(key)
                .is_none_or(|tried| *tried != meta.stored_at_ms)
    }

    /// A fetch for this key that started after the last purge is running.
    fn fill_running(&self, key: &KeyHash) -> bool {
        self.fills
            .get(key)
            .is_some_and(|f| f.purge_seq == self.purges.log.current() && !f.completed())
    }

    /// What a background fetch starts from: the stored metadata (for its validators) and no
    /// body (nobody reads it).
    fn stale_stub(meta: &Arc<CachedMeta>) -> Stored {
        Stored::Memory(MemObject {
            meta: meta.clone(),
            body: Bytes::new(),
        })
    }

    /// Revalidates a fresh object near its end in the background (one fetch per key, within
    /// the revalidation budget and [`PREFRESH_CONCURRENCY`] at a time); counts the outcome.
    pub(super) fn prefresh(
        self: &Arc<Self>,
        req: &CacheRequest,
        variant: KeyHash,
        meta: &Arc<CachedMeta>,
    ) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        if self.fill_running(&variant) {
            return; // already on its way
        }
        // One attempt per stored copy: a skipped or failed one is not retried for it (the
        // copy then expires as it would have), so a failing origin is not asked again for
        // every request in the window, and such requests go back to the fast path.
        if self.prefresh_tried.insert(variant, meta.stored_at_ms) == Some(meta.stored_at_ms) {
            return;
        }
        if self.prefresh_tried.len() > PREFRESH_TRIED_MAX {
            self.prefresh_tried.clear();
        }
        let slot = self
            .prefreshing
            .fetch_update(AcqRel, Acquire, |n| {
                (n < PREFRESH_CONCURRENCY).then_some(n + 1)
            })
            .is_ok();
        if !slot || !self.revalidation_allowed() {
            if slot {
                self.prefreshing.fetch_sub(1, AcqRel);
            }
            self.stats.prefreshes[3].fetch_add(1, Relaxed);
            return;
        }
        let stale = Self::stale_stub(meta);
        let joined = self.fill_or_join(req, req.norm.key.hash(), variant, Some(&stale));
        let fill = joined.fill();
        let this = self.clone();
        tokio::spawn(async move {
            use super::coalesce::FillResult;
            let outcome = match fill.result().await {
                FillResult::Revalidated(_) => 1,
                FillResult::Streaming(head) if head.meta.is_some() => {
                    fill.settled().await;
                    0
                }
                FillResult::Streaming(_) | FillResult::Failed(_) => 2,
            };
            this.stats.prefreshes[outcome].fetch_add(1, Relaxed);
            this.prefreshing.fetch_sub(1, AcqRel);
        });
    }

    /// Replaces a stored object's metadata after a 304 that confirmed the version
    /// `revalidated` describes, keeping its body: in memory (with `body`, or the body memory
    /// already holds, if of that version) and on disk (if of that version).
    pub(super) async fn update_stored_meta(
        &self,
        key: KeyHash,
        meta: &Arc<CachedMeta>,
        revalidated: &CachedMeta,
        body: Option<Bytes>,
    ) {
        // The memory copy's body, if it is of the version the 304 confirmed.
        let body = match body.filter(|b| !b.is_empty() || meta.body_len == 0) {
            Some(b) => Some(b),
            None => self
                .memory
                .get(&key)
                .await
                .filter(|m| m.meta.same_version(revalidated))
                .map(|m| m.body),
        };
        if let Some(body) = body {
            self.memory
                .insert(
                    key,
                    MemObject {
                        meta: meta.clone(),
                        body,
                    },
                )
                .await;
        }
        if let Some(disk) = &self.disk {
            match disk.update_meta(&key, meta, revalidated).await {
                Ok(MetaUpdate::Updated | MetaUpdate::NoCopy) => {}
                // An older version than the one confirmed: out of date.
                Ok(MetaUpdate::OtherVersion(entry)) => disk.remove_copy(&key, &entry),
                Err(e) => warn!(error = %e, "disk tier metadata update failed"),
            }
        }
    }
}
