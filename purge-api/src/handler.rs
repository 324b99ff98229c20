//! The admin routes, served by [`handle`]:
//!
//! | route | scope | answer |
//! |---|---|---|
//! | `POST /purge` (JSON [`PurgeRequest`]) | purge | 200 [`crate::PurgeReceipt`] |
//! | `PUT /objects/<path>` (the body) | push | 201 created / 200 replaced, [`crate::PushReceipt`] |
//! | `DELETE /objects/<path>` | push | 204, or 404 when absent |
//! | `GET /objects?prefix=/css/` | read | 200, JSON array of [`crate::PushedObject`] |
//!
//! Every error is `{"error": "..."}` built by [`crate::error_response`]. Checks run in this
//! order: method (405), token (401/403), path and headers (400), declared size (413), then the
//! body streams to the backend under the guard in `body.rs`.

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyDataStream, BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use tracing::{debug, error};

use crate::auth::{Auth, Scope};
use crate::backend::{AdminBackend, PushSpec};
use crate::body::{Guard, linger};
use crate::digest::{CONTENT_SHA256, parse_hex};
use crate::error::{AdminError, BoxError, RespBody, error_response, json_bytes};
use crate::path::{list_prefix, object_path};
use crate::wire::PurgeRequest;

/// `Cache-Control` given to a pushed object when the request has none. Pushed objects are
/// pinned at the edge whatever this says; it is what browsers and downstream caches see. Five
/// minutes keeps a re-push or purge visible to browsers quickly; send your own
/// `Cache-Control` (for example `public, max-age=31536000, immutable`) for fingerprinted assets.
pub const DEFAULT_PUSH_CACHE_CONTROL: &str = "public, max-age=300";

/// Size limits of admin requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Largest pushed body; larger pushes get 413 and nothing is stored.
    pub max_push_bytes: u64,
    /// Largest `POST /purge` body.
    pub max_purge_body: u64,
}

impl Default for AdminLimits {
    /// 1 GiB pushes (the edge's default `max_object_size`) and 1 MiB purge bodies.
    fn default() -> Self {
        Self {
            max_push_bytes: 1 << 30,
            max_purge_body: 1 << 20,
        }
    }
}

/// Whether `path` is an admin API route (so [`handle`] answers it).
pub fn owns(path: &str) -> bool {
    path == "/purge" || path == "/objects" || path.starts_with("/objects/")
}

/// Serves one admin request. Returns `None`, without touching the request's body, for paths
/// this API does not own ([`owns`]), so the caller can serve `/healthz` and the like; it should
/// remember the path before calling, since the request is consumed.
///
/// Generic over the body so it serves hyper's `Incoming` and in-memory bodies alike.
pub async fn handle<B>(
    req: Request<B>,
    backend: &dyn AdminBackend,
    auth: &Auth,
    limits: &AdminLimits,
) -> Option<Response<RespBody>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if !owns(req.uri().path()) {
        return None;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = match route(req, backend, auth, limits).await {
        Ok(r) => r,
        Err(e) => {
            debug!(method = %method, path = %path, status = e.status().as_u16(), error = %e, "admin request refused");
            error_response(&e)
        }
    };
    debug!(method = %method, path = %path, status = resp.status().as_u16(), "admin request");
    Some(resp)
}

async fn route<B>(
    req: Request<B>,
    backend: &dyn AdminBackend,
    auth: &Auth,
    limits: &AdminLimits,
) -> Result<Response<RespBody>, AdminError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let path = req.uri().path();
    let method = req.method();
    if path == "/purge" {
        if method != Method::POST {
            return Err(AdminError::MethodNotAllowed {
                path: "/purge",
                allow: "POST",
            });
        }
        return purge(req, backend, auth, limits).await;
    }
    if path == "/objects" {
        if method != Method::GET {
            return Err(AdminError::MethodNotAllowed {
                path: "/objects",
                allow: "GET",
            });
        }
        return list(req, backend, auth).await;
    }
    match *method {
        Method::PUT => push(req, backend, auth, limits).await,
        Method::DELETE => delete(req, backend, auth).await,
        _ => Err(AdminError::MethodNotAllowed {
            path: "/objects/<path>",
            allow: "PUT, DELETE",
        }),
    }
}

async fn purge<B>(
    req: Request<B>,
    backend: &dyn AdminBackend,
    auth: &Auth,
    limits: &AdminLimits,
) -> Result<Response<RespBody>, AdminError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    auth.check(req.headers(), Scope::Purge)?;
    let limit = limits.max_purge_body;
    if content_length(req.headers())?.is_some_and(|n| n > limit) {
        return Err(AdminError::TooLarge { limit });
    }
    let body = Limited::new(req.into_body(), limit as usize)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                AdminError::TooLarge { limit }
            } else {
                AdminError::BadRequest(format!("reading the request body failed: {e}"))
            }
        })?
        .to_bytes();
    let pr: PurgeRequest = serde_json::from_slice(&body)
        .map_err(|e| AdminError::BadRequest(format!("invalid purge request: {e}")))?;
    pr.validate()?;
    let receipt = backend.purge(pr).await?;
    Ok(json(StatusCode::OK, &receipt))
}

async fn push<B>(
    req: Request<B>,
    backend: &dyn AdminBackend,
    auth: &Auth,
    limits: &AdminLimits,
) -> Result<Response<RespBody>, AdminError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let raw = BodyDataStream::new(body).map_err(Into::into).boxed();
    let limit = limits.max_push_bytes;
    let checked = auth
        .check(&parts.headers, Scope::Push)
        .map_err(AdminError::from)
        .and_then(|()| push_spec(&parts))
        .and_then(|spec| match spec.content_length {
            Some(n) if n > limit => Err(AdminError::TooLarge { limit }),
            _ => Ok(spec),
        });
    let spec = match checked {
        Ok(spec) => spec,
        Err(e) => {
            linger(raw);
            return Err(e);
        }
    };
    let (guard, outcome) = Guard::new(raw, limit, spec.content_length, spec.expected_sha256);
    let path = spec.path.clone();
    let result = backend.push(spec, guard.boxed()).await;
    let (aborted, completed) = match outcome.lock() {
        Ok(mut o) => (o.aborted.take(), o.completed),
        Err(_) => return Err(AdminError::internal("push outcome lock poisoned")),
    };
    let receipt = match (result, aborted) {
        // The body's own failure is the reason, whatever the backend made of it.
        (Ok(_), Some(abort)) => {
            error!(path = %path, error = %abort, "backend committed a push whose body failed; it breaks the AdminBackend::push contract");
            return Err(abort);
        }
        (Err(_), Some(abort)) => return Err(abort),
        (Err(e), None) => return Err(e),
        (Ok(_), None) if !completed => {
            return Err(AdminError::internal(
                "the backend finished the push before reading the whole body",
            ));
        }
        (Ok(r), None) => r,
    };
    let status = if receipt.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = json(status, &receipt);
    if let Ok(v) = HeaderValue::from_str(&receipt.etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

/// Reads the push's path and headers into a [`PushSpec`].
fn push_spec(req: &http::request::Parts) -> Result<PushSpec, AdminError> {
    if req.uri.query().is_some() {
        return Err(AdminError::bad_request(
            "invalid object path: PUT /objects/<path> takes no query string",
        ));
    }
    let raw = req.uri.path().strip_prefix("/objects/").unwrap_or("");
    let path = object_path(raw)?;
    let h = &req.headers;
    let content_type = match header_str(h, header::CONTENT_TYPE.as_str())? {
        Some(ct) if !ct.is_empty() => ct.to_string(),
        _ => guess_content_type(&path),
    };
    let cache_control = match header_str(h, header::CACHE_CONTROL.as_str())? {
        Some(cc) if !cc.is_empty() => cc.to_string(),
        _ => DEFAULT_PUSH_CACHE_CONTROL.to_string(),
    };
    let mut surrogate_keys: Vec<String> = Vec::new();
    for v in h.get_all("surrogate-key") {
        let v = v
            .to_str()
            .map_err(|_| AdminError::bad_request("Surrogate-Key must be visible ASCII"))?;
        for k in v.split_ascii_whitespace() {
            if !surrogate_keys.iter().any(|have| have == k) {
                surrogate_keys.push(k.to_string());
            }
        }
    }
    let expected_sha256 = match header_str(h, CONTENT_SHA256)? {
        None => None,
        Some(v) => Some(parse_hex(v.trim()).ok_or_else(|| {
            AdminError::bad_request("Content-SHA256 must be 64 hex digits (the body's SHA-256)")
        })?),
    };
    Ok(PushSpec {
        path,
        content_type,
        cache_control,
        surrogate_keys,
        expected_sha256,
        content_length: content_length(h)?,
    })
}

async fn delete<B>(
    req: Request<B>,
    backend: &dyn AdminBackend,
    auth: &Auth,
) -> Result<Response<RespBody>, AdminError> {
    auth.check(req.headers(), Scope::Push)?;
    let raw = req.uri().path().strip_prefix("/objects/").unwrap_or("");
    let path = object_path(raw)?;
    if backend.delete_object(path.clone()).await? {
        let mut r = json_bytes(StatusCode::NO_CONTENT, Bytes::new());
        r.headers_mut().remove(header::CONTENT_TYPE);
        Ok(r)
    } else {
        Err(AdminError::NotFound(format!("no pushed object at {path}")))
    }
}

async fn list<B>(
    req: Request<B>,
    backend: &dyn AdminBackend,
    auth: &Auth,
) -> Result<Response<RespBody>, AdminError> {
    auth.check(req.headers(), Scope::Read)?;
    let mut prefix = "/".to_string();
    for pair in req.uri().query().unwrap_or("").split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "prefix" => prefix = list_prefix(v)?,
            other => {
                return Err(AdminError::BadRequest(format!(
                    "unknown query parameter `{other}`; GET /objects takes `prefix`"
                )));
            }
        }
    }
    let objects = backend.list_objects(prefix).await?;
    Ok(json(StatusCode::OK, &objects))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<RespBody> {
    match serde_json::to_vec(value) {
        Ok(mut v) => {
            v.push(b'\n');
            json_bytes(status, Bytes::from(v))
        }
        Err(e) => error_response(&AdminError::internal(format!("encoding the answer: {e}"))),
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AdminError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| AdminError::BadRequest(format!("{name} must be visible ASCII"))),
    }
}

fn content_length(h: &HeaderMap) -> Result<Option<u64>, AdminError> {
    match header_str(h, header::CONTENT_LENGTH.as_str())? {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| AdminError::bad_request("invalid Content-Length")),
    }
}

/// Same rule as the origin server: guessed from the extension, UTF-8 for textual types.
fn guess_content_type(path: &str) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(
            mime.essence_str(),
            "application/javascript" | "application/json" | "image/svg+xml" | "application/xml"
        );
    if textual && mime.get_param(mime_guess::mime::CHARSET).is_none() {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.to_string()
    }
}

#[cfg(test)]
mod tests;
