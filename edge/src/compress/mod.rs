//! Compression: br and gzip negotiated per request, each encoded variant stored once beside its
//! identity object, origin-encoded responses served as they are or decoded under a size cap.
//!
//! It runs between the engine's answer and `respond` (`Compressor::apply` in `proxy/compress.rs`):
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
//!   (`proxy::forward::upstream_request`), so what an origin varies on is exactly what the key
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
//!   thread below `INLINE_MAX`, on a blocking thread above it) and sent with a
//!   Content-Length; larger or unknown-length bodies stream through an async-compression
//!   encoder. A request with If-None-Match / If-Modified-Since compresses lazily, so a 304
//!   costs no compression. Variants go to [`Engine::put_encoded`](outpost_cache::Engine::put_encoded); purges remove them with
//!   their identity object.
//! - **Origin-encoded bodies** are stored as the origin sent them. A client that does not
//!   accept the coding gets them decoded, and decoding stops at
//!   `compression.max_decompressed_size` (zip-bomb protection): a 502 when the body is decoded
//!   whole, an aborted body when it streams. They are not re-encoded into another coding.
//!
//! - **Memory**: every job takes its estimated peak from a share of `--memory` before it
//!   starts, and a job that does not fit is not done (identity is sent, or 503 for a decoding);
//!   see [`memory`].
//!
//! Files: [`config`] (the settings), [`codec`] (encoders and capped decoders), [`memory`] (the
//! share and the estimates), [`variant`]
//! (what a request accepts, the headers of a variant), [`stats`] (counters). The phase itself,
//! which decides per response, is `proxy/compress.rs`.

pub mod codec;
pub mod config;
pub mod memory;
pub mod stats;
pub mod variant;

pub use codec::{DecodeError, decode, decode_stream, encode, encode_stream};
pub use config::{CompressionConfig, DEFAULT_TYPES, MediaPattern};
pub use stats::{CompressionSnapshot, CompressionStats};
