//! The listener: accept loop, HTTP/1.1 and h2c per connection, access log, graceful shutdown.
//!
//! Connections are served by hyper-util's auto builder, which reads the connection preface to pick
//! HTTP/1.1 or HTTP/2 with prior knowledge (h2c). The HTTP/1 header read timeout needs a timer set
//! on the HTTP/1 builder, or it silently does nothing. An `accept()` error (EMFILE when the process
//! runs out of file descriptors, a connection reset before accept) never ends the loop: it is
//! logged and the loop sleeps briefly, so a burst of errors cannot spin a core.
//!
//! Shutdown: when the shutdown future resolves, the listener is closed, every open connection is
//! told to finish its in-flight requests and close, and `run` waits up to `drain_timeout` for that.

use std::convert::Infallible;
use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::CONTENT_LENGTH;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::OriginConfig;
use crate::handler::Site;
use crate::respond::Body;

/// Pause after a failed `accept()`, long enough for descriptors to be released.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound, not yet running origin server.
pub struct OriginServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    site: Arc<Site>,
    header_read_timeout: Duration,
    drain_timeout: Duration,
}

impl OriginServer {
    /// Binds the listening socket (port 0 picks a free port; see [`OriginServer::local_addr`]).
    pub async fn bind(cfg: OriginConfig) -> std::io::Result<OriginServer> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let local_addr = listener.local_addr()?;
        Ok(OriginServer {
            listener,
            local_addr,
            site: Arc::new(Site {
                root: cfg.root,
                rules: cfg.rules,
            }),
            header_read_timeout: cfg.header_read_timeout,
            drain_timeout: cfg.drain_timeout,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then drains open connections for at most the configured
    /// drain timeout (10 s by default).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let OriginServer {
            listener,
            local_addr,
            site,
            header_read_timeout,
            drain_timeout,
        } = self;

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        builder.http2().timer(TokioTimer::new());

        let graceful = GracefulShutdown::new();
        info!(
            listen = %local_addr,
            root = %site.root.display(),
            rules = site.rules.len(),
            "origin serving"
        );

        // Connection tasks live in a JoinSet so that the ones still open after the drain timeout
        // can be aborted, not left running detached.
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                // Reap finished connection tasks so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    // A connection that died before we accepted it is the client's business.
                    Err(e) if is_connection_error(&e) => {
                        debug!(error = %e, "connection failed before accept");
                        continue;
                    }
                    Err(e) => {
                        error!(
                            error = %e,
                            "accept failed; if this says \"too many open files\", raise the descriptor limit (ulimit -n) or reduce concurrent clients"
                        );
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(error = %e, %peer, "cannot set TCP_NODELAY");
            }
            let site = site.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let site = site.clone();
                async move { Ok::<_, Infallible>(access_logged(&site, req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            connections.spawn(
                async move {
                    if let Err(e) = conn.await {
                        // Clients vanish, time out reading headers or speak garbage; not an
                        // operator's problem.
                        debug!(error = %e, "connection ended with an error");
                    }
                }
                .instrument(info_span!("conn", %peer)),
            );
        }

        drop(listener);
        let open = graceful.count();
        info!(
            open_connections = open,
            "origin shutting down; draining connections"
        );
        tokio::select! {
            () = graceful.shutdown() => info!("origin stopped"),
            () = tokio::time::sleep(drain_timeout) => {
                warn!(
                    drain_timeout_s = drain_timeout.as_secs_f64(),
                    remaining = connections.len(),
                    "drain timeout reached; closing the remaining connections"
                );
                connections.abort_all();
            }
        }
        Ok(())
    }
}

/// Errors of one pending connection, after which `accept()` can be retried at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::Interrupted
    )
}

/// Handles one request and writes its access-log line.
async fn access_logged(site: &Site, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let resp = site.handle(&req).await;
    // `bytes` is the length of the body being sent (its Content-Length, 0 for HEAD and 304); a
    // client that disconnects early receives fewer. `duration_us` is the time to produce the
    // response head; the body streams afterwards.
    let bytes = if req.method() == Method::HEAD {
        0
    } else {
        resp.headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    info!(
        target: "outpost_origin::access",
        method = %req.method(),
        path = %req.uri().path(),
        version = ?req.version(),
        status = resp.status().as_u16(),
        bytes,
        duration_us = start.elapsed().as_micros() as u64,
        "request"
    );
    resp
}
