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
//! before the rename leaves only unreferenced content (never visible), which a background sweep
//! at start-up removes; a crash mid-write leaves a temporary file that start-up deletes.
//!
//! Metadata integrity: a metadata file starts with a line holding the blake3 hash of the JSON
//! that follows. A file that fails it (damage, a hand edit, the first format that had none) is
//! a miss: it is removed and counted, never served. It is checked whenever it is read from
//! disk; metadata already parsed and held in memory is not checked again.
//!
//! Body integrity: every read is checked, and a damaged body is removed and treated as a miss.
//! A stream is hashed and counted as it goes (its last chunk held back until the hash and the
//! recorded length matched), and the content file's length is checked before a stream starts,
//! so a body is never cut short under a Content-Length that promises more. A whole read
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
//! Layout under `cache_dir`: `content/` (cacache), `meta/xx/<key-hash>.json` (the checksum
//! line, then the JSON), `meta/.tmp/`.
//!
//! Files: this one holds the index, the held metadata and the metadata files; `reader` reads
//! bodies (whole, streamed, verified); `writer` writes them.

mod reader;
#[cfg(test)]
mod tests;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use cacache::Integrity;
use dashmap::DashMap;
use moka::notification::RemovalCause;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::reader::FileStamp;
use super::key::KeyHash;
use super::meta::CachedMeta;

pub use self::reader::{STAMP_SETTLE, WHOLE_READ_MAX};
pub use self::writer::DiskWriter;

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

/// How a metadata file starts: the format, then the blake3 hash (hex) of the JSON that
/// follows the line. Files without it (the first format, which had no checksum) or with a
/// mismatching hash are misses and removed, never served (issue 13, item 9).
const META_FILE_TAG: &[u8] = b"outpost-meta/2 blake3=";

/// Why a metadata file was not used.
#[derive(Debug, thiserror::Error)]
enum MetaReject {
    #[error("not a checksummed metadata file (an older format, or damaged)")]
    Format,
    #[error("metadata checksum mismatch")]
    Checksum,
    #[error("unparsable metadata: {0}")]
    Parse(String),
    #[error("metadata format version {0}")]
    Version(u32),
}

/// Serialises a metadata file: the tag line with the checksum, then the JSON.
fn encode_meta_file(file: &MetaFileOut<'_>) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(file).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(META_FILE_TAG.len() + 65 + json.len());
    out.extend_from_slice(META_FILE_TAG);
    out.extend_from_slice(blake3::hash(&json).to_hex().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&json);
    Ok(out)
}

/// Parses a metadata file, checking its checksum first and its format version after.
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
    // blake3::Hash compares in constant time; timing does not matter here, equality does.
    if blake3::hash(json) != expected {
        return Err(MetaReject::Checksum);
    }
    let file: MetaFile =
        serde_json::from_slice(json).map_err(|e| MetaReject::Parse(e.to_string()))?;
    if file.meta.version != super::meta::META_VERSION {
        return Err(MetaReject::Version(file.meta.version));
    }
    Ok(file)
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

/// Memory for held metadata, out of the operator's `--memory`: 1/16 of it, between 256 KiB and
/// 64 MiB (at a few KiB per object, the metadata of some thousands of hot objects). The
/// engine gives the memory tier what is left, so the two together stay within `--memory`.
pub fn held_meta_budget(memory: u64) -> u64 {
    (memory / 16).clamp(256 << 10, 64 << 20)
}

/// A disk lookup result: metadata known, body not yet read.
#[derive(Debug, Clone)]
pub struct DiskHit {
    pub meta: Arc<CachedMeta>,
    pub entry: Arc<DiskEntry>,
}

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
    /// Metadata files dropped for failing their checksum or format check.
    rejected: AtomicU64,
    /// Unreferenced content files removed by the start-up sweep.
    swept: AtomicU64,
    sweep_done: AtomicBool,
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
        held_budget: u64,
    ) -> io::Result<(Arc<Self>, Vec<(KeyHash, Arc<CachedMeta>)>)> {
        let started = SystemTime::now();
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
            .max_capacity(held_budget)
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
            rejected: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            sweep_done: AtomicBool::new(false),
        });
        let (loaded, rejected) = {
            let dir = tier.meta_dir.clone();
            tokio::task::spawn_blocking(move || scan_meta_dir(&dir))
                .await
                .map_err(io::Error::other)?
        };
        if rejected > 0 {
            warn!(
                files = rejected,
                dir = %root.display(),
                "dropped disk metadata that failed its checksum or is of an older format; those objects are misses"
            );
            tier.rejected.fetch_add(rejected, Ordering::Relaxed);
        }
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
        // After the index is loaded (every referenced body is known), in the background.
        tokio::spawn(Arc::clone(&tier).sweep_unreferenced(started));
        Ok((tier, metas))
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
            Ok(data) => match decode_meta_file(&data) {
                Ok(f) => {
                    if f.integrity.parse::<Integrity>().ok().as_ref() != Some(&entry.sri)
                        || f.size != entry.size
                    {
                        // A commit renamed a new file into place and has not indexed it yet;
                        // never pair one body with another's metadata.
                        debug!(key = %key, "disk metadata names other content than the index");
                        return None;
                    }
                    Some((Arc::new(f.meta), data.len()))
                }
                Err(e) => {
                    warn!(key = %key, error = %e, "disk metadata failed its check, dropping entry");
                    self.rejected.fetch_add(1, Ordering::Relaxed);
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

    /// Writes a metadata file atomically (temporary file, then rename); returns its length.
    async fn write_meta_file(&self, key: &KeyHash, file: &MetaFileOut<'_>) -> io::Result<usize> {
        let data = encode_meta_file(file)?;
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

    /// Metadata files dropped since start because they failed their checksum or format check.
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

    /// Removes content files that no index entry references: a crash between a fill's content
    /// commit and its metadata rename leaves one, outside the size accounting (issue 13, item
    /// 15). Runs once, in the background, at start-up. Only files last written before the
    /// start (less [`STAMP_SETTLE`], for coarse timestamps) are candidates, so a body a fill
    /// of this run is committing is never taken, and a candidate's reference count is checked
    /// again right before it goes.
    async fn sweep_unreferenced(self: Arc<Self>, started: SystemTime) {
        let cutoff = started.checked_sub(STAMP_SETTLE).unwrap_or(UNIX_EPOCH);
        let tier = Arc::clone(&self);
        let swept = tokio::task::spawn_blocking(move || tier.sweep_blocking(cutoff))
            .await
            .unwrap_or_default();
        if swept.0 > 0 {
            info!(
                files = swept.0,
                bytes = swept.1,
                dir = %self.content.display(),
                "removed unreferenced content"
            );
        }
        self.swept.fetch_add(swept.0, Ordering::Relaxed);
        self.sweep_done.store(true, Ordering::Release);
    }

    /// Walks cacache's `content-v2/<algorithm>/xx/yy/<rest>`; returns (files, bytes) removed.
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
                        if self.refs.contains_key(&key) {
                            continue;
                        }
                        let Ok(md) = std::fs::symlink_metadata(&path) else {
                            continue;
                        };
                        let old = md.modified().is_ok_and(|t| t < cutoff);
                        if !md.is_file() || !old || self.refs.contains_key(&key) {
                            continue;
                        }
                        match std::fs::remove_file(&path) {
                            Ok(()) => {
                                files += 1;
                                bytes += md.len();
                            }
                            Err(e) => {
                                debug!(file = %path.display(), error = %e, "removing unreferenced content");
                            }
                        }
                    }
                }
            }
        }
        (files, bytes)
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

/// A metadata file of the first format (the JSON alone, no checksum line) of the current
/// metadata version, rewritten in place with its checksum (write to a temporary file, then
/// rename). `None` when it is not one, or cannot be rewritten.
fn migrate_first_format(path: &Path, data: &[u8]) -> Option<MetaFile> {
    if data.first() != Some(&b'{') {
        return None;
    }
    let file: MetaFile = serde_json::from_slice(data).ok()?;
    if file.meta.version != super::meta::META_VERSION {
        return None;
    }
    let encoded = encode_meta_file(&MetaFileOut {
        integrity: file.integrity.clone(),
        size: file.size,
        meta: &file.meta,
    })
    .ok()?;
    let tmp = path.with_extension("json.migrating");
    let written = std::fs::write(&tmp, &encoded)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return None;
    }
    debug!(file = %path.display(), "metadata rewritten with a checksum");
    Some(file)
}

/// Reads every metadata file, checking each. Files that fail (a checksum mismatch, an older
/// format, damage) are deleted, never served; returns the good ones and how many failed.
fn scan_meta_dir(dir: &Path) -> (Vec<(KeyHash, MetaFile)>, u64) {
    let mut out = Vec::new();
    let mut rejected = 0;
    let Ok(shards) = std::fs::read_dir(dir) else {
        return (out, rejected);
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
            let data = match std::fs::read(&p) {
                Ok(d) => d,
                Err(e) => {
                    warn!(file = %p.display(), error = %e, "disk metadata unreadable, skipping it");
                    continue;
                }
            };
            match decode_meta_file(&data) {
                Ok(file) => out.push((key, file)),
                // Written before metadata had a checksum: rewritten with one, so an upgrade
                // loses nothing (pushed objects included). Its body is still checked against
                // its content hash and recorded length before it is served.
                Err(MetaReject::Format) if let Some(file) = migrate_first_format(&p, &data) => {
                    out.push((key, file));
                }
                Err(e) => {
                    // One line per file at debug; the count goes into one warning.
                    debug!(file = %p.display(), error = %e, "dropping disk metadata");
                    rejected += 1;
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
    (out, rejected)
}
