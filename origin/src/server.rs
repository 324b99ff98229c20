//! The listener: accept loop, HTTP/1.1 and h2c per connection, access log, graceful shutdown.
//!
//! Connections are served by hyper-util's auto builder for HTTP/1.1 and HTTP/2 with prior knowledge
//! (h2c), after [`outpost_net::opening`] has read the first bytes under the header read timeout (the
//! builder's own detection has no timeout). The HTTP/1 header read timeout needs a timer set on the
//! HTTP/1 builder, or it silently does nothing. Every connection is bounded in time (first bytes,
//! each HTTP/1 head, the idle timeout) and in count (`max_connections`); see [`conn`]. An
//! `accept()` error (EMFILE when the process runs out of file descriptors, a connection reset
//! before accept) never ends the loop: it is logged (at most once per 10 s) and the loop sleeps
//! briefly, so a burst of errors cannot spin a core or flood the log.
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
use outpost_net::{AcceptWarnings, Activity, Metered, Sending, Timeouts};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::OriginConfig;
use crate::conn::Handling;
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
    idle_timeout: Duration,
    max_connections: usize,
    drain_timeout: Duration,
}

impl OriginServer {
    /// Binds the listening socket (port 0 picks a free port; see [`OriginServer::local_addr`]).
    /// A bind error names the address (and the flag that changes it).
    pub async fn bind(cfg: OriginConfig) -> std::io::Result<OriginServer> {
        let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot bind listen address {} (change it with --listen or `listen`): {e}",
                    cfg.listen
                ),
            )
        })?;
        let local_addr = listener.local_addr()?;
        Ok(OriginServer {
            listener,
            local_addr,
            site: Arc::new(Site {
                root: cfg.root,
                rules: cfg.rules,
            }),
            header_read_timeout: cfg.header_read_timeout,
            idle_timeout: cfg.idle_timeout,
            max_connections: cfg.max_connections,
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
            idle_timeout,
            max_connections,
            drain_timeout,
        } = self;

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        // A peer that stops answering PINGs is dropped; one that answers them is bounded by the
        // idle timeout.
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(10));
        let builder = Arc::new(builder);

        info!(
            listen = %local_addr,
            root = %site.root.display(),
            rules = site.rules.len(),
            max_connections,
            "origin serving"
        );

        // Turns true on shutdown: every connection finishes its in-flight requests and closes.
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(max_connections));
        let mut warnings = AcceptWarnings::new("origin");
        // Connection tasks live in a JoinSet so that the ones still open after the drain timeout
        // can be aborted, not left running detached.
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        'accept: loop {
            // A slot first: past the cap, new clients wait in the kernel's backlog.
            let slot = tokio::select! {
                biased;
                () = &mut shutdown => break,
                s = slots.clone().acquire_owned() => s.expect("never closed"),
                // Reap finished connection tasks so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let (stream, peer) = loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'accept,
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => break pair,
                        // A connection that died before we accepted it is the client's business.
                        Err(e) if is_connection_error(&e) => {
                            debug!(error = %e, "connection failed before accept");
                        }
                        Err(e) => {
                            warnings.failed(&e);
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                    },
                }
            };
            outpost_net::serve_socket(&stream);
            let site = site.clone();
            let builder = builder.clone();
            let mut stop = stop_rx.clone();
            connections.spawn(
                async move {
                    let _slot = slot;
                    let Some(io) = outpost_net::opening(stream, header_read_timeout, None).await
                    else {
                        debug!("connection closed, failed or silent before its first request");
                        return;
                    };
                    let activity = Arc::new(Activity::default());
                    let requests = activity.clone();
                    let service = service_fn(move |req: Request<Incoming>| {
                        let site = site.clone();
                        let activity = requests.clone();
                        let version = req.version();
                        let handling = Handling::begin(&requests);
                        async move {
                            let resp = access_logged(&site, req).await;
                            drop(handling);
                            // What waits on the client counts for the send timeout (see `conn`).
                            Ok::<_, Infallible>(
                                resp.map(|body| Sending::new(body, activity, version)),
                            )
                        }
                    });
                    let io = Metered::new(io, activity.clone());
                    let conn = builder.serve_connection(TokioIo::new(io), service);
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    let bounds = Timeouts {
                        idle: idle_timeout,
                        send: idle_timeout,
                    };
                    if let Err(e) = outpost_net::serve_http(conn, &activity, bounds, stopped).await
                    {
                        // Clients vanish, time out reading headers or speak garbage; not an
                        // operator's problem.
                        debug!(error = %e, "connection ended with an error");
                    }
                }
                .instrument(info_span!("conn", %peer)),
            );
        }

        drop(listener);
        info!(
            open_connections = connections.len(),
            "origin shutting down; draining connections"
        );
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(drain_timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        match drained {
            Ok(()) => info!("origin stopped"),
            Err(_) => {
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
