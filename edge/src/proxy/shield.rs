//! Shield upstream: an edge may send its misses to a set of shields instead of the origin.
//!
//! Each key goes to the shield that wins rendezvous (highest-random-weight) hashing of
//! `blake3(shield name, key hash)`, so every edge sends a given URL to the same shield and the
//! fleet's origin traffic for an object is one fetch. Removing a shield moves only its keys.
//!
//! Health is tracked actively (`GET /healthz` on each shield's admin address) and passively (a
//! connect error or timeout marks a shield down at once). A down shield is skipped: the key
//! goes to the next one in its rendezvous order. When every shield is down the edge goes
//! straight to the origin (CDN fallback).
//!
//! Load is bounded ([`Balance`], HAProxy's `hash-balance-factor`, from Vimeo's consistent
//! hashing with bounded loads): a shield whose requests in flight would pass `factor` times
//! the mean of the healthy shields is skipped for this request, and the key goes to the next
//! one in its order. A hot key or a slow shield then cannot pile requests up behind it, while
//! keys still go to their own shield whenever it keeps up. A shield that comes back from down
//! takes a share that grows from a tenth to all of its bound over `ramp_up`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Method, Request, Uri};
use tracing::{info, warn};

use super::http_client::{HyperUpstream, UpstreamConfig};
use crate::cache::key::KeyHash;
use crate::cache::upstream::{RouteKey, Upstream, UpstreamBody, UpstreamError};
use crate::config::{ShieldBalance as Balance, ShieldSpec};

struct ShieldNode {
    spec: ShieldSpec,
    client: HyperUpstream,
    up: AtomicBool,
    /// Requests sent to it whose answer has not come yet.
    in_flight: AtomicUsize,
    /// When it last came back up (milliseconds since the upstream started); 0: up from the
    /// start, no ramp.
    up_since_ms: AtomicU64,
}

/// One request in flight on a shield, for as long as it lives.
struct InFlight(Arc<ShieldNode>);

impl InFlight {
    fn new(node: &Arc<ShieldNode>) -> Self {
        node.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(node.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ShieldNode {
    fn mark(&self, up: bool, why: &str, now_ms: u64) {
        let was = self.up.swap(up, Ordering::AcqRel);
        if was != up {
            if up {
                self.up_since_ms.store(now_ms.max(1), Ordering::Release);
                info!(shield = %self.spec.name, "shield up; its share ramps up");
            } else {
                warn!(shield = %self.spec.name, reason = why, "shield down; its keys go to the next shield (or the origin)");
            }
        }
    }
}

pub struct ShieldUpstream {
    nodes: Vec<Arc<ShieldNode>>,
    origin: HyperUpstream,
    balance: Balance,
    started: Instant,
}

/// Rendezvous score of a node for a key.
fn score(node: &str, key: &KeyHash) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(node.as_bytes());
    h.update(&[0]);
    h.update(&key.0);
    let out = h.finalize();
    u64::from_be_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Node indices in rendezvous order for a key, best first.
pub fn rendezvous_order(names: &[&str], key: &KeyHash) -> Vec<usize> {
    let mut idx: Vec<(u64, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (score(n, key), i))
        .collect();
    idx.sort_by(|a, b| b.cmp(a));
    idx.into_iter().map(|(_, i)| i).collect()
}

impl ShieldUpstream {
    /// Builds the upstream and starts active health checks every `interval`.
    pub fn start(
        shields: Vec<ShieldSpec>,
        origin: &UpstreamConfig,
        interval: Duration,
        balance: Balance,
    ) -> Arc<Self> {
        let nodes = shields
            .into_iter()
            .map(|spec| {
                let client = HyperUpstream::new(&UpstreamConfig {
                    origin: spec.url.clone(),
                    ..origin.clone()
                });
                Arc::new(ShieldNode {
                    spec,
                    client,
                    up: AtomicBool::new(true),
                    in_flight: AtomicUsize::new(0),
                    up_since_ms: AtomicU64::new(0),
                })
            })
            .collect::<Vec<_>>();
        let this = Arc::new(Self {
            nodes,
            origin: HyperUpstream::new(origin),
            balance,
            started: Instant::now(),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            let http = probe_client();
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { break };
                for node in &this.nodes {
                    let Some(admin) = node.spec.admin else {
                        continue;
                    };
                    let ok = probe(&http, admin, interval).await;
                    node.mark(ok, "health check failed", this.now_ms());
                }
            }
        });
        this
    }

    /// Shield names, for logs and the status page.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.spec.name.clone()).collect()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The healthy shields in the key's rendezvous order, the first of them within its load
    /// bound moved to the front ([`Balance`]).
    fn order(&self, key: &KeyHash) -> Vec<Arc<ShieldNode>> {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.spec.name.as_str()).collect();
        let mut order: Vec<Arc<ShieldNode>> = rendezvous_order(&names, key)
            .into_iter()
            .map(|i| self.nodes[i].clone())
            .filter(|n| n.up.load(Ordering::Acquire))
            .collect();
        if self.balance.factor > 0.0
            && order.len() > 1
            && let Some(p) = order.iter().position(|n| self.within_bound(n, &order))
            && p > 0
        {
            let chosen = order.remove(p);
            order.insert(0, chosen);
        }
        order
    }

    /// Would one more request keep `node` within `factor` times the mean load of the healthy
    /// shields (scaled down while it ramps up)?
    fn within_bound(&self, node: &ShieldNode, healthy: &[Arc<ShieldNode>]) -> bool {
        let total: usize = healthy
            .iter()
            .map(|n| n.in_flight.load(Ordering::Acquire))
            .sum();
        let mean = (total + 1) as f64 / healthy.len() as f64;
        let mut bound = (mean * self.balance.factor).ceil();
        let since = node.up_since_ms.load(Ordering::Acquire);
        if since > 0 && !self.balance.ramp_up.is_zero() {
            let ramp = self.balance.ramp_up.as_millis() as f64;
            let share = (self.now_ms().saturating_sub(since) as f64 / ramp).clamp(0.1, 1.0);
            bound = (bound * share).ceil();
        }
        (node.in_flight.load(Ordering::Acquire) + 1) as f64 <= bound.max(1.0)
    }
}

type ProbeClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

fn probe_client() -> ProbeClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(1)));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(http)
}

async fn probe(client: &ProbeClient, admin: SocketAddr, timeout: Duration) -> bool {
    let Ok(uri) = format!("http://{admin}/healthz").parse::<Uri>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout.max(Duration::from_millis(200)), client.get(uri)).await,
        Ok(Ok(r)) if r.status().is_success()
    )
}

/// A bodiless copy of a request (GET or HEAD), to send again elsewhere.
pub(super) fn rebuild(parts: &http::request::Parts) -> Request<UpstreamBody> {
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
    }
    let mut r = b
        .body(crate::cache::empty_body())
        .expect("parts of a valid request");
    if let Some(k) = parts.extensions.get::<RouteKey>() {
        r.extensions_mut().insert(*k);
    }
    r
}

impl Upstream for ShieldUpstream {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<http::Response<UpstreamBody>, UpstreamError>> {
        let key = req
            .extensions()
            .get::<RouteKey>()
            .map(|k| k.0)
            .unwrap_or_else(|| KeyHash::of(req.uri().path()));
        let order = self.order(&key);
        let idempotent = matches!(*req.method(), Method::GET | Method::HEAD);
        if !idempotent {
            // A body can be sent once: the best healthy shield, or the origin.
            return match order.first() {
                Some(node) => {
                    let in_flight = InFlight::new(node);
                    let fut = node.client.fetch(req);
                    async move {
                        let r = fut.await;
                        drop(in_flight);
                        r
                    }
                    .boxed()
                }
                None => self.origin.fetch(req),
            };
        }
        let (parts, _empty) = req.into_parts();
        let origin_fut = self.origin.fetch(rebuild(&parts));
        let attempts: Vec<(Arc<ShieldNode>, BoxFuture<'static, _>)> = order
            .into_iter()
            .map(|n| {
                let f = n.client.fetch(rebuild(&parts));
                (n, f)
            })
            .collect();
        async move {
            for (node, fut) in attempts {
                let in_flight = InFlight::new(&node);
                let r = fut.await;
                drop(in_flight);
                match r {
                    Ok(resp) => return Ok(resp),
                    // Passive: marked down at once (no ramp-up bookkeeping needed for down).
                    Err(e) => node.mark(false, e.kind(), 0),
                }
            }
            // CDN fallback: no shield could answer.
            origin_fut.await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_spreads_and_moves_only_the_removed_nodes_keys() {
        let three = ["a", "b", "c"];
        let two = ["a", "c"];
        let mut counts = [0usize; 3];
        let mut moved = 0;
        for i in 0..3000 {
            let k = KeyHash::of(&format!("host/obj/{i}"));
            let best3 = rendezvous_order(&three, &k)[0];
            counts[best3] += 1;
            let best2 = two[rendezvous_order(&two, &k)[0]];
            if three[best3] != best2 {
                moved += 1;
                assert_eq!(three[best3], "b", "only b's keys may move");
            }
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
        assert_eq!(moved, counts[1]);
    }

    /// The bound: one more request may not take a shield past `factor` times the mean of
    /// requests in flight; a shield back from down gets a tenth of that at first.
    #[tokio::test]
    async fn bounded_load_and_ramp_up() {
        let spec = |name: &str| ShieldSpec {
            name: name.into(),
            url: "http://127.0.0.1:9".parse().unwrap(),
            admin: None,
        };
        let origin = UpstreamConfig {
            origin: "http://127.0.0.1:9".parse().unwrap(),
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            breaker_failures: 0,
            breaker_cooldown: Duration::from_secs(1),
            max_connections: 4,
            queue_wait: Duration::from_secs(1),
            metrics: None,
            tls: None,
        };
        let up = ShieldUpstream::start(
            vec![spec("a"), spec("b")],
            &origin,
            Duration::from_secs(3600),
            Balance {
                factor: 1.25,
                ramp_up: Duration::from_secs(100),
            },
        );
        let (a, b) = (&up.nodes[0], &up.nodes[1]);
        a.in_flight.store(2, Ordering::Release);
        // mean (2 + 0 + 1) / 2 = 1.5, bound ceil(1.875) = 2: a third request is over.
        assert!(!up.within_bound(a, &up.nodes));
        assert!(up.within_bound(b, &up.nodes));
        a.in_flight.store(1, Ordering::Release);
        assert!(up.within_bound(a, &up.nodes));
        // b comes back from down: a tenth of its bound (at least one request) for now.
        b.mark(false, "test", 0);
        b.mark(true, "test", up.now_ms());
        a.in_flight.store(20, Ordering::Release);
        b.in_flight.store(1, Ordering::Release);
        // mean 11, bound 14, ramped to ceil(1.4) = 2: b may take its second request...
        assert!(up.within_bound(b, &up.nodes));
        b.in_flight.store(2, Ordering::Release);
        // ...but not a third, though the plain bound would allow it.
        assert!(!up.within_bound(b, &up.nodes));
    }
}
