//! The proxy: one module per phase of the request path.
//!
//! ```text
//! accept (server.rs: h1/h2c, header timeout, size limits)
//!   → request (this file): validate, normalise, build the CacheKey; GET/HEAD go to the cache,
//!     every other method passes through (and a success invalidates the URL, RFC 9111 §4.4)
//!   → lookup / freshness / coalesce / admit / store (crate::cache::Engine)
//!   → upstream (upstream.rs): pooled client, timeouts, per-origin cap
//!   → respond (respond.rs): client conditionals, Range, HEAD, Age, Via, Cache-Status, X-Cache
//! ```

pub mod headers;
pub mod respond;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use self::headers::strip_hop_by_hop;
use self::respond::{Identity, RespBody, plain, respond};
use crate::cache::key::{KeyOptions, NormalizedRequest};
use crate::cache::status::{CacheStatus, PassReason};
use crate::cache::upstream::{BoxError, Upstream};
use crate::cache::{CacheRequest, Engine};

pub struct Proxy {
    pub engine: Arc<Engine>,
    upstream: Arc<dyn Upstream>,
    id: Identity,
    key_opts: KeyOptions,
}

impl Proxy {
    pub fn new(
        engine: Arc<Engine>,
        upstream: Arc<dyn Upstream>,
        id: Identity,
        key_opts: KeyOptions,
    ) -> Self {
        Self {
            engine,
            upstream,
            id,
            key_opts,
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<RespBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let resp = self.route(req, peer).await;
        let cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        debug!(
            target: "outpost::access",
            %peer, method = %method, path = %path, status = resp.status().as_u16(),
            cache = %cache, elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        resp
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<RespBody> {
        let (mut parts, body) = req.into_parts();
        let norm =
            match NormalizedRequest::new(&parts.method, &parts.uri, &parts.headers, &self.key_opts)
            {
                Ok(n) => n,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
            };
        // What goes upstream: origin-form target, end-to-end headers, Host kept, Via added.
        let host = norm.parts.headers.get(header::HOST).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(h) = host
            && !parts.headers.contains_key(header::HOST)
        {
            parts.headers.insert(header::HOST, h);
        }
        parts.headers.append(header::VIA, self.id.via.clone());
        parts
            .headers
            .append("surrogate-capability", self.id.surrogate_capability.clone());
        append_forwarded_for(&mut parts.headers, peer);
        parts.uri = origin_form(&parts.uri);
        parts.version = http::Version::HTTP_11;

        let client_headers = parts.headers.clone();
        if parts.method == Method::GET || parts.method == Method::HEAD {
            let method = parts.method.clone();
            let served = self
                .engine
                .serve(CacheRequest {
                    norm,
                    method: method.clone(),
                    upstream: parts,
                })
                .await;
            return respond(served, &method, &client_headers, &self.id);
        }

        // Unsafe and unknown methods pass through with their body.
        let method = parts.method.clone();
        let upstream_req = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
        let now = self.engine.clock().now();
        match self.upstream.fetch(upstream_req).await {
            Ok(resp) => {
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                if !method.is_safe() && (rp.status.is_success() || rp.status.is_redirection()) {
                    self.invalidate_after_unsafe(&norm, &rp.headers).await;
                }
                let served = crate::cache::Served {
                    status: rp.status,
                    headers: rp.headers,
                    body: crate::cache::ServedBody::Stream {
                        stream: Box::pin(http_body_util::BodyDataStream::new(rb).map_err_io()),
                        len: None,
                    },
                    meta: None,
                    cache: CacheStatus::Pass(PassReason::Method),
                    tier: crate::cache::status::Tier::None,
                    stored: false,
                    upstream_error: None,
                    now,
                };
                let mut r = respond(served, &method, &client_headers, &self.id);
                // Keep the origin's framing knowledge: we did not buffer, so no length.
                r.headers_mut().remove(header::CONTENT_LENGTH);
                r
            }
            Err(e) => plain(e.status(), &e.to_string()),
        }
    }

    /// RFC 9111 §4.4: a successful unsafe request invalidates the target URI and the
    /// Location / Content-Location URIs when they share the host.
    async fn invalidate_after_unsafe(&self, norm: &NormalizedRequest, resp: &http::HeaderMap) {
        self.engine.invalidate(norm.key.hash()).await;
        let host = norm.parts.headers.get(header::HOST).cloned();
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(loc) = resp.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let Ok(uri) = loc.parse::<Uri>() else {
                continue;
            };
            let mut headers = http::HeaderMap::new();
            if let Some(h) = &host {
                headers.insert(header::HOST, h.clone());
            }
            let Ok(other) = NormalizedRequest::new(&Method::GET, &uri, &headers, &self.key_opts)
            else {
                continue;
            };
            if other.parts.headers.get(header::HOST) == norm.parts.headers.get(header::HOST) {
                self.engine.invalidate(other.key.hash()).await;
            }
        }
    }
}

trait MapErrIo {
    fn map_err_io(self) -> futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;
}

impl<S> MapErrIo for S
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, BoxError>> + Send + 'static,
{
    fn map_err_io(self) -> futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>> {
        use futures_util::{StreamExt, TryStreamExt};
        self.map_err(std::io::Error::other).boxed()
    }
}

fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

fn append_forwarded_for(headers: &mut http::HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}
