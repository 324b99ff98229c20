//! The fill: one upstream fetch per key at a time (joined by concurrent requests), its decision
//! (store, pass, revalidated), streaming to its readers, and storing the body in both tiers.
//! [`super::coalesce`] holds the coalescing primitive; this is the engine's task around it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, request};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::clock::unix_ms;
use super::coalesce::{self, Concluding, Fill, FillHead, FillResult};
use super::disk::{DiskEntry, DiskTier, INLINE_MAX, Throttle, admission};
use super::key::KeyHash;
use super::meta::{CachedMeta, MemObject};
use super::policy::{self, Admission, Freshness};
use super::status::{CacheStatus, DiskAdmission, DiskVerdict, PassReason, Tier};
use super::upstream::{self, UpstreamBody, UpstreamError, empty_body};
use super::{CacheRequest, Engine, Failure, Served, ServedBody, Stored, push_store};
use outpost_http::headers::{CLIENT_CONDITIONALS, strip_hop_by_hop};

/// A request's place in a fill: whether it started it, and its reader.
pub(super) struct Joined {
    fill: Arc<Fill>,
    leader: bool,
    reader: Option<coalesce::FillReader>,
}

/// How long a fill waits for its disk copy to commit.
const DISK_COMMIT_WAIT: Duration = Duration::from_secs(30);

enum DiskMsg {
    /// A chunk, and its share of the engine's disk queue budget (given back once written).
    Data(Bytes, coalesce::Charge),
    /// Commit with this metadata, then signal; if the commit fails, take the copy it was to
    /// replace off the disk.
    Commit(
        Arc<CachedMeta>,
        tokio::sync::oneshot::Sender<()>,
        Option<Replaced>,
    ),
}

/// How a fill stores its disk copy.
enum DiskCopy {
    /// Chunks go to a writer task as they arrive (see `spawn_disk_writer`).
    Streamed(mpsc::Sender<DiskMsg>),
    /// A body small enough to be kept inline in its record that the fill keeps whole anyway
    /// (for the memory tier): stored from that copy at the end, by the fill itself, with no
    /// writer task, channel or per-chunk message. The guard counts the outcome.
    Whole(WholeAdmission),
}

/// Counts the disk admission of a [`DiskCopy::Whole`] once: what [`WholeAdmission::done`]
/// says, or, dropped without it (the fill ended early), why the fill gave the copy up.
struct WholeAdmission {
    stats: Arc<super::EngineStats>,
    verdict: Arc<DiskVerdict>,
    replaced: Option<Replaced>,
    counted: bool,
}

impl WholeAdmission {
    fn done(mut self, outcome: DiskAdmission) {
        self.counted = true;
        settle(&self.stats, outcome, self.replaced.take());
    }
}

impl Drop for WholeAdmission {
    fn drop(&mut self) {
        if !self.counted {
            let outcome = self.verdict.reason().unwrap_or(DiskAdmission::Incomplete);
            settle(&self.stats, outcome, self.replaced.take());
        }
    }
}

/// The disk copy of an older version that a fill's new version replaces. A new version never
/// leaves an older one on disk, to be served once memory lets the new one go or to be given a
/// later 304's metadata: if the new one does not reach the disk, the old one goes then. Not
/// sooner: until the new copy's fate is known, the old one still serves (stale-while-
/// revalidate, prefresh), and it stays if the new body never completed (stale-if-error).
struct Replaced {
    disk: Arc<DiskTier>,
    key: KeyHash,
    entry: Arc<DiskEntry>,
}

/// Takes the copy a new version replaces off the disk (by copy: a newer one stays).
fn remove_replaced(replaced: Option<Replaced>) {
    if let Some(r) = replaced {
        r.disk.remove_copy(&r.key, &r.entry);
    }
}

/// Counts a disk copy's outcome, and takes the copy it replaces off the disk if the new one,
/// complete, did not get there (see [`Replaced`]). A fill a purge replaced leaves it to the
/// fill that replaced it.
fn settle(stats: &super::EngineStats, outcome: DiskAdmission, replaced: Option<Replaced>) {
    stats.count_disk_admission(outcome);
    if !matches!(
        outcome,
        DiskAdmission::Stored | DiskAdmission::Incomplete | DiskAdmission::Superseded
    ) {
        remove_replaced(replaced);
    }
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

impl Joined {
    /// The fill joined or started.
    pub(super) fn fill(&self) -> Arc<Fill> {
        self.fill.clone()
    }
}

impl Engine {
    /// Joins the running fill for this key, or starts one (the caller is then its leader).
    /// The reader is registered before the fill can stream, so no chunk is dropped before the
    /// caller reads it; `None` means the fill already dropped its first bytes.
    pub(super) fn fill_or_join(
        self: &Arc<Self>,
        req: &CacheRequest,
        primary: KeyHash,
        variant: KeyHash,
        stale: Option<&Stored>,
    ) -> Joined {
        let current = self.purges.log.current();
        // Join a running fetch; or a finished one that is about to make its stored copy
        // visible, when this request found no copy at all. Never one that started before a
        // purge, and never a finished one when this request holds a stale copy (its answer is
        // what made the copy stale).
        let joinable = |fill: &Fill| {
            fill.purge_seq == current
                && !fill.is_cancelled()
                && (!fill.completed() || (stale.is_none() && fill.stores()))
        };
        let (fill, reader) = match self.fills.join_or_start(variant, current, joinable) {
            coalesce::Place::Joined(fill, reader) => {
                self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                return Joined {
                    fill,
                    leader: false,
                    reader,
                };
            }
            coalesce::Place::Started(fill, reader) => (fill, reader),
        };
        self.stats.fills.fetch_add(1, Ordering::Relaxed);
        self.purges.track_host(req.norm.key.as_str());
        let job = FillJob {
            admit: policy::AdmitOptions {
                surrogate: self.cfg.surrogate_name.clone(),
                default_ttl: req.default_ttl,
                targeted: self.cfg.targeted_cache_control.clone(),
                stale_on_error: self.cfg.stale_on_error,
                negative: self.cfg.negative_ttl.clone(),
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

    pub(super) async fn await_fill(
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
        // With a copy stale-if-error allows, a slow or hung origin costs the client at most
        // `stale_if_error_wait`: then the copy is served and the fill goes on without it.
        let wait = self.cfg.stale_if_error_wait;
        let sie_copy = stale.as_ref().is_some_and(|s| {
            let meta = s.meta().clone();
            policy::within_sie(&meta, &req.norm.parts.headers, now)
        });
        let result = if sie_copy && !wait.is_zero() {
            match tokio::time::timeout(wait, fill.result()).await {
                Ok(r) => r,
                Err(_) => FillResult::Failed(UpstreamError::Timeout(wait)),
            }
        } else {
            fill.result().await
        };
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
                Served::failed(Failure::Upstream(e), now)
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
                    // through). If it has completed, or has every byte and only its task has
                    // not run yet (its client may already have the whole body and be asking
                    // again), its copy is about to be visible: wait for it and serve from
                    // cache; otherwise fetch on our own.
                    if fill.completed() || head.content_length.is_some_and(|n| fill.has_all_of(n)) {
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
                let cache = match (&head.meta, head.pass_reason) {
                    (Some(_), _) => CacheStatus::Miss,
                    (None, reason) => CacheStatus::Pass(reason.unwrap_or(PassReason::Uncacheable)),
                };
                Served {
                    upstream_time: None,
                    key: head.meta.is_some().then_some(head.store_key),
                    status: head.status,
                    headers,
                    body: ServedBody::Stream {
                        stream: reader.into_stream().boxed(),
                        len: head.content_length,
                        range: None,
                    },
                    stored: head.meta.is_some(),
                    meta: head.meta.clone(),
                    cache,
                    tier: Tier::None,
                    upstream_error: None,
                    failure: None,
                    now,
                }
            }
        }
    }

    /// Sends the client's request upstream as is and streams the answer; nothing is stored.
    pub(super) async fn pass(
        &self,
        req: CacheRequest,
        reason: PassReason,
        now: SystemTime,
    ) -> Served {
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
                        range: None,
                    },
                    meta: None,
                    cache: CacheStatus::Pass(reason),
                    tier: Tier::None,
                    stored: false,
                    upstream_error: None,
                    failure: None,
                    now,
                }
            }
            Err(e) => {
                let mut s = Served::failed(Failure::Upstream(e), now);
                s.upstream_time = upstream_time;
                s
            }
        }
    }

    /// The fill task: fetch, decide, stream to readers, store.
    async fn run_fill(self: Arc<Self>, fill: Arc<Fill>, job: FillJob) {
        // Dropped last: waiters wake once the stored copy is visible and the fill is gone.
        let _conclude = Concluding(fill.clone());
        self.fill_inner(&fill, job).await;
        self.fills.ended(&fill);
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
            // A pushed object (served ahead of the cache) that a soft purge sent back to the
            // origin, confirmed unchanged.
            let path = job.norm.uri.path_and_query().map_or("/", |p| p.as_str());
            if self.pinned.as_ref().is_some_and(|p| p.contains(path))
                && let Some(confirmed) = self.confirm_pushed(path, old, job.purge_seq).await
            {
                fill.publish(FillResult::Revalidated(confirmed));
                return;
            }
            match policy::apply_not_modified(old, &job.norm, &parts, now, &job.admit) {
                Some(mut updated) => {
                    updated.purge_seq = job.purge_seq;
                    let updated = Arc::new(updated);
                    if self.fills.is_current(fill) {
                        self.update_stored_meta(fill.key, &updated, old, job.stale_body.clone())
                            .await;
                    }
                    fill.publish(FillResult::Revalidated(updated));
                }
                None => {
                    // The merged response may no longer be stored: drop the old copy.
                    if self.fills.is_current(fill) {
                        self.remove_object(fill.key).await;
                    }
                    fill.publish(FillResult::Failed(UpstreamError::Protocol(
                        "304 turned the stored response uncacheable".into(),
                    )))
                }
            }
            return;
        }

        let admission = if policy::status_may_be_stored(parts.status) {
            // A 5xx never replaces a stored copy through negative caching: stale-if-error
            // may still serve that copy, and its next request asks the origin again.
            let without_negative;
            let admit = if parts.status.is_server_error() && job.stale_meta.is_some() {
                without_negative = policy::AdmitOptions {
                    negative: Default::default(),
                    ..job.admit.clone()
                };
                &without_negative
            } else {
                &job.admit
            };
            policy::admit(&job.norm, &parts, &job.key_text, now, admit)
        } else {
            Admission::Pass(PassReason::Uncacheable)
        };
        let content_length = content_length(&parts.headers);
        let mut admission = admission;
        if content_length.is_some_and(|n| n > self.cfg.max_object_size) {
            admission = Admission::Pass(PassReason::TooLarge);
        }
        strip_hop_by_hop(&mut parts.headers);
        let pass_reason = match &admission {
            Admission::Pass(reason) => Some(*reason),
            Admission::Store(_) => None,
        };
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
                let (store_key, dropped) =
                    self.vary
                        .register(job.primary, &vary, &job.norm.headers, unix_ms(now), |k| {
                            self.held(k)
                        });
                // Variants of other names, or one too many for the URL: they leave the cache.
                for k in dropped {
                    self.remove_object(k).await;
                }
                (Some(meta), vary, store_key, set_cookie)
            }
            Admission::Pass(reason) => {
                debug!(key = %job.key_text, reason = reason.as_str(), "not storing");
                // An old stored copy that the new answer replaces must not be served again; a
                // 5xx replaces nothing (stale-if-error may still serve the copy).
                if job.stale_meta.is_some()
                    && !parts.status.is_server_error()
                    && self.fills.is_current(fill)
                {
                    self.remove_object(fill.key).await;
                }
                (None, Vec::new(), fill.key, Vec::new())
            }
        };
        let storing = meta.is_some();
        // A new version replaces every stored copy of the key, and a tier that does not get
        // it must not keep the old one: found again once memory lets the new one go, or given
        // the metadata of a later 304 for the new one. The disk's goes if the new copy does
        // not reach the disk ([`Replaced`]); the memory's is replaced or removed once the
        // body is in.
        let replacing = storing && job.stale_meta.is_some() && self.fills.is_current(fill);
        let mut replaced = match &self.disk {
            Some(disk) if replacing => disk.copy_of(&store_key).map(|entry| Replaced {
                disk: Arc::clone(disk),
                key: store_key,
                entry,
            }),
            _ => None,
        };
        if replacing && fill.key != store_key {
            // The Vary names changed: the old copy's key is not asked any more, and must not
            // be found again should the names come back.
            self.remove_object(fill.key).await;
        }
        // The origin's answer replaces a pushed object a soft purge sent back to it: the copy
        // this fill revalidates, no other (a re-push since stays, as for a 304 in
        // `confirm_pushed`). A pushed object that could not be served for a passing reason
        // (a failed read, the index reopening) sends its request here too, and stays.
        if storing
            && let Some(pinned) = &self.pinned
            && let Some(stale) = job.stale_meta.as_ref().filter(|m| m.pinned())
        {
            let path = job.norm.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Some(current) = pinned.get(path).await
                && current.meta.stored_at_ms == stale.stored_at_ms
            {
                let key = push_store::pinned_key(path);
                pinned.tier().remove_copy(&key, &current.entry);
                self.memory.remove(&key).await;
            }
        }
        // A body kept for the memory tier is held twice at its end (the chunks, then the
        // compact copy): both count against the engine's budget until the copy is stored.
        let mut memory_charge = match content_length {
            Some(n) if storing && self.memory.fits(n) => {
                self.fills.memory.take(n.saturating_mul(2))
            }
            _ => None,
        };
        fill.set_keep_all(memory_charge.is_some());
        let head = Arc::new(FillHead {
            status: parts.status,
            headers: parts.headers.clone(),
            set_cookie,
            meta: meta.as_ref().map(|m| Arc::new((**m).clone())),
            pass_reason,
            content_length,
            shareable: storing,
            vary,
            store_key,
        });
        fill.publish(FillResult::Streaming(head));

        // Every storable response with a disk tier ends in one `DiskAdmission`, counted by
        // its writer task (or, for a whole copy, its guard): the fill says why when it gives
        // the disk copy up.
        let verdict = Arc::new(DiskVerdict::new());
        let whole = memory_charge.is_some() && content_length.is_some_and(|n| n <= INLINE_MAX);
        // A full disk tier turns a key's first miss away (see `disk::admission`); a key whose
        // stored copy this fetch refreshes, or that has a disk copy, is not new.
        let to_disk = storing
            && self.disk.as_ref().is_some_and(|disk| {
                let admitted = self.cfg.disk_admission == admission::Policy::Always
                    || job.stale_meta.is_some()
                    || disk.copy_of(&store_key).is_some()
                    || disk.admits_new(&store_key, content_length);
                if !admitted {
                    self.stats.count_disk_admission(DiskAdmission::Rejected);
                }
                admitted
            });
        let mut disk_copy = match (&self.disk, to_disk) {
            (Some(_), true) if whole => Some(DiskCopy::Whole(WholeAdmission {
                stats: self.stats.clone(),
                verdict: verdict.clone(),
                replaced: replaced.take(),
                counted: false,
            })),
            // A streamed copy can be given up before the body is complete: the fill keeps
            // what it replaces until it knows whether the body completed.
            (Some(disk), true) => Some(DiskCopy::Streamed(self.spawn_disk_writer(
                disk.clone(),
                store_key,
                verdict.clone(),
            ))),
            _ => None,
        };
        // The body as the memory tier got it, when it did.
        let mut whole_body: Option<Bytes> = None;
        let mut body = body;
        let mut total: u64 = 0;
        let mut storing = storing;
        let mut in_memory = false;
        loop {
            // Never further ahead of the slowest reader than the window (unless kept whole).
            let dropped = fill
                .wait_for_room(coalesce::FILL_WINDOW, self.cfg.send_timeout)
                .await;
            if dropped > 0 {
                self.stats
                    .slow_readers_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    total += data.len() as u64;
                    if storing && total > self.cfg.max_object_size {
                        storing = false;
                        verdict.abandon(DiskAdmission::TooLarge);
                        disk_copy = None;
                        fill.set_keep_all(false);
                        memory_charge = None;
                    }
                    if let Some(DiskCopy::Streamed(tx)) = &disk_copy
                        && self
                            .fills
                            .disk_queue
                            .take(data.len() as u64)
                            .is_none_or(|c| tx.try_send(DiskMsg::Data(data.clone(), c)).is_err())
                    {
                        // The disk is slower than the client (its queue, or every writer's
                        // queues together, are full): give up the disk copy rather than slow
                        // anyone down or hold the body in memory.
                        self.stats
                            .disk_writes_abandoned
                            .fetch_add(1, Ordering::Relaxed);
                        verdict.abandon(DiskAdmission::QueueFull);
                        disk_copy = None;
                    }
                    let last = content_length == Some(total);
                    if last
                        && storing
                        && self.memory.fits(total)
                        && let Some(m) = meta.as_deref()
                        && self.fills.is_current(fill)
                    {
                        // The client has the whole body once it reads this chunk, and may ask
                        // again at once: make the memory copy visible first, so that request
                        // is a HIT rather than a late joiner of this fill.
                        fill.push_held(data);
                        if let Some(body) = fill.assembled() {
                            whole_body = Some(body.clone());
                            let mut m = m.clone();
                            m.body_len = total;
                            self.memory
                                .insert(
                                    store_key,
                                    MemObject {
                                        meta: Arc::new(m),
                                        body,
                                    },
                                )
                                .await;
                            in_memory = true;
                        }
                        memory_charge = None;
                        fill.release();
                    } else {
                        fill.push(data);
                    }
                    if !storing && fill.reader_count() == 0 {
                        if replacing && self.fills.is_current(fill) {
                            self.drop_old_version(store_key, replaced.take()).await;
                        }
                        fill.finish(Err("no reader left".into()));
                        return;
                    }
                }
                Some(Err(e)) => {
                    warn!(key = %job.key_text, error = %e, "upstream body failed mid-stream");
                    if in_memory {
                        self.memory.remove(&store_key).await;
                    }
                    fill.finish(Err(format!("upstream body failed: {e}")));
                    return;
                }
            }
        }
        if content_length.is_some_and(|n| n != total) {
            if in_memory {
                self.memory.remove(&store_key).await;
            }
            fill.finish(Err(
                "upstream body longer or shorter than its Content-Length".into(),
            ));
            return;
        }
        let Some(mut meta) = meta.filter(|_| storing) else {
            if replacing && self.fills.is_current(fill) {
                self.drop_old_version(store_key, replaced.take()).await;
            }
            fill.finish(Ok(()));
            return;
        };
        meta.body_len = total;
        let meta = Arc::new(*meta);
        // A fill a purge replaced stores nothing: the newer fill's copy is the current one.
        let current = self.fills.is_current(fill);
        if !in_memory
            && current
            && self.memory.fits(total)
            && let Some(body) = fill.assembled()
        {
            whole_body = Some(body.clone());
            self.memory
                .insert(
                    store_key,
                    MemObject {
                        meta: meta.clone(),
                        body,
                    },
                )
                .await;
            in_memory = true;
        }
        if replacing && current && !in_memory {
            self.memory.remove(&store_key).await;
        }
        drop(memory_charge);
        let stored_seq = meta.purge_seq;
        let committed_meta = meta.clone();
        if !current {
            verdict.abandon(DiskAdmission::Superseded);
        }
        fill.finish(Ok(()));
        // A streamed copy: stay in the fill map until the disk copy is visible, so a request
        // arriving in between finds this fill (and waits for the commit) rather than fetching
        // again. A whole copy: the memory tier holds the object.
        // The body is complete: a streamed copy takes what it replaces along to its commit;
        // given up, what it replaces goes now (unless a purge replaced this fill).
        let replaced = replaced.filter(|_| current);
        let committed = match disk_copy.filter(|_| current) {
            Some(DiskCopy::Streamed(tx)) => {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                match tx.try_send(DiskMsg::Commit(meta, done_tx, replaced)) {
                    Ok(()) => {
                        let _ = tokio::time::timeout(DISK_COMMIT_WAIT, done_rx).await;
                        true
                    }
                    Err(e) => {
                        if let DiskMsg::Commit(.., r) = e.into_inner() {
                            remove_replaced(r);
                        }
                        verdict.abandon(DiskAdmission::QueueFull);
                        false
                    }
                }
            }
            Some(DiskCopy::Whole(admission)) => {
                // Its record counts against the disk queue budget until it commits, as a
                // streamed copy's chunks do until written: a slow disk is given up on, not
                // queued for without bound.
                let charge = whole_body.as_ref().and_then(|b| {
                    let charge = self.fills.disk_queue.take(b.len() as u64);
                    if charge.is_none() {
                        self.stats
                            .disk_writes_abandoned
                            .fetch_add(1, Ordering::Relaxed);
                        verdict.abandon(DiskAdmission::QueueFull);
                    }
                    charge
                });
                if let (Some(disk), Some(body), Some(charge)) = (&self.disk, whole_body, charge) {
                    // Not waited for: the memory tier answers the object meanwhile, and the
                    // fill leaves the fill map at once. (A 304 that lands in those few
                    // milliseconds refreshes the memory copy only; the disk copy keeps the
                    // metadata it was stored with, which a restart revalidates.)
                    let stats = self.stats.clone();
                    // The record's budget comes back once it is committed (the writer has
                    // dropped it), not when it is durable.
                    disk.store_whole(
                        store_key,
                        &body,
                        &meta,
                        move || drop(charge),
                        move |result| admission.done(commit_outcome(&stats, result)),
                    );
                }
                // Else the fill kept no whole copy after all: the guard counts why.
                false
            }
            None => {
                remove_replaced(replaced);
                false
            }
        };
        if committed {
            // A revalidation that started while the commit ran (it replaced this fill) found
            // no disk copy to update and refreshed only the memory copy: carry its metadata
            // over to the copy that just landed, or a restart would find the old one.
            if !self.fills.is_current(fill)
                && let Some(disk) = &self.disk
                && let Some(obj) = self.memory.get(&store_key).await
                && !Arc::ptr_eq(&obj.meta, &committed_meta)
                && obj.meta.purge_seq == stored_seq
                && obj.meta.same_version(&committed_meta)
                && let Err(e) = disk
                    .update_meta(&store_key, &obj.meta, &committed_meta)
                    .await
            {
                static FAILED: Throttle = Throttle::new();
                if let Some(occurrences) = FAILED.pass() {
                    warn!(error = %e, occurrences, "disk tier metadata update failed (one line per 10 s at most)");
                }
            }
        }
        // Invalidated while we fetched: what we stored is already out of date. Only ours goes:
        // a fill that started after the purge stored a copy with a later purge sequence.
        if fill.is_cancelled()
            && let Some(stored) = self.lookup(&store_key).await
            && stored.meta().purge_seq == stored_seq
        {
            self.remove_copy(store_key, &stored).await;
        }
    }

    /// A new version too large to store after all: the old one goes from both tiers too.
    async fn drop_old_version(&self, key: KeyHash, replaced: Option<Replaced>) {
        self.memory.remove(&key).await;
        remove_replaced(replaced);
    }

    fn spawn_disk_writer(
        &self,
        disk: Arc<DiskTier>,
        key: KeyHash,
        verdict: Arc<DiskVerdict>,
    ) -> mpsc::Sender<DiskMsg> {
        let (tx, rx) = mpsc::channel::<DiskMsg>(256);
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let (outcome, replaced) = match Self::write_to_disk(disk, key, rx, &stats).await {
                Some((outcome, replaced)) => (outcome, replaced),
                // Ended without a commit: the fill gave the copy up and said why (and
                // decides about what it replaces), or the body never completed.
                None => (verdict.reason().unwrap_or(DiskAdmission::Incomplete), None),
            };
            settle(&stats, outcome, replaced);
        });
        tx
    }

    /// Runs one disk write: `Some` when it ended in the disk (stored, or an error; with the
    /// copy its commit was to replace), `None` when the fill stopped sending before a commit.
    async fn write_to_disk(
        disk: Arc<DiskTier>,
        key: KeyHash,
        mut rx: mpsc::Receiver<DiskMsg>,
        stats: &super::EngineStats,
    ) -> Option<(DiskAdmission, Option<Replaced>)> {
        let mut writer = disk.begin_write(key);
        // The queue budget of chunks the writer holds until it writes them out.
        let mut held = Vec::new();
        while let Some(msg) = rx.recv().await {
            match msg {
                DiskMsg::Data(d, charge) => {
                    held.push(charge);
                    match writer.write(d).await {
                        Ok(true) => held.clear(),
                        Ok(false) => {}
                        Err(e) => {
                            static FAILED: Throttle = Throttle::new();
                            if let Some(occurrences) = FAILED.pass() {
                                warn!(error = %e, occurrences, "disk tier write failed; object not stored on disk (check cache_dir space; one line per 10 s at most)");
                            }
                            stats.disk_write_errors.fetch_add(1, Ordering::Relaxed);
                            return Some((DiskAdmission::Error, None));
                        }
                    }
                }
                DiskMsg::Commit(meta, done, replaced) => {
                    // The fill waits until lookups find the copy; the copy counts as stored
                    // once it is durable.
                    let durable = writer.commit_visible(&meta).await;
                    let _ = done.send(());
                    drop(held);
                    let result = match durable {
                        Ok(durable) => durable.wait().await,
                        Err(e) => Err(e),
                    };
                    return Some((commit_outcome(stats, result), replaced));
                }
            }
        }
        // Sender dropped without Commit: the write is abandoned and never visible.
        None
    }
}

/// A disk copy's commit as an admission outcome; a failure is logged and counted.
fn commit_outcome(stats: &super::EngineStats, result: io::Result<()>) -> DiskAdmission {
    match result {
        Ok(()) => DiskAdmission::Stored,
        Err(e) => {
            static FAILED: Throttle = Throttle::new();
            if let Some(occurrences) = FAILED.pass() {
                warn!(error = %e, occurrences, "disk tier commit failed; object not stored on disk (one line per 10 s at most)");
            }
            stats.disk_write_errors.fetch_add(1, Ordering::Relaxed);
            DiskAdmission::Error
        }
    }
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

#[cfg(test)]
mod tests {
    //! Nothing stored may keep a buffer it does not own. hyper's header values, URIs and body
    //! chunks are slices of the connection's read buffer: the origin here hands out exactly
    //! such slices (of one large buffer per response), and so does the client's request.

    use std::sync::Mutex;

    use bytes::Bytes;
    use futures_util::FutureExt;
    use futures_util::future::BoxFuture;
    use http::{HeaderValue, Response, Uri};
    use http_body_util::{BodyExt, Full};

    use super::super::clock::Clock;
    use super::super::upstream::{Upstream, UpstreamBody};
    use super::super::{CacheRequest, EngineConfig, ServedBody};
    use super::*;

    /// Like hyper's read buffer: 256 KiB, of which a response uses a small part.
    const READ_BUFFER: usize = 256 * 1024;
    const BODY: usize = 10_000;

    /// A buffer of `READ_BUFFER` bytes that starts with `text`, and the range of `text` in it.
    fn read_buffer(text: &[u8]) -> Bytes {
        let mut v = vec![b'x'; READ_BUFFER];
        v[..text.len()].copy_from_slice(text);
        Bytes::from(v)
    }

    /// A value sliced out of `buf`, as hyper makes it (the text starts at `at`).
    fn sliced(buf: &Bytes, at: usize, len: usize) -> HeaderValue {
        HeaderValue::from_maybe_shared(buf.slice(at..at + len)).unwrap()
    }

    /// An origin whose every header value and body is a slice of a read buffer it keeps a
    /// handle on, so the test can see whether anything else still holds one.
    #[derive(Default)]
    struct SlicingOrigin {
        buffers: Mutex<Vec<Bytes>>,
    }

    impl Upstream for SlicingOrigin {
        fn fetch(
            &self,
            _req: Request<UpstreamBody>,
        ) -> BoxFuture<'static, Result<http::Response<UpstreamBody>, UpstreamError>> {
            let fields: [(&str, &[u8]); 6] = [
                ("cache-control", b"public, max-age=3600"),
                ("content-type", b"application/octet-stream"),
                ("etag", b"\"v1\""),
                ("vary", b"accept-language"),
                ("surrogate-key", b"a b"),
                ("x-origin-note", b"kept"),
            ];
            let mut text = Vec::new();
            let mut at = Vec::new();
            for (_, v) in fields {
                at.push(text.len());
                text.extend_from_slice(v);
            }
            let body_at = text.len();
            text.extend((0..BODY).map(|i| (i % 251) as u8));
            let buf = read_buffer(&text);
            let mut resp = Response::new(
                Full::new(buf.slice(body_at..body_at + BODY))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            for ((name, v), at) in fields.iter().zip(at) {
                resp.headers_mut().append(*name, sliced(&buf, at, v.len()));
            }
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(BODY));
            self.buffers.lock().unwrap().push(buf);
            async move { Ok(resp) }.boxed()
        }
    }

    /// A GET whose URI and header values are slices of a client read buffer.
    fn request(client_buf: &Bytes) -> CacheRequest {
        let uri = Uri::from_maybe_shared(client_buf.slice(0..6)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, sliced(client_buf, 6, 9));
        headers.insert(header::ACCEPT_LANGUAGE, sliced(client_buf, 15, 2));
        headers.insert(header::USER_AGENT, sliced(client_buf, 17, 4));
        crate::tests::cache_request(uri, headers)
    }

    async fn stores_nothing_foreign(disk: bool) {
        let dir = tempfile::tempdir().unwrap();
        let origin = Arc::new(SlicingOrigin::default());
        let engine = Engine::open(
            EngineConfig {
                memory_bytes: 64 << 20,
                disk: disk.then(|| (dir.path().to_path_buf(), 64 << 20)),
                max_object_size: 8 << 20,
                surrogate_name: "outpost".into(),
                targeted_cache_control: crate::default_targeted_cache_control(),
                stale_on_error: std::time::Duration::ZERO,
                revalidations_per_sec: 10,
                stale_if_error_wait: std::time::Duration::ZERO,
                send_timeout: std::time::Duration::from_secs(60),
                negative_ttl: Default::default(),
                prefresh: 0.0,
                disk_admission: Default::default(),
            },
            origin.clone(),
            Clock::manual(),
        )
        .await
        .unwrap();
        let client_buf = read_buffer(b"/a?b=1site.testdecurl");
        // The answer's own headers are the origin's (they may share its buffer): keep only
        // its body.
        let (cache, body) = {
            let served = engine.serve(request(&client_buf)).await;
            (served.cache, served.body)
        };
        assert_eq!(cache, CacheStatus::Miss);
        let ServedBody::Stream { stream, .. } = body else {
            panic!("a miss streams");
        };
        let body: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(body.iter().map(Bytes::len).sum::<usize>(), BODY);
        drop(body);
        // Once the fill has ended and the disk copy committed, only the stored copies are
        // left, and they must hold none of the buffers.
        for _ in 0..500 {
            if engine.fills.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(engine.fills.is_empty(), "the fill never ended");
        // A small body's disk copy commits after its fill ends.
        if let Some(disk) = &engine.disk {
            disk.flush().await;
        }
        engine.run_pending_tasks().await;
        let again = engine.serve(request(&client_buf)).await;
        assert_eq!(again.cache, CacheStatus::Hit, "stored");
        assert_eq!(again.body.len(), Some(BODY as u64));
        drop(again);
        let [(_, in_memory, _), (_, on_disk, _)] = engine.usage();
        assert_eq!((in_memory, on_disk), (1, u64::from(disk)));
        let buffers = origin.buffers.lock().unwrap();
        assert_eq!(buffers.len(), 1, "one fetch");
        for buf in buffers.iter() {
            assert!(
                buf.is_unique(),
                "a stored header value, URI or body still holds the origin's read buffer"
            );
        }
        assert!(
            client_buf.is_unique(),
            "a stored header value or URI still holds the client's read buffer"
        );
    }

    #[tokio::test]
    async fn stored_objects_hold_no_read_buffer_memory_only() {
        stores_nothing_foreign(false).await;
    }

    #[tokio::test]
    async fn stored_objects_hold_no_read_buffer_with_disk() {
        stores_nothing_foreign(true).await;
    }
}
