//! The admin listener: `/healthz` (liveness), `/readyz` (503 while draining, and in fleet mode
//! until the node has caught up with the fleet's purges), `/metrics` (OpenMetrics), `/stats`
//! (JSON with rolling windows), `/usage`, `/fleet` (fleet mode: every node and its lag), and `/`
//! (the status page).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::cache::Engine;
use crate::error::EdgeError;
use crate::observe::metrics::{
    CACHE_LABELS, EdgeMetrics, ORIGIN_ERROR_LABELS, STATUS_CLASSES, hit_ratio,
};
use crate::observe::window::{Point, WindowStats, Windows};
use crate::tls::TlsState;
use outpost_http::body::{RespBody, full, json, plain};
use outpost_purge_api::AdminError;

/// The status page: self-contained HTML, CSS and JS (no asset from the internet); it polls
/// `/stats` every second and draws the last 15 minutes on a canvas.
const STATUS_PAGE: &str = include_str!("observe/status.html");

/// What the admin handlers read.
pub struct AdminState {
    pub engine: Arc<Engine>,
    pub metrics: Arc<EdgeMetrics>,
    pub windows: Arc<Windows>,
    pub draining: Arc<AtomicBool>,
    pub role: &'static str,
    pub memory_capacity: u64,
    pub disk_capacity: Option<u64>,
    pub operator: crate::operator::EdgeOperator,
    pub auth: crate::operator::SharedAuth,
    pub limits: outpost_purge_api::AdminLimits,
    /// `/metrics`, `/stats` and the status page need no token (reloadable).
    pub public_metrics: Arc<AtomicBool>,
    /// The HTTPS listener's certificates, for `POST /tls/reload`.
    pub tls: Option<Arc<crate::tls::TlsState>>,
    /// `limits.degraded_after` (0: `/readyz` never says degraded).
    pub degraded_after: Duration,
    /// The live request stream (`/log`, `outpost log`).
    pub live: Arc<crate::observe::live_log::LiveLog>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct TierStats {
    pub tier: String,
    pub objects: u64,
    pub bytes: u64,
    pub capacity: Option<u64>,
}

/// The `/stats` document.
#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct Stats {
    pub node: String,
    pub role: String,
    pub uptime_seconds: u64,
    pub requests: std::collections::BTreeMap<String, u64>,
    pub hit_ratio: Option<f64>,
    pub byte_hit_ratio: Option<f64>,
    pub windows: Vec<WindowStats>,
    pub tiers: Vec<TierStats>,
    /// What became of storable responses on their way to disk (`outpost_disk_admissions`);
    /// empty without a disk tier.
    #[serde(default)]
    pub disk_admissions: std::collections::BTreeMap<String, u64>,
    /// The disk tier's start-up load of its index (it serves while loading); `None` without
    /// a disk tier.
    #[serde(default)]
    pub disk_load: Option<DiskLoad>,
    /// The disk tier's index of stored objects in memory: at its limit (a share of
    /// `--memory`), the disk tier evicts with disk to spare. `None` without a disk tier.
    #[serde(default)]
    pub disk_index: Option<DiskIndex>,
    pub top_missed: Vec<Missed>,
    pub series: Vec<Point>,
    /// Responses sent to clients, by status class (`outpost_responses`).
    #[serde(default)]
    pub responses: std::collections::BTreeMap<String, u64>,
    /// Upstream requests that failed before a response, by kind (`outpost_origin_errors`).
    #[serde(default)]
    pub origin_errors: std::collections::BTreeMap<String, u64>,
    /// Each upstream, and how long it has failed without answering.
    #[serde(default)]
    pub upstreams: Vec<crate::observe::upstreams::UpstreamState>,
    /// Why `/readyz` says degraded, when it does.
    #[serde(default)]
    pub degraded: Option<String>,
    /// The origins of a failover group (`fallback_origins`); empty with one origin.
    #[serde(default)]
    pub origins: Vec<crate::observe::upstreams::OriginReport>,
    /// Client connections open on the data listener.
    #[serde(default)]
    pub connections_open: u64,
    /// TLS handshakes on the HTTPS listener, when there is one.
    #[serde(default)]
    pub tls_handshakes: Option<crate::tls::HandshakeStats>,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone, Copy)]
pub struct DiskLoad {
    pub done: bool,
    /// Objects indexed by the load so far.
    pub loaded: u64,
    /// How long the load took, once done.
    pub millis: u64,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone, Copy)]
pub struct DiskIndex {
    pub memory_bytes: u64,
    pub memory_limit: u64,
    /// False while the index has failed (an I/O error) and is not open again yet.
    #[serde(default = "open_by_default")]
    pub open: bool,
    /// Times the index failed and was closed to be opened again since start.
    #[serde(default)]
    pub reopens: u64,
}

/// An earlier version's `/stats` says nothing of the index failing: it was open.
fn open_by_default() -> bool {
    true
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct Missed {
    pub url: String,
    pub misses: u64,
}

impl AdminState {
    fn stats(&self) -> Stats {
        let totals = self.metrics.totals();
        let bytes = self.metrics.bytes();
        let usage = self.engine.usage();
        Stats {
            node: self.metrics.node.clone(),
            role: self.role.to_string(),
            uptime_seconds: self.metrics.started.elapsed().as_secs(),
            requests: CACHE_LABELS
                .iter()
                .map(|l| l.to_string())
                .zip(totals)
                .collect(),
            hit_ratio: hit_ratio(&totals),
            byte_hit_ratio: hit_ratio(&bytes),
            windows: [60, 300, 900]
                .iter()
                .map(|s| self.windows.window(*s))
                .collect(),
            tiers: vec![
                TierStats {
                    tier: "memory".into(),
                    objects: usage[0].1,
                    bytes: usage[0].2,
                    capacity: Some(self.memory_capacity),
                },
                TierStats {
                    tier: "disk".into(),
                    objects: usage[1].1,
                    bytes: usage[1].2,
                    capacity: self.disk_capacity,
                },
            ],
            disk_admissions: if self.engine.has_disk() {
                crate::cache::status::DiskAdmission::LABELS
                    .iter()
                    .map(|l| l.to_string())
                    .zip(self.engine.stats.disk_admissions())
                    .collect()
            } else {
                Default::default()
            },
            disk_load: self.engine.disk_load().map(|l| DiskLoad {
                done: l.done,
                loaded: l.loaded,
                millis: l.millis,
            }),
            disk_index: self
                .engine
                .disk_index_memory()
                .zip(self.engine.disk_index_health())
                .map(
                    |((memory_bytes, memory_limit), (open, reopens))| DiskIndex {
                        memory_bytes,
                        memory_limit,
                        open,
                        reopens,
                    },
                ),
            top_missed: self
                .metrics
                .top_missed(10)
                .into_iter()
                .map(|(url, misses)| Missed { url, misses })
                .collect(),
            series: self.windows.series(),
            responses: STATUS_CLASSES
                .iter()
                .map(|c| c.to_string())
                .zip(self.metrics.classes())
                .collect(),
            origin_errors: ORIGIN_ERROR_LABELS
                .iter()
                .map(|k| k.to_string())
                .zip(
                    self.metrics
                        .origin_errors
                        .iter()
                        .map(|v| v.load(Ordering::Relaxed)),
                )
                .collect(),
            upstreams: self.metrics.upstreams.states(),
            degraded: self.degraded(),
            origins: self.metrics.upstreams.origin_reports(),
            connections_open: self.metrics.open_connections(),
            tls_handshakes: self.metrics.tls_handshakes(),
        }
    }

    /// `GET /log?status=5xx&cache=MISS&url_prefix=/assets/`: answered requests as JSON lines,
    /// as they happen (`outpost log`). Full URLs with their query strings: the read scope is
    /// needed even where `/metrics` is public.
    fn live_log(&self, req: &Request<Incoming>) -> Response<RespBody> {
        if let Err(e) = self
            .auth
            .load()
            .check(req.headers(), outpost_purge_api::Scope::Read)
        {
            return admin_error(AdminError::Auth(e));
        }
        if req.method() != Method::GET {
            return admin_error(AdminError::MethodNotAllowed {
                path: "/log",
                allow: "GET",
            });
        }
        let filter = match crate::observe::live_log::Filter::parse(req.uri().query()) {
            Ok(f) => f,
            Err(e) => return admin_error(AdminError::bad_request(format!("/log: {e}"))),
        };
        let Some(stream) = self.live.watch(filter) else {
            return admin_error(AdminError::Unavailable(format!(
                "/log: {} streams are open already",
                crate::observe::live_log::MAX_WATCHERS
            )));
        };
        let body = http_body_util::StreamBody::new(futures_util::StreamExt::map(stream, |r| {
            r.map(hyper::body::Frame::data)
        }));
        let mut r = Response::new(RespBody::boxed(body));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }

    /// "every upstream has failed for 42 s" once that has lasted `degraded_after`: the node
    /// still serves what it holds (stale copies included), so `/readyz` stays 200 and says so.
    fn degraded(&self) -> Option<String> {
        if self.degraded_after.is_zero() {
            return None;
        }
        let d = self.metrics.upstreams.all_failing_for()?;
        (d >= self.degraded_after).then(|| {
            format!(
                "every upstream has failed for {} s without an answer; serving what this node holds",
                d.as_secs()
            )
        })
    }

    /// Routes one admin request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<RespBody> {
        let path = req.uri().path().to_string();
        if outpost_purge_api::owns(&path) {
            let auth = self.auth.load_full();
            return outpost_purge_api::handle(req, &self.operator, &auth, &self.limits)
                .await
                .map(|r| r.map(RespBody::boxed))
                .unwrap_or_else(|| admin_error(AdminError::NotFound(path)));
        }
        let read_only = matches!(
            path.as_str(),
            "/" | "/status" | "/metrics" | "/stats" | "/usage" | "/fleet" | "/origins"
        );
        if read_only
            && !self.public_metrics.load(Ordering::Relaxed)
            && let Err(e) = self
                .auth
                .load()
                .check(req.headers(), outpost_purge_api::Scope::Read)
        {
            return admin_error(AdminError::Auth(e));
        }
        match path.as_str() {
            "/" | "/status" => {
                let mut r = Response::new(full(Bytes::from_static(STATUS_PAGE.as_bytes())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r
            }
            "/healthz" => plain(StatusCode::OK, "ok"),
            "/readyz" if self.draining.load(Ordering::Relaxed) => {
                plain(StatusCode::SERVICE_UNAVAILABLE, "draining")
            }
            "/readyz" => match &self.operator.fleet {
                Some(fleet) if !fleet.ready() => {
                    let (applied, last) = fleet.progress();
                    plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "catching up with the fleet's purges: applied {applied} of {last}"
                        ),
                    )
                }
                _ => match self.degraded() {
                    Some(why) => plain(StatusCode::OK, &format!("degraded: {why}")),
                    None => plain(StatusCode::OK, "ready"),
                },
            },
            "/log" => self.live_log(&req),
            "/origins" => json(&self.metrics.upstreams.origin_reports()),
            p if p.starts_with("/fleet/nodes/") => {
                self.forget_node(&req, &p["/fleet/nodes/".len()..]).await
            }
            "/fleet" => match &self.operator.fleet {
                Some(fleet) => json(&fleet.status()),
                None => admin_error(AdminError::NotFound(
                    "/fleet: this node is not in a fleet (no [fleet] section)".into(),
                )),
            },
            "/metrics" => {
                let accept = req.headers().get_all(header::ACCEPT);
                let (body, content_type) = outpost_net::exposition::negotiate(
                    accept.iter().filter_map(|v| v.to_str().ok()),
                    self.metrics.encode(),
                );
                let mut r = Response::new(full(Bytes::from(body)));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                r
            }
            "/stats" => json(&self.stats()),
            "/tls/reload" => tls_reload(
                self.tls.as_deref(),
                &self.auth.load(),
                req.method(),
                req.headers(),
            ),
            "/usage" => {
                let body = self
                    .engine
                    .usage()
                    .iter()
                    .map(|(tier, n, b)| format!("{} objects={n} bytes={b}", tier.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n");
                let mut r = Response::new(full(Bytes::from(body + "\n")));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                r
            }
            _ => admin_error(AdminError::NotFound(format!(
                "{path} (the admin port serves /, /healthz, /readyz, /metrics, /stats, /usage, /log, /origins, /fleet, /purge, /objects and /tls/reload)"
            ))),
        }
    }
}

impl AdminState {
    /// `DELETE /fleet/nodes/<name>` (the `purge` scope): a node that left the fleet for good
    /// stops holding up receipts. 404 when the fleet does not know it; 400 for this node.
    async fn forget_node(&self, req: &Request<Incoming>, node: &str) -> Response<RespBody> {
        if req.method() != http::Method::DELETE {
            return admin_error(AdminError::MethodNotAllowed {
                path: "/fleet/nodes/<name>",
                allow: "DELETE",
            });
        }
        if let Err(e) = self
            .auth
            .load()
            .check(req.headers(), outpost_purge_api::Scope::Purge)
        {
            return admin_error(AdminError::Auth(e));
        }
        let Some(fleet) = &self.operator.fleet else {
            return admin_error(AdminError::NotFound(
                "/fleet: this node is not in a fleet (no [fleet] section)".into(),
            ));
        };
        if node == fleet.node() {
            return admin_error(AdminError::bad_request(
                "this is the node you are asking: stop it, then forget it from another node",
            ));
        }
        match fleet.forget(node).await {
            Ok(true) => plain(StatusCode::OK, &format!("{node} forgotten\n")),
            Ok(false) => admin_error(AdminError::NotFound(format!(
                "/fleet/nodes/{node}: the fleet has no such node"
            ))),
            Err(e) => admin_error(AdminError::Unavailable(format!(
                "NATS did not take the change: {e}"
            ))),
        }
    }
}

/// Every admin error is JSON ([`outpost_purge_api::error_response`]).
fn admin_error(e: AdminError) -> Response<RespBody> {
    crate::error::error_response(&EdgeError::Admin(e), "")
}

/// `POST /tls/reload` on the admin port: re-reads the certificate files. Needs a token with
/// the `push` scope (unless the admin API is open). 200 with the certificates now served;
/// 422 with the reason when the new files are broken (the running certificates stay); 404
/// when this node has no TLS listener.
fn tls_reload(
    tls: Option<&TlsState>,
    auth: &outpost_purge_api::Auth,
    method: &Method,
    headers: &HeaderMap,
) -> Response<RespBody> {
    if method != Method::POST {
        return admin_error(AdminError::MethodNotAllowed {
            path: "/tls/reload",
            allow: "POST",
        });
    }
    if let Err(e) = auth.check(headers, outpost_purge_api::Scope::Push) {
        return admin_error(AdminError::Auth(e));
    }
    let Some(tls) = tls else {
        return admin_error(AdminError::NotFound(
            "this node has no TLS listener (set [tls] in its config)".into(),
        ));
    };
    #[derive(Serialize)]
    struct Reloaded {
        reloaded: bool,
        certs: Vec<crate::tls::CertSummary>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    }
    let (status, body) = match tls.reload() {
        Ok(certs) => (
            StatusCode::OK,
            Reloaded {
                reloaded: true,
                certs,
                error: None,
            },
        ),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Reloaded {
                reloaded: false,
                certs: tls.certs(),
                error: Some(format!("{e} (the running certificates are kept)")),
            },
        ),
    };
    let mut r = json(&body);
    *r.status_mut() = status;
    r
}

/// Serves the admin listener until `stop` turns true.
/// Bounds of the admin listener's connections (see [`outpost_net`] and [`crate::drain`]).
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// For a new connection's first request and every request head after it.
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose client takes no byte of a response for this long is dropped.
    pub send_timeout: Duration,
    pub max_connections: usize,
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: AdminLimits,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let drain = crate::drain::Drain::new();
    let mut warnings = outpost_net::AcceptWarnings::new("admin");
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            _ = stop.changed() => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                outpost_net::serve_socket(&tcp);
                tcp
            }
            Err(e) => {
                let _ = warnings.failed(&e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let state = state.clone();
        let builder = builder.clone();
        let watcher = drain.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(io) = outpost_net::opening(tcp, limits.header_timeout, Some(16 << 10)).await
            else {
                return;
            };
            let activity = Arc::new(outpost_net::Activity::default());
            let conn_activity = activity.clone();
            let closes = state.metrics.admin_closes.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let activity = conn_activity.clone();
                let in_flight = activity.begin();
                let version = req.version();
                async move {
                    let resp = state.handle(req).await;
                    // In flight until its body is sent: a `/log` stream is not an idle
                    // connection. What waits on the client counts for the send timeout.
                    Ok::<_, Infallible>(resp.map(|b| {
                        outpost_net::Sending::new(
                            RespBody::boxed(Held::new(b, in_flight)),
                            activity,
                            version,
                        )
                    }))
                }
            });
            let io = outpost_net::Metered::new(io, activity.clone());
            let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
            let bounds = outpost_net::Timeouts {
                idle: limits.idle_timeout,
                send: limits.send_timeout,
            };
            if let Err(e) = watcher
                .watch_idle(conn, Some((activity, bounds, closes)))
                .await
            {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// A body that holds something (a connection's in-flight guard) until it is dropped.
    struct Held<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> Held<B, G> {
    fn new(inner: B, guard: G) -> Self {
        Self { inner, guard }
    }
}

impl<B: hyper::body::Body, G> hyper::body::Body for Held<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
