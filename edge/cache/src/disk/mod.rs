//! Disk tier: body content in cacache (content-addressed, written to `tmp/` and renamed on
//! commit, verified by its integrity hash on read) or, for small bodies, inline in its record;
//! metadata in a redb database ([`store`]); every object also in an index in memory
//! (quick_cache) for size accounting and eviction. The index counts against `--memory`
//! ([`index_budget`]): an object weighs the larger of its share of the disk and its entry's share
//! of that budget ([`EntryWeight`]), so the tier evicts before either would overflow. An eviction deletes the object's record; a content file goes once no entry
//! (indexed, held, or being streamed) names it.
//!
//! Why not cacache's own index: its buckets are append-only (every rewrite of a key, such as a
//! 304 metadata update, adds a line that `find` must read forever) and it has no garbage
//! collection. Why not one metadata file per object (the first design): every miss paid for a
//! file create, write and rename through several blocking-pool hops, a cold start read every
//! file before serving, and the cost grew with the directory. Measured choices are in
//! [`store`].
//!
//! Writes: a body is gathered in memory up to [`STREAM_CHUNK`] and then written in one job
//! (create, write, rename) on the blocking pool, at most [`WRITE_JOBS`] jobs at a time, so
//! writes never take more threads than that and never delay reads; a longer body is written
//! in jobs of that size. The metadata then joins the index writer's next group commit; the
//! object is visible once that commit ends, and counts as stored once it is durable (see
//! [`store`]). A small body the memory tier holds is stored
//! from that copy ([`DiskTier::store_whole`]): no job and no task, its record written inline
//! and indexed by the writer thread after the commit. Disk reads never queue behind writes:
//! redb readers do not wait for its writer.
//!
//! Start-up serves once the index's journal is read (see `store`). The index is loaded in the
//! background (`outpost-disk-load` thread) from the journal and the compact `entries` table; a lookup for a key the load has not reached reads
//! its record directly, and a URL with Vary finds its names in the `vary` table. Writes and
//! removals made while the load runs are remembered, so the load never brings back an object
//! removed meanwhile, nor replaces a newer one. Crash safety: content is committed (renamed)
//! before its metadata; a crash in between leaves only unreferenced content (never visible),
//! which a sweep after the load removes. See [`store`] for what a kill -9 can lose.
//!
//! Metadata integrity: a record starts with a checksum (xxh3-128; blake3 in records written
//! before) of the metadata (MessagePack; JSON in records written before, see [`encode_record`])
//! and inline body that follow. A record that fails it is a miss: it is
//! removed and counted, never served. It is checked whenever it
//! is read from the database; metadata already parsed and held in memory is not checked again.
//! Metadata files of the previous design (`meta/`) are imported at start-up, checked the same
//! way, and their directory removed.
//!
//! Body integrity: every read is checked, and a damaged body (another length or hash, or gone)
//! is removed and treated as a miss; a read that fails without finding damage (out of file
//! descriptors, an I/O error) is a miss that leaves the object stored (`reader::is_damage`).
//! A read is hashed, except when the content file is the very file whose bytes last matched
//! the hash in this process, unchanged since: same device, inode, length, mtime and ctime, with
//! those times older than that read by [`STAMP_SETTLE`] (so a change within one timestamp tick
//! cannot hide), compared when the file is opened and again after its last byte is read. Any
//! write, truncation or replacement through the file system is caught that way; what is not
//! caught until the next start (when every entry begins unchecked) is damage below the file
//! system that leaves the file's metadata alone. A stream is checked and counted as it goes
//! (its last chunk held back until the check and the recorded length passed), and the content
//! file's length is checked before a stream starts, so a body is never cut short under a
//! Content-Length that promises more. A stream of a large file hashed every time cost its
//! bytes' SHA-256 on every hit (`benches/hit_path.rs`, 1 MiB).
//!
//! Hits: the parsed metadata of recently hit objects is held in memory (a second moka cache,
//! bounded in bytes), so a hit on one of them reads only its body. A held copy is tied to the
//! index entry it was read for and to that entry's metadata generation (bumped by a 304
//! update), so a replaced body or rewritten metadata is never answered with the old metadata.
//!
//! Layout under `cache_dir`: `content/` (cacache), `index.redb`.
//!
//! Admission: while the index has room, every storable miss is written; once it is full, an
//! object is written on its key's second miss lately ([`admission`]).
//!
//! Files: this one holds the index, the held metadata and the start-up load; `store` the
//! database; `reader` reads bodies (whole, streamed, verified); `writer` writes them;
//! `admission` turns away first misses once the index is full.

pub mod admission;
mod reader;
mod store;
/// Disk failures for tests (see the module).
#[cfg(test)]
pub(crate) use store::faults;
#[cfg(test)]
mod tests;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cacache::Integrity;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use self::admission::Doorkeeper;
use self::reader::FileStamp;
use self::store::{EntryRecord, Pending, Put, Store};
use super::coalesce::Budget;
use super::fresh::HeadSlot;
use super::key::{KeyHash, KeyHasher};
use super::meta::CachedMeta;

pub use self::reader::{STAMP_SETTLE, STREAM_READ_SMALL, WHOLE_READ_MAX, is_over_budget};
pub use self::writer::{DiskWriter, INLINE_MAX, STREAM_CHUNK, WRITE_JOBS};

/// What [`DiskTier::update_meta`] did.
#[derive(Debug)]
pub enum MetaUpdate {
    Updated,
    /// The key holds no copy (or a new one replaced it as the update ran).
    NoCopy,
    /// The key holds a copy of another version than the one revalidated: left as it is.
    OtherVersion(Arc<DiskEntry>),
}

/// What the in-memory index knows about one object on disk. A commit under a key installs a
/// new entry (a new `Arc`), so an entry's identity stands for one stored body. Every stored
/// object has one, so it is kept small (about 100 bytes): what only whole reads of content
/// files need is allocated on the first such read.
#[derive(Debug)]
pub struct DiskEntry {
    sri: Sri,
    pub size: u64,
    /// The body is kept in the index record itself (see [`INLINE_MAX`]), not in cacache.
    pub inline: bool,
    /// The content was checked against its hash since this process started (it wrote it, or
    /// a full read verified it). Entries loaded at start-up begin unverified.
    pub verified: AtomicBool,
    /// Bumped after each rewrite of the metadata (a 304 update): metadata held in memory
    /// from an earlier generation is not used again.
    meta_gen: AtomicU64,
    /// Its record's key in the store (see `store`), once committed.
    record: AtomicU64,
    /// When a read of the body last succeeded (milliseconds on the tier's monotonic clock;
    /// 0: never), see [`DiskEntry::hot`].
    last_read: AtomicU64,
    /// A newer copy of the key replaced it in the index, its put having removed this copy's
    /// record: when the index hands it over like an eviction, there is nothing to delete.
    replaced: AtomicBool,
    /// Its record is durable: found on disk, or its put's commit was synced. False from its
    /// put until then (see the writer's `commit_entry`).
    durable: AtomicBool,
    /// The copy it replaced, from when it was indexed until its put is durable: kept
    /// referenced (its content file stays) for as long as the put may still be lost, to be
    /// indexed again then (see [`DiskTier::reinstate`]).
    superseded: std::sync::Mutex<Option<Arc<DiskEntry>>>,
    /// The content file's path and last checked state, from the first whole read on.
    file: OnceLock<Box<ContentFile>>,
    /// The tier's count of entries per content file (`None` for an inline body): this entry
    /// counts as one reference from its creation to its drop, so a content file goes only when
    /// no entry (indexed, held, or read by a stream) names it any more.
    refs: Option<Arc<ContentRefs>>,
}

/// How many entries name each content file; a file whose count drops to zero is removed.
pub(super) struct ContentRefs {
    counts: DashMap<String, u32>,
    /// Content files no entry names any more, for the remover task.
    unreferenced: mpsc::UnboundedSender<Integrity>,
}

impl ContentRefs {
    fn incref(&self, sri: &Integrity) {
        *self.counts.entry(sri.to_string()).or_insert(0) += 1;
    }

    fn decref(&self, sri: Integrity) {
        let k = sri.to_string();
        let mut gone = false;
        if let Some(mut n) = self.counts.get_mut(&k) {
            *n = n.saturating_sub(1);
            gone = *n == 0;
        }
        if gone && self.counts.remove_if(&k, |_, n| *n == 0).is_some() {
            let _ = self.unreferenced.send(sri);
        }
    }

    fn is_referenced(&self, sri: &str) -> bool {
        self.counts.contains_key(sri)
    }

    /// Runs `unlink` only if no entry names `sri`, holding the count's lock meanwhile: a
    /// reference taken concurrently waits until the file is gone, and its taker then finds it
    /// missing (see [`ContentRefs::take_committed`]), never a file removed after it looked.
    fn remove_if_unreferenced<T>(&self, sri: &str, unlink: impl FnOnce() -> T) -> Option<T> {
        match self.counts.entry(sri.to_string()) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(vacant) => {
                let done = unlink();
                drop(vacant);
                Some(done)
            }
        }
    }

    /// Takes a reference to content a write has just committed (renamed into place) and
    /// checks that the file is still there: a removal of an identical, unreferenced body may
    /// have run between the rename and this reference. `false` (no reference kept) if it did.
    fn take_committed(self: &Arc<Self>, sri: &Integrity, path: &Path) -> Option<ContentRef> {
        self.incref(sri);
        let reference = ContentRef {
            refs: Arc::clone(self),
            sri: Some(sri.clone()),
        };
        // Gone: dropping the reference lets its count fall back.
        path.is_file().then_some(reference)
    }
}

/// A counted reference to a content file not yet held by an entry: given back when dropped
/// (a write abandoned after its commit), or handed to [`DiskEntry::adopting`].
pub(super) struct ContentRef {
    refs: Arc<ContentRefs>,
    sri: Option<Integrity>,
}

impl Drop for ContentRef {
    fn drop(&mut self) {
        if let Some(sri) = self.sri.take() {
            self.refs.decref(sri);
        }
    }
}

impl std::fmt::Debug for ContentRefs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentRefs")
    }
}

impl Drop for DiskEntry {
    fn drop(&mut self) {
        if let Some(refs) = &self.refs {
            refs.decref(self.sri.integrity());
        }
    }
}

/// The SRI string of a digest: `prefix` (the algorithm and `-`), then the digest's base64.
/// `N` is the text's length.
fn sri_text<const N: usize>(prefix: &[u8], digest: &[u8]) -> [u8; N] {
    use base64::Engine as _;
    let mut text = [0u8; N];
    text[..prefix.len()].copy_from_slice(prefix);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(digest, &mut text[prefix.len()..])
        .expect("sized for the digest's base64");
    debug_assert_eq!(prefix.len() + written, N);
    text
}

/// The SRI string of a SHA-256 digest: `sha256-` and its base64 (44 characters).
fn sha256_text(digest: &[u8; 32]) -> [u8; 51] {
    sri_text(b"sha256-", digest)
}

/// The SRI string of an xxh3-128 digest: `xxh3-` and its base64 (24 characters).
fn xxh3_text(digest: &[u8; 16]) -> [u8; 29] {
    sri_text(b"xxh3-", digest)
}

/// A content hash, compact: cacache writes SHA-256 and inline bodies are named by xxh3-128
/// (see the writer's `inline_integrity`), each kept as its bytes; any other boxed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sri {
    Sha256([u8; 32]),
    Xxh3([u8; 16]),
    Other(Box<Integrity>),
}

impl Sri {
    fn of(sri: Integrity) -> Self {
        let (algorithm, hex) = sri.to_hex();
        let digest = |d: &mut [u8]| {
            sri.hashes.len() == 1
                && hex.len() == 2 * d.len()
                && (0..d.len()).all(|i| {
                    u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                        .map(|b| d[i] = b)
                        .is_ok()
                })
        };
        let (mut sha, mut xxh) = ([0u8; 32], [0u8; 16]);
        match algorithm {
            cacache::Algorithm::Sha256 if digest(&mut sha) => Self::Sha256(sha),
            cacache::Algorithm::Xxh3 if digest(&mut xxh) => Self::Xxh3(xxh),
            _ => Self::Other(Box::new(sri)),
        }
    }

    fn integrity(&self) -> Integrity {
        let parsed = |text: &[u8]| {
            std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.parse().ok())
                .expect("an algorithm and base64 is an SRI string")
        };
        match self {
            Self::Sha256(d) => parsed(&sha256_text(d)),
            Self::Xxh3(d) => parsed(&xxh3_text(d)),
            Self::Other(i) => (**i).clone(),
        }
    }

    /// Its SRI string (`sha256-…`, `xxh3-…`), as ssri writes it, without building an
    /// [`Integrity`] first.
    fn text(&self) -> String {
        let text = |t: &[u8]| String::from_utf8_lossy(t).into_owned();
        match self {
            Self::Sha256(d) => text(&sha256_text(d)),
            Self::Xxh3(d) => text(&xxh3_text(d)),
            Self::Other(i) => i.to_string(),
        }
    }

    /// Whether `text` is this hash's SRI string (`sha256-…`, `xxh3-…`), without building one: a
    /// disk hit checks its record with this.
    fn is_text(&self, text: &[u8]) -> bool {
        match self {
            Self::Sha256(d) => text == sha256_text(d),
            Self::Xxh3(d) => text == xxh3_text(d),
            Self::Other(i) => text == i.to_string().as_bytes(),
        }
    }
}

/// What whole reads of a content file keep about it.
#[derive(Debug)]
struct ContentFile {
    /// The content file's path (deriving it takes a few allocations).
    path: PathBuf,
    /// The file as it was when a whole read last found its bytes matching the hash (see the
    /// module docs); `None` until then.
    checked: Mutex<Option<FileStamp>>,
}

/// A body read within this long is read on the async worker that asks for it, not on the
/// blocking pool: its pages are in the page cache (it was just read), so the read costs a
/// copy and a few system calls, less than the trip to another thread and back. A body not
/// read for longer may need the disk, and goes to the blocking pool. nginx, by default,
/// reads every body on its event loop.
const HOT_FOR: Duration = Duration::from_secs(2);

/// Read jobs of a tier on the blocking pool at once (see [`Lane::Read`]).
pub const READ_JOBS: usize = 8;

/// Checks of whole bodies of a tier on the blocking pool at once (see [`Lane::Check`]).
pub const CHECK_JOBS: usize = 2;

/// Whole reads of larger bodies of a tier on the blocking pool at once (see [`Lane::Whole`]).
pub const WHOLE_JOBS: usize = 3;

/// The kinds of work a tier runs on the blocking pool, each with a bound of its own: a burst
/// of one kind (requests for many large objects never checked since the start, say) never
/// takes every thread of the pool (32: what the rest of the process uses is left; two tiers,
/// the cache's and the pushed objects', take 30 at most), and never delays the other kinds
/// more than their own jobs do. A job holds its slot until it ends, even if its caller has
/// gone; a caller that goes while it waits for a slot leaves nothing behind (tokio cannot
/// cancel a job once on the pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lane {
    /// Content writes ([`WRITE_JOBS`]): writes never delay reads.
    Write,
    /// Short reads ([`READ_JOBS`]): a record, a body up to [`WHOLE_READ_MAX`], a stream's
    /// chunk or its opening, a file's length.
    Read,
    /// Whole reads of larger bodies ([`WHOLE_JOBS`]): on their way into the memory tier (up
    /// to an eighth of it), each many short reads long.
    Whole,
    /// The longest ([`CHECK_JOBS`]): a body read through to check it before its first stream
    /// (up to the largest object).
    Check,
}

impl Lane {
    const ALL: [Lane; 4] = [Lane::Write, Lane::Read, Lane::Whole, Lane::Check];

    /// Its jobs at once.
    const fn slots(self) -> usize {
        match self {
            Lane::Write => WRITE_JOBS,
            Lane::Read => READ_JOBS,
            Lane::Whole => WHOLE_JOBS,
            Lane::Check => CHECK_JOBS,
        }
    }
}

/// The slots of each [`Lane`], in its order.
struct Lanes {
    slots: [Arc<Semaphore>; 4],
    /// Jobs started, per lane (tests count what ran).
    #[cfg(test)]
    started: [AtomicU64; 4],
}

impl Lanes {
    fn new() -> Self {
        Lanes {
            slots: Lane::ALL.map(|lane| Arc::new(Semaphore::new(lane.slots()))),
            #[cfg(test)]
            started: Default::default(),
        }
    }

    fn of(&self, lane: Lane) -> &Arc<Semaphore> {
        &self.slots[lane as usize]
    }
}

/// A warning that can fire on every request while the disk fails (a lookup the index cannot
/// answer, a body that cannot be read, a store that fails): written at most once per
/// [`Throttle::EVERY`], with the number of occurrences it stands for. A failing disk under
/// thousands of requests a second would otherwise write as many lines.
pub(crate) struct Throttle {
    /// When the next line may be written ([`now_ms`]; 0: at once).
    next: AtomicU64,
    /// Occurrences since the last line written.
    folded: AtomicU64,
}

impl Throttle {
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    pub(crate) const fn new() -> Self {
        Self {
            next: AtomicU64::new(0),
            folded: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence: `Some(n)` when it is to be written, standing for `n`
    /// occurrences (itself and those folded in since the last line).
    pub(crate) fn pass(&self) -> Option<u64> {
        self.folded.fetch_add(1, Ordering::AcqRel);
        let now = now_ms();
        let next = self.next.load(Ordering::Acquire);
        let every = Self::EVERY.as_millis() as u64;
        if now < next
            || self
                .next
                .compare_exchange(next, now + every, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        Some(self.folded.swap(0, Ordering::AcqRel).max(1))
    }
}

/// Milliseconds since the first call in this process (never 0).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

impl DiskEntry {
    /// A new entry; one referencing a content file (not inline) counts in `refs`.
    fn new(
        sri: Integrity,
        size: u64,
        verified: bool,
        inline: bool,
        refs: &Arc<ContentRefs>,
    ) -> Arc<Self> {
        let refs = (!inline).then(|| {
            refs.incref(&sri);
            Arc::clone(refs)
        });
        Self::with_refs(sri, size, verified, inline, refs)
    }

    /// A new entry for a content file, holding the reference already taken for it.
    fn adopting(mut reference: ContentRef, size: u64, verified: bool) -> Arc<Self> {
        let sri = reference.sri.take().expect("a reference is adopted once");
        let refs = Some(Arc::clone(&reference.refs));
        Self::with_refs(sri, size, verified, false, refs)
    }

    /// A new entry for a body kept inline in its record, named by `sri`.
    fn inline(sri: Sri, size: u64, verified: bool) -> Arc<Self> {
        Self::named(sri, size, verified, true, None)
    }

    fn with_refs(
        sri: Integrity,
        size: u64,
        verified: bool,
        inline: bool,
        refs: Option<Arc<ContentRefs>>,
    ) -> Arc<Self> {
        Self::named(Sri::of(sri), size, verified, inline, refs)
    }

    fn named(
        sri: Sri,
        size: u64,
        verified: bool,
        inline: bool,
        refs: Option<Arc<ContentRefs>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sri,
            size,
            inline,
            verified: AtomicBool::new(verified),
            meta_gen: AtomicU64::new(0),
            record: AtomicU64::new(0),
            last_read: AtomicU64::new(0),
            replaced: AtomicBool::new(false),
            durable: AtomicBool::new(true),
            superseded: std::sync::Mutex::new(None),
            file: OnceLock::new(),
            refs,
        })
    }

    /// A new entry for the same copy (its own reference to the content file): put back in the
    /// index in place of this one, which the index may still be handing over as replaced.
    fn again(&self) -> Arc<Self> {
        if let Some(refs) = &self.refs {
            refs.incref(&self.sri.integrity());
        }
        let verified = self.verified.load(Ordering::Acquire);
        let e = Self::named(
            self.sri.clone(),
            self.size,
            verified,
            self.inline,
            self.refs.clone(),
        );
        e.set_record(self.record_seq());
        e.meta_gen
            .store(self.meta_gen.load(Ordering::Acquire), Ordering::Release);
        e
    }

    /// The copy this one replaced, kept until its put is durable (see `superseded`).
    pub(super) fn supersede(&self, old: Option<Arc<DiskEntry>>) {
        *self.superseded_slot() = old;
    }

    fn superseded_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<DiskEntry>>> {
        self.superseded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Its put is durable: the copy it replaced may go.
    pub(super) fn made_durable(&self) {
        self.durable.store(true, Ordering::Release);
        self.supersede(None);
    }

    /// Its put is lost: the newest durable copy before it, if any (a put it replaced may be
    /// lost too, and then the one that put replaced is the one to put back).
    pub(super) fn durable_before(&self) -> Option<Arc<DiskEntry>> {
        let mut old = self.superseded_slot().take();
        while let Some(o) = old {
            if o.durable.load(Ordering::Acquire) {
                return Some(o);
            }
            old = o.superseded_slot().take();
        }
        None
    }

    /// The record read describes this entry's body (the same content, size and storage).
    fn describes(&self, file: &MetaFile) -> bool {
        file.size == self.size
            && file.inline == self.inline
            && file
                .integrity
                .parse::<Integrity>()
                .ok()
                .map(Sri::of)
                .as_ref()
                == Some(&self.sri)
    }

    /// Where its record is: set once the record committed (or was found).
    fn set_record(&self, seq: u64) {
        self.record.store(seq, Ordering::Release);
    }

    fn record_seq(&self) -> u64 {
        self.record.load(Ordering::Acquire)
    }

    /// What the object takes of the disk: its body and ~2 KiB of metadata.
    pub fn disk_bytes(&self) -> u64 {
        disk_bytes(self.size)
    }

    /// What its entry takes of the index's memory (see [`INDEX_ENTRY_BYTES`]).
    fn index_bytes(&self) -> u64 {
        index_bytes(self.inline)
    }

    /// This copy, as a conditional write names it.
    fn copy(&self) -> store::StoredCopy {
        store::StoredCopy {
            seq: self.record_seq(),
            integrity: self.sri.text(),
        }
    }

    /// The content hash.
    pub fn sri(&self) -> Integrity {
        self.sri.integrity()
    }

    /// The content file's state, created by `path` on first use.
    fn content_file(&self, path: impl FnOnce() -> PathBuf) -> &ContentFile {
        self.file.get_or_init(|| {
            Box::new(ContentFile {
                path: path(),
                checked: Mutex::new(None),
            })
        })
    }

    /// The body was read recently (see [`HOT_FOR`]).
    pub(super) fn hot(&self) -> bool {
        let last = self.last_read.load(Ordering::Relaxed);
        last != 0 && now_ms().saturating_sub(last) < HOT_FOR.as_millis() as u64
    }

    pub(super) fn mark_read(&self) {
        self.last_read.store(now_ms(), Ordering::Relaxed);
    }
}

/// How a metadata file of the previous design starts: the format, then the blake3 hash (hex)
/// of the JSON that follows the line. Such files are imported at start-up.
const META_FILE_TAG: &[u8] = b"outpost-meta/2 blake3=";

/// Why a metadata record was not used.
#[derive(Debug, thiserror::Error)]
enum MetaReject {
    #[error("not a metadata record of this format (an older format, or damaged)")]
    Format,
    #[error("metadata checksum mismatch")]
    Checksum,
    #[error("unparsable metadata: {0}")]
    Parse(String),
    #[error("metadata format version {0}")]
    Version(u32),
}

/// How a record is laid out, told by the 16 bytes after its checksum (see [`encode_record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordFormat {
    /// Checksum xxh3-128, metadata MessagePack ([`RECORD_TAG`]): what is written.
    MsgPack,
    /// Checksum xxh3-128, metadata JSON ([`JSON_XXH3_TAG`]): records written before
    /// MessagePack.
    Json,
    /// Checksum blake3 (all 32 bytes), metadata JSON: the first records.
    JsonBlake3,
}

/// Marks a record as [`RecordFormat::MsgPack`]. In a record whose checksum is blake3 these 16
/// bytes are the end of the hash: they match a tag with a chance of 2^-128.
const RECORD_TAG: &[u8; 16] = b"outpost-rec/mpk1";

/// Marks a record as [`RecordFormat::Json`].
const JSON_XXH3_TAG: &[u8; 16] = b"outpost-rec/xxh3";

/// The rest of a record (from its metadata's length on) if its checksum holds, and how its
/// metadata is encoded. xxh3-128, or the blake3 hash of the first records (10x slower on a
/// record of 2.4 KB: 1.6 µs). A checksum catches damage on the disk, not an adversary: the
/// index is ours alone.
fn checked_record(data: &[u8]) -> Option<(RecordFormat, &[u8])> {
    let (hash, rest) = data.split_first_chunk::<32>()?;
    let xxh3 = |sum: &[u8]| xxhash_rust::xxh3::xxh3_128(rest).to_le_bytes() == sum;
    let (format, holds) = match hash.split_at(16) {
        (sum, tag) if tag == RECORD_TAG => (RecordFormat::MsgPack, xxh3(sum)),
        (sum, tag) if tag == JSON_XXH3_TAG => (RecordFormat::Json, xxh3(sum)),
        // blake3::Hash compares in constant time; timing does not matter here, equality does.
        _ => (
            RecordFormat::JsonBlake3,
            blake3::hash(rest) == blake3::Hash::from_bytes(*hash),
        ),
    };
    holds.then_some((format, rest))
}

/// Serialises a metadata record: its checksum (xxh3-128 of all that follows, then
/// [`RECORD_TAG`]), the metadata's length (u32, little-endian), the metadata as MessagePack
/// (structs as arrays: no field names), then the body when it is kept inline.
///
/// Why MessagePack: a record of a 1 KiB body took 2.0 KB with JSON metadata (~960 bytes: the
/// field names, and the headers repeated in the policy) and takes 1.5 KB so (~470 bytes). Two
/// such records fit in one of the database's 4 KiB pages where one did before: behind a real
/// `outpost edge` taking unique 1 KiB misses from wrk, the index file grew half as fast, and
/// its writer spent 18-21 µs per miss instead of 23-25 (two runs each, alternating). Encoding
/// takes 0.5 µs instead of 1.1, and parsing, which a disk hit whose metadata is not held pays,
/// 2.0 µs instead of 3.1 (a microbench, release). Since the policy keeps only the response
/// fields it decides on (the policy module's `POLICY_FIELDS`), a response with eight headers
/// takes ~100 bytes less again. Arrays tie the layout to the order of the
/// fields, ours and http-cache-semantics' policy's: a test pins both.
fn encode_record(file: &MetaFileOut<'_>, body: &[u8]) -> io::Result<Vec<u8>> {
    let headers = super::meta::fields_len(&file.meta.headers, 8);
    let mut out = Vec::with_capacity(36 + 512 + 2 * headers + file.meta.key.len() + body.len());
    out.extend_from_slice(&[0; 36]);
    write_msgpack(&mut out, file)?;
    let len = u32::try_from(out.len() - 36).map_err(io::Error::other)?;
    out[32..36].copy_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    let sum = xxhash_rust::xxh3::xxh3_128(&out[32..]);
    out[..16].copy_from_slice(&sum.to_le_bytes());
    out[16..32].copy_from_slice(RECORD_TAG);
    Ok(out)
}

/// Metadata as MessagePack: structs as arrays, and human-readable, as with JSON (a header's
/// value as a string, not an array of byte values).
fn write_msgpack(out: &mut Vec<u8>, file: &MetaFileOut<'_>) -> io::Result<()> {
    let mut ser = rmp_serde::Serializer::new(out).with_human_readable();
    file.serialize(&mut ser).map_err(io::Error::other)
}

fn read_msgpack(meta: &[u8]) -> Result<MetaFile, MetaReject> {
    let mut de = rmp_serde::Deserializer::from_read_ref(meta).with_human_readable();
    MetaFile::deserialize(&mut de).map_err(|e| MetaReject::Parse(e.to_string()))
}

/// A record of `meta` as the tier writes it, its body kept elsewhere (tests: what is stored).
#[cfg(test)]
pub(crate) fn stored_form(meta: &CachedMeta) -> Vec<u8> {
    let file = MetaFileOut {
        integrity: String::new(),
        size: meta.body_len,
        inline: false,
        meta,
    };
    encode_record(&file, &[]).unwrap()
}

/// A checked record's metadata and the rest (the inline body), unparsed.
fn record_parts(data: &[u8]) -> Result<(RecordFormat, &[u8], &[u8]), MetaReject> {
    let (format, rest) = checked_record(data).ok_or(MetaReject::Checksum)?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or(MetaReject::Format)?;
    let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| MetaReject::Format)?;
    if rest.len() < len {
        return Err(MetaReject::Format);
    }
    let (meta, body) = rest.split_at(len);
    Ok((format, meta, body))
}

/// Parses a metadata record, checking its checksum first and its format version after;
/// returns the metadata and the inline body (empty when the body is in cacache).
fn decode_record(data: &[u8]) -> Result<(MetaFile, &[u8]), MetaReject> {
    if data.len() < 36 {
        return Err(MetaReject::Format);
    }
    let (format, meta, body) = record_parts(data)?;
    let file = parse_meta(format, meta)?;
    let expected = if file.inline { file.size } else { 0 };
    if body.len() as u64 != expected {
        return Err(MetaReject::Format);
    }
    Ok((file, body))
}

/// Where an entry's inline body lies in its record, checked without parsing the metadata:
/// the checksum holds, the body has the entry's size, and the metadata begins with the
/// entry's integrity (its first field), so a record written for other content is never taken.
fn record_body(data: &[u8], entry: &DiskEntry) -> Option<std::ops::Range<usize>> {
    let (format, meta, body) = record_parts(data).ok()?;
    let integrity = record_integrity(format, meta)?;
    if !entry.sri.is_text(integrity) || body.len() as u64 != entry.size {
        return None;
    }
    Some(data.len() - body.len()..data.len())
}

/// The integrity a record's metadata begins with, read without parsing the rest: in JSON
/// `{"integrity":"…"`, in MessagePack an array's first element, a string.
fn record_integrity(format: RecordFormat, meta: &[u8]) -> Option<&[u8]> {
    if format != RecordFormat::MsgPack {
        let text = meta.strip_prefix(b"{\"integrity\":\"")?;
        let end = text.iter().position(|&b| b == b'"')?;
        return Some(&text[..end]);
    }
    // An array of MetaFileOut's 4 fields (fixarray), then a fixstr or a str8.
    let (&[0x94, tag], rest) = meta.split_first_chunk::<2>()? else {
        return None;
    };
    let (len, rest) = match tag {
        0xa0..=0xbf => (usize::from(tag & 0x1f), rest),
        0xd9 => (usize::from(*rest.first()?), &rest[1..]),
        _ => return None,
    };
    rest.get(..len)
}

fn parse_meta(format: RecordFormat, meta: &[u8]) -> Result<MetaFile, MetaReject> {
    let file: MetaFile = match format {
        RecordFormat::MsgPack => read_msgpack(meta)?,
        RecordFormat::Json | RecordFormat::JsonBlake3 => {
            serde_json::from_slice(meta).map_err(|e| MetaReject::Parse(e.to_string()))?
        }
    };
    if file.meta.version != super::meta::META_VERSION {
        return Err(MetaReject::Version(file.meta.version));
    }
    Ok(file)
}

/// Parses a metadata file of the previous design (the tag line with the checksum, then JSON).
fn decode_meta_file(data: &[u8]) -> Result<MetaFile, MetaReject> {
    let rest = data.strip_prefix(META_FILE_TAG).ok_or(MetaReject::Format)?;
    let (hex, json) = rest
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| (&rest[..i], &rest[i + 1..]))
        .ok_or(MetaReject::Format)?;
    let expected = std::str::from_utf8(hex)
        .ok()
        .and_then(|h| blake3::Hash::from_hex(h).ok())
        .ok_or(MetaReject::Format)?;
    if blake3::hash(json) != expected {
        return Err(MetaReject::Checksum);
    }
    parse_meta(RecordFormat::Json, json)
}

/// The metadata record as read. Stored by position, as [`CachedMeta`] is.
#[derive(Deserialize)]
struct MetaFile {
    integrity: String,
    size: u64,
    /// The body follows the metadata in the record.
    #[serde(default)]
    inline: bool,
    meta: CachedMeta,
}

/// The metadata record as written: the same fields, borrowing the metadata.
#[derive(Serialize)]
struct MetaFileOut<'a> {
    integrity: String,
    size: u64,
    inline: bool,
    meta: &'a CachedMeta,
}

impl MetaFileOut<'_> {
    /// The store's put for this record; `body` when it is kept inline (else empty).
    fn put(&self, key: KeyHash, body: &[u8]) -> io::Result<Put> {
        let vary = self.meta.vary.join(",");
        Ok(Put {
            key,
            expect: None,
            record: encode_record(self, body)?.into(),
            vary: (!vary.is_empty()).then(|| (KeyHash::of(&self.meta.key), vary.clone())),
            entry: EntryRecord {
                // Given by the store as it commits.
                seq: 0,
                inline: self.inline,
                size: self.size,
                purge_seq: self.meta.purge_seq,
                integrity: self.integrity.clone(),
                key_text: self.meta.key.clone(),
                vary,
            },
        })
    }
}

/// Parsed metadata held in memory, valid for one index entry at one metadata generation.
#[derive(Clone)]
struct HeldMeta {
    entry: Arc<DiskEntry>,
    generation: u64,
    meta: Arc<CachedMeta>,
    /// The head the hit fast path prepared for this metadata.
    slot: Arc<HeadSlot>,
    /// Bytes charged: [`held_weight`].
    weight: u32,
}

impl HeldMeta {
    fn new(entry: Arc<DiskEntry>, generation: u64, meta: Arc<CachedMeta>) -> Self {
        Self {
            entry,
            generation,
            weight: held_weight(&meta),
            meta,
            slot: Arc::default(),
        }
    }
}

/// What parsed metadata takes in memory, estimated from the metadata itself (not from its
/// record, whose size depends on the encoding): two header maps' worth (the stored headers;
/// the policy's request headers, the response fields it keeps and its parsed directives),
/// each field its name, its value and ~96 bytes of bucket and allocation; the key twice (ours,
/// and the policy's URI); 1 KiB for the rest.
fn held_weight(meta: &CachedMeta) -> u32 {
    let bytes = 1024 + 2 * super::meta::fields_len(&meta.headers, 96) + 2 * meta.key.len();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Memory for held metadata, out of the operator's `--memory`: 1/16 of it, between 256 KiB and
/// 64 MiB (at a few KiB per object, the metadata of some thousands of hot objects); the
/// index's page cache gets as much again. The engine gives the memory tier what is left, so
/// they stay within `--memory` together.
pub fn held_meta_budget(memory: u64) -> u64 {
    (memory / 16).clamp(256 << 10, 64 << 20)
}

/// A disk lookup result: metadata known, body not yet read.
#[derive(Debug, Clone)]
pub struct DiskHit {
    pub meta: Arc<CachedMeta>,
    pub entry: Arc<DiskEntry>,
    /// An inline body, when the lookup read it along with the metadata.
    body: Option<Bytes>,
}

/// What the start-up load found for one object, for the engine's own indexes (Vary, hosts).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: KeyHash,
    /// The copy indexed under `key`.
    pub entry: Arc<DiskEntry>,
    pub key_text: String,
    /// The Vary names (comma-separated), empty without Vary.
    pub vary: String,
    pub purge_seq: u64,
}

/// Progress of the start-up load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadState {
    pub done: bool,
    /// Objects indexed by the load so far.
    pub loaded: u64,
    /// Time the load took, once done.
    pub millis: u64,
}

pub struct DiskTier {
    root: PathBuf,
    content: Arc<Path>,
    store: Arc<Store>,
    index: Index,
    /// Metadata of recently hit objects (see the module docs).
    held: moka::sync::Cache<KeyHash, HeldMeta>,
    refs: Arc<ContentRefs>,
    evictions: AtomicU64,
    /// What the indexed entries take, of the disk and of the index's memory budget.
    indexed: Indexed,
    /// Metadata records dropped for failing their checksum or format check.
    rejected: AtomicU64,
    /// Unreferenced content files removed by the start-up sweep.
    swept: AtomicU64,
    sweep_done: AtomicBool,
    /// The start-up load is running (see the module docs).
    loading: AtomicBool,
    loaded: AtomicU64,
    load_millis: AtomicU64,
    /// Keys written or removed while the load runs (and settles: see `load_settling`);
    /// cleared once it has settled.
    touched: DashMap<KeyHash, (), KeyHasher>,
    /// Lookups of keys the load had not reached, in flight: `touched` is kept until they end.
    unloaded_lookups: AtomicU64,
    /// The load has ended but waits for the lookups that saw it running: writes and removals
    /// are still noted in `touched` meanwhile (see [`DiskTier::touch`]).
    load_settling: AtomicBool,
    /// [`DiskTier::close`] was called: the load stops, and nothing is swept.
    closing: AtomicBool,
    /// Its jobs on the blocking pool, bounded by kind (see [`Lane`]).
    lanes: Lanes,
    /// First misses turned away while the index is full ([`admission`]).
    doorkeeper: Doorkeeper,
    /// What an entry weighs in the index (its weigher's copy).
    weight: EntryWeight,
    /// The index's weight capacity, and its shards.
    capacity: u64,
    shards: u64,
    /// Bodies read and not sent yet (see [`read_budget`]).
    pub(crate) reads: Arc<Budget>,
    /// Content files kept open for whole reads.
    open_files: Arc<reader::OpenFiles>,
    /// Slots of streams with a file open (see [`reader::stream_slots`]).
    streams: Arc<Semaphore>,
}

/// What the indexed entries take: added as an entry is indexed, taken off as it leaves the
/// index (removed, or handed to the deleter when evicted or replaced).
struct Indexed {
    /// Of the disk: [`DiskEntry::disk_bytes`].
    disk: AtomicU64,
    /// Of the index's memory: [`DiskEntry::index_bytes`].
    memory: AtomicU64,
    memory_budget: u64,
    /// The memory set aside for the journal of index writes not folded yet and for the
    /// doorkeeper (see [`entries_budget`]).
    set_aside: u64,
}

impl Indexed {
    fn add(&self, entry: &DiskEntry) {
        self.disk.fetch_add(entry.disk_bytes(), Ordering::Relaxed);
        self.memory
            .fetch_add(entry.index_bytes(), Ordering::Relaxed);
    }

    fn sub(&self, entry: &DiskEntry) {
        self.disk.fetch_sub(entry.disk_bytes(), Ordering::Relaxed);
        self.memory
            .fetch_sub(entry.index_bytes(), Ordering::Relaxed);
    }
}

/// An entry evicted for space.
struct Deletion {
    key: KeyHash,
    entry: Arc<DiskEntry>,
}

/// The in-memory index of every object on disk: quick_cache, weighed in bytes. At a million
/// objects its own cost per entry matters: moka's (the first choice) was ~300 bytes, about
/// three times the entry itself.
type Index = quick_cache::sync::Cache<
    KeyHash,
    Arc<DiskEntry>,
    EntryWeight,
    quick_cache::DefaultHashBuilder,
    Evictions,
>;

/// What an entry takes of the tier's capacity: of the disk, its body and ~2 KiB of metadata
/// ([`DiskEntry::disk_bytes`]); of the memory the index may use, [`DiskEntry::index_bytes`].
/// The index holds one weight per entry against the disk capacity, so the memory share is
/// scaled to it: an entry weighs the larger of the two. The entries' weights then add up to
/// at most the capacity only if both their disk bytes fit `--disk` and their index bytes fit
/// the index's budget (as nginx's `keys_zone` beside `max_size`). The bound is stricter than
/// two separate ones: objects smaller than capacity / budget × their index bytes (~150 KiB at
/// the defaults) count by memory, larger ones by disk, and a mix of both is evicted before
/// either resource is full.
#[derive(Clone)]
struct EntryWeight {
    /// Disk capacity over the index's memory budget, as a 32.32 fixed-point factor.
    scale: u128,
}

impl EntryWeight {
    fn new(capacity: u64, index_budget: u64) -> Self {
        Self {
            scale: (u128::from(capacity) << 32) / u128::from(index_budget.max(1)),
        }
    }
}

impl EntryWeight {
    /// The weight of an entry that takes `disk_bytes` of the disk and `index_bytes` of the
    /// index's memory.
    fn of(&self, disk_bytes: u64, index_bytes: u64) -> u64 {
        let index = (u128::from(index_bytes) * self.scale) >> 32;
        disk_bytes.max(u64::try_from(index).unwrap_or(u64::MAX))
    }
}

impl quick_cache::Weighter<KeyHash, Arc<DiskEntry>> for EntryWeight {
    fn weight(&self, _key: &KeyHash, entry: &Arc<DiskEntry>) -> u64 {
        self.of(entry.disk_bytes(), entry.index_bytes())
    }
}

/// What an object of `size` bytes takes of the disk: its body and ~2 KiB of metadata.
fn disk_bytes(size: u64) -> u64 {
    size.saturating_add(2048)
}

/// What an entry takes of the index's memory: [`INDEX_ENTRY_BYTES`], and
/// [`INDEX_FILE_ENTRY_EXTRA`] more for a body in a content file of its own.
fn index_bytes(inline: bool) -> u64 {
    if inline {
        INDEX_ENTRY_BYTES
    } else {
        INDEX_ENTRY_BYTES + INDEX_FILE_ENTRY_EXTRA
    }
}

/// Memory the index takes per entry (`tests/index_memory.rs` checks it): the entry, its `Arc`,
/// and its slot in the index (key and weight). Measured at ~220 bytes asked of the allocator
/// after a start-up load (the database's page cache, which has its own share, excluded); the
/// rest covers the allocator's rounding and the index's ghost entries of evicted keys.
pub const INDEX_ENTRY_BYTES: u64 = 320;

/// What an entry with a content file takes on top of [`INDEX_ENTRY_BYTES`]: its count in the
/// content references (keyed by the hash's text) and, once read whole, its file's path and
/// stamp. Measured at 560-650 bytes in all with the entry, 770-790 in session 21 (the files
/// kept open for whole reads, a fixed cache of their own, kept small in the measure).
pub const INDEX_FILE_ENTRY_EXTRA: u64 = 512;

/// The memory the disk index may use, out of `--memory`: a quarter of it, at least 1 MiB
/// (~2,700 objects), an eighth of it for its journal and a 64th for its doorkeeper (see
/// [`entries_budget`]). At the default
/// 256 MiB that is ~180,000 objects; a store of many more
/// small objects needs a larger `--memory` (nginx sizes its `keys_zone` the same way, at
/// ~8,000 keys per MiB).
pub fn index_budget(memory: u64) -> u64 {
    (memory / 4).max(1 << 20)
}

/// The memory bodies read from disk may take until they are sent, out of `--memory`: a 16th
/// of it, 1 to 64 MiB, shared by the cache's and the pushed objects' tiers. A whole read (a
/// body up to [`WHOLE_READ_MAX`]) is held until the client has it, as is each chunk of a
/// stream, and a slow client holds them for long: 8,192 connections (the default limit) each
/// reading a 100 KiB disk hit slowly could hold 800 MiB outside `--memory`. A body read when
/// the budget has no room for it streams in chunks of [`STREAM_READ_SMALL`] instead, three at
/// most alive per stream (the one held back, the one being sent, one its consumer holds). A
/// body read to be promoted into the memory tier counts against the fills' share instead.
pub fn read_budget(memory: u64) -> u64 {
    (memory / 16).clamp(1 << 20, 64 << 20)
}

/// What the index's entries may use of its budget: all but the share of the journal of index
/// writes not folded yet (an eighth; see [`store::journal_max`]) and the doorkeeper's (a 64th;
/// see [`admission`]).
pub fn entries_budget(index_budget: u64) -> u64 {
    index_budget
        .saturating_sub(store::journal_max(index_budget) * store::JOURNAL_ENTRY_BYTES)
        .saturating_sub(admission::doorkeeper_bytes(index_budget))
        .max(1)
}

/// Hands entries evicted for space to the deleter task.
#[derive(Clone)]
struct Evictions(mpsc::UnboundedSender<Deletion>);

impl quick_cache::Lifecycle<KeyHash, Arc<DiskEntry>> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), key: KeyHash, entry: Arc<DiskEntry>) {
        let _ = self.0.send(Deletion { key, entry });
    }
}

/// Readings of the index the start-up load makes at most: one, then one more each time the
/// index failed under it and was opened again (see the store's `Writer::reopen`). A failure
/// that comes back at every reading (a damaged sector only the load reads) ends it as before,
/// after costing a few reopenings.
const LOAD_PASSES: u32 = 3;

/// How long the start-up load waits for the index to be open again after a failure.
#[cfg(not(test))]
const LOAD_PATIENCE: Duration = Duration::from_secs(60);
#[cfg(test)]
const LOAD_PATIENCE: Duration = Duration::from_secs(5);

impl DiskTier {
    /// Opens (or creates) the tier, its index bounded by the disk capacity only, and starts
    /// loading the index in the background (see [`DiskTier::open_within`]).
    pub async fn open(
        root: &Path,
        capacity: u64,
        held_budget: u64,
    ) -> io::Result<(Arc<Self>, mpsc::Receiver<Vec<Loaded>>)> {
        Self::open_within(root, capacity, held_budget, u64::MAX, Budget::new(u64::MAX)).await
    }

    /// Opens (or creates) the tier and starts loading its index in the background. The tier
    /// serves at once; the receiver gets what the load finds, in batches, and closes when the
    /// load is done. The index keeps its entries within `index_budget` bytes of memory (see
    /// [`EntryWeight`]), evicting objects when it would not. Bodies read from disk count
    /// against `reads` until they are sent (see [`read_budget`]).
    pub async fn open_within(
        root: &Path,
        capacity: u64,
        held_budget: u64,
        index_budget: u64,
        reads: Arc<Budget>,
    ) -> io::Result<(Arc<Self>, mpsc::Receiver<Vec<Loaded>>)> {
        let started = SystemTime::now();
        let content: Arc<Path> = root.join("content").into();
        tokio::fs::create_dir_all(&content).await?;
        // Interrupted writes never become visible; their leftovers go now.
        remove_dir_contents(&content.join("tmp")).await;
        let journal_max = store::journal_max(index_budget);
        let set_aside = index_budget - entries_budget(index_budget).min(index_budget);
        let doorkeeper = Doorkeeper::new(index_budget);
        let index_budget = entries_budget(index_budget);
        let store = {
            let root = root.to_path_buf();
            // The index's page cache gets as much as the held metadata: hot objects' metadata
            // is held decoded above it, so it serves cold lookups and the start-up load.
            tokio::task::spawn_blocking(move || Store::open(&root, held_budget, journal_max))
                .await
                .map_err(io::Error::other)??
        };

        let (tx, rx) = mpsc::unbounded_channel::<Deletion>();
        // Sized for objects of ~64 KiB on average; the shards grow past it as needed.
        let estimated =
            usize::try_from((capacity / (64 << 10)).min(index_budget / INDEX_ENTRY_BYTES))
                .unwrap_or(usize::MAX)
                .clamp(1024, 1 << 20);
        // quick_cache shares the capacity out between shards and refuses an object heavier
        // than (most of) one shard: at least 1 GiB per shard (one shard below that), so any
        // object the fill admits (`max_object_size`) fits.
        let shards = usize::try_from(capacity >> 30)
            .unwrap_or(usize::MAX)
            .clamp(1, 8)
            .next_power_of_two()
            .min(8);
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(estimated)
            .weight_capacity(capacity)
            .shards(shards)
            .build()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let weight = EntryWeight::new(capacity, index_budget);
        let index = Index::with_options(
            options,
            weight.clone(),
            quick_cache::DefaultHashBuilder::default(),
            Evictions(tx),
        );
        let (unreferenced, unreferenced_rx) = mpsc::unbounded_channel();
        let refs = Arc::new(ContentRefs {
            counts: DashMap::new(),
            unreferenced,
        });
        let held = moka::sync::Cache::builder()
            .name("outpost-disk-meta")
            .max_capacity(held_budget)
            .weigher(|_k: &KeyHash, h: &HeldMeta| h.weight)
            .build();
        let tier = Arc::new(Self {
            root: root.to_path_buf(),
            content,
            store: Arc::new(store),
            index,
            held,
            refs,
            evictions: AtomicU64::new(0),
            indexed: Indexed {
                disk: AtomicU64::new(0),
                memory: AtomicU64::new(0),
                memory_budget: index_budget,
                set_aside,
            },
            rejected: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            sweep_done: AtomicBool::new(false),
            loading: AtomicBool::new(true),
            loaded: AtomicU64::new(0),
            load_millis: AtomicU64::new(0),
            touched: DashMap::with_hasher(KeyHasher::default()),
            unloaded_lookups: AtomicU64::new(0),
            load_settling: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            lanes: Lanes::new(),
            doorkeeper,
            weight,
            capacity,
            shards: shards as u64,
            streams: Arc::new(Semaphore::new(reader::stream_slots(reads.limit()))),
            reads,
            open_files: Arc::new(reader::OpenFiles::for_this_process()),
        });
        // These hold the tier weakly: the tier owns their senders (its index's lifecycle, its
        // content references), so they end when the tier is dropped, closing the database.
        tokio::spawn(Self::run_deleter(Arc::downgrade(&tier), rx));
        tokio::spawn(Self::run_remover(Arc::downgrade(&tier), unreferenced_rx));
        // Bounded: a slow consumer holds the load back rather than let batches pile up.
        let (loaded_tx, loaded_rx) = mpsc::channel(2);
        let loader = Arc::clone(&tier);
        std::thread::Builder::new()
            .name("outpost-disk-load".into())
            .spawn(move || loader.load(started, &loaded_tx))?;
        Ok((tier, loaded_rx))
    }

    /// Opens the tier and waits for the whole load (for stores whose every key must be known
    /// before the first request, such as pushed objects).
    pub async fn open_loaded(
        root: &Path,
        capacity: u64,
        held_budget: u64,
        reads: Arc<Budget>,
    ) -> io::Result<(Arc<Self>, Vec<Loaded>)> {
        let (tier, mut rx) =
            Self::open_within(root, capacity, held_budget, u64::MAX, reads).await?;
        let mut all = Vec::new();
        while let Some(batch) = rx.recv().await {
            all.extend(batch);
        }
        Ok((tier, all))
    }

    /// The start-up load (on its own thread): imports metadata files of the previous design,
    /// indexes every entry, then sweeps unreferenced content.
    fn load(&self, started: SystemTime, out: &mpsc::Sender<Vec<Loaded>>) {
        #[cfg(test)]
        load_gate::wait(&self.root);
        let t0 = std::time::Instant::now();
        self.import_meta_files();
        // Read again from the start if the index failed and was opened again meanwhile (see
        // the store's `Writer::reopen`, and LOAD_PASSES): what an earlier reading indexed
        // stays, and is not counted twice.
        let mut pass = 1;
        let loaded = loop {
            let reopens = self.store.reopens();
            let loaded = self.load_entries(pass > 1, out);
            if loaded.is_ok()
                || pass == LOAD_PASSES
                || !self
                    .store
                    .reopened_since(reopens, LOAD_PATIENCE, &self.closing)
            {
                break loaded;
            }
            if let Err(e) = &loaded {
                warn!(error = %e, dir = %self.root.display(), pass, "disk index failed during the load; reading it again");
            }
            pass += 1;
        };
        self.finish_load(t0, started, loaded);
    }

    /// Indexes what the store's load reads, and hands it over (what the engine does with it
    /// can be done twice; `again`: a reading after the first, which counts only what it
    /// indexes itself as loaded).
    fn load_entries(
        &self,
        again: bool,
        out: &mpsc::Sender<Vec<Loaded>>,
    ) -> io::Result<(u64, bool)> {
        self.store.load(4096, |batch| {
            let mut found = Vec::with_capacity(batch.len());
            let mut counted = 0;
            for (key, e) in batch {
                let Ok(sri) = e.integrity.parse::<Integrity>() else {
                    // Only this copy: a fill may store a new one while the load runs.
                    self.store.delete_if(
                        key,
                        store::StoredCopy {
                            seq: e.seq,
                            integrity: e.integrity,
                        },
                    );
                    continue;
                };
                let entry = DiskEntry::new(sri, e.size, false, e.inline, &self.refs);
                entry.set_record(e.seq);
                if let Some(indexed) = self.install(key, Arc::clone(&entry)) {
                    if !again || Arc::ptr_eq(&indexed, &entry) {
                        counted += 1;
                    }
                    found.push(Loaded {
                        key,
                        entry: indexed,
                        key_text: e.key_text,
                        vary: e.vary,
                        purge_seq: e.purge_seq,
                    });
                }
            }
            self.loaded.fetch_add(counted, Ordering::Relaxed);
            // Stops when nobody listens any more (the engine went) or the tier closes.
            out.blocking_send(found).is_ok() && !self.closing.load(Ordering::Acquire)
        })
    }

    /// The rest of [`DiskTier::load`], once the entries are read: the sweep of unreferenced
    /// content after a complete load.
    fn finish_load(
        &self,
        t0: std::time::Instant,
        started: SystemTime,
        loaded: io::Result<(u64, bool)>,
    ) {
        let millis = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.load_millis.store(millis, Ordering::Relaxed);
        self.load_settling.store(true, Ordering::SeqCst);
        self.loading.store(false, Ordering::SeqCst);
        // A lookup that saw the load running may still be installing what it read: the keys
        // touched meanwhile stay known (and more are noted) until it is done.
        while self.unloaded_lookups.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.touched.clear();
        self.load_settling.store(false, Ordering::SeqCst);
        let complete = matches!(loaded, Ok((_, true)));
        match loaded {
            Ok((n, _)) if n > 0 => {
                info!(objects = self.loaded.load(Ordering::Relaxed), millis, dir = %self.root.display(), "disk tier loaded");
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, dir = %self.root.display(), "disk index load failed; objects not loaded are misses");
            }
        }
        let rejected = self.rejected.load(Ordering::Relaxed);
        if rejected > 0 {
            warn!(
                records = rejected,
                dir = %self.root.display(),
                "dropped disk metadata that failed its checksum or is of an older format; those objects are misses"
            );
        }
        // Only after a complete load: every body a record names is then known. After a
        // partial one (closed, or a read error) the unknown ones would look unreferenced.
        if !complete || self.closing.load(Ordering::Acquire) {
            if !self.closing.load(Ordering::Acquire) {
                warn!(dir = %self.root.display(), "disk index load incomplete; unreferenced content is not swept this time");
            }
            return;
        }
        let cutoff = started.checked_sub(STAMP_SETTLE).unwrap_or(UNIX_EPOCH);
        let (files, bytes) = self.sweep_blocking(cutoff);
        if files > 0 {
            info!(files, bytes, dir = %self.content.display(), "removed unreferenced content");
        }
        self.swept.fetch_add(files, Ordering::Relaxed);
        self.sweep_done.store(true, Ordering::Release);
    }

    /// Indexes an entry found on disk unless this process wrote or removed the key since the
    /// load began; never replaces an entry already indexed. Returns the entry indexed.
    fn install(&self, key: KeyHash, entry: Arc<DiskEntry>) -> Option<Arc<DiskEntry>> {
        if self.touched.contains_key(&key) {
            return None;
        }
        match self.index.get_value_or_guard(&key, None) {
            // Already indexed (the load and a lookup raced): that one stands.
            quick_cache::sync::GuardResult::Value(indexed) => return Some(indexed),
            quick_cache::sync::GuardResult::Guard(slot) => {
                self.indexed.add(&entry);
                // The slot went meanwhile (a removal, or a newer copy indexed): ours is stale.
                if slot.insert(Arc::clone(&entry)).is_err() {
                    self.indexed.sub(&entry);
                    return None;
                }
            }
            quick_cache::sync::GuardResult::Timeout => return None,
        }
        // A write or removal that came in between checking and indexing: take ours back.
        if self.touched.contains_key(&key) {
            self.unindex(&key, &entry);
            return None;
        }
        Some(entry)
    }

    /// Notes a write or removal of `key` while the load runs, or while a lookup that saw it
    /// running may still install what it read (the load waits for those before it forgets
    /// the keys noted): a removal in between must not let that lookup bring the copy back.
    fn touch(&self, key: KeyHash) {
        if self.loading.load(Ordering::SeqCst) || self.load_settling.load(Ordering::SeqCst) {
            self.touched.insert(key, ());
        }
    }

    /// Progress of the start-up load.
    pub fn load_state(&self) -> LoadState {
        LoadState {
            done: !self.loading.load(Ordering::Acquire),
            loaded: self.loaded.load(Ordering::Relaxed),
            millis: self.load_millis.load(Ordering::Relaxed),
        }
    }

    /// Imports the metadata files of the previous design (`meta/xx/<key>.json`) into the
    /// store, then removes them. Files that fail their check are dropped and counted.
    fn import_meta_files(&self) {
        let dir = self.root.join("meta");
        let Ok(shards) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut imported = 0u64;
        let mut all_committed = true;
        for shard in shards.flatten() {
            let Ok(files) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            let mut puts = Vec::new();
            for f in files.flatten() {
                let p = f.path();
                let Some(key) = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(KeyHash::from_hex)
                else {
                    continue;
                };
                let put = std::fs::read(&p)
                    .ok()
                    .and_then(|data| decode_meta_file(&data).ok())
                    .and_then(|file| {
                        MetaFileOut {
                            integrity: file.integrity,
                            size: file.size,
                            inline: false,
                            meta: &file.meta,
                        }
                        .put(key, &[])
                        .ok()
                    });
                match put {
                    // Stored anew since the start (the tier serves at once): that one stands.
                    Some(_) if self.touched.contains_key(&key) => {}
                    Some(put) => puts.push(put),
                    None => {
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let wanted = puts.len() as u64;
            let committed = self.store.put_all_blocking(puts);
            imported += committed;
            all_committed &= committed == wanted;
        }
        if !all_committed {
            warn!(dir = %dir.display(), "some metadata files could not be imported; they stay for the next start");
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(error = %e, dir = %dir.display(), "could not remove imported metadata files");
        }
        if imported > 0 {
            info!(objects = imported, dir = %self.root.display(), "imported metadata files into the disk index");
        }
    }

    async fn run_deleter(tier: Weak<Self>, mut rx: mpsc::UnboundedReceiver<Deletion>) {
        while let Some(d) = rx.recv().await {
            let Some(this) = tier.upgrade() else { return };
            this.evicted(d);
        }
    }

    /// An entry evicted for space: its record goes (unless the key was stored again
    /// meanwhile); its content file goes with the last entry that names it. The index also
    /// hands over an entry a new copy of the key replaced (marked by [`DiskTier::index_entry`]):
    /// the store removes its record (with the put, or with the journal's next fold), so there
    /// is nothing to delete, and it is no eviction.
    fn evicted(&self, d: Deletion) {
        self.indexed.sub(&d.entry);
        self.forget_held(&d.key, &d.entry);
        if d.entry.replaced.load(Ordering::Acquire) {
            return;
        }
        // Only this copy's record: a fill may have stored a newer one under the key meanwhile.
        self.store.delete_if(d.key, d.entry.copy());
        self.evictions.fetch_add(1, Ordering::Relaxed);
        debug!(key = %d.key, size = d.entry.size, "disk eviction");
    }

    /// Drops the held metadata of `key` if it belongs to `entry` (a newer copy's stays).
    fn forget_held(&self, key: &KeyHash, entry: &Arc<DiskEntry>) {
        if self
            .held
            .get(key)
            .is_some_and(|h| Arc::ptr_eq(&h.entry, entry))
        {
            self.held.invalidate(key);
        }
    }

    async fn run_remover(tier: Weak<Self>, mut rx: mpsc::UnboundedReceiver<Integrity>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(sri) = rx.try_recv() {
                batch.push(sri);
            }
            // Not while the start-up load runs: an entry it has not reached yet may name the
            // same body (identical bodies share a file), and is counted only once loaded.
            let this = loop {
                let Some(this) = tier.upgrade() else { return };
                if !this.loading.load(Ordering::Acquire) {
                    break this;
                }
                drop(this);
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            // Not before the index stops naming them durably: after a kill -9, an entry whose
            // file is gone would be a miss taken for damage. If those writes failed, the files
            // go all the same: kept, they would hold the disk past `--disk` until the next
            // start (a failed commit names none of the writes it lost, and after an I/O error
            // redb fails every later one), and an entry that still names one is a miss there.
            if !this.store.synced().await {
                warn!(
                    files = batch.len(),
                    "disk index writes failed; unreferenced content files are removed anyway"
                );
            }
            for sri in batch {
                // Named again meanwhile (the same body stored anew): it stays.
                if !this.refs.is_referenced(&sri.to_string()) {
                    this.remove_content(sri).await;
                }
            }
        }
    }

    /// Removes a content file no entry references, as a write job: removals share the
    /// writes' few threads instead of taking a blocking thread each (an eviction storm
    /// would otherwise grow the blocking pool, and each thread's memory with it).
    async fn remove_content(&self, sri: Integrity) {
        let content = self.content.clone();
        let refs = Arc::clone(&self.refs);
        let open_files = Arc::clone(&self.open_files);
        let removed = self
            .write_job(move || {
                refs.remove_if_unreferenced(&sri.to_string(), || {
                    // Let go of it first: a kept-open file would hold its disk space.
                    open_files.forget(&sri);
                    cacache::remove_hash_sync(&content, &sri).map_err(io::Error::other)
                })
                .unwrap_or(Ok(()))
            })
            .await;
        if let Err(e) = removed {
            debug!(error = %e, "removing unreferenced content");
        }
    }

    /// A snapshot of the keys on disk (for background reclamation).
    pub fn keys(&self) -> Vec<KeyHash> {
        self.index.iter().map(|(k, _)| k).collect()
    }

    /// Whether the index holds the key (while the load runs, an object not loaded yet is not
    /// known here; [`DiskTier::get`] finds it).
    pub fn contains(&self, key: &KeyHash) -> bool {
        self.index.contains_key(key)
    }

    /// For the hit fast path: a held object whose body is read whole (inline, or a content file
    /// up to [`WHOLE_READ_MAX`]) and was read within [`HOT_FOR`], with its metadata, head slot
    /// and entry. No I/O; `None` for anything else, and while the start-up load runs (a URL's
    /// Vary names may not be known yet).
    pub fn held_hot(
        &self,
        key: &KeyHash,
    ) -> Option<(Arc<CachedMeta>, Arc<HeadSlot>, Arc<DiskEntry>)> {
        if self.loading.load(Ordering::Acquire) {
            return None;
        }
        let entry = self.index.get(key)?;
        if !(entry.inline || entry.size <= WHOLE_READ_MAX) || !entry.hot() {
            return None;
        }
        let generation = entry.meta_gen.load(Ordering::Acquire);
        let held = self.held.get(key)?;
        (Arc::ptr_eq(&held.entry, &entry) && held.generation == generation)
            .then_some((held.meta, held.slot, entry))
    }

    /// The body of a [`DiskTier::held_hot`] entry, read on this thread (its pages were read
    /// moments ago) and checked as every read is. `None` on any doubt (a pending write of another
    /// copy, a record that does not match, a content file that fails its check): the full path
    /// then decides (and removes what is damaged).
    pub fn body_now(&self, key: &KeyHash, entry: &DiskEntry) -> Option<Bytes> {
        if !entry.inline {
            // Known since the whole read that made the entry hot.
            let file = entry.file.get()?;
            let charge = self.reads.take(entry.size)?;
            let (data, _) = self
                .open_files
                .read_checked(&file.path, &self.content, entry, SystemTime::now())
                .ok()?;
            entry.mark_read();
            return Some(reader::charged(data, reader::Share::Charged(charge)));
        }
        let (_, record) = self
            .fetch_record_now(key, Some(entry.record_seq()))
            .ok()??;
        let range = record_body(&record, entry)?;
        entry.mark_read();
        Some(record.slice(range))
    }

    /// Looks up an object: its metadata from memory when held, else from the store (and then
    /// held). Missing or damaged metadata is a miss (and is cleaned up).
    pub async fn get(&self, key: &KeyHash) -> Option<DiskHit> {
        self.lookup(key, true).await
    }

    /// Like [`DiskTier::get`], but metadata read from the store is not held: for sweeps over
    /// every object, which must not push the hot objects' metadata out.
    pub async fn peek(&self, key: &KeyHash) -> Option<DiskHit> {
        self.lookup(key, false).await
    }

    async fn lookup(&self, key: &KeyHash, hold: bool) -> Option<DiskHit> {
        let Some(entry) = self.index.get(key) else {
            return self.find_unloaded(key, hold).await;
        };
        // Read before the record: a 304 update bumps it after its new record is committed.
        let generation = entry.meta_gen.load(Ordering::Acquire);
        if let Some(h) = self.held.get(key)
            && Arc::ptr_eq(&h.entry, &entry)
            && h.generation == generation
        {
            return Some(DiskHit {
                meta: h.meta,
                entry,
                body: None,
            });
        }
        let (file, body, _) = self.read_record(key, Some(&entry)).await?;
        if !entry.describes(&file) {
            // A pending write's record, of another copy of the key: never pair one body with
            // another's metadata.
            debug!(key = %key, "disk metadata names other content than the index");
            return None;
        }
        Some(self.hit(key, entry, generation, file, body, hold))
    }

    /// A hit on `entry` with the record just read for it, its metadata held if `hold`.
    fn hit(
        &self,
        key: &KeyHash,
        entry: Arc<DiskEntry>,
        generation: u64,
        file: MetaFile,
        body: Option<Bytes>,
        hold: bool,
    ) -> DiskHit {
        let meta = Arc::new(file.meta);
        if hold {
            self.held
                .insert(*key, HeldMeta::new(entry.clone(), generation, meta.clone()));
            // Removed or replaced since the lookup found it: held, it would keep the entry
            // (and its content file, outside the disk's count) alive past its removal.
            if !self
                .index
                .peek(key)
                .is_some_and(|current| Arc::ptr_eq(&current, &entry))
            {
                self.forget_held(key, &entry);
            }
        }
        DiskHit { meta, entry, body }
    }

    /// While the load runs: an object it has not reached yet, read from the store and indexed.
    async fn find_unloaded(&self, key: &KeyHash, hold: bool) -> Option<DiskHit> {
        struct InFlight<'a>(&'a AtomicU64);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if !self.loading.load(Ordering::SeqCst) {
            return None;
        }
        self.unloaded_lookups.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.unloaded_lookups);
        if !self.loading.load(Ordering::SeqCst) || self.touched.contains_key(key) {
            return None;
        }
        let (file, body, seq) = self.read_record(key, None).await?;
        let sri = file.integrity.parse::<Integrity>().ok()?;
        let entry = DiskEntry::new(sri, file.size, false, file.inline, &self.refs);
        entry.set_record(seq);
        let entry = self.install(*key, entry)?;
        if !entry.describes(&file) {
            return None;
        }
        let generation = entry.meta_gen.load(Ordering::Acquire);
        Some(self.hit(key, entry, generation, file, body, hold))
    }

    /// Reads and checks an object's record: a write not committed yet first, else the store.
    /// Returns the metadata, the inline body (if any), the record's length and its sequence
    /// number. `None` (a miss) when there is none; a damaged one is removed and counted.
    /// `entry`: the index entry the record is read for (its record is read), if any; only
    /// that entry is dropped when the record is missing or damaged (a newer copy stored
    /// meanwhile stays). Without one, the key's record is read.
    async fn read_record(
        &self,
        key: &KeyHash,
        entry: Option<&Arc<DiskEntry>>,
    ) -> Option<(MetaFile, Option<Bytes>, u64)> {
        let at = entry.map(|e| e.record_seq());
        let (seq, data) = match self.fetch_record(key, at, false).await {
            Ok(Some(data)) => data,
            Ok(None) => {
                if let Some(e) = entry {
                    self.unindex(key, e);
                }
                return None;
            }
            Err(e) => {
                static UNREADABLE: Throttle = Throttle::new();
                if let Some(occurrences) = UNREADABLE.pass() {
                    warn!(key = %key, error = %e, occurrences, "disk metadata unreadable; a miss (one line per 10 s at most)");
                }
                return None;
            }
        };
        match decode_record(&data) {
            Ok((f, body)) => {
                let body = f.inline.then(|| data.slice_ref(body));
                Some((f, body, seq))
            }
            Err(e) => {
                warn!(key = %key, error = %e, "disk metadata failed its check, dropping entry");
                self.rejected.fetch_add(1, Ordering::Relaxed);
                match entry {
                    // The damaged record is this entry's: it goes, unless a new copy's
                    // record replaced it meanwhile.
                    Some(e) => self.remove_copy(key, e),
                    None => {
                        self.touch(*key);
                        self.store.delete(*key);
                    }
                }
                None
            }
        }
    }

    /// A record as this process sees it, with its sequence number: a write to the key not
    /// committed yet first, else the store's record at `at` (an indexed entry's), or the key's
    /// (`None`: one not indexed, where a pending write is a miss: that write indexes its own
    /// entry as it commits). Read on this thread when `here` (a hot entry, see [`HOT_FOR`]),
    /// else on the blocking pool. `None` when there is none, or its delete is pending.
    async fn fetch_record(
        &self,
        key: &KeyHash,
        at: Option<u64>,
        here: bool,
    ) -> io::Result<Option<(u64, Bytes)>> {
        if here {
            return self.fetch_record_now(key, at);
        }
        if let Some(pending) = self.pending_record(key, at) {
            return Ok(pending);
        }
        let store = Arc::clone(&self.store);
        let k = *key;
        self.job(Lane::Read, move || read_stored(&store, &k, at))
            .await?
    }

    /// [`DiskTier::fetch_record`] on this thread.
    fn fetch_record_now(&self, key: &KeyHash, at: Option<u64>) -> io::Result<Option<(u64, Bytes)>> {
        match self.pending_record(key, at) {
            Some(pending) => Ok(pending),
            None => read_stored(&self.store, key, at),
        }
    }

    /// What a write to `key` not committed yet makes of a read (see
    /// [`DiskTier::fetch_record`]); `None` when there is none.
    fn pending_record(&self, key: &KeyHash, at: Option<u64>) -> Option<Option<(u64, Bytes)>> {
        match (self.store.pending(key)?, at) {
            // The newest record of the key (its own sequence number is not known yet): the
            // caller checks it describes its entry.
            (Pending::Put(record), Some(seq)) => Some(Some((seq, record))),
            _ => Some(None),
        }
    }

    /// An inline body: the one the lookup read, else the record's, checked (its checksum, and
    /// that it is the record of this very entry) without parsing the metadata again. A hot
    /// entry's record is read on this thread (see [`HOT_FOR`]).
    pub(super) async fn inline_body(&self, key: &KeyHash, hit: &DiskHit) -> io::Result<Bytes> {
        if let Some(b) = &hit.body {
            hit.entry.mark_read();
            return Ok(b.clone());
        }
        let at = Some(hit.entry.record_seq());
        let Some((_, data)) = self.fetch_record(key, at, hit.entry.hot()).await? else {
            return Err(io::Error::other("inline body gone"));
        };
        match record_body(&data, &hit.entry) {
            Some(range) => {
                hit.entry.mark_read();
                Ok(data.slice(range))
            }
            None => {
                // A pending write's record (another copy) or a damaged one: a miss; a
                // damaged one is found and counted by the next lookup that parses it.
                self.held.invalidate(key);
                Err(io::Error::other("inline body does not match its entry"))
            }
        }
    }

    /// The Vary names stored for a primary key the load has not reached yet (`None` once the
    /// load is done: the engine's own index knows them then).
    pub async fn unloaded_vary(&self, primary: &KeyHash) -> Option<String> {
        if !self.loading.load(Ordering::Acquire) {
            return None;
        }
        let store = Arc::clone(&self.store);
        let k = *primary;
        self.job(Lane::Read, move || store.vary(&k))
            .await
            .ok()?
            .ok()?
    }

    /// Forgets the Vary names stored for these primary keys (no tier holds a variant of them).
    pub fn forget_vary(&self, primaries: Vec<KeyHash>) {
        self.store.forget_vary(primaries);
    }

    /// Up to `limit` primary keys with Vary names stored, after `after` in key order.
    pub async fn vary_keys(
        &self,
        after: Option<KeyHash>,
        limit: usize,
    ) -> io::Result<Vec<KeyHash>> {
        let store = Arc::clone(&self.store);
        self.job(Lane::Read, move || store.vary_keys(after.as_ref(), limit))
            .await?
    }

    /// The largest purge sequence any stored object recorded.
    pub async fn max_purge_seq(&self) -> u64 {
        let store = Arc::clone(&self.store);
        self.job(Lane::Read, move || store.max_purge_seq())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0)
    }

    /// Replaces the metadata of a stored object after a 304 that confirmed the version
    /// `revalidated` describes, keeping its body. A copy of another version (see
    /// [`CachedMeta::same_version`]) is not given the metadata: it is handed back, for the
    /// caller to decide (a fill's older copy goes; a pushed object just replaced stays).
    pub async fn update_meta(
        &self,
        key: &KeyHash,
        meta: &Arc<CachedMeta>,
        revalidated: &CachedMeta,
    ) -> io::Result<MetaUpdate> {
        let Some(hit) = self.peek(key).await else {
            return Ok(MetaUpdate::NoCopy);
        };
        if !hit.meta.same_version(revalidated) {
            return Ok(MetaUpdate::OtherVersion(hit.entry));
        }
        let entry = hit.entry.clone();
        // An inline body is rewritten with its record.
        let body = if entry.inline {
            self.inline_body(key, &hit).await?
        } else {
            Bytes::new()
        };
        let mut put = MetaFileOut {
            integrity: entry.sri.text(),
            size: entry.size,
            inline: entry.inline,
            meta,
        }
        .put(*key, &body)?;
        // Only onto the copy it was made for: a fill may have stored a new one meanwhile.
        put.expect = Some(entry.copy());
        self.touch(*key);
        let Some(seq) = self.store.put(put).await? else {
            // Replaced meanwhile: the new copy is not the one revalidated.
            return Ok(MetaUpdate::NoCopy);
        };
        entry.set_record(seq);
        // After the commit: a lookup that sees the new generation reads the new record.
        let generation = entry.meta_gen.fetch_add(1, Ordering::AcqRel) + 1;
        if self
            .index
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(&current, &entry))
        {
            self.held
                .insert(*key, HeldMeta::new(entry, generation, meta.clone()));
        }
        Ok(MetaUpdate::Updated)
    }

    /// Removes an object (from the store first, so it can never be found half-removed).
    /// Runs `job` on the blocking pool once a slot of `lane` is free (see [`Lane`]).
    pub(super) async fn job<T: Send + 'static>(
        &self,
        lane: Lane,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let slot = Arc::clone(self.lanes.of(lane))
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        #[cfg(test)]
        self.lanes.started[lane as usize].fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            job()
        })
        .await
        .map_err(io::Error::other)
    }

    /// [`DiskTier::job`], or on this thread when `here` (a hot file, see [`HOT_FOR`]).
    pub(super) async fn here_or_job<T: Send + 'static>(
        &self,
        here: bool,
        lane: Lane,
        job: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        if here {
            return job();
        }
        self.job(lane, job).await?
    }

    /// Jobs started in `lane` so far.
    #[cfg(test)]
    pub(crate) fn jobs_started(&self, lane: Lane) -> u64 {
        self.lanes.started[lane as usize].load(Ordering::Relaxed)
    }

    pub async fn remove(&self, key: &KeyHash) {
        self.touch(*key);
        self.store.delete(*key);
        if let Some((_, entry)) = self.index.remove(key) {
            self.indexed.sub(&entry);
            self.doorkeeper.remember(key);
        }
        self.held.invalidate(key);
    }

    #[cfg(test)]
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The copy `key` holds now, if indexed (no I/O): to remove later by copy.
    pub fn copy_of(&self, key: &KeyHash) -> Option<Arc<DiskEntry>> {
        self.index.peek(key)
    }

    /// Removes `entry`'s copy of `key` if the key still holds it: a sweep that found a copy
    /// purged must not remove a new copy a fill or a push stored after it looked.
    pub fn remove_copy(&self, key: &KeyHash, entry: &Arc<DiskEntry>) {
        self.touch(*key);
        self.store.delete_if(*key, entry.copy());
        if self.unindex(key, entry) {
            self.doorkeeper.remember(key);
        }
    }

    /// Makes every write durable and closes the database (at shutdown).
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.store.close().await;
    }

    /// Waits until every metadata write queued so far is durable (and what a
    /// [`DiskTier::store_whole`] asked to be told of it has been told).
    pub async fn flush(&self) {
        self.store.flush().await;
    }

    /// Whether the index is open (not failed and waiting to be opened again), and how many
    /// times it failed and was closed to be opened again since start.
    pub fn index_health(&self) -> (bool, u64) {
        (self.store.is_open(), self.store.reopens())
    }

    /// Index transactions committed, and failed, since start.
    pub fn index_commits(&self) -> (u64, u64) {
        (
            self.store.commits.load(Ordering::Relaxed),
            self.store.errors.load(Ordering::Relaxed),
        )
    }

    /// Objects evicted for space since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Metadata records dropped since start because they failed their checksum or format check.
    pub fn rejected_metadata(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Unreferenced content files the start-up sweep removed, and whether it has finished.
    pub fn swept(&self) -> (u64, bool) {
        (
            self.swept.load(Ordering::Relaxed),
            self.sweep_done.load(Ordering::Acquire),
        )
    }

    /// Walks cacache's `content-v2/<algorithm>/xx/yy/<rest>`; returns (files, bytes) removed.
    /// Removes content files that no index entry references: a crash between a fill's content
    /// commit and its metadata commit leaves one, outside the size accounting (issue 13, item
    /// 15). Runs once, after the start-up load. Only files last written before the start (less
    /// [`STAMP_SETTLE`], for coarse timestamps) are candidates, so a body a fill of this run
    /// is committing is never taken, and a candidate's reference count is checked again right
    /// before it goes.
    fn sweep_blocking(&self, cutoff: SystemTime) -> (u64, u64) {
        let dirs = |p: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .collect()
        };
        let (mut files, mut bytes) = (0, 0);
        for (algorithm, algo_dir) in dirs(&self.content.join("content-v2")) {
            let Ok(algorithm) = algorithm.parse::<cacache::Algorithm>() else {
                continue;
            };
            for (a, a_dir) in dirs(&algo_dir) {
                for (b, b_dir) in dirs(&a_dir) {
                    for (rest, path) in dirs(&b_dir) {
                        let Ok(sri) = Integrity::from_hex(format!("{a}{b}{rest}"), algorithm)
                        else {
                            continue;
                        };
                        let key = sri.to_string();
                        if self.refs.is_referenced(&key) {
                            continue;
                        }
                        let Ok(md) = std::fs::symlink_metadata(&path) else {
                            continue;
                        };
                        let old = md.modified().is_ok_and(|t| t < cutoff);
                        if !md.is_file() || !old {
                            continue;
                        }
                        match self
                            .refs
                            .remove_if_unreferenced(&key, || std::fs::remove_file(&path))
                        {
                            Some(Ok(())) => {
                                files += 1;
                                bytes += md.len();
                            }
                            Some(Err(e)) => {
                                debug!(file = %path.display(), error = %e, "removing unreferenced content");
                            }
                            None => {}
                        }
                    }
                }
            }
        }
        (files, bytes)
    }

    pub fn run_pending_tasks(&self) {
        self.held.run_pending_tasks();
    }

    pub fn entry_count(&self) -> u64 {
        self.index.len() as u64
    }

    /// Bytes the indexed objects take on disk (bodies and ~2 KiB of metadata each).
    pub fn stored_bytes(&self) -> u64 {
        self.indexed.disk.load(Ordering::Relaxed)
    }

    /// Memory the index takes (its entries as charged, see [`INDEX_ENTRY_BYTES`], and the
    /// share set aside for its journal and its doorkeeper), and the most it may take.
    pub fn index_memory(&self) -> (u64, u64) {
        let set_aside = self.indexed.set_aside;
        (
            self.indexed.memory.load(Ordering::Relaxed) + set_aside,
            self.indexed.memory_budget.saturating_add(set_aside),
        )
    }

    /// Whether a new object under `key`, of `size` bytes if known, is to be written
    /// ([`admission`]): always while the index has room for it; once it has not, on the key's
    /// second miss lately (this call counts as a miss). A key with a copy stored is not new:
    /// ask [`DiskTier::copy_of`] first.
    pub fn admits_new(&self, key: &KeyHash, size: Option<u64>) -> bool {
        self.has_room_for(size) || self.doorkeeper.seen_again(key)
    }

    /// Whether an object of `size` bytes (if known) can be indexed without evicting another:
    /// the index's free weight is at least the object's in every shard (quick_cache evicts by
    /// shard), and at least a 32nd of the capacity. Copies being written are weighed once
    /// indexed, so a burst of fills that all find the last room evicts a few; and during the
    /// start-up load the index holds only what the load has reached.
    pub(crate) fn has_room_for(&self, size: Option<u64>) -> bool {
        let capacity = self.capacity;
        let room = capacity.saturating_sub(self.index.weight());
        let needs = size.map_or(0, |size| {
            self.weight
                .of(disk_bytes(size), index_bytes(size <= INLINE_MAX))
        });
        // Each shard evicts when it has no room of its own: every one must have room for it.
        room >= needs.saturating_mul(self.shards).max(capacity / 32)
    }

    /// Indexes `entry` under `key`, whose put has committed. The copy it replaces goes to the
    /// deleter like an eviction, marked as replaced.
    /// Returns the copy it replaced, if any.
    fn index_entry(&self, key: KeyHash, entry: Arc<DiskEntry>) -> Option<Arc<DiskEntry>> {
        let old = self.index.peek(&key);
        if let Some(old) = &old {
            old.replaced.store(true, Ordering::Release);
        }
        self.indexed.add(&entry);
        self.index.insert(key, entry);
        old
    }

    /// `entry`'s put under `key` is lost (made visible, then the index failed and opened again
    /// without it): it leaves the index, and the newest durable copy before it, which the
    /// reopened index names, comes back. If a newer put replaced it meanwhile, its chain stays
    /// for that put's own outcome (lost too, it puts back the same durable copy).
    pub(super) fn lost(&self, key: &KeyHash, entry: &Arc<DiskEntry>) {
        if self.unindex(key, entry)
            && let Some(old) = entry.durable_before()
        {
            self.reinstate(*key, &old);
        }
    }

    /// Indexes `old` again (as a new entry: the index may still be handing the old one over as
    /// replaced), the copy a put replaced, once that put is lost (see `commit_entry`): unless
    /// the key holds a copy again (a newer put stands) or its removal is pending.
    pub(super) fn reinstate(&self, key: KeyHash, old: &DiskEntry) {
        if self.store.pending_delete(&key) {
            return;
        }
        if let quick_cache::sync::GuardResult::Guard(slot) =
            self.index.get_value_or_guard(&key, None)
        {
            let again = old.again();
            self.indexed.add(&again);
            if slot.insert(Arc::clone(&again)).is_err() {
                self.indexed.sub(&again);
            }
        }
    }

    /// Takes `entry` out of the index if it is still the key's (then true), and drops metadata held for
    /// it.
    fn unindex(&self, key: &KeyHash, entry: &Arc<DiskEntry>) -> bool {
        let gone = self.index.remove_if(key, |cur| Arc::ptr_eq(cur, entry));
        if let Some((_, gone)) = &gone {
            self.indexed.sub(gone);
        }
        self.forget_held(key, entry);
        gone.is_some()
    }
}

/// A committed record: at `at` (an indexed entry's), or the key's (blocking).
fn read_stored(store: &Store, key: &KeyHash, at: Option<u64>) -> io::Result<Option<(u64, Bytes)>> {
    let record = match at {
        Some(seq) => store.get_at(seq, key)?.map(|r| (seq, r)),
        None => store.get(key)?,
    };
    Ok(record.map(|(seq, r)| (seq, Bytes::from(r))))
}

async fn remove_dir_contents(dir: &Path) {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let p = e.path();
        if p.is_dir() {
            let _ = tokio::fs::remove_dir_all(&p).await;
        } else {
            let _ = tokio::fs::remove_file(&p).await;
        }
    }
}

/// Tests hold the start-up load of a directory back, to see the tier serve before it.
#[cfg(test)]
pub(crate) mod load_gate {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::sync::mpsc::{Receiver, Sender, channel};

    static GATES: Mutex<Vec<(PathBuf, Receiver<()>)>> = Mutex::new(Vec::new());

    /// Holds the next load of `root` until the sender sends or is dropped.
    pub(crate) fn hold(root: &Path) -> Sender<()> {
        let (tx, rx) = channel();
        GATES.lock().unwrap().push((root.to_path_buf(), rx));
        tx
    }

    pub(super) fn wait(root: &Path) {
        let gate = {
            let mut gates = GATES.lock().unwrap();
            let at = gates.iter().position(|(p, _)| p == root);
            at.map(|i| gates.swap_remove(i).1)
        };
        if let Some(rx) = gate {
            let _ = rx.recv();
        }
    }
}
