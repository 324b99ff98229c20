//! What the engine answers: status, headers, a body (shared bytes or a stream) and how the
//! answer came about (cache outcome, tier, upstream failure).

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use http::StatusCode;
use http::header::HeaderMap;

use super::key::KeyHash;
use super::meta::CachedMeta;
use super::status::{CacheStatus, Tier};
use super::upstream::UpstreamError;

/// A body the engine hands to the responder.
pub enum ServedBody {
    Empty,
    /// A complete body held in memory (shared).
    Full(Bytes),
    /// A streaming body (fill in progress, disk read, pass-through).
    Stream {
        stream: BoxStream<'static, io::Result<Bytes>>,
        len: Option<u64>,
        /// For a body that can be read from any offset (a disk tier's content file): makes
        /// the stream of `len` bytes from `start`, so a Range request reads those, not every
        /// byte before them. `None`: a range is cut from `stream`.
        range: Option<RangeFn>,
    },
}

/// See [`ServedBody::Stream`]'s `range`: `(start, len)` to the stream of those bytes.
pub type RangeFn = Box<dyn FnOnce(u64, u64) -> BoxStream<'static, io::Result<Bytes>> + Send>;

impl ServedBody {
    pub fn len(&self) -> Option<u64> {
        match self {
            ServedBody::Empty => Some(0),
            ServedBody::Full(b) => Some(b.len() as u64),
            ServedBody::Stream { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

/// What the engine answers.
pub struct Served {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ServedBody,
    /// The stored metadata this answer came from or went into.
    pub meta: Option<Arc<CachedMeta>>,
    pub cache: CacheStatus,
    pub tier: Tier,
    /// The response was (or is being) stored.
    pub stored: bool,
    /// The upstream failure behind an error or stale answer.
    pub upstream_error: Option<UpstreamError>,
    /// Set when the engine answered without an object ([`Served::failed`]).
    pub failure: Option<Failure>,
    /// When the decision was taken.
    pub now: SystemTime,
    /// The key the answer is stored under (when it is stored).
    pub key: Option<KeyHash>,
    /// Time to the upstream response head, when this request waited for one.
    pub upstream_time: Option<Duration>,
}

/// Why the engine answered without an object. The engine owns no response formats: the proxy
/// turns a failure into the client's error response (`outpost_edge::error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstream failed and nothing stored may stand in.
    Upstream(UpstreamError),
    /// `Cache-Control: only-if-cached` and nothing stored satisfies the request
    /// (RFC 9111 §5.2.1.7): 504.
    NotCached,
}

impl Failure {
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::Upstream(e) => e.status(),
            Failure::NotCached => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

impl Served {
    /// An answer without an object: its status and no body; the proxy renders the failure.
    pub fn failed(failure: Failure, now: SystemTime) -> Served {
        Served {
            upstream_time: None,
            key: None,
            status: failure.status(),
            headers: HeaderMap::new(),
            body: ServedBody::Empty,
            meta: None,
            cache: CacheStatus::Error,
            tier: Tier::None,
            stored: false,
            upstream_error: match &failure {
                Failure::Upstream(e) => Some(e.clone()),
                Failure::NotCached => None,
            },
            failure: Some(failure),
            now,
        }
    }
}
