//! [`Selector`]: binds the listeners, then runs the accept loop, the probes and the admin
//! port until shutdown. At most `limits.max_connections` spliced connections are open at once
//! (see `conn`). Accept errors (EMFILE and friends) are logged at most once per 10 s and the
//! loop goes on.
//! Shutdown stops accepting, lets spliced connections finish (bounded by `drain_timeout`), then
//! stops the probes and the admin port.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_net::AcceptWarnings;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug_span, info, warn};

use crate::admin::{self, NodesReport};
use crate::config::SelectorConfig;
use crate::health::{self, HealthConfig};
use crate::pool::Pool;
use crate::proxy;

/// A bound, ready selector.
pub struct Selector {
    cfg: SelectorConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    pool: Arc<Pool>,
}

async fn bind(what: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {what} {addr}: {e}")))
}

impl Selector {
    /// Binds the listen and admin addresses. Nothing runs until [`run`](Self::run).
    pub async fn bind(cfg: SelectorConfig) -> io::Result<Self> {
        let listener = bind("listen address", cfg.listen).await?;
        let admin = match cfg.admin_listen {
            Some(addr) => Some(bind("admin address", addr).await?),
            None => None,
        };
        let pool = Arc::new(Pool::new(&cfg));
        Ok(Self {
            cfg,
            listener,
            admin,
            pool,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// What `/nodes` would answer now.
    pub fn report(&self) -> NodesReport {
        admin::report(&self.pool)
    }

    /// Serves until `shutdown` resolves, then drains. Dropping the future stops everything it
    /// started: probes, admin port and spliced connections.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        // Dropping the sender (this future ending or being dropped) also stops the receivers.
        let (_stop_tx, stop_rx) = watch::channel(false);
        let mut background = JoinSet::new();
        let health = HealthConfig {
            // tokio's interval panics on zero; a config built in code might hold one.
            probe_interval: self.cfg.health.probe_interval.max(Duration::from_millis(1)),
            ..self.cfg.health
        };
        for node in &self.pool.nodes {
            background.spawn(health::run_probes(node.clone(), health, stop_rx.clone()));
        }
        let (listen, admin_addr) = (self.local_addr(), self.admin_addr());
        if let Some(admin) = self.admin {
            let limits = admin::Limits {
                max_connections: self.cfg.admin_max_connections,
                header_read_timeout: self.cfg.admin_header_read_timeout,
                idle_timeout: self.cfg.admin_idle_timeout,
            };
            background.spawn(admin::serve(
                admin,
                self.pool.clone(),
                limits,
                stop_rx.clone(),
            ));
        }
        info!(
            listen = %listen,
            admin = ?admin_addr,
            policy = self.cfg.policy.as_str(),
            nodes = self.pool.nodes.len(),
            "selector listening"
        );
        let mut conns = JoinSet::new();
        let slots = Arc::new(Semaphore::new(self.cfg.max_connections));
        let mut warnings = AcceptWarnings::new("listen");
        tokio::pin!(shutdown);
        'accept: loop {
            // A slot first: past the cap, new clients wait in the kernel's backlog.
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s.expect("never closed"),
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                _ = &mut shutdown => break,
            };
            let accepted = loop {
                tokio::select! {
                    r = self.listener.accept() => break r,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    _ = &mut shutdown => break 'accept,
                }
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little, never stop serving.
                    warnings.failed(&e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let span = debug_span!("connection", %peer);
            let serve = proxy::serve(
                self.pool.clone(),
                tcp,
                peer,
                self.cfg.connect_timeout,
                self.cfg.idle_timeout,
            );
            conns.spawn(
                async move {
                    serve.await;
                    drop(slot);
                }
                .instrument(span),
            );
        }
        drop(self.listener);
        info!(connections = conns.len(), "selector draining");
        let drained = tokio::time::timeout(self.cfg.drain_timeout, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                connections = conns.len(),
                "drain timeout reached; closing remaining connections"
            );
            conns.shutdown().await;
        }
        background.shutdown().await;
        info!("selector stopped");
    }
}
