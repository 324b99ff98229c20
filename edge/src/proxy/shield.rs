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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Method, Request, Uri};
use tracing::{info, warn};

use super::http_client::{HyperUpstream, UpstreamConfig};
use crate::cache::key::KeyHash;
use crate::cache::upstream::{RouteKey, Upstream, UpstreamBody, UpstreamError};
use crate::config::ShieldSpec;

struct ShieldNode {
    spec: ShieldSpec,
    client: HyperUpstream,
    up: AtomicBool,
}

impl ShieldNode {
    fn mark(&self, up: bool, why: &str) {
        let was = self.up.swap(up, Ordering::AcqRel);
        if was != up {
            if up {
                info!(shield = %self.spec.name, "shield up");
            } else {
                warn!(shield = %self.spec.name, reason = why, "shield down; its keys go to the next shield (or the origin)");
            }
        }
    }
}

pub struct ShieldUpstream {
    nodes: Vec<Arc<ShieldNode>>,
    origin: HyperUpstream,
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
                })
            })
            .collect::<Vec<_>>();
        let this = Arc::new(Self {
            nodes,
            origin: HyperUpstream::new(origin),
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
                    node.mark(ok, "health check failed");
                }
            }
        });
        this
    }

    /// Shield names, for logs and the status page.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.spec.name.clone()).collect()
    }

    fn order(&self, key: &KeyHash) -> Vec<Arc<ShieldNode>> {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.spec.name.as_str()).collect();
        rendezvous_order(&names, key)
            .into_iter()
            .map(|i| self.nodes[i].clone())
            .filter(|n| n.up.load(Ordering::Acquire))
            .collect()
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

fn rebuild(parts: &http::request::Parts) -> Request<UpstreamBody> {
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
                Some(node) => node.client.fetch(req),
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
                match fut.await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => node.mark(false, e.kind()),
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
}
