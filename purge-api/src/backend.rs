//! [`AdminBackend`]: what a node must do for the admin API. The edge implements it; the
//! handlers in [`crate::handler`] drive it after authentication and validation.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::error::AdminError;
use crate::wire::{PurgeReceipt, PurgeRequest, PushReceipt, PushedObject};

/// Everything the handler knows about a push before the body arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSpec {
    /// Decoded, checked object path with a leading slash ([`crate::path::object_path`]).
    pub path: String,
    /// From the request's `Content-Type`, or guessed from the extension.
    pub content_type: String,
    /// From the request's `Cache-Control`, or [`crate::DEFAULT_PUSH_CACHE_CONTROL`].
    pub cache_control: String,
    /// From the request's `Surrogate-Key` (space separated), deduplicated, in order.
    pub surrogate_keys: Vec<String>,
    /// From `Content-SHA256`. The handler has already verified it by the time the body stream
    /// ends successfully; a backend need not hash again to check it.
    pub expected_sha256: Option<[u8; 32]>,
    /// From `Content-Length`, when the client sent one. The handler enforces it.
    pub content_length: Option<u64>,
}

/// The node side of the admin API. Object-safe; methods return boxed `'static` futures, so an
/// implementation clones what it needs (usually an `Arc`) into each future.
pub trait AdminBackend: Send + Sync + 'static {
    /// Applies a validated purge and says what happened.
    fn purge(&self, req: PurgeRequest) -> BoxFuture<'static, Result<PurgeReceipt, AdminError>>;

    /// Stores a pushed object from a streamed body (never buffered whole by the handler).
    ///
    /// Contract: commit only after `body` has yielded its end (`None`). The handler enforces
    /// the size limit, `Content-Length` and `Content-SHA256` inside the stream: on a violation
    /// the stream yields one `Err` (then ends), and the backend must drop what it wrote and
    /// return that error (or any error: the handler answers with the stream's error either
    /// way). The backend enforces nothing about size itself. Returns `created: true` when no
    /// object was at `spec.path` before.
    fn push(
        &self,
        spec: PushSpec,
        body: BoxStream<'static, Result<Bytes, AdminError>>,
    ) -> BoxFuture<'static, Result<PushReceipt, AdminError>>;

    /// Removes a pushed object; `Ok(false)` when there was none (the handler answers 404).
    fn delete_object(&self, path: String) -> BoxFuture<'static, Result<bool, AdminError>>;

    /// Pushed objects whose path starts with `prefix` (always starts with `/`), in any order.
    fn list_objects(
        &self,
        prefix: String,
    ) -> BoxFuture<'static, Result<Vec<PushedObject>, AdminError>>;
}
