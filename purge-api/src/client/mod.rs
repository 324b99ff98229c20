//! The admin API client and the logic of `outpost purge` and `outpost push`.
//!
//! - this file: [`AdminClient`] (one request per call, plain HTTP over hyper-util's pooled
//!   client), [`ClientError`] and the retry policy shared by the commands.
//! - `purge`: [`PurgeArgs`] and [`run_purge`].
//! - `push`: [`PushArgs`], [`run_push`] and its [`PushSummary`].
//!
//! The admin API speaks plain HTTP: reach it over loopback, a private network or a tunnel.
//! `https://` addresses are refused with a clear message rather than sent in clear text.

mod purge;
mod push;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use tokio_util::io::ReaderStream;
use tracing::debug;

pub use purge::{PurgeArgs, run_purge};
pub use push::{PushArgs, PushFailure, PushSummary, run_push};

use crate::auth::ADMIN_TOKEN_ENV;
use crate::digest::{CONTENT_SHA256, to_hex};
use crate::error::BoxError;
use crate::path::encode_object_path;
use crate::wire::{PurgeReceipt, PurgeRequest, PushReceipt, PushedObject};

type ClientBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The headers a forwarded push carries.
#[derive(Debug, Clone, Default)]
pub struct PushHeaders {
    pub content_type: String,
    pub cache_control: String,
    pub surrogate_keys: Vec<String>,
}

/// Bound on a JSON answer (object listings included).
const MAX_ANSWER: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Purge, delete and list requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad arguments (exit code 64 territory): nothing was sent.
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to the admin API at {admin}: {reason}")]
    Connect { admin: String, reason: String },
    #[error("request to the admin API at {admin} failed: {reason}")]
    Transport { admin: String, reason: String },
    #[error("no answer from the admin API within {0:?}")]
    Timeout(Duration),
    /// The API answered with an error status; `message` is its `error` text.
    #[error("the admin API answered {status}: {message}")]
    Http { status: u16, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected answer from the admin API: {0}")]
    Decode(String),
}

impl ClientError {
    /// Worth retrying: the request may not have reached the node, or the node failed (5xx,
    /// 429). Every admin request is idempotent, so a retry is safe.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Transport { .. } | Self::Timeout(_) => true,
            Self::Http { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// A 401 or 403: every further request would fail the same way.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            Self::Http {
                status: 401 | 403,
                ..
            }
        )
    }

    /// Bad arguments; nothing was sent.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Usage(_))
    }

    /// The HTTP status, when the API answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The token from the argument, else from `OUTPOST_ADMIN_TOKEN`; empty means none.
pub fn resolve_token(arg: Option<String>) -> Option<String> {
    arg.filter(|t| !t.is_empty()).or_else(|| {
        std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
    })
}

/// A client of one node's admin API. Cheap to share by reference; connections are pooled.
pub struct AdminClient {
    base: String,
    auth: Option<HeaderValue>,
    http: Client<HttpConnector, ClientBody>,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .field("token", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl AdminClient {
    /// `admin` is `host:port` or `http://host:port[/base/path]`. The token is sent as
    /// `Authorization: Bearer <token>` (it is not read from the environment here; see
    /// [`resolve_token`]).
    pub fn new(admin: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = parse_admin(admin)?;
        let auth = match token {
            None => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    ClientError::Usage("the token holds characters a header cannot carry".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self { base, auth, http })
    }

    /// The normalised base URL, e.g. `http://127.0.0.1:9080`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /healthz`: something answers HTTP at this address (any status will do). Commands
    /// that send many requests ask first, so a wrong or dead address fails at once with one
    /// message.
    pub async fn probe(&self) -> Result<(), ClientError> {
        let r = self.request(Method::GET, "/healthz", empty())?;
        match self.send(r, CONNECT_TIMEOUT).await {
            Ok(_) | Err(ClientError::Http { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `GET <path>` (a read-scope document such as `/stats`): the answer's body.
    pub async fn get(&self, path: &str) -> Result<Bytes, ClientError> {
        let r = self.request(Method::GET, path, empty())?;
        let (_, body) = self.send(r, REQUEST_TIMEOUT).await?;
        Ok(body)
    }

    /// `POST /purge`, one attempt.
    pub async fn purge(&self, req: &PurgeRequest) -> Result<PurgeReceipt, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Usage(e.to_string()))?;
        let mut r = self.request(Method::POST, "/purge", full(Bytes::from(body)))?;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // The node may wait for the fleet's receipts before it answers.
        let wait = Duration::from_millis(req.wait_ms.unwrap_or(0));
        let (_, body) = self.send(r, REQUEST_TIMEOUT + wait).await?;
        decode(&body)
    }

    /// `DELETE /objects/<path>`: `Ok(false)` when there was no such object.
    pub async fn delete_object(&self, path: &str) -> Result<bool, ClientError> {
        let uri = format!("/objects/{}", encode_object_path(path));
        let r = self.request(Method::DELETE, &uri, empty())?;
        match self.send(r, REQUEST_TIMEOUT).await {
            Ok(_) => Ok(true),
            Err(ClientError::Http { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET /objects?prefix=`.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<PushedObject>, ClientError> {
        let q = percent_encoding::utf8_percent_encode(prefix, percent_encoding::NON_ALPHANUMERIC);
        let r = self.request(Method::GET, &format!("/objects?prefix={q}"), empty())?;
        let (_, body) = self.send(r, REQUEST_TIMEOUT).await?;
        decode(&body)
    }

    /// `PUT /objects/<path>` from a file, streamed from disk, with its `Content-SHA256`.
    /// One attempt; [`run_push`] adds retries, concurrency and progress.
    pub async fn push_file(&self, file: &Path, path: &str) -> Result<PushReceipt, ClientError> {
        let owned = file.to_path_buf();
        let sha = tokio::task::spawn_blocking(move || push::hash_file(&owned))
            .await
            .map_err(|e| ClientError::Io {
                path: file.to_path_buf(),
                source: std::io::Error::other(e),
            })??;
        self.upload(file, path, &sha).await
    }

    /// `PUT /objects/<path>` from a byte stream of known length, with the object's headers
    /// (used to forward a push to other nodes). One attempt.
    pub async fn push_stream<S>(
        &self,
        path: &str,
        body: S,
        size: u64,
        meta: &PushHeaders,
    ) -> Result<PushReceipt, ClientError>
    where
        S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let frames = body.map(|r| r.map(Frame::data).map_err(BoxError::from));
        let body = BodyExt::boxed_unsync(StreamBody::new(frames));
        let uri = format!("/objects/{}", encode_object_path(path));
        let mut r = self.request(Method::PUT, &uri, body)?;
        let h = r.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        for (name, value) in [
            (header::CONTENT_TYPE, meta.content_type.as_str()),
            (header::CACHE_CONTROL, meta.cache_control.as_str()),
        ] {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        }
        if !meta.surrogate_keys.is_empty()
            && let Ok(v) = HeaderValue::from_str(&meta.surrogate_keys.join(" "))
        {
            h.insert("surrogate-key", v);
        }
        let timeout = Duration::from_secs(60 + size / (1 << 20));
        let (_, body) = self.send(r, timeout).await?;
        decode(&body)
    }

    /// One streamed upload. Once the answer is in, the body stops: hyper may still be sending
    /// it after an early answer (a 413 before the body was read).
    pub(crate) async fn upload(
        &self,
        file: &Path,
        path: &str,
        sha: &[u8; 32],
    ) -> Result<PushReceipt, ClientError> {
        let io = |source| ClientError::Io {
            path: file.to_path_buf(),
            source,
        };
        let f = tokio::fs::File::open(file).await.map_err(io)?;
        let size = f.metadata().await.map_err(io)?.len();
        let over = Arc::new(AtomicBool::new(false));
        let state = over.clone();
        let frames = ReaderStream::with_capacity(f, 64 * 1024).map(move |r| {
            if state.load(Ordering::Acquire) {
                return Err(BoxError::from("upload abandoned after the answer"));
            }
            Ok(Frame::data(r.map_err(BoxError::from)?))
        });
        let body = BodyExt::boxed_unsync(StreamBody::new(frames));
        let uri = format!("/objects/{}", encode_object_path(path));
        let mut r = self.request(Method::PUT, &uri, body)?;
        let h = r.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        if let Ok(v) = HeaderValue::from_str(&to_hex(sha)) {
            h.insert(CONTENT_SHA256, v);
        }
        // Generous: a minute plus one second per MiB (assumes at least 1 MiB/s).
        let timeout = Duration::from_secs(60 + size / (1 << 20));
        let answer = self.send(r, timeout).await;
        over.store(true, Ordering::Release);
        let (_, body) = answer?;
        decode(&body)
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: ClientBody,
    ) -> Result<Request<ClientBody>, ClientError> {
        let uri: Uri = format!("{}{path_and_query}", self.base)
            .parse()
            .map_err(|e| ClientError::Usage(format!("cannot build a request URI: {e}")))?;
        let mut r = Request::new(body);
        *r.method_mut() = method;
        *r.uri_mut() = uri;
        if let Some(a) = &self.auth {
            r.headers_mut().insert(header::AUTHORIZATION, a.clone());
        }
        Ok(r)
    }

    /// Sends, reads the (bounded) answer, and turns error statuses into [`ClientError::Http`].
    async fn send(
        &self,
        req: Request<ClientBody>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let exchange = async {
            let resp = self.head(req).await?;
            let status = resp.status();
            Ok((status, self.read_bounded(resp.into_body()).await?))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// `GET <path>` whose answer streams for as long as the node sends it (`/log`): the body,
    /// once a success head arrived within the request timeout.
    pub async fn get_stream(&self, path: &str) -> Result<hyper::body::Incoming, ClientError> {
        let r = self.request(Method::GET, path, empty())?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.head(r))
            .await
            .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))??;
        Ok(resp.into_body())
    }

    /// Sends and waits for the head; an error status becomes [`ClientError::Http`] with the
    /// message of its (bounded) body.
    async fn head(
        &self,
        req: Request<ClientBody>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let resp = self.http.request(req).await.map_err(|e| {
            if e.is_connect() {
                // The innermost cause ("Connection refused (os error 111)"), not hyper's
                // chain of wrappers.
                ClientError::Connect {
                    admin: self.base.clone(),
                    reason: root_cause(&e),
                }
            } else {
                ClientError::Transport {
                    admin: self.base.clone(),
                    reason: chain(&e),
                }
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = self.read_bounded(resp.into_body()).await?;
        let mut message = error_message(&body);
        if status == StatusCode::UNAUTHORIZED && self.auth.is_none() {
            message.push_str(&format!(
                " (give a token with --token or {ADMIN_TOKEN_ENV})"
            ));
        }
        debug!(status = status.as_u16(), message = %message, "admin API refused");
        Err(ClientError::Http {
            status: status.as_u16(),
            message,
        })
    }

    async fn read_bounded(&self, body: hyper::body::Incoming) -> Result<Bytes, ClientError> {
        Ok(Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| ClientError::Transport {
                admin: self.base.clone(),
                reason: format!("reading the answer: {e}"),
            })?
            .to_bytes())
    }
}

/// The retry policy of the commands: 3 attempts, 250 ms then 500 ms apart.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    pub attempts: u32,
    pub base: Duration,
}

pub(crate) const RETRY: Retry = Retry {
    attempts: 3,
    base: Duration::from_millis(250),
};

/// Runs `f` until it succeeds, fails for good, or runs out of attempts.
pub(crate) async fn with_retry<T, F, Fut>(policy: Retry, mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < policy.attempts => {
                let wait = policy.base * 2u32.pow(attempt - 1);
                debug!(attempt, error = %e, wait = ?wait, "transient admin API error; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn parse_admin(admin: &str) -> Result<String, ClientError> {
    let s = admin.trim();
    if s.is_empty() {
        return Err(ClientError::Usage(
            "no admin address: give one such as http://127.0.0.1:9080".into(),
        ));
    }
    let full = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let bad = |why: &str| ClientError::Usage(format!("invalid admin address {s:?}: {why}"));
    let uri: Uri = full
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported: the admin API speaks plain HTTP (use loopback, a private network or a tunnel)",
            ));
        }
        _ => return Err(bad("the scheme must be http")),
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if uri.query().is_some() {
        return Err(bad("no query string allowed"));
    }
    Ok(format!(
        "http://{authority}{}",
        uri.path().trim_end_matches('/')
    ))
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Decode(e.to_string()))
}

/// The `error` of a `{"error": "..."}` answer, else the (trimmed) text itself.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        error: String,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(e) => e.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                "(no message)".to_string()
            } else {
                text.chars().take(500).collect()
            }
        }
    }
}

/// The innermost source of an error ("Connection refused (os error 111)").
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(c) = last.source() {
        last = c;
    }
    last.to_string()
}

/// An error and its sources, `a: b: c` (hyper-util's own message is only "client error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn full(b: Bytes) -> ClientBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn empty() -> ClientBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        assert_eq!(
            parse_admin("127.0.0.1:9080").unwrap(),
            "http://127.0.0.1:9080"
        );
        assert_eq!(
            parse_admin("http://localhost:9080/").unwrap(),
            "http://localhost:9080"
        );
        assert_eq!(
            parse_admin("http://h:1/admin/").unwrap(),
            "http://h:1/admin"
        );
        let e = parse_admin("https://h:1").unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("plain HTTP"), "{e}");
        assert!(parse_admin("").is_err());
        assert!(parse_admin("ftp://h").is_err());
        assert!(parse_admin("http://h:1/?x").is_err());
    }

    #[test]
    fn error_messages_from_json_or_text() {
        assert_eq!(error_message(br#"{"error":"nope"}"#), "nope");
        assert_eq!(error_message(b"  plain\n"), "plain");
        assert_eq!(error_message(b""), "(no message)");
    }

    #[test]
    fn transient_errors() {
        let http = |status| ClientError::Http {
            status,
            message: String::new(),
        };
        assert!(http(503).is_transient() && http(500).is_transient() && http(429).is_transient());
        assert!(!http(400).is_transient() && !http(413).is_transient());
        assert!(http(401).is_auth() && http(403).is_auth() && !http(404).is_auth());
        assert!(ClientError::Timeout(Duration::from_secs(1)).is_transient());
    }

    #[test]
    fn debug_redacts_the_token() {
        let c = AdminClient::new("127.0.0.1:1", Some("very-secret".into())).unwrap();
        let d = format!("{c:?}");
        assert!(
            !d.contains("very-secret") && d.contains("<redacted>"),
            "{d}"
        );
        assert!(AdminClient::new("127.0.0.1:1", Some("bad\ntoken".into())).is_err());
    }

    #[tokio::test]
    async fn retries_transient_errors_then_gives_up() {
        let policy = Retry {
            attempts: 3,
            base: Duration::from_millis(1),
        };
        let mut calls = 0;
        let r: Result<(), _> = with_retry(policy, || {
            calls += 1;
            async {
                Err(ClientError::Http {
                    status: 503,
                    message: "draining".into(),
                })
            }
        })
        .await;
        assert_eq!(r.unwrap_err().status(), Some(503));
        assert_eq!(calls, 3);

        let mut calls = 0;
        let r: Result<(), _> = with_retry(policy, || {
            calls += 1;
            async {
                Err(ClientError::Http {
                    status: 400,
                    message: String::new(),
                })
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "client errors are not retried");

        let mut calls = 0;
        let r = with_retry(policy, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 2 {
                    Err(ClientError::Timeout(Duration::from_secs(1)))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
    }

    #[tokio::test]
    async fn connection_refused_is_a_connect_error() {
        // Bind then drop to get a port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = AdminClient::new(&format!("127.0.0.1:{port}"), None).unwrap();
        let e = c
            .purge(&PurgeRequest {
                all: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert!(e.is_transient());
    }
}
