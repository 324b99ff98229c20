//! The engine's side of pushed objects: serving them ahead of the cache, and the admin
//! operations (push, forward, delete, list) over the pinned store ([`push_store`]).

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::meta::CachedMeta;
use super::status::CacheStatus;
use super::{CacheRequest, Engine, Served, Stored, purge_log, push_store};

impl Engine {
    /// A pushed object for this path, if any: always a HIT (it is authoritative) unless a purge
    /// covered it: a hard purge deletes it, a soft purge serves it STALE while the origin is
    /// asked for the current version.
    pub(super) async fn serve_pushed(
        self: &Arc<Self>,
        req: &CacheRequest,
        now: SystemTime,
    ) -> Option<Served> {
        let pinned = self.pinned.as_ref()?;
        let path = req.norm.key.path();
        if !pinned.contains(path) {
            return None;
        }
        let key = push_store::pinned_key(path);
        let stored = match self.memory.get(&key).await {
            Some(m) => Stored::Memory(m),
            None => Stored::Pinned(pinned.get(path).await?),
        };
        let meta = stored.meta().clone();
        match self.purges.log.check(&meta.key, &meta.tags, meta.purge_seq) {
            purge_log::Verdict::Gone => {
                // Only the copy found purged: a push may have stored a new one meanwhile.
                match &stored {
                    Stored::Pinned(hit) => pinned.tier().remove_copy(&key, &hit.entry),
                    Stored::Memory(m) => self.memory.remove_copy(&key, m).await,
                    Stored::Disk(_) => {}
                }
                None
            }
            purge_log::Verdict::Stale => {
                let body = self.body_of(key, &stored).await?;
                let variant = self.variant_of(req.norm.key.hash(), &req.norm.parts.headers);
                self.revalidate_in_background(req, variant, &meta);
                Some(self.served_from(key, &stored, meta, body, CacheStatus::Stale, now))
            }
            purge_log::Verdict::Valid => {
                let body = self.body_of(key, &stored).await?;
                Some(self.served_from(key, &stored, meta, body, CacheStatus::Hit, now))
            }
        }
    }

    /// Stores a pushed object (see [`push_store`]).
    pub async fn push<S, E>(
        &self,
        spec: push_store::PushSpec,
        body: S,
    ) -> Result<(push_store::PushedInfo, bool), push_store::PushError>
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let Some(store) = &self.pinned else {
            return Err(push_store::PushError::Storage(io::Error::other(
                "pushing needs a disk tier: set cache.dir (or --cache-dir)",
            )));
        };
        let path = spec.path.clone();
        let out = store
            .push(spec, body, self.clock.now(), self.purges.log.current())
            .await;
        // Stored or not (a push made visible, then lost to a failing disk, may have been read
        // into memory meanwhile): the store's copy is the one served.
        self.memory.remove(&push_store::pinned_key(&path)).await;
        out
    }

    /// A pushed object's metadata, size and body stream (to forward it to other nodes).
    pub async fn pushed_body(
        &self,
        path: &str,
    ) -> Option<(Arc<CachedMeta>, u64, BoxStream<'static, io::Result<Bytes>>)> {
        let store = self.pinned.as_ref()?;
        let hit = store.get(path).await?;
        let stream = store
            .tier()
            .stream(push_store::pinned_key(path), &hit)
            .boxed();
        Some((hit.meta.clone(), hit.entry.size, stream))
    }

    /// The origin answered 304 for a pushed object that a soft purge sent back to it: the
    /// object is current again, with the headers the operator pushed. `seq` is the purge
    /// sequence when the revalidation started (a later purge still applies). `None` if the
    /// path holds no pushed object, or a new push replaced the one that was revalidated.
    pub(super) async fn confirm_pushed(
        &self,
        path: &str,
        revalidated: &CachedMeta,
        seq: u64,
    ) -> Option<Arc<CachedMeta>> {
        let store = self.pinned.as_ref()?;
        let current = store.get(path).await?;
        if current.meta.stored_at_ms != revalidated.stored_at_ms {
            return None;
        }
        let mut meta = (*current.meta).clone();
        meta.purge_seq = seq;
        let meta = Arc::new(meta);
        let key = push_store::pinned_key(path);
        match store.tier().update_meta(&key, &meta, &current.meta).await {
            Ok(crate::disk::MetaUpdate::Updated) => {}
            // A new push replaced it meanwhile: that one stands, as it is.
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(path, error = %e, "updating a revalidated pushed object failed");
                return None;
            }
        }
        self.memory.remove(&key).await;
        Some(meta)
    }

    pub async fn delete_pushed(&self, path: &str) -> bool {
        let Some(store) = &self.pinned else {
            return false;
        };
        // The store's copy first, as in `remove_object`.
        let had = store.delete(path).await;
        self.memory.remove(&push_store::pinned_key(path)).await;
        had
    }

    pub async fn list_pushed(&self, prefix: &str) -> Vec<push_store::PushedInfo> {
        match &self.pinned {
            Some(store) => {
                store
                    .list(prefix, |m| {
                        self.purges.log.check(&m.key, &m.tags, m.purge_seq)
                            != purge_log::Verdict::Gone
                    })
                    .await
            }
            None => Vec::new(),
        }
    }
}
