//! A standalone admin listener: [`handle`] on every connection, with a 404 for other paths.
//! The edge mounts [`handle`] on its own admin port instead; this serves tests and tools.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::auth::Auth;
use crate::backend::AdminBackend;
use crate::error::{AdminError, error_response};
use crate::handler::{AdminLimits, handle};

/// Serves the admin API on `listener` (HTTP/1.1 and h2c) until `shutdown` resolves, then stops
/// accepting and waits for in-flight requests. Bound the wait with a timeout if you need to.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn AdminBackend>,
    auth: Arc<Auth>,
    limits: AdminLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    info!(listen = ?listener.local_addr().ok(), open = auth.is_open(), "admin API listening");
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (backend, auth) = (backend.clone(), auth.clone());
        let svc = service_fn(move |req: Request<Incoming>| {
            let (backend, auth) = (backend.clone(), auth.clone());
            async move {
                let resp = match handle(req, &*backend, &auth, &limits).await {
                    Some(r) => r,
                    None => error_response(&AdminError::NotFound(
                        "the admin API serves /purge and /objects".into(),
                    )),
                };
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(tcp), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
