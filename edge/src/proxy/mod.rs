//! The proxy: the request path, one module per phase. One path: the fast hit is its first
//! phase, not a second rule (it answers only what the full path would answer the same way,
//! and a test proves it).
//!
//! ```text
//! accept (server.rs: h1 / h2 / TLS, header timeout, connection caps and idle bounds)
//!   → Proxy::start: fast hit (fast_hit.rs): a fresh memory object whose prepared head
//!     covers the request is answered at once, with no await
//!   → Proxy::finish → Proxy::full_path:
//!       request (request.rs): check, build the key (once), dispatch
//!         ├ Purge → purge.rs: admin token, applied and forwarded as `outpost purge` does
//!         ├ Cache → forward.rs (the one upstream request builder)
//!         │         → crate::cache::Engine::serve: lookup, freshness, coalesce, fill, store
//!         │           (upstream: http_client.rs to the origin, shield.rs to shields)
//!         │         → compress.rs: br / gzip / identity, stored variants
//!         │         → respond.rs: conditionals, Range, HEAD, Age, Via, Cache-Status
//!         └ Pass  → forward.rs → upstream → respond.rs (a success invalidates, RFC 9111 §4.4)
//!       an error at any phase → crate::error::error_response (Proxy-Status)
//!   → conclude: metrics and the access log
//! ```

pub mod compress;
mod fast_hit;
pub mod forward;
pub mod http_client;
pub mod origins;
mod purge;
pub mod request;
pub mod respond;
pub mod shield;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header;
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;

use self::request::Dispatch;
use self::respond::{Identity, Outcome, respond};
use crate::cache::key::{CacheKey, KeyOptions, NormalizedRequest};
use crate::cache::status::{CacheStatus, PassReason};
use crate::cache::upstream::{BoxError, Upstream};
use crate::cache::{CacheRequest, Engine};
use crate::error::EdgeError;
use crate::observe::access_log::{AccessLog, Entry, RequestFields};
use crate::observe::live_log::LiveLog;
use outpost_http::body::RespBody;
use outpost_http::headers::strip_hop_by_hop;

/// The client end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub addr: SocketAddr,
    /// The request came over TLS (the HTTPS listener).
    pub tls: bool,
}

/// A request body the proxy can forward: hyper's `Incoming` on the data port, any body in tests.
pub trait RequestBody: Send + 'static {
    /// The body as sent upstream on a pass-through.
    fn into_upstream(self) -> crate::cache::upstream::UpstreamBody;
    /// The request carries content (HTTP/1 framing that announces some, or HTTP/2 DATA).
    fn has_body(&self) -> bool;
}

impl<B> RequestBody for B
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    fn into_upstream(self) -> crate::cache::upstream::UpstreamBody {
        self.map_err(Into::into).boxed()
    }

    fn has_body(&self) -> bool {
        !http_body::Body::is_end_stream(self)
    }
}

/// Versioned URLs (cache busting): `/app.js?v=3` and `?v=4` are distinct objects.
#[derive(Debug, Clone, Default)]
pub struct Versioning {
    /// The parameter name; empty disables.
    pub param: String,
    /// Remove it from the upstream request, so the origin serves its current file.
    pub strip_upstream: bool,
    /// Freshness of a versioned response without its own.
    pub ttl: std::time::Duration,
}

/// What the request phase is configured with; a reload (SIGHUP) replaces it whole.
#[derive(Debug, Clone, Default)]
pub struct Route {
    pub key_opts: KeyOptions,
    pub versioning: Versioning,
    /// Which client fields go upstream.
    pub forward: forward::ForwardPolicy,
    pub limits: request::RequestLimits,
}

/// Per-request settings that a reload can replace.
pub struct RouteSettings {
    pub route: Route,
    /// Unique in the process (every node, every reload): what the hit path's key memo was
    /// computed under.
    pub generation: u64,
}

impl RouteSettings {
    fn of(route: Route) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            route,
            generation: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// A request [`Proxy::start`] could not answer at once; [`Proxy::finish`] does.
pub struct Pending<B> {
    req: Request<B>,
    client: Client,
    started: Instant,
    /// A fresh hit whose head is still to be prepared; `None`: the full path.
    unprepared: Option<Box<fast_hit::Unprepared>>,
    /// The key the fast path built, and the settings generation it was built under.
    key: Option<(u64, CacheKey)>,
}

pub struct Proxy {
    pub engine: Arc<Engine>,
    pub metrics: Arc<crate::observe::metrics::EdgeMetrics>,
    /// Operator API access for the data port's `PURGE` method (set once at start-up).
    operator: std::sync::OnceLock<(crate::operator::EdgeOperator, crate::operator::SharedAuth)>,
    upstream: Arc<dyn Upstream>,
    id: Identity,
    /// Settings a config reload (SIGHUP) may change; read lock-free per request.
    settings: arc_swap::ArcSwap<RouteSettings>,
    compression: compress::Compressor,
    /// `[access_log]` (set once at start-up).
    access: std::sync::OnceLock<Arc<AccessLog>>,
    /// `outpost log`'s live stream (`GET /log` on the admin port).
    pub live: Arc<LiveLog>,
}

impl Proxy {
    pub fn new(
        engine: Arc<Engine>,
        upstream: Arc<dyn Upstream>,
        id: Identity,
        route: Route,
        metrics: Arc<crate::observe::metrics::EdgeMetrics>,
        compression: crate::compress::CompressionConfig,
        compression_memory: u64,
    ) -> Self {
        metrics.attach_engine(&engine);
        let compression = compress::Compressor::new(compression, compression_memory);
        metrics.attach_compression_memory(compression.memory().clone());
        Self {
            operator: std::sync::OnceLock::new(),
            metrics,
            engine,
            upstream,
            id,
            settings: arc_swap::ArcSwap::from_pointee(RouteSettings::of(route)),
            compression,
            access: std::sync::OnceLock::new(),
            live: Arc::default(),
        }
    }

    /// Writes an access log line per request from now on.
    pub fn set_access_log(&self, log: Arc<AccessLog>) {
        let _ = self.access.set(log);
    }

    pub fn access_log(&self) -> Option<Arc<AccessLog>> {
        self.access.get().cloned()
    }

    /// The request's fields for the access log and the live stream (`None` when neither
    /// wants them). `upstream`: the request may go upstream, so a request id made here is set
    /// on it for the origin.
    fn access_fields<B>(&self, req: &mut Request<B>, upstream: bool) -> Option<RequestFields> {
        match self.access.get() {
            Some(a) => Some(a.request_fields(req, upstream)),
            None if self.live.active() => Some(RequestFields::of(req, None)),
            None => None,
        }
    }

    /// Answers one request.
    pub async fn handle<B: RequestBody>(
        &self,
        req: Request<B>,
        client: Client,
    ) -> Response<RespBody> {
        match self.start(req, client) {
            Ok(resp) => resp,
            Err(pending) => self.finish(pending).await,
        }
    }

    /// Answers a fresh memory hit at once, with no await, or hands the request back for
    /// [`Proxy::finish`]. The data port calls this within hyper's call to its service, so a hit's
    /// request is dropped before hyper reads from the connection again: a request still alive
    /// then holds hyper's read buffer, which made it allocate a new buffer for every request.
    pub fn start<B: RequestBody>(
        &self,
        mut req: Request<B>,
        client: Client,
    ) -> Result<Response<RespBody>, Box<Pending<B>>> {
        let started = Instant::now();
        let (unprepared, key) = match self.hit_now(&req) {
            fast_hit::Lookup::Hit(hit) => {
                let log = self.access_fields(&mut req, false);
                return Ok(self.conclude_hit(client, started, log, hit));
            }
            fast_hit::Lookup::Unprepared(u) => (Some(u), None),
            fast_hit::Lookup::Full(key) => (None, key),
        };
        // Boxed: the result stays as small as a response (it is moved a few times).
        Err(Box::new(Pending {
            req,
            client,
            started,
            unprepared,
            key,
        }))
    }

    /// Answers a request [`Proxy::start`] handed back.
    pub async fn finish<B: RequestBody>(&self, pending: Box<Pending<B>>) -> Response<RespBody> {
        let Pending {
            mut req,
            client,
            started,
            unprepared,
            key,
        } = *pending;
        let log = self.access_fields(&mut req, true);
        let prepared = match unprepared {
            // Boxed, as the full path below: hyper moves this future per request.
            Some(u) => Box::pin(self.hit_later(req.headers(), u)).await,
            None => None,
        };
        if let Some(hit) = prepared {
            return self.conclude_hit(client, started, log, hit);
        }
        let missed = req.uri().path_and_query().cloned();
        let is_head = req.method() == Method::HEAD;
        // Boxed: the full path's state machine is several KiB, and hyper moves the request's
        // future a few times; unboxed, every request would copy it.
        let resp = Box::pin(self.full_path(req, client, key)).await;
        let outcome = resp
            .extensions()
            .get::<Outcome>()
            .copied()
            .unwrap_or(Outcome {
                cache: CacheStatus::Error,
                tier: crate::cache::status::Tier::None,
                upstream: None,
            });
        // Body bytes actually sent: none for HEAD, whatever its Content-Length says.
        let len = if is_head {
            Some(0)
        } else {
            resp.headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        self.conclude(client, started, log, resp, outcome, len, missed)
    }

    fn conclude_hit(
        &self,
        client: Client,
        started: Instant,
        log: Option<RequestFields>,
        hit: fast_hit::FastHit,
    ) -> Response<RespBody> {
        let len = Some(hit.sent);
        self.conclude(client, started, log, hit.response, hit.outcome, len, None)
    }

    /// Metrics and the access log for an answered request. `len`: the body bytes it sends,
    /// when known; otherwise the body counts them as they go.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &self,
        client: Client,
        started: Instant,
        log: Option<RequestFields>,
        resp: Response<RespBody>,
        outcome: Outcome,
        len: Option<u64>,
        missed: Option<http::uri::PathAndQuery>,
    ) -> Response<RespBody> {
        let elapsed = started.elapsed();
        self.metrics.record_request(
            outcome.cache,
            outcome.tier,
            resp.status().as_u16(),
            len,
            elapsed,
        );
        if outcome.cache == CacheStatus::Miss {
            self.metrics
                .record_miss(missed.as_ref().map_or("/", |p| p.as_str()));
        }
        let mut pending_line = None;
        if let Some(request) = log {
            let entry = Entry {
                time: std::time::SystemTime::now(),
                client: client.addr.ip(),
                request,
                status: resp.status().as_u16(),
                bytes: len,
                cache: outcome.cache.as_str(),
                tier: outcome.tier.as_str(),
                upstream: outcome.upstream,
                total: elapsed,
            };
            if self.live.active() {
                self.live.publish(Arc::new(entry.clone()));
            }
            match self.access.get() {
                Some(access) if len.is_some() => access.log(entry),
                // Written when the body ends (or is dropped), with the bytes it sent.
                Some(access) => pending_line = Some((access.clone(), entry, started)),
                None => {}
            }
        }
        if len.is_none() {
            let metrics = self.metrics.clone();
            return resp.map(|b| {
                RespBody::boxed(crate::observe::counting::CountingBody::new(
                    b,
                    metrics,
                    outcome.cache,
                    pending_line,
                ))
            });
        }
        resp
    }

    /// Enables the `PURGE` method on the data port.
    pub fn set_operator(
        &self,
        operator: crate::operator::EdgeOperator,
        auth: crate::operator::SharedAuth,
    ) {
        let _ = self.operator.set((operator, auth));
    }

    /// An error answer of this node ([`crate::error::error_response`]).
    fn error(&self, err: &EdgeError) -> Response<RespBody> {
        crate::error::error_response(err, &self.id.name)
    }

    /// Replaces the reloadable settings (key options, versioning, forwarding, limits).
    pub fn reload(&self, route: Route) {
        self.settings.store(Arc::new(RouteSettings::of(route)));
    }

    /// Everything but the fast hit: the request phase, then purge, cache or pass. `key`: the
    /// key the fast path built, used when the settings have not changed since.
    async fn full_path<B: RequestBody>(
        &self,
        req: Request<B>,
        client: Client,
        key: Option<(u64, CacheKey)>,
    ) -> Response<RespBody> {
        let settings = self.settings.load();
        let key = key
            .filter(|(generation, _)| *generation == settings.generation)
            .map(|(_, key)| key);
        let has_body = req.body().has_body();
        let (parts, body) = req.into_parts();
        match request::dispatch(&parts, has_body, &settings.route, key) {
            Err(e) => self.error(&e),
            Ok(Dispatch::Purge(norm)) => self.purge(&parts.headers, &norm).await,
            Ok(Dispatch::Cache(norm)) => self.cache(parts, norm, client, &settings.route).await,
            Ok(Dispatch::Pass(norm)) => self.pass(parts, body, norm, client, &settings.route).await,
        }
    }

    /// What this node adds to every upstream request.
    fn hop(&self, client: Client) -> forward::Hop<'_> {
        forward::Hop {
            via: &self.id.via,
            surrogate_capability: &self.id.surrogate_capability,
            client,
            sets_forwarded_proto: self.id.sets_forwarded_proto,
        }
    }

    /// GET and HEAD: the engine answers (from a tier, a fill, or upstream), then the
    /// compression and respond phases.
    async fn cache(
        &self,
        parts: http::request::Parts,
        norm: NormalizedRequest,
        client: Client,
        route: &Route,
    ) -> Response<RespBody> {
        let (upstream, versioned) = forward::upstream_request(
            &parts,
            &norm,
            route,
            &self.hop(client),
            self.compression.config().enabled,
        );
        let served = self
            .engine
            .serve(CacheRequest {
                norm,
                method: parts.method.clone(),
                upstream,
                default_ttl: versioned.then_some(route.versioning.ttl),
            })
            .await;
        match self
            .compression
            .apply(&self.engine, served, &parts.method, &parts.headers)
            .await
        {
            Ok(served) => respond(served, &parts.method, &parts.headers, &self.id),
            Err(e) => self.error(&e),
        }
    }

    /// Unsafe and unknown methods pass through with their body.
    async fn pass<B: RequestBody>(
        &self,
        parts: http::request::Parts,
        body: B,
        norm: NormalizedRequest,
        client: Client,
        route: &Route,
    ) -> Response<RespBody> {
        let (mut upstream, _) =
            forward::upstream_request(&parts, &norm, route, &self.hop(client), false);
        let method = parts.method;
        let client_headers = parts.headers;
        upstream
            .extensions
            .insert(crate::cache::upstream::RouteKey(norm.key.hash()));
        let upstream_req = Request::from_parts(upstream, body.into_upstream());
        let now = self.engine.clock().now();
        let sent = std::time::Instant::now();
        match self.upstream.fetch(upstream_req).await {
            Ok(resp) => {
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                if !method.is_safe() && (rp.status.is_success() || rp.status.is_redirection()) {
                    self.invalidate_after_unsafe(&norm, &rp.headers).await;
                }
                let served = crate::cache::Served {
                    key: None,
                    status: rp.status,
                    headers: rp.headers,
                    body: crate::cache::ServedBody::Stream {
                        stream: Box::pin(http_body_util::BodyDataStream::new(rb).map_err_io()),
                        len: None,
                        range: None,
                    },
                    meta: None,
                    cache: CacheStatus::Pass(PassReason::Method),
                    tier: crate::cache::status::Tier::None,
                    stored: false,
                    upstream_error: None,
                    failure: None,
                    upstream_time: Some(sent.elapsed()),
                    now,
                };
                let mut r = respond(served, &method, &client_headers, &self.id);
                // Keep the origin's framing knowledge: we did not buffer, so no length.
                r.headers_mut().remove(header::CONTENT_LENGTH);
                r
            }
            // A client body that broke mid-way (bad chunked framing, a reset) is the client's
            // fault: 400, and the rest of that body is never read as a request.
            Err(e @ crate::cache::upstream::UpstreamError::ClientBody) => {
                self.error(&EdgeError::Refused {
                    refusal: request::Refusal {
                        status: e.status(),
                        reason: "the request body is malformed or was cut short",
                    },
                    unread_body: true,
                })
            }
            Err(e) => self.error(&EdgeError::Upstream(e)),
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
            let Ok(other) = NormalizedRequest::new(
                &Method::GET,
                &uri,
                &headers,
                &self.settings.load().route.key_opts,
            ) else {
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
