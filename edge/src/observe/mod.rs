//! Observability: metrics on atomics (no lock or allocation on the request path), the
//! Prometheus encoding, rolling windows for `/stats`, and the status page.

pub mod access_log;
pub mod counting;
pub mod histogram;
pub mod live_log;
pub mod metrics;
pub mod upstreams;
pub mod window;
