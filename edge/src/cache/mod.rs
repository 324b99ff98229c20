//! The caching engine. It has no sockets: upstream is a trait ([`upstream::Upstream`]), so the
//! engine is tested and benched on its own.
//!
//! Modules: [`key`] (normalised key, stable hash), [`cache_control`] (the directives the policy
//! crate ignores), [`policy`] (the only caller of http-cache-semantics), [`meta`] (what is
//! stored), [`memory`] and [`disk`] (the tiers), [`fill`] (coalescing and streaming),
//! [`status`] (the outcome enum), [`clock`] (time as an input).
//!
//! Lookup order: memory, then disk (a disk hit small enough is promoted to memory). Variants:
//! a response with `Vary` is stored under a secondary key (primary hash + the request's values of
//! the nominated headers); the engine remembers, per primary key, the names and the variants seen.

pub mod cache_control;
pub mod clock;
pub mod disk;
pub mod fill;
pub mod hit;
pub mod invalidation;
pub mod key;
pub mod memory;
pub mod meta;
pub mod pinned;
pub mod policy;
pub mod status;
pub mod upstream;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, request};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use self::clock::Clock;
use self::disk::{DiskHit, DiskTier};
use self::fill::{Fill, FillHead, FillResult};
use self::key::{KeyHash, NormalizedRequest};
use self::memory::MemoryTier;
use self::meta::{CachedMeta, MemObject};
use self::policy::{Admission, Freshness};
use self::status::{CacheStatus, PassReason, Tier};
use self::upstream::{Upstream, UpstreamBody, UpstreamError};
use crate::proxy::headers::strip_hop_by_hop;

/// Engine settings (from the edge config).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub memory_bytes: u64,
    pub disk: Option<(PathBuf, u64)>,
    pub max_object_size: u64,
    /// Our device token for `Surrogate-Control` targeting (the node name).
    pub surrogate_name: String,
    /// Background revalidations per second (soft purges, stale-while-revalidate); protects
    /// the origin from a stampede after a soft purge of everything.
    pub revalidations_per_sec: u32,
}

/// What a purge covers (exact URLs are `host/path?query` keys or bare paths).
#[derive(Debug, Clone, Default)]
pub struct PurgeSpec {
    pub urls: Vec<String>,
    pub prefixes: Vec<String>,
    pub tags: Vec<String>,
    pub all: bool,
    pub soft: bool,
}

/// The result of a purge.
#[derive(Debug, Clone)]
pub struct PurgeOutcome {
    pub seq: u64,
    /// Objects removed or marked right away (exact URLs); `None` where counting would mean
    /// walking the cache (prefix, tag, all).
    pub matched: Option<u64>,
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

/// A body the engine hands to the responder.
pub enum ServedBody {
    Empty,
    /// A complete body held in memory (shared).
    Full(Bytes),
    /// A streaming body (fill in progress, disk read, pass-through).
    Stream {
        stream: BoxStream<'static, io::Result<Bytes>>,
        len: Option<u64>,
    },
}

impl ServedBody {
    pub fn len(&self) -> Option<u64> {
        match self {
            ServedBody::Empty => Some(0),
            ServedBody::Full(b) => Some(b.len() as u64),
            ServedBody::Stream { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

/// What the engine answers.
pub struct Served {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ServedBody,
    /// The stored metadata this answer came from or went into.
    pub meta: Option<Arc<CachedMeta>>,
    pub cache: CacheStatus,
    pub tier: Tier,
    /// The response was (or is being) stored.
    pub stored: bool,
    /// The upstream failure behind an error or stale answer.
    pub upstream_error: Option<UpstreamError>,
    /// When the decision was taken.
    pub now: SystemTime,
    /// The key the answer is stored under (when it is stored).
    pub key: Option<KeyHash>,
    /// Time to the upstream response head, when this request waited for one.
    pub upstream_time: Option<Duration>,
}

/// Content codings the engine stores as separate variants of an object.
pub const STORED_CODINGS: [&str; 2] = ["br", "gzip"];

/// The key of an encoded variant of the object stored under `base`.
pub fn encoded_key(base: KeyHash, coding: &str) -> KeyHash {
    KeyHash::of(&format!("{}\0ce={coding}", base.hex()))
}

/// Counters the engine keeps (exported as metrics by the observability layer).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub fills: AtomicU64,
    pub coalesced: AtomicU64,
    pub disk_write_errors: AtomicU64,
    pub disk_writes_abandoned: AtomicU64,
}

struct VaryEntry {
    names: Arc<[HeaderName]>,
    variants: Vec<KeyHash>,
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
    vary: DashMap<KeyHash, VaryEntry>,
    fills: DashMap<KeyHash, Arc<Fill>>,
    upstream: Arc<dyn Upstream>,
    clock: Clock,
    cfg: EngineConfig,
    gens: invalidation::Generations,
    pinned: Option<pinned::PinnedStore>,
    /// Hosts seen, so a purge of a bare path can reach every host's copy (bounded).
    hosts: DashMap<String, ()>,
    /// Background reclamation state: 0 idle, 1 running, 2 running and asked to run again.
    reclaim: AtomicU64,
    budget: std::sync::Mutex<Budget>,
    pub stats: Arc<EngineStats>,
}

/// Token bucket for background revalidations.
struct Budget {
    tokens: f64,
    last: std::time::Instant,
}

const MAX_TRACKED_HOSTS: usize = 1024;

/// Request headers that would turn our fetch into a conditional or partial one. The cache
/// fetches whole objects and evaluates the client's conditions itself (RFC 9111 §4.3.2).
const CLIENT_CONDITIONALS: [HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

impl Engine {
    /// Opens the tiers (rebuilding the disk index) and returns a ready engine.
    pub async fn open(
        cfg: EngineConfig,
        upstream: Arc<dyn Upstream>,
        clock: Clock,
    ) -> io::Result<Arc<Self>> {
        let memory = MemoryTier::new(cfg.memory_bytes);
        let gens = invalidation::Generations::load(
            cfg.disk.as_ref().map(|(dir, _)| dir.join("purges.json")),
        )?;
        let hosts: DashMap<String, ()> = DashMap::new();
        let vary: DashMap<KeyHash, VaryEntry> = DashMap::new();
        let disk = match &cfg.disk {
            Some((dir, cap)) => {
                let (tier, metas) = DiskTier::open(dir, *cap).await?;
                for (variant, m) in metas {
                    if hosts.len() < MAX_TRACKED_HOSTS {
                        hosts.insert(m.key.split('/').next().unwrap_or("").to_string(), ());
                    }
                    if m.vary.is_empty() {
                        continue;
                    }
                    let primary = KeyHash::of(&m.key);
                    let mut e = vary.entry(primary).or_insert_with(|| VaryEntry {
                        names: m.vary_names().into(),
                        variants: Vec::new(),
                    });
                    if !e.variants.contains(&variant) {
                        e.variants.push(variant);
                    }
                }
                Some(tier)
            }
            None => None,
        };
        let pinned = match &cfg.disk {
            Some((dir, _)) => Some(pinned::PinnedStore::open(&dir.join("pushed")).await?),
            None => None,
        };
        let engine = Arc::new(Self {
            pinned,
            memory,
            disk,
            vary,
            fills: DashMap::new(),
            upstream,
            clock,
            budget: std::sync::Mutex::new(Budget {
                tokens: f64::from(cfg.revalidations_per_sec),
                last: std::time::Instant::now(),
            }),
            cfg,
            gens,
            hosts,
            reclaim: AtomicU64::new(0),
            stats: Arc::new(EngineStats::default()),
        });
        // moka has no background thread: run its housekeeping (eviction, size accounting).
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(e) = weak.upgrade() else { break };
                e.run_pending_tasks().await;
            }
        });
        Ok(engine)
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub async fn run_pending_tasks(&self) {
        self.memory.run_pending_tasks().await;
        if let Some(d) = &self.disk {
            d.run_pending_tasks();
        }
    }

    /// (objects, bytes) per tier, after housekeeping.
    pub fn usage(&self) -> [(Tier, u64, u64); 2] {
        let (dn, db) = self
            .disk
            .as_ref()
            .map_or((0, 0), |d| (d.entry_count(), d.weighted_size()));
        [
            (
                Tier::Memory,
                self.memory.entry_count(),
                self.memory.weighted_size(),
            ),
            (Tier::Disk, dn, db),
        ]
    }

    /// Evictions for space since start: (memory, disk).
    pub fn evictions(&self) -> (u64, u64) {
        (
            self.memory.evictions(),
            self.disk.as_ref().map_or(0, |d| d.evictions()),
        )
    }

    /// Pushed objects held.
    pub fn pushed_count(&self) -> u64 {
        self.pinned.as_ref().map_or(0, |p| p.tier().entry_count())
    }

    fn variant_of(&self, primary: KeyHash, headers: &HeaderMap) -> KeyHash {
        match self.vary.get(&primary) {
            Some(e) => primary.variant(&e.names, headers),
            None => primary,
        }
    }

    async fn lookup(&self, key: &KeyHash) -> Option<Stored> {
        if let Some(obj) = self.memory.get(key).await {
            return Some(Stored::Memory(obj));
        }
        let disk = self.disk.as_ref()?;
        disk.get(key).await.map(Stored::Disk)
    }

    /// Turns a stored object into a body: memory as is; a disk body small enough is read whole,
    /// verified and promoted to memory; a larger one streams from disk.
    async fn body_of(&self, key: KeyHash, stored: &Stored) -> Option<ServedBody> {
        match stored {
            Stored::Memory(m) => Some(ServedBody::Full(m.body.clone())),
            Stored::Disk(hit) | Stored::Pinned(hit) => {
                let disk = match stored {
                    Stored::Pinned(_) => self.pinned.as_ref()?.tier(),
                    _ => self.disk.as_ref()?,
                };
                if self.memory.fits(hit.entry.size) {
                    let body = disk.read_all(&key, hit).await.ok()?;
                    self.memory
                        .insert(
                            key,
                            MemObject {
                                meta: hit.meta.clone(),
                                body: body.clone(),
                            },
                        )
                        .await;
                    Some(ServedBody::Full(body))
                } else {
                    if !disk.verify(&key, hit).await {
                        return None;
                    }
                    Some(ServedBody::Stream {
                        stream: disk.stream(key, hit).boxed(),
                        len: Some(hit.entry.size),
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
            now,
        }
    }

    /// The hit fast path: a fresh, valid object in the memory tier, decided without touching
    /// anything that only a trip upstream needs. `None` means "take the full path" (it has no
    /// side effects). Pushed paths always take the full path.
    pub async fn fresh_memory_hit(&self, norm: &NormalizedRequest) -> Option<Served> {
        if let Some(p) = &self.pinned
            && p.contains(norm.key.path())
        {
            return None;
        }
        let now = self.clock.now();
        let variant = self.variant_of(norm.key.hash(), &norm.parts.headers);
        let obj = self.memory.get(&variant).await?;
        let meta = obj.meta.clone();
        if self.gens.check(&meta.key, &meta.tags, meta.purge_seq) != invalidation::Verdict::Valid
            || policy::freshness(&meta, &norm.parts, now) != Freshness::Fresh
        {
            return None;
        }
        let body = ServedBody::Full(obj.body.clone());
        Some(self.served_from(
            variant,
            &Stored::Memory(obj),
            meta,
            body,
            CacheStatus::Hit,
            now,
        ))
    }

    /// Answers a GET or HEAD from cache or upstream.
    pub async fn serve(self: &Arc<Self>, req: CacheRequest) -> Served {
        let now = self.clock.now();
        let primary = req.norm.key.hash();
        let variant = self.variant_of(primary, &req.norm.parts.headers);
        let req_cc = cache_control::Directives::parse(&req.norm.parts.headers);
        let only_if_cached = req_cc.has("only-if-cached");

        let mut stale: Option<Stored> = None;
        if let Some(served) = self.serve_pushed(&req, now).await {
            return served;
        }
        let found = match self.lookup(&variant).await {
            Some(stored) => {
                let m = stored.meta();
                match self.gens.check(&m.key, &m.tags, m.purge_seq) {
                    invalidation::Verdict::Valid => Some((stored, false)),
                    invalidation::Verdict::Stale => Some((stored, true)),
                    invalidation::Verdict::Gone => {
                        // Purged: reclaim it now; this request is a miss.
                        self.remove_object(variant).await;
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
            return error_served(
                StatusCode::GATEWAY_TIMEOUT,
                "only-if-cached: no stored response satisfies this request",
                now,
            );
        }
        let joined = self.fill_or_join(&req, primary, variant, stale.as_ref());
        self.await_fill(req, joined, primary, stale, now).await
    }

    /// Joins the running fill for this key, or starts one (the caller is then its leader).
    /// The reader is registered before the fill can stream, so no chunk is dropped before the
    /// caller reads it; `None` means the fill already dropped its first bytes.
    fn fill_or_join(
        self: &Arc<Self>,
        req: &CacheRequest,
        primary: KeyHash,
        variant: KeyHash,
        stale: Option<&Stored>,
    ) -> Joined {
        use dashmap::mapref::entry::Entry;
        let current = self.gens.current();
        let vacant = loop {
            match self.fills.entry(variant) {
                Entry::Occupied(e) => {
                    let fill = e.get();
                    // Join a running fetch; or a finished one that is about to make its stored
                    // copy visible, when this request found no copy at all. Never one that
                    // started before a purge, and never a finished one when this request holds
                    // a stale copy (its answer is what made the copy stale).
                    let joinable = fill.purge_seq == current
                        && !fill.is_cancelled()
                        && (!fill.completed() || (stale.is_none() && fill.stores()));
                    if joinable {
                        self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                        let fill = fill.clone();
                        let reader = fill.reader();
                        return Joined {
                            fill,
                            leader: false,
                            reader,
                        };
                    }
                    // Replace it: removed under the shard lock, then look again (another
                    // request may have started a current fill meanwhile; that one is joinable).
                    e.remove();
                }
                Entry::Vacant(v) => break v,
            }
        };
        let fill = Fill::started_at(variant, current);
        let reader = fill.reader();
        vacant.insert(fill.clone());
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        if self.hosts.len() < MAX_TRACKED_HOSTS
            && let Some(host) = req.norm.key.as_str().split('/').next()
            && !self.hosts.contains_key(host)
        {
            self.hosts.insert(host.to_string(), ());
        }
        let job = FillJob {
            admit: policy::AdmitOptions {
                surrogate: self.cfg.surrogate_name.clone(),
                default_ttl: req.default_ttl,
            },
            purge_seq: current,
            norm: clone_parts(&req.norm.parts),
            key_text: req.norm.key.as_str().to_string(),
            primary,
            upstream: clone_parts(&req.upstream),
            stale_meta: stale.map(|s| s.meta().clone()),
            stale_body: match stale {
                Some(Stored::Memory(m)) => Some(m.body.clone()),
                _ => None,
            },
        };
        tokio::spawn(Arc::clone(self).run_fill(fill.clone(), job));
        Joined {
            fill,
            leader: true,
            reader,
        }
    }

    /// A pushed object for this path, if any: always a HIT (it is authoritative) unless a purge
    /// covered it: a hard purge deletes it, a soft purge serves it STALE while the origin is
    /// asked for the current version.
    async fn serve_pushed(self: &Arc<Self>, req: &CacheRequest, now: SystemTime) -> Option<Served> {
        let pinned = self.pinned.as_ref()?;
        let path = req.norm.key.path();
        if !pinned.contains(path) {
            return None;
        }
        let key = pinned::pinned_key(path);
        let stored = match self.memory.get(&key).await {
            Some(m) => Stored::Memory(m),
            None => Stored::Pinned(pinned.get(path).await?),
        };
        let meta = stored.meta().clone();
        match self.gens.check(&meta.key, &meta.tags, meta.purge_seq) {
            invalidation::Verdict::Gone => {
                pinned.delete(path).await;
                self.memory.remove(&key).await;
                None
            }
            invalidation::Verdict::Stale => {
                let body = self.body_of(key, &stored).await?;
                let variant = self.variant_of(req.norm.key.hash(), &req.norm.parts.headers);
                self.revalidate_in_background(req, variant, &meta);
                Some(self.served_from(key, &stored, meta, body, CacheStatus::Stale, now))
            }
            invalidation::Verdict::Valid => {
                let body = self.body_of(key, &stored).await?;
                Some(self.served_from(key, &stored, meta, body, CacheStatus::Hit, now))
            }
        }
    }

    /// Stores a pushed object (see [`pinned`]).
    pub async fn push<S, E>(
        &self,
        spec: pinned::PushSpec,
        body: S,
    ) -> Result<(pinned::PushedInfo, bool), pinned::PushError>
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let Some(store) = &self.pinned else {
            return Err(pinned::PushError::Storage(io::Error::other(
                "pushing needs a disk tier: set cache.dir (or --cache-dir)",
            )));
        };
        let path = spec.path.clone();
        let out = store
            .push(spec, body, self.clock.now(), self.gens.current())
            .await?;
        self.memory.remove(&pinned::pinned_key(&path)).await;
        Ok(out)
    }

    /// A pushed object's metadata, size and body stream (to forward it to other nodes).
    pub async fn pushed_body(
        &self,
        path: &str,
    ) -> Option<(Arc<CachedMeta>, u64, BoxStream<'static, io::Result<Bytes>>)> {
        let store = self.pinned.as_ref()?;
        let hit = store.get(path).await?;
        let stream = store.tier().stream(pinned::pinned_key(path), &hit).boxed();
        Some((hit.meta.clone(), hit.entry.size, stream))
    }

    pub async fn delete_pushed(&self, path: &str) -> bool {
        let Some(store) = &self.pinned else {
            return false;
        };
        self.memory.remove(&pinned::pinned_key(path)).await;
        store.delete(path).await
    }

    pub async fn list_pushed(&self, prefix: &str) -> Vec<pinned::PushedInfo> {
        match &self.pinned {
            Some(store) => {
                store
                    .list(prefix, |m| {
                        self.gens.check(&m.key, &m.tags, m.purge_seq) != invalidation::Verdict::Gone
                    })
                    .await
            }
            None => Vec::new(),
        }
    }

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
    fn revalidate_in_background(
        self: &Arc<Self>,
        req: &CacheRequest,
        variant: KeyHash,
        meta: &Arc<CachedMeta>,
    ) {
        // One revalidation per key: skip when a current fetch is already running (one that
        // started before a purge does not count; fill_or_join replaces it).
        if let Some(f) = self.fills.get(&variant)
            && f.purge_seq == self.gens.current()
            && !f.completed()
        {
            return;
        }
        if !self.revalidation_allowed() {
            return;
        }
        let primary = req.norm.key.hash();
        let stale = Stored::Memory(MemObject {
            meta: meta.clone(),
            body: Bytes::new(),
        });
        // Nobody reads a background revalidation: drop the reader at once.
        drop(self.fill_or_join(req, primary, variant, Some(&stale)));
    }

    async fn await_fill(
        self: &Arc<Self>,
        req: CacheRequest,
        joined: Joined,
        primary: KeyHash,
        stale: Option<Stored>,
        now: SystemTime,
    ) -> Served {
        let fill = joined.fill.clone();
        let mut served = self
            .await_fill_inner(req, joined, primary, stale, now)
            .await;
        if served.upstream_time.is_none() {
            served.upstream_time = fill.upstream_time();
        }
        served
    }

    async fn await_fill_inner(
        self: &Arc<Self>,
        req: CacheRequest,
        joined: Joined,
        primary: KeyHash,
        stale: Option<Stored>,
        now: SystemTime,
    ) -> Served {
        let Joined {
            fill,
            leader,
            reader,
        } = joined;
        let result = fill.result().await;
        let serve_stale = |err: Option<UpstreamError>| async {
            let stored = stale.as_ref()?;
            let meta = stored.meta().clone();
            if !policy::within_sie(&meta, &req.norm.parts.headers, now) {
                return None;
            }
            let body = self.body_of(fill.key, stored).await?;
            let mut s = self.served_from(fill.key, stored, meta, body, CacheStatus::Stale, now);
            s.upstream_error = err;
            Some(s)
        };
        match result {
            FillResult::Failed(e) => {
                if let Some(s) = serve_stale(Some(e.clone())).await {
                    return s;
                }
                let mut s = error_served(e.status(), &e.to_string(), now);
                s.upstream_error = Some(e);
                s
            }
            FillResult::Revalidated(meta) => {
                let Some(stored) = stale.as_ref() else {
                    return self.pass(req, PassReason::NotShareable, now).await;
                };
                match self.body_of(fill.key, stored).await {
                    Some(body) => self.served_from(
                        fill.key,
                        stored,
                        meta,
                        body,
                        CacheStatus::Revalidated,
                        now,
                    ),
                    None => self.pass(req, PassReason::NotShareable, now).await,
                }
            }
            FillResult::Streaming(head) => {
                if head.status.is_server_error()
                    && let Some(s) = serve_stale(Some(UpstreamError::Protocol(format!(
                        "upstream answered {}",
                        head.status
                    ))))
                    .await
                {
                    return s;
                }
                if !leader {
                    let mine = if head.vary.is_empty() {
                        primary
                    } else {
                        primary.variant(&head.vary, &req.norm.parts.headers)
                    };
                    // A collapsed request may reuse the leader's response only when it is
                    // fresh for this request (RFC 9111 §4): a response stale on arrival, or
                    // one this request's directives reject, is fetched on its own.
                    let fresh = head.meta.as_deref().is_some_and(|m| {
                        policy::freshness(m, &req.norm.parts, self.clock.now()) == Freshness::Fresh
                    });
                    if !head.shareable || mine != head.store_key || !fresh {
                        return self.pass(req, PassReason::NotShareable, now).await;
                    }
                }
                let Some(reader) = reader else {
                    // The fill already dropped its first bytes (a large object streaming
                    // through). If it has completed, its copy is about to be visible: wait for
                    // it and serve from cache; otherwise fetch on our own.
                    if fill.completed() {
                        fill.settled().await;
                        if let Some(stored) = self.lookup(&head.store_key).await
                            && let Some(body) = self.body_of(head.store_key, &stored).await
                        {
                            let meta = stored.meta().clone();
                            return self.served_from(
                                head.store_key,
                                &stored,
                                meta,
                                body,
                                CacheStatus::Hit,
                                now,
                            );
                        }
                    }
                    return self.pass(req, PassReason::NotShareable, now).await;
                };
                let mut headers = head.headers.clone();
                if leader {
                    for c in &head.set_cookie {
                        headers.append(header::SET_COOKIE, c.clone());
                    }
                }
                let cache = if head.meta.is_some() {
                    CacheStatus::Miss
                } else {
                    CacheStatus::Pass(PassReason::Uncacheable)
                };
                Served {
                    upstream_time: None,
                    key: head.meta.is_some().then_some(head.store_key),
                    status: head.status,
                    headers,
                    body: ServedBody::Stream {
                        stream: reader.into_stream().boxed(),
                        len: head.content_length,
                    },
                    stored: head.meta.is_some(),
                    meta: head.meta.clone(),
                    cache,
                    tier: Tier::None,
                    upstream_error: None,
                    now,
                }
            }
        }
    }

    /// Sends the client's request upstream as is and streams the answer; nothing is stored.
    async fn pass(&self, req: CacheRequest, reason: PassReason, now: SystemTime) -> Served {
        let mut parts = req.upstream;
        parts.method = req.method.clone();
        parts
            .extensions
            .insert(upstream::RouteKey(req.norm.key.hash()));
        let upstream_req = Request::from_parts(parts, empty_body());
        let sent = std::time::Instant::now();
        let fetched = self.upstream.fetch(upstream_req).await;
        let upstream_time = Some(sent.elapsed());
        match fetched {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let len = content_length(&parts.headers);
                Served {
                    upstream_time,
                    key: None,
                    status: parts.status,
                    headers: parts.headers,
                    body: ServedBody::Stream {
                        stream: body_stream(body),
                        len,
                    },
                    meta: None,
                    cache: CacheStatus::Pass(reason),
                    tier: Tier::None,
                    stored: false,
                    upstream_error: None,
                    now,
                }
            }
            Err(e) => {
                let mut s = error_served(e.status(), &e.to_string(), now);
                s.upstream_time = upstream_time;
                s.upstream_error = Some(e);
                s
            }
        }
    }

    /// The fill task: fetch, decide, stream to readers, store.
    async fn run_fill(self: Arc<Self>, fill: Arc<Fill>, job: FillJob) {
        self.fill_inner(&fill, job).await;
        self.fills
            .remove_if(&fill.key, |_, f| Arc::ptr_eq(f, &fill));
    }

    async fn fill_inner(&self, fill: &Arc<Fill>, job: FillJob) {
        let mut up = clone_parts(&job.upstream);
        up.method = Method::GET;
        up.extensions.insert(upstream::RouteKey(job.primary));
        for h in CLIENT_CONDITIONALS {
            up.headers.remove(h);
        }
        if let Some(meta) = &job.stale_meta {
            if let Some(etag) = meta.etag().and_then(|e| HeaderValue::from_str(e).ok()) {
                up.headers.insert(header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = meta
                .last_modified()
                .and_then(|e| HeaderValue::from_str(e).ok())
            {
                up.headers.insert(header::IF_MODIFIED_SINCE, lm);
            }
        }
        let sent = std::time::Instant::now();
        let fetched = self
            .upstream
            .fetch(Request::from_parts(up, empty_body()))
            .await;
        fill.set_upstream_time(sent.elapsed());
        let resp = match fetched {
            Ok(r) => r,
            Err(e) => {
                debug!(key = %job.key_text, error = %e, "fill failed");
                fill.publish(FillResult::Failed(e));
                return;
            }
        };
        let now = self.clock.now();
        let (mut parts, body) = resp.into_parts();

        if parts.status == StatusCode::NOT_MODIFIED
            && let Some(old) = &job.stale_meta
        {
            match policy::apply_not_modified(old, &job.norm, &parts, now, &job.admit) {
                Some(mut updated) => {
                    updated.purge_seq = job.purge_seq;
                    let updated = Arc::new(updated);
                    self.update_stored_meta(fill.key, &updated, job.stale_body.clone())
                        .await;
                    fill.publish(FillResult::Revalidated(updated));
                }
                None => {
                    // The merged response may no longer be stored: drop the old copy.
                    self.remove_object(fill.key).await;
                    fill.publish(FillResult::Failed(UpstreamError::Protocol(
                        "304 turned the stored response uncacheable".into(),
                    )))
                }
            }
            return;
        }

        let admission = if policy::status_may_be_stored(parts.status) {
            policy::admit(&job.norm, &parts, &job.key_text, now, &job.admit)
        } else {
            Admission::Pass(PassReason::Uncacheable)
        };
        let content_length = content_length(&parts.headers);
        let mut admission = admission;
        if content_length.is_some_and(|n| n > self.cfg.max_object_size) {
            admission = Admission::Pass(PassReason::TooLarge);
        }
        strip_hop_by_hop(&mut parts.headers);
        let (meta, vary, store_key, set_cookie) = match admission {
            Admission::Store(mut meta) => {
                meta.purge_seq = job.purge_seq;
                let set_cookie: Vec<HeaderValue> = parts
                    .headers
                    .get_all(header::SET_COOKIE)
                    .iter()
                    .cloned()
                    .collect();
                parts.headers.remove(header::SET_COOKIE);
                let vary = meta.vary_names();
                let store_key = self.register_variant(job.primary, &vary, &job.norm.headers);
                (Some(meta), vary, store_key, set_cookie)
            }
            Admission::Pass(reason) => {
                debug!(key = %job.key_text, reason = reason.as_str(), "not storing");
                // An old stored copy that the new answer replaces must not be served again; a
                // 5xx replaces nothing (stale-if-error may still serve the copy).
                if job.stale_meta.is_some() && !parts.status.is_server_error() {
                    self.remove_object(fill.key).await;
                }
                (None, Vec::new(), fill.key, Vec::new())
            }
        };
        let storing = meta.is_some();
        if storing && let Some(pinned) = &self.pinned {
            // The origin's answer replaces a pushed object a soft purge sent back to it.
            let path = job.norm.uri.path_and_query().map_or("/", |p| p.as_str());
            if pinned.contains(path) {
                pinned.delete(path).await;
                self.memory.remove(&pinned::pinned_key(path)).await;
            }
        }
        fill.set_keep_all(storing && content_length.is_some_and(|n| self.memory.fits(n)));
        let head = Arc::new(FillHead {
            status: parts.status,
            headers: parts.headers.clone(),
            set_cookie,
            meta: meta.as_ref().map(|m| Arc::new((**m).clone())),
            content_length,
            shareable: storing,
            vary,
            store_key,
        });
        fill.publish(FillResult::Streaming(head));

        let mut disk_tx = match (&self.disk, storing) {
            (Some(disk), true) => {
                Some(self.spawn_disk_writer(disk.clone(), store_key, content_length))
            }
            _ => None,
        };
        let mut body = body;
        let mut total: u64 = 0;
        let mut storing = storing;
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    total += data.len() as u64;
                    if storing && total > self.cfg.max_object_size {
                        storing = false;
                        disk_tx = None;
                        fill.set_keep_all(false);
                    }
                    if let Some(tx) = &disk_tx
                        && tx.try_send(DiskMsg::Data(data.clone())).is_err()
                    {
                        // The disk is slower than the client: give up the disk copy rather than
                        // slow anyone down.
                        self.stats
                            .disk_writes_abandoned
                            .fetch_add(1, Ordering::Relaxed);
                        disk_tx = None;
                    }
                    fill.push(data);
                    if !storing && fill.reader_count() == 0 {
                        fill.finish(Err("no reader left".into()));
                        return;
                    }
                }
                Some(Err(e)) => {
                    warn!(key = %job.key_text, error = %e, "upstream body failed mid-stream");
                    fill.finish(Err(format!("upstream body failed: {e}")));
                    return;
                }
            }
        }
        if content_length.is_some_and(|n| n != total) {
            fill.finish(Err("upstream body shorter than its Content-Length".into()));
            return;
        }
        let Some(mut meta) = meta.filter(|_| storing) else {
            fill.finish(Ok(()));
            return;
        };
        meta.body_len = total;
        let meta = Arc::new(*meta);
        if self.memory.fits(total)
            && let Some(body) = fill.assembled()
        {
            self.memory
                .insert(
                    store_key,
                    MemObject {
                        meta: meta.clone(),
                        body,
                    },
                )
                .await;
        }
        let committed = disk_tx.and_then(|tx| {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            tx.try_send(DiskMsg::Commit(meta, done_tx))
                .ok()
                .map(|_| done_rx)
        });
        fill.finish(Ok(()));
        // Stay in the fill map until the disk copy is visible, so a request arriving in between
        // finds this fill (and waits for the commit) rather than fetching again.
        if let Some(done) = committed {
            let _ = tokio::time::timeout(Duration::from_secs(30), done).await;
        }
        if fill.is_cancelled() {
            // Invalidated while we fetched: what we stored is already out of date.
            self.remove_object(store_key).await;
        }
    }

    fn spawn_disk_writer(
        &self,
        disk: Arc<DiskTier>,
        key: KeyHash,
        size: Option<u64>,
    ) -> mpsc::Sender<DiskMsg> {
        let (tx, mut rx) = mpsc::channel::<DiskMsg>(256);
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let mut writer = match disk.begin_write(key, size).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "disk tier write failed to start; serving without disk (check cache_dir space and permissions)");
                    stats.disk_write_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            while let Some(msg) = rx.recv().await {
                match msg {
                    DiskMsg::Data(d) => {
                        if let Err(e) = writer.write(&d).await {
                            warn!(error = %e, "disk tier write failed; object not stored on disk (check cache_dir space)");
                            stats.disk_write_errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    DiskMsg::Commit(meta, done) => {
                        if let Err(e) = writer.commit(&meta).await {
                            warn!(error = %e, "disk tier commit failed; object not stored on disk");
                            stats.disk_write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = done.send(());
                        return;
                    }
                }
            }
            // Sender dropped without Commit: the write is abandoned and never visible.
        });
        tx
    }

    /// Records Vary names for a primary key and returns the variant key for this request.
    fn register_variant(
        &self,
        primary: KeyHash,
        names: &[HeaderName],
        headers: &HeaderMap,
    ) -> KeyHash {
        if names.is_empty() {
            self.vary.remove(&primary);
            return primary;
        }
        let variant = primary.variant(names, headers);
        let mut e = self.vary.entry(primary).or_insert_with(|| VaryEntry {
            names: names.into(),
            variants: Vec::new(),
        });
        if &*e.names != names {
            e.names = names.into();
            e.variants.clear();
        }
        if !e.variants.contains(&variant) {
            e.variants.push(variant);
        }
        variant
    }

    async fn update_stored_meta(&self, key: KeyHash, meta: &Arc<CachedMeta>, body: Option<Bytes>) {
        let body = match body.filter(|b| !b.is_empty() || meta.body_len == 0) {
            Some(b) => Some(b),
            None => self.memory.get(&key).await.map(|m| m.body),
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
        if let Some(disk) = &self.disk
            && let Err(e) = disk.update_meta(&key, meta).await
        {
            warn!(error = %e, "disk tier metadata update failed");
        }
    }

    /// Removes an object and its encoded variants from both tiers.
    async fn remove_object(&self, key: KeyHash) {
        for k in std::iter::once(key).chain(STORED_CODINGS.iter().map(|c| encoded_key(key, c))) {
            self.memory.remove(&k).await;
            if let Some(d) = &self.disk {
                d.remove(&k).await;
            }
        }
    }

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
        if !hit::encoded_matches(&meta, base_meta) {
            return None;
        }
        let body = self.body_of(key, &stored).await?;
        Some((meta, body))
    }

    /// Stores an encoded variant beside its identity object (memory, and disk when present).
    pub async fn put_encoded(&self, base: KeyHash, coding: &str, meta: CachedMeta, body: Bytes) {
        let key = encoded_key(base, coding);
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
        if let Some(disk) = &self.disk {
            let disk = disk.clone();
            tokio::spawn(async move {
                let result = async {
                    let mut w = disk.begin_write(key, Some(body.len() as u64)).await?;
                    w.write(&body).await?;
                    w.commit(&meta).await
                }
                .await;
                if let Err(e) = result {
                    warn!(error = %e, "storing an encoded variant on disk failed");
                }
            });
        }
    }

    /// Purges by exact URL, prefix, tag or everything, hard or soft. Prefix, tag and all are
    /// O(1) in the number of cached objects (a generation is recorded and persisted); exact
    /// URLs are also removed from both tiers right away (hard) with every Vary variant.
    pub async fn purge(self: &Arc<Self>, spec: &PurgeSpec) -> io::Result<PurgeOutcome> {
        use invalidation::Scope;
        let mut scopes: Vec<Scope> = Vec::new();
        if spec.all {
            scopes.push(Scope::All);
        }
        scopes.extend(spec.prefixes.iter().map(|p| Scope::Prefix(key_form(p))));
        scopes.extend(spec.tags.iter().map(|t| Scope::Tag(t.clone())));
        // Exact URLs are recorded as exact scopes too, so that a soft purge works for them and
        // a hard purge survives a restart even before the objects are reclaimed.
        let exact: Vec<String> = spec.urls.iter().map(|u| key_form(u)).collect();
        scopes.extend(exact.iter().map(|k| Scope::Exact(k.clone())));
        let seq = self.gens.purge(&scopes, spec.soft).await?;
        let mut matched = None;
        if !exact.is_empty() && !spec.soft {
            let mut n = 0;
            for k in &exact {
                for key in self.expand_hosts(k) {
                    let primary = KeyHash::of(&key);
                    if self.holds(primary).await {
                        n += 1;
                    }
                    self.invalidate(primary).await;
                }
            }
            matched = Some(n);
        }
        if !spec.soft && (spec.all || !spec.prefixes.is_empty() || !spec.tags.is_empty()) {
            self.spawn_reclaim();
        }
        Ok(PurgeOutcome { seq, matched })
    }

    /// `host/path` stays; a bare `/path` means that path on every host seen.
    fn expand_hosts(&self, key: &str) -> Vec<String> {
        if key.starts_with('/') {
            self.hosts
                .iter()
                .map(|h| format!("{}{key}", h.key()))
                .collect()
        } else {
            vec![key.to_string()]
        }
    }

    async fn holds(&self, primary: KeyHash) -> bool {
        self.vary.contains_key(&primary)
            || self.memory.get(&primary).await.is_some()
            || self.disk.as_ref().is_some_and(|d| d.contains(&primary))
    }

    /// Reclaims purged objects from the tiers in the background (a purge itself never walks
    /// the cache).
    /// Single-flight: a purge during a running sweep asks for one more sweep instead of
    /// starting a second walk of the disk.
    fn spawn_reclaim(self: &Arc<Self>) {
        if self
            .reclaim
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some((s + 1).min(2))
            })
            .unwrap_or(0)
            != 0
        {
            return;
        }
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(e) = engine.upgrade() else { return };
                e.reclaim_once().await;
                // 2 → 1: another purge came in meanwhile, sweep again; 1 → 0: done.
                if e.reclaim.fetch_sub(1, Ordering::AcqRel) == 1 {
                    return;
                }
            }
        });
    }

    async fn reclaim_once(self: &Arc<Self>) {
        {
            let e = self;
            // Memory copies are dropped when a lookup meets them, or evicted by size.
            if let Some(disk) = &e.disk {
                let mut removed = 0u64;
                for key in disk.keys() {
                    if let Some(hit) = disk.get(&key).await
                        && e.gens
                            .check(&hit.meta.key, &hit.meta.tags, hit.meta.purge_seq)
                            == invalidation::Verdict::Gone
                    {
                        e.remove_object(key).await;
                        removed += 1;
                    }
                }
                if removed > 0 {
                    debug!(removed, "reclaimed purged objects from disk");
                }
            }
            if let Some(pinned) = &e.pinned {
                for key in pinned.tier().keys() {
                    if let Some(hit) = pinned.tier().get(&key).await
                        && e.gens
                            .check(&hit.meta.key, &hit.meta.tags, hit.meta.purge_seq)
                            == invalidation::Verdict::Gone
                    {
                        pinned.delete(&hit.meta.key).await;
                        e.memory.remove(&key).await;
                    }
                }
            }
        }
    }

    /// Removes every stored variant of a key from both tiers (RFC 9111 §4.4 invalidation,
    /// exact-URL purge).
    pub async fn invalidate(&self, primary: KeyHash) {
        let variants = self
            .vary
            .remove(&primary)
            .map(|(_, e)| e.variants)
            .unwrap_or_default();
        for k in std::iter::once(primary).chain(variants.iter().copied()) {
            // A fetch still running for the key must not bring the old answer back.
            if let Some((_, fill)) = self.fills.remove(&k) {
                fill.cancel();
            }
            self.remove_object(k).await;
        }
    }
}

/// A request's place in a fill: whether it started it, and its reader.
struct Joined {
    fill: Arc<Fill>,
    leader: bool,
    reader: Option<fill::FillReader>,
}

enum DiskMsg {
    Data(Bytes),
    /// Commit with this metadata, then signal.
    Commit(Arc<CachedMeta>, tokio::sync::oneshot::Sender<()>),
}

struct FillJob {
    admit: policy::AdmitOptions,
    /// Purge sequence when the fetch started: a purge that lands while it runs covers it.
    purge_seq: u64,
    norm: request::Parts,
    key_text: String,
    primary: KeyHash,
    upstream: request::Parts,
    stale_meta: Option<Arc<CachedMeta>>,
    stale_body: Option<Bytes>,
}

fn clone_parts(p: &request::Parts) -> request::Parts {
    let mut out = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version)
        .body(())
        .expect("cloned from a valid request")
        .into_parts()
        .0;
    out.headers = p.headers.clone();
    out
}

pub fn empty_body() -> UpstreamBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn body_stream(body: UpstreamBody) -> BoxStream<'static, io::Result<Bytes>> {
    http_body_util::BodyDataStream::new(body)
        .map_err(io::Error::other)
        .boxed()
}

/// The key form of a purge target: `http://host/p?q` → `host/p?q`; `/p` stays a path.
fn key_form(target: &str) -> String {
    let t = target.trim();
    let t = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .unwrap_or(t);
    if t.starts_with('/') {
        t.to_string()
    } else {
        match t.split_once('/') {
            Some((host, rest)) => format!("{}/{rest}", host.to_ascii_lowercase()),
            None => format!("{}/", t.to_ascii_lowercase()),
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A short plain-text error answer that names the failure.
pub fn error_served(status: StatusCode, message: &str, now: SystemTime) -> Served {
    let body = Bytes::from(format!("{message}\n"));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Served {
        upstream_time: None,
        key: None,
        status,
        headers,
        body: ServedBody::Full(body),
        meta: None,
        cache: CacheStatus::Error,
        tier: Tier::None,
        stored: false,
        upstream_error: None,
        now,
    }
}
