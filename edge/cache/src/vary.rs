//! Vary (RFC 9111 §4.1): which request fields select among the stored variants of a URL. The
//! index maps a primary key to the field names its responses nominate and the variant keys
//! stored under them: at most [`MAX_VARIANTS`] per URL, and only URLs with a variant stored
//! (or registered lately), as the engine prunes it ([`VaryIndex::prune`]).
//!
//! Every lookup asks it, hits included. A concurrent map's read takes its shard's lock: an
//! atomic write to a cache line that every core serving the URL writes too. So each thread
//! remembers recent answers ([`MEMO`]), valid while the generation of the key's group is
//! unchanged. A group's generation moves only when the names of one of its primary keys
//! change (a new URL with Vary, a change of Vary, an invalidation), not when a variant is
//! added; keys fall in [`GROUPS`] groups, so such a change forgets a small part of the memos.
//! A pruning pass that forgets many URLs (at most once a minute) may forget them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderName};

use super::key::{Coding, KeyHash, KeyHasher};

struct VaryEntry {
    names: Arc<[HeaderName]>,
    /// The oldest first, at most [`MAX_VARIANTS`].
    variants: Vec<KeyHash>,
    /// When a response last registered a variant (engine clock, ms since the epoch): a
    /// variant registered lately may still be on its way to the tiers, and [`VaryIndex::prune`]
    /// leaves the entry alone for [`PRUNE_AFTER_MS`].
    registered_ms: u64,
}

/// Variants kept per URL (Apache Traffic Server keeps 5 alternates by default, Fastly about
/// 200): a response that would add one more evicts the oldest from the cache, so a field a
/// client chooses freely (`Vary: User-Agent`, `Vary: Cookie`) cannot grow one URL's entry,
/// or the work of registering under it, without bound.
pub(super) const MAX_VARIANTS: usize = 32;

/// How long a registration protects its entry from [`VaryIndex::prune`]. A fill in flight
/// protects its variant anyway (the engine counts it as held until its copy is stored), so
/// this only covers the moments around a fill's start.
pub(super) const PRUNE_AFTER_MS: u64 = 60 * 1000;

/// Primary keys with Vary, their names and their stored variants.
pub(super) struct VaryIndex {
    map: DashMap<KeyHash, VaryEntry, KeyHasher>,
    /// Per group of primary keys: changes whenever the names of one of its keys change.
    /// Values are unique in the process, so a thread's memo never mistakes another index's
    /// answers (several nodes in one process) for this one's.
    generations: Box<[AtomicU64]>,
}

/// Groups of primary keys with a generation of their own (a power of two).
const GROUPS: usize = 64;

/// Source of index generations.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Entries in each thread's memo (a power of two).
const MEMO_SLOTS: usize = 256;

/// One remembered answer.
struct Memo {
    generation: u64,
    primary: KeyHash,
    /// The names, or `None`: no Vary (the object is stored under its primary key).
    names: Option<Arc<[HeaderName]>>,
    /// When the names are exactly `Accept-Encoding` (the common case), the variant key for
    /// each negotiated coding: the key depends on nothing else.
    by_coding: [Option<KeyHash>; 3],
}

thread_local! {
    /// Recent answers of this thread, direct-mapped by primary key.
    static MEMO: std::cell::RefCell<Vec<Option<Memo>>> =
        std::cell::RefCell::new((0..MEMO_SLOTS).map(|_| None).collect());
}

fn coding_index(c: Coding) -> usize {
    match c {
        Coding::Br => 0,
        Coding::Gzip => 1,
        Coding::Identity => 2,
    }
}

impl Default for VaryIndex {
    fn default() -> Self {
        Self {
            map: DashMap::with_hasher(KeyHasher::default()),
            generations: (0..GROUPS)
                .map(|_| AtomicU64::new(GENERATIONS.fetch_add(1, Ordering::Relaxed)))
                .collect(),
        }
    }
}

impl VaryIndex {
    fn generation(&self, primary: KeyHash) -> &AtomicU64 {
        // Not the bits the memo's slot comes from: keys of one slot spread over the groups.
        &self.generations[(primary.first_u64() >> 32) as usize & (GROUPS - 1)]
    }

    /// Called after the names of `primary` changed (the map already holds the change). The new
    /// value was never used before: a memo made under any earlier one no longer matches.
    fn names_changed(&self, primary: KeyHash) {
        self.generation(primary).store(
            GENERATIONS.fetch_add(1, Ordering::Relaxed),
            Ordering::Release,
        );
    }

    /// The key a request's variant is stored under: the primary key itself when its responses
    /// have no Vary.
    pub fn variant_of(&self, primary: KeyHash, headers: &HeaderMap) -> KeyHash {
        let generation = self.generation(primary).load(Ordering::Acquire);
        let slot = primary.first_u64() as usize & (MEMO_SLOTS - 1);
        MEMO.with_borrow_mut(|memo| {
            let m = match &mut memo[slot] {
                Some(m) if m.generation == generation && m.primary == primary => m,
                s => s.insert(Memo {
                    generation,
                    primary,
                    names: self.map.get(&primary).map(|e| e.names.clone()),
                    by_coding: [None; 3],
                }),
            };
            let Some(names) = &m.names else {
                return primary;
            };
            if let [only] = &names[..]
                && only == header::ACCEPT_ENCODING
            {
                let c = coding_index(Coding::negotiate(headers));
                *m.by_coding[c].get_or_insert_with(|| primary.variant(names, headers))
            } else {
                primary.variant(names, headers)
            }
        })
    }

    /// Records the names a response for `primary` nominates (at `now_ms`); returns the key of
    /// this request's variant, and the variants it dropped from the entry, which the caller
    /// removes from the tiers: all of them when the names changed (kept, they would be found
    /// again should the names come back, past invalidations the index no longer covered),
    /// else the one pushed out by [`MAX_VARIANTS`] (one no tier holds, as `stored` says,
    /// else the oldest).
    pub fn register(
        &self,
        primary: KeyHash,
        names: &[HeaderName],
        headers: &HeaderMap,
        now_ms: u64,
        stored: impl Fn(&KeyHash) -> bool,
    ) -> (KeyHash, Vec<KeyHash>) {
        if names.is_empty() {
            return match self.map.remove(&primary) {
                Some((_, e)) => {
                    self.names_changed(primary);
                    (primary, e.variants)
                }
                None => (primary, Vec::new()),
            };
        }
        let variant = primary.variant(names, headers);
        let mut changed = false;
        let dropped = {
            let mut e = self.map.entry(primary).or_insert_with(|| {
                changed = true;
                VaryEntry {
                    names: names.into(),
                    variants: Vec::new(),
                    registered_ms: now_ms,
                }
            });
            let mut dropped = Vec::new();
            if &*e.names != names {
                e.names = names.into();
                dropped = std::mem::take(&mut e.variants);
                changed = true;
            }
            e.registered_ms = e.registered_ms.max(now_ms);
            add_variant(&mut e.variants, variant);
            if e.variants.len() > MAX_VARIANTS {
                // Not the new one (the last).
                let older = &e.variants[..e.variants.len() - 1];
                let at = older.iter().position(|v| !stored(v)).unwrap_or(0);
                dropped.push(e.variants.remove(at));
            }
            dropped.retain(|v| *v != variant);
            dropped
        };
        if changed {
            self.names_changed(primary);
        }
        (variant, dropped)
    }

    /// Records a variant found on disk at start-up. The load finds the newest copies first,
    /// so each goes before those found so far (the oldest stay first, for the cap). Not
    /// capped: an encoded copy (`br`, `gzip`) of a variant comes as one too, and a response
    /// registered later pushes out one at a time.
    pub fn restore(&self, primary: KeyHash, names: Arc<[HeaderName]>, variant: KeyHash) {
        let mut e = self.map.entry(primary).or_insert_with(|| VaryEntry {
            names,
            variants: Vec::new(),
            registered_ms: 0,
        });
        if !e.variants.contains(&variant) {
            e.variants.insert(0, variant);
        }
        drop(e);
        self.names_changed(primary);
    }

    /// Forgets up to `limit` URLs none of whose variants `stored` says is held (by a tier, or
    /// by a fill on its way to one), except those registered at or after `before_ms` (see
    /// [`PRUNE_AFTER_MS`]). Without it the index kept every URL with Vary ever stored: each
    /// new URL (a query string a client makes up) added ~200 bytes that nothing counted or
    /// took back. The URLs are found under each shard's read lock (lookups go on; a response
    /// registering waits), then each is removed only if that still holds. Returns the URLs
    /// it forgot.
    pub fn prune(
        &self,
        stored: impl Fn(&KeyHash) -> bool,
        before_ms: u64,
        limit: usize,
    ) -> Vec<KeyHash> {
        // Held under the primary key too: the first fill of a URL, before its names were
        // known, runs under it.
        let unheld = |p: &KeyHash, e: &VaryEntry| {
            e.registered_ms < before_ms && !stored(p) && !e.variants.iter().any(&stored)
        };
        let candidates: Vec<KeyHash> = self
            .map
            .iter()
            .filter(|e| unheld(e.key(), e.value()))
            .map(|e| *e.key())
            .take(limit)
            .collect();
        let mut forgotten = Vec::new();
        for primary in candidates {
            if self.map.remove_if(&primary, |p, e| unheld(p, e)).is_some() {
                self.names_changed(primary);
                forgotten.push(primary);
            }
        }
        forgotten
    }

    /// URLs with Vary the index knows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Records the names stored for `primary` on disk, found before the start-up load reached
    /// its variants; returns the key of this request's variant, registered as one of the
    /// URL's: a copy this request finds there (and promotes into memory) is then one an
    /// invalidation of the URL removes.
    pub fn restore_names(
        &self,
        primary: KeyHash,
        names: Arc<[HeaderName]>,
        headers: &HeaderMap,
    ) -> KeyHash {
        self.map.entry(primary).or_insert_with(|| VaryEntry {
            names,
            variants: Vec::new(),
            registered_ms: 0,
        });
        self.names_changed(primary);
        let variant = self.variant_of(primary, headers);
        if variant != primary
            && let Some(mut e) = self.map.get_mut(&primary)
        {
            add_variant(&mut e.variants, variant);
        }
        variant
    }

    /// Forgets a primary key; returns the variant keys it had.
    pub fn remove(&self, primary: KeyHash) -> Vec<KeyHash> {
        match self.map.remove(&primary) {
            Some((_, e)) => {
                self.names_changed(primary);
                e.variants
            }
            None => Vec::new(),
        }
    }

    pub fn contains(&self, primary: KeyHash) -> bool {
        self.map.contains_key(&primary)
    }
}

/// Adds `variant` (the newest, last) unless present.
fn add_variant(variants: &mut Vec<KeyHash>, variant: KeyHash) {
    if !variants.contains(&variant) {
        variants.push(variant);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// The memo answers exactly like the map, through every change of names, on the thread
    /// that remembered the old answer.
    #[test]
    fn remembered_answers_follow_every_change() {
        let index = VaryIndex::default();
        let other = VaryIndex::default();
        let p = KeyHash::of("site.test/a");
        let br = headers(&[("accept-encoding", "br, gzip"), ("accept-language", "de")]);
        let gz = headers(&[("accept-encoding", "gzip"), ("accept-language", "fr")]);
        let ae = [header::ACCEPT_ENCODING];
        let lang = [header::ACCEPT_LANGUAGE];
        for _ in 0..2 {
            assert_eq!(index.variant_of(p, &br), p, "no Vary yet");
        }
        let v_br = index.register(p, &ae, &br, 0, |_| true).0;
        assert_eq!(v_br, p.variant(&ae, &br));
        for _ in 0..2 {
            assert_eq!(index.variant_of(p, &br), v_br);
            assert_eq!(index.variant_of(p, &gz), p.variant(&ae, &gz));
            assert_eq!(other.variant_of(p, &br), p, "another index");
        }
        // Another variant under the same names: no change of generation needed.
        let before = index.generation(p).load(Ordering::Relaxed);
        index.register(p, &ae, &gz, 0, |_| true);
        assert_eq!(index.generation(p).load(Ordering::Relaxed), before);
        // A new URL with Vary in another group leaves this key's memos alone.
        let q = (0..)
            .map(|i| KeyHash::of(&format!("site.test/q{i}")))
            .find(|q| !std::ptr::eq(index.generation(*q), index.generation(p)))
            .expect("a key in another group");
        index.register(q, &ae, &br, 0, |_| true);
        assert_eq!(index.generation(p).load(Ordering::Relaxed), before);
        assert_eq!(index.variant_of(q, &br), q.variant(&ae, &br));
        // The names change.
        index.register(p, &lang, &gz, 0, |_| true);
        assert_eq!(index.variant_of(p, &br), p.variant(&lang, &br));
        assert_ne!(index.variant_of(p, &br), index.variant_of(p, &gz));
        // A response without Vary, then an invalidation.
        index.register(p, &[], &gz, 0, |_| true);
        assert_eq!(index.variant_of(p, &br), p);
        index.register(p, &ae, &br, 0, |_| true);
        assert_eq!(index.variant_of(p, &br), v_br);
        assert_eq!(index.remove(p), vec![v_br]);
        assert_eq!(index.variant_of(p, &br), p);
        assert!(!index.contains(p));
    }

    /// Pruning forgets the URLs none of whose variants is stored, unless registered lately,
    /// and their names with them (a remembered answer included); a URL keeps only the
    /// variants still stored.
    #[test]
    fn pruning_forgets_urls_without_stored_variants() {
        let index = VaryIndex::default();
        let ae = [header::ACCEPT_ENCODING];
        let br = headers(&[("accept-encoding", "br")]);
        let gz = headers(&[("accept-encoding", "gzip")]);
        let (gone, kept, recent) = (
            KeyHash::of("site.test/gone"),
            KeyHash::of("site.test/kept"),
            KeyHash::of("site.test/recent"),
        );
        let gone_br = index.register(gone, &ae, &br, 1_000, |_| true).0;
        let kept_br = index.register(kept, &ae, &br, 1_000, |_| true).0;
        let kept_gz = index.register(kept, &ae, &gz, 1_000, |_| true).0;
        index.register(recent, &ae, &br, 5_000, |_| true);
        assert_eq!(index.variant_of(gone, &br), gone_br, "remembered");
        let stored = |k: &KeyHash| *k == kept_gz;
        assert_eq!(index.prune(stored, 2_000, 100), vec![gone]);
        assert_eq!(index.len(), 2);
        assert!(!index.contains(gone));
        assert_eq!(index.variant_of(gone, &br), gone, "its names are forgotten");
        assert_eq!(index.variant_of(kept, &br), kept_br, "names kept");
        assert_eq!(index.remove(kept), vec![kept_br, kept_gz]);
        assert!(index.contains(recent));
        assert_eq!(index.prune(|_| false, 6_000, 100), vec![recent]);
        assert_eq!(index.len(), 0);
        // At most `limit` a pass.
        for i in 0..5 {
            index.register(KeyHash::of(&format!("site.test/{i}")), &ae, &br, 0, |_| {
                true
            });
        }
        assert_eq!(index.prune(|_| false, 1, 3).len(), 3);
        assert_eq!(index.prune(|_| false, 1, 3).len(), 2);
    }

    /// A URL keeps at most [`MAX_VARIANTS`]: one more pushes out one no tier holds, else the
    /// oldest.
    #[test]
    fn a_url_keeps_at_most_max_variants() {
        let index = VaryIndex::default();
        let p = KeyHash::of("site.test/ua");
        let names = [header::USER_AGENT];
        let variant = |i: usize| {
            let ua = format!("agent {i}");
            let mut h = HeaderMap::new();
            h.insert(header::USER_AGENT, HeaderValue::from_str(&ua).unwrap());
            h
        };
        let first = index.register(p, &names, &variant(0), 0, |_| true).0;
        for i in 1..MAX_VARIANTS {
            assert_eq!(
                index.register(p, &names, &variant(i), 0, |_| true).1,
                vec![]
            );
        }
        // Registering a variant it has again changes nothing.
        assert_eq!(
            index.register(p, &names, &variant(3), 0, |_| true).1,
            vec![]
        );
        let (newest, out) = index.register(p, &names, &variant(MAX_VARIANTS), 0, |_| true);
        assert_eq!(out, vec![first]);
        // One no tier holds goes first.
        let fifth = p.variant(&names, &variant(5));
        let (_, out) = index.register(p, &names, &variant(MAX_VARIANTS + 1), 0, |v| *v != fifth);
        assert_eq!(out, vec![fifth]);
        let left = index.remove(p);
        assert_eq!(left.len(), MAX_VARIANTS);
        assert!(!left.contains(&first) && !left.contains(&fifth) && left.contains(&newest));
    }

    /// New names drop every variant of the old ones (the caller removes them), and so does
    /// a response without Vary; restored variants keep the oldest first; a URL whose primary
    /// key is held (its first fill runs under it) is not pruned.
    #[test]
    fn variants_of_other_names_are_dropped_and_order_is_kept() {
        let index = VaryIndex::default();
        let p = KeyHash::of("site.test/n");
        let (ae, lang) = ([header::ACCEPT_ENCODING], [header::ACCEPT_LANGUAGE]);
        let br = headers(&[("accept-encoding", "br"), ("accept-language", "de")]);
        let gz = headers(&[("accept-encoding", "gzip"), ("accept-language", "fr")]);
        let (v_br, none) = index.register(p, &ae, &br, 0, |_| true);
        assert!(none.is_empty());
        let v_gz = index.register(p, &ae, &gz, 0, |_| true).0;
        let (v_de, dropped) = index.register(p, &lang, &br, 0, |_| true);
        assert_eq!(dropped, vec![v_br, v_gz]);
        assert_eq!(index.register(p, &[], &br, 0, |_| true).1, vec![v_de]);
        // Restored newest first: the list keeps the oldest first.
        let names: Arc<[HeaderName]> = Arc::new(ae.clone());
        for v in [v_gz, v_br] {
            index.restore(p, names.clone(), v);
        }
        assert_eq!(index.remove(p), vec![v_br, v_gz]);
        // Its primary key held (a first fill): not pruned.
        index.register(p, &ae, &br, 0, |_| true);
        assert!(index.prune(|k| *k == p, 1, 100).is_empty());
        assert_eq!(index.prune(|_| false, 1, 100), vec![p]);
    }
}
