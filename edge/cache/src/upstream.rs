//! The engine's view of upstream: a trait, so the engine has no sockets and tests or benches can
//! plug in an in-process origin. The proxy implements it with a pooled hyper client.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

pub use outpost_http::BoxError;
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Why upstream could not produce a response. Each kind maps to one status for the client.
///
/// `Display` is what a client may read: it names the failure, never the internal error chain
/// (addresses, resolver and TLS messages stay in the logs, through [`UpstreamError::detail`]).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("the origin could not be reached")]
    Connect(String),
    #[error("the origin did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the origin sent an invalid or incomplete response")]
    Protocol(String),
    #[error("too many requests to the origin are in flight")]
    Overloaded,
    /// The origin's circuit breaker is open after repeated failures: failed at once.
    #[error("the origin is failing; requests to it are paused for a moment")]
    Unavailable,
    /// The request body being forwarded failed: its framing was malformed or the client left.
    #[error("the request body is malformed or was cut short")]
    ClientBody,
}

impl UpstreamError {
    /// 504 for a timeout (RFC 9110 §15.6.5), 503 when we hold requests back, 502 for
    /// everything else (§15.6.3).
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Overloaded | UpstreamError::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamError::ClientBody => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The kinds that count as origin errors (a broken client body does not), in metric
    /// label order: [`UpstreamError::kind`] of each.
    pub const ORIGIN_KINDS: [&'static str; 5] = [
        "connect",
        "timeout",
        "protocol",
        "overloaded",
        "breaker_open",
    ];

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Overloaded => "overloaded",
            UpstreamError::Unavailable => "breaker_open",
            UpstreamError::ClientBody => "client_body",
        }
    }

    /// The whole story, for logs only.
    pub fn detail(&self) -> String {
        match self {
            UpstreamError::Connect(d) | UpstreamError::Protocol(d) => format!("{self}: {d}"),
            _ => self.to_string(),
        }
    }
}

/// Request extension naming the cache key a request is for, so an upstream that spreads keys
/// over several nodes (shields, by rendezvous hashing) routes every request for one key to the
/// same node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteKey(pub super::key::KeyHash);

/// Sends one request upstream (origin or shield) and returns its response head with a
/// streaming body. Implementations apply their own connect / first-byte timeouts.
pub trait Upstream: Send + Sync + 'static {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>>;
}

pub fn empty_body() -> UpstreamBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_kinds_are_the_kinds_of_origin_errors() {
        let all = [
            UpstreamError::Connect(String::new()),
            UpstreamError::Timeout(Duration::ZERO),
            UpstreamError::Protocol(String::new()),
            UpstreamError::Overloaded,
            UpstreamError::Unavailable,
        ];
        let kinds: Vec<&str> = all.iter().map(UpstreamError::kind).collect();
        assert_eq!(kinds, UpstreamError::ORIGIN_KINDS);
        assert!(!UpstreamError::ORIGIN_KINDS.contains(&UpstreamError::ClientBody.kind()));
    }
}
