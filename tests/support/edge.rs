//! An `EdgeServer` running in this process: an edge or a shield, whichever its config says.
//!
//! Configs bind 127.0.0.1:0; the handle reads back the addresses the listeners got.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_config::Source;
use outpost_edge::{EdgeConfig, EdgeOverrides, EdgeServer};

// The edge's inner types that tests reach for, named in this one place (their modules move as
// the edge is refactored).
pub use outpost_edge::cache::clock::Clock;
pub use outpost_edge::cache::{Engine, PurgeSpec};
pub use outpost_edge::compress::{CompressionSnapshot, CompressionStats};
pub use outpost_edge::server::Reloader;
pub use outpost_edge::tls::TlsState;

use super::{Listening, Serving, WAIT, eventually};

/// An edge config on 127.0.0.1:0 (data and admin) in front of `http://<origin>`, with `extra`
/// appended (as the file `name`).
pub fn loopback_config(name: &str, origin: SocketAddr, extra: &str) -> EdgeConfig {
    config(
        name,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\norigin = \"http://{origin}\"\n{extra}"
        ),
    )
}

/// Parses an edge config from `text` (as the file `name`), or panics with its errors.
pub fn config(name: &str, text: impl Into<String>) -> EdgeConfig {
    EdgeConfig::from_source(&Source::inline(name, text.into()), EdgeOverrides::default())
        .unwrap_or_else(|e| panic!("test config {name}: {e}"))
}

/// Opens the cache and binds the listeners, or panics.
pub async fn bind(cfg: EdgeConfig) -> EdgeServer {
    EdgeServer::bind(cfg)
        .await
        .unwrap_or_else(|e| panic!("edge bind: {e}"))
}

/// A running edge (its addresses through [`Listening`]). Dropping it stops the server
/// (gracefully, in the background).
pub struct Edge {
    listening: Listening,
    pub tls_addr: Option<SocketAddr>,
    clock: Option<Clock>,
    engine: Option<Arc<Engine>>,
    server: Serving,
}

impl Edge {
    /// Binds `cfg` and runs it.
    pub async fn start(cfg: EdgeConfig) -> Edge {
        Edge::run(bind(cfg).await)
    }

    /// Parses `text` (listen addresses included) and runs it.
    pub async fn from_toml(text: &str) -> Edge {
        Edge::start(config("edge.toml", text)).await
    }

    /// Runs `cfg` on `clock` (`Clock::manual()`: time moves only by [`Edge::advance`]).
    pub async fn start_with_clock(cfg: EdgeConfig, clock: Clock) -> Edge {
        let server = EdgeServer::bind_with(cfg, clock.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("edge bind: {e}"));
        let mut edge = Edge::run(server);
        edge.clock = Some(clock);
        edge
    }

    /// Runs a bound server (take what else the test needs from it first: its reloader, its
    /// TLS state).
    pub fn run(server: EdgeServer) -> Edge {
        let listening = Listening {
            addr: server.local_addr(),
            admin: server.admin_addr(),
        };
        let tls_addr = server.tls_addr();
        let engine = server.engine();
        Edge {
            listening,
            tls_addr,
            clock: None,
            engine: Some(engine),
            server: Serving::spawn(|stopped| server.run(stopped)),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().expect("a running edge")
    }

    /// Moves the manual clock forward.
    pub fn advance(&self, secs: u64) {
        self.clock
            .as_ref()
            .expect("an edge started with a clock")
            .advance(Duration::from_secs(secs));
    }

    /// Moves the manual clock forward by milliseconds.
    pub fn advance_ms(&self, ms: u64) {
        self.clock
            .as_ref()
            .expect("an edge started with a clock")
            .advance(Duration::from_millis(ms));
    }

    /// Resolves the shutdown future without waiting: the edge starts draining.
    pub fn begin_stop(&mut self) {
        self.server.signal();
    }

    /// Lets go of the engine, resolves the shutdown future and waits (bounded) until the edge
    /// has drained.
    pub async fn stop(self) {
        self.stop_within(WAIT).await;
    }

    /// [`Edge::stop`] with another bound.
    pub async fn stop_within(mut self, within: Duration) {
        self.engine = None;
        self.server.stop_within(within).await;
    }

    /// (objects, bytes) of a tier after housekeeping: 0 memory, 1 disk.
    pub async fn tier_usage(&self, tier: usize) -> (u64, u64) {
        let engine = self.engine();
        engine.run_pending_tasks().await;
        let u = engine.usage();
        (u[tier].1, u[tier].2)
    }

    /// Objects in the disk tier after housekeeping.
    pub async fn disk_objects(&self) -> u64 {
        self.tier_usage(1).await.0
    }

    /// Waits (bounded) until the disk tier holds at least `n` objects: their fills are over,
    /// and a restart on the same directory after a clean stop finds them (after a `kill -9`,
    /// only those counted as stored: see `NodeProc::wait_disk_stored`).
    pub async fn wait_disk_objects(&self, n: u64) {
        eventually(&format!("the disk tier holds {n} object(s)"), async || {
            self.disk_objects().await >= n
        })
        .await;
    }
}

impl std::ops::Deref for Edge {
    type Target = Listening;
    fn deref(&self) -> &Listening {
        &self.listening
    }
}
