//! The upstream client: a pooled hyper-util client with connect and first-byte timeouts and a
//! per-origin cap on concurrent requests (hyper's pool races a new connection whenever none is
//! idle and has no cap of its own).

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
    pub max_connections: usize,
    /// Where upstream latency, statuses and errors are counted.
    pub metrics: Option<Arc<crate::observe::metrics::EdgeMetrics>>,
    /// TLS for `https://` upstreams (roots, SNI override); `None` trusts nothing, which is
    /// fine for plain `http://` upstreams.
    pub tls: Option<crate::tls::UpstreamTls>,
}

/// The connector: plain HTTP, or TLS (hyper-rustls, ALPN h2 then http/1.1) for `https://`.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct HyperUpstream {
    client: Client<Connector, UpstreamBody>,
    scheme: Scheme,
    authority: http::uri::Authority,
    permits: Arc<Semaphore>,
    first_byte_timeout: Duration,
    metrics: Option<Arc<crate::observe::metrics::EdgeMetrics>>,
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
            first_byte_timeout: cfg.first_byte_timeout,
            metrics: cfg.metrics.clone(),
        }
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
        UpstreamError::Connect(msg)
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
        let timeout = self.first_byte_timeout;
        let (mut parts, body) = req.into_parts();
        parts.uri = self.absolute(&parts.uri);
        let metrics = self.metrics.clone();
        async move {
            let started = std::time::Instant::now();
            let result = Self::send(client, permits, timeout, parts, body).await;
            if let Some(m) = metrics {
                match &result {
                    Ok(r) => m.record_origin(Some(r.status().as_u16()), None, started.elapsed()),
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
        timeout: Duration,
        parts: http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        {
            let permit = match tokio::time::timeout(timeout, permits.acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Err(UpstreamError::Overloaded),
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
