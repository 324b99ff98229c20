//! Encoded variants: a compressed copy (`br`, `gzip`) of an object, stored under its own key
//! beside the identity object and valid only for the very version it was made from.

use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use super::key::KeyHash;
use super::meta::{CachedMeta, MemObject};
use super::policy::owned_headers;
use super::{Engine, ServedBody};

/// Content codings the engine stores as separate variants of an object.
pub const STORED_CODINGS: [&str; 2] = ["br", "gzip"];

/// The key of an encoded variant of the object stored under `base`.
pub fn encoded_key(base: KeyHash, coding: &str) -> KeyHash {
    KeyHash::of(&format!("{}\0ce={coding}", base.hex()))
}

impl Engine {
    /// An encoded variant (`br`, `gzip`) of the object stored under `base`, if one was stored
    /// from this very version of it (same store time); a variant of an older version is a miss.
    pub async fn get_encoded(
        &self,
        base: KeyHash,
        coding: &str,
        base_meta: &CachedMeta,
    ) -> Option<(Arc<CachedMeta>, ServedBody)> {
        let key = encoded_key(base, coding);
        let stored = self.lookup(&key).await?;
        let meta = stored.meta().clone();
        if !encoded_matches(&meta, base_meta) {
            return None;
        }
        let body = self.body_of(key, &stored).await?;
        Some((meta, body))
    }

    /// Stores an encoded variant beside its identity object (memory, and disk when present).
    /// The body is copied once into an allocation of exactly its length (an encoder's output
    /// buffer can be up to twice as large, and the memory tier charges the length), and the
    /// headers into owned bytes ([`owned_headers`]).
    pub async fn put_encoded(
        &self,
        base: KeyHash,
        coding: &str,
        mut meta: CachedMeta,
        body: Bytes,
    ) {
        let key = encoded_key(base, coding);
        let body = super::buffer::compact([body.as_ref()]);
        meta.headers = owned_headers(&meta.headers);
        let meta = Arc::new(meta);
        self.memory
            .insert(
                key,
                MemObject {
                    meta: meta.clone(),
                    body: body.clone(),
                },
            )
            .await;
        // A full disk tier takes the variant of an object it holds, not one it turned away
        // (see `disk::admission`): it would evict another for it.
        if let Some(disk) = &self.disk
            && (disk.copy_of(&base).is_some() || disk.has_room_for(Some(body.len() as u64)))
        {
            let disk = disk.clone();
            tokio::spawn(async move {
                let result = async {
                    let mut w = disk.begin_write(key);
                    w.write(body.clone()).await?;
                    w.commit(&meta).await
                }
                .await;
                if let Err(e) = result {
                    warn!(error = %e, "storing an encoded variant on disk failed");
                }
            });
        }
    }
}

/// Is `variant` an encoded variant stored from this version of `base` (same store time)?
pub(super) fn encoded_matches(variant: &CachedMeta, base: &CachedMeta) -> bool {
    variant.stored_at_ms == base.stored_at_ms && (variant.body_len != 0 || base.body_len == 0)
}
