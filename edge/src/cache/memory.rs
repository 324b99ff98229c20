//! Memory tier: moka, weighed in bytes. A hit clones an `Arc` and a `Bytes` (two refcount
//! bumps), never the body. moka shards internally, so a hit takes no global lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::future::Cache;

use super::key::KeyHash;
use super::meta::MemObject;

#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<KeyHash, MemObject>,
    capacity: u64,
    evictions: Arc<AtomicU64>,
}

impl MemoryTier {
    pub fn new(capacity: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let cache = Cache::builder()
            .name("outpost-memory")
            .max_capacity(capacity)
            .weigher(|_k: &KeyHash, v: &MemObject| v.weight())
            .eviction_listener(move |_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            cache,
            capacity,
            evictions,
        }
    }

    /// Objects evicted for space since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Largest body the tier accepts: an eighth of its capacity, so one object cannot flush
    /// the hot set (moka silently refuses anything above capacity anyway).
    pub fn max_object(&self) -> u64 {
        self.capacity / 8
    }

    pub fn fits(&self, len: u64) -> bool {
        len <= self.max_object()
    }

    pub async fn get(&self, key: &KeyHash) -> Option<MemObject> {
        self.cache.get(key).await
    }

    pub async fn insert(&self, key: KeyHash, obj: MemObject) {
        if self.fits(obj.body.len() as u64) {
            self.cache.insert(key, obj).await;
        }
    }

    pub async fn remove(&self, key: &KeyHash) {
        self.cache.invalidate(key).await;
    }

    /// Runs moka's deferred housekeeping (it has no background thread).
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }
}
