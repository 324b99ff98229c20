//! Encoding and decoding bodies: whole buffers (flate2, brotli) and streams (async-compression),
//! decoding always under a size cap.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use async_compression::Level;
use async_compression::tokio::bufread::{BrotliDecoder, BrotliEncoder, GzipDecoder, GzipEncoder};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use outpost_cache::key::Coding;
use tokio_util::io::{ReaderStream, StreamReader};
use tracing::debug;

use super::CompressionStats;

/// Output chunk size of the streaming encoders and decoders.
const STREAM_CHUNK: usize = 32 * 1024;

/// The largest brotli window (`lgwin`): 512 KiB, nginx's `brotli_window` default. brotli's
/// own default, 4 MiB (22), costs its encoder ~9 MiB even for a 10 KiB body, whole, and 37 MiB
/// streaming 8 MiB (quality 4), where this window costs 1.8 and ~3.3-10 MiB; measured on
/// text, its output was as small or smaller at every size up to 8 MiB.
pub(crate) const BROTLI_MAX_WINDOW: u32 = 19;

/// The brotli window for a body of `len` bytes: the smallest that holds it (a larger window
/// only costs memory: a whole 10 KiB body took 0.3 ms and 0.9 MiB with a 16 KiB window, 0.75
/// ms and 8.9 MiB with brotli's default), at most [`BROTLI_MAX_WINDOW`]; brotli's least, 1 KiB,
/// at least.
pub fn brotli_window(len: usize) -> u32 {
    let bits = usize::BITS - len.saturating_sub(1).leading_zeros();
    bits.clamp(10, BROTLI_MAX_WINDOW)
}

/// Why decoding an encoded body failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body decodes to more than {0} bytes")]
    TooLarge(u64),
    #[error("corrupt encoded body: {0}")]
    Corrupt(io::Error),
    /// A brotli stream with the large-window extension: not a `br` coding.
    #[error("{LARGE_WINDOW}")]
    LargeWindow,
}

const LARGE_WINDOW: &str =
    "a large-window brotli stream is not a br coding (RFC 7932 windows end at 16 MiB)";

impl DecodeError {
    /// What a client is told of this failure: a fixed text, never the error's own (an
    /// `io::Error` here may be a library's message or this node's disk failing).
    pub fn client_reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge(_) => {
                "it decodes to more than this node allows (compression.max_decompressed_size)"
            }
            DecodeError::Corrupt(_) => "the encoded body is corrupt",
            DecodeError::LargeWindow => LARGE_WINDOW,
        }
    }
}

/// Compresses a whole buffer. `level` is the gzip level or the brotli quality (clamped).
pub fn encode(coding: Coding, data: &[u8], level: u32) -> io::Result<Vec<u8>> {
    match coding {
        Coding::Gzip => {
            let out = Vec::with_capacity(data.len() / 3 + 64);
            let mut enc =
                flate2::write::GzEncoder::new(out, flate2::Compression::new(level.min(9)));
            enc.write_all(data)?;
            enc.finish()
        }
        Coding::Br => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: level.min(11) as i32,
                lgwin: brotli_window(data.len()) as i32,
                size_hint: data.len(),
                ..Default::default()
            };
            let mut out = Vec::with_capacity(data.len() / 3 + 64);
            brotli::BrotliCompress(&mut &data[..], &mut out, &params)?;
            Ok(out)
        }
        Coding::Identity => Ok(data.to_vec()),
    }
}

/// Decodes a whole buffer, producing at most `cap` bytes.
pub fn decode(coding: Coding, data: &[u8], cap: u64) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(cap as usize));
    // One byte past the cap tells "exactly cap" from "more than cap".
    let limit = cap.saturating_add(1);
    let read = match coding {
        Coding::Gzip => flate2::read::MultiGzDecoder::new(data)
            .take(limit)
            .read_to_end(&mut out),
        Coding::Br => brotli::Decompressor::new(data, 4096)
            .take(limit)
            .read_to_end(&mut out),
        Coding::Identity => data.take(limit).read_to_end(&mut out),
    };
    read.map_err(DecodeError::Corrupt)?;
    if out.len() as u64 > cap {
        return Err(DecodeError::TooLarge(cap));
    }
    Ok(out)
}

/// Compresses a stream of chunks as it flows (async-compression over flate2 / brotli).
pub fn encode_stream(
    coding: Coding,
    level: u32,
    input: BoxStream<'static, io::Result<Bytes>>,
) -> BoxStream<'static, io::Result<Bytes>> {
    let reader = StreamReader::new(input);
    // Level::Default means quality 11 for brotli: always pass a precise level.
    let level = Level::Precise(level as i32);
    match coding {
        Coding::Br => {
            let params = async_compression::brotli::EncoderParams::default()
                .quality(level)
                .window_size(BROTLI_MAX_WINDOW as i32);
            ReaderStream::with_capacity(BrotliEncoder::with_params(reader, params), STREAM_CHUNK)
                .boxed()
        }
        Coding::Gzip => {
            ReaderStream::with_capacity(GzipEncoder::with_quality(reader, level), STREAM_CHUNK)
                .boxed()
        }
        Coding::Identity => reader.into_inner().boxed(),
    }
}

/// Decodes a stream of chunks as it flows; the stream fails once the output passes `cap`.
pub fn decode_stream(
    coding: Coding,
    input: BoxStream<'static, io::Result<Bytes>>,
    cap: u64,
) -> BoxStream<'static, io::Result<Bytes>> {
    decoder(coding, input, cap, None)
}

/// [`decode_stream`], counting a refusal in `stats` when given.
pub(crate) fn decoder(
    coding: Coding,
    input: BoxStream<'static, io::Result<Bytes>>,
    cap: u64,
    stats: Option<Arc<CompressionStats>>,
) -> BoxStream<'static, io::Result<Bytes>> {
    let reader = StreamReader::new(input);
    let decoded = match coding {
        Coding::Br => ReaderStream::with_capacity(BrotliDecoder::new(reader), STREAM_CHUNK).boxed(),
        Coding::Gzip => {
            let mut dec = GzipDecoder::new(reader);
            dec.multiple_members(true);
            ReaderStream::with_capacity(dec, STREAM_CHUNK).boxed()
        }
        Coding::Identity => reader.into_inner().boxed(),
    };
    Capped {
        inner: decoded,
        seen: 0,
        cap,
        done: false,
        on_refuse: stats,
    }
    .boxed()
}

/// Ends a decoded stream with an error once it passes the cap.
struct Capped {
    inner: BoxStream<'static, io::Result<Bytes>>,
    seen: u64,
    cap: u64,
    done: bool,
    /// Counts the refusal (the proxy's streams; plain [`decode_stream`] has none).
    on_refuse: Option<Arc<CompressionStats>>,
}

impl Stream for Capped {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(this.inner.poll_next_unpin(cx)) {
            Some(Ok(chunk)) => {
                this.seen += chunk.len() as u64;
                if this.seen > this.cap {
                    this.done = true;
                    if let Some(stats) = &this.on_refuse {
                        CompressionStats::add(&stats.decompress_refused, 1);
                    }
                    debug!(
                        cap = this.cap,
                        "decoded body passed the size cap; aborting it"
                    );
                    return Poll::Ready(Some(Err(io::Error::other(format!(
                        "decoded body passed the cap of {} bytes",
                        this.cap
                    )))));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Some(Err(e)) => {
                this.done = true;
                if let Some(stats) = &this.on_refuse {
                    CompressionStats::add(&stats.decompress_refused, 1);
                }
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }
}
