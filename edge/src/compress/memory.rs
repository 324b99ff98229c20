//! What compression may hold in memory at once: a share of `--memory`, and the estimate each
//! job takes from it before it starts.
//!
//! An encoder's state does not depend on how fast its client reads, so without a bound a
//! few hundred slow clients of streamed brotli responses hold gigabytes: a brotli stream at
//! quality 4 holds ~10 MiB for its whole life, at quality 5-9 up to ~40 MiB even for a small
//! body, and decoding an origin's body for a client that does not accept its coding holds up
//! to `max_decompressed_size` when it is decoded whole. Each job takes its estimate from the
//! compression share ([`share`]) before it starts and gives it back when its output is
//! dropped (a blocking job holds it in its thread; a whole job's output keeps its size of it
//! until it is sent). A brotli job that does not fit is done in gzip (a tenth of brotli's
//! memory) when the client takes gzip. A compression that does not fit at all is not done: the
//! client gets identity, which is what it would get from a node without compression, counted in
//! `outpost_compression_skipped_total`. A decoding that does not fit gets 503 (the client
//! cannot take the origin's coding, and nothing else can be sent), counted in
//! `outpost_decompressions_busy_total`. A job estimated at more than the whole share takes
//! the whole share: it runs when nothing else does.
//!
//! The estimates are peaks measured with a counting allocator (8 MiB of HTML-like text; brotli
//! windows as [`super::codec`] chooses them):
//!
//! | job | peak |
//! |---|---|
//! | gzip, whole or streamed, any level | 0.4-0.7 MiB |
//! | brotli q4, whole: 16 KiB, 100 KiB, 1 MiB | 0.9, 1.9, 9.9 MiB |
//! | brotli q4, streamed (512 KiB window) | 9.6 MiB |
//! | brotli q5-q9, whole or streamed | 8-40 MiB, whatever the body |
//! | brotli q10-q11, whole 1 MiB; streamed | 27 MiB; 27 MiB |
//! | gzip decoder, streamed | 78 KiB |
//! | brotli decoder, streamed: window 64 KiB, 512 KiB, 4 MiB, 16 MiB | 0.14, 0.6, 4.1, 8.1 MiB |
//!
//! A whole job's output (up to twice the input's size while it grows) and the copy of a
//! collected input count too; the output keeps its share, at its size, until it is sent.

use outpost_cache::key::Coding;

use super::codec::BROTLI_MAX_WINDOW;

const MIB: u64 = 1 << 20;

/// The compression share of `--memory`: a 16th, at least 16 MiB (one brotli stream at the
/// default quality, with room for whole jobs beside it) and at most 256 MiB.
pub fn share(memory: u64) -> u64 {
    (memory / 16).clamp(16 * MIB, 256 * MIB)
}

/// What the cache engine gets of `--memory` when compression is on: the rest, except that
/// it gives up at most a 16th (below 256 MiB of `--memory`, the share's floor is taken from
/// the process's fixed overhead, not from the cache).
pub fn engine_memory(memory: u64) -> u64 {
    memory - share(memory).min(memory / 16)
}

/// An encoder's peak state at `level` (gzip level, brotli quality) with a brotli window of
/// `window_bits` (see the table in the module docs; rounded up).
pub fn encoder_bytes(coding: Coding, level: u32, window_bits: u32) -> u64 {
    let window = 1u64 << window_bits;
    match coding {
        Coding::Gzip => MIB,
        Coding::Br => match level {
            0..=4 => MIB + 18 * window,
            5..=9 => 40 * MIB + 8 * window,
            _ => 2 * MIB + 52 * window,
        },
        Coding::Identity => 0,
    }
}

/// Compressing a whole body of `n` bytes: the encoder, the input's copy (when it was
/// collected from a stream) and the output as it grows (up to twice the input).
pub fn whole_job_bytes(coding: Coding, level: u32, n: u64) -> u64 {
    let bits = super::codec::brotli_window(n.min(usize::MAX as u64) as usize);
    encoder_bytes(coding, level, bits) + 3 * n
}

/// The most one brotli job may need at `compression`'s quality: a stream, or a whole body
/// of `stream_threshold` bytes.
pub fn brotli_job_max(compression: &super::CompressionConfig) -> u64 {
    let q = compression.brotli_quality;
    let whole = whole_job_bytes(Coding::Br, q, compression.stream_threshold);
    stream_encoder_bytes(Coding::Br, q).max(whole)
}

/// A streaming encoder's peak state (brotli's stream window is [`BROTLI_MAX_WINDOW`]).
pub fn stream_encoder_bytes(coding: Coding, level: u32) -> u64 {
    encoder_bytes(coding, level, BROTLI_MAX_WINDOW)
}

/// A decoder's peak state, for a brotli stream whose window is `window_bits` (its largest,
/// 24, when unknown).
pub fn decoder_bytes(coding: Coding, window_bits: Option<u32>) -> u64 {
    match coding {
        Coding::Gzip => MIB / 8,
        Coding::Br => (1u64 << window_bits.unwrap_or(24).min(24)) + MIB / 2,
        Coding::Identity => 0,
    }
}

/// What a brotli stream's first byte says of its window (RFC 7932 §9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrotliWindow {
    /// `WBITS`, 10 to 24.
    Bits(u32),
    /// The large-window extension (`WBITS` up to 30): not a `br` content coding, which RFC 7932
    /// bounds at 24, although the decoders here would take it (and a ring buffer of up to 1
    /// GiB).
    Large,
    /// No byte yet.
    Unknown,
}

/// The window a brotli stream declares in its first byte.
pub fn brotli_window_of(stream: &[u8]) -> BrotliWindow {
    let Some(&b) = stream.first() else {
        return BrotliWindow::Unknown;
    };
    if b & 1 == 0 {
        return BrotliWindow::Bits(16);
    }
    match ((b >> 1) & 7, (b >> 4) & 7) {
        (0, 0) => BrotliWindow::Bits(17),
        (0, 1) => BrotliWindow::Large,
        (0, m) => BrotliWindow::Bits(8 + u32::from(m)),
        (n, _) => BrotliWindow::Bits(17 + u32::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::codec::encode;

    #[test]
    fn the_share_is_a_16th_within_its_bounds_and_the_engine_gives_up_at_most_that() {
        assert_eq!(share(256 * MIB), 16 * MIB);
        assert_eq!(engine_memory(256 * MIB), 240 * MIB);
        assert_eq!(share(1 << 30), 64 * MIB);
        assert_eq!(engine_memory(1 << 30), (1 << 30) - 64 * MIB);
        assert_eq!(share(64 << 30), 256 * MIB);
        assert_eq!(engine_memory(64 << 30), (64 << 30) - 256 * MIB);
        // Small nodes: the floor comes out of the overhead, a 16th out of the cache.
        assert_eq!(share(32 * MIB), 16 * MIB);
        assert_eq!(engine_memory(32 * MIB), 30 * MIB);
        assert_eq!(engine_memory(4096), 3840);
    }

    #[test]
    fn a_brotli_job_at_the_default_quality_fits_the_smallest_share() {
        let stream = stream_encoder_bytes(Coding::Br, 4);
        assert!(stream >= 9 * MIB + MIB / 2, "{stream}");
        assert!(stream + encoder_bytes(Coding::Br, 4, 17) < share(0));
        let defaults = crate::compress::CompressionConfig::default();
        assert!(brotli_job_max(&defaults) < share(0));
        let q6 = crate::compress::CompressionConfig {
            brotli_quality: 6,
            ..defaults
        };
        assert!(brotli_job_max(&q6) > share(256 * MIB));
    }

    #[test]
    fn window_bits_are_read_from_the_stream_header() {
        for (len, bits) in [(600, 10), (10 << 10, 14), (100 << 10, 17), (4 << 20, 19)] {
            let data: Vec<u8> = (0..len).map(|i| (i % 7) as u8 + b'a').collect();
            let enc = encode(Coding::Br, &data, 4).expect("encode");
            assert_eq!(
                brotli_window_of(&enc),
                BrotliWindow::Bits(bits),
                "{len} bytes"
            );
        }
        // brotli's own default window (22) and the largest (24).
        for lgwin in [16, 22, 24] {
            let params = brotli::enc::BrotliEncoderParams {
                quality: 4,
                lgwin,
                ..Default::default()
            };
            let mut out = Vec::new();
            brotli::BrotliCompress(&mut &b"hello hello hello"[..], &mut out, &params)
                .expect("encode");
            assert_eq!(
                brotli_window_of(&out[..1]),
                BrotliWindow::Bits(lgwin as u32)
            );
        }
        assert_eq!(brotli_window_of(&[]), BrotliWindow::Unknown);
        // The large-window extension's marker (RFC 7932 §9.1 with the extension's 0x11).
        let params = brotli::enc::BrotliEncoderParams {
            quality: 4,
            lgwin: 24,
            large_window: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        brotli::BrotliCompress(&mut &b"hello hello hello"[..], &mut out, &params).expect("encode");
        assert_eq!(brotli_window_of(&out), BrotliWindow::Large);
    }
}
