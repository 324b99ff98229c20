//! Listeners: the data port (HTTP/1.1 and h2c) and the admin port (`/healthz`, `/readyz`).
//! Each connection runs in its own task; accept errors (EMFILE and friends) are logged and the
//! loop goes on. Shutdown stops accepting, lets in-flight requests finish (bounded by the drain
//! timeout), then returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::Either;
use http::Request;
use http::header::HeaderValue;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use outpost_net::{Metered, Sending, Timeouts};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::admin::AdminState;
use crate::cache::clock::Clock;
use crate::cache::key::KeyOptions;
use crate::cache::upstream::Upstream;
use crate::cache::{Engine, EngineConfig};
use crate::config::EdgeConfig;
use crate::observe::metrics::EdgeMetrics;
use crate::observe::window::Windows;
use crate::proxy::Client;
use crate::proxy::Proxy;
use crate::proxy::http_client::{HyperUpstream, UpstreamConfig};
use crate::proxy::respond::Identity;
use crate::proxy::shield::ShieldUpstream;

/// Streams an HTTP/2 client may have open at once on one connection (nginx's
/// `http2_max_concurrent_streams`; hyper's default is 200). Each may hold a disk stream's file
/// and chunks, a fill's reader, a compression job: what one connection can hold is this many
/// requests' worth, so it is kept to what browsers use (they open far fewer).
pub const MAX_H2_STREAMS: u32 = 128;

/// A bound, ready edge node.
pub struct EdgeServer {
    cfg: EdgeConfig,
    auth: crate::operator::SharedAuth,
    public_metrics: Arc<AtomicBool>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// The HTTPS listener and its TLS state (`[tls]`).
    tls: Option<(TcpListener, Arc<crate::tls::TlsState>)>,
    proxy: Arc<Proxy>,
    /// Purges and pushes, for the admin port and the data port's PURGE.
    operator: crate::operator::EdgeOperator,
    draining: Arc<AtomicBool>,
}

/// Why an edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin token: {0}")]
    Token(String),
    #[error("fleet: {0}")]
    Fleet(String),
    #[error(
        "refusing to serve the admin API on {0} without a token: set [admin] tokens in the config or OUTPOST_ADMIN_TOKEN, or listen on a loopback address"
    )]
    OpenAdmin(SocketAddr),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot open the disk cache at {dir}: {source} (check that the directory is writable)")]
    Disk { dir: String, source: std::io::Error },
    #[error("cannot open the access log {path}: {source} (check [access_log] path)")]
    AccessLog {
        path: String,
        source: std::io::Error,
    },
}

impl EdgeServer {
    /// Opens the cache and binds the listeners.
    pub async fn bind(cfg: EdgeConfig) -> Result<Self, StartError> {
        Self::bind_with(cfg, Clock::system(), None).await
    }

    /// Like [`bind`](Self::bind), with an injected clock and optionally an upstream (tests).
    pub async fn bind_with(
        cfg: EdgeConfig,
        clock: Clock,
        upstream: Option<Arc<dyn Upstream>>,
    ) -> Result<Self, StartError> {
        let auth = outpost_purge_api::Auth::from_config_and_env(cfg.admin_tokens.clone())
            .map_err(|e| StartError::Token(e.to_string()))?;
        if let Some(admin) = cfg.admin_listen
            && auth.is_open()
            && !admin.ip().is_loopback()
        {
            return Err(StartError::OpenAdmin(admin));
        }
        let auth: crate::operator::SharedAuth = Arc::new(arc_swap::ArcSwap::from_pointee(auth));
        let peer_token = cfg
            .admin_tokens
            .iter()
            .find(|t| t.scopes.contains(&outpost_purge_api::Scope::Purge))
            .map(|t| t.secret.clone())
            .or_else(|| std::env::var(outpost_purge_api::ADMIN_TOKEN_ENV).ok());
        let metrics = EdgeMetrics::new(&cfg.name);
        metrics.attach_compression(cfg.compression.stats.clone());
        let https_upstream = std::iter::once(&cfg.origin)
            .chain(cfg.shields.iter().map(|s| &s.url))
            .any(|u| u.scheme_str() == Some("https"));
        let upstream_tls = if upstream.is_none() && https_upstream {
            if cfg.upstream_tls.insecure_skip_verify {
                warn!(
                    "[upstream] insecure_skip_verify = true: the certificates of https origins and shields are NOT verified; anyone on the path can impersonate them (use ca_file instead)"
                );
            }
            Some(
                crate::tls::UpstreamTls::new(&cfg.upstream_tls, &cfg.origin)
                    .map_err(StartError::Tls)?,
            )
        } else {
            None
        };
        let upstream: Arc<dyn Upstream> = upstream.unwrap_or_else(|| {
            let origin = UpstreamConfig {
                origin: cfg.origin.clone(),
                connect_timeout: cfg.upstream_connect_timeout,
                first_byte_timeout: cfg.upstream_first_byte_timeout,
                body_timeout: cfg.upstream_body_timeout,
                breaker_failures: cfg.origin_breaker_failures,
                breaker_cooldown: cfg.origin_breaker_cooldown,
                max_connections: cfg.upstream_max_connections,
                queue_wait: cfg.upstream_queue_wait,
                metrics: Some(metrics.clone()),
                tls: upstream_tls,
            };
            if cfg.shields.is_empty() && !cfg.failover.fallbacks.is_empty() {
                crate::proxy::origins::OriginGroup::start(&origin, cfg.failover.clone())
            } else if cfg.shields.is_empty() {
                Arc::new(HyperUpstream::new(&origin))
            } else {
                ShieldUpstream::start(
                    cfg.shields.clone(),
                    &origin,
                    cfg.shield_health_interval,
                    cfg.shield_balance,
                )
            }
        });
        // Compression's share of `--memory` comes out of the cache's (see `compress::memory`).
        let (engine_memory, compression_memory) = if cfg.compression.enabled {
            let share = crate::compress::memory::share(cfg.memory);
            let needs = crate::compress::memory::brotli_job_max(&cfg.compression);
            if needs > share {
                warn!(
                    brotli_quality = cfg.compression.brotli_quality,
                    needs_mib = needs >> 20,
                    share_mib = share >> 20,
                    "brotli at this quality needs more memory per response than compression's share of cache.memory: such responses go out uncompressed to clients that prefer br (outpost_compression_skipped_total); lower compression.brotli_quality or raise cache.memory"
                );
            }
            (crate::compress::memory::engine_memory(cfg.memory), share)
        } else {
            (cfg.memory, 0)
        };
        let engine = Engine::open(
            EngineConfig {
                memory_bytes: engine_memory,
                disk: cfg.cache_dir.clone().map(|d| (d, cfg.disk)),
                max_object_size: cfg.max_object_size,
                surrogate_name: cfg.name.clone(),
                targeted_cache_control: cfg.targeted_cache_control.clone().into(),
                stale_on_error: cfg.stale_on_error,
                revalidations_per_sec: 100,
                stale_if_error_wait: cfg.stale_if_error_wait,
                send_timeout: cfg.send_timeout,
                negative_ttl: Arc::new(cfg.negative_ttl.clone()),
                prefresh: cfg.prefresh,
                disk_admission: cfg.disk_admission,
            },
            upstream.clone(),
            clock,
        )
        .await
        .map_err(|source| StartError::Disk {
            dir: cfg
                .cache_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            source,
        })?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "listen address",
                addr: cfg.listen,
                source,
            })?;
        let admin = match cfg.admin_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::Bind {
                            what: "admin address",
                            addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let tls = match &cfg.tls {
            Some(t) => {
                let state = crate::tls::TlsState::new(t).map_err(StartError::Tls)?;
                let listener =
                    TcpListener::bind(t.listen)
                        .await
                        .map_err(|source| StartError::Bind {
                            what: "TLS listen address",
                            addr: t.listen,
                            source,
                        })?;
                Some((listener, state))
            }
            None => None,
        };
        let id = Identity {
            name: cfg.name.clone(),
            strip_surrogate_control: cfg.role == crate::config::Role::Edge,
            strip_tags: cfg.role == crate::config::Role::Edge && cfg.strip_tag_headers,
            sets_forwarded_proto: cfg.role == crate::config::Role::Edge,
            surrogate_capability: HeaderValue::from_str(&format!("{}=\"Surrogate/1.0\"", cfg.name))
                .unwrap_or(HeaderValue::from_static("outpost=\"Surrogate/1.0\"")),
            via: HeaderValue::from_str(&format!("1.1 {}", cfg.name))
                .unwrap_or(HeaderValue::from_static("1.1 outpost")),
        };
        let proxy = Arc::new(Proxy::new(
            engine,
            upstream,
            id,
            route_of(&cfg),
            metrics.clone(),
            cfg.compression.clone(),
            compression_memory,
        ));
        let mut operator = crate::operator::EdgeOperator {
            engine: proxy.engine.clone(),
            metrics: proxy.metrics.clone(),
            node: cfg.name.clone(),
            shields: cfg.shields.clone(),
            siblings: cfg.peers.clone(),
            peer_token,
            fleet: None,
        };
        if let Some(fleet_cfg) = &cfg.fleet {
            // Purges from the fleet apply here only (the operator without the fleet).
            let applier = Arc::new(crate::operator::FleetApplier(operator.clone()));
            let fleet = outpost_fleet::Fleet::start(fleet_cfg.clone(), applier)
                .await
                .map_err(|e| StartError::Fleet(e.to_string()))?;
            metrics.attach_fleet(fleet.clone());
            operator.fleet = Some(fleet);
        }
        // The data port's PURGE does what the admin API does: apply, then forward.
        proxy.set_operator(operator.clone(), auth.clone());
        if let Some(access) = &cfg.access_log {
            let log = crate::observe::access_log::AccessLog::open(access).map_err(|source| {
                StartError::AccessLog {
                    path: match &access.target {
                        crate::observe::access_log::Target::Stdout => "stdout".into(),
                        crate::observe::access_log::Target::File(p) => p.display().to_string(),
                    },
                    source,
                }
            })?;
            metrics.attach_access_log(log.clone());
            proxy.set_access_log(log);
        }
        Ok(Self {
            operator,
            public_metrics: Arc::new(AtomicBool::new(cfg.public_metrics)),
            cfg,
            auth,
            listener,
            admin,
            tls,
            proxy,
            draining: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The HTTPS listener's address (`[tls]`).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The TLS side of the HTTPS listener: certificates, reload, handshake counters.
    pub fn tls_state(&self) -> Option<Arc<crate::tls::TlsState>> {
        self.tls.as_ref().map(|(_, t)| t.clone())
    }

    /// The access log, when `[access_log]` is configured (SIGUSR1 reopens it).
    pub fn access_log(&self) -> Option<Arc<crate::observe::access_log::AccessLog>> {
        self.proxy.access_log()
    }

    /// A handle that applies a reloaded config to this running node (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            current: Arc::new(std::sync::Mutex::new(self.cfg.clone())),
            proxy: self.proxy.clone(),
            auth: self.auth.clone(),
            public_metrics: self.public_metrics.clone(),
            tls: self.tls_state(),
        }
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.proxy.engine.clone()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop_tx, stop_rx) = watch::channel(false);
        // The admin port outlives the drain, so `/readyz` answers 503 to new connections (and a
        // selector withdraws this node) until the last in-flight request is done.
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let drain = crate::drain::Drain::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_read_timeout)
            .max_buf_size(self.cfg.max_header_size.max(8192) as usize);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .max_concurrent_streams(MAX_H2_STREAMS)
            .max_header_list_size(self.cfg.max_header_size.min(u32::MAX as u64) as u32);
        let builder = Arc::new(builder);
        info!(
            listen = %self.local_addr(),
            admin = ?self.admin_addr(),
            tls = ?self.tls_addr(),
            origin = %self.cfg.origin,
            role = ?self.cfg.role,
            "edge listening"
        );
        let admin_task = self.admin.map(|admin| {
            let state = Arc::new(AdminState {
                operator: self.operator.clone(),
                auth: self.auth.clone(),
                limits: outpost_purge_api::AdminLimits {
                    max_push_bytes: self.cfg.max_push_size,
                    ..Default::default()
                },
                public_metrics: self.public_metrics.clone(),
                engine: self.proxy.engine.clone(),
                metrics: self.proxy.metrics.clone(),
                windows: Windows::start(self.proxy.metrics.clone()),
                draining: self.draining.clone(),
                role: match self.cfg.role {
                    crate::config::Role::Edge => "edge",
                    crate::config::Role::Shield => "shield",
                },
                memory_capacity: self.cfg.memory,
                disk_capacity: self.cfg.cache_dir.as_ref().map(|_| self.cfg.disk),
                tls: self.tls.as_ref().map(|(_, t)| t.clone()),
                degraded_after: self.cfg.degraded_after,
                live: self.proxy.live.clone(),
            });
            let limits = crate::admin::AdminLimits {
                header_timeout: self.cfg.header_read_timeout,
                idle_timeout: self.cfg.idle_timeout,
                send_timeout: self.cfg.send_timeout,
                max_connections: self.cfg.admin_max_connections,
            };
            tokio::spawn(crate::admin::serve(admin, state, limits, admin_stop_rx))
        });
        let proxy = self.proxy.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let slots = Arc::new(tokio::sync::Semaphore::new(self.cfg.max_connections));
        self.proxy
            .metrics
            .attach_connections(slots.clone(), self.cfg.max_connections);
        if let Some((_, tls)) = &self.tls {
            self.proxy.metrics.attach_tls(tls.clone());
        }
        let mut accept_warnings = outpost_net::AcceptWarnings::new("data");
        let max_line = self.cfg.max_uri_size.min(usize::MAX as u64) as usize + 64;
        let bounds = Timeouts {
            idle: self.cfg.idle_timeout,
            send: self.cfg.send_timeout,
        };
        let closes = self.proxy.metrics.closes.clone();
        loop {
            // A slot first: past the cap, new connections wait in the kernel's backlog.
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s.expect("never closed"),
                _ = stop.changed() => break,
            };
            let (accepted, tls) = tokio::select! {
                r = self.listener.accept() => (r, None),
                r = accept_tls(self.tls.as_ref()) => r,
                _ = stop.changed() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little, never stop serving.
                    let _ = accept_warnings.failed(&e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            outpost_net::serve_socket(&tcp);
            // Requests clone this connection's own handle, not the node-wide Arc: two cores
            // answering requests never bounce one reference count between them.
            let conn_proxy = Arc::new(proxy.clone());
            let activity = Arc::new(outpost_net::Activity::default());
            let conn_activity = activity.clone();
            // A fresh memory hit is answered within the call, and its request dropped there;
            // anything else continues in a boxed future (see `Proxy::start`).
            // Every response body counts what waits on the client, for the send timeout.
            let make_svc = move |client: Client| {
                service_fn(move |req: Request<Incoming>| {
                    let version = req.version();
                    match conn_proxy.start(req, client) {
                        Ok(resp) => {
                            conn_activity.answered();
                            let activity = conn_activity.clone();
                            let resp = resp.map(|b| Sending::new(b, activity, version));
                            Either::Left(std::future::ready(Ok::<_, Infallible>(resp)))
                        }
                        Err(pending) => {
                            let proxy = conn_proxy.clone();
                            let activity = conn_activity.clone();
                            let in_flight = activity.begin();
                            Either::Right(Box::pin(async move {
                                let resp = proxy.finish(pending).await;
                                let resp = resp.map(|b| Sending::new(b, activity, version));
                                drop(in_flight);
                                Ok::<_, Infallible>(resp)
                            }))
                        }
                    }
                })
            };
            // A source the operator trusts (the selector) opens with a PROXY v2 header naming
            // the client; it is read in the connection's task, under the header timeout.
            let proxied = self
                .cfg
                .proxy_protocol_from
                .iter()
                .any(|n| n.contains(&peer.ip()));
            let is_tls = tls.is_some();
            let builder = builder.clone();
            let watcher = drain.watcher();
            let closes = closes.clone();
            let first_bytes = self.cfg.header_read_timeout;
            if let Some(tls) = tls {
                // The handshake runs here, in the connection's task, under its own timeout.
                tokio::spawn(async move {
                    let _slot = slot;
                    let mut tcp = tcp;
                    let Some(addr) = client_addr(&mut tcp, peer, proxied, first_bytes).await else {
                        return;
                    };
                    let svc = make_svc(Client { addr, tls: is_tls });
                    let stream = match tls.accept(tcp).await {
                        Ok(s) => s,
                        Err(e) => {
                            debug!(%peer, error = %e, "TLS connection closed");
                            return;
                        }
                    };
                    let Some(io) = outpost_net::opening(stream, first_bytes, Some(max_line)).await
                    else {
                        return;
                    };
                    let io = Metered::new(io, activity.clone());
                    let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
                    let _ = watcher
                        .watch_idle(conn, Some((activity, bounds, closes)))
                        .await;
                });
                continue;
            }
            tokio::spawn(async move {
                let _slot = slot;
                let mut tcp = tcp;
                let Some(addr) = client_addr(&mut tcp, peer, proxied, first_bytes).await else {
                    return;
                };
                let svc = make_svc(Client { addr, tls: is_tls });
                let Some(io) = outpost_net::opening(tcp, first_bytes, Some(max_line)).await else {
                    return;
                };
                let io = Metered::new(io, activity.clone());
                let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
                let _ = watcher
                    .watch_idle(conn, Some((activity, bounds, closes)))
                    .await;
            });
        }
        self.draining.store(true, Ordering::Relaxed);
        info!("edge draining");
        drop(self.listener);
        drop(self.tls);
        tokio::select! {
            _ = drain.shutdown() => {}
            _ = tokio::time::sleep(self.cfg.drain_timeout) => {
                warn!("drain timeout reached; closing remaining connections");
            }
        }
        let _ = admin_stop_tx.send(true);
        if let Some(t) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        // The disk index syncs in batches: make the last objects stored durable, and release
        // the cache directory.
        if let Some(fleet) = &self.operator.fleet {
            fleet.close().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.proxy.engine.close()).await;
        info!("edge stopped");
    }
}

/// The client's address: the peer's, or, from a source in `[proxy_protocol] from`, the one its
/// PROXY v2 header names (`None`: no valid header in time; the connection is closed).
async fn client_addr(
    tcp: &mut tokio::net::TcpStream,
    peer: SocketAddr,
    proxied: bool,
    within: Duration,
) -> Option<SocketAddr> {
    if !proxied {
        return Some(peer);
    }
    match outpost_net::proxy_protocol::read(tcp, within).await {
        Ok(addr) => Some(addr.unwrap_or(peer)),
        Err(e) => {
            debug!(%peer, error = %e, "connection closed");
            None
        }
    }
}

/// Accepts on the HTTPS listener, if there is one (otherwise never resolves).
async fn accept_tls(
    tls: Option<&(TcpListener, Arc<crate::tls::TlsState>)>,
) -> (
    std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    Option<Arc<crate::tls::TlsState>>,
) {
    match tls {
        Some((listener, state)) => (listener.accept().await, Some(state.clone())),
        None => std::future::pending().await,
    }
}

/// The request phase's settings from a config (at start-up and on reload).
fn route_of(cfg: &EdgeConfig) -> crate::proxy::Route {
    crate::proxy::Route {
        // Every forwarding field the operator forwards is part of the key.
        key_opts: KeyOptions {
            ignore_query_params: cfg.ignore_query_params.clone(),
            keyed_headers: cfg.forward_headers.clone(),
        },
        versioning: crate::proxy::Versioning {
            param: cfg.version_param.clone(),
            strip_upstream: cfg.strip_version_param,
            ttl: cfg.versioned_ttl,
        },
        forward: crate::proxy::forward::ForwardPolicy::new(
            &cfg.forward_headers,
            &cfg.strip_headers,
        ),
        limits: crate::proxy::request::RequestLimits {
            max_uri: cfg.max_uri_size.min(usize::MAX as u64) as usize,
        },
    }
}

/// Applies a new configuration to a running node without dropping connections.
#[derive(Clone)]
pub struct Reloader {
    current: Arc<std::sync::Mutex<EdgeConfig>>,
    proxy: Arc<Proxy>,
    auth: crate::operator::SharedAuth,
    public_metrics: Arc<AtomicBool>,
    tls: Option<Arc<crate::tls::TlsState>>,
}

impl Reloader {
    /// Applies what can change live: cache-key options, versioned URLs, admin tokens,
    /// `public_metrics`, and the TLS certificates and handshake timeout (already loaded and
    /// checked by the config; open connections keep going). Returns one message per setting that changed but needs a restart
    /// (addresses, cache directory and sizes, origin, shields, role, name, fleet, access log,
    /// negative TTLs, prefresh, disk admission, `[limits]`); those keep their
    /// running values. A token error rejects the whole reload.
    pub fn apply(&self, new: EdgeConfig) -> Result<Vec<String>, String> {
        let auth = outpost_purge_api::Auth::from_config_and_env(new.admin_tokens.clone())
            .map_err(|e| format!("admin token: {e}"))?;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = Vec::new();
        let mut check = |name: &str, changed: bool| {
            if changed {
                kept.push(format!(
                    "{name} changed: it needs a restart; keeping the running value"
                ));
            }
        };
        check("listen", cur.listen != new.listen);
        check("admin_listen", cur.admin_listen != new.admin_listen);
        check("cache.dir", cur.cache_dir != new.cache_dir);
        check("cache.memory", cur.memory != new.memory);
        check("cache.disk", cur.disk != new.disk);
        check("origin", cur.origin != new.origin);
        check("role", cur.role != new.role);
        check("name", cur.name != new.name);
        check(
            "shields",
            cur.shields
                .iter()
                .map(|s| (&s.name, &s.url, s.admin))
                .collect::<Vec<_>>()
                != new
                    .shields
                    .iter()
                    .map(|s| (&s.name, &s.url, s.admin))
                    .collect::<Vec<_>>(),
        );
        check(
            "tls.listen",
            cur.tls.as_ref().map(|t| t.listen) != new.tls.as_ref().map(|t| t.listen),
        );
        check("upstream", cur.upstream_tls != new.upstream_tls);
        check("fleet", cur.fleet != new.fleet);
        check("access_log", cur.access_log != new.access_log);
        check(
            "fallback_origins / [origin_health]",
            cur.failover != new.failover,
        );
        check(
            "proxy_protocol",
            cur.proxy_protocol_from != new.proxy_protocol_from,
        );
        let limits = |c: &EdgeConfig| {
            (
                [
                    c.header_read_timeout,
                    c.upstream_connect_timeout,
                    c.upstream_first_byte_timeout,
                    c.upstream_queue_wait,
                    c.upstream_body_timeout,
                    c.stale_if_error_wait,
                    c.origin_breaker_cooldown,
                    c.degraded_after,
                    c.drain_timeout,
                    c.idle_timeout,
                    c.send_timeout,
                ],
                [
                    c.max_header_size,
                    c.max_uri_size,
                    c.max_object_size,
                    c.upstream_max_connections as u64,
                    u64::from(c.origin_breaker_failures),
                    c.max_connections as u64,
                    c.admin_max_connections as u64,
                ],
            )
        };
        check("limits", limits(&cur) != limits(&new));
        check("cache.negative_ttl", cur.negative_ttl != new.negative_ttl);
        check("cache.prefresh", cur.prefresh != new.prefresh);
        check(
            "cache.disk_admission",
            cur.disk_admission != new.disk_admission,
        );
        self.proxy.reload(route_of(&new));
        self.auth.store(Arc::new(auth));
        self.public_metrics
            .store(new.public_metrics, Ordering::Relaxed);
        cur.ignore_query_params = new.ignore_query_params;
        cur.version_param = new.version_param;
        cur.strip_version_param = new.strip_version_param;
        cur.versioned_ttl = new.versioned_ttl;
        cur.forward_headers = new.forward_headers;
        cur.strip_headers = new.strip_headers;
        cur.max_uri_size = new.max_uri_size;
        cur.admin_tokens = new.admin_tokens;
        cur.public_metrics = new.public_metrics;
        if let (Some(state), Some(mut tls)) = (&self.tls, new.tls) {
            state.install(&tls);
            if let Some(running) = &cur.tls {
                tls.listen = running.listen;
            }
            cur.tls = Some(tls);
        }
        Ok(kept)
    }
}
