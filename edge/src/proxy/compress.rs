//! Compression: br and gzip negotiated per request, each encoded variant stored once beside its
//! identity object, origin-encoded responses served as they are or decoded under a size cap.
//!
//! It runs between the engine's answer and `respond` ([`Compressor::apply`]):
//!
//! ```text
//! engine.serve ─→ status 200, no Content-Range?
//!   ├─ Content-Encoding br/gzip (the origin's): client accepts it → as is (no double compression)
//!   │                                            otherwise → decode, output capped
//!   └─ identity: compressible (type, size, no no-transform)? → Vary: Accept-Encoding
//!        negotiated br/gzip, GET, no Range → stored variant? → serve it (no compression)
//!                                            otherwise → compress, store the variant
//! ```
//!
//! Decisions, each deliberate:
//! - **Negotiation** is [`Coding::negotiate`] (RFC 9110 §12.5.3 with q-values; br, then gzip,
//!   then identity). `identity;q=0` with nothing else acceptable still gets identity: the RFC
//!   lets a server send identity rather than 406, and a cache answering 406 helps nobody. A
//!   request without Accept-Encoding gets identity, although §12.5.3 would allow any coding:
//!   clients that send none (curl, scripts) rarely decode.
//! - **Buckets**: the cache key hashes the bucket (`br`, `gzip`, `identity`, see
//!   `cache::key`), and the upstream request carries the bucket name as its Accept-Encoding
//!   ([`Compressor::prepare_upstream`]), so what an origin varies on is exactly what the key
//!   holds.
//! - **Never compressed**: responses that already have a Content-Encoding, `Cache-Control:
//!   no-transform` (response, RFC 9110 §7.7; or request, RFC 9111 §5.2.1.6), anything but 200
//!   (206 included), Range requests (served from the identity object, RFC 9110 §14), HEAD (it
//!   gets the stored variant's headers when one exists, the identity headers otherwise), types
//!   outside `compression.types`, bodies below `compression.min_size`, and `text/event-stream`
//!   (an encoder would hold events back).
//! - **Vary**: every response that could be sent in another coding carries
//!   `Vary: Accept-Encoding`, merged with the origin's Vary (RFC 9110 §12.5.5).
//! - **Validators**: an encoded variant carries the weakened ETag (`W/"x"` for `"x"`). The
//!   client's If-None-Match is compared weakly (RFC 9110 §13.1.2), so a conditional request with
//!   either tag gets 304; If-Range needs a strong match, and ranges come from the identity
//!   object, which keeps the strong tag.
//! - **How**: bodies up to `compression.stream_threshold` are compressed whole (on the worker
//!   thread below [`INLINE_MAX`], on a blocking thread above it) and sent with a
//!   Content-Length; larger or unknown-length bodies stream through an async-compression
//!   encoder. A request with If-None-Match / If-Modified-Since compresses lazily, so a 304
//!   costs no compression. Variants go to [`Engine::put_encoded`]; purges remove them with
//!   their identity object.
//! - **Origin-encoded bodies** are stored as the origin sent them. A client that does not
//!   accept the coding gets them decoded, and decoding stops at
//!   `compression.max_decompressed_size` (zip-bomb protection): a 502 when the body is decoded
//!   whole, an aborted body when it streams. They are not re-encoded into another coding.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use async_compression::Level;
use async_compression::tokio::bufread::{BrotliDecoder, BrotliEncoder, GzipDecoder, GzipEncoder};
use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use tokio_util::io::{ReaderStream, StreamReader};
use tracing::debug;

use crate::cache::hit::Codings;
use crate::cache::key::{Coding, KeyHash};
use crate::cache::meta::CachedMeta;
use crate::cache::status::CacheStatus;
use crate::cache::{Engine, Served, ServedBody, error_served};

/// Whole-buffer compression of bodies up to this size runs on the async worker thread (about
/// a quarter of a millisecond at brotli 4); larger bodies go to a blocking thread.
pub const INLINE_MAX: usize = 16 * 1024;

/// A streamed variant is stored only up to this encoded size; beyond it the tee is dropped.
const STREAMED_VARIANT_MAX: u64 = 32 << 20;

/// Output chunk size of the streaming encoders and decoders.
const STREAM_CHUNK: usize = 32 * 1024;

/// Types compressed by default: text, structured text, scripts, SVG, wasm and the font formats
/// that are not compressed already (woff and woff2 are).
pub const DEFAULT_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/*+xml",
    "application/wasm",
    "application/yaml",
    "application/toml",
    "application/vnd.ms-fontobject",
    "application/x-font-ttf",
    "application/x-font-otf",
    "font/ttf",
    "font/otf",
    "font/collection",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
];

/// The `[compression]` settings (see `configs/edge.toml`).
#[derive(Debug, Clone)]
pub struct CompressionConfig {
    pub enabled: bool,
    /// Bodies smaller than this are sent as they are.
    pub min_size: u64,
    /// Content types compressed.
    pub types: Vec<MediaPattern>,
    /// gzip level, 1..=9 (6 by default).
    pub gzip_level: u32,
    /// brotli quality, 0..=11 (4 by default; 11 runs at about 0.5 MB/s).
    pub brotli_quality: u32,
    /// Bodies above this size (or of unknown size) stream through the encoder.
    pub stream_threshold: u64,
    /// Decoding an origin-encoded body stops at this many bytes.
    pub max_decompressed_size: u64,
    /// The counters the edge built from this config updates. A shared handle: clones of the
    /// config share it, so it can be read (metrics, tests) while the edge runs.
    pub stats: Arc<CompressionStats>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_size: 1024,
            types: DEFAULT_TYPES
                .iter()
                .map(|t| MediaPattern::parse(t).expect("built-in media type pattern"))
                .collect(),
            gzip_level: 6,
            brotli_quality: 4,
            stream_threshold: 1 << 20,
            max_decompressed_size: 64 << 20,
            stats: Arc::default(),
        }
    }
}

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
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn compressed(&self, coding: Coding) {
        match coding {
            Coding::Br => Self::add(&self.compressed_br, 1),
            Coding::Gzip => Self::add(&self.compressed_gzip, 1),
            Coding::Identity => {}
        }
    }
}

/// A media type pattern from `compression.types`: `type/subtype`, `type/*` or `type/*+suffix`
/// (`*` as the type matches any type). Compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPattern {
    top: String,
    sub: SubPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SubPattern {
    Any,
    Exact(String),
    /// `+json` for `*+json`.
    Suffix(String),
}

impl MediaPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid media type pattern {text:?} (expected type/subtype, type/* or type/*+suffix, for example \"text/*\" or \"application/*+json\")"
            )
        };
        let t = text.trim().to_ascii_lowercase();
        let (top, sub) = t.split_once('/').ok_or_else(bad)?;
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        if top != "*" && !token(top) {
            return Err(bad());
        }
        let sub = if sub == "*" {
            SubPattern::Any
        } else if let Some(suffix) = sub.strip_prefix("*+") {
            if !token(suffix) {
                return Err(bad());
            }
            SubPattern::Suffix(format!("+{suffix}"))
        } else if token(sub) {
            SubPattern::Exact(sub.to_string())
        } else {
            return Err(bad());
        };
        Ok(Self {
            top: top.to_string(),
            sub,
        })
    }

    /// Does `top/sub` (ASCII, any case) match?
    pub fn matches(&self, top: &str, sub: &str) -> bool {
        if self.top != "*" && !self.top.eq_ignore_ascii_case(top) {
            return false;
        }
        match &self.sub {
            SubPattern::Any => true,
            SubPattern::Exact(s) => s.eq_ignore_ascii_case(sub),
            SubPattern::Suffix(s) => {
                sub.len() > s.len()
                    && sub.is_char_boundary(sub.len() - s.len())
                    && sub[sub.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

/// Why decoding an encoded body failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body decodes to more than {0} bytes")]
    TooLarge(u64),
    #[error("corrupt encoded body: {0}")]
    Corrupt(io::Error),
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
                lgwin: 22,
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
            ReaderStream::with_capacity(BrotliEncoder::with_quality(reader, level), STREAM_CHUNK)
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
fn decoder(
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

/// Whether the request's Accept-Encoding allows `coding`: q > 0 for it, or for `*` when it is
/// not listed (RFC 9110 §12.5.3). Identity is always allowed (see the module docs); without
/// Accept-Encoding nothing else is.
pub fn accepts(headers: &HeaderMap, coding: Coding) -> bool {
    if coding == Coding::Identity {
        return true;
    }
    let mut listed: Option<f32> = None;
    let mut star: Option<f32> = None;
    for v in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="))
                })
                .map(|q| q.trim().parse::<f32>().unwrap_or(0.0))
                .next_back()
                .unwrap_or(1.0);
            if name == "*" {
                star = Some(q);
            } else if coding_named(name) == Some(coding) {
                listed = Some(q);
            }
        }
    }
    listed.or(star).is_some_and(|q| q > 0.0)
}

fn coding_named(name: &str) -> Option<Coding> {
    if name.eq_ignore_ascii_case("br") {
        Some(Coding::Br)
    } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
        Some(Coding::Gzip)
    } else if name.eq_ignore_ascii_case("identity") {
        Some(Coding::Identity)
    } else {
        None
    }
}

/// The content coding a response already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoded {
    /// None, or `identity`.
    No,
    /// One coding we can decode.
    Known(Coding),
    /// Anything else (deflate, zstd, several codings): left alone.
    Other,
}

fn encoded(headers: &HeaderMap) -> Encoded {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    match (codings.next(), codings.next()) {
        (None, _) => Encoded::No,
        (Some(c), None) => match coding_named(c) {
            Some(c) => Encoded::Known(c),
            None => Encoded::Other,
        },
        _ => Encoded::Other,
    }
}

/// Does a Cache-Control field in `headers` carry the `no-transform` directive?
fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
}

/// Adds `Accept-Encoding` to Vary unless it (or `*`) is there already.
pub fn merge_vary(headers: &mut HeaderMap) {
    let mut names: Vec<&str> = Vec::new();
    for v in headers.get_all(header::VARY) {
        let Ok(v) = v.to_str() else { return };
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" || name.eq_ignore_ascii_case("accept-encoding") {
                return;
            }
            names.push(name);
        }
    }
    names.push("Accept-Encoding");
    if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
        headers.insert(header::VARY, v);
    }
}

/// `"x"` → `W/"x"`; a weak tag stays as it is.
pub fn weaken_etag(headers: &mut HeaderMap) {
    let Some(tag) = headers.get(header::ETAG) else {
        return;
    };
    if tag.as_bytes().starts_with(b"W/") {
        return;
    }
    let mut weak = Vec::with_capacity(tag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(tag.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&weak) {
        headers.insert(header::ETAG, v);
    }
}

/// Fields that describe the exact bytes, which a change of coding invalidates.
const BYTE_FIELDS: [&str; 5] = [
    "content-length",
    "content-md5",
    "content-digest",
    "repr-digest",
    "digest",
];

/// The headers of the `coding` variant of an identity response.
pub fn encoded_headers(identity: &HeaderMap, coding: Coding) -> HeaderMap {
    let mut h = identity.clone();
    for name in BYTE_FIELDS {
        h.remove(name);
    }
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.as_str()),
    );
    weaken_etag(&mut h);
    merge_vary(&mut h);
    h
}

/// The headers of the decoded (identity) form of an encoded response.
fn decoded_headers(headers: &mut HeaderMap) {
    for name in BYTE_FIELDS {
        headers.remove(name);
    }
    headers.remove(header::CONTENT_ENCODING);
    weaken_etag(headers);
    merge_vary(headers);
}

/// The compression phase of one edge (see the module docs).
pub struct Compressor {
    cfg: CompressionConfig,
}

impl Compressor {
    pub fn new(cfg: CompressionConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &CompressionConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<CompressionStats> {
        &self.cfg.stats
    }

    fn level(&self, coding: Coding) -> u32 {
        match coding {
            Coding::Br => self.cfg.brotli_quality,
            Coding::Gzip => self.cfg.gzip_level,
            Coding::Identity => 0,
        }
    }

    /// Sets the upstream request's Accept-Encoding to the client's bucket (`br`, `gzip` or
    /// `identity`), the value the cache key holds, so an origin that varies on it answers
    /// exactly what the key stands for.
    pub fn prepare_upstream(&self, upstream: &mut HeaderMap) {
        if self.cfg.enabled {
            let bucket = Coding::negotiate(upstream).as_str();
            upstream.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(bucket));
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
    ) -> Served {
        match self.codings(&served) {
            Codings::Ignored => return served,
            Codings::FullPath => {
                if let Encoded::Known(coding) = encoded(&served.headers) {
                    return self.origin_encoded(served, coding, method, req).await;
                }
                return served;
            }
            Codings::Negotiated => {}
        }
        // From here on the response depends on Accept-Encoding: every path below carries
        // `Vary: Accept-Encoding` (a stored variant's headers already do).
        let coding = Coding::negotiate(req);
        if coding == Coding::Identity || req.contains_key(header::RANGE) || no_transform(req) {
            merge_vary(&mut served.headers);
            return served;
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
            return served;
        }
        if *method != Method::GET {
            merge_vary(&mut served.headers);
            return served;
        }
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
        // A conditional request may end as a 304: compress only if the body is sent.
        let lazy =
            req.contains_key(header::IF_NONE_MATCH) || req.contains_key(header::IF_MODIFIED_SINCE);
        let body = std::mem::replace(&mut served.body, ServedBody::Empty);
        match self.compress_body(body, coding, store, lazy).await {
            Ok(body) => {
                served.headers = encoded_headers(&served.headers, coding);
                served.body = body;
                served
            }
            Err(e) => {
                debug!(error = %e, "body failed before compression");
                let mut s = error_served(
                    StatusCode::BAD_GATEWAY,
                    &format!("upstream body failed: {e}"),
                    served.now,
                );
                s.upstream_error = served.upstream_error;
                s
            }
        }
    }

    async fn compress_body(
        &self,
        body: ServedBody,
        coding: Coding,
        store: Option<StoreJob>,
        lazy: bool,
    ) -> io::Result<ServedBody> {
        let threshold = self.cfg.stream_threshold;
        if lazy {
            return Ok(self.compress_streaming(body, coding, store));
        }
        let data = match body {
            ServedBody::Empty => Bytes::new(),
            ServedBody::Full(b) if b.len() as u64 <= threshold => b,
            ServedBody::Stream {
                stream,
                len: Some(n),
            } if n <= threshold => collect(stream, threshold).await?,
            body => return Ok(self.compress_streaming(body, coding, store)),
        };
        let encoded = Bytes::from(self.encode_whole(coding, data).await?);
        if let Some(job) = store {
            job.store(encoded.clone()).await;
        }
        Ok(ServedBody::Full(encoded))
    }

    /// Whole-buffer compression, off the worker thread for larger bodies.
    async fn encode_whole(&self, coding: Coding, data: Bytes) -> io::Result<Vec<u8>> {
        let level = self.level(coding);
        let in_len = data.len() as u64;
        let out = if data.len() <= INLINE_MAX {
            encode(coding, &data, level)?
        } else {
            tokio::task::spawn_blocking(move || encode(coding, &data, level))
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
                }),
            }
            .boxed(),
            len: None,
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
    ) -> Served {
        merge_vary(&mut served.headers);
        let stats = &self.cfg.stats;
        if accepts(req, coding) {
            CompressionStats::add(&stats.precompressed_served, 1);
            return served;
        }
        decoded_headers(&mut served.headers);
        let body = std::mem::replace(&mut served.body, ServedBody::Empty);
        if *method != Method::GET {
            // The decoded length is unknown without decoding.
            served.body = ServedBody::Stream {
                stream: futures_util::stream::empty().boxed(),
                len: None,
            };
            return served;
        }
        CompressionStats::add(&stats.decompressed, 1);
        let cap = self.cfg.max_decompressed_size;
        let threshold = self.cfg.stream_threshold;
        let whole = match body {
            ServedBody::Empty => Ok(Bytes::new()),
            ServedBody::Full(b) if b.len() as u64 <= threshold => Ok(b),
            ServedBody::Stream {
                stream,
                len: Some(n),
            } if n <= threshold => collect(stream, threshold).await,
            body => {
                let input = match body {
                    ServedBody::Full(b) => futures_util::stream::once(async move { Ok(b) }).boxed(),
                    ServedBody::Stream { stream, .. } => stream,
                    ServedBody::Empty => futures_util::stream::empty().boxed(),
                };
                served.body = ServedBody::Stream {
                    stream: decoder(coding, input, cap, Some(stats.clone())),
                    len: None,
                };
                return served;
            }
        };
        let decoded = match whole {
            Ok(data) => tokio::task::spawn_blocking(move || decode(coding, &data, cap))
                .await
                .unwrap_or_else(|e| Err(DecodeError::Corrupt(io::Error::other(e)))),
            Err(e) => Err(DecodeError::Corrupt(e)),
        };
        match decoded {
            Ok(data) => {
                served.body = ServedBody::Full(Bytes::from(data));
                served
            }
            Err(e) => {
                CompressionStats::add(&stats.decompress_refused, 1);
                debug!(coding = coding.as_str(), error = %e, "refused to decode an origin-encoded body");
                error_served(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "cannot decode the origin's {} body for a client that does not accept it: {e} (compression.max_decompressed_size)",
                        coding.as_str()
                    ),
                    served.now,
                )
            }
        }
    }
}

/// Reads a stream whole; more than `max` bytes is an error.
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
                buf.reserve(f.len() + chunk.len());
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
}

/// A streaming encoder's output: counts the compression (on first poll, so a body that is
/// never sent costs nothing) and the bytes out, and stores the variant when it completes.
struct Metered {
    inner: BoxStream<'static, io::Result<Bytes>>,
    stats: Arc<CompressionStats>,
    coding: Coding,
    started: bool,
    tee: Option<Tee>,
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
                    if tee.size > STREAMED_VARIANT_MAX {
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
                if let Some(tee) = this.tee.take() {
                    let body = if tee.chunks.len() == 1 {
                        tee.chunks[0].clone()
                    } else {
                        Bytes::from(tee.chunks.concat())
                    };
                    tokio::spawn(tee.job.store(body));
                }
                Poll::Ready(None)
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn compressible_decisions() {
        let c = Compressor::new(CompressionConfig::default());
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
