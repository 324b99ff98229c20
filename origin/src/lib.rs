//! `outpost-origin`: a small, correct static-site origin for Outpost to sit in front of.
//!
//! It serves files under a root directory over HTTP/1.1 and h2c with strong validators,
//! conditional requests, single byte ranges and per-path `Cache-Control` / `Surrogate-Key` rules,
//! streaming every file from disk. See [`handler`] for the request path drawn as a phase chart.
//!
//! Modules:
//! - [`config`]: `OriginConfig` from a TOML file plus flags, every error reported together.
//! - [`rules`]: glob rules that pick `Cache-Control` and `Surrogate-Key` per path.
//! - [`server`]: the listener, accept loop, access log and graceful shutdown.
//! - `conn`: what bounds every connection in time and count, on `outpost-net`: request and
//!   body progress, the idle shutdown.
//! - [`handler`]: the request pipeline, method to response.
//! - [`path`]: sanitising the request path (traversal and encoding tricks are 400).
//! - [`file`](mod@file): mapping a path to a regular file inside the root (symlink escapes are 403).
//! - [`validator`]: entity tags and Last-Modified.
//! - [`conditional`]: If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since, If-Range.
//! - [`range`]: parsing and resolving `Range: bytes=…`.
//! - [`respond`]: building 200/206/304 responses and every error response.
//! - [`error`]: the error enum with its status.

pub mod conditional;
pub mod config;
mod conn;
pub mod error;
pub mod file;
pub mod handler;
pub mod path;
pub mod range;
pub mod respond;
pub mod rules;
pub mod server;
pub mod validator;

pub use config::{OriginConfig, OriginOverrides};
pub use error::OriginError;
pub use rules::{Policy, Rules};
pub use server::OriginServer;
