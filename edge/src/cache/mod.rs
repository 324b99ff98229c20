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
pub mod key;
pub mod memory;
pub mod meta;
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
}

/// A cacheable request (GET or HEAD) as the engine sees it.
pub struct CacheRequest {
    pub norm: NormalizedRequest,
    /// The client's method (GET or HEAD).
    pub method: Method,
    /// What to send upstream: the client's path and end-to-end headers.
    pub upstream: request::Parts,
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
}

impl Stored {
    fn meta(&self) -> &Arc<CachedMeta> {
        match self {
            Stored::Memory(m) => &m.meta,
            Stored::Disk(d) => &d.meta,
        }
    }

    fn tier(&self) -> Tier {
        match self {
            Stored::Memory(_) => Tier::Memory,
            Stored::Disk(_) => Tier::Disk,
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
    pub stats: EngineStats,
}

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
        let vary: DashMap<KeyHash, VaryEntry> = DashMap::new();
        let disk = match &cfg.disk {
            Some((dir, cap)) => {
                let (tier, metas) = DiskTier::open(dir, *cap).await?;
                for (variant, m) in metas {
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
        let engine = Arc::new(Self {
            memory,
            disk,
            vary,
            fills: DashMap::new(),
            upstream,
            clock,
            cfg,
            stats: EngineStats::default(),
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
            Stored::Disk(hit) => {
                let disk = self.disk.as_ref()?;
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
                    Some(ServedBody::Stream {
                        stream: disk.stream(key, hit).boxed(),
                        len: Some(hit.entry.size),
                    })
                }
            }
        }
    }

    fn served_from(
        &self,
        stored: &Stored,
        meta: Arc<CachedMeta>,
        body: ServedBody,
        cache: CacheStatus,
        now: SystemTime,
    ) -> Served {
        Served {
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

    /// Answers a GET or HEAD from cache or upstream.
    pub async fn serve(self: &Arc<Self>, req: CacheRequest) -> Served {
        let now = self.clock.now();
        let primary = req.norm.key.hash();
        let variant = self.variant_of(primary, &req.norm.parts.headers);
        let req_cc = cache_control::Directives::parse(&req.norm.parts.headers);
        let only_if_cached = req_cc.has("only-if-cached");

        let mut stale: Option<Stored> = None;
        if let Some(stored) = self.lookup(&variant).await {
            let meta = stored.meta().clone();
            match policy::freshness(&meta, &req.norm.parts, now) {
                Freshness::Fresh => {
                    if let Some(body) = self.body_of(variant, &stored).await {
                        return self.served_from(&stored, meta, body, CacheStatus::Hit, now);
                    }
                }
                Freshness::Stale => {
                    if policy::within_swr(&meta, &req.norm.parts.headers, now)
                        && let Some(body) = self.body_of(variant, &stored).await
                    {
                        self.revalidate_in_background(&req, variant, &meta);
                        return self.served_from(&stored, meta, body, CacheStatus::Stale, now);
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
        match self.fills.entry(variant) {
            Entry::Occupied(e) => {
                self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                let fill = e.get().clone();
                let reader = fill.reader();
                Joined {
                    fill,
                    leader: false,
                    reader,
                }
            }
            Entry::Vacant(v) => {
                let fill = Fill::new(variant);
                let reader = fill.reader();
                v.insert(fill.clone());
                self.stats.fills.fetch_add(1, Ordering::Relaxed);
                let job = FillJob {
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
        }
    }

    fn revalidate_in_background(
        self: &Arc<Self>,
        req: &CacheRequest,
        variant: KeyHash,
        meta: &Arc<CachedMeta>,
    ) {
        if self.fills.contains_key(&variant) {
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
            let mut s = self.served_from(stored, meta, body, CacheStatus::Stale, now);
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
                    Some(body) => {
                        self.served_from(stored, meta, body, CacheStatus::Revalidated, now)
                    }
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
                    if !head.shareable || mine != head.store_key {
                        return self.pass(req, PassReason::NotShareable, now).await;
                    }
                }
                let Some(reader) = reader else {
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
        let upstream_req = Request::from_parts(parts, empty_body());
        match self.upstream.fetch(upstream_req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let len = content_length(&parts.headers);
                Served {
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
        let resp = match self
            .upstream
            .fetch(Request::from_parts(up, empty_body()))
            .await
        {
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
            match policy::apply_not_modified(old, &job.norm, &parts, now, &self.cfg.surrogate_name)
            {
                Some(updated) => {
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
            policy::admit(
                &job.norm,
                &parts,
                &job.key_text,
                now,
                &self.cfg.surrogate_name,
            )
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
            Admission::Store(meta) => {
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
                // An old stored copy that the new answer replaces must not be served again.
                if job.stale_meta.is_some() {
                    self.remove_object(fill.key).await;
                }
                (None, Vec::new(), fill.key, Vec::new())
            }
        };
        let storing = meta.is_some();
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
        if let Some(tx) = disk_tx {
            let _ = tx.try_send(DiskMsg::Commit(meta));
        }
        fill.finish(Ok(()));
    }

    fn spawn_disk_writer(
        &self,
        disk: Arc<DiskTier>,
        key: KeyHash,
        size: Option<u64>,
    ) -> mpsc::Sender<DiskMsg> {
        let (tx, mut rx) = mpsc::channel::<DiskMsg>(256);
        let errors = Arc::new(AtomicU64::new(0));
        let stats_errors = errors.clone();
        tokio::spawn(async move {
            let mut writer = match disk.begin_write(key, size).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "disk tier write failed to start; serving without disk (check cache_dir space and permissions)");
                    stats_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            while let Some(msg) = rx.recv().await {
                match msg {
                    DiskMsg::Data(d) => {
                        if let Err(e) = writer.write(&d).await {
                            warn!(error = %e, "disk tier write failed; object not stored on disk (check cache_dir space)");
                            return;
                        }
                    }
                    DiskMsg::Commit(meta) => {
                        if let Err(e) = writer.commit(&meta).await {
                            warn!(error = %e, "disk tier commit failed; object not stored on disk");
                        }
                        return;
                    }
                }
            }
            // Sender dropped without Commit: the write is abandoned and never visible.
        });
        let _ = errors;
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

    async fn remove_object(&self, key: KeyHash) {
        self.memory.remove(&key).await;
        if let Some(d) = &self.disk {
            d.remove(&key).await;
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
        self.remove_object(primary).await;
        for v in variants {
            self.remove_object(v).await;
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
    Commit(Arc<CachedMeta>),
}

struct FillJob {
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
