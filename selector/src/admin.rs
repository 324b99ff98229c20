//! The selector's admin listener: `/metrics` (Prometheus), `/nodes` (JSON), `/healthz` and
//! `/readyz` (200 while some node is up, so a layer above can route around a selector that has
//! nowhere to send traffic).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use outpost_net::{AcceptWarnings, Activity, Metered, Sending, Timeouts};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::debug;

use crate::health::HealthState;
use crate::pool::Pool;

/// The `/nodes` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodesReport {
    pub policy: String,
    pub nodes: Vec<NodeStatus>,
}

/// One node in `/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub address: SocketAddr,
    pub admin: SocketAddr,
    pub region: Option<String>,
    pub weight: u32,
    /// True when the node takes new connections.
    pub healthy: bool,
    /// `up`, `down` or `draining`.
    pub state: String,
    /// Why the node is not up, when it is not.
    pub reason: Option<String>,
    /// Smoothed probe round-trip time; none before the first answered probe.
    pub latency_ms: Option<f64>,
    /// Connections spliced to the node now.
    pub active: u64,
    /// Connections spliced to the node since start.
    pub total: u64,
    /// `total` over the sum of every node's `total` (0 when no connection yet).
    pub share: f64,
    pub connect_failures: u64,
}

pub(crate) fn report(pool: &Pool) -> NodesReport {
    let all: u64 = pool.nodes.iter().map(|n| n.total()).sum();
    NodesReport {
        policy: pool.policy.kind().as_str().to_string(),
        nodes: pool
            .nodes
            .iter()
            .map(|n| {
                let state = n.state();
                NodeStatus {
                    name: n.spec.name.clone(),
                    address: n.spec.address,
                    admin: n.spec.admin,
                    region: n.spec.location.as_ref().and_then(|l| l.region.clone()),
                    weight: n.weight(),
                    healthy: state == HealthState::Up,
                    state: state.as_str().to_string(),
                    reason: n.reason(),
                    latency_ms: n.srtt().map(|d| d.as_secs_f64() * 1e3),
                    active: n.active(),
                    total: n.total(),
                    share: if all == 0 {
                        0.0
                    } else {
                        n.total() as f64 / all as f64
                    },
                    connect_failures: n.metrics.connect_failures.get(),
                }
            })
            .collect(),
    }
}

/// Bounds of the admin listener's connections (see `conn`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: usize,
    /// For a new connection's first bytes, then for each HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// Serves the admin port until `stop` changes or its sender drops. Connections still open
/// then are closed with it.
pub(crate) async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // A peer that stops answering PINGs is dropped; one that answers them is bounded by the
    // idle timeout.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut warnings = AcceptWarnings::new("admin");
    let mut conns = JoinSet::new();
    'accept: loop {
        // A slot first: past the cap, new connections wait in the kernel's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stop.changed() => break,
        };
        let accepted = loop {
            tokio::select! {
                r = listener.accept() => break r,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = stop.changed() => break 'accept,
            }
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                outpost_net::serve_socket(&tcp);
                tcp
            }
            Err(e) => {
                // EMFILE and friends: back off a little, never stop serving.
                warnings.failed(&e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let pool = pool.clone();
        let builder = builder.clone();
        conns.spawn(async move {
            let _slot = slot;
            let Some(io) = outpost_net::opening(tcp, limits.header_read_timeout, None).await else {
                return;
            };
            let activity = Arc::new(Activity::default());
            let requests = activity.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let _in_flight = requests.begin();
                let resp =
                    respond(&req, &pool).map(|b| Sending::new(b, requests.clone(), req.version()));
                std::future::ready(Ok::<_, Infallible>(resp))
            });
            let io = Metered::new(io, activity.clone());
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let bounds = Timeouts {
                idle: limits.idle_timeout,
                send: limits.idle_timeout,
            };
            let served = outpost_net::serve_http(conn, &activity, bounds, std::future::pending());
            if let Err(e) = served.await {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

fn respond(req: &Request<Incoming>, pool: &Pool) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let accept = req.headers().get_all(header::ACCEPT);
            let (body, content_type) = outpost_net::exposition::negotiate(
                accept.iter().filter_map(|v| v.to_str().ok()),
                pool.metrics.render(),
            );
            reply(StatusCode::OK, content_type, body)
        }
        "/nodes" => {
            let body = serde_json::to_string_pretty(&report(pool)).unwrap_or_default() + "\n";
            reply(StatusCode::OK, "application/json", body)
        }
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" if pool.any_up() => text(StatusCode::OK, "ready"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "no node is up"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: the selector's admin port serves /metrics, /nodes, /healthz and /readyz",
        ),
    }
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", format!("{msg}\n"))
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}
