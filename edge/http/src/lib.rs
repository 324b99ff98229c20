//! The edge's HTTP vocabulary, the bottom floor of the edge: header names and the rules about
//! which fields travel ([`headers`]), and the response body every layer above answers with
//! ([`body`]). It imports only `http`, `bytes` and serde: the engine (`outpost-cache`) and the
//! proxy (`outpost-edge`) both build on it, and it knows neither.

pub mod body;
pub mod headers;

/// Any error a body or an upstream can carry across a layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
