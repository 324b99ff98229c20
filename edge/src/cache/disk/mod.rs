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
