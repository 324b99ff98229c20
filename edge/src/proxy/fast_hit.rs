//! The hit fast path: a GET or HEAD that a fresh stored object answers as it stands.
//!
//! The full path normalises the request (a header map clone and an absolute URI), asks the
//! engine, runs the compression and respond phases and formats every header again. For the
//! common hit none of that changes from one request to the next, so the response head is built
//! once per stored object, by those same phases ([`respond::build`]), and kept in the object's
//! memory entry ([`PreparedHead`]). A hit then costs: its key (remembered per thread for
//! recent targets), a lookup of the memory tier (through the thread's table of recent hits),
//! and a clone of a head finished for the current `Age` and `Cache-Status` ttl (per thread,
//! once a second). None of it awaits: the data port answers a hit within hyper's call to its
//! service ([`Proxy::hit_now`]); only the first hit on an object, which prepares its head,
//! continues in a future ([`Proxy::hit_later`]). Cores serving the same hot object do not
//! write the same memory (but for one moka read in sixteen, which keeps its eviction policy
//! informed), so they do not slow each other down.
//!
//! Disk objects the memory tier does not take get the same treatment once hit
//! ([`Engine::fresh_disk_hit`](crate::cache::Engine::fresh_disk_hit)): metadata the disk tier
//! holds decoded, a head prepared once and kept with it, and the body (inline in its record,
//! or a content file read whole), read moments ago, read and checked again on this thread.
//! Identity answers only: an encoded one takes the full path, which compresses.
//!
//! Anything the prepared head does not cover takes the full path, which gives the same answer:
//! request directives (Cache-Control, Pragma), credentials, conditionals and ranges, pushed
//! paths, stale or purged objects, and encoded variants not in memory yet.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::Deref;
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

#[cfg(test)]
use super::Route;
use super::respond::{self, HIT_TTL, Outcome, push_hit_status, upstream_cache_status};
use super::{Proxy, RouteSettings};
use crate::cache::fresh::{Codings, DiskFreshHit, FreshHit, HeadSlot, PreparedHead};
use crate::cache::key::{CacheKey, Coding, KeyHash, key_text};
use crate::cache::memory::{EntryRef, MemEntry, SlotTable};
use crate::cache::meta::CachedMeta;
use crate::cache::policy;
use crate::cache::status::{CacheStatus, Tier};
use crate::cache::{Served, ServedBody};
use outpost_http::body::{RespBody, full};
use outpost_http::headers::{CACHE_STATUS, CLIENT_CONDITIONALS, X_CACHE};

/// Request fields that make a hit depend on more than the stored object: freshness
/// directives and credentials, and (with [`CLIENT_CONDITIONALS`]) conditionals and ranges;
/// and fields the request phase must judge first (a body's framing, expectations).
const FULL_PATH_FIELDS: [HeaderName; 6] = [
    header::CACHE_CONTROL,
    header::PRAGMA,
    header::AUTHORIZATION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::EXPECT,
];

/// `Age` values below this many seconds come from a table built once: no allocation and no
/// shared reference count per hit.
const AGE_TABLE: u64 = 3600;

fn age_value(secs: u64) -> HeaderValue {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    if secs >= AGE_TABLE {
        return HeaderValue::from(secs);
    }
    let table = TABLE.get_or_init(|| {
        // One string holding every number, made 'static once for the process's lifetime.
        let mut all = String::new();
        let mut ends = Vec::with_capacity(AGE_TABLE as usize);
        for n in 0..AGE_TABLE {
            all.push_str(itoa::Buffer::new().format(n));
            ends.push(all.len());
        }
        let all: &'static str = Box::leak(all.into_boxed_str());
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let v = HeaderValue::from_static(&all[start..end]);
                start = end;
                v
            })
            .collect()
    });
    table[secs as usize].clone()
}

/// Entries in each thread's key memo (a power of two).
const MEMO_SLOTS: usize = 256;

/// One remembered key computation.
struct Memo {
    /// [`RouteSettings::generation`] it was computed under.
    generation: u64,
    /// The raw request target: authority (or Host) and path-and-query, as received.
    host: Box<[u8]>,
    target: Box<str>,
    /// The key (its text and hash), handed on to the full path when the fast path does not
    /// answer, so no request is keyed twice.
    key: CacheKey,
}

thread_local! {
    /// Recent key computations of this thread, direct-mapped by the raw target. Building the
    /// key text (host normalisation, sorted query) and its blake3 hash is most of what a hit
    /// costs besides the lookup, and hot URLs repeat. An entry counts only under the settings
    /// generation it was made with: a reload, or another node in the same process, never
    /// reuses it.
    static MEMO: std::cell::RefCell<Vec<Option<Memo>>> =
        std::cell::RefCell::new((0..MEMO_SLOTS).map(|_| None).collect());
}

/// The key of a request (`host`: its first Host field), as the full path would build it
/// ([`key_text`]). `None` for a target the full path must judge (it answers 400).
fn key_of(
    uri: &http::Uri,
    host: Option<&HeaderValue>,
    headers: &HeaderMap,
    settings: &RouteSettings,
) -> Option<CacheKey> {
    let host = match uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => host?.as_bytes(),
    };
    let target = uri.path_and_query()?.as_str();
    let opts = &settings.route.key_opts;
    if target.len() > settings.route.limits.max_uri {
        return None;
    }
    // The memo is keyed by the target alone: a key that holds request fields (keyed forwarding
    // headers) is computed every time.
    let memoised = opts.keyed_headers.is_empty();
    let generation = settings.generation;
    let slot = {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::default().hash_one((generation, host, target));
        (h as usize) & (MEMO_SLOTS - 1)
    };
    if memoised {
        let known = MEMO.with_borrow(|memo| {
            memo[slot]
                .as_ref()
                .filter(|m| m.generation == generation && *m.host == *host && *m.target == *target)
                .map(|m| m.key.clone())
        });
        if known.is_some() {
            return known;
        }
    }
    let key = CacheKey::new(key_text(uri, headers, opts).ok()?);
    if memoised {
        MEMO.with_borrow_mut(|memo| {
            memo[slot] = Some(Memo {
                generation,
                host: host.into(),
                target: target.into(),
                key: key.clone(),
            });
        });
    }
    Some(key)
}

/// Entries in each thread's table of finished heads (a power of two).
const STAMPED_SLOTS: usize = 256;

/// A prepared head finished for one `Age` and `Cache-Status` ttl, and the object's body.
struct Stamped {
    /// [`MemEntry::id`] of the object it belongs to.
    entry: u64,
    age: u64,
    ttl: u64,
    headers: HeaderMap,
    /// The entry's body behind a reference count of this thread's own, when it fits the
    /// table's bounds ([`TableBytes`](crate::cache::memory::TableBytes)).
    body: Option<Bytes>,
}

thread_local! {
    /// Finished response heads of this thread, direct-mapped by memory entry. `Age` and the
    /// ttl change once a second, so a hot object's head is finished about once a second per
    /// thread and only cloned for the hits in between. Its names and values are `'static` or
    /// this thread's own copies, and the body, when it fits the table's bounds
    /// ([`TableBytes`](crate::cache::memory::TableBytes); otherwise the entry's shared
    /// `Bytes`), is shared through a handle of this thread's own (`Bytes::from_owner`, no copy
    /// of the bytes): cloning and dropping them per hit touches reference counts that no other
    /// core writes, where the shared ones would bounce between cores on every hit of a hot
    /// object. Entry ids are never reused, so a replaced object (a new fill, a 304 update)
    /// never matches an old slot.
    static STAMPED: std::cell::RefCell<SlotTable<Stamped>> =
        std::cell::RefCell::new(SlotTable::new(STAMPED_SLOTS));
}

/// Fields whose values repeat across objects and over time (a site has a few content types
/// and caching rules; the values the edge adds are constants). A finished head holds them as
/// `'static` values: cloning and dropping one per hit touches no reference count, where a
/// copy costs two atomic operations per field and hit (with the other values, ~3% of a 1 KiB
/// hit's server CPU, perf).
const INTERNED_FIELDS: [HeaderName; 7] = [
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
    header::ACCEPT_RANGES,
    header::VARY,
    header::CONTENT_ENCODING,
    header::VIA,
    X_CACHE,
];

/// Interned values are never freed: at most this many, of at most [`INTERNED_LEN_MAX`] bytes
/// each, in the process (64 KiB). Values beyond are copied as other fields are.
const INTERNED_MAX: usize = 256;
const INTERNED_LEN_MAX: usize = 256;

/// `value` as a `'static` value, if it is, or can be made, one of the interned values. Each
/// thread remembers what the process-wide table answered, so a thread finishing heads takes
/// its lock only for values it has not met yet.
fn interned(value: &HeaderValue) -> Option<HeaderValue> {
    type Known = (HashSet<&'static str>, HashSet<Box<str>>);
    static TABLE: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    thread_local! {
        /// Values this thread found in the table, and values the full table refused (at most
        /// `INTERNED_MAX`, then forgotten).
        static KNOWN: RefCell<Known> = RefCell::default();
    }
    let bytes = value.as_bytes();
    // What `HeaderValue::from_static` accepts: visible ASCII, spaces and tabs.
    if bytes.len() > INTERNED_LEN_MAX
        || !bytes.iter().all(|&b| b == b'\t' || (32..127).contains(&b))
    {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let known = KNOWN.with_borrow(|(found, refused)| match found.get(text) {
        Some(s) => Some(Some(*s)),
        None => refused.contains(text).then_some(None),
    });
    let stat = match known {
        Some(known) => known,
        None => {
            let stat = {
                let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
                match table.get(text) {
                    Some(s) => Some(*s),
                    None if table.len() < INTERNED_MAX => {
                        let s: &'static str = Box::leak(text.into());
                        table.insert(s);
                        Some(s)
                    }
                    None => None,
                }
            };
            KNOWN.with_borrow_mut(|(found, refused)| match stat {
                Some(s) => {
                    found.insert(s);
                }
                None => {
                    if refused.len() >= INTERNED_MAX {
                        refused.clear();
                    }
                    refused.insert(text.into());
                }
            });
            stat
        }
    };
    stat.map(HeaderValue::from_static)
}

/// A fast-path answer: the response, what the cache did, and the body bytes it sends.
pub(super) struct FastHit {
    pub response: Response<RespBody>,
    pub outcome: Outcome,
    pub sent: u64,
}

/// What a request's lookup on the hit fast path found.
pub(super) enum Lookup {
    /// A fresh memory hit, answered.
    Hit(FastHit),
    /// A fresh memory hit whose response head (or its encoded variant's) is not prepared yet:
    /// [`Proxy::hit_later`] prepares it, once per object, and answers.
    Unprepared(Box<Unprepared>),
    /// Anything else: the full path, with the request's key when the lookup built it (and
    /// the settings generation it was built under).
    Full(Option<(u64, CacheKey)>),
}

/// A fresh hit waiting for its head, and what the request asked that the head depends on.
pub(super) struct Unprepared {
    hit: UnpreparedHit,
    asked: Asked,
}

enum UnpreparedHit {
    Memory(FreshHit),
    Disk(DiskFreshHit),
}

/// Where a fast hit's body comes from.
enum HitBody<'a> {
    /// The memory entry's: kept per thread beside the finished head (see [`STAMPED`]).
    Memory(&'a Bytes),
    /// Read from the disk tier for this hit.
    Disk(Bytes),
}

/// The parts of a request a prepared head depends on.
#[derive(Clone, Copy)]
struct Asked {
    head_only: bool,
    accept_encoding: bool,
}

/// One step towards a fast-path answer.
enum Step {
    Answer(FastHit),
    /// The object's head (`None`) or this encoded variant's must be prepared first.
    Prepare(Option<EntryRef>),
    Full,
}

impl Proxy {
    /// Looks a GET or HEAD up on the hit fast path, with no await: the data port answers a
    /// [`Lookup::Hit`] within hyper's call to the service, and drops the request there. No
    /// side effects but counters.
    pub(super) fn hit_now<B: super::RequestBody>(&self, req: &Request<B>) -> Lookup {
        let head_only = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Lookup::Full(None),
        };
        // A body, or a scheme other than http(s): the request phase refuses them.
        if req.body().has_body()
            || req
                .uri()
                .scheme_str()
                .is_some_and(|s| s != "http" && s != "https")
        {
            return Lookup::Full(None);
        }
        let mut accept_encoding = false;
        let mut host = None;
        // Every field, once: the Host value is taken here rather than looked up.
        for (name, value) in req.headers() {
            if name == header::HOST {
                if host.is_some() {
                    // Two Host fields: refused by the request phase.
                    return Lookup::Full(None);
                }
                host = Some(value);
            } else if name == header::ACCEPT_ENCODING {
                accept_encoding = true;
            } else if FULL_PATH_FIELDS.contains(name) || CLIENT_CONDITIONALS.contains(name) {
                return Lookup::Full(None);
            }
        }
        // An authority in the target and a Host field: the request phase checks they agree.
        if host.is_some() && req.uri().authority().is_some() {
            return Lookup::Full(None);
        }
        let settings = self.settings.load();
        let Some(key) = key_of(req.uri(), host, req.headers(), &settings) else {
            return Lookup::Full(None);
        };
        let keyed = |key| Lookup::Full(Some((settings.generation, key)));
        if self.engine.may_have_pushed() && self.engine.is_pushed(key.path()) {
            return keyed(key);
        }
        let asked = Asked {
            head_only,
            accept_encoding,
        };
        let Some(hit) = self.engine.fresh_hit(key.hash(), req.headers()) else {
            let Some(hit) = self.engine.fresh_disk_hit(key.hash(), req.headers()) else {
                return keyed(key);
            };
            return match self.disk_step(req.headers(), asked, &hit) {
                Step::Answer(answer) => Lookup::Hit(answer),
                Step::Prepare(_) => Lookup::Unprepared(Box::new(Unprepared {
                    hit: UnpreparedHit::Disk(hit),
                    asked,
                })),
                Step::Full => keyed(key),
            };
        };
        match self.step(req.headers(), asked, &hit) {
            Step::Answer(answer) => Lookup::Hit(answer),
            Step::Prepare(_) => Lookup::Unprepared(Box::new(Unprepared {
                hit: UnpreparedHit::Memory(hit.to_owned()),
                asked,
            })),
            Step::Full => keyed(key),
        }
    }

    /// Prepares the heads an [`Lookup::Unprepared`] hit lacks, then answers it (`None`: the
    /// full path after all).
    pub(super) async fn hit_later(
        &self,
        headers: &HeaderMap,
        unprepared: Box<Unprepared>,
    ) -> Option<FastHit> {
        let Unprepared { hit, asked } = *unprepared;
        let hit = match hit {
            UnpreparedHit::Memory(hit) => hit,
            UnpreparedHit::Disk(hit) => {
                if hit.slot.head().is_none() {
                    let body = self.engine.disk_hit_body(&hit)?;
                    let head = self.prepare_head(
                        hit.key,
                        &hit.meta,
                        hit.meta.headers.clone(),
                        body,
                        (hit.now, hit.now_ms),
                        false,
                        Tier::Disk,
                    );
                    hit.slot.set_head(Box::pin(head).await);
                }
                return match self.disk_step(headers, asked, &hit) {
                    Step::Answer(answer) => Some(answer),
                    Step::Prepare(_) | Step::Full => None,
                };
            }
        };
        // At most twice: the object's head, then its encoded variant's.
        loop {
            // This thread's entry handles are not `Send`: none is held across the await.
            let variant = match self.step(headers, asked, &hit) {
                Step::Answer(answer) => return Some(answer),
                Step::Full => return None,
                Step::Prepare(variant) => variant.map(|v| v.to_arc()),
            };
            // Boxed: this future is part of every request's, which hyper moves.
            let entry = variant.as_deref().unwrap_or(&hit.entry);
            let head = self.prepare_head(
                hit.key,
                hit.meta(),
                entry.obj.meta.headers.clone(),
                entry.obj.body.clone(),
                (hit.now, hit.now_ms),
                variant.is_some(),
                Tier::Memory,
            );
            entry.slot.set_head(Box::pin(head).await);
        }
    }

    /// The answer to a fresh hit from its prepared heads, if they are there.
    fn step<E: Deref<Target = MemEntry>>(
        &self,
        headers: &HeaderMap,
        asked: Asked,
        hit: &FreshHit<E>,
    ) -> Step {
        let Some(head) = hit.entry.slot.head() else {
            return Step::Prepare(None);
        };
        let coding = match head.codings {
            Codings::Ignored => Coding::Identity,
            Codings::FullPath => return Step::Full,
            Codings::Negotiated if asked.accept_encoding => Coding::negotiate(headers),
            Codings::Negotiated => Coding::Identity,
        };
        if coding == Coding::Identity {
            let body = HitBody::Memory(&hit.entry.obj.body);
            let at = (hit.now_ms, hit.ttl_secs());
            return Step::Answer(self.answer(&hit.entry.slot, head, at, body, asked.head_only));
        }
        // An encoded variant: its own entry, with its own prepared head.
        let Some(variant) = self.engine.fresh_encoded(hit, coding) else {
            return Step::Full;
        };
        let Some(head) = variant.slot.head() else {
            return Step::Prepare(Some(variant));
        };
        if !asked.head_only {
            self.compression.count_variant_hit();
        }
        let body = HitBody::Memory(&variant.obj.body);
        let at = (hit.now_ms, hit.ttl_secs());
        Step::Answer(self.answer(&variant.slot, head, at, body, asked.head_only))
    }

    /// The answer to a fresh disk hit from its prepared head, if it is there. Identity only:
    /// an encoded answer takes the full path (which compresses).
    fn disk_step(&self, headers: &HeaderMap, asked: Asked, hit: &DiskFreshHit) -> Step {
        let Some(head) = hit.slot.head() else {
            return Step::Prepare(None);
        };
        let identity = match head.codings {
            Codings::Ignored => true,
            Codings::FullPath => false,
            Codings::Negotiated => {
                !asked.accept_encoding || Coding::negotiate(headers) == Coding::Identity
            }
        };
        if !identity {
            return Step::Full;
        }
        // Read only now that the answer needs it (not for HEAD).
        let body = if asked.head_only {
            Bytes::new()
        } else {
            match self.engine.disk_hit_body(hit) {
                Some(body) => body,
                None => return Step::Full,
            }
        };
        let (at, body) = ((hit.now_ms, hit.ttl_secs()), HitBody::Disk(body));
        Step::Answer(self.answer(&hit.slot, head, at, body, asked.head_only))
    }

    /// The response for one hit: the prepared head plus `Age` and `Cache-Status` for now (`at`:
    /// the hit's time in Unix milliseconds, and its remaining freshness in seconds).
    fn answer(
        &self,
        slot: &HeadSlot,
        head: &PreparedHead,
        (now_ms, ttl): (u64, u64),
        body: HitBody<'_>,
        head_only: bool,
    ) -> FastHit {
        let age = head.age(now_ms);
        let shared = match &body {
            HitBody::Memory(b) => Some(*b),
            HitBody::Disk(_) => None,
        };
        let (headers, kept) = STAMPED.with_borrow_mut(|table| {
            let entry = &mut table.slots[slot.id as usize & (STAMPED_SLOTS - 1)];
            let s = match entry {
                Some(s) if s.entry == slot.id => {
                    if (s.age, s.ttl) != (age, ttl) {
                        (s.age, s.ttl) = (age, ttl);
                        s.headers = self.stamp(head, age, ttl);
                    }
                    s
                }
                _ => {
                    let old = entry.take().and_then(|s| s.body).map_or(0, |b| b.len());
                    let keep = table.bytes.replace(old, shared.map_or(0, |b| b.len()));
                    entry.insert(Stamped {
                        entry: slot.id,
                        age,
                        ttl,
                        headers: self.stamp(head, age, ttl),
                        // The same bytes, counted by this thread alone (see STAMPED).
                        body: shared
                            .filter(|_| keep)
                            .map(|b| Bytes::from_owner(b.clone())),
                    })
                }
            };
            (s.headers.clone(), s.body.clone())
        });
        let tier = match body {
            HitBody::Memory(_) => Tier::Memory,
            HitBody::Disk(_) => Tier::Disk,
        };
        let no_body = head_only
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        let (body, sent) = if no_body {
            (Bytes::new(), 0)
        } else {
            let b = match body {
                HitBody::Memory(b) => kept.unwrap_or_else(|| b.clone()),
                HitBody::Disk(b) => b,
            };
            let n = b.len() as u64;
            (b, n)
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        FastHit {
            response,
            outcome: Outcome {
                cache: CacheStatus::Hit,
                tier,
                upstream: None,
            },
            sent,
        }
    }

    /// `head` finished for one `Age` and ttl, in this thread's own allocations (see
    /// [`STAMPED`]).
    fn stamp(&self, head: &PreparedHead, age: u64, ttl: u64) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(head.headers.len());
        for (name, value) in &head.headers {
            // Standard names and our own are static (no count to share); others are copied, and
            // so are values but the interned ones.
            let name = if [CACHE_STATUS, X_CACHE].contains(name) {
                name.clone()
            } else {
                HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone())
            };
            let mut copy = INTERNED_FIELDS
                .contains(&name)
                .then(|| interned(value))
                .flatten()
                .unwrap_or_else(|| {
                    HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone())
                });
            copy.set_sensitive(value.is_sensitive());
            headers.append(name, copy);
        }
        // Both fields are in the prepared map already: these replace values in place, so the
        // order of fields is the full path's.
        headers.insert(header::AGE, age_value(age));
        let mut ttl_text = itoa::Buffer::new();
        let ttl_text = ttl_text.format(ttl);
        let mut status = String::with_capacity(
            head.cache_status_prefix.len() + self.id.name.len() + HIT_TTL.len() + ttl_text.len(),
        );
        status.push_str(&head.cache_status_prefix);
        push_hit_status(&mut status, &self.id.name, ttl_text);
        if let Ok(v) = HeaderValue::from_str(&status) {
            headers.insert(CACHE_STATUS, v);
        }
        headers
    }

    /// Builds the head of a hit's object (`meta`, with `headers` and `body`: the object's, or
    /// those of an encoded variant of it when `variant`) with the full path's own phases, for a
    /// plain GET at `now` (and in Unix milliseconds).
    #[allow(clippy::too_many_arguments)]
    async fn prepare_head(
        &self,
        key: KeyHash,
        meta: &Arc<CachedMeta>,
        headers: HeaderMap,
        body: Bytes,
        (now, now_ms): (std::time::SystemTime, u64),
        variant: bool,
        tier: Tier,
    ) -> PreparedHead {
        let mut served = Served {
            upstream_time: None,
            key: Some(key),
            status: meta.status,
            headers,
            body: ServedBody::Full(body),
            meta: Some(meta.clone()),
            cache: CacheStatus::Hit,
            tier,
            stored: true,
            upstream_error: None,
            failure: None,
            now,
        };
        let codings = if variant {
            Codings::Ignored
        } else {
            self.compression.codings(&served)
        };
        if codings == Codings::Negotiated {
            // What an identity client gets of a compressible object (the compression phase's
            // answer to a request without Accept-Encoding).
            crate::compress::variant::merge_vary(&mut served.headers);
        }
        let cache_status_prefix = upstream_cache_status(&served.headers);
        let (built, _) =
            respond::build(served, &Method::GET, &HeaderMap::new(), &self.id).into_parts();
        PreparedHead {
            status: built.status,
            headers: built.headers,
            cache_status_prefix,
            codings,
            age_at_ms: policy::age(meta, now).as_millis() as u64,
            at_ms: now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use futures_util::FutureExt;
    use futures_util::future::BoxFuture;
    use http_body_util::{BodyExt, Empty, Full};

    use super::*;
    use crate::cache::clock::Clock;
    use crate::cache::key::{KeyHash, KeyOptions, NormalizedRequest};
    use crate::cache::push_store::PushSpec;
    use crate::cache::upstream::{BoxError, Upstream, UpstreamBody, UpstreamError};
    use crate::cache::{Engine, EngineConfig, PurgeSpec};
    use crate::compress::CompressionConfig;
    use crate::observe::metrics::EdgeMetrics;
    use crate::proxy::respond::Identity;
    use crate::proxy::{Client, RouteSettings};

    const HOST: &str = "site.test";

    type Fields = &'static [(&'static str, &'static str)];

    /// An in-process origin: fixed responses by path; it counts what it is asked.
    struct Origin {
        routes: HashMap<&'static str, (u16, Fields, Bytes)>,
        asked: AtomicU64,
    }

    impl Upstream for Origin {
        fn fetch(
            &self,
            req: Request<UpstreamBody>,
        ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let (status, headers, body) = self.routes.get(req.uri().path()).cloned().unwrap_or((
                404,
                &[],
                Bytes::from_static(b"none"),
            ));
            async move {
                let mut r = Response::new(Full::new(body).map_err(BoxError::from).boxed());
                *r.status_mut() = StatusCode::from_u16(status).expect("status");
                for (k, v) in headers {
                    r.headers_mut().append(*k, HeaderValue::from_static(v));
                }
                Ok(r)
            }
            .boxed()
        }
    }

    struct Setup {
        proxy: Arc<Proxy>,
        origin: Arc<Origin>,
        clock: Clock,
        _dir: tempfile::TempDir,
    }

    async fn setup() -> Setup {
        setup_with_memory(64 << 20).await
    }

    /// `memory`: the engine's `--memory`; at 4 KiB, the memory tier takes objects up to 512
    /// bytes, and larger ones are disk-only.
    async fn setup_with_memory(memory: u64) -> Setup {
        let html: Bytes = "<p>compress me</p>\n".repeat(300).into();
        let mut routes: HashMap<&str, (u16, Fields, Bytes)> = HashMap::new();
        routes.insert(
            "/asset.bin",
            (
                200,
                &[
                    ("cache-control", "public, max-age=100"),
                    ("content-type", "application/octet-stream"),
                    ("etag", "\"v1\""),
                    ("via", "1.1 origin-proxy"),
                    ("cache-status", "origin-cache; hit"),
                    ("surrogate-key", "assets"),
                    ("x-custom", "kept"),
                ],
                Bytes::from_static(b"0123456789"),
            ),
        );
        routes.insert(
            "/page.html",
            (
                200,
                &[
                    ("cache-control", "max-age=100"),
                    ("content-type", "text/html; charset=utf-8"),
                    ("etag", "\"p1\""),
                ],
                html,
            ),
        );
        routes.insert(
            "/blob.bin",
            (
                200,
                &[
                    ("cache-control", "public, max-age=100"),
                    ("content-type", "application/octet-stream"),
                    ("etag", "\"b1\""),
                    ("x-custom", "kept"),
                ],
                Bytes::from(vec![b'b'; 2048]),
            ),
        );
        routes.insert(
            "/large.bin",
            (
                200,
                &[
                    ("cache-control", "public, max-age=100"),
                    ("content-type", "application/octet-stream"),
                ],
                // Over the disk tier's inline bound: a content file of its own.
                Bytes::from(vec![b'l'; 40 << 10]),
            ),
        );
        routes.insert(
            "/gone",
            (
                404,
                &[("cache-control", "max-age=100")],
                Bytes::from_static(b"not here"),
            ),
        );
        let origin = Arc::new(Origin {
            routes,
            asked: AtomicU64::new(0),
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Clock::manual();
        let engine = Engine::open(
            EngineConfig {
                memory_bytes: memory,
                disk: Some((dir.path().to_path_buf(), 64 << 20)),
                max_object_size: 8 << 20,
                surrogate_name: "outpost".into(),
                targeted_cache_control: crate::cache::default_targeted_cache_control(),
                stale_on_error: std::time::Duration::ZERO,
                revalidations_per_sec: 10,
                stale_if_error_wait: std::time::Duration::ZERO,
                send_timeout: std::time::Duration::from_secs(60),
                negative_ttl: Default::default(),
                prefresh: 0.0,
                disk_admission: Default::default(),
            },
            origin.clone(),
            clock.clone(),
        )
        .await
        .expect("engine");
        let id = Identity {
            name: "outpost".into(),
            via: HeaderValue::from_static("1.1 outpost"),
            surrogate_capability: HeaderValue::from_static("outpost=\"Surrogate/1.0\""),
            strip_surrogate_control: true,
            strip_tags: true,
            sets_forwarded_proto: true,
        };
        let proxy = Arc::new(Proxy::new(
            engine,
            origin.clone(),
            id,
            Route::default(),
            EdgeMetrics::new("test"),
            CompressionConfig::default(),
            16 << 20,
        ));
        Setup {
            proxy,
            origin,
            clock,
            _dir: dir,
        }
    }

    fn request(
        method: Method,
        path: &str,
        headers: &[(&'static str, &'static str)],
    ) -> Request<Empty<Bytes>> {
        let mut r = Request::builder()
            .method(method)
            .uri(path)
            .header("host", HOST)
            .body(Empty::new())
            .expect("request");
        for (k, v) in headers {
            r.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        r
    }

    fn peer() -> Client {
        Client {
            addr: "127.0.0.1:1".parse().expect("addr"),
            tls: false,
        }
    }

    async fn body_of(r: Response<RespBody>) -> (StatusCode, HeaderMap, Bytes) {
        let (parts, body) = r.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, body)
    }

    impl Proxy {
        /// The fast path as a request meets it: at once, or after preparing heads.
        async fn fast_hit<B: crate::proxy::RequestBody>(
            &self,
            req: &Request<B>,
        ) -> Option<FastHit> {
            match self.hit_now(req) {
                Lookup::Hit(hit) => Some(hit),
                Lookup::Unprepared(u) => self.hit_later(req.headers(), u).await,
                Lookup::Full(_) => None,
            }
        }
    }

    /// Fetches through the full path until the fast path has the object in memory.
    async fn warm(s: &Setup, path: &str, headers: &[(&'static str, &'static str)]) {
        for _ in 0..200 {
            let r = s
                .proxy
                .handle(request(Method::GET, path, headers), peer())
                .await;
            body_of(r).await;
            if s.proxy
                .fast_hit(&request(Method::GET, path, headers))
                .await
                .is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{path} never became a fast hit");
    }

    /// The fast path's answer, and the full path's answer to the same request.
    async fn both(
        s: &Setup,
        method: Method,
        path: &str,
        headers: &[(&'static str, &'static str)],
    ) -> (
        (StatusCode, HeaderMap, Bytes),
        (StatusCode, HeaderMap, Bytes),
    ) {
        // The manual clock runs on with real time: `Age` and the ttl may cross a second
        // between the two calls. That happens at most once in a few quick tries.
        let mut last = None;
        for _ in 0..3 {
            let fast = s
                .proxy
                .fast_hit(&request(method.clone(), path, headers))
                .await
                .unwrap_or_else(|| panic!("{method} {path} {headers:?}: not a fast hit"));
            let fast = body_of(fast.response).await;
            let full = body_of(
                s.proxy
                    .full_path(request(method.clone(), path, headers), peer(), None)
                    .await,
            )
            .await;
            if fast == full {
                return (fast, full);
            }
            last = Some((fast, full));
        }
        last.expect("three tries")
    }

    /// Files under `dir` of exactly `len` bytes.
    fn files_of_len(dir: &std::path::Path, len: u64) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_of_len(&p, len));
            } else if e.metadata().is_ok_and(|m| m.len() == len) {
                out.push(p);
            }
        }
        out
    }

    /// Each request gets the same answer from the fast path as from the full path.
    async fn same_answers(s: &Setup, cases: &[(Method, &str, Fields)]) {
        for (method, path, headers) in cases {
            let (fast, full) = both(s, method.clone(), path, headers).await;
            assert_eq!(fast, full, "{method} {path} {headers:?}");
        }
    }

    fn secs(headers: &HeaderMap, name: &str) -> u64 {
        headers[name]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds")
    }

    /// hyper moves each request's future a few times before and while polling it: the future
    /// of a hit must stay small, so the full path's (several KiB) is boxed.
    #[tokio::test]
    async fn a_request_future_is_small() {
        let s = setup().await;
        let f = s
            .proxy
            .handle(request(Method::GET, "/page.html", &[]), peer());
        assert!(
            size_of_val(&f) <= 2048,
            "handle's future is {} bytes",
            size_of_val(&f)
        );
    }

    /// The data port answers a prepared hit within hyper's call to its service: no future,
    /// and the request is dropped there (see `Proxy::start`).
    #[tokio::test]
    async fn a_hit_is_answered_at_once_once_its_head_is_prepared() {
        let s = setup().await;
        let get = || request(Method::GET, "/asset.bin", &[]);
        assert!(matches!(s.proxy.hit_now(&get()), Lookup::Full(_)), "cold");
        // Until the object is in memory (this origin sends no Content-Length: a disk hit
        // promotes it); no fast-path lookup has prepared its head yet.
        let mut lookup = Lookup::Full(None);
        for _ in 0..200 {
            body_of(s.proxy.handle(get(), peer()).await).await;
            lookup = s.proxy.hit_now(&get());
            if !matches!(lookup, Lookup::Full(_)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(lookup, Lookup::Unprepared(_)));
        let Err(pending) = s.proxy.start(get(), peer()) else {
            panic!("answered before its head was prepared");
        };
        let (status, headers, body) = body_of(s.proxy.finish(pending).await).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"0123456789"[..]));
        assert_eq!(headers[X_CACHE], "HIT");
        for _ in 0..3 {
            let Ok(resp) = s.proxy.start(get(), peer()) else {
                panic!("a prepared hit waits");
            };
            let (status, headers, body) = body_of(resp).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"0123456789"[..]));
            assert_eq!(headers[X_CACHE], "HIT");
        }
        assert_eq!(s.origin.asked.load(Ordering::SeqCst), 1);
        // A request the prepared head does not cover still takes the full path.
        let conditional = request(Method::GET, "/asset.bin", &[("if-none-match", "\"v1\"")]);
        let Err(pending) = s.proxy.start(conditional, peer()) else {
            panic!("a conditional request answered from the prepared head");
        };
        let (status, _, _) = body_of(s.proxy.finish(pending).await).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
    }

    /// Objects the memory tier does not take are answered from the disk tier on the fast path
    /// once hit (their metadata held, their inline body read moments ago), exactly as the full
    /// path answers them; encoded answers, stale and purged objects take the full path.
    #[tokio::test]
    async fn disk_fast_hits_answer_exactly_like_the_full_path() {
        let s = setup_with_memory(4 << 10).await;
        warm(&s, "/blob.bin", &[]).await;
        warm(&s, "/large.bin", &[]).await;
        warm(&s, "/page.html", &[]).await;
        let asked = s.origin.asked.load(Ordering::SeqCst);
        s.clock.advance(Duration::from_secs(7));

        let hit = s
            .proxy
            .fast_hit(&request(Method::GET, "/blob.bin", &[]))
            .await
            .expect("a fast hit");
        assert_eq!(hit.outcome.tier, Tier::Disk, "answered from the disk tier");
        assert_eq!(hit.sent, 2048);
        let large = s
            .proxy
            .fast_hit(&request(Method::GET, "/large.bin", &[]))
            .await
            .expect("a fast hit on a content file");
        assert_eq!((large.outcome.tier, large.sent), (Tier::Disk, 40 << 10));
        let cases: [(Method, &str, Fields); 5] = [
            (Method::GET, "/blob.bin", &[]),
            (Method::HEAD, "/blob.bin", &[]),
            (Method::GET, "/large.bin", &[]),
            (Method::GET, "/page.html", &[]),
            (
                Method::GET,
                "/page.html",
                &[("accept-encoding", "identity")],
            ),
        ];
        same_answers(&s, &cases).await;
        let (fast, _) = both(&s, Method::GET, "/blob.bin", &[]).await;
        assert!((7..=8).contains(&secs(&fast.1, "age")), "{:?}", fast.1);
        assert_eq!(fast.1["x-custom"], "kept");
        assert_eq!(fast.2, vec![b'b'; 2048]);
        let (fast, _) = both(&s, Method::GET, "/page.html", &[]).await;
        assert_eq!(fast.1["vary"], "Accept-Encoding");
        assert!(fast.1.get("content-encoding").is_none());
        assert_eq!(
            s.origin.asked.load(Ordering::SeqCst),
            asked,
            "every answer was a hit"
        );

        // A content file damaged in place is never answered: the fast path declines, and the
        // full path drops the copy and fetches it again.
        let file = files_of_len(s._dir.path(), 40 << 10)
            .pop()
            .expect("the content file");
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        assert!(
            s.proxy
                .fast_hit(&request(Method::GET, "/large.bin", &[]))
                .await
                .is_none(),
            "a damaged body on the fast path"
        );
        let (status, headers, body) = body_of(
            s.proxy
                .handle(request(Method::GET, "/large.bin", &[]), peer())
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-cache"], "MISS");
        assert_eq!(body, vec![b'l'; 40 << 10]);
        assert_eq!(
            s.origin.asked.load(Ordering::SeqCst),
            asked + 1,
            "fetched again"
        );

        // A client that takes gzip gets it from the full path.
        let gzip = request(Method::GET, "/page.html", &[("accept-encoding", "gzip")]);
        assert!(matches!(s.proxy.hit_now(&gzip), Lookup::Full(_)));
        // Purged: the full path (a miss).
        s.proxy
            .engine
            .purge(&PurgeSpec {
                urls: vec![format!("http://{HOST}/blob.bin")],
                ..Default::default()
            })
            .await
            .expect("purge");
        assert!(
            s.proxy
                .fast_hit(&request(Method::GET, "/blob.bin", &[]))
                .await
                .is_none(),
            "a purged object on the fast path"
        );
        // Stale: the full path.
        s.clock.advance(Duration::from_secs(100));
        assert!(
            s.proxy
                .fast_hit(&request(Method::GET, "/page.html", &[]))
                .await
                .is_none(),
            "a stale object on the fast path"
        );
    }

    #[tokio::test]
    async fn fast_hits_answer_exactly_like_the_full_path() {
        let s = setup().await;
        warm(&s, "/asset.bin", &[]).await;
        warm(&s, "/gone", &[]).await;
        warm(&s, "/page.html", &[]).await;
        warm(&s, "/page.html", &[("accept-encoding", "gzip, br")]).await;
        let asked = s.origin.asked.load(Ordering::SeqCst);
        s.clock.advance(Duration::from_secs(7));

        let cases: [(Method, &str, Fields); 6] = [
            (Method::GET, "/asset.bin", &[]),
            (Method::HEAD, "/asset.bin", &[]),
            (Method::GET, "/gone", &[]),
            (Method::GET, "/page.html", &[]),
            (
                Method::GET,
                "/page.html",
                &[("accept-encoding", "br;q=1, gzip;q=0.5")],
            ),
            (Method::HEAD, "/page.html", &[("accept-encoding", "br")]),
        ];
        same_answers(&s, &cases).await;
        assert_eq!(
            s.origin.asked.load(Ordering::SeqCst),
            asked,
            "every answer was a hit"
        );

        // What the comparison covered.
        let (fast, _) = both(&s, Method::GET, "/asset.bin", &[]).await;
        assert!((7..=8).contains(&secs(&fast.1, "age")), "{:?}", fast.1);
        let status = fast.1["cache-status"].to_str().expect("ascii");
        let ttl: u64 = status
            .strip_prefix("origin-cache; hit, outpost; hit; ttl=")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("cache-status: {status}"));
        assert!((91..=93).contains(&ttl), "{status}");
        assert_eq!(fast.1["x-cache"], "HIT");
        assert_eq!(fast.1["x-custom"], "kept");
        assert!(
            fast.1.get("surrogate-key").is_none(),
            "tags are stripped at the edge"
        );
        let via: Vec<_> = fast.1.get_all("via").iter().collect();
        assert_eq!(via, ["1.1 origin-proxy", "1.1 outpost"]);
        assert_eq!(fast.2, "0123456789");
        let (fast, _) = both(&s, Method::GET, "/page.html", &[("accept-encoding", "br")]).await;
        assert_eq!(fast.1["content-encoding"], "br");
        assert_eq!(fast.1["vary"], "Accept-Encoding");
        let (fast, _) = both(&s, Method::GET, "/page.html", &[]).await;
        assert!(fast.1.get("content-encoding").is_none());
        assert_eq!(fast.1["vary"], "Accept-Encoding");
        let (fast, _) = both(&s, Method::GET, "/gone", &[]).await;
        assert_eq!(fast.0, StatusCode::NOT_FOUND);
        assert_eq!(fast.2, "not here");

        // Age keeps growing with the clock, from the same prepared head.
        s.clock.advance(Duration::from_secs(30));
        let (fast, full) = both(&s, Method::GET, "/asset.bin", &[]).await;
        assert_eq!(fast, full);
        assert!((37..=38).contains(&secs(&fast.1, "age")), "{:?}", fast.1);
    }

    #[tokio::test]
    async fn the_full_path_keeps_what_the_prepared_head_does_not_cover() {
        let s = setup().await;
        warm(&s, "/asset.bin", &[]).await;
        warm(&s, "/page.html", &[]).await;
        for headers in [
            &[("range", "bytes=0-3")][..],
            &[("if-none-match", "\"v1\"")],
            &[("if-modified-since", "Tue, 01 Jul 2025 10:00:00 GMT")],
            &[("cache-control", "max-age=0")],
            &[("pragma", "no-cache")],
            &[("authorization", "Bearer x")],
        ] {
            let r = s
                .proxy
                .fast_hit(&request(Method::GET, "/asset.bin", headers))
                .await;
            assert!(r.is_none(), "{headers:?} must take the full path");
        }
        let post = s
            .proxy
            .fast_hit(&request(Method::POST, "/asset.bin", &[]))
            .await;
        assert!(post.is_none());
        // A compressible object whose encoded variant is not in memory yet.
        let gz = s
            .proxy
            .fast_hit(&request(
                Method::GET,
                "/page.html",
                &[("accept-encoding", "gzip")],
            ))
            .await;
        assert!(
            gz.is_none(),
            "the full path compresses and stores the variant first"
        );

        // A purge ends fast hits at once.
        s.proxy
            .engine
            .purge(&PurgeSpec {
                tags: vec!["assets".into()],
                ..Default::default()
            })
            .await
            .expect("purge");
        assert!(
            s.proxy
                .fast_hit(&request(Method::GET, "/asset.bin", &[]))
                .await
                .is_none()
        );

        // So does staleness.
        s.clock.advance(Duration::from_secs(101));
        assert!(
            s.proxy
                .fast_hit(&request(Method::GET, "/page.html", &[]))
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_pushed_path_is_never_answered_from_the_cached_object() {
        let s = setup().await;
        warm(&s, "/page.html", &[]).await;
        let spec = PushSpec {
            path: "/page.html".into(),
            content_type: "text/plain".into(),
            cache_control: "max-age=60".into(),
            tags: vec![],
            content_length: None,
        };
        let body =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"pushed"))]);
        s.proxy.engine.push(spec, body).await.expect("push");
        assert!(
            s.proxy
                .fast_hit(&request(Method::GET, "/page.html", &[]))
                .await
                .is_none()
        );
        let r = s
            .proxy
            .handle(request(Method::GET, "/page.html", &[]), peer())
            .await;
        assert_eq!(body_of(r).await.2, "pushed");
    }

    #[test]
    fn the_key_memo_follows_the_settings_and_normalises_like_the_full_path() {
        let uri = |u: &str| u.parse::<http::Uri>().expect("uri");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("Site.Test"));
        let ignoring = RouteSettings::of(Route {
            key_opts: KeyOptions {
                ignore_query_params: vec!["utm_*".into()],
                ..Default::default()
            },
            ..Default::default()
        });
        let keeping = RouteSettings::of(Route::default());
        let target = uri("/p?utm_source=x&b=2&a=1");
        for _ in 0..2 {
            // The second round comes from the memo.
            let k = key_of(&target, h.get(header::HOST), &h, &ignoring).expect("key");
            assert_eq!(k.hash(), KeyHash::of("site.test/p?a=1&b=2"));
            assert_eq!(k.path(), "/p?a=1&b=2");
            // Exactly the key the full path builds, so it can take this one over.
            let full = NormalizedRequest::new(&Method::GET, &target, &h, &ignoring.route.key_opts);
            assert_eq!(k, full.expect("normalised").key);
            let k = key_of(&target, h.get(header::HOST), &h, &keeping).expect("key");
            assert_eq!(k.hash(), KeyHash::of("site.test/p?a=1&b=2&utm_source=x"));
            assert_eq!(k.path(), "/p?a=1&b=2&utm_source=x");
        }
        // The raw target is the memo's key: another Host is another entry.
        let mut other = HeaderMap::new();
        other.insert(header::HOST, HeaderValue::from_static("other.test"));
        let k = key_of(&target, other.get(header::HOST), &other, &ignoring).expect("key");
        assert_eq!(k.hash(), KeyHash::of("other.test/p?a=1&b=2"));
        // Targets the full path rejects are never remembered.
        assert!(key_of(&uri("/p"), None, &HeaderMap::new(), &ignoring).is_none());
    }

    #[test]
    fn interned_values_are_the_same_bytes_and_bounded() {
        let v = HeaderValue::from_static("text/css; charset=utf-8");
        let copy = HeaderValue::from_bytes(v.as_bytes()).expect("value");
        let (a, b) = (
            interned(&copy).expect("interned"),
            interned(&v).expect("interned"),
        );
        assert_eq!((&a, &b), (&v, &v));
        // The same leaked bytes both times.
        assert_eq!(a.as_bytes().as_ptr(), b.as_bytes().as_ptr());
        // Bytes `from_static` refuses, and long values, are left to be copied.
        let obs_text = HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text");
        assert!(interned(&obs_text).is_none());
        let long = HeaderValue::from_str(&"x".repeat(INTERNED_LEN_MAX + 1)).expect("value");
        assert!(interned(&long).is_none());
    }

    #[test]
    fn age_values_from_the_table_and_beyond() {
        for n in [0, 1, 59, 3599, 3600, 86_400] {
            assert_eq!(age_value(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn age_grows_from_the_prepared_value() {
        let at = 1_000_000;
        let head = PreparedHead {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            cache_status_prefix: String::new(),
            codings: Codings::Ignored,
            age_at_ms: 2_500,
            at_ms: at,
        };
        assert_eq!(head.age(at), 2);
        assert_eq!(head.age(at + 499), 2);
        assert_eq!(head.age(at + 500), 3);
        assert_eq!(head.age(at + 3_600_000), 3602);
        // A clock stepping back never makes the age smaller than it was prepared with.
        assert_eq!(head.age(at - 5_000), 2);
    }
}
