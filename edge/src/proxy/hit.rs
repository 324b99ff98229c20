//! The hit fast path: a GET or HEAD that a fresh memory-tier object answers as it stands.
//!
//! The full path normalises the request (a header map clone and an absolute URI), asks the
//! engine, runs the compression and respond phases and formats every header again. For the
//! common hit none of that changes from one request to the next, so the response head is built
//! once per stored object, by those same phases ([`respond::build`]), and kept in the object's
//! memory entry ([`PreparedHead`]). A hit then costs: the key text and its hash, one moka
//! lookup, a header map clone, and two header values that change with time (`Age` and the
//! `Cache-Status` ttl).
//!
//! Anything the prepared head does not cover takes the full path, which gives the same answer:
//! request directives (Cache-Control, Pragma), credentials, conditionals and ranges, pushed
//! paths, stale or purged objects, and encoded variants not in memory yet.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::Proxy;
use super::headers::CACHE_STATUS;
use super::respond::{self, Outcome, RespBody, full, push_hit_status, upstream_cache_status};
use crate::cache::hit::{Codings, FreshHit, PreparedHead};
use crate::cache::key::{Coding, key_text};
use crate::cache::memory::MemEntry;
use crate::cache::policy;
use crate::cache::status::{CacheStatus, Tier};
use crate::cache::{Served, ServedBody};

/// Request fields that make a hit depend on more than the stored object: freshness
/// directives, credentials, conditionals and ranges.
const FULL_PATH_FIELDS: [HeaderName; 9] = [
    header::CACHE_CONTROL,
    header::PRAGMA,
    header::AUTHORIZATION,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// A fast-path answer: the response, what the cache did, and the body bytes it sends.
pub(super) struct FastHit {
    pub response: Response<RespBody>,
    pub outcome: Outcome,
    pub sent: u64,
}

impl Proxy {
    /// Answers a fresh memory hit, or `None` for the full path. No side effects but counters.
    pub(super) async fn fast_hit<B>(&self, req: &Request<B>) -> Option<FastHit> {
        let head_only = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        let mut accept_encoding = false;
        for name in req.headers().keys() {
            if name == header::ACCEPT_ENCODING {
                accept_encoding = true;
            } else if FULL_PATH_FIELDS.contains(name) {
                return None;
            }
        }
        let text = key_text(req.uri(), req.headers(), &self.settings.load().key_opts).ok()?;
        let hit = self.engine.fresh_hit(&text, req.headers()).await?;
        let head = match hit.entry.head() {
            Some(h) => h,
            None => hit.entry.set_head(self.prepare(&hit, None).await),
        };
        let coding = match head.codings {
            Codings::Ignored => Coding::Identity,
            Codings::FullPath => return None,
            Codings::Negotiated if accept_encoding => Coding::negotiate(req.headers()),
            Codings::Negotiated => Coding::Identity,
        };
        if coding == Coding::Identity {
            return Some(self.answer(&hit, &hit.entry, head, head_only));
        }
        // An encoded variant: its own entry, with its own prepared head.
        let variant = self.engine.fresh_encoded(&hit, coding).await?;
        let head = match variant.head() {
            Some(h) => h,
            None => variant.set_head(self.prepare(&hit, Some(&variant)).await),
        };
        if !head_only {
            self.compression.count_variant_hit();
        }
        Some(self.answer(&hit, &variant, head, head_only))
    }

    /// The response for one hit: the prepared head plus `Age` and `Cache-Status` for now.
    fn answer(
        &self,
        hit: &FreshHit,
        entry: &MemEntry,
        head: &PreparedHead,
        head_only: bool,
    ) -> FastHit {
        let mut headers = head.headers.clone();
        // Both fields are in the prepared map already: these replace values in place, so the
        // cloned map never grows.
        headers.insert(header::AGE, HeaderValue::from(head.age(hit.now)));
        let mut status =
            String::with_capacity(head.cache_status_prefix.len() + self.id.name.len() + 24);
        status.push_str(&head.cache_status_prefix);
        push_hit_status(&mut status, &self.id.name, hit.ttl_secs());
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(status)) {
            headers.insert(CACHE_STATUS, v);
        }
        let no_body = head_only
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        let (body, sent) = if no_body {
            (Bytes::new(), 0)
        } else {
            let b = entry.obj.body.clone();
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
                tier: Tier::Memory,
                upstream: None,
            },
            sent,
        }
    }

    /// Builds the head of the hit's object, or of an encoded variant of it, with the full
    /// path's own phases, for a plain GET at the hit's time.
    async fn prepare(&self, hit: &FreshHit, variant: Option<&MemEntry>) -> PreparedHead {
        let meta = hit.meta().clone();
        let entry = variant.unwrap_or(&hit.entry);
        let mut served = Served {
            upstream_time: None,
            key: Some(hit.key),
            status: meta.status,
            headers: entry.obj.meta.headers.clone(),
            body: ServedBody::Full(entry.obj.body.clone()),
            meta: Some(meta.clone()),
            cache: CacheStatus::Hit,
            tier: Tier::Memory,
            stored: true,
            upstream_error: None,
            now: hit.now,
        };
        let codings = if variant.is_some() {
            Codings::Ignored
        } else {
            self.compression.codings(&served)
        };
        if codings == Codings::Negotiated {
            // What an identity client gets of a compressible object.
            served = self
                .compression
                .apply(&self.engine, served, &Method::GET, &HeaderMap::new())
                .await;
        }
        let cache_status_prefix = upstream_cache_status(&served.headers);
        let (built, _) =
            respond::build(served, &Method::GET, &HeaderMap::new(), &self.id).into_parts();
        PreparedHead {
            status: built.status,
            headers: built.headers,
            cache_status_prefix,
            codings,
            age_at: policy::age(&meta, hit.now),
            at: hit.now,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn age_grows_from_the_prepared_value() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let head = PreparedHead {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            cache_status_prefix: String::new(),
            codings: Codings::Ignored,
            age_at: Duration::from_millis(2_500),
            at,
        };
        assert_eq!(head.age(at), 2);
        assert_eq!(head.age(at + Duration::from_millis(499)), 2);
        assert_eq!(head.age(at + Duration::from_millis(500)), 3);
        // A clock stepping back never makes the age smaller than it was prepared with.
        assert_eq!(head.age(at - Duration::from_secs(5)), 2);
    }
}
