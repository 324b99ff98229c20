//! [`EdgeError`], every error the edge answers a client with, and [`error_response`], the one
//! function that turns one into a response.
//!
//! - Errors of the request path are short plain text (`{message}\n`, `Cache-Control:
//!   no-store`) and carry `Proxy-Status` (RFC 9209) naming this node and the error type, so a
//!   client or a CDN in front can tell an error Outpost generated from one the origin sent.
//!   The message is the client-safe one (no internal error chains); logs get the detail.
//! - Errors of the admin API, and of the data port's `PURGE` (an admin operation), are JSON
//!   (`{"error": "..."}`, `outpost_purge_api::error_response`), whatever the port.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use outpost_cache::Failure;
use outpost_cache::upstream::UpstreamError;
use outpost_http::body::{RespBody, full};
use outpost_purge_api::AdminError;

pub const PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");

/// A request refused before the cache sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Refusal {
    pub(crate) const fn new(status: StatusCode, reason: &'static str) -> Self {
        Self { status, reason }
    }
}

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request was wrong or not allowed; sending it again fails again.
    Client,
    /// The origin (or shield) failed or is held back; a retry may help.
    Upstream,
    /// This node could not do it.
    Edge,
}

/// Every error the edge answers with.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Refused by the request phase before anything was looked up (400, 405, 414, 417).
    /// `unread_body`: the request's body was not read, so the connection closes.
    #[error("{}", .refusal.reason)]
    Refused { refusal: Refusal, unread_body: bool },
    /// The request could not be read as a cache key (a bad target or authority).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The upstream failed and nothing stored may stand in.
    #[error(transparent)]
    Upstream(UpstreamError),
    /// The body failed before the edge could send the head (the origin's, or a stored copy
    /// found damaged as it was read: then it is removed, and a retry fetches it again).
    #[error("the response body failed before it could be sent; retry")]
    UpstreamBody,
    /// An origin-encoded body a client cannot accept could not be decoded within the cap.
    /// `reason` is one of a few fixed texts ([`DecodeError::client_reason`]): what went wrong
    /// inside (an I/O error, a library's message) is logged, never sent.
    #[error(
        "cannot decode the origin's {coding} body for a client that does not accept it: {reason}"
    )]
    Undecodable {
        coding: &'static str,
        reason: &'static str,
    },
    /// An origin-encoded body a client cannot accept, and no room in the compression share of
    /// memory to decode it now.
    #[error(
        "this node has no memory to spare for decoding the origin's {coding} body now; retry shortly, or accept {coding}"
    )]
    DecodeBusy { coding: &'static str },
    /// `only-if-cached` and nothing stored satisfies the request (RFC 9111 §5.2.1.7).
    #[error("only-if-cached: no stored response satisfies this request")]
    NotCached,
    /// An admin operation (the data port's PURGE): answered in JSON.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

impl From<Failure> for EdgeError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Upstream(e) => EdgeError::Upstream(e),
            Failure::NotCached => EdgeError::NotCached,
        }
    }
}

impl EdgeError {
    pub fn status(&self) -> StatusCode {
        match self {
            EdgeError::Refused { refusal, .. } => refusal.status,
            EdgeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            EdgeError::Upstream(e) => e.status(),
            EdgeError::UpstreamBody | EdgeError::Undecodable { .. } => StatusCode::BAD_GATEWAY,
            EdgeError::DecodeBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            EdgeError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            EdgeError::Admin(e) => e.status(),
        }
    }

    pub fn side(&self) -> Side {
        match self {
            EdgeError::Refused { .. } | EdgeError::BadRequest(_) | EdgeError::NotCached => {
                Side::Client
            }
            EdgeError::Upstream(UpstreamError::ClientBody) => Side::Client,
            EdgeError::Upstream(_) | EdgeError::UpstreamBody | EdgeError::Undecodable { .. } => {
                Side::Upstream
            }
            EdgeError::DecodeBusy { .. } => Side::Edge,
            EdgeError::Admin(e) => match e.side() {
                outpost_purge_api::Side::Client => Side::Client,
                outpost_purge_api::Side::Server => Side::Edge,
            },
        }
    }

    /// The RFC 9209 error type (§2.3), for `Proxy-Status`; `None` for admin errors.
    pub fn proxy_status_type(&self) -> Option<&'static str> {
        Some(match self {
            EdgeError::Refused { refusal, .. } => match refusal.status {
                StatusCode::METHOD_NOT_ALLOWED | StatusCode::FORBIDDEN => "http_request_denied",
                _ => "http_request_error",
            },
            EdgeError::BadRequest(_) => "http_request_error",
            EdgeError::Upstream(e) => match e {
                UpstreamError::Connect(_) => "connection_refused",
                UpstreamError::Timeout(_) => "http_response_timeout",
                UpstreamError::Protocol(_) => "http_protocol_error",
                UpstreamError::Overloaded => "connection_limit_reached",
                UpstreamError::Unavailable => "destination_unavailable",
                UpstreamError::ClientBody => "http_request_error",
            },
            EdgeError::UpstreamBody => "http_response_incomplete",
            EdgeError::Undecodable { .. } => "http_response_content_coding",
            EdgeError::DecodeBusy { .. } => "proxy_internal_error",
            // Answered here without asking the next hop (§2.3.30).
            EdgeError::NotCached => "proxy_internal_response",
            EdgeError::Admin(_) => return None,
        })
    }
}

/// The one place an edge error becomes a response. `node`: this node's name in
/// `Proxy-Status` (the `Cache-Status` name).
pub fn error_response(err: &EdgeError, node: &str) -> Response<RespBody> {
    if let EdgeError::Admin(e) = err {
        return outpost_purge_api::error_response(e).map(RespBody::boxed);
    }
    let (headers, body) = proxy_error_parts(err, node);
    let mut r = Response::new(full(body));
    *r.status_mut() = err.status();
    *r.headers_mut() = headers;
    r
}

/// The fields and body of an error the proxy answers (not an admin one): its message as plain
/// text, `no-store`, `Proxy-Status`, and for a refusal `Connection: close` (an unread body)
/// and `Allow` (405). The respond phase decorates an engine failure's with the same.
pub fn proxy_error_parts(err: &EdgeError, node: &str) -> (HeaderMap, Bytes) {
    let message = err.to_string();
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(kind) = err.proxy_status_type()
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{node}; error={kind}; details={}",
            sf_string(&message)
        ))
    {
        h.insert(PROXY_STATUS, v);
    }
    if let EdgeError::Refused {
        refusal,
        unread_body,
    } = err
    {
        // A refused request whose body was not read closes the connection, so nothing of
        // that body is ever read as the next request.
        if *unread_body {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, PURGE"),
            );
        }
    }
    (h, Bytes::from(message + "\n"))
}

/// `text` as a structured-field string (RFC 8941 §3.3.3): printable ASCII, quoted, with `"`
/// and `\` escaped; anything else becomes `?`.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_errors_carry_proxy_status_and_admin_errors_are_json() {
        let r = error_response(
            &EdgeError::Upstream(UpstreamError::Timeout(std::time::Duration::from_secs(30))),
            "edge-a",
        );
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            r.headers()[PROXY_STATUS],
            "edge-a; error=http_response_timeout; details=\"the origin did not answer within 30s\""
        );
        let r = error_response(&EdgeError::NotCached, "edge-a");
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(
            r.headers()[PROXY_STATUS]
                .to_str()
                .unwrap()
                .starts_with("edge-a; error=proxy_internal_response")
        );
        let r = error_response(&EdgeError::Admin(AdminError::bad_request("x")), "edge-a");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert!(r.headers().get(PROXY_STATUS).is_none());
    }

    #[test]
    fn details_are_a_valid_structured_string() {
        assert_eq!(sf_string("a \"b\" \\ é"), "\"a \\\"b\\\" \\\\ ?\"");
    }
}
