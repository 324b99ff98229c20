//! Memory tier: moka, weighed in bytes. A hit takes a handle on the entry (this thread's own,
//! see [`EntryRef`], or moka's `Arc`), never a copy of the body. moka shards internally, so a
//! hit takes no global lock. moka's synchronous cache: no
//! call here ever waits on I/O, and its `get` costs a third fewer instructions than the async
//! one's (callgrind, hit_path bench). The methods the engine's fill and lookup paths call stay
//! `async`; [`MemoryTier::entry`], the hit fast path's, is a plain function.

use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use moka::sync::Cache;

use super::fresh::{HeadSlot, PreparedHead};
use super::key::{KeyHash, KeyHasher};
use super::meta::MemObject;

/// One object of the memory tier, with the response head the hit fast path prepared for it.
/// The head lives and dies with this entry: a replaced object (a new fill, a 304 update) is a
/// new entry with an empty slot, so a head never outlives the metadata it was built from.
pub struct MemEntry {
    pub obj: MemObject,
    /// Its prepared head, and the id naming it in per-thread caches.
    pub slot: HeadSlot,
    /// Set when moka drops the entry (replaced, removed, evicted): per-thread tables
    /// ([`MemoryTier::entry`]) must not hand it out any more.
    removed: AtomicBool,
}

/// A memory entry as a hit holds it: through this thread's own handle from its table of recent
/// hits (`RECENT`), or moka's `Arc`. Taking and dropping the thread's handle touches no
/// reference count another core writes: with moka's `Arc`, every hit on a hot object moved
/// that count's cache line between the cores serving it (twice per hit).
#[derive(Clone)]
pub enum EntryRef {
    Local(Rc<Held>),
    Shared(Arc<MemEntry>),
}

/// moka's `Arc` of an entry, held by one thread behind a reference count of its own.
pub struct Held(Arc<MemEntry>);

impl EntryRef {
    /// The entry as an `Arc`, to hold across an await or hand to another thread.
    pub fn to_arc(&self) -> Arc<MemEntry> {
        match self {
            EntryRef::Local(held) => held.0.clone(),
            EntryRef::Shared(arc) => arc.clone(),
        }
    }
}

impl Deref for EntryRef {
    type Target = MemEntry;

    fn deref(&self) -> &MemEntry {
        match self {
            EntryRef::Local(held) => &held.0,
            EntryRef::Shared(arc) => arc,
        }
    }
}

/// What a memory entry costs beyond its body and its metadata's variable parts: moka's entry
/// (its node, the key held twice, the access and write order deques, the hash table slot), the
/// `Arc`s of the entry and of its metadata, and allocator rounding.
const ENTRY_OVERHEAD: usize = 512;

/// Bytes the memory tier charges for an object: everything the entry holds, not just its body.
/// The body is charged by length, which is its real size: every body the tier takes was copied
/// into an allocation of exactly its length (`Fill::assembled`, `put_encoded`, a disk read of
/// exactly the stored size). The metadata is charged for its header map, the policy (which keeps
/// a copy of the response fields it decides on, and the request's few headers), the prepared
/// head a first hit adds (one more map of the same headers), the key, tags and Vary names, and
/// the structs.
pub fn entry_weight(obj: &MemObject) -> u32 {
    let meta = &obj.meta;
    let headers = header_map_bytes(&meta.headers);
    let strings = |v: &[String]| -> usize {
        v.iter()
            .map(|s| std::mem::size_of::<String>() + s.len())
            .sum()
    };
    // Its own map of those fields: a slot each (a map's capacity runs up to twice its length).
    let policy = POLICY_FIXED
        + super::policy::policy_fields(&meta.headers)
            .map(|(k, v)| 2 * FIELD_SLOT + 48 + k.as_str().len() + v.len())
            .sum::<usize>();
    let head = headers + std::mem::size_of::<PreparedHead>() + 256;
    let total = obj.body.len()
        + std::mem::size_of::<MemEntry>()
        + std::mem::size_of::<super::meta::CachedMeta>()
        + meta.key.len()
        + strings(&meta.tags)
        + strings(&meta.vary)
        + headers
        + policy
        + head
        + ENTRY_OVERHEAD;
    total.try_into().unwrap_or(u32::MAX)
}

/// The policy's parts that do not grow with the response's headers: the stored request's few
/// headers and URI, and its two parsed Cache-Control maps.
const POLICY_FIXED: usize = 1024;

/// Heap bytes of a header map: its slots (a name, a value, the hash and links of each, and
/// the index), the values and names themselves (every name charged as if allocated).
pub fn header_map_bytes(map: &http::HeaderMap) -> usize {
    let bytes: usize = map.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    map.capacity() * FIELD_SLOT + map.len() * 48 + bytes
}

/// A header map's slot: a name, a value, and the hash and links.
const FIELD_SLOT: usize =
    std::mem::size_of::<http::HeaderName>() + std::mem::size_of::<http::HeaderValue>() + 40;

#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<KeyHash, Arc<MemEntry>, KeyHasher>,
    capacity: u64,
    evictions: Arc<AtomicU64>,
    /// Bytes inserted since moka last ran its housekeeping from here (see [`MemoryTier::insert`]).
    unsettled: Arc<AtomicU64>,
    /// Unique in the process: tells tiers apart in the per-thread table (several nodes can
    /// run in one process).
    id: u64,
}

/// Entries in each thread's table of recent hits (a power of two).
const RECENT_SLOTS: usize = 256;

/// One hit in this many from a thread's table also reads moka, so its eviction policy keeps
/// seeing how hot the object is (its frequency counters saturate at 15 anyway).
const RECENT_TOUCH: u32 = 16;

/// Largest body a per-thread table of the hit path holds on to (this one, and the proxy's
/// table of finished heads).
pub const TABLE_BODY_MAX: usize = 256 * 1024;

/// Body bytes one such table may hold in all. What a table holds can outlive its object in the
/// memory tier until the slot is reused: this bounds that memory, beyond the tier's own
/// capacity, to twice this per worker thread.
pub const TABLE_BODY_BYTES: usize = 4 << 20;

/// The body bytes a per-thread table holds, against [`TABLE_BODY_BYTES`].
#[derive(Debug, Default)]
pub struct TableBytes(usize);

impl TableBytes {
    /// A slot drops a body of `old` bytes (0 for none) and would take one of `new`: true when
    /// the new one fits (it is then counted), false when the slot must stay without.
    pub fn replace(&mut self, old: usize, new: usize) -> bool {
        self.0 -= old;
        let fits = new <= TABLE_BODY_MAX && self.0 + new <= TABLE_BODY_BYTES;
        if fits {
            self.0 += new;
        }
        fits
    }
}

struct Recent {
    tier: u64,
    key: KeyHash,
    entry: Rc<Held>,
    uses: u32,
}

/// A per-thread, direct-mapped table of the hit path: its slots and the body bytes they hold.
pub struct SlotTable<T> {
    pub slots: Vec<Option<T>>,
    pub bytes: TableBytes,
}

impl<T> SlotTable<T> {
    /// `n` empty slots (a power of two, for masking).
    pub fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| None).collect(),
            bytes: TableBytes::default(),
        }
    }
}

thread_local! {
    /// Each thread's recent memory hits, direct-mapped by key. A moka read records the access
    /// for its eviction policy: a read-buffer push, the entry's access time and the clock,
    /// all shared between cores, and the buffer's housekeeping every few reads. On a hot
    /// object those cost as much as the rest of a hit, so most hits take the entry from
    /// here instead. An entry moka dropped is marked before the call that dropped it returns
    /// (a new fill replacing it, a purge or DELETE removing it), and is never handed out again.
    static RECENT: std::cell::RefCell<SlotTable<Recent>> =
        std::cell::RefCell::new(SlotTable::new(RECENT_SLOTS));
}

impl MemoryTier {
    pub fn new(capacity: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let cache = Cache::builder()
            .name("outpost-memory")
            .max_capacity(capacity)
            .weigher(|_k: &KeyHash, v: &Arc<MemEntry>| entry_weight(&v.obj))
            // moka calls this in the thread that replaces or removes an entry, before that
            // call returns; evictions, during its housekeeping.
            .eviction_listener(move |_k, v: Arc<MemEntry>, cause| {
                v.removed.store(true, Ordering::Release);
                if cause == moka::notification::RemovalCause::Size {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build_with_hasher(KeyHasher::default());
        static NEXT_TIER: AtomicU64 = AtomicU64::new(0);
        Self {
            cache,
            capacity,
            evictions,
            unsettled: Arc::new(AtomicU64::new(0)),
            id: NEXT_TIER.fetch_add(1, Ordering::Relaxed),
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

    /// Whether the tier holds `key`, without counting it as used.
    pub fn contains(&self, key: &KeyHash) -> bool {
        self.cache.contains_key(key)
    }

    pub async fn get(&self, key: &KeyHash) -> Option<MemObject> {
        self.cache.get(key).map(|e| e.obj.clone())
    }

    /// The entry itself, for the hit fast path, from this thread's table of recent hits when
    /// it is there (`RECENT`, [`EntryRef`]).
    pub fn entry(&self, key: &KeyHash) -> Option<EntryRef> {
        let slot = (key.first_u64() ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as usize
            & (RECENT_SLOTS - 1);
        let recent = RECENT.with_borrow_mut(|table| match &mut table.slots[slot] {
            Some(r) if r.tier == self.id && r.key == *key => {
                r.uses = r.uses.wrapping_add(1);
                let usable =
                    r.uses % RECENT_TOUCH != 0 && !r.entry.0.removed.load(Ordering::Acquire);
                usable.then(|| EntryRef::Local(r.entry.clone()))
            }
            _ => None,
        });
        if recent.is_some() {
            return recent;
        }
        let entry = self.cache.get(key);
        // The slot takes this entry, or is emptied (a miss, a body over the table's bounds):
        // it never keeps one that moka dropped alive for long.
        RECENT.with_borrow_mut(|table| {
            let old = table.slots[slot]
                .take()
                .map_or(0, |r| r.entry.0.obj.body.len());
            let entry = entry?;
            if !table.bytes.replace(old, entry.obj.body.len()) {
                return Some(EntryRef::Shared(entry));
            }
            let local = Rc::new(Held(entry));
            table.slots[slot] = Some(Recent {
                tier: self.id,
                key: *key,
                entry: local.clone(),
                uses: 0,
            });
            Some(EntryRef::Local(local))
        })
    }

    pub async fn insert(&self, key: KeyHash, obj: MemObject) {
        if self.fits(obj.body.len() as u64) {
            let entry = MemEntry {
                obj,
                slot: HeadSlot::new(),
                removed: AtomicBool::new(false),
            };
            let len = entry.obj.body.len() as u64;
            self.cache.insert(key, Arc::new(entry));
            // moka evicts in its housekeeping, which it runs only after 64 pending writes or a
            // timer: 64 large objects would overshoot the capacity by hundreds of MB. Settle
            // once the bytes inserted since the last settling reach 1/16 of the capacity.
            let unsettled = self.unsettled.fetch_add(len, Ordering::Relaxed) + len;
            if unsettled >= self.capacity / 16 {
                self.unsettled.store(0, Ordering::Relaxed);
                self.cache.run_pending_tasks();
            }
        }
    }

    pub async fn remove(&self, key: &KeyHash) {
        self.cache.invalidate(key);
    }

    /// Removes `key`'s entry only if it still holds `obj` (the same stored response): a copy
    /// stored after `obj` was looked up stays.
    pub async fn remove_copy(&self, key: &KeyHash, obj: &MemObject) {
        self.cache.entry(*key).and_compute_with(|cur| match cur {
            Some(e) if Arc::ptr_eq(&e.value().obj.meta, &obj.meta) => {
                moka::ops::compute::Op::Remove
            }
            _ => moka::ops::compute::Op::Nop,
        });
    }

    /// Runs moka's deferred housekeeping (it has no background thread).
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::StatusCode;
    use http_cache_semantics::{CacheOptions, CachePolicy};

    use super::*;
    use crate::meta::{CachedMeta, META_VERSION};

    fn object(body: &'static str) -> MemObject {
        object_of(Bytes::from_static(body.as_bytes()))
    }

    fn object_of(body: Bytes) -> MemObject {
        let req = http::Request::new(()).into_parts().0;
        let resp = http::Response::new(()).into_parts().0;
        let now = std::time::SystemTime::now();
        MemObject {
            meta: Arc::new(CachedMeta {
                version: META_VERSION,
                key: "site.test/a".into(),
                status: StatusCode::OK,
                headers: http::HeaderMap::new(),
                policy: CachePolicy::new_options(&req, &resp, now, CacheOptions::default()),
                stored_at_ms: 0,
                fresh_until_ms: u64::MAX / 2,
                swr_secs: 0,
                sie_secs: 0,
                body_len: body.len() as u64,
                vary: Vec::new(),
                tags: Vec::new(),
                purge_seq: 0,
            }),
            body,
        }
    }

    /// `remove_copy` removes the entry only while it holds the copy it names: a copy stored
    /// after the one a purge met stays (removing by key took it).
    #[tokio::test]
    async fn removing_a_copy_keeps_a_newer_one() {
        let tier = MemoryTier::new(1 << 20);
        let key = KeyHash::of("site.test/a");
        let old = object("old");
        tier.insert(key, old.clone()).await;
        let new = object("new");
        tier.insert(key, new.clone()).await;
        tier.remove_copy(&key, &old).await;
        let held = tier.get(&key).await.expect("the newer copy stays");
        assert!(Arc::ptr_eq(&held.meta, &new.meta));
        assert!(tier.entry(&key).is_some());
        tier.remove_copy(&key, &new).await;
        assert!(tier.get(&key).await.is_none());
        assert!(
            tier.entry(&key).is_none(),
            "nor handed out by the recent-hit table"
        );
    }

    /// Large objects inserted back to back are evicted as they come: what the tier holds never
    /// runs far past its capacity waiting for moka's housekeeping (it ran only after 64
    /// pending writes, and 60 objects of an eighth of the capacity each were all held).
    #[tokio::test]
    async fn large_inserts_never_overshoot_the_capacity() {
        let capacity = 64 << 20;
        let tier = MemoryTier::new(capacity);
        let body = Bytes::from(vec![7u8; (capacity / 8) as usize - 4096]);
        for i in 0..60u32 {
            tier.insert(KeyHash::of(&format!("k{i}")), object_of(body.clone()))
                .await;
            let held: u64 = tier
                .cache
                .iter()
                .map(|(_, e)| e.obj.body.len() as u64)
                .sum();
            assert!(
                held <= capacity + capacity / 16 + body.len() as u64,
                "after {} inserts the tier holds {held} bytes for {capacity}",
                i + 1
            );
        }
    }

    async fn body_of(tier: &MemoryTier, key: &KeyHash) -> Option<Bytes> {
        tier.entry(key).map(|e| e.obj.body.clone())
    }

    /// The per-thread table of recent hits never hands out what moka replaced or removed, not
    /// even on the thread whose table holds it, and never mixes up two tiers.
    #[tokio::test]
    async fn recent_hits_follow_replacements_removals_and_tiers() {
        let tier = MemoryTier::new(1 << 20);
        let other = MemoryTier::new(1 << 20);
        let key = KeyHash::of("site.test/a");
        tier.insert(key, object("one")).await;
        other.insert(key, object("other")).await;
        // Into this thread's table, then served from it (fewer than RECENT_TOUCH times).
        for _ in 0..3 {
            assert_eq!(body_of(&tier, &key).await.unwrap(), "one");
            assert_eq!(body_of(&other, &key).await.unwrap(), "other");
        }
        tier.insert(key, object("two")).await;
        assert_eq!(body_of(&tier, &key).await.unwrap(), "two");
        assert_eq!(body_of(&tier, &key).await.unwrap(), "two");
        tier.remove(&key).await;
        assert_eq!(body_of(&tier, &key).await, None);
        assert_eq!(body_of(&other, &key).await.unwrap(), "other");
        // Many hits in a row: still the current object, through every touch of moka.
        tier.insert(key, object("three")).await;
        for _ in 0..(3 * RECENT_TOUCH) {
            assert_eq!(body_of(&tier, &key).await.unwrap(), "three");
        }
    }

    #[test]
    fn table_bytes_bound_each_body_and_the_total() {
        let mut t = TableBytes::default();
        assert!(t.replace(0, TABLE_BODY_MAX));
        assert!(!t.replace(0, TABLE_BODY_MAX + 1), "too large on its own");
        let mut held = TABLE_BODY_MAX;
        while t.replace(0, TABLE_BODY_MAX) {
            held += TABLE_BODY_MAX;
        }
        assert!(held <= TABLE_BODY_BYTES && held + TABLE_BODY_MAX > TABLE_BODY_BYTES);
        // Releasing one makes room for another.
        assert!(t.replace(TABLE_BODY_MAX, 10));
        assert!(!t.replace(0, TABLE_BODY_MAX));
        assert!(t.replace(10, TABLE_BODY_MAX));
    }

    /// Bodies beyond the table's bounds are served from moka's entry, as they are.
    #[tokio::test]
    async fn large_bodies_and_a_full_table_still_hit() {
        let tier = MemoryTier::new(1 << 30);
        let large = Bytes::from(vec![7u8; TABLE_BODY_MAX + 1]);
        let key = KeyHash::of("site.test/large");
        tier.insert(key, object_of(large.clone())).await;
        for _ in 0..3 {
            let e = tier.entry(&key).expect("hit");
            assert!(matches!(e, EntryRef::Shared(_)));
            assert_eq!(e.obj.body, large);
        }
        // More bodies of the largest size than the table may hold at once: every one hits.
        let n = TABLE_BODY_BYTES / TABLE_BODY_MAX + 4;
        let keys: Vec<KeyHash> = (0..n)
            .map(|i| KeyHash::of(&format!("site.test/{i}")))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            tier.insert(*k, object_of(Bytes::from(vec![i as u8; TABLE_BODY_MAX])))
                .await;
        }
        for _ in 0..2 {
            let mut local = 0;
            for (i, k) in keys.iter().enumerate() {
                let e = tier.entry(k).expect("hit");
                local += usize::from(matches!(e, EntryRef::Local(_)));
                assert_eq!(e.obj.body.len(), TABLE_BODY_MAX);
                assert_eq!(e.obj.body[0], i as u8);
            }
            assert!(local <= TABLE_BODY_BYTES / TABLE_BODY_MAX, "{local} held");
        }
    }
}
