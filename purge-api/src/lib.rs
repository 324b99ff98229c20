//! Outpost's operator API: wire types for purge and push, token auth, the HTTP handlers and the
//! client used by `outpost purge` and `outpost push`.
//!
//! The handlers drive [`AdminBackend`], a trait the edge implements, so this crate never depends
//! on the edge (the dependency points the other way).
//!
//! Modules:
//! - [`wire`]: the JSON bodies (purge requests and receipts, push receipts, object listings).
//! - [`auth`]: bearer tokens with scopes, compared in constant time.
//! - [`error`]: [`AdminError`], its HTTP status, and [`error_response`], the one function that
//!   turns an error into a response.
//! - [`backend`]: the [`AdminBackend`] trait and its contract (commit only after the body ends).
//! - [`path`]: decoding and checking object paths (no traversal, no control characters).
//! - [`digest`]: SHA-256 helpers shared by the handlers, backends and the client (strong ETags).
//! - `body` (private): the guard around a pushed body that enforces the size limit and checks
//!   `Content-SHA256` before the stream may end.
//! - [`handler`]: [`handle`], the routes `POST /purge`, `PUT|DELETE /objects/<path>` and
//!   `GET /objects?prefix=`.
//! - [`serve`](mod@serve): a small standalone admin listener around [`handle`] (tests, tools).
//! - [`client`]: the HTTP client and the logic of `outpost purge` and `outpost push`.

pub mod auth;
pub mod backend;
mod body;
pub mod client;
pub mod digest;
pub mod error;
pub mod handler;
pub mod path;
pub mod serve;
pub mod wire;

pub use auth::{ADMIN_TOKEN_ENV, Auth, AuthError, Scope, Token, TokenError};
pub use backend::{AdminBackend, PushSpec};
pub use client::{
    AdminClient, ClientError, PurgeArgs, PushArgs, PushFailure, PushHeaders, PushSummary,
    run_purge, run_push,
};
pub use error::{AdminError, BoxError, RespBody, Side, error_response};
pub use handler::{AdminLimits, DEFAULT_PUSH_CACHE_CONTROL, handle, owns};
pub use serve::serve;
pub use wire::{NodeResult, PurgeKind, PurgeReceipt, PurgeRequest, PushReceipt, PushedObject};

/// Re-exported so backends can name and build the trait's boxed futures and streams without
/// depending on `futures-util` themselves.
pub use futures_util::{self, future::BoxFuture, stream::BoxStream};
