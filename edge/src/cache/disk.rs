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
//! temporary file that start-up deletes. Every read is checked against the integrity hash; a
//! mismatch deletes the entry and is treated as a miss.
//!
//! Layout under `cache_dir`: `content/` (cacache), `meta/xx/<key-hash>.json`, `meta/.tmp/`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// What the in-memory index knows about one object on disk.
#[derive(Debug, Clone)]
pub struct DiskEntry {
    pub sri: Integrity,
    pub size: u64,
    /// The content was checked against its hash since this process started (it wrote it, or
    /// a full read verified it). Entries loaded at start-up begin unverified.
    pub verified: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Serialize, Deserialize)]
struct MetaFile {
    integrity: String,
    size: u64,
    meta: CachedMeta,
}

/// A disk lookup result: metadata read, body not yet read.
#[derive(Debug, Clone)]
pub struct DiskHit {
    pub meta: Arc<CachedMeta>,
    pub entry: DiskEntry,
}

pub struct DiskTier {
    content: PathBuf,
    meta_dir: PathBuf,
    tmp_dir: PathBuf,
    index: moka::sync::Cache<KeyHash, Arc<DiskEntry>>,
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
        let content = root.join("content");
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
        let tier = Arc::new(Self {
            content,
            meta_dir,
            tmp_dir,
            index,
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
            tier.index.insert(
                key,
                Arc::new(DiskEntry {
                    sri,
                    size: file.size,
                    verified: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                }),
            );
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

    /// Looks up metadata. A missing or unreadable metadata file is a miss (and is cleaned up).
    pub async fn get(&self, key: &KeyHash) -> Option<DiskHit> {
        let entry = self.index.get(key)?;
        match tokio::fs::read(self.meta_path(key)).await {
            Ok(data) => match serde_json::from_slice::<MetaFile>(&data) {
                Ok(f) if f.meta.version == super::meta::META_VERSION => Some(DiskHit {
                    meta: Arc::new(f.meta),
                    entry: (*entry).clone(),
                }),
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
                None
            }
        }
    }

    /// Reads a whole body and verifies its integrity. A corrupt body is removed.
    pub async fn read_all(&self, key: &KeyHash, hit: &DiskHit) -> io::Result<Bytes> {
        match cacache::read_hash(&self.content, &hit.entry.sri).await {
            Ok(data) => Ok(Bytes::from(data)),
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

    async fn write_meta_file(&self, key: &KeyHash, file: &MetaFile) -> io::Result<()> {
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
        Ok(())
    }

    /// Replaces the metadata of a stored object (after a 304), keeping its body.
    pub async fn update_meta(&self, key: &KeyHash, meta: &CachedMeta) -> io::Result<()> {
        let Some(entry) = self.index.get(key) else {
            return Ok(());
        };
        self.write_meta_file(
            key,
            &MetaFile {
                integrity: entry.sri.to_string(),
                size: entry.size,
                meta: meta.clone(),
            },
        )
        .await
    }

    /// Removes an object (metadata first, so it can never be found half-removed).
    pub async fn remove(&self, key: &KeyHash) {
        let _ = tokio::fs::remove_file(self.meta_path(key)).await;
        self.index.invalidate(key);
    }

    /// Objects evicted for space since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    pub fn run_pending_tasks(&self) {
        self.index.run_pending_tasks();
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

    pub async fn commit(self, meta: &CachedMeta) -> io::Result<()> {
        let meta = meta.clone();
        self.commit_with(move |_, _| meta).await.map(|_| ())
    }

    /// Commits, building the metadata once the content hash and size are known (pushed
    /// objects derive their ETag from the hash). Returns the hash.
    pub async fn commit_with(
        self,
        meta: impl FnOnce(&Integrity, u64) -> CachedMeta,
    ) -> io::Result<Integrity> {
        let sri = self
            .writer
            .commit()
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let file = MetaFile {
            integrity: sri.to_string(),
            size: self.written,
            meta: meta(&sri, self.written),
        };
        // Reference first, so a concurrent eviction of an identical body keeps the content.
        self.tier.incref(&sri);
        if let Err(e) = self.tier.write_meta_file(&self.key, &file).await {
            if self.tier.decref(&sri) {
                let _ = cacache::remove_hash(&self.tier.content, &sri).await;
            }
            return Err(e);
        }
        self.tier.index.insert(
            self.key,
            Arc::new(DiskEntry {
                sri: sri.clone(),
                size: self.written,
                verified: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            }),
        );
        Ok(sri)
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
