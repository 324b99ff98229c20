//! The compression phase's counters (exported by the observability layer).

use std::sync::atomic::{AtomicU64, Ordering};

use outpost_cache::key::Coding;

/// Counters of the compression phase (exported by the observability layer).
#[derive(Debug, Default)]
pub struct CompressionStats {
    /// Bodies compressed with brotli (whole or streamed).
    pub compressed_br: AtomicU64,
    /// Bodies compressed with gzip (whole or streamed).
    pub compressed_gzip: AtomicU64,
    /// Encoded bodies served from a stored variant, without compressing.
    pub variant_hits: AtomicU64,
    /// Encoded variants handed to the engine for storing.
    pub variants_stored: AtomicU64,
    /// Identity bytes fed to the compressors.
    pub bytes_in: AtomicU64,
    /// Encoded bytes the compressors produced.
    pub bytes_out: AtomicU64,
    /// Origin-encoded bodies sent as they are to clients that accept their coding.
    pub precompressed_served: AtomicU64,
    /// Origin-encoded bodies decoded for clients that do not accept their coding.
    pub decompressed: AtomicU64,
    /// Decodings stopped at the size cap or on corrupt data.
    pub decompress_refused: AtomicU64,
    /// Compressions not done for want of room in the compression share of memory (identity
    /// sent).
    pub skipped_memory: AtomicU64,
    /// Decodings refused (503) for want of room in the compression share of memory.
    pub decompress_busy: AtomicU64,
}

/// A point-in-time copy of [`CompressionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompressionSnapshot {
    pub compressed_br: u64,
    pub compressed_gzip: u64,
    pub variant_hits: u64,
    pub variants_stored: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub precompressed_served: u64,
    pub decompressed: u64,
    pub decompress_refused: u64,
    pub skipped_memory: u64,
    pub decompress_busy: u64,
}

impl CompressionSnapshot {
    /// Compressions performed, both codings.
    pub fn compressions(&self) -> u64 {
        self.compressed_br + self.compressed_gzip
    }
}

impl CompressionStats {
    pub fn snapshot(&self) -> CompressionSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CompressionSnapshot {
            compressed_br: get(&self.compressed_br),
            compressed_gzip: get(&self.compressed_gzip),
            variant_hits: get(&self.variant_hits),
            variants_stored: get(&self.variants_stored),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            precompressed_served: get(&self.precompressed_served),
            decompressed: get(&self.decompressed),
            decompress_refused: get(&self.decompress_refused),
            skipped_memory: get(&self.skipped_memory),
            decompress_busy: get(&self.decompress_busy),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn compressed(&self, coding: Coding) {
        match coding {
            Coding::Br => Self::add(&self.compressed_br, 1),
            Coding::Gzip => Self::add(&self.compressed_gzip, 1),
            Coding::Identity => {}
        }
    }
}
