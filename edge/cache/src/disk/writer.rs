//! Writing bodies: content first, then the metadata file renamed into place; nothing is
//! visible before [`DiskWriter::commit`].

use std::io;
use std::sync::Arc;

use cacache::Integrity;
use tokio::io::AsyncWriteExt;

use super::{DiskEntry, DiskTier, HeldMeta, MetaFileOut};
use crate::key::KeyHash;
use crate::meta::CachedMeta;

impl DiskTier {
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
