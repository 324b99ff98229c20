//! The edge side of the operator API (`outpost-purge-api`): purges and pushes applied to this
//! node's engine, and fanned out to its shields so a purge sent to one edge reaches the tier
//! behind it (the receipt reports each node).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use outpost_purge_api::{
    AdminBackend, AdminClient, AdminError, NodeResult, PurgeReceipt, PurgeRequest, PushReceipt,
    PushSpec, PushedObject,
};
use tracing::{info, warn};

use crate::cache::push_store;
use crate::cache::{Engine, PurgeSpec};
use crate::config::ShieldSpec;
use crate::observe::metrics::EdgeMetrics;

/// The admin tokens, replaceable by a config reload.
pub type SharedAuth = Arc<arc_swap::ArcSwap<outpost_purge_api::Auth>>;

#[derive(Clone)]
pub struct EdgeOperator {
    pub engine: Arc<Engine>,
    pub metrics: Arc<EdgeMetrics>,
    pub node: String,
    /// This edge's shields: purges and pushes are forwarded to them.
    pub shields: Vec<ShieldSpec>,
    /// Sibling nodes: purges (not pushes; a sibling pulls a pushed object from the shield) are
    /// forwarded to them.
    pub siblings: Vec<(String, std::net::SocketAddr)>,
    pub peer_token: Option<String>,
    /// Fleet mode: purges go to every node through NATS JetStream instead of the one-hop
    /// forwards to shields and siblings.
    pub fleet: Option<Arc<outpost_fleet::Fleet>>,
}

/// What a node of the fleet applies: a purge from another node, on this node only.
pub struct FleetApplier(pub EdgeOperator);

impl outpost_fleet::Applier for FleetApplier {
    fn apply(&self, purge: &PurgeRequest) -> BoxFuture<'static, Result<(), String>> {
        let this = self.0.clone();
        let purge = purge.clone();
        async move {
            this.purge_local(&purge)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn store_pushed(
        &self,
        path: &str,
        object: &outpost_fleet::PushedObject,
        body: outpost_fleet::Body,
    ) -> BoxFuture<'static, Result<String, String>> {
        let engine = self.0.engine.clone();
        let spec = push_store::PushSpec {
            path: path.to_string(),
            content_type: object.content_type.clone(),
            cache_control: object.cache_control.clone(),
            tags: object.tags.clone(),
            content_length: Some(object.size),
        };
        async move {
            let (info, _) = engine.push(spec, body).await.map_err(|e| e.to_string())?;
            Ok(info.etag.trim_matches('"').to_string())
        }
        .boxed()
    }

    fn delete_pushed(&self, path: &str) -> BoxFuture<'static, Result<(), String>> {
        let engine = self.0.engine.clone();
        let path = path.to_string();
        async move {
            engine.delete_pushed(&path).await;
            Ok(())
        }
        .boxed()
    }

    fn read_pushed(
        &self,
        path: &str,
    ) -> BoxFuture<'static, Option<(outpost_fleet::PushedObject, outpost_fleet::Body)>> {
        let engine = self.0.engine.clone();
        let path = path.to_string();
        async move {
            let (meta, size, body) = engine.pushed_body(&path).await?;
            let header = |name| header_text(&meta, name);
            let object = outpost_fleet::PushedObject {
                sha256: header(http::header::ETAG).trim_matches('"').to_string(),
                size,
                content_type: header(http::header::CONTENT_TYPE),
                cache_control: header(http::header::CACHE_CONTROL),
                tags: meta.tags.clone(),
            };
            Some((object, body.map(|r| r.map_err(|e| e.to_string())).boxed()))
        }
        .boxed()
    }
}

/// A stored header's value as text (empty when absent or not text).
fn header_text(meta: &crate::cache::meta::CachedMeta, name: http::header::HeaderName) -> String {
    meta.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A fresh id for a purge or push (receipts, logs, and the fleet's message ids).
fn fresh_id(node: &str, what: &str) -> String {
    blake3::hash(format!("{node}:{what}:{:?}", std::time::SystemTime::now()).as_bytes()).to_hex()
        [..16]
        .to_string()
}

impl EdgeOperator {
    /// Applies a purge locally. Used by the admin API and by the data port's `PURGE` method.
    pub async fn purge_local(&self, req: &PurgeRequest) -> Result<PurgeReceipt, AdminError> {
        let spec = PurgeSpec {
            urls: req.urls.clone(),
            prefixes: req.prefixes.clone(),
            tags: req.tags.clone(),
            all: req.all,
            soft: req.soft,
        };
        let outcome = self.engine.purge(&spec).await.map_err(|e| {
            AdminError::Internal(format!(
                "recording the purge failed: {e} (check cache_dir space and permissions)"
            ))
        })?;
        for kind in req.kinds() {
            self.metrics.record_purge(kind.as_str(), req.soft);
        }
        info!(
            seq = outcome.seq,
            soft = req.soft,
            urls = req.urls.len(),
            prefixes = req.prefixes.len(),
            tags = req.tags.len(),
            all = req.all,
            "purge applied"
        );
        let id = fresh_id(&self.node, &outcome.seq.to_string());
        Ok(PurgeReceipt {
            id,
            seq: outcome.seq,
            soft: req.soft,
            kinds: req.kinds(),
            matched: outcome.matched,
            nodes: vec![NodeResult::applied(self.node.clone())],
            fleet_seq: None,
        })
    }

    /// Fleet mode: publishes an applied purge and lists every node of the fleet in the
    /// receipt, with the sequence it reports, or as pending after the receipt wait.
    async fn purge_fleet(
        &self,
        fleet: &outpost_fleet::Fleet,
        req: &PurgeRequest,
        receipt: &mut PurgeReceipt,
    ) {
        use outpost_fleet::Published;
        let published = match fleet.publish(receipt.id.clone(), req).await {
            Ok(p) => p,
            Err(e) => {
                // Applied here, and it will never reach the others: say so, and fail.
                warn!(id = %receipt.id, error = %e, "purge applied here; the fleet outbox could not be written");
                receipt.nodes[0].ok = false;
                receipt.nodes[0].error = Some(format!(
                    "applied here only: the fleet outbox could not be written ({e}); purge again"
                ));
                return;
            }
        };
        let seq = match published {
            Published::At(seq) => seq,
            Published::Pending(why) => {
                warn!(id = %receipt.id, reason = %why, "purge applied here; fleet delivery pending");
                receipt.nodes[0].error = Some(format!("fleet delivery pending: {why}"));
                receipt.nodes[0].pending = true;
                return;
            }
        };
        receipt.fleet_seq = Some(seq);
        let wait = req
            .wait_ms
            .map_or(fleet.receipt_wait(), std::time::Duration::from_millis);
        let nodes = fleet.receipt(seq, wait).await;
        receipt.nodes = nodes
            .into_iter()
            .map(|n| {
                let mut r = if n.applied >= seq {
                    NodeResult::applied(n.node)
                } else {
                    let why = format!(
                        "not confirmed within {wait:?} (applied {} of {seq})",
                        n.applied
                    );
                    NodeResult {
                        pending: true,
                        ..NodeResult::failed(n.node, why)
                    }
                };
                r.applied_seq = Some(n.applied);
                r
            })
            .collect();
    }
}

impl EdgeOperator {
    /// Sends a stored pushed object to every shield behind this edge, so the whole tier serves
    /// it. Failures are logged with what to do; the local push stands.
    async fn forward_push(&self, path: &str) {
        for peer in &self.shields {
            let Some(admin) = peer.admin else { continue };
            let Some((meta, size, body)) = self.engine.pushed_body(path).await else {
                return;
            };
            let header = |name| header_text(&meta, name);
            let headers = outpost_purge_api::PushHeaders {
                content_type: header(http::header::CONTENT_TYPE),
                cache_control: header(http::header::CACHE_CONTROL),
                surrogate_keys: meta.tags.clone(),
            };
            let result = match AdminClient::new(&format!("http://{admin}"), self.peer_token.clone())
            {
                Ok(c) => c.push_stream(path, body, size, &headers).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => info!(shield = %peer.name, path, "push forwarded to shield"),
                Err(e) => {
                    warn!(shield = %peer.name, path, error = %e, "push not forwarded to shield; push it there again")
                }
            }
        }
    }
}

impl AdminBackend for EdgeOperator {
    fn purge(&self, req: PurgeRequest) -> BoxFuture<'static, Result<PurgeReceipt, AdminError>> {
        let this = self.clone();
        async move {
            let mut receipt = this.purge_local(&req).await?;
            if req.local {
                return Ok(receipt);
            }
            if let Some(fleet) = &this.fleet {
                this.purge_fleet(fleet, &req, &mut receipt).await;
                return Ok(receipt);
            }
            // Fan out to the peers (shields, sibling edges), concurrently, one hop only.
            let forwarded = PurgeRequest {
                local: true,
                ..req.clone()
            };
            let targets = this
                .shields
                .iter()
                .filter_map(|p| p.admin.map(|a| (p.name.clone(), a)))
                .chain(this.siblings.iter().cloned());
            let forwards = targets.map(|(name, admin)| {
                let client = AdminClient::new(&format!("http://{admin}"), this.peer_token.clone());
                let req = forwarded.clone();
                async move {
                    let result = match client {
                        Ok(c) => c.purge(&req).await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = &result {
                        warn!(node = %name, error = %e, "purge not applied on a peer; retry it there");
                    }
                    match result {
                        Ok(()) => NodeResult::applied(name),
                        Err(e) => NodeResult::failed(name, e),
                    }
                }
            });
            receipt
                .nodes
                .extend(futures_util::future::join_all(forwards).await);
            Ok(receipt)
        }
        .boxed()
    }

    fn push(
        &self,
        spec: PushSpec,
        body: BoxStream<'static, Result<Bytes, AdminError>>,
    ) -> BoxFuture<'static, Result<PushReceipt, AdminError>> {
        let engine = self.engine.clone();
        let this = self.clone();
        async move {
            let spec = push_store::PushSpec {
                path: spec.path,
                content_type: spec.content_type,
                cache_control: spec.cache_control,
                tags: spec.surrogate_keys,
                content_length: spec.content_length,
            };
            match engine.push(spec, body).await {
                Ok((info, created)) => {
                    this.forward_push(&info.path).await;
                    if let Some(fleet) = &this.fleet {
                        let id = fresh_id(&this.node, &info.path);
                        match fleet.announce_push(id, &info.path).await {
                            Ok(outpost_fleet::Published::Pending(why)) => {
                                warn!(path = %info.path, reason = %why, "push stored here; fleet delivery pending")
                            }
                            Err(e) => {
                                warn!(path = %info.path, error = %e, "push stored here; not sent to the fleet")
                            }
                            Ok(outpost_fleet::Published::At(_)) => {}
                        }
                    }
                    Ok(PushReceipt {
                        path: info.path,
                        size: info.size,
                        etag: info.etag,
                        created,
                    })
                }
                Err(push_store::PushError::Body(msg)) => Err(AdminError::BadRequest(msg)),
                Err(push_store::PushError::Storage(e))
                    if e.to_string().contains("needs a disk tier") =>
                {
                    Err(AdminError::Unavailable(e.to_string()))
                }
                Err(push_store::PushError::Storage(e)) => Err(AdminError::Internal(format!(
                    "storing the object failed: {e} (check cache_dir space)"
                ))),
            }
        }
        .boxed()
    }

    fn delete_object(&self, path: String) -> BoxFuture<'static, Result<bool, AdminError>> {
        let this = self.clone();
        async move {
            let deleted = this.engine.delete_pushed(&path).await;
            if deleted && let Some(fleet) = &this.fleet {
                let id = fresh_id(&this.node, &path);
                if let Err(e) = fleet.announce_delete(id, &path).await {
                    warn!(path, error = %e, "pushed object deleted here; not sent to the fleet");
                }
            }
            Ok(deleted)
        }
        .boxed()
    }

    fn list_objects(
        &self,
        prefix: String,
    ) -> BoxFuture<'static, Result<Vec<PushedObject>, AdminError>> {
        let engine = self.engine.clone();
        async move {
            Ok(engine
                .list_pushed(&prefix)
                .await
                .into_iter()
                .map(|o| PushedObject {
                    path: o.path,
                    size: o.size,
                    etag: o.etag,
                    content_type: o.content_type,
                    pushed_at_ms: o.pushed_at_ms,
                })
                .collect())
        }
        .boxed()
    }
}
