//! The end-to-end tests: one binary, a module per feature, on the shared harness in
//! `tests/support` (origins, edges, shields, a selector and child `outpost` processes, all on
//! 127.0.0.1; clients; `eventually`).
//!
//! Run one feature with `cargo test --test e2e <module>::`, e.g. `cargo test --test e2e purge::`.

#[path = "../support/mod.rs"]
mod support;

mod admin_auth;
mod adversarial;
mod caching;
mod cli;
mod compression;
mod configs;
mod conformance;
mod demo;
mod durability;
mod fleet;
mod observability;
mod origin;
mod purge;
mod purge_api;
mod push;
mod restart;
mod selector;
mod status_page;
mod tls;
mod topology;
mod versioned_urls;
