//! Outpost's operator API: wire types for purge and push, token auth, the HTTP handlers and the
//! client used by `outpost purge` and `outpost push`.
//!
//! The handlers drive a trait the edge implements, so this crate never depends on the edge.
//! Status: the admin API lands with the "Purge and push" issue; this crate is its home.
