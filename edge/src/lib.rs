//! Outpost's caching proxy: the edge and shield roles.
//!
//! # Floors
//!
//! Each floor imports only from the floors below it. The first two are crates of their own, so
//! the compiler keeps them in place; inside this crate a unit test (`layering.rs`) checks it.
//!
//! 1. **HTTP vocabulary**, `outpost-http` (`edge/http/`): header names and forwarding rules,
//!    the response body. Imports only `http`, `bytes` and serde.
//! 2. **Engine**, `outpost-cache` (`edge/cache/`, re-exported as [`cache`]): key, policy,
//!    memory and disk tiers, coalesced fills, revalidation, purges, pushed objects. No
//!    sockets (upstream is a trait), time as an input, no response formats (a failure is
//!    data, [`cache::Failure`]).
//! 3. **Support** of the phases: [`config`] (`edge.toml` and flags), [`error`] (the one error
//!    type and the one function that makes it a response), [`compress`] (settings, codecs,
//!    counters), [`tls`] (certificates, SNI, upstream TLS), [`observe`] (metrics, `/stats`
//!    windows), [`operator`] (the admin backend: purge fan-out, push), [`drain`].
//! 4. **Phases**: [`proxy`], the request path, one module per phase (its module docs chart it).
//! 5. **Listeners and the admin API**: [`server`] (the data, HTTPS and admin listeners, reload,
//!    shutdown), [`admin`] (the admin port's routes), [`stats_client`] (`outpost stats`).

pub mod admin;
pub mod compress;
pub mod config;
pub mod drain;
pub mod error;
#[cfg(test)]
mod layering;
pub mod log_client;
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
