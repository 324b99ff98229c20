//! Outpost's caching proxy: the edge and shield roles.
//!
//! - [`cache`]: the socket-free caching engine (key, policy, metadata, memory and disk tiers,
//!   coalescing, invalidation). Tested and benched without a server.
//! - [`proxy`]: the request path, one module per phase (request, upstream, respond).
//! - [`server`]: listeners, connection handling, admin endpoints, graceful shutdown.
//! - [`observe`]: metrics on atomics, their Prometheus encoding, `/stats` windows.
//! - [`config`]: `edge.toml` and flags, validated into [`config::EdgeConfig`].

pub mod admin;
pub mod compress;
pub mod config;
pub mod drain;
pub mod error;
pub mod observe;
pub mod operator;
#[cfg(test)]
mod proptests;
pub mod proxy;
pub mod server;
pub mod stats_client;
pub mod tls;

pub use config::{EdgeConfig, EdgeOverrides, Role};
/// The engine, its own crate below the proxy.
pub use outpost_cache as cache;
pub use server::{EdgeServer, StartError};
