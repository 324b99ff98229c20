//! Several origins for one site (`origin`, then `fallback_origins` in order): a request goes to
//! the first usable origin; a connect error, a timeout, an open breaker, or an answer in
//! `[origin_health] failover_statuses` (502, 503, 504 by default) sends an idempotent request
//! on to the next one. Nothing has reached the client then: the engine sees only the answer it
//! keeps. A request with a body goes to the first usable origin only.
//!
//! Health ([`OriginMember`]): `fall` failures in a row (requests, or active probes of
//! `GET <path>` every `interval`) take an origin out; `rise` good probes bring it back.
//! Without a probe path, an origin taken out is tried again after `interval`. With every
//! origin out, the first is tried anyway.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Method, Request, Response};

use super::http_client::{HyperUpstream, UpstreamConfig};
use crate::cache::upstream::{Upstream, UpstreamBody, UpstreamError};
use crate::config::OriginFailover;
use crate::observe::upstreams::OriginMember;

struct Member {
    state: Arc<OriginMember>,
    client: HyperUpstream,
}

pub struct OriginGroup {
    members: Vec<Member>,
    failover: OriginFailover,
}

impl OriginGroup {
    /// The group of `origin` (its URL is the primary) and the fallbacks, with active probes
    /// when a path is set.
    pub fn start(origin: &UpstreamConfig, failover: OriginFailover) -> Arc<Self> {
        let urls = std::iter::once(origin.origin.clone()).chain(failover.fallbacks.clone());
        let members: Vec<Member> = urls
            .enumerate()
            .map(|(rank, url)| {
                let state = Arc::new(OriginMember::new(url.to_string(), rank));
                if let Some(m) = &origin.metrics {
                    m.upstreams
                        .origins
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(state.clone());
                }
                Member {
                    state,
                    client: HyperUpstream::new(&UpstreamConfig {
                        origin: url,
                        ..origin.clone()
                    }),
                }
            })
            .collect();
        let this = Arc::new(Self { members, failover });
        if let Some(path) = this.failover.probe_path.clone() {
            let weak = Arc::downgrade(&this);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(
                    weak.upgrade()
                        .map_or(std::time::Duration::from_secs(2), |t| t.failover.interval),
                );
                loop {
                    tick.tick().await;
                    let Some(this) = weak.upgrade() else { break };
                    for m in &this.members {
                        let ok = m.client.probe(&path, this.failover.interval).await;
                        if ok {
                            m.state.passed(this.failover.rise);
                        } else {
                            m.state.failed(this.failover.fall, None);
                        }
                    }
                }
            });
        }
        this
    }

    /// Without active probes, a downed origin is tried again after the interval.
    fn retry_after(&self) -> Option<std::time::Duration> {
        self.failover
            .probe_path
            .is_none()
            .then_some(self.failover.interval)
    }

    /// Usable origins in order; the first one when none is.
    fn order(&self) -> Vec<usize> {
        let usable: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].state.usable())
            .collect();
        if usable.is_empty() { vec![0] } else { usable }
    }
}

impl Upstream for OriginGroup {
    fn fetch(
        &self,
        req: Request<UpstreamBody>,
    ) -> BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>> {
        let order = self.order();
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return self.members[order[0]].client.fetch(req);
        }
        let (parts, _empty) = req.into_parts();
        let attempts: Vec<(Arc<OriginMember>, BoxFuture<'static, _>)> = order
            .iter()
            .map(|&i| {
                let m = &self.members[i];
                (
                    m.state.clone(),
                    m.client.fetch(super::shield::rebuild(&parts)),
                )
            })
            .collect();
        let (statuses, rise, fall, retry) = (
            self.failover.statuses.clone(),
            self.failover.rise,
            self.failover.fall,
            self.retry_after(),
        );
        async move {
            let last = attempts.len() - 1;
            let mut result = Err(UpstreamError::Unavailable);
            for (n, (state, fut)) in attempts.into_iter().enumerate() {
                result = fut.await;
                let failed = match &result {
                    Ok(r) => statuses.contains(&r.status().as_u16()),
                    Err(
                        UpstreamError::Connect(_)
                        | UpstreamError::Timeout(_)
                        | UpstreamError::Unavailable,
                    ) => true,
                    Err(_) => false,
                };
                if !failed {
                    state.passed(rise);
                    return result;
                }
                state.failed(fall, retry);
                if n == last {
                    break;
                }
            }
            result
        }
        .boxed()
    }
}
