//! Disk tier: body content in cacache (content-addressed, written to `tmp/` and renamed on
//! commit, verified by its integrity hash on read), metadata in one small JSON file per object
//! that is replaced atomically (write + rename).
//!
//! Why not cacache's own index: its buckets are append-only (every rewrite of a key, such as a
//! 304 metadata update, adds a line that `find` must read forever) and it has no garbage
//! collection. Our metadata files are overwritten in place by rename, so the index never grows
//! beyond one file per live object, and size accounting plus LRU eviction come from a moka index
//! (weighed in bytes) whose eviction listener deletes content that no entry references any more.
//!
//! Crash safety: a fill writes content first, then renames its metadata file into place. A crash
//! before the rename leaves only unreferenced content (never visible); a crash mid-write leaves a
//! temporary file that start-up deletes.
//!
//! Integrity: every read is checked, and a damaged body is removed and treated as a miss. A
//! stream is hashed as it goes (its last chunk held back until the hash matched). A whole read
//! is hashed too, except when the content file is the very file whose bytes last matched the
//! hash in this process, unchanged since: same device, inode, length, mtime and ctime, with
//! those times older than that read by [`STAMP_SETTLE`] (so a change within one timestamp tick
//! cannot hide). Any write, truncation or replacement through the file system is caught that
//! way; what is not caught until the next start (when every entry begins unchecked) is damage
//! below the file system that leaves the file's metadata alone.
//!
//! Hits: the parsed metadata of recently hit objects is held in memory (a second moka cache,
//! bounded in bytes), so a hit on one of them reads only its body. A held copy is tied to the
//! index entry it was read for and to that entry's metadata generation (bumped by a 304
//! update), so a replaced body or a rewritten metadata file is never answered with the old
//! metadata.
//!
//! Layout under `cache_dir`: `content/` (cacache), `meta/xx/<key-hash>.json`, `meta/.tmp/`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cacache::Integrity;
use dashmap::DashMap;
use futures_util::Stream;
use moka::notification::RemovalCause;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::key::KeyHash;
use super::meta::CachedMeta;

/// What the in-memory index knows about one object on disk. A commit under a key installs a
/// new entry (a new `Arc`), so an entry's identity stands for one stored body.
#[derive(Debug)]
pub struct DiskEntry {
    pub sri: Integrity,
    pub size: u64,
    /// The content was checked against its hash since this process started (it wrote it, or
    /// a full read verified it). Entries loaded at start-up begin unverified.
    pub verified: AtomicBool,
    /// Bumped after each rewrite of the metadata file (a 304 update): metadata held in memory
    /// from an earlier generation is not used again.
    meta_gen: AtomicU64,
    /// The content file as it was when a whole read last found its bytes matching the hash
    /// (see the module docs); `None` until then.
    checked_file: Mutex<Option<FileStamp>>,
    /// The content file's path, kept once a whole read needed it (deriving it takes a few
    /// allocations per read otherwise).
    content_path: OnceLock<PathBuf>,
}

impl DiskEntry {
    fn new(sri: Integrity, size: u64, verified: bool) -> Arc<Self> {
        Arc::new(Self {
            sri,
            size,
            verified: AtomicBool::new(verified),
            meta_gen: AtomicU64::new(0),
            checked_file: Mutex::new(None),
            content_path: OnceLock::new(),
        })
    }
}

/// A content file as the file system describes it. A write, truncation or replacement changes
/// at least one field, provided the times were taken a timestamp tick after the previous change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How much older than a read a file's times must be before its stamp may stand in for the
/// hash: file systems with coarse timestamps (ticks of milliseconds, on some up to 2 s) give a
/// change made in the same tick as the file's last one the same times. Git's "racily clean"
/// index entries are the same problem.
pub const STAMP_SETTLE: Duration = Duration::from_secs(3);

impl FileStamp {
    #[cfg(unix)]
    fn of(md: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        Some(Self {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Option<Self> {
        None
    }

    /// Both times lie at least [`STAMP_SETTLE`] before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let Some(limit) = now
            .checked_sub(STAMP_SETTLE)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        else {
            return false;
        };
        let limit = (
            i64::try_from(limit.as_secs()).unwrap_or(i64::MAX),
            i64::from(limit.subsec_nanos()),
        );
        self.mtime < limit && self.ctime < limit
    }
}

/// How a whole read made sure of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    /// Hashed and compared with the integrity.
    Hashed,
    /// The file is the one whose bytes last matched the hash, unchanged.
    Unchanged,
}

/// The metadata file as read.
#[derive(Deserialize)]
struct MetaFile {
    integrity: String,
    size: u64,
    meta: CachedMeta,
}

/// The metadata file as written: the same fields, borrowing the metadata.
#[derive(Serialize)]
struct MetaFileOut<'a> {
    integrity: String,
    size: u64,
    meta: &'a CachedMeta,
}

/// Parsed metadata held in memory, valid for one index entry at one metadata generation.
#[derive(Clone)]
struct HeldMeta {
    entry: Arc<DiskEntry>,
    generation: u64,
    meta: Arc<CachedMeta>,
    /// Bytes charged: twice the metadata file's length, a rough measure of the parsed form
    /// (header maps and the policy's copies of the headers).
    weight: u32,
}

impl HeldMeta {
    fn new(entry: Arc<DiskEntry>, generation: u64, meta: Arc<CachedMeta>, file_len: usize) -> Self {
        Self {
            entry,
            generation,
            meta,
            weight: file_len.saturating_mul(2).try_into().unwrap_or(u32::MAX),
        }
    }
}

/// Memory for held metadata: 1/32 of the tier's capacity, between 1 MiB and 64 MiB (at a few
/// KiB per object, the metadata of some 10-30 thousand hot objects).
fn held_meta_budget(capacity: u64) -> u64 {
    (capacity / 32).clamp(1 << 20, 64 << 20)
}

/// A disk lookup result: metadata known, body not yet read.
#[derive(Debug, Clone)]
pub struct DiskHit {
    pub meta: Arc<CachedMeta>,
    pub entry: Arc<DiskEntry>,
}

/// Bodies up to this size are read whole in one blocking call rather than streamed: a stream
/// holds up to two 64 KiB chunks per request anyway, and each chunk of a stream is a separate
/// trip to the blocking pool.
pub const WHOLE_READ_MAX: u64 = 128 * 1024;

pub struct DiskTier {
    content: Arc<Path>,
    meta_dir: PathBuf,
    tmp_dir: PathBuf,
    index: moka::sync::Cache<KeyHash, Arc<DiskEntry>>,
    /// Metadata of recently hit objects (see the module docs).
    held: moka::sync::Cache<KeyHash, HeldMeta>,
    refs: Arc<DashMap<String, u32>>,
    tmp_seq: AtomicU64,
    evictions: AtomicU64,
}

struct Deletion {
    key: KeyHash,
    entry: Arc<DiskEntry>,
    cause: RemovalCause,
}

impl DiskTier {
    /// Opens (or creates) the tier and rebuilds its index from the metadata files. Returns the
    /// tier and every loaded object's metadata (the caller rebuilds its Vary index from them).
    pub async fn open(
        root: &Path,
        capacity: u64,
    ) -> io::Result<(Arc<Self>, Vec<(KeyHash, Arc<CachedMeta>)>)> {
        let content: Arc<Path> = root.join("content").into();
        let meta_dir = root.join("meta");
        let tmp_dir = meta_dir.join(".tmp");
        tokio::fs::create_dir_all(&content).await?;
        tokio::fs::create_dir_all(&tmp_dir).await?;
        // Interrupted writes never become visible; their leftovers go now.
        remove_dir_contents(&tmp_dir).await;
        remove_dir_contents(&content.join("tmp")).await;

        let (tx, rx) = mpsc::unbounded_channel::<Deletion>();
        let index = moka::sync::Cache::builder()
            .name("outpost-disk-index")
            .max_capacity(capacity)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|_k: &KeyHash, e: &Arc<DiskEntry>| {
                (e.size + 2048).try_into().unwrap_or(u32::MAX)
            })
            .eviction_listener(move |key: Arc<KeyHash>, entry, cause| {
                let _ = tx.send(Deletion {
                    key: *key,
                    entry,
                    cause,
                });
            })
            .build();
        let held = moka::sync::Cache::builder()
            .name("outpost-disk-meta")
            .max_capacity(held_meta_budget(capacity))
            .weigher(|_k: &KeyHash, h: &HeldMeta| h.weight)
            .build();
        let tier = Arc::new(Self {
            content,
            meta_dir,
            tmp_dir,
            index,
            held,
            refs: Arc::new(DashMap::new()),
            tmp_seq: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        });
        let loaded = {
            let dir = tier.meta_dir.clone();
            tokio::task::spawn_blocking(move || scan_meta_dir(&dir))
                .await
                .map_err(io::Error::other)?
        };
        let mut metas = Vec::with_capacity(loaded.len());
        for (key, file) in loaded {
            let Ok(sri) = file.integrity.parse::<Integrity>() else {
                continue;
            };
            tier.incref(&sri);
            tier.index
                .insert(key, DiskEntry::new(sri, file.size, false));
            metas.push((key, Arc::new(file.meta)));
        }
        if !metas.is_empty() {
            info!(objects = metas.len(), dir = %root.display(), "disk tier loaded");
        }
        tokio::spawn(Arc::clone(&tier).run_deleter(rx));
        Ok((tier, metas))
    }

    /// Where cacache keeps a body (its `content-v2` layout). Should that layout change, whole
    /// reads find nothing here and fall back to cacache's own checked read.
    fn content_path(&self, sri: &Integrity) -> PathBuf {
        let (algorithm, hex) = sri.to_hex();
        self.content
            .join("content-v2")
            .join(algorithm.to_string())
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(&hex[4..])
    }

    fn meta_path(&self, key: &KeyHash) -> PathBuf {
        let hex = key.hex();
        self.meta_dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    fn incref(&self, sri: &Integrity) {
        *self.refs.entry(sri.to_string()).or_insert(0) += 1;
    }

    /// Drops one reference; true when the content is no longer referenced.
    fn decref(&self, sri: &Integrity) -> bool {
        let k = sri.to_string();
        let mut gone = false;
        if let Some(mut n) = self.refs.get_mut(&k) {
            *n = n.saturating_sub(1);
            gone = *n == 0;
        }
        if gone {
            self.refs.remove_if(&k, |_, n| *n == 0);
        }
        gone
    }

    async fn run_deleter(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Deletion>) {
        while let Some(d) = rx.recv().await {
            if matches!(d.cause, RemovalCause::Size | RemovalCause::Expired)
                && !self.index.contains_key(&d.key)
            {
                let _ = tokio::fs::remove_file(self.meta_path(&d.key)).await;
                self.held.invalidate(&d.key);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                debug!(key = %d.key, size = d.entry.size, "disk eviction");
            }
            if self.decref(&d.entry.sri)
                && let Err(e) = cacache::remove_hash(&self.content, &d.entry.sri).await
            {
                debug!(error = %e, "removing unreferenced content");
            }
        }
    }

    /// A snapshot of the keys on disk (for background reclamation).
    pub fn keys(&self) -> Vec<KeyHash> {
        self.index.iter().map(|(k, _)| *k).collect()
    }

    pub fn contains(&self, key: &KeyHash) -> bool {
        self.index.contains_key(key)
    }

    /// Looks up an object: its metadata from memory when held, else from its file (and then
    /// held). A missing or unreadable metadata file is a miss (and is cleaned up).
    pub async fn get(&self, key: &KeyHash) -> Option<DiskHit> {
        self.lookup(key, true).await
    }

    /// Like [`DiskTier::get`], but metadata read from a file is not held: for sweeps over every
    /// object, which must not push the hot objects' metadata out.
    pub async fn peek(&self, key: &KeyHash) -> Option<DiskHit> {
        self.lookup(key, false).await
    }

    async fn lookup(&self, key: &KeyHash, hold: bool) -> Option<DiskHit> {
        let entry = self.index.get(key)?;
        // Read before the file: a 304 update bumps it after renaming the new file into place.
        let generation = entry.meta_gen.load(Ordering::Acquire);
        if let Some(h) = self.held.get(key)
            && Arc::ptr_eq(&h.entry, &entry)
            && h.generation == generation
        {
            return Some(DiskHit {
                meta: h.meta,
                entry,
            });
        }
        let (meta, file_len) = self.read_meta(key, &entry).await?;
        if hold {
            self.held.insert(
                *key,
                HeldMeta::new(entry.clone(), generation, meta.clone(), file_len),
            );
        }
        Some(DiskHit { meta, entry })
    }

    /// Reads and parses an object's metadata file; `None` (a miss) when it is missing, damaged,
    /// of another format version, or describes other content than `entry`.
    async fn read_meta(
        &self,
        key: &KeyHash,
        entry: &DiskEntry,
    ) -> Option<(Arc<CachedMeta>, usize)> {
        match tokio::fs::read(self.meta_path(key)).await {
            Ok(data) => match serde_json::from_slice::<MetaFile>(&data) {
                Ok(f) if f.meta.version == super::meta::META_VERSION => {
                    if f.integrity.parse::<Integrity>().ok().as_ref() != Some(&entry.sri) {
                        // A commit renamed a new file into place and has not indexed it yet;
                        // never pair one body with another's metadata.
                        debug!(key = %key, "disk metadata names other content than the index");
                        return None;
                    }
                    Some((Arc::new(f.meta), data.len()))
                }
                Ok(f) => {
                    warn!(key = %key, version = f.meta.version, "disk metadata of another format version, dropping entry");
                    self.remove(key).await;
                    None
                }
                Err(e) => {
                    warn!(key = %key, error = %e, "corrupt disk metadata, dropping entry");
                    self.remove(key).await;
                    None
                }
            },
            Err(e) => {
                warn!(key = %key, error = %e, "disk metadata unreadable, dropping entry");
                self.index.invalidate(key);
                self.held.invalidate(key);
                None
            }
        }
    }

    /// Reads a whole body and checks it (see the module docs on integrity), in one trip to the
    /// blocking pool: open, read and hash happen there, off the async workers. A damaged body
    /// is removed.
    pub async fn read_all(&self, key: &KeyHash, hit: &DiskHit) -> io::Result<Bytes> {
        let content = self.content.clone();
        let entry = hit.entry.clone();
        entry
            .content_path
            .get_or_init(|| self.content_path(&entry.sri));
        let read = tokio::task::spawn_blocking(move || {
            let path = entry.content_path.get().expect("set above");
            read_checked(path, &content, &entry, SystemTime::now())
        })
        .await
        .map_err(io::Error::other)?;
        match read {
            Ok((data, _)) => {
                hit.entry.verified.store(true, Ordering::Release);
                Ok(Bytes::from(data))
            }
            Err(e) => {
                warn!(key = %key, error = %e, "disk entry failed its integrity check, dropping it");
                self.remove(key).await;
                Err(io::Error::other(e.to_string()))
            }
        }
    }

    /// Checks a stored body against its hash by reading it through once (without keeping
    /// it). A mismatch removes the entry. Used before the first stream of an object loaded from
    /// a previous run, so a damaged object is a miss rather than a response.
    pub async fn verify(&self, key: &KeyHash, hit: &DiskHit) -> bool {
        if hit.entry.verified.load(Ordering::Acquire) {
            return true;
        }
        let ok = async {
            let mut r = cacache::Reader::open_hash(&self.content, hit.entry.sri.clone())
                .await
                .ok()?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            r.check().ok()
        }
        .await
        .is_some();
        if ok {
            hit.entry.verified.store(true, Ordering::Release);
        } else {
            warn!(key = %key, "disk entry failed its integrity check, dropping it");
            self.remove(key).await;
        }
        ok
    }

    /// Streams a body in chunks. The last chunk is held back until the integrity check at the
    /// end has passed: on a mismatch the stream ends with an error *before* the final bytes,
    /// so a client never receives a damaged body presented as complete, and the entry is
    /// removed.
    pub fn stream(
        self: &Arc<Self>,
        key: KeyHash,
        hit: &DiskHit,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        struct St {
            tier: Arc<DiskTier>,
            sri: Integrity,
            reader: Option<cacache::Reader>,
            pending: Option<Bytes>,
            done: bool,
        }
        let st = St {
            tier: Arc::clone(self),
            sri: hit.entry.sri.clone(),
            reader: None,
            pending: None,
            done: false,
        };
        futures_util::stream::unfold(st, move |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                if st.reader.is_none() {
                    match cacache::Reader::open_hash(&st.tier.content, st.sri.clone()).await {
                        Ok(r) => st.reader = Some(r),
                        Err(e) => {
                            st.tier.remove(&key).await;
                            st.done = true;
                            return Some((Err(io::Error::other(e.to_string())), st));
                        }
                    }
                }
                let reader = st.reader.as_mut().expect("opened above");
                let mut buf = vec![0u8; 64 * 1024];
                match reader.read(&mut buf).await {
                    Ok(0) => {
                        st.done = true;
                        let reader = st.reader.take().expect("opened above");
                        return match reader.check() {
                            Ok(_) => st.pending.take().map(|last| (Ok(last), st)),
                            Err(e) => {
                                warn!(key = %key, error = %e, "disk entry failed its integrity check, dropping it");
                                st.tier.remove(&key).await;
                                st.pending = None;
                                Some((Err(io::Error::other("integrity check failed")), st))
                            }
                        };
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        if let Some(prev) = st.pending.replace(Bytes::from(buf)) {
                            return Some((Ok(prev), st));
                        }
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        })
    }

    /// Starts writing a body. Nothing is visible until [`DiskWriter::commit`]; dropping the
    /// writer discards the partial content.
    pub async fn begin_write(
        self: &Arc<Self>,
        key: KeyHash,
        size: Option<u64>,
    ) -> io::Result<DiskWriter> {
        // No `.size(n)`: with cacache's `mmap` feature a known size up to 1 MiB maps a buffer
        // that only accepts the body in one write, and fills arrive in network-sized pieces.
        // Our metadata file records the size, and the fill checks Content-Length itself.
        let _ = size;
        let writer = cacache::WriteOpts::new()
            .open_hash(&self.content)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(DiskWriter {
            tier: Arc::clone(self),
            key,
            writer,
            written: 0,
        })
    }

    /// Writes a metadata file atomically (temporary file, then rename); returns its length.
    async fn write_meta_file(&self, key: &KeyHash, file: &MetaFileOut<'_>) -> io::Result<usize> {
        let data = serde_json::to_vec(file).map_err(io::Error::other)?;
        let path = self.meta_path(key);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = self.tmp_dir.join(format!(
            "{}.{}.{}",
            key.hex(),
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        tokio::fs::write(&tmp, &data).await?;
        if let Err(e) = tokio::fs::rename(&tmp, &path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        Ok(data.len())
    }

    /// Replaces the metadata of a stored object (after a 304), keeping its body.
    pub async fn update_meta(&self, key: &KeyHash, meta: &Arc<CachedMeta>) -> io::Result<()> {
        let Some(entry) = self.index.get(key) else {
            return Ok(());
        };
        let file_len = self
            .write_meta_file(
                key,
                &MetaFileOut {
                    integrity: entry.sri.to_string(),
                    size: entry.size,
                    meta,
                },
            )
            .await?;
        // After the rename: a lookup that sees the new generation reads the new file.
        let generation = entry.meta_gen.fetch_add(1, Ordering::AcqRel) + 1;
        if self
            .index
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(&current, &entry))
        {
            self.held.insert(
                *key,
                HeldMeta::new(entry, generation, meta.clone(), file_len),
            );
        }
        Ok(())
    }

    /// Removes an object (metadata first, so it can never be found half-removed).
    pub async fn remove(&self, key: &KeyHash) {
        let _ = tokio::fs::remove_file(self.meta_path(key)).await;
        self.index.invalidate(key);
        self.held.invalidate(key);
    }

    /// Objects evicted for space since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    pub fn run_pending_tasks(&self) {
        self.index.run_pending_tasks();
        self.held.run_pending_tasks();
    }

    pub fn entry_count(&self) -> u64 {
        self.index.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.index.weighted_size()
    }
}

/// An in-progress disk write. `commit` makes it visible; drop aborts.
pub struct DiskWriter {
    tier: Arc<DiskTier>,
    key: KeyHash,
    writer: cacache::Writer,
    written: u64,
}

impl DiskWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.writer.write_all(chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn commit(self, meta: &Arc<CachedMeta>) -> io::Result<()> {
        let meta = meta.clone();
        self.finish(move |_, _| meta).await.map(|_| ())
    }

    /// Commits, building the metadata once the content hash and size are known (pushed
    /// objects derive their ETag from the hash). Returns the hash.
    pub async fn commit_with(
        self,
        meta: impl FnOnce(&Integrity, u64) -> CachedMeta,
    ) -> io::Result<Integrity> {
        self.finish(|sri, size| Arc::new(meta(sri, size))).await
    }

    async fn finish(
        self,
        meta: impl FnOnce(&Integrity, u64) -> Arc<CachedMeta>,
    ) -> io::Result<Integrity> {
        let sri = self
            .writer
            .commit()
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let meta = meta(&sri, self.written);
        let file = MetaFileOut {
            integrity: sri.to_string(),
            size: self.written,
            meta: &meta,
        };
        // Reference first, so a concurrent eviction of an identical body keeps the content.
        self.tier.incref(&sri);
        let file_len = match self.tier.write_meta_file(&self.key, &file).await {
            Ok(n) => n,
            Err(e) => {
                if self.tier.decref(&sri) {
                    let _ = cacache::remove_hash(&self.tier.content, &sri).await;
                }
                return Err(e);
            }
        };
        let entry = DiskEntry::new(sri.clone(), self.written, true);
        self.tier.index.insert(self.key, entry.clone());
        // Just written: the first hit needs no metadata read.
        self.tier
            .held
            .insert(self.key, HeldMeta::new(entry, 0, meta, file_len));
        Ok(sri)
    }
}

/// Reads the body at `path` whole, checked: hashed, unless the file is the one whose bytes last
/// matched the hash, unchanged (same stamp before and after this read, settled at `now`). A
/// successful hash of a settled, stable file records its stamp. At most `entry.size + 1` bytes
/// are read: a file of another length is damaged.
fn read_checked(
    path: &Path,
    cache: &Path,
    entry: &DiskEntry,
    now: SystemTime,
) -> io::Result<(Vec<u8>, Checked)> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let data = cacache::read_hash_sync(cache, &entry.sri).map_err(io::Error::other)?;
            return Ok((data, Checked::Hashed));
        }
        Err(e) => return Err(e),
    };
    let before = FileStamp::of(&file.metadata()?);
    let mut data = Vec::with_capacity(usize::try_from(entry.size).unwrap_or(0));
    (&mut file).take(entry.size + 1).read_to_end(&mut data)?;
    if data.len() as u64 != entry.size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "content is {} bytes, the index says {}",
                data.len(),
                entry.size
            ),
        ));
    }
    let after = FileStamp::of(&file.metadata()?);
    let stable = before.is_some() && before == after;
    let checked = &entry.checked_file;
    if stable && *checked.lock().unwrap_or_else(PoisonError::into_inner) == before {
        return Ok((data, Checked::Unchanged));
    }
    entry.sri.check(&data).map_err(io::Error::other)?;
    if stable && before.is_some_and(|s| s.settled(now)) {
        *checked.lock().unwrap_or_else(PoisonError::into_inner) = before;
    }
    Ok((data, Checked::Hashed))
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

/// Reads every metadata file. Unparsable files are deleted (logged): they can only come from an
/// older format or from damage, and either way they must not be served.
fn scan_meta_dir(dir: &Path) -> Vec<(KeyHash, MetaFile)> {
    let mut out = Vec::new();
    let Ok(shards) = std::fs::read_dir(dir) else {
        return out;
    };
    for shard in shards.flatten() {
        let path = shard.path();
        if !path.is_dir() || path.file_name().is_some_and(|n| n == ".tmp") {
            continue;
        }
        let Ok(files) = std::fs::read_dir(&path) else {
            continue;
        };
        for f in files.flatten() {
            let p = f.path();
            let Some(key) = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(KeyHash::from_hex)
            else {
                continue;
            };
            let parsed = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<MetaFile>(&d).map_err(|e| e.to_string()))
                .and_then(|f| {
                    if f.meta.version == super::meta::META_VERSION {
                        Ok(f)
                    } else {
                        Err(format!("metadata format version {}", f.meta.version))
                    }
                });
            match parsed {
                Ok(file) => out.push((key, file)),
                Err(e) => {
                    warn!(file = %p.display(), error = %e, "dropping unreadable disk metadata");
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::{Request, Response};

    use super::*;
    use crate::cache::policy::{self, Admission, AdmitOptions};

    fn meta(etag: &str) -> Arc<CachedMeta> {
        let req = Request::get("http://example.test/a")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let resp = Response::builder()
            .header("cache-control", "max-age=60")
            .header("etag", etag)
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let opts = AdmitOptions {
            surrogate: "edge".into(),
            default_ttl: None,
        };
        match policy::admit(&req, &resp, "example.test/a", SystemTime::now(), &opts) {
            Admission::Store(m) => Arc::new(*m),
            Admission::Pass(r) => panic!("not admitted: {}", r.as_str()),
        }
    }

    /// A tier of 1 GiB in a fresh directory (kept alive by the returned guard).
    async fn tier() -> (tempfile::TempDir, Arc<DiskTier>) {
        let dir = tempfile::tempdir().unwrap();
        let (tier, _) = DiskTier::open(dir.path(), 1 << 30).await.unwrap();
        (dir, tier)
    }

    async fn store(tier: &Arc<DiskTier>, key: KeyHash, body: &[u8], meta: &Arc<CachedMeta>) {
        let mut w = tier
            .begin_write(key, Some(body.len() as u64))
            .await
            .unwrap();
        w.write(body).await.unwrap();
        w.commit(meta).await.unwrap();
    }

    async fn etag_of(tier: &DiskTier, key: &KeyHash) -> Option<String> {
        let hit = tier.get(key).await?;
        Some(hit.meta.etag().unwrap_or_default().to_string())
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    /// A 304 rewrites the metadata file: later hits answer the new metadata, even when a
    /// lookup that read the old file holds it after the update, and so does a restart.
    #[tokio::test]
    async fn update_replaces_held_metadata() {
        let (dir, tier) = tier().await;
        let key = KeyHash::of("example.test/a");
        store(&tier, key, b"body", &meta("\"a\"")).await;
        assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"a\""));
        let late = tier
            .held
            .get(&key)
            .expect("held after the commit and the hit");

        tier.update_meta(&key, &meta("\"b\"")).await.unwrap();
        assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"b\""));
        tier.held.insert(key, late);
        assert_eq!(etag_of(&tier, &key).await.as_deref(), Some("\"b\""));
        let hit = tier.get(&key).await.unwrap();
        assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], b"body");

        let (reopened, _) = DiskTier::open(dir.path(), 1 << 30).await.unwrap();
        assert_eq!(etag_of(&reopened, &key).await.as_deref(), Some("\"b\""));
    }

    /// Metadata held for an entry that a new commit has replaced (a lookup racing the commit
    /// holds it late) is never paired with the new body.
    #[tokio::test]
    async fn metadata_held_for_a_replaced_entry_is_not_used() {
        let (_dir, tier) = tier().await;
        let key = KeyHash::of("example.test/a");
        store(&tier, key, b"old body", &meta("\"old\"")).await;
        tier.get(&key).await.unwrap();
        let late = tier
            .held
            .get(&key)
            .expect("held after the commit and the hit");

        store(&tier, key, b"new body", &meta("\"new\"")).await;
        tier.held.insert(key, late);
        let hit = tier.get(&key).await.unwrap();
        assert_eq!(hit.meta.etag(), Some("\"new\""));
        assert_eq!(&tier.read_all(&key, &hit).await.unwrap()[..], b"new body");
    }

    /// Holding the metadata skips no integrity check: a body damaged on disk after it was
    /// written and hit fails its read and the entry is gone.
    #[tokio::test]
    async fn damaged_body_with_held_metadata_is_removed() {
        let (dir, tier) = tier().await;
        let key = KeyHash::of("example.test/a");
        store(&tier, key, b"a body that will be damaged", &meta("\"a\"")).await;
        let hit = tier.get(&key).await.unwrap();
        assert!(tier.read_all(&key, &hit).await.is_ok());

        let files = files_under(&dir.path().join("content").join("content-v2"));
        assert!(!files.is_empty(), "no content file to damage");
        for f in &files {
            damage_in_place(f);
        }
        let hit = tier.get(&key).await.expect("metadata is held");
        assert!(tier.read_all(&key, &hit).await.is_err());
        assert!(
            tier.get(&key).await.is_none(),
            "the damaged entry is removed"
        );
    }

    /// A metadata file that names other content than the index entry (a commit between its
    /// rename and its index insert) is a miss, never another object's metadata.
    #[tokio::test]
    async fn metadata_file_of_other_content_is_a_miss() {
        let (_dir, tier) = tier().await;
        let (one, two) = (KeyHash::of("example.test/1"), KeyHash::of("example.test/2"));
        store(&tier, one, b"body one", &meta("\"1\"")).await;
        store(&tier, two, b"body two", &meta("\"2\"")).await;
        std::fs::copy(tier.meta_path(&two), tier.meta_path(&one)).unwrap();
        tier.held.invalidate(&one);
        assert!(tier.get(&one).await.is_none());
        assert_eq!(etag_of(&tier, &two).await.as_deref(), Some("\"2\""));
    }

    /// Sweeps (`peek`) read metadata without holding it; hits (`get`) hold it.
    #[tokio::test]
    async fn peek_does_not_hold_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyHash::of("example.test/a");
        {
            let (tier, _) = DiskTier::open(dir.path(), 1 << 30).await.unwrap();
            store(&tier, key, b"body", &meta("\"a\"")).await;
        }
        let (tier, _) = DiskTier::open(dir.path(), 1 << 30).await.unwrap();
        assert!(tier.peek(&key).await.is_some());
        tier.run_pending_tasks();
        assert_eq!(tier.held.entry_count(), 0);
        assert!(tier.get(&key).await.is_some());
        tier.run_pending_tasks();
        assert_eq!(tier.held.entry_count(), 1);
    }

    /// Overwrites a file in place (same inode) with `#` bytes of the same length.
    fn damage_in_place(path: &Path) {
        let len = std::fs::metadata(path).unwrap().len() as usize;
        let mut perms = std::fs::metadata(path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(path, perms).unwrap();
        std::fs::write(path, vec![b'#'; len]).unwrap();
    }

    /// A tier holding one body, `the body`: (guard, tier, its entry, its content file, the
    /// cacache directory).
    async fn one_body() -> (
        tempfile::TempDir,
        Arc<DiskTier>,
        Arc<DiskEntry>,
        PathBuf,
        PathBuf,
    ) {
        let (dir, tier) = tier().await;
        let key = KeyHash::of("example.test/a");
        store(&tier, key, b"the body", &meta("\"a\"")).await;
        let entry = tier.get(&key).await.unwrap().entry;
        let path = tier.content_path(&entry.sri);
        let content = dir.path().join("content");
        (dir, tier, entry, path, content)
    }

    /// A whole read skips the hash only for the file whose bytes last matched it, unchanged;
    /// a file replaced under the same name (a new inode) is hashed again and fails.
    #[tokio::test]
    async fn unchanged_file_skips_the_hash_replaced_file_does_not() {
        let (dir, _tier, entry, path, content) = one_body().await;
        assert!(
            path.is_file(),
            "cacache's content layout moved: {}",
            path.display()
        );
        // Seconds later, once the file's times have settled.
        let later = SystemTime::now() + STAMP_SETTLE * 2;

        let (data, how) = read_checked(&path, &content, &entry, later).unwrap();
        assert_eq!((&data[..], how), (&b"the body"[..], Checked::Hashed));
        let (data, how) = read_checked(&path, &content, &entry, later).unwrap();
        assert_eq!((&data[..], how), (&b"the body"[..], Checked::Unchanged));

        let replacement = dir.path().join("replacement");
        std::fs::write(&replacement, b"####_###").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert!(read_checked(&path, &content, &entry, later).is_err());
    }

    /// A file whose times are too recent to trust (a change in the same timestamp tick would
    /// keep them) is hashed on every read, so damage in place is still caught.
    #[tokio::test]
    async fn recent_file_is_hashed_on_every_read() {
        let (_dir, _tier, entry, path, content) = one_body().await;

        let (_, how) = read_checked(&path, &content, &entry, SystemTime::now()).unwrap();
        assert_eq!(how, Checked::Hashed);
        assert_eq!(*entry.checked_file.lock().unwrap(), None);
        damage_in_place(&path);
        assert!(read_checked(&path, &content, &entry, SystemTime::now()).is_err());
    }

    /// Where the content is not at the expected place, cacache's own checked read finds it.
    #[tokio::test]
    async fn content_elsewhere_falls_back_to_cacache() {
        let (dir, _tier, entry, _path, content) = one_body().await;
        let nowhere = dir.path().join("nowhere");
        let (data, how) = read_checked(&nowhere, &content, &entry, SystemTime::now()).unwrap();
        assert_eq!((&data[..], how), (&b"the body"[..], Checked::Hashed));
    }
}
