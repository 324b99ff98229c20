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

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::cache::clock::Clock;
use crate::cache::key::KeyOptions;
use crate::cache::upstream::Upstream;
use crate::cache::{Engine, EngineConfig};
use crate::config::EdgeConfig;
use crate::proxy::Proxy;
use crate::proxy::respond::{Identity, RespBody, full, plain};
use crate::proxy::upstream::{HyperUpstream, UpstreamConfig};

/// A bound, ready edge node.
pub struct EdgeServer {
    cfg: EdgeConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    proxy: Arc<Proxy>,
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
    #[error("cannot open the disk cache at {dir}: {source} (check that the directory is writable)")]
    Disk { dir: String, source: std::io::Error },
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
        let upstream: Arc<dyn Upstream> = upstream.unwrap_or_else(|| {
            Arc::new(HyperUpstream::new(&UpstreamConfig {
                origin: cfg.origin.clone(),
                connect_timeout: cfg.upstream_connect_timeout,
                first_byte_timeout: cfg.upstream_first_byte_timeout,
                max_connections: cfg.upstream_max_connections,
            }))
        });
        let engine = Engine::open(
            EngineConfig {
                memory_bytes: cfg.memory,
                disk: cfg.cache_dir.clone().map(|d| (d, cfg.disk)),
                max_object_size: cfg.max_object_size,
                surrogate_name: cfg.name.clone(),
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
        let id = Identity {
            name: cfg.name.clone(),
            strip_surrogate_control: cfg.role == crate::config::Role::Edge,
            surrogate_capability: HeaderValue::from_str(&format!("{}=\"Surrogate/1.0\"", cfg.name))
                .unwrap_or(HeaderValue::from_static("outpost=\"Surrogate/1.0\"")),
            via: HeaderValue::from_str(&format!("1.1 {}", cfg.name))
                .unwrap_or(HeaderValue::from_static("1.1 outpost")),
        };
        let proxy = Arc::new(Proxy::new(
            engine,
            upstream,
            id,
            KeyOptions {
                ignore_query_params: cfg.ignore_query_params.clone(),
            },
        ));
        Ok(Self {
            cfg,
            listener,
            admin,
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

    pub fn engine(&self) -> Arc<Engine> {
        self.proxy.engine.clone()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_read_timeout)
            .max_buf_size(self.cfg.max_header_size.max(8192) as usize);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(self.cfg.max_header_size.min(u32::MAX as u64) as u32);
        let builder = Arc::new(builder);
        info!(
            listen = %self.local_addr(),
            admin = ?self.admin_addr(),
            origin = %self.cfg.origin,
            role = ?self.cfg.role,
            "edge listening"
        );
        let admin_task = self.admin.map(|admin| {
            let draining = self.draining.clone();
            let engine = self.proxy.engine.clone();
            tokio::spawn(serve_admin(admin, draining, engine, stop_rx.clone()))
        });
        let proxy = self.proxy.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = stop.changed() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little, never stop serving.
                    warn!(error = %e, "accept failed; raise the open-files limit (ulimit -n) if this repeats");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let proxy = proxy.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(tcp), svc)
                .into_owned();
            let watched = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = watched.await;
            });
        }
        self.draining.store(true, Ordering::Relaxed);
        info!("edge draining");
        drop(self.listener);
        let graceful = Arc::try_unwrap(graceful).ok();
        if let Some(g) = graceful {
            tokio::select! {
                _ = g.shutdown() => {}
                _ = tokio::time::sleep(self.cfg.drain_timeout) => {
                    warn!("drain timeout reached; closing remaining connections");
                }
            }
        }
        if let Some(t) = admin_task {
            t.abort();
        }
        info!("edge stopped");
    }
}

async fn serve_admin(
    listener: TcpListener,
    draining: Arc<AtomicBool>,
    engine: Arc<Engine>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let draining = draining.clone();
        let engine = engine.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let draining = draining.clone();
                let engine = engine.clone();
                async move { Ok::<_, Infallible>(admin(req, &draining, &engine)) }
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), svc).await {
                error!(error = %e, "admin connection failed");
            }
        });
    }
}

fn admin(req: Request<Incoming>, draining: &AtomicBool, engine: &Engine) -> Response<RespBody> {
    match req.uri().path() {
        "/healthz" => plain(StatusCode::OK, "ok"),
        "/readyz" if draining.load(Ordering::Relaxed) => {
            plain(StatusCode::SERVICE_UNAVAILABLE, "draining")
        }
        "/readyz" => plain(StatusCode::OK, "ready"),
        "/usage" => {
            let usage = engine.usage();
            let body = usage
                .iter()
                .map(|(tier, n, b)| format!("{} objects={n} bytes={b}", tier.as_str()))
                .collect::<Vec<_>>()
                .join("\n");
            let mut r = Response::new(full(Bytes::from(body + "\n")));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: the admin port serves /healthz, /readyz and /usage",
        ),
    }
}
