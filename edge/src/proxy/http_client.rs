//! The upstream client: a pooled hyper-util client with connect, first-byte and body-idle
//! timeouts, a per-origin cap on concurrent requests (hyper's pool races a new connection
//! whenever none is idle and has no cap of its own), and a circuit breaker: after
//! `origin_breaker_failures` consecutive connect failures or timeouts, requests fail at once
//! (503) for `origin_breaker_cooldown`, then one probe goes through and its result closes or
//! reopens the breaker. A cache with stale copies serves them meanwhile.
//!
//! An upstream connection goes back to the pool only when hyper read a complete, well-framed
//! response on it: a body that stalls past the idle timeout, fails, or is dropped unread
//! closes its connection. What the request carries is decided by the request phase
//! ([`super::request`]); framing headers are never forwarded, hyper frames the body it sends.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use crate::cache::upstream::{BoxError, Upstream, UpstreamBody, UpstreamError};

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http://host:port` of the origin (a path prefix is not supported).
    pub origin: Uri,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    /// Longest pause between two pieces of a response body.
    pub body_timeout: Duration,
    /// Consecutive failures that open the circuit breaker (0: never).
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub max_connections: usize,
    /// How long a request over `max_connections` waits for one to free up (at most
    /// `max_connections` wait at once); then it fails as overloaded, and a stored copy
    /// stale-if-error allows is served instead.
    pub queue_wait: Duration,
    /// Where upstream latency, statuses and errors are counted.
    pub metrics: Option<Arc<crate::observe::metrics::EdgeMetrics>>,
    /// TLS for `https://` upstreams (roots, SNI override); `None` trusts nothing, which is
    /// fine for plain `http://` upstreams.
    pub tls: Option<crate::tls::UpstreamTls>,
}

/// The connector: plain HTTP, or TLS (hyper-rustls, ALPN http/1.1) for `https://`.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct HyperUpstream {
    client: Client<Connector, UpstreamBody>,
    scheme: Scheme,
    authority: http::uri::Authority,
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit, and how long and how many may.
    queue: Arc<Queue>,
    first_byte_timeout: Duration,
    body_timeout: Duration,
    breaker: Arc<Breaker>,
    metrics: Option<Arc<crate::observe::metrics::EdgeMetrics>>,
    /// Failures logged and timed for operators (registered with the node's metrics).
    health: Option<Arc<crate::observe::upstreams::UpstreamHealth>>,
}

/// The origin budget's queue: requests over `max_connections` wait at most `wait`, and at
/// most `max` of them at once; the rest fail at once, so a struggling origin never collects a
/// pile of waiting requests (each holding a client).
struct Queue {
    waiting: std::sync::atomic::AtomicUsize,
    max: usize,
    wait: Duration,
}

impl Queue {
    async fn admit(&self, permits: Arc<Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering::AcqRel;
        if let Ok(p) = permits.clone().try_acquire_owned() {
            return Some(p);
        }
        if self
            .waiting
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_err()
        {
            return None;
        }
        // Given back however the wait ends: a client that leaves drops this future mid-wait.
        let _waiting = Waiting(&self.waiting);
        tokio::time::timeout(self.wait, permits.acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// A place in the [`Queue`], held while waiting.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A circuit breaker per upstream (see the module docs).
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    epoch: std::time::Instant,
    failures: std::sync::atomic::AtomicU32,
    /// Milliseconds since `epoch` until which requests fail at once (0: closed).
    open_until: std::sync::atomic::AtomicU64,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            epoch: std::time::Instant::now(),
            failures: Default::default(),
            open_until: Default::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// May a request go upstream now? While open, no; once the cooldown is over, exactly one
    /// caller (the probe) gets through and pushes the reopening out by another cooldown.
    fn admit(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let until = self.open_until.load(Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + self.cooldown.as_millis() as u64,
                    AcqRel,
                    Acquire,
                )
                .is_ok()
    }

    fn record(&self, ok: bool) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        if ok {
            self.failures.store(0, Release);
            self.open_until.store(0, Release);
            return;
        }
        if self.threshold == 0 {
            return;
        }
        let n = self.failures.fetch_add(1, AcqRel) + 1;
        if n >= self.threshold {
            let until = self.now_ms() + self.cooldown.as_millis() as u64;
            if self.open_until.swap(until, AcqRel) == 0 {
                tracing::warn!(
                    failures = n,
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "origin failing: circuit breaker open, requests fail at once until a probe succeeds"
                );
            }
        }
    }
}

impl HyperUpstream {
    pub fn new(cfg: &UpstreamConfig) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false); // https URLs go through the TLS layer around it
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let http = match &cfg.tls {
            Some(tls) => tls.connector(&cfg.origin, http),
            None => crate::tls::UpstreamTls::plain_only().connector(&cfg.origin, http),
        };
        let client = Client::builder(TokioExecutor::new())
            // Below common origin keep-alive timeouts, so we rarely reuse a socket the origin
            // is closing (hyper#3553).
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(cfg.max_connections.min(256))
            .build(http);
        Self {
            client,
            scheme: cfg.origin.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: cfg
                .origin
                .authority()
                .cloned()
                .expect("validated origin has an authority"),
            permits: Arc::new(Semaphore::new(cfg.max_connections)),
            queue: Arc::new(Queue {
                waiting: Default::default(),
                max: cfg.max_connections,
                wait: cfg.queue_wait,
            }),
            first_byte_timeout: cfg.first_byte_timeout,
            body_timeout: cfg.body_timeout,
            breaker: Arc::new(Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown)),
            metrics: cfg.metrics.clone(),
            health: cfg.metrics.as_ref().map(|m| {
                m.upstreams
                    .register(cfg.origin.authority().map_or("upstream", |a| a.as_str()))
            }),
        }
    }

    /// `GET <path>` on this upstream answers 2xx or 3xx within `timeout` (an active health
    /// probe; it bypasses the breaker and the connection budget).
    pub async fn probe(&self, path: &str, timeout: Duration) -> bool {
        let Ok(pq) = path.parse::<PathAndQuery>() else {
            return false;
        };
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build();
        let Ok(uri) = uri else { return false };
        let Ok(req) = Request::get(uri).body(crate::cache::empty_body()) else {
            return false;
        };
        matches!(
            tokio::time::timeout(timeout, self.client.request(req)).await,
            Ok(Ok(r)) if r.status().is_success() || r.status().is_redirection()
        )
    }

    fn absolute(&self, uri: &Uri) -> Uri {
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .expect("parts of valid URIs")
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if e.is_connect() {
        return UpstreamError::Connect(msg);
    }
    // The request body we were forwarding failed (the client's framing broke, or it left):
    // the client's fault, not the origin's.
    let user_body = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(|h| h.is_user());
    if user_body {
        UpstreamError::ClientBody
    } else {
        UpstreamError::Protocol(msg)
    }
}

impl Upstream for HyperUpstream {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>> {
        let client = self.client.clone();
        let permits = self.permits.clone();
        let queue = self.queue.clone();
        let timeout = self.first_byte_timeout;
        let body_timeout = self.body_timeout;
        let breaker = self.breaker.clone();
        let (mut parts, body) = req.into_parts();
        parts.uri = self.absolute(&parts.uri);
        let metrics = self.metrics.clone();
        let health = self.health.clone();
        async move {
            let started = std::time::Instant::now();
            let result = if breaker.admit() {
                let r = Self::send(client, permits, &queue, timeout, parts, body).await;
                match &r {
                    Ok(_) => breaker.record(true),
                    Err(UpstreamError::Connect(_) | UpstreamError::Timeout(_)) => {
                        breaker.record(false)
                    }
                    Err(_) => {}
                }
                r.map(|resp| resp.map(|b| IdleTimeout::new(b, body_timeout).boxed()))
            } else {
                Err(UpstreamError::Unavailable)
            };
            if let Some(h) = &health {
                match &result {
                    Ok(_) => h.answered(),
                    // The client's request body failed: says nothing about the upstream.
                    Err(UpstreamError::ClientBody) => {}
                    Err(e) => h.failed(e),
                }
            }
            if let Some(m) = metrics {
                match &result {
                    Ok(r) => m.record_origin(Some(r.status().as_u16()), None, started.elapsed()),
                    // Not the origin's failure: not counted as one.
                    Err(UpstreamError::ClientBody) => {}
                    Err(e) => m.record_origin(None, Some(e.kind()), started.elapsed()),
                }
            }
            result
        }
        .boxed()
    }
}

impl HyperUpstream {
    async fn send(
        client: Client<Connector, UpstreamBody>,
        permits: Arc<Semaphore>,
        queue: &Queue,
        timeout: Duration,
        parts: http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        {
            let Some(permit) = queue.admit(permits).await else {
                return Err(UpstreamError::Overloaded);
            };
            let idempotent = parts.method == Method::GET || parts.method == Method::HEAD;
            // Keep a copy for one retry of an idempotent request that hit a closing keep-alive
            // connection (the body is empty for GET/HEAD here).
            let retry_parts = idempotent.then(|| {
                let mut p = Request::builder()
                    .method(parts.method.clone())
                    .uri(parts.uri.clone())
                    .body(())
                    .expect("valid")
                    .into_parts()
                    .0;
                p.headers = parts.headers.clone();
                p
            });
            let first =
                tokio::time::timeout(timeout, client.request(Request::from_parts(parts, body)))
                    .await;
            let resp = match first {
                Err(_) => return Err(UpstreamError::Timeout(timeout)),
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let err = classify(&e);
                    let Some(p) = retry_parts.filter(|_| !e.is_connect()) else {
                        return Err(err);
                    };
                    match tokio::time::timeout(
                        timeout,
                        client.request(Request::from_parts(p, crate::cache::empty_body())),
                    )
                    .await
                    {
                        Err(_) => return Err(UpstreamError::Timeout(timeout)),
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => return Err(classify(&e)),
                    }
                }
            };
            // The permit lives as long as the body: the cap counts requests in flight.
            Ok(resp.map(move |b| {
                b.map_err(move |e| {
                    let _held = &permit;
                    BoxError::from(e)
                })
                .boxed()
            }))
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream body that fails when no piece of it arrives within the timeout: the fill
    /// is abandoned (nothing partial is stored), the client's response is cut (never presented
    /// as complete), the concurrency permit is returned and the connection is closed.
    ///
    /// The clock runs only while the body is being waited on: a consumer that pauses between
    /// two pieces (a fill waiting for a slow reader) is not the origin's silence.
    struct IdleTimeout {
        #[pin]
        body: UpstreamBody,
        timeout: Duration,
        #[pin]
        sleep: tokio::time::Sleep,
        // The sleep is armed for the piece being waited on now.
        waiting: bool,
    }
}

impl IdleTimeout {
    fn new(body: UpstreamBody, timeout: Duration) -> Self {
        Self {
            body,
            timeout,
            sleep: tokio::time::sleep(timeout),
            waiting: false,
        }
    }
}

impl http_body::Body for IdleTimeout {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let mut this = self.project();
        if !*this.waiting {
            let next = tokio::time::Instant::now() + *this.timeout;
            this.sleep.as_mut().reset(next);
            *this.waiting = true;
        }
        match this.body.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                Poll::Ready(frame)
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BoxError::from(format!(
                    "the origin sent nothing for {:?} in the middle of a body",
                    this.timeout
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
