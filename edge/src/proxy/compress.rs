//! The compression phase: between the engine's answer and `respond`, it negotiates br / gzip /
//! identity per request and serves, stores or decodes encoded variants. The decisions it
//! follows are recorded in [`crate::compress`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use tracing::debug;

use crate::cache::coalesce::{Budget, Charge};
use crate::cache::fresh::Codings;
use crate::cache::key::{Coding, KeyHash};
use crate::cache::meta::CachedMeta;
use crate::cache::status::CacheStatus;
use crate::cache::{Engine, Served, ServedBody};
use crate::compress::codec::decoder;
use crate::compress::variant::{
    Encoded, accepts, decoded_headers, encoded, encoded_headers, merge_vary, no_transform,
};
use crate::compress::{
    CompressionConfig, CompressionStats, DecodeError, decode, encode, encode_stream, memory,
};
use crate::error::EdgeError;

/// Whole-buffer compression of bodies up to this size runs on the async worker thread (about
/// a quarter of a millisecond at brotli 4); larger bodies go to a blocking thread.
pub const INLINE_MAX: usize = 16 * 1024;

/// A streamed variant is stored only up to this encoded size; beyond it the tee is dropped.
const STREAMED_VARIANT_MAX: u64 = 32 << 20;

/// Whole decodings produce at most this much (or `max_decompressed_size`, when smaller); a
/// body that decodes to more is decoded again as a stream, so a whole decoding holds little
/// of the compression share (see [`crate::compress::memory`]).
const WHOLE_DECODE_MAX: u64 = 2 << 20;

/// The compression phase of one edge (see the module docs).
pub struct Compressor {
    cfg: CompressionConfig,
    /// What its jobs may hold at once ([`crate::compress::memory::share`]).
    memory: Arc<Budget>,
}

impl Compressor {
    /// A compressor whose jobs hold at most `memory` bytes at once.
    pub fn new(cfg: CompressionConfig, memory: u64) -> Self {
        Self {
            cfg,
            memory: Budget::new(memory),
        }
    }

    /// What its jobs hold now and may hold at once.
    pub fn memory(&self) -> &Arc<Budget> {
        &self.memory
    }

    pub fn config(&self) -> &CompressionConfig {
        &self.cfg
    }

    fn level(&self, coding: Coding) -> u32 {
        match coding {
            Coding::Br => self.cfg.brotli_quality,
            Coding::Gzip => self.cfg.gzip_level,
            Coding::Identity => 0,
        }
    }

    /// Is an identity response with these headers and body length one we compress?
    pub fn compressible(&self, headers: &HeaderMap, len: Option<u64>) -> bool {
        if len.is_some_and(|n| n < self.cfg.min_size) || no_transform(headers) {
            return false;
        }
        let Some(ct) = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let mime = ct.split(';').next().unwrap_or("").trim();
        let Some((top, sub)) = mime.split_once('/') else {
            return false;
        };
        if top.eq_ignore_ascii_case("text") && sub.eq_ignore_ascii_case("event-stream") {
            return false;
        }
        self.cfg.types.iter().any(|p| p.matches(top, sub))
    }

    /// How the answer to a request depends on its `Accept-Encoding`: not at all, by compressing
    /// an identity body (or serving a stored encoded variant), or by decoding a body the
    /// origin encoded.
    pub fn codings(&self, served: &Served) -> Codings {
        if !self.cfg.enabled
            || served.status != StatusCode::OK
            || served.headers.contains_key(header::CONTENT_RANGE)
        {
            return Codings::Ignored;
        }
        match encoded(&served.headers) {
            Encoded::No if self.compressible(&served.headers, served.body.len()) => {
                Codings::Negotiated
            }
            Encoded::No | Encoded::Other => Codings::Ignored,
            Encoded::Known(_) => Codings::FullPath,
        }
    }

    /// Counts an encoded variant served by the hit fast path.
    pub fn count_variant_hit(&self) {
        CompressionStats::add(&self.cfg.stats.variant_hits, 1);
    }

    /// Turns the engine's answer into the one this client gets: encoded, decoded or as is.
    pub async fn apply(
        &self,
        engine: &Arc<Engine>,
        mut served: Served,
        method: &Method,
        req: &HeaderMap,
    ) -> Result<Served, EdgeError> {
        match self.codings(&served) {
            Codings::Ignored => return Ok(served),
            Codings::FullPath => {
                if let Encoded::Known(coding) = encoded(&served.headers) {
                    return self.origin_encoded(served, coding, method, req).await;
                }
                return Ok(served);
            }
            Codings::Negotiated => {}
        }
        // From here on the response depends on Accept-Encoding: every path below carries
        // `Vary: Accept-Encoding` (a stored variant's headers already do).
        let coding = Coding::negotiate(req);
        if coding == Coding::Identity || req.contains_key(header::RANGE) || no_transform(req) {
            merge_vary(&mut served.headers);
            return Ok(served);
        }
        let base = match (served.key, &served.meta) {
            (Some(key), Some(meta)) if served.stored => Some((key, meta.clone())),
            _ => None,
        };
        let from_store = matches!(
            served.cache,
            CacheStatus::Hit | CacheStatus::Stale | CacheStatus::Revalidated
        );
        if from_store
            && let Some((key, meta)) = &base
            && let Some((vmeta, body)) = engine.get_encoded(*key, coding.as_str(), meta).await
        {
            if *method == Method::GET {
                CompressionStats::add(&self.cfg.stats.variant_hits, 1);
            }
            debug!(key = %key, coding = coding.as_str(), "encoded variant hit");
            served.headers = vmeta.headers.clone();
            served.body = body;
            return Ok(served);
        }
        if *method != Method::GET {
            merge_vary(&mut served.headers);
            return Ok(served);
        }
        // A conditional request may end as a 304: compress only if the body is sent.
        let lazy =
            req.contains_key(header::IF_NONE_MATCH) || req.contains_key(header::IF_MODIFIED_SINCE);
        let whole = self.whole_len(&served.body, lazy);
        let attempt = |coding| {
            let charge = self.take(self.encoding_estimate(coding, whole))?;
            Some((coding, charge))
        };
        let mut job = attempt(coding);
        // brotli's encoder takes ~10 times gzip's memory: gzip when brotli does not fit.
        if job.is_none() && coding == Coding::Br && accepts(req, Coding::Gzip) {
            job = attempt(Coding::Gzip);
        }
        let Some((coding, charge)) = job else {
            // Sent as a node without compression would send it.
            CompressionStats::add(&self.cfg.stats.skipped_memory, 1);
            merge_vary(&mut served.headers);
            return Ok(served);
        };
        let store = base.map(|(key, meta)| StoreJob {
            engine: engine.clone(),
            key,
            coding,
            meta: CachedMeta {
                headers: encoded_headers(&meta.headers, coding),
                ..(*meta).clone()
            },
            stats: self.cfg.stats.clone(),
        });
        let body = std::mem::replace(&mut served.body, ServedBody::Empty);
        match self.compress_body(body, coding, store, whole, charge).await {
            Ok(body) => {
                served.headers = encoded_headers(&served.headers, coding);
                served.body = body;
                Ok(served)
            }
            Err(e) => {
                debug!(error = %e, "body failed before compression");
                Err(EdgeError::UpstreamBody)
            }
        }
    }

    /// What compressing a body with `coding` holds at most, whole (`whole` bytes) or streamed.
    fn encoding_estimate(&self, coding: Coding, whole: Option<u64>) -> u64 {
        let level = self.level(coding);
        match whole {
            Some(n) => memory::whole_job_bytes(coding, level, n),
            None => memory::stream_encoder_bytes(coding, level),
        }
    }

    /// `estimate` bytes of the compression share, or all of it for a job estimated at more
    /// (it runs when nothing else does); `None` when that does not fit now.
    fn take(&self, estimate: u64) -> Option<Charge> {
        self.memory.take(estimate.min(self.memory.limit()))
    }

    /// The length of a body compressed whole (up to `compression.stream_threshold`, and not
    /// for a conditional request); `None` for one that streams through an encoder.
    fn whole_len(&self, body: &ServedBody, lazy: bool) -> Option<u64> {
        let n = match body {
            ServedBody::Empty => 0,
            ServedBody::Full(b) => b.len() as u64,
            ServedBody::Stream { len, .. } => (*len)?,
        };
        (!lazy && n <= self.cfg.stream_threshold).then_some(n)
    }

    /// Compresses `body` whole when `whole` says so, else as a stream; `charge` is the job's
    /// share of memory, held until the job is done (a stream's, until it is dropped).
    async fn compress_body(
        &self,
        body: ServedBody,
        coding: Coding,
        store: Option<StoreJob>,
        whole: Option<u64>,
        charge: Charge,
    ) -> io::Result<ServedBody> {
        let Some(n) = whole else {
            return Ok(self.compress_streaming(body, coding, store, charge));
        };
        let data = match body {
            ServedBody::Empty => Bytes::new(),
            ServedBody::Full(b) => b,
            ServedBody::Stream { stream, .. } => collect(stream, n).await?,
        };
        let encoded = self.encode_whole(coding, data, charge).await?;
        if let Some(job) = store {
            job.store(encoded.clone()).await;
        }
        Ok(ServedBody::Full(encoded))
    }

    /// Whole-buffer compression, off the worker thread for larger bodies. The job holds
    /// `charge` (a blocking job, in its own thread: dropping this future does not stop it);
    /// the output keeps as much of it as it takes until it is dropped.
    async fn encode_whole(&self, coding: Coding, data: Bytes, charge: Charge) -> io::Result<Bytes> {
        let level = self.level(coding);
        let in_len = data.len() as u64;
        let job = move || encode(coding, &data, level).map(|out| charge.into_bytes(out));
        let out = if in_len <= INLINE_MAX as u64 {
            job()?
        } else {
            tokio::task::spawn_blocking(job)
                .await
                .map_err(io::Error::other)??
        };
        let stats = &self.cfg.stats;
        stats.compressed(coding);
        CompressionStats::add(&stats.bytes_in, in_len);
        CompressionStats::add(&stats.bytes_out, out.len() as u64);
        Ok(out)
    }

    fn compress_streaming(
        &self,
        body: ServedBody,
        coding: Coding,
        store: Option<StoreJob>,
        charge: Charge,
    ) -> ServedBody {
        let input = match body {
            ServedBody::Empty => futures_util::stream::empty().boxed(),
            ServedBody::Full(b) => futures_util::stream::once(async move { Ok(b) }).boxed(),
            ServedBody::Stream { stream, .. } => stream,
        };
        let stats = self.cfg.stats.clone();
        let counted = input
            .inspect_ok(move |b| CompressionStats::add(&stats.bytes_in, b.len() as u64))
            .boxed();
        ServedBody::Stream {
            stream: Metered {
                inner: encode_stream(coding, self.level(coding), counted),
                stats: self.cfg.stats.clone(),
                coding,
                started: false,
                tee: store.map(|job| Tee {
                    job,
                    chunks: Vec::new(),
                    size: 0,
                    charge: self.memory.take(0).expect("nothing always fits"),
                }),
                _charge: charge,
            }
            .boxed(),
            len: None,
            range: None,
        }
    }

    /// An origin-encoded response: as is for a client that accepts its coding, decoded (capped)
    /// for one that does not.
    async fn origin_encoded(
        &self,
        mut served: Served,
        coding: Coding,
        method: &Method,
        req: &HeaderMap,
    ) -> Result<Served, EdgeError> {
        merge_vary(&mut served.headers);
        let stats = &self.cfg.stats;
        if accepts(req, coding) {
            CompressionStats::add(&stats.precompressed_served, 1);
            return Ok(served);
        }
        decoded_headers(&mut served.headers);
        let body = std::mem::replace(&mut served.body, ServedBody::Empty);
        if *method != Method::GET {
            // The decoded length is unknown without decoding.
            served.body = ServedBody::Stream {
                stream: futures_util::stream::empty().boxed(),
                len: None,
                range: None,
            };
            return Ok(served);
        }
        CompressionStats::add(&stats.decompressed, 1);
        let cap = self.cfg.max_decompressed_size;
        let threshold = self.cfg.stream_threshold;
        // A small body is decoded whole (a 502 past the cap), a large one as a stream. A small
        // one that streams is gathered first: its copy counts against the share until it is
        // decoded (without room for it, it is decoded as a stream).
        let input = match body {
            ServedBody::Empty => Ok((Bytes::new(), None)),
            ServedBody::Full(b) if b.len() as u64 <= threshold => Ok((b, None)),
            ServedBody::Stream {
                stream,
                len: Some(n),
                ..
            } if n <= threshold => match self.take(n) {
                Some(held) => match collect(stream, n).await {
                    Ok(data) => Ok((data, Some(held))),
                    // The body's own failure (the origin's, or a damaged stored copy), not a
                    // decoding's: as when it fails before compression.
                    Err(e) => {
                        debug!(error = %e, "body failed before decoding");
                        return Err(EdgeError::UpstreamBody);
                    }
                },
                None => Err(stream),
            },
            ServedBody::Full(b) => Err(futures_util::stream::once(async move { Ok(b) }).boxed()),
            ServedBody::Stream { stream, .. } => Err(stream),
        };
        let (window, input) = match input {
            Ok((data, held)) => {
                let window = match window_bits(coding, &data) {
                    Ok(window) => window,
                    Err(e) => return Err(self.refused(coding, e)),
                };
                let (decoded, held) = self.decode_whole(coding, &data, window, held).await;
                match decoded {
                    Some(Ok(out)) => {
                        served.body = ServedBody::Full(out);
                        return Ok(served);
                    }
                    Some(Err(e)) => return Err(self.refused(coding, e)),
                    // No room to decode it whole, or more than a whole decoding produces:
                    // decoded again, as a stream (the gathered copy keeps its charge).
                    None => (
                        window,
                        futures_util::stream::once(async move { Ok(data) })
                            .map(move |chunk| {
                                let _held = &held;
                                chunk
                            })
                            .boxed(),
                    ),
                }
            }
            Err(stream) => match peek_window(coding, stream).await {
                (Ok(window), stream) => (window, stream),
                (Err(e), _) => return Err(self.refused(coding, e)),
            },
        };
        let Some(charge) = self.take(memory::decoder_bytes(coding, window)) else {
            CompressionStats::add(&stats.decompress_busy, 1);
            return Err(EdgeError::DecodeBusy {
                coding: coding.as_str(),
            });
        };
        let decoded = decoder(coding, input, cap, Some(stats.clone()));
        // The charge goes with the stream.
        served.body = ServedBody::Stream {
            stream: decoded
                .map(move |chunk| {
                    let _held = &charge;
                    chunk
                })
                .boxed(),
            len: None,
            range: None,
        };
        Ok(served)
    }

    /// Decodes `data` whole, up to the cap or [`WHOLE_DECODE_MAX`], whichever is smaller,
    /// within the compression share. `None` when it does not fit the share now, or decodes
    /// to more than `WHOLE_DECODE_MAX` but the cap allows more: then it is decoded as a
    /// stream.
    /// `held`: the charge `data` counts against already (gathered for this), handed back.
    async fn decode_whole(
        &self,
        coding: Coding,
        data: &Bytes,
        window: Option<u32>,
        held: Option<Charge>,
    ) -> (Option<Result<Bytes, DecodeError>>, Option<Charge>) {
        let cap = self.cfg.max_decompressed_size;
        let limit = cap.min(WHOLE_DECODE_MAX);
        let input = match held {
            Some(_) => 0,
            None => data.len() as u64,
        };
        // The output grows by doubling: twice the limit at most.
        let estimate = memory::decoder_bytes(coding, window) + 2 * limit + input;
        let Some(charge) = self.take(estimate) else {
            return (None, held);
        };
        let input = data.clone();
        // The job holds the charges in its own thread (the input's too, as long as it reads it,
        // even if the request has gone); the output keeps its part.
        let job = move || {
            (
                decode(coding, &input, limit).map(|out| charge.into_bytes(out)),
                held,
            )
        };
        let (decoded, held) = tokio::task::spawn_blocking(job)
            .await
            .unwrap_or_else(|e| (Err(DecodeError::Corrupt(io::Error::other(e))), None));
        let decoded = match decoded {
            Err(DecodeError::TooLarge(_)) if limit < cap => None,
            other => Some(other),
        };
        (decoded, held)
    }

    /// Counts and logs a decoding refused (past the cap, or corrupt) and names it for the
    /// client.
    fn refused(&self, coding: Coding, e: DecodeError) -> EdgeError {
        CompressionStats::add(&self.cfg.stats.decompress_refused, 1);
        debug!(coding = coding.as_str(), error = %e, "refused to decode an origin-encoded body");
        EdgeError::Undecodable {
            coding: coding.as_str(),
            reason: e.client_reason(),
        }
    }
}

/// The brotli window `data` declares; `None` for gzip (its window is fixed) or when unknown.
/// A large-window stream is refused: it is not a `br` coding.
fn window_bits(coding: Coding, data: &[u8]) -> Result<Option<u32>, DecodeError> {
    if coding != Coding::Br {
        return Ok(None);
    }
    match memory::brotli_window_of(data) {
        memory::BrotliWindow::Bits(bits) => Ok(Some(bits)),
        memory::BrotliWindow::Unknown => Ok(None),
        memory::BrotliWindow::Large => Err(DecodeError::LargeWindow),
    }
}

/// A brotli stream's window, read from its first chunk (put back in front); see
/// [`window_bits`].
async fn peek_window(
    coding: Coding,
    mut stream: BoxStream<'static, io::Result<Bytes>>,
) -> (
    Result<Option<u32>, DecodeError>,
    BoxStream<'static, io::Result<Bytes>>,
) {
    if coding != Coding::Br {
        return (Ok(None), stream);
    }
    match stream.next().await {
        Some(Ok(first)) => (
            window_bits(coding, &first),
            futures_util::stream::once(async move { Ok(first) })
                .chain(stream)
                .boxed(),
        ),
        // An error is the decoder's to report, in its place.
        Some(Err(e)) => (
            Ok(None),
            futures_util::stream::once(async move { Err(e) }).boxed(),
        ),
        None => (Ok(None), futures_util::stream::empty().boxed()),
    }
}

/// Reads a stream whole; more than `max` bytes (its length) is an error. The copy, when there
/// is one, is allocated once, at `max`.
async fn collect(mut stream: BoxStream<'static, io::Result<Bytes>>, max: u64) -> io::Result<Bytes> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut total: u64 = 0;
    while let Some(chunk) = stream.try_next().await? {
        total += chunk.len() as u64;
        if total > max {
            return Err(io::Error::other("body longer than its Content-Length"));
        }
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            None => buf.extend_from_slice(&chunk),
            Some(f) => {
                buf.reserve(max.min(usize::MAX as u64) as usize);
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&chunk);
            }
        }
    }
    // A single chunk (a memory hit, a small fill) is used without copying.
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Stores an encoded variant once its bytes are known.
struct StoreJob {
    engine: Arc<Engine>,
    key: KeyHash,
    coding: Coding,
    meta: CachedMeta,
    stats: Arc<CompressionStats>,
}

impl StoreJob {
    async fn store(mut self, body: Bytes) {
        self.meta.body_len = body.len() as u64;
        self.engine
            .put_encoded(self.key, self.coding.as_str(), self.meta, body)
            .await;
        CompressionStats::add(&self.stats.variants_stored, 1);
    }
}

/// Encoded chunks kept for storing the variant when the stream completes.
struct Tee {
    job: StoreJob,
    chunks: Vec<Bytes>,
    size: u64,
    /// The chunks' share of memory: a tee that does not fit is dropped.
    charge: Charge,
}

/// A streaming encoder's output: counts the compression (on first poll, so a body that is
/// never sent costs nothing) and the bytes out, and stores the variant when it completes.
struct Metered {
    inner: BoxStream<'static, io::Result<Bytes>>,
    stats: Arc<CompressionStats>,
    coding: Coding,
    started: bool,
    tee: Option<Tee>,
    /// The encoder's share of memory, until the stream is dropped.
    _charge: Charge,
}

impl Stream for Metered {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.started {
            this.started = true;
            this.stats.compressed(this.coding);
        }
        match ready!(this.inner.poll_next_unpin(cx)) {
            Some(Ok(chunk)) => {
                CompressionStats::add(&this.stats.bytes_out, chunk.len() as u64);
                if let Some(tee) = &mut this.tee {
                    tee.size += chunk.len() as u64;
                    if tee.size > STREAMED_VARIANT_MAX || !tee.charge.grow(chunk.len() as u64) {
                        this.tee = None;
                    } else {
                        tee.chunks.push(chunk.clone());
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Some(Err(e)) => {
                this.tee = None;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                if let Some(Tee {
                    job,
                    chunks,
                    charge,
                    ..
                }) = this.tee.take()
                {
                    // The whole variant keeps the chunks' charge until it is stored.
                    let body = if chunks.len() == 1 {
                        chunks[0].clone()
                    } else {
                        charge.into_bytes(chunks.concat())
                    };
                    tokio::spawn(job.store(body));
                }
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{MediaPattern, decode_stream};
    use http::HeaderValue;

    /// A response whose gzip body (`n` bytes) streams in through `rx`.
    fn gzipped_stream(rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>, n: u64) -> Served {
        let mut served = Served::failed(
            crate::cache::Failure::NotCached,
            std::time::SystemTime::now(),
        );
        served.status = http::StatusCode::OK;
        served.failure = None;
        served
            .headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        served.body = ServedBody::Stream {
            stream: futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (chunk, rx))
            })
            .boxed(),
            len: Some(n),
            range: None,
        };
        served
    }

    /// A gathered body is charged once while it is decoded whole: with a share that holds the
    /// gathered copy and the decoding's own estimate, and no more, it is decoded whole (it was
    /// counted twice, and fell back to a stream, or 503).
    #[tokio::test]
    async fn a_gathered_body_is_charged_once_while_decoded() {
        let data = Bytes::from(text(50_000));
        let encoded = Bytes::from(encode(Coding::Gzip, &data, 6).unwrap());
        let n = encoded.len() as u64;
        let cfg = CompressionConfig::default();
        let limit = cfg.max_decompressed_size.min(WHOLE_DECODE_MAX);
        let share = memory::decoder_bytes(Coding::Gzip, None) + 2 * limit + n;
        let compressor = Compressor::new(cfg, share);
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(1);
        tx.send(Ok(encoded)).await.unwrap();
        drop(tx);
        let served = compressor
            .origin_encoded(
                gzipped_stream(rx, n),
                Coding::Gzip,
                &Method::GET,
                &HeaderMap::new(),
            )
            .await
            .expect("decoded");
        let ServedBody::Full(out) = served.body else {
            panic!("not decoded whole");
        };
        assert!(out == data);
    }

    /// An origin-gzipped body that streams in (a fill, a disk read) and is small enough to be
    /// decoded whole for a client that does not take gzip is gathered first: its copy counts
    /// against the compression share while it gathers (a hostile review: a thousand such
    /// requests held a GiB no budget counted), and the charge goes once it is decoded.
    #[tokio::test]
    async fn a_body_gathered_to_be_decoded_counts_against_the_share() {
        let data = Bytes::from(text(200_000));
        let encoded = Bytes::from(encode(Coding::Gzip, &data, 6).unwrap());
        let n = encoded.len() as u64;
        let compressor = Arc::new(Compressor::new(CompressionConfig::default(), 16 << 20));
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let served = gzipped_stream(rx, n);
        let decoding = tokio::spawn({
            let compressor = Arc::clone(&compressor);
            async move {
                compressor
                    .origin_encoded(served, Coding::Gzip, &Method::GET, &HeaderMap::new())
                    .await
            }
        });
        let half = encoded.len() / 2;
        tx.send(Ok(encoded.slice(..half))).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while compressor.memory().used() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gathering {n} bytes holds {} of the share",
                compressor.memory().used()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tx.send(Ok(encoded.slice(half..))).await.unwrap();
        drop(tx);
        let served = decoding.await.unwrap().expect("decoded");
        let ServedBody::Full(out) = served.body else {
            panic!("decoded whole");
        };
        assert!(out == data, "the origin's bytes");
        // The decoded body keeps its own share until sent; the gathered copy's went.
        assert_eq!(compressor.memory().used(), out.len() as u64);
        drop(out);
        assert_eq!(compressor.memory().used(), 0);
    }

    fn ae(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    fn text(len: usize) -> Vec<u8> {
        let words = ["cache ", "edge ", "origin ", "vary ", "stale ", "fresh "];
        let mut out = Vec::with_capacity(len);
        let mut i = 0usize;
        while out.len() < len {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn round_trips_both_codings() {
        let data = text(100_000);
        for (coding, level) in [(Coding::Br, 4), (Coding::Gzip, 6), (Coding::Br, 0)] {
            let enc = encode(coding, &data, level).unwrap();
            assert!(enc.len() < data.len() / 2, "{coding:?} compresses text");
            assert_eq!(decode(coding, &enc, 1 << 20).unwrap(), data);
        }
    }

    fn brotli_wbits(stream: &[u8]) -> u32 {
        match memory::brotli_window_of(stream) {
            memory::BrotliWindow::Bits(bits) => bits,
            other => panic!("no window: {other:?}"),
        }
    }

    /// brotli's window fits the body, up to 512 KiB: its default (4 MiB) cost ~9 MiB of
    /// encoder memory for any body, and twice the time for a 10 KiB one.
    #[tokio::test]
    async fn brotli_windows_fit_the_body_up_to_512_kib() {
        for (len, wbits) in [
            (600, 10),
            (10 << 10, 14),
            ((10 << 10) + 1, 14),
            (100 << 10, 17),
        ] {
            let data = text(len);
            let enc = encode(Coding::Br, &data, 4).unwrap();
            assert_eq!(brotli_wbits(&enc), wbits, "{len} bytes");
            assert_eq!(decode(Coding::Br, &enc, 1 << 20).unwrap(), data);
        }
        let big = text(4 << 20);
        assert_eq!(brotli_wbits(&encode(Coding::Br, &big, 4).unwrap()), 19);
        let input = futures_util::stream::iter(
            big.chunks(64 << 10)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )
        .boxed();
        let streamed: Vec<Bytes> = crate::compress::encode_stream(Coding::Br, 4, input)
            .map(|c| c.unwrap())
            .collect()
            .await;
        let streamed = streamed.concat();
        assert_eq!(brotli_wbits(&streamed), 19);
        assert_eq!(decode(Coding::Br, &streamed, 8 << 20).unwrap(), big);
    }

    #[test]
    fn decoding_stops_at_the_cap() {
        let zeros = vec![0u8; 4 << 20];
        for coding in [Coding::Br, Coding::Gzip] {
            let bomb = encode(coding, &zeros, 6).unwrap();
            assert!(bomb.len() < 64 << 10);
            assert!(matches!(
                decode(coding, &bomb, 1 << 20),
                Err(DecodeError::TooLarge(_))
            ));
            assert_eq!(decode(coding, &bomb, 4 << 20).unwrap().len(), 4 << 20);
        }
        assert!(matches!(
            decode(Coding::Gzip, b"not gzip at all", 100),
            Err(DecodeError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn streams_round_trip_and_the_decoder_is_capped() {
        let data = Bytes::from(text(300_000));
        for coding in [Coding::Br, Coding::Gzip] {
            let chunks: Vec<io::Result<Bytes>> = data
                .chunks(7_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let enc: Vec<Bytes> =
                encode_stream(coding, 5, futures_util::stream::iter(chunks).boxed())
                    .try_collect()
                    .await
                    .unwrap();
            let enc = enc.concat();
            assert_eq!(decode(coding, &enc, 1 << 20).unwrap(), data);
            let input = futures_util::stream::iter([Ok(Bytes::from(enc.clone()))]).boxed();
            let dec: Vec<Bytes> = decode_stream(coding, input, 1 << 20)
                .try_collect()
                .await
                .unwrap();
            assert_eq!(dec.concat(), data);
            let input = futures_util::stream::iter([Ok(Bytes::from(enc))]).boxed();
            let capped: io::Result<Vec<Bytes>> =
                decode_stream(coding, input, 100_000).try_collect().await;
            assert!(capped.is_err(), "{coding:?} decode passes the cap");
        }
    }

    #[test]
    fn accepts_follows_q_values() {
        assert!(accepts(&ae("gzip, br"), Coding::Gzip));
        assert!(accepts(&ae("gzip;q=0, br"), Coding::Br));
        assert!(!accepts(&ae("gzip;q=0, br"), Coding::Gzip));
        assert!(!accepts(&ae("br;q=0.0"), Coding::Br));
        assert!(accepts(&ae("*"), Coding::Gzip));
        assert!(!accepts(&ae("*;q=0, br"), Coding::Gzip));
        assert!(accepts(&ae("x-gzip"), Coding::Gzip));
        assert!(!accepts(&HeaderMap::new(), Coding::Gzip));
        assert!(accepts(&ae("identity;q=0"), Coding::Identity));
        // Negotiation itself is Coding::negotiate: identity;q=0 with nothing else → identity.
        assert_eq!(Coding::negotiate(&ae("identity;q=0")), Coding::Identity);
        assert_eq!(Coding::negotiate(&ae("gzip;q=0, br")), Coding::Br);
    }

    #[test]
    fn media_patterns() {
        let p = |s| MediaPattern::parse(s).unwrap();
        assert!(p("text/*").matches("text", "html"));
        assert!(p("TEXT/*").matches("Text", "CSS"));
        assert!(p("application/json").matches("application", "JSON"));
        assert!(!p("application/json").matches("application", "jsonx"));
        assert!(p("application/*+json").matches("application", "ld+json"));
        assert!(!p("application/*+json").matches("application", "+json"));
        assert!(p("*/*+xml").matches("image", "svg+xml"));
        for bad in ["text", "text/", "/x", "te xt/html", "text/a b", "text/*+"] {
            assert!(MediaPattern::parse(bad).is_err(), "{bad}");
        }
    }

    /// A whole compression's output keeps its share, at its size, until it is dropped; and a
    /// blocking job keeps its share while it runs, even once the request that started it is
    /// gone (before, the share came back while brotli still held ~10 MiB in its thread).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_jobs_and_their_output_hold_their_share() {
        let c = Compressor::new(CompressionConfig::default(), 64 << 20);
        let data = Bytes::from(text(256 << 10));
        let charge = c.take(4 << 20).expect("room");
        let out = c
            .encode_whole(Coding::Gzip, data.clone(), charge)
            .await
            .expect("encoded");
        assert_eq!(c.memory().used(), out.len() as u64);
        drop(out);
        assert_eq!(c.memory().used(), 0);

        // A slow job (quality 11 on 1 MiB), its future dropped once started.
        let slow = CompressionConfig {
            brotli_quality: 11,
            ..CompressionConfig::default()
        };
        let c = Compressor::new(slow, 64 << 20);
        let data = Bytes::from(text(1 << 20));
        let charge = c.take(40 << 20).expect("room");
        {
            let job = c.encode_whole(Coding::Br, data, charge);
            let mut job = std::pin::pin!(job);
            assert!(futures_util::poll!(job.as_mut()).is_pending());
        }
        assert_eq!(c.memory().used(), 40 << 20, "held while the job runs");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while c.memory().used() > 0 {
            assert!(std::time::Instant::now() < deadline, "never given back");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn compressible_decisions() {
        let c = Compressor::new(CompressionConfig::default(), 16 << 20);
        let headers = |ct: &str, cc: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            if let Some(cc) = cc {
                h.insert(header::CACHE_CONTROL, HeaderValue::from_str(cc).unwrap());
            }
            h
        };
        assert!(c.compressible(&headers("text/html; charset=utf-8", None), Some(4096)));
        assert!(c.compressible(&headers("application/json", None), None));
        assert!(c.compressible(&headers("image/svg+xml", None), Some(2048)));
        assert!(!c.compressible(&headers("text/html", None), Some(1023)));
        assert!(!c.compressible(&headers("image/png", None), Some(4096)));
        assert!(!c.compressible(&headers("font/woff2", None), Some(4096)));
        assert!(!c.compressible(&headers("text/event-stream", None), None));
        assert!(!c.compressible(
            &headers("text/css", Some("public, No-Transform")),
            Some(4096)
        ));
        assert!(!c.compressible(&HeaderMap::new(), Some(4096)));
    }

    #[test]
    fn variant_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5000"));
        let v = encoded_headers(&h, Coding::Br);
        assert_eq!(v[header::ETAG], "W/\"abc\"");
        assert_eq!(v[header::VARY], "Origin, Accept-Encoding");
        assert_eq!(v[header::CONTENT_ENCODING], "br");
        assert!(!v.contains_key(header::CONTENT_LENGTH));
        // Idempotent.
        let again = encoded_headers(&v, Coding::Br);
        assert_eq!(again[header::ETAG], "W/\"abc\"");
        assert_eq!(again[header::VARY], "Origin, Accept-Encoding");
        let mut star = HeaderMap::new();
        star.insert(header::VARY, HeaderValue::from_static("*"));
        merge_vary(&mut star);
        assert_eq!(star[header::VARY], "*");
        let mut none = HeaderMap::new();
        merge_vary(&mut none);
        assert_eq!(none[header::VARY], "Accept-Encoding");
    }

    #[test]
    fn response_codings() {
        let ce = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
            encoded(&h)
        };
        assert_eq!(encoded(&HeaderMap::new()), Encoded::No);
        assert_eq!(ce("identity"), Encoded::No);
        assert_eq!(ce("GZIP"), Encoded::Known(Coding::Gzip));
        assert_eq!(ce("br"), Encoded::Known(Coding::Br));
        assert_eq!(ce("deflate"), Encoded::Other);
        assert_eq!(ce("gzip, br"), Encoded::Other);
    }
}
