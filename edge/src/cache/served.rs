//! What the engine answers: status, headers, a body (shared bytes or a stream) and how the
//! answer came about (cache outcome, tier, upstream failure).

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};

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
    },
}

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
    /// When the decision was taken.
    pub now: SystemTime,
    /// The key the answer is stored under (when it is stored).
    pub key: Option<KeyHash>,
    /// Time to the upstream response head, when this request waited for one.
    pub upstream_time: Option<Duration>,
}

/// A short plain-text error answer that names the failure.
pub fn error_served(status: StatusCode, message: &str, now: SystemTime) -> Served {
    let body = Bytes::from(format!("{message}\n"));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Served {
        upstream_time: None,
        key: None,
        status,
        headers,
        body: ServedBody::Full(body),
        meta: None,
        cache: CacheStatus::Error,
        tier: Tier::None,
        stored: false,
        upstream_error: None,
        now,
    }
}
