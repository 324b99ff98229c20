//! The harness of the end-to-end tests (`tests/e2e`), shared by every feature module.
//!
//! - [`test_origin`]: the programmable origin (scripted replies, request counts and records).
//! - [`site`]: the real `outpost-origin` server on the repo's `site/`.
//! - [`edge`]: an `EdgeServer` in this process (edge or shield, by its config).
//! - [`selector`]: a `Selector` in this process.
//! - [`admin`]: an edge with a disk tier and admin tokens, and its purge / push / list calls.
//! - [`proc`]: the real `outpost` binary as a child process, and the CLI.
//! - [`http`]: whole responses, raw HTTP/1.1 exchanges.
//! - [`files`]: deterministic bytes, files under a directory.
//! - [`ports`]: the one place that still probes for free ports (`outpost demo`, see there).
//! - [`cachetests`]: the scorer of the HTTP caching conformance suite.
//!
//! Servers in this process bind 127.0.0.1:0 and report the address they got; child processes
//! do the same and the harness reads the address from their "listening" log line. Every wait
//! is bounded ([`WAIT`] unless a test says otherwise) and polls with [`eventually`].
//!
//! All tests share one process: [`init`] does what is process-wide exactly once (the rustls
//! crypto provider). No test changes the environment, the current directory or installs a
//! tracing subscriber; keep it that way (say so in a test's own child `Command` instead).

pub mod admin;
pub mod cachetests;
pub mod edge;
pub mod exposition;
pub mod files;
pub mod http;
pub mod nats;
pub mod ports;
pub mod proc;
pub mod selector;
pub mod site;
pub mod test_origin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

/// The default bound of every wait and every client request.
pub const WAIT: Duration = Duration::from_secs(30);

/// Process-wide set-up, idempotent: installs aws-lc-rs as rustls' default crypto provider (the
/// only provider in the graph; reqwest is built with `rustls-no-provider`).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// The repository root (`CARGO_MANIFEST_DIR`).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A client builder: no proxy from the environment, every request bounded by [`WAIT`].
pub fn client_builder() -> reqwest::ClientBuilder {
    init();
    reqwest::Client::builder().no_proxy().timeout(WAIT)
}

/// The plain HTTP/1.1 client.
pub fn client() -> reqwest::Client {
    client_within(WAIT)
}

/// The plain HTTP/1.1 client with another bound on every request.
pub fn client_within(timeout: Duration) -> reqwest::Client {
    client_builder()
        .timeout(timeout)
        .build()
        .expect("reqwest client")
}

/// An HTTP/2 client without TLS (h2c, prior knowledge), every request bounded by `timeout`.
pub fn h2c_client(timeout: Duration) -> reqwest::Client {
    client_builder()
        .timeout(timeout)
        .http2_prior_knowledge()
        .build()
        .expect("reqwest h2c client")
}

/// A client builder that trusts only `ca_pem` and reports the peer's certificate
/// (`reqwest::tls::TlsInfo`).
pub fn https_client(ca_pem: &str, timeout: Duration) -> reqwest::ClientBuilder {
    client_builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("a PEM CA")])
        .tls_info(true)
        .timeout(timeout)
}

/// Polls `check` every 25 ms until it holds; panics naming `what` after [`WAIT`].
pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(WAIT, what, check).await;
}

/// [`eventually`] with another bound.
pub async fn eventually_within(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    poll(
        within,
        async || check().await.then_some(()),
        || format!("not true within {within:?}: {what}"),
    )
    .await;
}

/// Calls `check` every 25 ms until it returns a value, and returns that value; after `within`,
/// panics with `failure()` (which can say what was seen by then).
pub async fn poll<T>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
    failure: impl FnOnce() -> String,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{}", failure());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Where a node listens: its data address and its admin address, if it has one.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl Listening {
    /// `http://<data address><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The admin listener's address (the node must have one).
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("an admin listener (admin_listen)")
    }

    /// `http://<admin address><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin())
    }
}

/// What a server's `run` waits on: it resolves when the [`Serving`] handle stops the server.
pub type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A server task in this process with its shutdown signal. Dropping the handle signals a
/// graceful stop (the server drains in the background); [`Serving::stop_within`] waits for it.
pub struct Serving<T: Send + 'static = ()> {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<T>>,
}

impl<T: Send + 'static> Serving<T> {
    /// Spawns `run(shutdown)` on the current runtime.
    pub fn spawn<F>(run: impl FnOnce(Shutdown) -> F) -> Serving<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Serving {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Resolves the shutdown future without waiting.
    pub fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Resolves the shutdown future and waits (bounded by `within`) until `run` returns.
    pub async fn stop_within(mut self, within: Duration) -> T {
        self.signal();
        let task = self.task.take().expect("a running server");
        tokio::time::timeout(within, task)
            .await
            .unwrap_or_else(|_| panic!("the server did not stop within {within:?}"))
            .expect("the server task panicked")
    }
}

impl<T: Send + 'static> Drop for Serving<T> {
    fn drop(&mut self) {
        self.signal();
    }
}

/// `cmd` as found on PATH, if it is there.
pub fn on_path(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}
