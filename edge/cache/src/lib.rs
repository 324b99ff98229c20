//! The caching engine, `outpost-cache`: the second floor of the edge, above the HTTP vocabulary
//! (`outpost-http`) and below the proxy (`outpost-edge`), which the compiler keeps it from
//! importing. It has no sockets: upstream is a trait ([`upstream::Upstream`]) and time an input
//! ([`clock::Clock`]), so the engine is tested and benched on its own. It owns no response
//! formats either: an answer is data ([`Served`]), a failure too ([`Failure`]); the proxy turns
//! them into responses.
//!
//! Modules: [`key`] (normalised key, stable hash, Accept-Encoding), [`cache_control`] (the
//! directives the policy crate ignores), [`policy`] (the only caller of http-cache-semantics),
//! [`meta`] (what is stored), [`memory`] and [`disk`] (the tiers), [`coalesce`] (one fetch per
//! key, its readers, the fill budgets), [`status`] (the outcome enum), [`clock`] (time as an
//! input), [`purge_log`] (purge generations, durable), [`push_store`] (the store of pushed
//! objects), [`fresh`] (the fresh-hit lookup of the fast path), [`upstream`] (the trait).
//!
//! The engine itself is split by concept, each file an `impl Engine` block: this file opens the
//! tiers, looks objects up and answers (`serve`); `fill` runs the fetch-and-store task a miss
//! starts and answers from it (or passes); `revalidation` refreshes stale objects in the
//! background; `purge` removes objects (purge, invalidate, reclaim); `push` serves and manages
//! pushed objects; `encoded` keeps compressed variants; `served` is the answer type
//! ([`Served`]).
//!
//! Lookup order: memory, then disk (a disk hit small enough is promoted to memory). Variants:
//! a response with `Vary` is stored under a secondary key (primary hash + the request's values of
//! the nominated headers); the engine remembers, per primary key, the names and the variants seen.

pub mod buffer;
pub mod cache_control;
pub mod clock;
pub mod coalesce;
pub mod disk;
mod encoded;
mod fill;
pub mod fresh;
pub mod key;
pub mod memory;
pub mod meta;
pub mod policy;
mod purge;
pub mod purge_log;
mod push;
pub mod push_store;
mod revalidation;
mod served;
pub mod status;
pub mod upstream;
mod vary;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use http::header::{self, HeaderMap};
use http::{Method, request};

use self::clock::{Clock, unix_ms};
use self::disk::{DiskHit, DiskTier};
use self::key::{KeyHash, NormalizedRequest};
use self::memory::MemoryTier;
use self::meta::{CachedMeta, MemObject};
use self::policy::Freshness;
use self::revalidation::Budget;
use self::status::{CacheStatus, PassReason, Tier};
use self::upstream::Upstream;

pub use self::encoded::{STORED_CODINGS, encoded_key};
pub use self::purge::{PurgeOutcome, PurgeSpec};
pub use self::served::{Failure, RangeFn, Served, ServedBody};
pub use self::upstream::empty_body;

/// Engine settings (from the edge config).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub memory_bytes: u64,
    pub disk: Option<(PathBuf, u64)>,
    pub max_object_size: u64,
    /// Our device token for `Surrogate-Control` targeting (the node name).
    pub surrogate_name: String,
    /// Targeted cache-control fields (RFC 9213), most specific first: `CDN-Cache-Control` by
    /// default (`[cache] targeted_cache_control`).
    pub targeted_cache_control: Arc<[http::HeaderName]>,
    /// How long past freshness a stored copy may stand in for a failing upstream when the
    /// response has no `stale-if-error` of its own (`[cache] stale_on_error`).
    pub stale_on_error: Duration,
    /// Background revalidations per second (soft purges, stale-while-revalidate); protects
    /// the origin from a stampede after a soft purge of everything.
    pub revalidations_per_sec: u32,
    /// How long a request waits on a fill (or revalidation) before a stored copy that
    /// `stale-if-error` still allows is served instead; the fill goes on in the background.
    /// Zero waits for the upstream's own timeouts.
    pub stale_if_error_wait: Duration,
    /// A reader of a streaming fill that takes nothing for this long while the fill waits on
    /// it is dropped (`limits.send_timeout`; see [`coalesce`]).
    pub send_timeout: Duration,
    /// Negative caching: freshness for error responses without their own
    /// (`[cache] negative_ttl`; see [`policy::NegativeTtl`]).
    pub negative_ttl: Arc<policy::NegativeTtl>,
    /// Prefresh (`[cache] prefresh`): a fresh object requested once this share of its
    /// lifetime has passed is revalidated in the background, so a steadily requested object
    /// never becomes a miss. 0 turns it off.
    pub prefresh: f64,
    /// Which storable misses the disk tier writes (`[cache] disk_admission`; see
    /// [`disk::admission`]).
    pub disk_admission: disk::admission::Policy,
}

/// The targeted cache-control fields a node obeys by default (RFC 9213): `CDN-Cache-Control`.
pub fn default_targeted_cache_control() -> Arc<[http::HeaderName]> {
    Arc::from([http::HeaderName::from_static("cdn-cache-control")])
}

/// A cacheable request (GET or HEAD) as the engine sees it.
pub struct CacheRequest {
    pub norm: NormalizedRequest,
    /// The client's method (GET or HEAD).
    pub method: Method,
    /// What to send upstream: the client's path and end-to-end headers.
    pub upstream: request::Parts,
    /// Freshness for a response without its own (a versioned URL).
    pub default_ttl: Option<Duration>,
}

/// Counters the engine keeps (exported as metrics by the observability layer).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub fills: AtomicU64,
    pub coalesced: AtomicU64,
    pub disk_write_errors: AtomicU64,
    pub disk_writes_abandoned: AtomicU64,
    /// Readers dropped for taking nothing for the send timeout while their fill waited.
    pub slow_readers_dropped: AtomicU64,
    /// What became of each storable response on its way to disk, by
    /// [`DiskAdmission::index`](status::DiskAdmission::index).
    pub disk_admissions: [AtomicU64; status::DiskAdmission::ALL.len()],
    /// Prefreshes by [`PREFRESH_RESULTS`]: refreshed (a new response stored), revalidated
    /// (304), failed (no usable answer), skipped (the budget was spent).
    pub prefreshes: [AtomicU64; 4],
}

/// Housekeeping ticks (500 ms) between passes of the Vary index's pruning (a minute).
const VARY_PRUNE_TICKS: u32 = 120;

/// URLs a pruning pass of the Vary index forgets at most (the next pass comes a tick later).
const VARY_PRUNE_MAX: usize = 65_536;

/// Outcomes of a prefresh, in [`EngineStats::prefreshes`] order.
pub const PREFRESH_RESULTS: [&str; 4] = ["refreshed", "revalidated", "failed", "skipped"];

impl EngineStats {
    pub fn count_disk_admission(&self, a: status::DiskAdmission) {
        self.disk_admissions[a.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts by [`DiskAdmission::LABELS`](status::DiskAdmission::LABELS) order.
    pub fn disk_admissions(&self) -> [u64; status::DiskAdmission::ALL.len()] {
        std::array::from_fn(|i| self.disk_admissions[i].load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// A stored object found by a lookup.
#[derive(Clone)]
enum Stored {
    Memory(MemObject),
    Disk(DiskHit),
    /// A pushed object (on the pinned tier).
    Pinned(DiskHit),
}

impl Stored {
    fn meta(&self) -> &Arc<CachedMeta> {
        match self {
            Stored::Memory(m) => &m.meta,
            Stored::Disk(d) | Stored::Pinned(d) => &d.meta,
        }
    }

    fn tier(&self) -> Tier {
        match self {
            Stored::Memory(_) => Tier::Memory,
            Stored::Disk(_) | Stored::Pinned(_) => Tier::Disk,
        }
    }
}

pub struct Engine {
    memory: MemoryTier,
    disk: Option<Arc<DiskTier>>,
    vary: vary::VaryIndex,
    /// The fills in flight and their budgets (coalescing).
    fills: coalesce::Fills,
    upstream: Arc<dyn Upstream>,
    clock: Clock,
    cfg: EngineConfig,
    /// The purge log, the hosts seen and the reclamation state.
    purges: purge::Purges,
    pinned: Option<push_store::PinnedStore>,
    budget: std::sync::Mutex<Budget>,
    /// Prefreshes running now ([`revalidation::PREFRESH_CONCURRENCY`] at most).
    prefreshing: std::sync::atomic::AtomicUsize,
    /// The stored copy (its `stored_at_ms`) each key's last prefresh was tried for.
    prefresh_tried: dashmap::DashMap<KeyHash, u64, key::KeyHasher>,
    pub stats: Arc<EngineStats>,
    /// What the disk tier's start-up load found has reached the engine's own indexes (hosts,
    /// Vary): until then a purge cannot count what it matched. True without a disk tier.
    disk_indexed: std::sync::atomic::AtomicBool,
    /// URLs (primary keys) invalidated before `disk_indexed`, with when: their Vary variants
    /// the load had not handed over were not in the Vary index then, so a lookup meanwhile
    /// or the handover itself takes a copy stored before then (see [`Engine::invalidate`]).
    /// Emptied once `disk_indexed`.
    invalidated_loading: dashmap::DashMap<KeyHash, u64, key::KeyHasher>,
}

/// How `--memory` is shared out. It covers everything the cache holds, not only the memory
/// tier: the disk tier's index of every object it stores (a quarter, see
/// [`disk::index_budget`]), the parsed metadata the disk tiers keep (1/16 each, see
/// [`disk::held_meta_budget`]) and their index page caches (as much again), the bodies fills
/// hold for the memory tier while they arrive,
/// counted twice (the chunks, then the compact copy), the chunks queued for disk writers, and
/// the bodies read from disk on their way to clients. The memory tier gets the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryShares {
    pub tier: u64,
    /// The disk tier's index in memory: it evicts objects rather than grow past this.
    pub disk_index: u64,
    /// Parsed metadata held by each disk tier (the cache's and the pushed objects'), and the
    /// page cache of each one's index.
    pub held_meta: u64,
    /// Fill bodies for the memory tier: a fill that does not fit streams through without a
    /// memory copy (a disk tier still stores it; a later hit promotes it). A fifth of what the
    /// tier gets, so the largest object the tier takes (an eighth of it) fits twice over.
    pub memory_fills: u64,
    /// Disk writer queues: a fill whose writer falls that far behind gives up its disk copy.
    pub disk_queue: u64,
    /// Bodies read from disk until they are sent (whole reads, and streams' chunks), for both
    /// disk tiers: past it, bodies stream in small chunks, outside the budget but within what
    /// every connection is allowed (see [`disk::read_budget`]).
    pub disk_reads: u64,
}

impl MemoryShares {
    pub fn of(memory: u64, disk: bool) -> Self {
        let held_meta = if disk {
            disk::held_meta_budget(memory)
        } else {
            0
        };
        let disk_queue = if disk {
            (memory / 16).clamp(1 << 20, 64 << 20)
        } else {
            0
        };
        let disk_index = if disk { disk::index_budget(memory) } else { 0 };
        let disk_reads = if disk { disk::read_budget(memory) } else { 0 };
        // Each disk tier (the cache's and the pushed objects') holds metadata and has an index
        // page cache of as much again.
        let rest = memory.saturating_sub(4 * held_meta + disk_queue + disk_index + disk_reads);
        // Rounded up: the tier gets at most 4/5 of `rest`, so twice its largest object (an
        // eighth of it) always fits.
        let memory_fills = rest.div_ceil(5).clamp(1 << 20, 256 << 20).min(rest / 2);
        Self {
            tier: rest.saturating_sub(memory_fills).max(1),
            disk_index,
            held_meta,
            memory_fills,
            disk_queue,
            disk_reads,
        }
    }
}

impl Engine {
    /// Opens the tiers (rebuilding the disk index) and returns a ready engine.
    pub async fn open(
        cfg: EngineConfig,
        upstream: Arc<dyn Upstream>,
        clock: Clock,
    ) -> io::Result<Arc<Self>> {
        let shares = MemoryShares::of(cfg.memory_bytes, cfg.disk.is_some());
        let held_budget = shares.held_meta;
        let memory = MemoryTier::new(shares.tier);
        let gens = purge_log::Generations::load(
            cfg.disk.as_ref().map(|(dir, _)| dir.join("purges.json")),
        )?;
        let purges = purge::Purges::new(gens);
        let vary = vary::VaryIndex::default();
        // The largest purge sequence stored objects recorded (see `Generations::raise_floor`).
        let mut stored_seq = 0;
        let mut loading = None;
        // Shared by both disk tiers.
        let disk_reads = coalesce::Budget::new(shares.disk_reads);
        let disk = match &cfg.disk {
            Some((dir, cap)) => {
                let (tier, rx) = DiskTier::open_within(
                    dir,
                    *cap,
                    held_budget,
                    shares.disk_index,
                    disk_reads.clone(),
                )
                .await?;
                stored_seq = stored_seq.max(tier.max_purge_seq().await);
                loading = Some(rx);
                Some(tier)
            }
            None => None,
        };
        let pinned = match &cfg.disk {
            Some((dir, _)) => Some(
                push_store::PinnedStore::open(&dir.join("pushed"), held_budget, disk_reads).await?,
            ),
            None => None,
        };
        if let Some(p) = &pinned {
            stored_seq = stored_seq.max(p.loaded_purge_seq());
        }
        purges.log.raise_floor(stored_seq);
        let engine = Arc::new(Self {
            pinned,
            memory,
            disk,
            vary,
            fills: coalesce::Fills::new(shares.memory_fills, shares.disk_queue),
            upstream,
            clock,
            budget: std::sync::Mutex::new(Budget::full(cfg.revalidations_per_sec)),
            prefreshing: Default::default(),
            prefresh_tried: dashmap::DashMap::with_hasher(key::KeyHasher::default()),
            cfg,
            purges,
            stats: Arc::new(EngineStats::default()),
            disk_indexed: std::sync::atomic::AtomicBool::new(loading.is_none()),
            invalidated_loading: dashmap::DashMap::with_hasher(key::KeyHasher::default()),
        });
        if let Some(rx) = loading {
            tokio::spawn(Self::index_loaded(Arc::downgrade(&engine), rx));
        }
        // moka has no background thread: run its housekeeping (eviction, size accounting).
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut vary_pruning = (0, 0);
            loop {
                tick.tick().await;
                let Some(e) = weak.upgrade() else { break };
                e.run_pending_tasks().await;
                vary_pruning = e.prune_vary(vary_pruning).await;
            }
        });
        Ok(engine)
    }

    /// Feeds what the disk tier's start-up load finds into the engine's own indexes: the
    /// hosts (for purges of bare paths), the Vary index, and the purge sequence floor.
    async fn index_loaded(
        engine: std::sync::Weak<Self>,
        mut rx: tokio::sync::mpsc::Receiver<Vec<disk::Loaded>>,
    ) {
        while let Some(batch) = rx.recv().await {
            let Some(e) = engine.upgrade() else { return };
            let mut seq = 0;
            for l in batch {
                seq = seq.max(l.purge_seq);
                let primary = KeyHash::of(&l.key_text);
                e.purges.track_host(&l.key_text);
                if !l.vary.is_empty() {
                    e.vary.restore(primary, vary_names(&l.vary), l.key);
                }
                // Stored by an earlier process, so older than any invalidation of this one.
                // Looked at after the restore: an invalidation that read the Vary index before
                // it noted the URL first; one after it finds the variant there itself.
                if e.invalidated_loading.contains_key(&primary)
                    && let Some(disk) = &e.disk
                {
                    disk.remove_copy(&l.key, &l.entry);
                }
            }
            e.purges.log.raise_floor(seq);
        }
        if let Some(e) = engine.upgrade() {
            e.disk_indexed
                .store(true, std::sync::atomic::Ordering::Release);
            // Every copy the load found has been handed over (and checked against them).
            e.invalidated_loading.clear();
            e.sweep_vary_names().await;
        }
    }

    /// At shutdown: makes every stored object durable and closes the disk tiers' databases,
    /// so the next process (or engine) can open them. Lookups after this are misses.
    pub async fn close(&self) {
        if let Some(d) = &self.disk {
            d.close().await;
        }
        if let Some(p) = &self.pinned {
            p.tier().close().await;
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Whether a tier holds `key`, or a fill is on its way to store it (no I/O, and not
    /// counted as a use).
    fn held(&self, key: &KeyHash) -> bool {
        self.memory.contains(key)
            || self.disk.as_ref().is_some_and(|d| d.contains(key))
            || self.fills.get(key).is_some()
    }

    /// Prunes the Vary index ([`vary::VaryIndex::prune`]) every [`VARY_PRUNE_TICKS`] calls,
    /// or sooner once it has grown by a quarter since the last pass, on the blocking pool;
    /// not while the disk's start-up load runs (a variant not loaded yet is not known to be
    /// stored). Takes and returns (the index's size after the last pass, calls since).
    async fn prune_vary(self: &Arc<Self>, (size, ticks): (usize, u32)) -> (usize, u32) {
        let due = ticks >= VARY_PRUNE_TICKS || self.vary.len() > size + size / 4 + 1024;
        if !due || !self.disk_indexed.load(std::sync::atomic::Ordering::Acquire) {
            return (size, ticks.saturating_add(1));
        }
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || engine.prune_vary_now())
            .await
            .unwrap_or((size, 0))
    }

    fn prune_vary_now(&self) -> (usize, u32) {
        let before = unix_ms(self.clock.now()).saturating_sub(vary::PRUNE_AFTER_MS);
        let forgotten = self.vary.prune(|k| self.held(k), before, VARY_PRUNE_MAX);
        let more = forgotten.len() == VARY_PRUNE_MAX;
        if !forgotten.is_empty() {
            tracing::debug!(
                forgotten = forgotten.len(),
                "Vary index: forgot URLs with no stored variant"
            );
            if let Some(disk) = &self.disk {
                disk.forget_vary(forgotten);
            }
        }
        // More to forget: again at the next tick.
        (self.vary.len(), if more { VARY_PRUNE_TICKS } else { 0 })
    }

    /// After the start-up load: forgets the Vary names stored on disk for URLs of which no
    /// variant was loaded (names a pruning pass had not removed when the node stopped, or
    /// stored before there was one), so the table holds no more URLs than the index.
    async fn sweep_vary_names(&self) {
        let Some(disk) = &self.disk else { return };
        let mut after = None;
        loop {
            let keys = match disk.vary_keys(after, 4096).await {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the disk's Vary names failed; left as they are");
                    return;
                }
            };
            let Some(last) = keys.last().copied() else {
                return;
            };
            disk.forget_vary(
                keys.into_iter()
                    .filter(|p| !self.vary.contains(*p))
                    .collect(),
            );
            after = Some(last);
        }
    }

    pub async fn run_pending_tasks(&self) {
        self.memory.run_pending_tasks().await;
        if let Some(d) = &self.disk {
            d.run_pending_tasks();
        }
        if let Some(p) = &self.pinned {
            p.tier().run_pending_tasks();
        }
    }

    /// Whether this engine has a disk tier.
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// (objects, bytes) per tier, after housekeeping.
    pub fn usage(&self) -> [(Tier, u64, u64); 2] {
        let (dn, db) = self
            .disk
            .as_ref()
            .map_or((0, 0), |d| (d.entry_count(), d.stored_bytes()));
        [
            (
                Tier::Memory,
                self.memory.entry_count(),
                self.memory.weighted_size(),
            ),
            (Tier::Disk, dn, db),
        ]
    }

    /// The disk tier's index in memory: (bytes its entries take, the most they may take).
    /// When it is full, the disk tier evicts even with disk to spare.
    pub fn disk_index_memory(&self) -> Option<(u64, u64)> {
        self.disk.as_ref().map(|d| d.index_memory())
    }

    /// The disk index: open (not failed and waiting to be opened again), and the times it
    /// failed and was closed to be opened again since start. `None` without a disk tier.
    pub fn disk_index_health(&self) -> Option<(bool, u64)> {
        self.disk.as_ref().map(|d| d.index_health())
    }

    /// Evictions for space since start: (memory, disk).
    pub fn evictions(&self) -> (u64, u64) {
        (
            self.memory.evictions(),
            self.disk.as_ref().map_or(0, |d| d.evictions()),
        )
    }

    /// Disk metadata files dropped for failing their checksum or format check, and content
    /// files removed by the start-up sweep, since start.
    pub fn disk_integrity(&self) -> (u64, u64) {
        self.disk
            .as_ref()
            .map_or((0, 0), |d| (d.rejected_metadata(), d.swept().0))
    }

    /// Progress of the disk tier's start-up load (`None` without a disk tier).
    pub fn disk_load(&self) -> Option<disk::LoadState> {
        self.disk.as_ref().map(|d| d.load_state())
    }

    /// Disk index transactions committed, and failed, since start.
    pub fn disk_index_commits(&self) -> (u64, u64) {
        self.disk.as_ref().map_or((0, 0), |d| d.index_commits())
    }

    /// Pushed objects held.
    pub fn pushed_count(&self) -> u64 {
        self.pinned.as_ref().map_or(0, |p| p.tier().entry_count())
    }

    fn variant_of(&self, primary: KeyHash, headers: &HeaderMap) -> KeyHash {
        self.vary.variant_of(primary, headers)
    }

    async fn lookup(&self, key: &KeyHash) -> Option<Stored> {
        if let Some(obj) = self.memory.get(key).await {
            return Some(Stored::Memory(obj));
        }
        let disk = self.disk.as_ref()?;
        let hit = disk.get(key).await?;
        if !self.disk_indexed.load(std::sync::atomic::Ordering::Acquire)
            && !self.invalidated_loading.is_empty()
            && self
                .invalidated_loading
                .get(&KeyHash::of(&hit.meta.key))
                .is_some_and(|at| hit.meta.stored_at_ms <= *at)
        {
            disk.remove_copy(key, &hit.entry);
            return None;
        }
        Some(Stored::Disk(hit))
    }

    /// Removes the copy `stored` of `key` found by a lookup, only if the key still holds it: a
    /// fill may store a new one between the lookup and the removal. Its compressed variants
    /// carry its metadata: those the purge covers go as well.
    async fn remove_copy(&self, key: KeyHash, stored: &Stored) {
        match (stored, &self.disk) {
            (Stored::Memory(m), _) => self.memory.remove_copy(&key, m).await,
            (Stored::Disk(hit), Some(disk)) => disk.remove_copy(&key, &hit.entry),
            _ => return self.remove_object(key).await,
        }
        for coding in STORED_CODINGS {
            let k = encoded_key(key, coding);
            if let Some(m) = self.memory.get(&k).await
                && self.purged(&m.meta)
            {
                self.memory.remove_copy(&k, &m).await;
            }
            if let Some(disk) = &self.disk
                && let Some(h) = disk.peek(&k).await
                && self.purged(&h.meta)
            {
                disk.remove_copy(&k, &h.entry);
            }
        }
    }

    /// Whether the purge log says this stored copy is gone.
    fn purged(&self, meta: &CachedMeta) -> bool {
        self.purges.log.check(&meta.key, &meta.tags, meta.purge_seq) == purge_log::Verdict::Gone
    }

    /// Turns a stored object into a body: memory as is; a disk body small enough is read whole
    /// and verified (and promoted to memory when the memory tier takes it); a larger one streams
    /// from disk. `None` when the disk copy failed its integrity check (it is then removed).
    async fn body_of(&self, key: KeyHash, stored: &Stored) -> Option<ServedBody> {
        match stored {
            Stored::Memory(m) => Some(ServedBody::Full(m.body.clone())),
            Stored::Disk(hit) | Stored::Pinned(hit) => {
                let disk = match stored {
                    Stored::Pinned(_) => self.pinned.as_ref()?.tier(),
                    _ => self.disk.as_ref()?,
                };
                let size = hit.entry.size;
                // On its way into the memory tier, a body counts as a fill's body for that tier
                // does, twice (the read, then the compact copy); one only sent counts against
                // the read budget, which one the fills' share has no room for can still use.
                let mut promote = self.memory.fits(size);
                let mut read = None;
                if promote {
                    let r = disk
                        .read_all_within(&key, hit, &self.fills.memory, 2 * size)
                        .await;
                    promote = !r.as_ref().is_err_and(disk::is_over_budget);
                    read = Some(r);
                }
                if !promote && size <= disk::WHOLE_READ_MAX {
                    read = Some(disk.read_all(&key, hit).await);
                }
                let whole = match read {
                    None => None,
                    Some(Ok(body)) => Some(body),
                    // No room in its budget: it streams, in small chunks if need be.
                    Some(Err(e)) if disk::is_over_budget(&e) => None,
                    Some(Err(_)) => return None,
                };
                if let Some(mut body) = whole {
                    if promote {
                        // The memory tier's copy: compact, mapped when large (see `buffer`).
                        body = buffer::compact([body.as_ref()]);
                        let copy = MemObject {
                            meta: hit.meta.clone(),
                            body: body.clone(),
                        };
                        self.memory.insert(key, copy.clone()).await;
                        // A push, a purge or an invalidation may have taken the copy read off
                        // the disk meanwhile: removals take the disk's copy first, then the
                        // memory's (see `remove_object`), so looking after inserting never
                        // leaves a removed copy in memory.
                        if !disk
                            .copy_of(&key)
                            .is_some_and(|e| Arc::ptr_eq(&e, &hit.entry))
                        {
                            self.memory.remove_copy(&key, &copy).await;
                        }
                    }
                    Some(ServedBody::Full(body))
                } else {
                    if !disk.verify(&key, hit).await {
                        return None;
                    }
                    let (tier, part) = (Arc::clone(disk), hit.clone());
                    Some(ServedBody::Stream {
                        stream: disk.stream(key, hit).boxed(),
                        len: Some(hit.entry.size),
                        range: Some(Box::new(move |start, len| {
                            tier.stream_range(key, &part, start, len).boxed()
                        })),
                    })
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn served_from(
        &self,
        key: KeyHash,
        stored: &Stored,
        meta: Arc<CachedMeta>,
        body: ServedBody,
        cache: CacheStatus,
        now: SystemTime,
    ) -> Served {
        Served {
            upstream_time: None,
            key: Some(key),
            status: meta.status,
            headers: meta.headers.clone(),
            body,
            meta: Some(meta),
            cache,
            tier: stored.tier(),
            stored: true,
            upstream_error: None,
            failure: None,
            now,
        }
    }

    /// Answers a GET or HEAD from cache or upstream.
    pub async fn serve(self: &Arc<Self>, req: CacheRequest) -> Served {
        let now = self.clock.now();
        let primary = req.norm.key.hash();
        let mut variant = self.variant_of(primary, &req.norm.parts.headers);
        if variant == primary
            && let Some(disk) = &self.disk
            && let Some(names) = disk.unloaded_vary(&primary).await
        {
            // The start-up load has not reached this URL's variants yet.
            variant = self
                .vary
                .restore_names(primary, vary_names(&names), &req.norm.parts.headers);
        }
        let req_cc = cache_control::Directives::parse(&req.norm.parts.headers);
        let only_if_cached = req_cc.has("only-if-cached");

        let mut stale: Option<Stored> = None;
        if let Some(served) = self.serve_pushed(&req, now).await {
            return served;
        }
        let found = match self.lookup(&variant).await {
            Some(stored) => {
                let m = stored.meta();
                match self.purges.log.check(&m.key, &m.tags, m.purge_seq) {
                    purge_log::Verdict::Valid => Some((stored, false)),
                    purge_log::Verdict::Stale => Some((stored, true)),
                    purge_log::Verdict::Gone => {
                        // Purged: reclaim it now; this request is a miss.
                        self.remove_copy(variant, &stored).await;
                        None
                    }
                }
            }
            None => None,
        };
        if let Some((stored, soft_purged)) = found {
            let meta = stored.meta().clone();
            let freshness = if soft_purged {
                // A soft purge marks the object stale; it is served while one background
                // revalidation (within the revalidation budget) refreshes it.
                if let Some(body) = self.body_of(variant, &stored).await {
                    self.revalidate_in_background(&req, variant, &meta);
                    return self.served_from(variant, &stored, meta, body, CacheStatus::Stale, now);
                }
                Freshness::Stale
            } else {
                policy::freshness(&meta, &req.norm.parts, now)
            };
            match freshness {
                Freshness::Fresh => {
                    if self.prefresh_due(&variant, &meta, clock::unix_ms(now)) {
                        self.prefresh(&req, variant, &meta);
                    }
                    if let Some(body) = self.body_of(variant, &stored).await {
                        return self.served_from(
                            variant,
                            &stored,
                            meta,
                            body,
                            CacheStatus::Hit,
                            now,
                        );
                    }
                }
                Freshness::Stale => {
                    if policy::within_swr(&meta, &req.norm.parts.headers, now)
                        && let Some(body) = self.body_of(variant, &stored).await
                    {
                        self.revalidate_in_background(&req, variant, &meta);
                        return self.served_from(
                            variant,
                            &stored,
                            meta,
                            body,
                            CacheStatus::Stale,
                            now,
                        );
                    }
                    stale = Some(stored);
                }
                Freshness::Unusable => {
                    if req.norm.parts.headers.contains_key(header::AUTHORIZATION) {
                        return self.pass(req, PassReason::Uncacheable, now).await;
                    }
                }
            }
        }
        if only_if_cached {
            return Served::failed(Failure::NotCached, now);
        }
        let joined = self.fill_or_join(&req, primary, variant, stale.as_ref());
        self.await_fill(req, joined, primary, stale, now).await
    }
}

/// Vary names as the disk index keeps them (comma-separated, lower-case).
fn vary_names(joined: &str) -> Arc<[http::HeaderName]> {
    joined
        .split(',')
        .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
        .collect()
}
