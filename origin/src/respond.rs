//! Building responses: the file (200, 206), 304 Not Modified, and every error (one function).
//!
//! Every response carries `Date` and `Server: outpost-origin`. File responses and 304s carry the
//! validators (`ETag`, `Last-Modified`) and the rule's `Cache-Control` / `Surrogate-Key`, because a
//! 304 must repeat the fields a 200 would have sent that a cache needs to update its copy
//! (RFC 9110 §15.4.5). A HEAD response has the same fields as the GET would have, including
//! `Content-Length`, and an empty body (§9.3.2).

use std::io::{self, SeekFrom};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{
    ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, DATE, ETAG,
    LAST_MODIFIED, SERVER,
};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::error::OriginError;
use crate::range::ByteRange;
use crate::rules::Policy;
use crate::validator::Validators;

/// The response body type of the origin: bytes streamed from a file, or a small fixed body.
pub type Body = BoxBody<Bytes, io::Error>;

/// `Surrogate-Key`, the purge-by-tag header understood by Fastly-style caches and by our edge.
pub static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");

/// Value of the `Server` header.
pub const SERVER_NAME: &str = "outpost-origin";

/// Read size for streaming a file: large enough to keep syscalls few, small enough that many
/// concurrent downloads stay cheap.
const CHUNK: usize = 64 * 1024;

/// What is known about the file being served.
pub struct Representation<'a> {
    pub validators: &'a Validators,
    pub policy: Policy<'a>,
    pub content_type: HeaderValue,
    pub len: u64,
}

/// 200 with the whole file, or 206 with one range of it (RFC 9110 §15.3.7, §14.4).
pub async fn file(
    rep: &Representation<'_>,
    mut file: File,
    range: Option<ByteRange>,
    head: bool,
    now: SystemTime,
) -> Result<Response<Body>, OriginError> {
    let (status, first, len) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.first, r.len()),
        None => (StatusCode::OK, 0, rep.len),
    };
    let mut resp = base(status, now);
    let h = resp.headers_mut();
    representation_headers(h, rep.validators, &rep.policy);
    h.insert(CONTENT_TYPE, rep.content_type.clone());
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(r) = range {
        h.insert(
            CONTENT_RANGE,
            header(&format!("bytes {}-{}/{}", r.first, r.last, rep.len)),
        );
    }
    if head || len == 0 {
        return Ok(resp.map(|_| empty()));
    }
    if first > 0 {
        file.seek(SeekFrom::Start(first))
            .await
            .map_err(OriginError::Io)?;
    }
    // `take` caps the body at Content-Length even if the file grows while it is sent; if it
    // shrinks, the body ends early and hyper closes the connection instead of sending a short
    // message that looks complete.
    let stream = ReaderStream::with_capacity(file.take(len), CHUNK).map_ok(Frame::data);
    Ok(resp.map(|_| StreamBody::new(stream).boxed()))
}

/// 304 Not Modified: validators and cache headers, no body (RFC 9110 §15.4.5).
pub fn not_modified(
    validators: &Validators,
    policy: &Policy<'_>,
    now: SystemTime,
) -> Response<Body> {
    let mut resp = base(StatusCode::NOT_MODIFIED, now);
    representation_headers(resp.headers_mut(), validators, policy);
    resp.map(|_| empty())
}

/// The one place an error becomes a response: its status, a short plain-text body, and the
/// fields that status requires (`Allow` for 405, `Content-Range` for 416).
pub fn error(err: &OriginError, head: bool, now: SystemTime) -> Response<Body> {
    let status = err.status();
    let detail = match err {
        OriginError::BadPath(why) => why.reason(),
        OriginError::MethodNotAllowed(_) => "only GET and HEAD are supported",
        OriginError::NotFound => "no such file",
        OriginError::OutsideRoot | OriginError::PermissionDenied => {
            "access to this file is forbidden"
        }
        OriginError::PreconditionFailed => "a precondition in the request did not hold",
        OriginError::RangeNotSatisfiable { .. } => "the requested range does not overlap the file",
        // Never leak paths or OS error text to clients; the log has them.
        OriginError::Io(_) => "internal error, see the origin log",
    };
    let text = format!(
        "{} {}: {detail}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = base(status, now);
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
    match err {
        // RFC 9110 §15.5.6: a 405 must list the supported methods.
        OriginError::MethodNotAllowed(_) => {
            h.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        // RFC 9110 §15.5.17: a 416 for a byte range should say how long the file is.
        OriginError::RangeNotSatisfiable { len } => {
            h.insert(CONTENT_RANGE, header(&format!("bytes */{len}")));
            h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        _ => {}
    }
    if head {
        resp.map(|_| empty())
    } else {
        resp.map(|_| {
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed()
        })
    }
}

/// `Content-Type` from the file extension; text types are declared UTF-8 so browsers do not guess.
pub fn content_type(path: &str) -> HeaderValue {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(
            mime.essence_str(),
            "application/javascript" | "application/json" | "application/xml" | "image/svg+xml"
        );
    if textual && mime.get_param(mime_guess::mime::CHARSET).is_none() {
        header(&format!("{}; charset=utf-8", mime.essence_str()))
    } else {
        header(mime.as_ref())
    }
}

fn base(status: StatusCode, now: SystemTime) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(DATE, header(&httpdate::fmt_http_date(now)));
    h.insert(SERVER, HeaderValue::from_static(SERVER_NAME));
    resp
}

fn representation_headers(h: &mut HeaderMap, validators: &Validators, policy: &Policy<'_>) {
    if let Some(etag) = &validators.etag {
        h.insert(ETAG, etag.to_header_value());
    }
    if let Some(modified) = validators.last_modified {
        h.insert(LAST_MODIFIED, header(&httpdate::fmt_http_date(modified)));
    }
    h.insert(CACHE_CONTROL, policy.cache_control.clone());
    if let Some(keys) = policy.surrogate_key {
        h.insert(SURROGATE_KEY.clone(), keys.clone());
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// For values we format ourselves from ASCII (dates, numbers, MIME types).
fn header(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(content_type("/index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("/a/style.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("/a/app.js"), "text/javascript; charset=utf-8");
        assert_eq!(
            content_type("/a/data.json"),
            "application/json; charset=utf-8"
        );
        assert_eq!(content_type("/logo.svg"), "image/svg+xml; charset=utf-8");
        assert_eq!(content_type("/logo.png"), "image/png");
        assert_eq!(content_type("/sample.bin"), "application/octet-stream");
        assert_eq!(content_type("/README"), "application/octet-stream");
    }

    #[test]
    fn errors_carry_their_required_fields() {
        let now = SystemTime::now();
        let r = error(
            &OriginError::MethodNotAllowed(http::Method::POST),
            false,
            now,
        );
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        let r = error(&OriginError::RangeNotSatisfiable { len: 42 }, false, now);
        assert_eq!(r.status(), 416);
        assert_eq!(r.headers()[CONTENT_RANGE], "bytes */42");
        let r = error(&OriginError::NotFound, true, now);
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()[SERVER], SERVER_NAME);
        assert!(r.headers().contains_key(DATE));
    }
}
