//! Writing bodies: content first (gathered, then written in few jobs on the blocking pool), then
//! the metadata in the index's next group commit; nothing is visible before
//! [`DiskWriter::commit_visible`] returns, and nothing counts as stored before the commit is
//! durable ([`DiskWriter::commit`] waits for that).

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use cacache::Integrity;
use tokio::sync::oneshot;

use super::store::{Completion, Put};
use super::{DiskEntry, DiskTier, HeldMeta, MetaFileOut, Sri};
use crate::key::KeyHash;
use crate::meta::CachedMeta;

/// A body is gathered in memory up to this many bytes before a job writes it: a body up to
/// this size costs one job (create, write, rename), a longer one a job per this many bytes.
pub const STREAM_CHUNK: u64 = 256 * 1024;

/// Bodies up to this size are kept inline in their index record instead of a content file of
/// their own: for a small body, a file costs far more than its bytes (a new inode, a 4 KiB
/// block, a rename between directories that the file system serialises, often a new
/// directory), on every miss, and an open and a close on every hit. Apache Traffic Server keeps
/// small objects in its log the same way. Larger bodies go to cacache.
pub const INLINE_MAX: u64 = 16 * 1024;

/// Write jobs on the blocking pool at once, across the tier: writes never take more threads
/// than this, whatever the miss rate, and reads never wait for them.
pub const WRITE_JOBS: usize = 2;

impl DiskTier {
    /// Stores a whole body that the memory tier holds (so its metadata is not held for a first
    /// disk hit) inline in its record, without a writer or a task: the record joins the index
    /// writer's next group commit; on the writer thread, `visible` runs once the object is
    /// indexed, and `done` is told the outcome once it is durable. Nothing waits meanwhile.
    /// The body must fit [`INLINE_MAX`].
    pub fn store_whole(
        self: &Arc<Self>,
        key: KeyHash,
        body: &Bytes,
        meta: &Arc<CachedMeta>,
        visible: impl FnOnce() + Send + 'static,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) {
        let size = body.len() as u64;
        debug_assert!(size <= INLINE_MAX);
        let sri = inline_integrity(body);
        let put = MetaFileOut {
            integrity: sri.text(),
            size,
            inline: true,
            meta,
        }
        .put(key, body);
        let put = match put {
            Ok(put) => put,
            Err(e) => return done(Err(e)),
        };
        let entry = DiskEntry::inline(sri, size, true);
        self.commit_entry(put, entry, None, visible, done);
    }

    /// Queues `put` for the index writer's next group commit. Right after it (on the writer
    /// thread, so copies of one key are indexed in commit order), `entry` is indexed with the
    /// record's sequence number, its metadata held when `held` gives it (with the record's
    /// length), unless a removal of the key is still pending; then `visible` is told. `done` is
    /// told once the commit is durable (see the store's `SYNC_EVERY`).
    fn commit_entry(
        self: &Arc<Self>,
        put: Put,
        entry: Arc<DiskEntry>,
        held: Option<Arc<CachedMeta>>,
        visible: impl FnOnce() + Send + 'static,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) {
        let key = put.key;
        self.touch(key);
        let tier = Arc::downgrade(self);
        let (failed_tier, failed_entry) = (tier.clone(), Arc::clone(&entry));
        entry.durable.store(false, Ordering::Release);
        self.store.put_then(
            put,
            Completion::new(
                move |applied| {
                    if let (Some(seq), Some(tier)) = (applied, tier.upgrade()) {
                        entry.set_record(seq);
                        // The copy it replaces stays referenced until it is durable.
                        let replaced = tier.index_committed(key, Arc::clone(&entry), held);
                        entry.supersede(replaced);
                    }
                    if applied.is_some() {
                        visible();
                    }
                },
                move |result| {
                    // Visible, but never made durable: the index failed, and opened again
                    // without the commit (see the store's `Writer::reopen`). The copy goes
                    // from this process's index too, with its share of `--disk`, and the
                    // newest durable one before it, which the reopened index names, comes
                    // back.
                    match &result {
                        Ok(_) => failed_entry.made_durable(),
                        Err(_) => {
                            if let Some(tier) = failed_tier.upgrade() {
                                tier.lost(&key, &failed_entry);
                            }
                        }
                    }
                    done(result.and_then(|applied| {
                        applied
                            .map(drop)
                            .ok_or_else(|| io::Error::other("an unconditional put was not applied"))
                    }))
                },
            ),
        );
    }

    /// Indexes a copy whose record just committed, unless a removal of the key is pending
    /// (queued after the put: the key is to hold nothing). Checked again after indexing, so a
    /// removal that slips in between never leaves the copy indexed.
    /// Returns the copy it replaced, if any.
    fn index_committed(
        &self,
        key: KeyHash,
        entry: Arc<DiskEntry>,
        held: Option<Arc<CachedMeta>>,
    ) -> Option<Arc<DiskEntry>> {
        if self.store.pending_delete(&key) {
            return None;
        }
        let replaced = self.index_entry(key, entry.clone());
        if let Some(meta) = held {
            self.held.insert(key, HeldMeta::new(entry.clone(), 0, meta));
        }
        if self.store.pending_delete(&key) {
            self.unindex(&key, &entry);
        }
        replaced
    }

    /// Starts writing a body. Nothing is visible until [`DiskWriter::commit`]; dropping the
    /// writer discards the partial content. Does no I/O.
    pub fn begin_write(self: &Arc<Self>, key: KeyHash) -> DiskWriter {
        DiskWriter {
            tier: Arc::clone(self),
            key,
            gathered: Vec::new(),
            gathered_len: 0,
            file: None,
            written: 0,
        }
    }

    /// Runs one write job on the blocking pool, within the tier's [`WRITE_JOBS`].
    pub(super) async fn write_job<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        self.job(super::Lane::Write, job).await?
    }
}

/// The content hash of a fill's body kept inline in its record: xxh3-128, a third of sha256's
/// cost at 1 KiB. It only names the copy (the record's checksum covers the body itself), so it
/// needs no cryptographic hash; content files, shared by identical bodies, and pushed objects,
/// whose ETag derives from it, keep sha256.
pub(super) fn inline_integrity(body: &[u8]) -> Sri {
    // Big-endian, as ssri writes an xxh3 digest.
    Sri::Xxh3(xxhash_rust::xxh3::xxh3_128(body).to_be_bytes())
}

/// An in-progress disk write. `commit` makes it visible; drop aborts.
pub struct DiskWriter {
    tier: Arc<DiskTier>,
    key: KeyHash,
    /// Chunks not written yet.
    gathered: Vec<Bytes>,
    gathered_len: u64,
    /// The content file, once a body outgrew [`STREAM_CHUNK`].
    file: Option<cacache::SyncWriter>,
    written: u64,
}

fn open_content(content: &Path) -> io::Result<cacache::SyncWriter> {
    // No `.size(n)`: with cacache's `mmap` feature a known size maps a buffer that only accepts
    // the body in one write. The record keeps the size, and the fill checks Content-Length.
    cacache::WriteOpts::new()
        .open_hash_sync(content)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Writes `chunks` to the content file, opening it first if the body has none yet.
fn write_out(
    file: Option<cacache::SyncWriter>,
    content: &Path,
    chunks: &[Bytes],
) -> io::Result<cacache::SyncWriter> {
    let mut file = match file {
        Some(f) => f,
        None => open_content(content)?,
    };
    chunks.iter().try_for_each(|c| file.write_all(c))?;
    Ok(file)
}

impl DiskWriter {
    /// Adds a chunk; true when it and every chunk before it have been written out (until
    /// then the writer holds them).
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<bool> {
        self.written += chunk.len() as u64;
        self.gathered_len += chunk.len() as u64;
        self.gathered.push(chunk);
        if self.gathered_len < STREAM_CHUNK {
            return Ok(false);
        }
        self.write_gathered().await?;
        Ok(true)
    }

    /// Writes what was gathered, opening the content file first if needed.
    async fn write_gathered(&mut self) -> io::Result<()> {
        let chunks = std::mem::take(&mut self.gathered);
        self.gathered_len = 0;
        let file = self.file.take();
        let content = self.tier.content.clone();
        let file = self
            .tier
            .write_job(move || write_out(file, &content, &chunks))
            .await?;
        self.file = Some(file);
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Commits, and waits until the object is durable (counted as stored).
    pub async fn commit(self, meta: &Arc<CachedMeta>) -> io::Result<()> {
        self.commit_visible(meta).await?.wait().await
    }

    /// Commits, and waits until the object is visible (indexed: lookups find it); the returned
    /// [`Durable`] tells when it is durable.
    pub async fn commit_visible(self, meta: &Arc<CachedMeta>) -> io::Result<Durable> {
        let meta = meta.clone();
        self.finish(move |_, _| meta)
            .await
            .map(|(_, durable)| durable)
    }

    /// Commits, building the metadata once the content hash and size are known (pushed
    /// objects derive their ETag from the hash), and waits until it is durable. Returns the
    /// hash.
    pub async fn commit_with(
        self,
        meta: impl FnOnce(&Integrity, u64) -> CachedMeta,
    ) -> io::Result<Integrity> {
        let (sri, durable) = self.finish(|sri, size| Arc::new(meta(sri, size))).await?;
        durable.wait().await?;
        Ok(sri)
    }

    /// Writes what is left and commits; returns once the object is visible.
    async fn finish(
        self,
        meta: impl FnOnce(&Integrity, u64) -> Arc<CachedMeta>,
    ) -> io::Result<(Integrity, Durable)> {
        let Self {
            tier,
            key,
            gathered,
            file,
            written,
            ..
        } = self;
        let inline = file.is_none() && written <= INLINE_MAX;
        let (sri, body, entry) = if inline {
            let body = match gathered.as_slice() {
                [one] => one.clone(),
                chunks => Bytes::from(chunks.concat()),
            };
            let sri = Integrity::from(&body[..]);
            let entry = DiskEntry::new(sri.clone(), written, true, true, &tier.refs);
            (sri, body, entry)
        } else {
            let content = tier.content.clone();
            let paths = Arc::clone(&tier);
            // The last (for most bodies the only) job: write what is left, rename into place,
            // and take the new entry's reference to the file while it is surely there.
            let (sri, reference) = tier
                .write_job(move || {
                    let sri = write_out(file, &content, &gathered)?
                        .commit()
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    // An identical body's file, kept open, was just renamed over: let it go
                    // (it would hold its disk space until read again).
                    paths.open_files.forget(&sri);
                    match paths.refs.take_committed(&sri, &paths.content_path(&sri)) {
                        Some(reference) => Ok((sri, reference)),
                        None => Err(io::Error::other(
                            "the content file was removed as it was committed",
                        )),
                    }
                })
                .await?;
            // The entry holds that reference from here on, so a concurrent eviction of an
            // identical body keeps the file; dropped on an error, it lets the file go.
            let entry = DiskEntry::adopting(reference, written, true);
            (sri, Bytes::new(), entry)
        };
        let meta = meta(&sri, written);
        let put = MetaFileOut {
            integrity: sri.to_string(),
            size: written,
            inline,
            meta: &meta,
        }
        .put(key, &body)?;
        let (visible, made_visible) = oneshot::channel();
        let (done, durable) = oneshot::channel();
        // Just written: the first hit needs no metadata read.
        tier.commit_entry(
            put,
            entry,
            Some(meta),
            move || {
                let _ = visible.send(());
            },
            move |result| {
                let _ = done.send(result);
            },
        );
        let durable = Durable(durable);
        if made_visible.await.is_err() {
            // Never made visible: the commit failed, and `durable` says why.
            durable.wait().await?;
            return Err(io::Error::other("the disk index did not take the object"));
        }
        Ok((sri, durable))
    }
}

/// Tells when a committed object is durable (see [`DiskWriter::commit_visible`]).
pub struct Durable(oneshot::Receiver<io::Result<()>>);

impl Durable {
    pub async fn wait(self) -> io::Result<()> {
        self.0
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the disk index writer stopped")))
    }
}
