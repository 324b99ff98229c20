//! [`AdminError`], the crate's one error type, and [`error_response`], the one function that
//! turns an error into an HTTP response.
//!
//! Every error the admin API sends is a short JSON object, `{"error": "<message>"}`, with
//! `Cache-Control: no-store`. The client reads the same shape back.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::auth::AuthError;

/// Boxed errors, the same type the edge uses for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response bodies; the same type as the edge's `RespBody`, so the edge can return our
/// responses as they are.
pub type RespBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Which side of an exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller sent something wrong; retrying the same request will fail again.
    Client,
    /// The node could not do it; a retry may help.
    Server,
}

/// Everything that can go wrong in an admin request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// A malformed request: bad JSON, an invalid object path, a `Content-SHA256` mismatch...
    /// The message names the problem and is sent to the caller.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or invalid token (401) or a token without the needed scope (403).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Refused by the node's policy whatever the token (e.g. PURGE on a data port of a node
    /// without admin tokens).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The named thing does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The route exists but not for this method; `allow` becomes the `Allow` header.
    #[error("method not allowed: {path} accepts {allow}")]
    MethodNotAllowed {
        path: &'static str,
        allow: &'static str,
    },
    /// The body is larger than the configured limit.
    #[error("body too large: the limit is {limit} bytes")]
    TooLarge { limit: u64 },
    /// The node cannot serve this now (draining, storage disabled...).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A failure inside the node; the message says what failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AdminError {
    /// Shorthand for [`AdminError::BadRequest`].
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::BadRequest(msg.into())
    }

    /// Shorthand for [`AdminError::Internal`].
    pub fn internal(what: impl std::fmt::Display) -> Self {
        Self::Internal(what.to_string())
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Auth(a) => a.status(),
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            Self::Unavailable(_) | Self::Internal(_) => Side::Server,
            _ => Side::Client,
        }
    }

    /// Whether sending the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.side() == Side::Server
    }
}

/// The one place an error becomes a response: `{"error": "..."}` with the error's status, plus
/// `WWW-Authenticate` for auth errors (RFC 6750 §3) and `Allow` for 405 (RFC 9110 §15.5.6).
pub fn error_response(err: &AdminError) -> Response<RespBody> {
    let body = serde_json::json!({ "error": err.to_string() }).to_string();
    let mut r = json_bytes(err.status(), Bytes::from(body + "\n"));
    match err {
        AdminError::Auth(a) => {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, a.www_authenticate());
        }
        AdminError::MethodNotAllowed { allow, .. } => {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        _ => {}
    }
    r
}

/// A JSON response with `Cache-Control: no-store` (admin answers are never cacheable).
pub(crate) fn json_bytes(status: StatusCode, body: Bytes) -> Response<RespBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) fn full(b: Bytes) -> RespBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    async fn body_json(r: Response<RespBody>) -> serde_json::Value {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn errors_are_short_json_with_their_status() {
        let r = error_response(&AdminError::internal("disk full"));
        assert_eq!(r.status(), 500);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["cache-control"], "no-store");
        assert_eq!(
            body_json(r).await["error"],
            "internal error: disk full",
            "500s say what failed"
        );
        assert_eq!(
            error_response(&AdminError::TooLarge { limit: 10 }).status(),
            413
        );
        assert_eq!(
            error_response(&AdminError::Unavailable("draining".into())).status(),
            503
        );
    }

    #[test]
    fn auth_errors_carry_www_authenticate() {
        let r = error_response(&AuthError::Missing.into());
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"outpost\"");
        let r = error_response(&AuthError::Forbidden(Scope::Push).into());
        assert_eq!(r.status(), 403);
        let r = error_response(&AdminError::MethodNotAllowed {
            path: "/purge",
            allow: "POST",
        });
        assert_eq!(r.headers()["allow"], "POST");
    }

    #[test]
    fn sides() {
        assert!(AdminError::Unavailable("x".into()).is_retryable());
        assert!(!AdminError::bad_request("x").is_retryable());
        assert_eq!(AdminError::NotFound("x".into()).side(), Side::Client);
    }
}
