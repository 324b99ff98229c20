//! Unit tests of the engine: no sockets, time as an input.
//!
//! One rig for every concern: an [`Origin`] in memory (scripted answers per path, a count of
//! what it is asked, answers held back until a [`Gate`] opens, failures), an engine over it
//! ([`Rig::memory`], [`Rig::disk`] in a temporary directory, [`Rig::reopen`] on the same one),
//! a manual [`Clock`], and [`Rig::get`] (or [`Rig::check`], which asserts too), which serves
//! one request and reads its whole answer.
//! Every wait is bounded ([`guard`], [`eventually`]): a broken engine fails a test, it never
//! hangs it.

mod coalesce;
mod fill;
mod purge;
mod push;
mod revalidate;
mod serve;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::key::{KeyOptions, NormalizedRequest};
pub(crate) use crate::status::CacheStatus::{self, Hit, Miss, Revalidated, Stale};
use crate::status::Tier;
use crate::upstream::{BoxError, Upstream, UpstreamBody, UpstreamError};
use crate::{CacheRequest, Engine, EngineConfig, Failure, Served, ServedBody};

/// The host every test request names.
pub(crate) const HOST: &str = "site.test";
/// The engine's `max_object_size`.
pub(crate) const MAX_OBJECT: u64 = 1 << 20;
/// Origin bodies arrive in chunks of this size, so fills stream several of them.
const CHUNK: usize = 16 * 1024;

/// `Cache-Control: max-age=60`.
pub(crate) const FRESH_60: Fields = &[("cache-control", "max-age=60")];

/// Header fields as `(name, value)` pairs.
pub(crate) type Fields<'a> = &'a [(&'a str, &'a str)];
/// What the origin answers one request.
pub(crate) type Reply = Result<Response<UpstreamBody>, UpstreamError>;
type Script = Arc<dyn Fn(&HeaderMap) -> Reply + Send + Sync>;

/// A header map of these fields.
pub(crate) fn fields(fields: Fields) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

/// A response whose body is these frames (data, or the error that ends it).
fn response(status: StatusCode, headers: HeaderMap, frames: Vec<Result<Bytes, BoxError>>) -> Reply {
    let frames = frames.into_iter().map(|f| f.map(Frame::data));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
        frames,
    ))));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// A response with this status, these fields and this body (in [`CHUNK`]s, with its
/// Content-Length unless the fields give one).
pub(crate) fn reply(status: u16, headers: Fields, body: impl Into<Bytes>) -> Reply {
    let body: Bytes = body.into();
    let mut map = fields(headers);
    if status != 304 && !map.contains_key(header::CONTENT_LENGTH) {
        map.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let frames = (0..body.len())
        .step_by(CHUNK)
        .map(|at| Ok(body.slice(at..body.len().min(at + CHUNK))))
        .collect();
    response(StatusCode::from_u16(status).expect("status"), map, frames)
}

/// A 200 with these fields and body.
pub(crate) fn ok(headers: Fields, body: impl Into<Bytes>) -> Reply {
    reply(200, headers, body)
}

/// A 200 that announces `len` bytes, sends `first`, then fails.
pub(crate) fn cut_short(headers: Fields, first: &'static [u8], len: u64) -> Reply {
    let mut map = fields(headers);
    map.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let frames = vec![
        Ok(Bytes::from_static(first)),
        Err("connection reset".into()),
    ];
    response(StatusCode::OK, map, frames)
}

/// How [`Origin::fail`] fails.
pub(crate) fn refused() -> UpstreamError {
    UpstreamError::Connect("refused".into())
}

/// Holds the origin's answers for one path until [`Gate::open`] (or until it is dropped).
pub(crate) struct Gate(watch::Sender<bool>);

impl Gate {
    pub(crate) fn open(&self) {
        self.0.send_replace(true);
    }
}

/// The in-memory origin. A path without a script answers 404 (not cacheable).
#[derive(Default)]
pub(crate) struct Origin {
    scripts: Mutex<HashMap<String, Script>>,
    gates: Mutex<HashMap<String, watch::Receiver<bool>>>,
    /// Every request asked: its path (and query) and headers.
    seen: Mutex<Vec<(String, HeaderMap)>>,
}

impl Origin {
    /// Answers `path` with what `script` makes of each request's headers.
    pub(crate) fn script(
        &self,
        path: &str,
        script: impl Fn(&HeaderMap) -> Reply + Send + Sync + 'static,
    ) {
        let mut scripts = self.scripts.lock().expect("scripts");
        scripts.insert(path.to_string(), Arc::new(script));
    }

    /// Answers `path` with a 200 of these fields and this body.
    pub(crate) fn serve(&self, path: &str, headers: Fields, body: &str) {
        let map = fields(headers);
        let body = Bytes::copy_from_slice(body.as_bytes());
        self.script(path, move |_| {
            let mut resp = ok(&[], body.clone())?;
            resp.headers_mut().extend(map.clone());
            Ok(resp)
        });
    }

    /// Answers `path` with a 200 of this body, fresh for 60 s.
    pub(crate) fn fresh(&self, path: &str, body: &str) {
        self.serve(path, FRESH_60, body);
    }

    /// Answers `path` with `Vary: Accept-Language` and a body that names the request's
    /// language: `hello in en`, or `hello in none`.
    pub(crate) fn greet_by_language(&self, path: &str) {
        self.script(path, |req| {
            let lang = req
                .get(header::ACCEPT_LANGUAGE)
                .map_or("none", |v| v.to_str().expect("ascii"));
            ok(
                &[FRESH_60[0], ("vary", "Accept-Language")],
                format!("hello in {lang}"),
            )
        });
    }

    /// Fails every request for `path` with [`refused`].
    pub(crate) fn fail(&self, path: &str) {
        self.script(path, |_| Err(refused()));
    }

    /// Holds the answers to requests for `path` asked from now on until the gate opens (a
    /// request already waiting stays on the gate it met).
    pub(crate) fn hold(&self, path: &str) -> Gate {
        let (tx, rx) = watch::channel(false);
        self.gates
            .lock()
            .expect("gates")
            .insert(path.to_string(), rx);
        Gate(tx)
    }

    /// How many requests for `path` were asked.
    pub(crate) fn calls(&self, path: &str) -> usize {
        self.requests(path).len()
    }

    /// The headers of each request for `path`, in order.
    pub(crate) fn requests(&self, path: &str) -> Vec<HeaderMap> {
        let seen = self.seen.lock().expect("seen");
        seen.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
            .collect()
    }
}

impl Upstream for Origin {
    fn fetch(&self, req: Request<UpstreamBody>) -> BoxFuture<'static, Reply> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let path = path.to_string();
        let script = self.scripts.lock().expect("scripts").get(&path).cloned();
        let answer = match script {
            Some(script) => script(req.headers()),
            None => reply(404, &[], "none"),
        };
        let gate = self.gates.lock().expect("gates").get(&path).cloned();
        self.seen
            .lock()
            .expect("seen")
            .push((path, req.headers().clone()));
        async move {
            if let Some(mut gate) = gate {
                // An error means the gate was dropped: answer then.
                let _ = gate.wait_for(|open| *open).await;
            }
            answer
        }
        .boxed()
    }
}

/// What one request got, its body read to the end.
pub(crate) struct Answer {
    pub cache: CacheStatus,
    pub status: StatusCode,
    pub tier: Tier,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body stream failed after `body`.
    pub body_error: Option<String>,
    pub failure: Option<Failure>,
    pub upstream_error: Option<UpstreamError>,
}

impl std::fmt::Debug for Answer {
    /// The body's length and its first bytes only: some bodies are a megabyte.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let start = &self.body[..self.body.len().min(40)];
        f.debug_struct("Answer")
            .field("cache", &self.cache)
            .field("status", &self.status)
            .field("tier", &self.tier)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("body_start", &String::from_utf8_lossy(start))
            .field("body_error", &self.body_error)
            .field("failure", &self.failure)
            .field("upstream_error", &self.upstream_error)
            .finish()
    }
}

impl Answer {
    /// Asserts the cache outcome and the body.
    #[track_caller]
    pub(crate) fn expect(&self, cache: CacheStatus, body: &str) {
        assert_eq!(self.cache, cache, "{self:?}");
        assert!(
            self.body == body.as_bytes(),
            "expected a body of {} bytes: {self:?}",
            body.len()
        );
        assert_eq!(self.body_error, None);
    }

    /// Asserts an answer without an object, for this reason.
    #[track_caller]
    pub(crate) fn expect_failure(&self, failure: Failure) {
        assert_eq!(
            (self.cache, self.status, self.body.len()),
            (CacheStatus::Error, failure.status(), 0),
            "{self:?}"
        );
        assert_eq!(self.failure, Some(failure));
    }
}

/// Reads an answer's whole body (each chunk bounded by [`guard`]).
pub(crate) async fn answer(served: Served) -> Answer {
    let mut body = Vec::new();
    let mut body_error = None;
    match served.body {
        ServedBody::Empty => {}
        ServedBody::Full(b) => body.extend_from_slice(&b),
        ServedBody::Stream { mut stream, .. } => {
            while let Some(chunk) = guard(stream.next()).await {
                match chunk {
                    Ok(c) => body.extend_from_slice(&c),
                    Err(e) => {
                        body_error = Some(e.to_string());
                        break;
                    }
                }
            }
        }
    }
    Answer {
        cache: served.cache,
        status: served.status,
        tier: served.tier,
        headers: served.headers,
        body: body.into(),
        body_error,
        failure: served.failure,
        upstream_error: served.upstream_error,
    }
}

/// A GET for `path` on [`HOST`] with these fields, as the proxy hands it to the engine.
pub(crate) fn request(path: &str, headers: Fields) -> CacheRequest {
    let mut headers = fields(headers);
    headers.insert(header::HOST, HeaderValue::from_static(HOST));
    cache_request(path.parse().expect("path"), headers)
}

/// A GET for this URI and these headers (with Host), sent upstream as it came.
pub(crate) fn cache_request(uri: Uri, headers: HeaderMap) -> CacheRequest {
    let norm = NormalizedRequest::new(&Method::GET, &uri, &headers, &KeyOptions::default())
        .expect("normalised");
    let mut upstream = Request::new(());
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers;
    CacheRequest {
        norm,
        method: Method::GET,
        upstream: upstream.into_parts().0,
        default_ttl: None,
    }
}

/// Bounds a wait: a test fails after a few seconds rather than hanging.
pub(crate) async fn guard<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("the engine did not answer within 5 s")
}

/// Waits (briefly, bounded) until `cond` holds.
pub(crate) async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..5000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never happened: {what}");
}

fn config(dir: Option<&Path>) -> EngineConfig {
    EngineConfig {
        memory_bytes: 64 << 20,
        disk: dir.map(|d| (d.to_path_buf(), 64 << 20)),
        max_object_size: MAX_OBJECT,
        surrogate_name: "outpost".into(),
        targeted_cache_control: crate::default_targeted_cache_control(),
        stale_on_error: std::time::Duration::ZERO,
        revalidations_per_sec: 10,
        stale_if_error_wait: Duration::ZERO,
        send_timeout: Duration::from_secs(60),
        negative_ttl: Default::default(),
        prefresh: 0.0,
        disk_admission: Default::default(),
    }
}

/// An engine over an [`Origin`], with a manual clock.
pub(crate) struct Rig {
    pub engine: Arc<Engine>,
    pub origin: Arc<Origin>,
    pub clock: Clock,
    dir: Option<tempfile::TempDir>,
}

impl Rig {
    /// An engine with a memory tier only.
    pub(crate) async fn memory() -> Self {
        Self::open(Arc::default(), Clock::manual(), None).await
    }

    /// An engine with memory and disk tiers in a fresh temporary directory.
    pub(crate) async fn disk() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::open(Arc::default(), Clock::manual(), Some(dir)).await
    }

    /// An engine with memory and disk tiers in a fresh temporary directory, its configuration
    /// changed by `change`.
    pub(crate) async fn disk_with(change: impl FnOnce(&mut EngineConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = config(Some(dir.path()));
        change(&mut cfg);
        Self::open_with(cfg, Arc::default(), Clock::manual(), Some(dir)).await
    }

    async fn open(origin: Arc<Origin>, clock: Clock, dir: Option<tempfile::TempDir>) -> Self {
        let cfg = config(dir.as_ref().map(|d| d.path()));
        Self::open_with(cfg, origin, clock, dir).await
    }

    async fn open_with(
        cfg: EngineConfig,
        origin: Arc<Origin>,
        clock: Clock,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        let engine = Engine::open(cfg, origin.clone(), clock.clone())
            .await
            .expect("engine opens");
        Self {
            engine,
            origin,
            clock,
            dir,
        }
    }

    /// Stops this engine once its fills have settled and opens a new one on the same
    /// directory, origin and clock (a restart).
    pub(crate) async fn reopen(self) -> Self {
        self.settle().await;
        let Rig {
            engine,
            origin,
            clock,
            dir,
        } = self;
        drop(engine);
        Self::open(origin, clock, dir).await
    }

    /// Waits until no fill runs, not even one a newer fill replaced (what they store is then
    /// visible in every tier): every fill task holds the engine, so only the rig does then.
    /// Every fill has ended and every disk write it queued is committed (a small body's
    /// disk copy commits after its fill ends: the memory tier answers meanwhile).
    pub(crate) async fn settle(&self) {
        eventually("every fill settles", || {
            self.engine.fills.is_empty() && Arc::strong_count(&self.engine) == 1
        })
        .await;
        if let Some(disk) = &self.engine.disk {
            disk.flush().await;
        }
    }

    pub(crate) fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        self.get_with(path, &[]).await
    }

    pub(crate) async fn get_with(&self, path: &str, headers: Fields<'_>) -> Answer {
        guard(async { answer(self.engine.serve(request(path, headers)).await).await }).await
    }

    /// GETs `path` and asserts the outcome and the body.
    pub(crate) async fn check(&self, path: &str, cache: CacheStatus, body: &str) -> Answer {
        self.check_with(path, &[], cache, body).await
    }

    /// GETs `path` with these fields and asserts the outcome and the body.
    pub(crate) async fn check_with(
        &self,
        path: &str,
        headers: Fields<'_>,
        cache: CacheStatus,
        body: &str,
    ) -> Answer {
        let a = self.get_with(path, headers).await;
        assert_eq!(a.cache, cache, "GET {path} {headers:?}: {a:?}");
        a.expect(cache, body);
        a
    }

    /// Starts a GET on a task of its own (a concurrent client).
    pub(crate) fn spawn_get(&self, path: &str, headers: Fields) -> JoinHandle<Answer> {
        let engine = self.engine.clone();
        let req = request(path, headers);
        tokio::spawn(async move { answer(engine.serve(req).await).await })
    }

    /// Requests served by joining a fill another request started.
    pub(crate) fn coalesced(&self) -> u64 {
        self.engine
            .stats
            .coalesced
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Objects held in (memory, disk), after housekeeping.
    pub(crate) async fn objects(&self) -> (u64, u64) {
        self.engine.run_pending_tasks().await;
        let [(_, memory, _), (_, disk, _)] = self.engine.usage();
        (memory, disk)
    }
}

/// Awaits every task's answer.
pub(crate) async fn answers(tasks: Vec<JoinHandle<Answer>>) -> Vec<Answer> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(guard(t).await.expect("the request task panicked"));
    }
    out
}
