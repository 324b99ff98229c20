//! The servers under test, all on `127.0.0.1:0`: an in-process origin plugged into the edge's
//! engine (no origin socket), the plain hyper baseline returning the same bytes, and an edge.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use outpost_config::Source;
use outpost_edge::cache::Engine;
use outpost_edge::cache::clock::Clock;
use outpost_edge::cache::upstream::{BoxError, Upstream, UpstreamBody, UpstreamError};
use outpost_edge::{EdgeConfig, EdgeOverrides, EdgeServer};
use tokio::net::TcpListener;

const CACHEABLE: &str = "public, max-age=3600";

/// Bodies by path, served identically by the origin and the plain server.
#[derive(Clone, Default)]
pub struct Bodies(Arc<HashMap<String, Bytes>>);

impl Bodies {
    pub fn new(entries: impl IntoIterator<Item = (String, usize)>) -> Self {
        Self(Arc::new(
            entries
                .into_iter()
                .map(|(path, len)| (path, pattern(len)))
                .collect(),
        ))
    }

    pub fn get(&self, path: &str) -> Option<Bytes> {
        self.0.get(path).cloned()
    }
}

/// `len` bytes of a repeating, non-constant pattern.
pub fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
}

/// The in-process origin: `Cache-Control: public, max-age=3600`, an optional delay before the
/// response head, and the body streamed in chunks. It counts the requests it gets.
pub struct BenchOrigin {
    bodies: Bodies,
    delay: Duration,
    chunk: usize,
    requests: AtomicU64,
}

impl BenchOrigin {
    pub fn new(bodies: Bodies, delay: Duration, chunk: usize) -> Arc<Self> {
        Arc::new(Self {
            bodies,
            delay,
            chunk: chunk.max(1),
            requests: AtomicU64::new(0),
        })
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Upstream for BenchOrigin {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let body = self.bodies.get(req.uri().path());
        let (delay, chunk) = (self.delay, self.chunk);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let Some(body) = body else {
                let mut r = Response::new(full_upstream(Bytes::from_static(b"not found\n")));
                *r.status_mut() = StatusCode::NOT_FOUND;
                return Ok(r);
            };
            let len = body.len();
            let chunks: Vec<Bytes> = (0..len)
                .step_by(chunk)
                .map(|at| body.slice(at..len.min(at.saturating_add(chunk))))
                .collect();
            // One chunk per poll, as a socket would deliver them.
            let stream = futures_util::stream::iter(chunks).then(|c| async move {
                tokio::task::yield_now().await;
                Ok::<_, BoxError>(Frame::data(c))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            let h = r.headers_mut();
            h.insert(CACHE_CONTROL, HeaderValue::from_static(CACHEABLE));
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(CONTENT_LENGTH, HeaderValue::from(len));
            Ok(r)
        }
        .boxed()
    }
}

fn full_upstream(b: Bytes) -> UpstreamBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// The baseline: a plain hyper 1 server (hyper-util auto builder, HTTP/1 settings as the
/// edge's listener) answering with a fixed `Bytes` body and the origin's headers. Runs on the
/// current runtime until it is dropped.
pub async fn start_plain(bodies: Bodies) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let bodies = bodies.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = plain_response(&bodies, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder = builder.clone();
            tokio::spawn(async move {
                let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    addr
}

fn plain_response(bodies: &Bodies, path: &str) -> Response<Full<Bytes>> {
    let Some(body) = bodies.get(path) else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static(CACHEABLE));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// A running edge and the disk cache directory it owns.
pub struct Edge {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    pub dir: tempfile::TempDir,
}

/// Starts an edge in front of `origin` with a disk tier in a temporary directory and the given
/// memory tier size in bytes (the memory tier takes objects up to a eighth of it). Runs on the
/// current runtime until the runtime stops.
pub async fn start_edge(origin: Arc<BenchOrigin>, memory: u64) -> Edge {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "listen = \"127.0.0.1:0\"\n\
         origin = \"http://127.0.0.1:9\"\n\
         [cache]\n\
         dir = {dir:?}\n\
         memory = {memory}\n\
         disk = \"1GiB\"\n",
        dir = dir.path().display().to_string(),
    );
    let cfg = EdgeConfig::from_source(
        &Source::inline("bench-edge.toml", text),
        EdgeOverrides::default(),
    )
    .unwrap_or_else(|e| panic!("bench edge config: {e}"));
    let server = EdgeServer::bind_with(cfg, Clock::system(), Some(origin))
        .await
        .unwrap_or_else(|e| panic!("bench edge: {e}"));
    let addr = server.local_addr();
    let engine = server.engine();
    tokio::spawn(server.run(std::future::pending()));
    Edge { addr, engine, dir }
}

impl Edge {
    /// (objects, bytes) in the memory tier after housekeeping.
    pub async fn memory_usage(&self) -> (u64, u64) {
        self.engine.run_pending_tasks().await;
        let [(_, n, b), _] = self.engine.usage();
        (n, b)
    }

    /// (objects, bytes) in the disk tier after housekeeping.
    pub async fn disk_usage(&self) -> (u64, u64) {
        self.engine.run_pending_tasks().await;
        let [_, (_, n, b)] = self.engine.usage();
        (n, b)
    }
}
