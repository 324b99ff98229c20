//! Fleet mode: every purge and push accepted by any node reaches every node, through NATS
//! JetStream.
//!
//! - **Publish.** A node applies a purge locally, writes it to its durable [outbox], and
//!   publishes it to the stream (`<stream>.purge`, file storage, kept for `max_age`) with the
//!   purge id as the message id, so a purge published twice is stored once.
//! - **Apply.** Every node reads the stream through a durable consumer of its own
//!   (`node-<name>`), applies each purge another node published (its own it applied before
//!   publishing; purges are generation bumps, so applying one twice would be harmless too),
//!   acknowledges it, and records the stream sequence it has applied, in a file of its own and
//!   in the fleet's node reports (`<stream>_NODES`, the last message of each node's subject
//!   `<stream>.nodes.<name>`: a key-value bucket made as a plain stream, which NATS 2.9 serves;
//!   async-nats' key-value API does not work against it).
//! - **Receipts.** The publishing node waits (up to `receipt_wait`) until every node in the
//!   reports a sequence at or past the purge's, and lists each with its sequence, or as
//!   pending.
//! - **Replay.** A node that starts catches up to the stream's last sequence before it says
//!   it is ready ([`Fleet::ready`]), so it never serves what the fleet purged while it was
//!   away. A node whose last applied purge is older than the stream's first (the purges it
//!   missed have expired) cannot know what was purged: it clears its whole cache instead.
//! - **Pushes.** An object pushed to one node goes to every node: its bytes into the fleet's
//!   object store (`<stream>_OBJECTS`, named by their SHA-256, so a body is stored once and a
//!   later version never overwrites one a lagging node has yet to fetch), an announcement into
//!   the stream (`<stream>.push`, in order with the purges). Each node stores it from the object
//!   store and checks the hash. Deletes are announced the same way. Chosen over fetching from
//!   the pusher: the pusher may be down or unreachable from the others when a node catches up,
//!   and the object store is as durable as the stream.
//! - **NATS unreachable.** Purges still apply locally at once and wait in the outbox; the
//!   receipt says fleet delivery is pending. A node that never reaches NATS says it is ready
//!   after `startup_wait`, with a warning, rather than withdraw from service.
//!
//! The engine is NATS's: ordering, storage, redelivery and cluster replication are JetStream's.
//! This crate only decides what is published, when a node counts as caught up, and what a
//! receipt says. It knows nothing of the edge: the node applies purges through [`Applier`].

mod outbox;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, object_store, stream};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use outpost_purge_api::PurgeRequest;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use self::outbox::Outbox;

/// How a node reaches NATS and what it calls things there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// NATS server URLs (`nats://host:4222`, `tls://…`); the client fails over between them.
    pub servers: Vec<String>,
    /// This node's name in the fleet (the node's `name`): letters, digits, `-` and `_`.
    pub node: String,
    /// The JetStream stream (and the prefix of its subject and bucket).
    pub stream: String,
    pub auth: FleetAuth,
    /// CA certificates (PEM) for a NATS server with TLS; implies TLS.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_required: bool,
    /// How long a purge's receipt waits for the other nodes.
    pub receipt_wait: Duration,
    /// How long the stream keeps purges: a node away for longer clears its cache on return.
    pub max_age: Duration,
    /// Copies of the streams a NATS cluster keeps (1 on a single server, 3 on the usual
    /// three-server cluster).
    pub replicas: usize,
    /// A node that cannot reach NATS at start says it is ready after this long.
    pub startup_wait: Duration,
    /// The outbox and this node's applied sequence.
    pub state_dir: PathBuf,
}

/// Credentials for NATS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FleetAuth {
    #[default]
    None,
    Token(String),
    UserPassword(String, String),
    /// A `.creds` file (JWT and nkey seed).
    CredsFile(PathBuf),
    /// An nkey seed (`SU…`).
    Nkey(String),
}

/// A purge as it travels through the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPurge {
    pub id: String,
    /// The node that accepted it.
    pub origin: String,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub request: PurgeRequest,
}

/// A pushed object's announcement: stored (with its description) or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPush {
    pub id: String,
    pub origin: String,
    pub at_ms: u64,
    /// The object's path (`/css/site.css`).
    pub path: String,
    /// `None`: the object was deleted.
    pub object: Option<PushedObject>,
}

/// What a node needs to store a pushed object besides its bytes (which travel through the
/// fleet's object store, named by their SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedObject {
    /// Hex SHA-256 of the body.
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
    pub cache_control: String,
    pub tags: Vec<String>,
}

/// A body as the fleet hands it over.
pub type Body = futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>;

/// What waits in the outbox: a purge, or a push or delete to announce (a push's bytes are read
/// from the node's own store when it is sent, so the outbox holds no bodies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Outgoing {
    Purge(FleetPurge),
    Push { id: String, path: String },
    Delete { id: String, path: String },
}

/// The node side: how what the fleet carries is applied here.
pub trait Applier: Send + Sync + 'static {
    /// Applies a purge another node accepted, on this node only.
    fn apply(&self, purge: &PurgeRequest) -> BoxFuture<'static, Result<(), String>>;

    /// Stores an object pushed on another node; returns the SHA-256 (hex) of what it stored.
    fn store_pushed(
        &self,
        path: &str,
        object: &PushedObject,
        body: Body,
    ) -> BoxFuture<'static, Result<String, String>>;

    /// Deletes a pushed object (one that is not there is fine).
    fn delete_pushed(&self, path: &str) -> BoxFuture<'static, Result<(), String>>;

    /// An object pushed here, to send to the fleet; `None` when it is gone.
    fn read_pushed(&self, path: &str) -> BoxFuture<'static, Option<(PushedObject, Body)>>;
}

/// What one node reports in the fleet's bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The last stream sequence it applied.
    pub applied: u64,
    /// When it reported, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Caught up with the stream since its start.
    pub ready: bool,
    /// A random id of the reporting process: two processes reporting under one name (a copied
    /// config) are told apart, and warned about.
    #[serde(default)]
    pub instance: u64,
    /// An operator took this node out of the fleet ([`Fleet::forget`]): receipts stop waiting
    /// for it. A node still running reports again and is back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forgotten: bool,
}

/// One node in a receipt or in [`FleetStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub node: String,
    /// The last stream sequence it applied, as last reported.
    pub applied: u64,
    /// Sequences it has yet to apply (the stream's last sequence minus `applied`).
    pub lag: u64,
    pub ready: bool,
    pub reported_at_ms: u64,
}

/// The outcome of publishing one purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// In the stream at this sequence.
    At(u64),
    /// In the outbox: NATS did not acknowledge it (yet); it is published when it can be.
    Pending(String),
}

/// `/fleet`: the node's view of the fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetStatus {
    pub node: String,
    pub stream: String,
    pub connected: bool,
    pub ready: bool,
    /// The stream's last sequence, as last seen.
    pub last_seq: u64,
    /// How long the stream keeps purges, in seconds, as NATS last said (0: not seen yet).
    pub max_age_secs: u64,
    pub applied: u64,
    pub outbox: u64,
    pub published: u64,
    pub applied_purges: u64,
    pub replayed: u64,
    pub cleared: u64,
    /// The last error talking to NATS, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub nodes: Vec<NodeState>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct FleetCounters {
    pub published: AtomicU64,
    /// Purges from other nodes applied here (replayed ones included).
    pub applied: AtomicU64,
    /// Of those, applied while catching up after a start.
    pub replayed: AtomicU64,
    /// Whole-cache clears because purges expired unseen.
    pub cleared: AtomicU64,
    pub publish_failures: AtomicU64,
    /// Objects pushed (or deleted) on other nodes and applied here.
    pub pushes_applied: AtomicU64,
    /// Announced pushes that could not be stored here (logged; the stream goes on).
    pub push_failures: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet state directory {dir}: {source}")]
    State { dir: PathBuf, source: io::Error },
    #[error("NATS credentials: {0}")]
    Credentials(String),
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("node", &self.cfg.node)
            .field("stream", &self.cfg.stream)
            .finish_non_exhaustive()
    }
}

/// A running fleet membership. Cheap to share (`Arc`).
pub struct Fleet {
    cfg: FleetConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    applier: Arc<dyn Applier>,
    outbox: Outbox,
    /// Wakes the outbox task, the one sender: purges, pushes and deletes go out in the order
    /// they were accepted.
    outbox_kick: Notify,
    /// Callers waiting for their outbox entry's sequence.
    waiters: Mutex<
        std::collections::HashMap<PathBuf, tokio::sync::oneshot::Sender<Result<u64, String>>>,
    >,
    /// This process's id in its reports.
    instance: u64,
    /// When this node last reported (reports are spaced while a backlog is applied).
    last_report: Mutex<Option<Instant>>,
    /// The stream's creation time (Unix ns) the applied sequence counts in: a stream made anew
    /// restarts its sequences.
    stream_created: AtomicU64,
    /// The purge stream's `max_age` in seconds, as NATS last said.
    stream_max_age: AtomicU64,
    /// Nodes as reported in the bucket.
    nodes: Mutex<BTreeMap<String, NodeReport>>,
    /// Signalled whenever `nodes` changes.
    nodes_changed: Notify,
    applied: AtomicU64,
    last_seq: AtomicU64,
    caught_up: AtomicBool,
    /// Ever set up against the stream since the start.
    reached: AtomicBool,
    started: Instant,
    readiness_warned: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// The consumer, report watcher and outbox tasks, stopped by [`Fleet::close`].
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub counters: FleetCounters,
}

/// The object store's digest of a body whose SHA-256 is `hex`: `SHA-256=` and its URL-safe
/// base64.
fn object_digest(hex: &str) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(bytes)
    )
}

/// While a backlog is applied, a node reports its progress this often.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// How long one pull request for purges lives on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(4);

/// How long a push's announcement waits for its upload before the outbox takes over.
const PUSH_SEND_WAIT: Duration = Duration::from_secs(30);

/// A purge delivered and not acknowledged within this long is delivered again.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// Where `nats-server` is installed: on `PATH`, or in `/usr/sbin` (Debian's package) or
/// `/usr/local/bin`. For `outpost demo --fleet`, the tests and the bench.
pub fn nats_server_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/local/bin".into()])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// Why a message was not published; `permanent`: it never will be.
struct SendError {
    permanent: bool,
    message: String,
}

impl SendError {
    fn transient(message: String) -> Self {
        Self {
            permanent: false,
            message,
        }
    }

    fn permanent(message: String) -> Self {
        Self {
            permanent: true,
            message,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads this node's applied sequence and the creation time (Unix ns) of the stream it counts
/// in (0 when not recorded).
fn read_applied(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut parts = text.split_whitespace();
    let seq = parts.next()?.parse().ok()?;
    let created = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    Some((seq, created))
}

impl Fleet {
    /// Connects (in the background: NATS need not be up) and starts the fleet's tasks.
    pub async fn start(
        cfg: FleetConfig,
        applier: Arc<dyn Applier>,
    ) -> Result<Arc<Self>, FleetError> {
        let state = |source| FleetError::State {
            dir: cfg.state_dir.clone(),
            source,
        };
        let outbox = Outbox::open(&cfg.state_dir.join("outbox")).map_err(state)?;
        let (applied, created) = read_applied(&cfg.state_dir.join("applied")).unwrap_or((0, 0));
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("outpost {}", cfg.node))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100 * 2u64.saturating_pow(attempt.min(5) as u32)).min(2000))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => info!("fleet: connected to NATS"),
                    async_nats::Event::Disconnected => {
                        warn!("fleet: NATS connection lost; purges wait in the outbox")
                    }
                    other => info!(event = %other, "fleet: NATS event"),
                }
            });
        opts = match &cfg.auth {
            FleetAuth::None => opts,
            FleetAuth::Token(t) => opts.token(t.clone()),
            FleetAuth::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
            FleetAuth::CredsFile(p) => opts
                .credentials_file(p)
                .await
                .map_err(|e| FleetError::Credentials(format!("{}: {e}", p.display())))?,
            FleetAuth::Nkey(seed) => opts.nkey(seed.clone()),
        };
        if let Some(ca) = &cfg.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        } else if cfg.tls_required {
            opts = opts.require_tls(true);
        }
        let servers: Vec<async_nats::ServerAddr> =
            cfg.servers.iter().filter_map(|s| s.parse().ok()).collect();
        // With retry_on_initial_connect this returns at once; the client connects (and
        // reconnects) in the background.
        let client = opts
            .connect(servers)
            .await
            .map_err(|e| FleetError::Credentials(e.to_string()))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(2));
        let fleet = Arc::new(Self {
            cfg,
            client,
            js,
            applier,
            outbox,
            outbox_kick: Notify::new(),
            waiters: Mutex::new(std::collections::HashMap::new()),
            instance: {
                use std::hash::{BuildHasher, RandomState};
                RandomState::new().hash_one((std::process::id(), now_ms())) | 1
            },
            last_report: Mutex::new(None),
            stream_created: AtomicU64::new(created),
            stream_max_age: AtomicU64::new(0),
            nodes: Mutex::new(BTreeMap::new()),
            nodes_changed: Notify::new(),
            applied: AtomicU64::new(applied),
            last_seq: AtomicU64::new(0),
            caught_up: AtomicBool::new(false),
            reached: AtomicBool::new(false),
            started: Instant::now(),
            readiness_warned: AtomicBool::new(false),
            last_error: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            counters: FleetCounters::default(),
        });
        *fleet.tasks.lock().unwrap_or_else(|e| e.into_inner()) = vec![
            tokio::spawn(fleet.clone().consume_forever()),
            tokio::spawn(fleet.clone().watch_forever()),
            tokio::spawn(fleet.clone().drain_outbox_forever()),
        ];
        Ok(fleet)
    }

    /// Stops applying and publishing (the node is shutting down): what is not acknowledged
    /// is delivered again to the next start, and the outbox keeps what was not published.
    pub async fn close(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.drain()).await;
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn receipt_wait(&self) -> Duration {
        self.cfg.receipt_wait
    }

    fn subject(&self) -> String {
        format!("{}.purge", self.cfg.stream)
    }

    fn push_subject(&self) -> String {
        format!("{}.push", self.cfg.stream)
    }

    fn objects_bucket(&self) -> String {
        format!("{}_OBJECTS", self.cfg.stream)
    }

    /// The stream of node reports: one subject per node, the last report kept.
    fn nodes_stream(&self) -> String {
        format!("{}_NODES", self.cfg.stream)
    }

    fn node_subject(&self, node: &str) -> String {
        format!("{}.nodes.{node}", self.cfg.stream)
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Ready to serve: caught up with the stream since the start, or NATS was never reached
    /// within `startup_wait` (with a warning: purges made meanwhile are applied when it is).
    pub fn ready(&self) -> bool {
        if self.caught_up.load(Ordering::Acquire) {
            return true;
        }
        if !self.reached.load(Ordering::Acquire) && self.started.elapsed() >= self.cfg.startup_wait
        {
            if !self.readiness_warned.swap(true, Ordering::Relaxed) {
                warn!(
                    wait = ?self.cfg.startup_wait,
                    "fleet: NATS unreachable since the start; ready without catching up (purges made meanwhile apply once NATS is back)"
                );
            }
            return true;
        }
        false
    }

    /// The applied sequence and the stream's last, for `/readyz`.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.applied.load(Ordering::Acquire),
            self.last_seq.load(Ordering::Acquire),
        )
    }

    pub fn outbox_depth(&self) -> u64 {
        self.outbox.depth()
    }

    /// Sends a purge this node accepted (and applied) to the fleet: durably into the outbox,
    /// then to the stream. Waits at most `receipt_wait` for JetStream's acknowledgement.
    pub async fn publish(&self, id: String, request: &PurgeRequest) -> io::Result<Published> {
        let purge = Outgoing::Purge(FleetPurge {
            id,
            origin: self.cfg.node.clone(),
            at_ms: now_ms(),
            request: PurgeRequest {
                local: true,
                ..request.clone()
            },
        });
        self.publish_outgoing(purge, self.cfg.receipt_wait).await
    }

    /// Announces an object pushed here (its bytes go to the fleet's object store), so every
    /// node stores it; durable like a purge.
    pub async fn announce_push(&self, id: String, path: &str) -> io::Result<Published> {
        let push = Outgoing::Push {
            id,
            path: path.to_string(),
        };
        self.publish_outgoing(push, PUSH_SEND_WAIT).await
    }

    /// Announces the deletion of an object pushed here.
    pub async fn announce_delete(&self, id: String, path: &str) -> io::Result<Published> {
        let delete = Outgoing::Delete {
            id,
            path: path.to_string(),
        };
        self.publish_outgoing(delete, self.cfg.receipt_wait).await
    }

    /// Into the outbox, then to NATS within `wait` (or later, by the outbox task).
    /// The outbox task is the only sender, so what this node accepted goes out in order and
    /// never twice at once; the caller waits up to `wait` for its entry's sequence.
    async fn publish_outgoing(&self, out: Outgoing, wait: Duration) -> io::Result<Published> {
        let file = self.outbox.add(&out)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(file.clone(), tx);
        self.outbox_kick.notify_one();
        let answer = tokio::time::timeout(wait, rx).await;
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&file);
        Ok(match answer {
            Ok(Ok(Ok(seq))) => Published::At(seq),
            Ok(Ok(Err(e))) => Published::Pending(e),
            Ok(Err(_)) | Err(_) => {
                let last = self
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                Published::Pending(match last {
                    Some(e) => format!("NATS did not acknowledge within {wait:?} ({e})"),
                    None => format!("NATS did not acknowledge within {wait:?}"),
                })
            }
        })
    }

    /// Publishes one message (a push's bytes first) and waits for its acknowledgement.
    async fn send(&self, out: &Outgoing) -> Result<u64, SendError> {
        let (subject, id, payload) = match out {
            Outgoing::Purge(purge) => (
                self.subject(),
                &purge.id,
                serde_json::to_vec(purge).map_err(|e| SendError::permanent(e.to_string()))?,
            ),
            Outgoing::Push { id, path } => {
                let object = match self.applier.read_pushed(path).await {
                    Some((object, body)) => {
                        self.upload(&object, body)
                            .await
                            .map_err(SendError::transient)?;
                        Some(object)
                    }
                    // Deleted since: its own announcement follows.
                    None => return Ok(0),
                };
                let push = self.push_message(id, path, object);
                (self.push_subject(), id, push)
            }
            Outgoing::Delete { id, path } => {
                (self.push_subject(), id, self.push_message(id, path, None))
            }
        };
        let msg = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(id);
        let ack = self
            .js
            .send_publish(subject, msg)
            .await
            .map_err(|e| SendError {
                permanent: e.kind()
                    == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded,
                message: e.to_string(),
            })?
            .await
            .map_err(|e| SendError::transient(e.to_string()))?;
        if !ack.duplicate {
            self.counters.published.fetch_add(1, Ordering::Relaxed);
        }
        self.last_seq.fetch_max(ack.sequence, Ordering::AcqRel);
        Ok(ack.sequence)
    }

    fn push_message(&self, id: &str, path: &str, object: Option<PushedObject>) -> Vec<u8> {
        let push = FleetPush {
            id: id.to_string(),
            origin: self.cfg.node.clone(),
            at_ms: now_ms(),
            path: path.to_string(),
            object,
        };
        serde_json::to_vec(&push).unwrap_or_default()
    }

    async fn objects(&self) -> Result<object_store::ObjectStore, String> {
        match self.js.get_object_store(self.objects_bucket()).await {
            Ok(store) => Ok(store),
            Err(_) => self
                .js
                .create_object_store(object_store::Config {
                    bucket: self.objects_bucket(),
                    max_age: self.cfg.max_age,
                    storage: stream::StorageType::File,
                    num_replicas: self.cfg.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Puts a pushed body into the fleet's object store under its SHA-256 (once: a body
    /// already there is not sent again).
    async fn upload(&self, object: &PushedObject, body: Body) -> Result<(), String> {
        let store = self.objects().await?;
        if store.info(&object.sha256).await.is_ok() {
            return Ok(());
        }
        let mut reader =
            tokio_util::io::StreamReader::new(body.map(|r| r.map_err(io::Error::other)));
        store
            .put(object.sha256.as_str(), &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Applies a push announcement, in stream order, whichever node made it: the object from
    /// the object store (unless this node already holds those bytes), or its deletion. `Err`:
    /// worth trying again (NATS did not answer).
    async fn fetch_pushed(&self, push: &FleetPush) -> Result<(), String> {
        let path = &outpost_purge_api::path::encode_object_path(&push.path);
        if !push.path.starts_with('/')
            || outpost_purge_api::path::object_path(path).as_deref() != Ok(push.path.as_str())
        {
            warn!(path = %push.path, "fleet: a push announcement names an invalid path; skipped");
            return Ok(());
        }
        let Some(object) = &push.object else {
            return self
                .applier
                .delete_pushed(&push.path)
                .await
                .map_err(|e| format!("store: {e}"));
        };
        if let Some((held, _)) = self.applier.read_pushed(&push.path).await
            && held.sha256 == object.sha256
        {
            return Ok(());
        }
        let store = self.objects().await?;
        let body = match store.get(&object.sha256).await {
            Ok(o) => {
                if o.info.digest.as_deref() != Some(object_digest(&object.sha256).as_str()) {
                    warn!(path = %push.path, "fleet: a pushed object's bytes in the object store do not match its announcement; not stored here");
                    return Ok(());
                }
                tokio_util::io::ReaderStream::new(o)
                    .map(|r| r.map_err(|e| e.to_string()))
                    .boxed()
            }
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                // Expired from the store (older than max_age): nothing to fetch.
                warn!(path = %push.path, "fleet: a pushed object's bytes are gone from the object store; not stored here");
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        let stored = self
            .applier
            .store_pushed(&push.path, object, body)
            .await
            .map_err(|e| format!("store: {e}"))?;
        if stored != object.sha256 {
            self.applier.delete_pushed(&push.path).await?;
            return Err(format!(
                "pushed object {} arrived with SHA-256 {stored}, announced {}",
                push.path, object.sha256
            ));
        }
        Ok(())
    }

    /// Each known node and its state, once every node reports `seq` or `wait` has passed.
    pub async fn receipt(&self, seq: u64, wait: Duration) -> Vec<NodeState> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.nodes_changed.notified();
            let nodes = self.node_states();
            if nodes.iter().all(|n| n.applied >= seq) {
                return nodes;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.node_states();
            }
        }
    }

    fn node_states(&self) -> Vec<NodeState> {
        let last = self.last_seq.load(Ordering::Acquire);
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // This node's own state is known here first.
        nodes.insert(
            self.cfg.node.clone(),
            NodeReport {
                applied: self.applied.load(Ordering::Acquire),
                at_ms: now_ms(),
                ready: self.ready(),
                instance: self.instance,
                forgotten: false,
            },
        );
        nodes
            .into_iter()
            .map(|(node, r)| NodeState {
                lag: last.saturating_sub(r.applied),
                node,
                applied: r.applied,
                ready: r.ready,
                reported_at_ms: r.at_ms,
            })
            .collect()
    }

    /// Takes a node that left for good out of the fleet's receipts (its last report is
    /// replaced by a tombstone). `Ok(false)` when no such node is known.
    pub async fn forget(&self, node: &str) -> Result<bool, String> {
        let known = self
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(node);
        if !known {
            return Ok(false);
        }
        let tombstone = NodeReport {
            applied: 0,
            at_ms: now_ms(),
            ready: false,
            instance: 0,
            forgotten: true,
        };
        let json = serde_json::to_vec(&tombstone).map_err(|e| e.to_string())?;
        self.js
            .publish(self.node_subject(node), json.into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    pub fn status(&self) -> FleetStatus {
        let c = &self.counters;
        FleetStatus {
            node: self.cfg.node.clone(),
            stream: self.cfg.stream.clone(),
            connected: self.connected(),
            ready: self.ready(),
            last_seq: self.last_seq.load(Ordering::Acquire),
            max_age_secs: self.stream_max_age.load(Ordering::Relaxed),
            applied: self.applied.load(Ordering::Acquire),
            outbox: self.outbox_depth(),
            published: c.published.load(Ordering::Relaxed),
            applied_purges: c.applied.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            cleared: c.cleared.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            nodes: self.node_states(),
        }
    }

    /// The purge stream, made if missing; a stream made with another `max_age` or replica
    /// count (the config changed since) is updated to this node's.
    async fn stream(&self) -> Result<stream::Stream, String> {
        let config = stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![self.subject(), self.push_subject()],
            storage: stream::StorageType::File,
            max_age: self.cfg.max_age,
            num_replicas: self.cfg.replicas,
            duplicate_window: Duration::from_secs(120).min(self.cfg.max_age),
            ..Default::default()
        };
        let mut stream = self
            .js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let current = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .config
            .clone();
        if current.max_age != config.max_age || current.num_replicas != config.num_replicas {
            info!(
                max_age = ?config.max_age,
                replicas = config.num_replicas,
                "fleet: updating the purge stream to this node's settings"
            );
            let update = stream::Config {
                duplicate_window: current.duplicate_window.min(config.max_age),
                ..config
            };
            match self.js.update_stream(&update).await {
                Ok(info) => self
                    .stream_max_age
                    .store(info.config.max_age.as_secs(), Ordering::Relaxed),
                Err(e) => {
                    warn!(error = %e, "fleet: the purge stream's settings could not be updated")
                }
            }
        } else {
            self.stream_max_age
                .store(current.max_age.as_secs(), Ordering::Relaxed);
        }
        Ok(stream)
    }

    /// The node reports' stream: like a key-value bucket (the last message per subject), made
    /// as a plain stream so that NATS 2.9 (Debian's) serves it.
    async fn reports(&self) -> Result<stream::Stream, String> {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.nodes_stream(),
                subjects: vec![self.node_subject("*")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::Old,
                num_replicas: self.cfg.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads the stream through this node's durable consumer, forever (reconnecting).
    async fn consume_forever(self: Arc<Self>) {
        let mut warned = false;
        loop {
            if let Err(e) = self.consume().await {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                if !warned || self.reached.load(Ordering::Relaxed) {
                    warn!(error = %e, "fleet: not reading the purge stream; retrying");
                }
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn consume(&self) -> Result<(), String> {
        let mut stream = self.stream().await?;
        self.reports().await?;
        let info = stream.info().await.map_err(|e| e.to_string())?.clone();
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        self.last_seq.fetch_max(last, Ordering::AcqRel);
        let applied = self.applied.load(Ordering::Acquire);
        let created = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
        let known = self.stream_created.load(Ordering::Acquire);
        // Purges this node never saw have expired, or the stream was made anew (its sequences
        // start again): it cannot know what they purged, so it clears everything.
        let missed = (known != 0 && known != created)
            || applied > last
            || (applied < last && applied + 1 < first);
        self.stream_created.store(created, Ordering::Release);
        // A new consumer starts after what this node applied (after everything, once it has
        // cleared its cache); an existing one goes on from its own acknowledgements.
        let start = if missed { last + 1 } else { applied + 1 };
        let name = format!("node-{}", self.cfg.node);
        // A consumer left from before resumes where it acknowledged, which can differ from what
        // this node recorded (a crash between the two, a restored or wiped cache directory):
        // this node's record decides, so it is made again from there.
        if let Ok(mut existing) = stream.get_consumer::<consumer::pull::Config>(&name).await
            && let Ok(ci) = existing.info().await
            && ci.ack_floor.stream_sequence + 1 != start
        {
            let _ = stream.delete_consumer(&name).await;
        }
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: start.max(1),
                    },
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    // One at a time: a purge is applied, and counted applied, only after every
                    // one before it, even when one is delivered again.
                    max_ack_pending: 1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        if missed {
            warn!(
                applied,
                first,
                last,
                "fleet: purges this node missed have expired from the stream; clearing its cache"
            );
            let all = PurgeRequest {
                all: true,
                local: true,
                ..Default::default()
            };
            self.applier.apply(&all).await?;
            self.counters.cleared.fetch_add(1, Ordering::Relaxed);
            self.applied.store(0, Ordering::Release);
            self.record(last).await;
        }
        self.reached.store(true, Ordering::Release);
        let target = last;
        if self.applied.load(Ordering::Acquire) >= target {
            self.mark_caught_up().await;
        }
        // Short pull requests: one left on the server by a node that stopped would take the
        // next purges until it expires, and they would come back only after `ack_wait`.
        let mut messages = consumer
            .stream()
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_EXPIRES / 2)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| e.to_string())?;
            let (seq, pending) = {
                let i = msg.info().map_err(|e| e.to_string())?;
                (i.stream_sequence, i.pending)
            };
            let retry = async |what: &str, e: String| {
                warn!(seq, error = %e, "fleet: {what}; trying again in a second");
                let _ = msg
                    .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            };
            if msg.subject.as_str() == self.push_subject() {
                match serde_json::from_slice::<FleetPush>(&msg.payload) {
                    // Every node's, this one's too: pushes and deletes of one path made on two
                    // nodes end the same everywhere, in stream order.
                    Ok(push) => match self.fetch_pushed(&push).await {
                        Ok(()) => {
                            if push.origin != self.cfg.node {
                                self.counters.pushes_applied.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) if e.starts_with("store:") => {
                            // This node could not store it (disk full, say): logged and
                            // counted, and the stream goes on.
                            self.counters.push_failures.fetch_add(1, Ordering::Relaxed);
                            warn!(seq, path = %push.path, error = %e, "fleet: a pushed object was not stored here");
                        }
                        Err(e) => {
                            retry("a pushed object could not be fetched", e).await;
                            continue;
                        }
                    },
                    Err(e) => {
                        warn!(seq, error = %e, "fleet: a push announcement does not parse; skipped")
                    }
                }
            } else {
                match serde_json::from_slice::<FleetPurge>(&msg.payload) {
                    Ok(purge) if purge.origin != self.cfg.node => {
                        if let Err(e) = self.applier.apply(&purge.request).await {
                            retry("a purge could not be applied", e).await;
                            continue;
                        }
                        self.counters.applied.fetch_add(1, Ordering::Relaxed);
                        if !self.caught_up.load(Ordering::Acquire) {
                            self.counters.replayed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // This node's own purge: applied when it was accepted.
                    Ok(_) => {}
                    Err(e) => {
                        warn!(seq, error = %e, "fleet: a message in the purge stream is not a purge; skipped")
                    }
                }
            }
            msg.ack().await.map_err(|e| e.to_string())?;
            self.last_seq.fetch_max(seq, Ordering::AcqRel);
            // Reports are spaced while a backlog is applied; the last of one goes out at once.
            self.save_applied(seq);
            if seq >= target {
                self.mark_caught_up().await;
            } else if pending == 0 || self.report_due() {
                self.report().await;
            }
        }
        Err("the purge stream's subscription ended".into())
    }

    async fn mark_caught_up(&self) {
        if !self.caught_up.swap(true, Ordering::AcqRel) {
            info!(
                applied = self.applied.load(Ordering::Acquire),
                "fleet: caught up with the purge stream; ready"
            );
        }
        self.report().await;
    }

    /// Records `seq` as applied and reports it.
    async fn record(&self, seq: u64) {
        self.save_applied(seq);
        self.report().await;
    }

    /// Records `seq` as applied in this node's file (with the stream it counts in).
    fn save_applied(&self, seq: u64) {
        self.applied.fetch_max(seq, Ordering::AcqRel);
        let seq = self.applied.load(Ordering::Acquire);
        let created = self.stream_created.load(Ordering::Acquire);
        let path = self.cfg.state_dir.join("applied");
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, format!("{seq} {created}"))
            .and_then(|()| std::fs::rename(&tmp, &path))
        {
            warn!(error = %e, file = %path.display(), "fleet: the applied sequence could not be saved");
        }
    }

    /// Whether a report is due while a backlog is applied (one every [`REPORT_EVERY`]).
    fn report_due(&self) -> bool {
        self.last_report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t.elapsed() >= REPORT_EVERY)
    }

    /// Reports this node's applied sequence to the fleet.
    async fn report(&self) {
        *self.last_report.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let report = NodeReport {
            applied: self.applied.load(Ordering::Acquire),
            at_ms: now_ms(),
            ready: self.caught_up.load(Ordering::Acquire),
            instance: self.instance,
            forgotten: false,
        };
        let Ok(json) = serde_json::to_vec(&report) else {
            return;
        };
        let sent = match self
            .js
            .publish(self.node_subject(&self.cfg.node), json.into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            warn!(error = %e, "fleet: the applied sequence could not be reported");
        }
    }

    /// Follows the node reports (the last of each node, then every new one), for receipts and
    /// `/fleet`.
    async fn watch_forever(self: Arc<Self>) {
        loop {
            if let Err(e) = self.watch().await {
                tracing::debug!(error = %e, "fleet: node reports not followed; retrying");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn watch(&self) -> Result<(), String> {
        let reports = self.reports().await?;
        let prefix = self.node_subject("");
        let consumer = reports
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.node_subject("*"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| e.to_string())?;
            let Some(node) = msg.subject.strip_prefix(prefix.as_str()) else {
                continue;
            };
            if let Ok(r) = serde_json::from_slice::<NodeReport>(&msg.payload) {
                if r.forgotten {
                    self.nodes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(node);
                    self.nodes_changed.notify_waiters();
                    if node == self.cfg.node {
                        // Still here: back in the fleet.
                        self.report().await;
                    }
                    continue;
                }
                if node == self.cfg.node && r.instance != 0 && r.instance != self.instance {
                    let e = format!(
                        "another process reports as node {node}: every node of a fleet needs its own name"
                    );
                    warn!("fleet: {e}");
                    *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    continue;
                }
                self.nodes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(node.to_string(), r);
                self.nodes_changed.notify_waiters();
            }
        }
        Err("the node reports' subscription ended".into())
    }

    /// Publishes what waits in the outbox, oldest first, whenever NATS can take it: the one
    /// sender of everything this node accepted.
    async fn drain_outbox_forever(self: Arc<Self>) {
        let mut reported: Option<String> = None;
        loop {
            let waiting = self.outbox.waiting();
            let mut stuck = false;
            for w in waiting {
                let answer = match self.send(&w.message).await {
                    Ok(seq) => {
                        self.outbox.remove(&w.file);
                        reported = None;
                        Ok(seq)
                    }
                    Err(e) if e.permanent => {
                        // It can never be published (larger than NATS takes): set aside, so
                        // what follows it is not held up for ever.
                        warn!(file = %w.file.display(), error = %e.message, "fleet: an outbox entry NATS refuses for good; set aside (.bad)");
                        self.outbox.set_aside(&w.file);
                        Err(e.message)
                    }
                    Err(e) => {
                        self.counters
                            .publish_failures
                            .fetch_add(1, Ordering::Relaxed);
                        if reported.as_deref() != Some(e.message.as_str()) {
                            warn!(error = %e.message, waiting = self.outbox.depth(), "fleet: cannot publish to NATS; purges and pushes wait in the outbox");
                            reported = Some(e.message.clone());
                        }
                        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(e.message);
                        stuck = true;
                        break;
                    }
                };
                let waiter = self
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&w.file);
                if let Some(tx) = waiter {
                    let _ = tx.send(answer);
                }
            }
            let pause = if stuck {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(5)
            };
            let _ = tokio::time::timeout(pause, self.outbox_kick.notified()).await;
        }
    }
}
